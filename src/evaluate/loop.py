"""The one evaluation path: Lightning's validate / test / predict loops over the task modules.

Per-task metrics are what the task module itself logs in ``validation_step`` / ``test_step``
(the same code that scores finetuning; ``val/acc`` -> ``acc``). Logits for the Ensemble and
the joint benchmark come from ``predict_step``. One :class:`Evaluator` (one Trainer) serves a
whole run on one device (a distributed sampler would repeat examples and change the numbers;
the run refuses ``devices > 1``; ``predict`` gathers ranks in dataset order for other callers).
Its bars are transient, so a sweep shows one line per loop while it runs and nothing after.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class TransientBar(TQDMProgressBar):
    """Lightning's bars, removed when their loop ends (standalone validate/test keep them)."""

    def __init__(self, description: str = ""):
        super().__init__(leave=False)
        self.description = description

    def _transient(self, bar):
        bar.leave = False
        if self.description:
            bar.set_description(self.description)
        return bar

    def init_validation_tqdm(self):
        return self._transient(super().init_validation_tqdm())

    def init_test_tqdm(self):
        return self._transient(super().init_test_tqdm())

    def init_predict_tqdm(self):
        return self._transient(super().init_predict_tqdm())


@dataclass
class SplitResult:
    metrics: dict[str, float]  # e.g. {"acc": 0.91}
    n: int
    wall_s: float


class Evaluator:
    """Runs the task modules' evaluation steps through one Lightning Trainer.

    Args:
        accelerator, devices, strategy, precision: as for ``lightning.Trainer``.
        progress: show Lightning's (transient) progress bars.
    """

    def __init__(self, accelerator: str = "auto", devices: Any = 1, strategy: str = "auto",
                 precision: Any = "32-true", progress: bool = True):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
        self.bar = TransientBar() if progress else None
        self.trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                                 logger=False, enable_checkpointing=False, enable_model_summary=False,
                                 enable_progress_bar=progress, callbacks=[self.bar] if progress else None,
                                 inference_mode=True)

    def _describe(self, what: str) -> None:
        if self.bar is not None:
            self.bar.description = what

    def metrics(self, module: L.LightningModule, loader, split: str, what: str = "") -> SplitResult:
        """The module's own metrics of ``split`` (``val`` or ``test``) over ``loader``."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        self._describe(what or split)
        start = time.perf_counter()
        run = self.trainer.validate if split == "val" else self.trainer.test
        results = run(module, dataloaders=loader, verbose=False)
        out = {}
        for key, value in (results[0] if results else {}).items():
            prefix, _, name = key.partition("/")
            if prefix == split and name:
                out[name] = float(value)
        return SplitResult(out, dataset_size(loader), time.perf_counter() - start)

    def predict(self, module: L.LightningModule, loader, what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), labels (N,)) of ``module.predict_step`` over ``loader``, in loader order."""
        self._describe(what or "predict")
        outputs = self.trainer.predict(module, dataloaders=loader, return_predictions=True) or []
        logits = torch.cat([o["logits"].float() for o in outputs]) if outputs else torch.empty(0, 0)
        labels = torch.cat([o["labels"] for o in outputs]) if outputs else torch.empty(0, dtype=torch.long)
        if self.trainer.world_size > 1:
            logits, labels = self._gather(logits, labels, dataset_size(loader))
        return logits.cpu(), labels.cpu()

    def _gather(self, logits: torch.Tensor, labels: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's predictions in dataset order. Lightning's predict sampler deals example
        ``i`` to rank ``i % world`` (no padding, no repeats); ranks pad to one length to gather.
        (Written for multi-device runs; the tests here exercise one device only.)"""
        world = self.trainer.world_size
        per_rank = -(-total // world)
        pad = per_rank - len(labels)
        if pad:
            logits = torch.cat([logits, logits.new_zeros(pad, logits.shape[1])])
            labels = torch.cat([labels, labels.new_full((pad,), -1)])
        strategy = self.trainer.strategy
        all_logits = strategy.all_gather(logits)  # (world, per_rank, C)
        all_labels = strategy.all_gather(labels)
        order = lambda t: t.transpose(0, 1).reshape(world * per_rank, *t.shape[2:])[:total]  # noqa: E731
        return order(all_logits), order(all_labels)


def dataset_size(loader) -> int:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return 0


def split_loader(datamodule, split: str):
    """The ``val`` or ``test`` DataLoader of a task's DataModule (set up for it)."""
    datamodule.setup("validate" if split == "val" else "test")
    getter = getattr(datamodule, f"{split}_dataloader", None)
    loader = getter() if getter is not None else None
    if loader is None:
        raise ValueError(f"{type(datamodule).__name__} has no {split} split")
    return loader


def bare_forward_throughput(module, loader, device: Optional[torch.device] = None) -> float:
    """Examples per second of a bare ``torch.inference_mode()`` forward over pre-collated
    batches (the benchmark's yardstick for the Lightning loop)."""
    batches = [module.transfer_batch_to_device(b, device or module.device, 0) for b in loader]
    module.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        n = 0
        for batch in batches:
            module.logits(batch).argmax(-1)
            n += len(batch["labels"])
    return n / (time.perf_counter() - start)
