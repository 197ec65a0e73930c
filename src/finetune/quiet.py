"""Keep command-line output to progress bars, results and real problems.

The demo and the finetune CLIs used to print, per task, transformers' "Loading weights" bar for
every model load and a handful of known, harmless messages from dependencies (a deprecation
inside Lightning, a transformers FutureWarning triggered by PEFT, bitsandbytes' note that an
optional CPU kernel package is missing, Lightning's advertisement for its cloud logger, ...).
:func:`quiet_known_noise` silences exactly those, by message; every other warning and every
error still shows. Command-line entry points call it; library code does not.
"""
from __future__ import annotations

import logging
import warnings

#: ``warnings`` messages (regular expressions, matched at the start) known to be harmless here.
KNOWN_WARNINGS = (
    # Lightning's own pytree helper on torch >= 2.10 (lightning/pytorch/utilities/_pytree.py)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # PEFT calls the renamed transformers property
    r"`is_gradient_checkpointing` is deprecated",
    # LightningCLI warns when sys.argv also holds arguments (train_all passes its own)
    r".*LightningCLI's args parameter",
    # small demo / test splits
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # the permutation data passes accumulate inside predict_step and return nothing on purpose
    r"predict returned None if it was on purpose",
)

#: Log records (logger name -> message prefixes) known to be noise for these commands.
KNOWN_LOG_RECORDS = {
    # optional `kernels` package for a bitsandbytes CPU kernel; we never run 4-bit on the CPU
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging",
        "Loading `train_dataloader` to estimate number of stepping batches",
        "TPU available: False",
    ),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not message.startswith(self.prefixes)


_installed = False


def quiet_known_noise() -> None:
    """Silence the known noise above and transformers' per-load progress bars (idempotent)."""
    global _installed
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if _installed:
        return
    _installed = True
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # "Loading weights" on every from_pretrained
    # transformers' own logged warnings stay on: none is known noise here, and some (weights
    # not used / newly initialized) tell the user that a model is not what they think


def quiet_lightning_info() -> None:
    """Lightning's per-run INFO lines (GPU available, TPU...) off, for short internal loops (data passes)."""
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
