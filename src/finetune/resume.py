"""What a resumed fit needs, beyond Lightning's own checkpoint, to continue exactly where it stopped.

Lightning checkpoints hold the weights, optimizer, scheduler and loop counters, not the global
random state, so a resumed run draws other dropout masks and augmentations than the run it
continues. :class:`ResumeRNG` stores the torch / CUDA / numpy / Python RNG states in every
Lightning checkpoint (as tensors and plain values: the checkpoint still loads with
``torch.load(weights_only=True)``) and restores them when the checkpoint is loaded. Together with
the per-epoch training order (``src/finetune/data/sampling.py``) a run resumed from an end-of-epoch
checkpoint on the CPU is bit-identical to an uninterrupted one. Exceptions: random work in
DataLoader worker processes (``num_workers > 0``: workers are re-created with new seeds) and
nondeterministic GPU kernels.

``python -m src.finetune fit`` always adds it (``FinetuneCLI``). A checkpoint callback that
makes resuming pick the newest state, whatever the monitored metric did, is
``ModelCheckpoint(save_last=True or "link", every_n_epochs=1)`` without ``monitor`` (see the
configs in ``configs/finetune``): with ``monitor``, Lightning rewrites ``last.ckpt`` only on a
new best, so ``--resume`` would restart from the best epoch and train the rest again.
"""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states.get("numpy")
    if n is not None:
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = states.get("python")
    if p is not None:
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeRNG(Callback):
    """Saves the global RNG states with each Lightning checkpoint; loading one restores them."""

    def __init__(self):
        self.restored: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning loads callback states after the model's setup (which may draw random numbers)
        # and before training; nothing between here and the first batch draws from these RNGs
        # (the sanity check runs under isolate_rng, loaders have their own generators).
        states = state_dict.get("rng")
        if states is not None:
            set_rng_states(states)
            self.restored = states
