"""The data passes of permutation merging, each one Lightning ``predict`` loop:

* :func:`activation_statistics` — for every perm, streamed sums over the units of all ``M``
  models observed on the same examples at the spec's points (forward hooks): ``count``,
  ``sum`` (``M*d``) and ``gram`` (``M*d x M*d``, float64), from which ``matcher`` forms the
  correlation. Samples are examples x positions (pixels of a feature map, tokens); a perm with
  several points (a residual stream seen after every block) pools them. Memory is the
  accumulators', independent of the number of examples.
* :func:`reset_batchnorm` — BatchNorm running statistics recomputed on training data for a
  merged network (cumulative averages: ``momentum=None``), as ZipIt and MuDSC do after merging
  (averaged running statistics do not describe the merged units).

Data: ``n`` seeded training examples of each task, read with the evaluation collate (no
augmentation), pooled in task order (Lightning's sequential ``CombinedLoader``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Subset

from .spec import PermutationSpec


def _trainer(accelerator: str = "auto", progress: bool = False) -> L.Trainer:
    from ..finetune.quiet import quiet_lightning_info

    quiet_lightning_info()
    return L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=progress, inference_mode=False)


def training_loader(datamodule, n: int, seed: int, batch_size: Optional[int] = None, offset: int = 0) -> DataLoader:
    """``n`` seeded training examples (after skipping ``offset`` of the same seeded order)."""
    from ..statistics.collect import split_data, subset_indices

    dataset, collate = split_data(datamodule, "train")
    indices = subset_indices(len(dataset), offset + n, seed)[offset:]
    size = batch_size or getattr(datamodule, "eval_batch_size", None) or getattr(datamodule, "batch_size", 64)
    return DataLoader(Subset(dataset, indices), batch_size=int(size), shuffle=False, collate_fn=collate)


def _units(x: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """``(samples, units)``: every position of every example is a sample."""
    x = x.movedim(unit_axis, -1)
    return x.reshape(-1, x.shape[-1])


class _ActivationPass(L.LightningModule):
    def __init__(self, modules: Sequence[L.LightningModule], spec: PermutationSpec):
        super().__init__()
        self.tasks = nn.ModuleList(modules)
        self.spec = spec
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self._feats: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in modules]
        self._handles: list[Any] = []

    def on_predict_start(self) -> None:
        for i, task in enumerate(self.tasks):
            named = dict(task.model.named_modules())
            for perm, points in self.spec.points.items():
                for j, point in enumerate(points):
                    if point.module not in named:
                        raise ValueError(f"permutation spec: module {point.module!r} (a point of perm {perm!r}) "
                                         f"is not in {type(task.model).__name__}")
                    self._handles.append(self._hook(named[point.module], i, perm, j, point))

    def _hook(self, module: nn.Module, i: int, perm: str, j: int, point):
        def keep(x):
            x = x[0] if isinstance(x, (tuple, list)) else x
            self._feats[i][(perm, j)] = _units(x.detach().float(), point.unit_axis)

        if point.io == "input":
            return module.register_forward_pre_hook(lambda m, args: keep(args[0]))
        return module.register_forward_hook(lambda m, args, output: keep(output))

    def on_predict_end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        for feats, task in zip(self._feats, self.tasks):
            feats.clear()
            task.logits(batch)
        for perm, points in self.spec.points.items():
            for j in range(len(points)):
                F = torch.cat([feats[(perm, j)] for feats in self._feats], dim=1)
                acc = self.sums.get(perm)
                if acc is None:
                    width = F.shape[1]
                    acc = self.sums[perm] = {"count": torch.zeros((), dtype=torch.float64),
                                             "sum": torch.zeros(width, dtype=torch.float64, device=F.device),
                                             "gram": torch.zeros(width, width, dtype=torch.float64, device=F.device)}
                acc["count"] += F.shape[0]
                acc["sum"] += F.sum(0).double()
                acc["gram"] += (F.T @ F).double()
        return None


def _pooled(loaders: Sequence[DataLoader]):
    return CombinedLoader(list(loaders), mode="sequential")


def activation_statistics(modules: Sequence[L.LightningModule], spec: PermutationSpec, loaders: Sequence[DataLoader],
                          accelerator: str = "auto") -> dict[str, dict[str, torch.Tensor]]:
    """Streamed activation sums of every perm (module docstring); ``modules``: the task models
    (each with its own network in ``.model``), ``loaders``: the pooled examples."""
    pass_ = _ActivationPass(modules, spec)
    _trainer(accelerator).predict(pass_, dataloaders=_pooled(loaders), return_predictions=False)
    missing = [p for p in spec.perms if p not in pass_.sums]
    if missing:
        raise ValueError(f"no activations were observed for perms {missing[:3]}: the spec has no point for them")
    return {p: {k: v.cpu() for k, v in s.items()} for p, s in pass_.sums.items()}


class _NormPass(L.LightningModule):
    def __init__(self, modules: Sequence[L.LightningModule]):
        super().__init__()
        self.tasks = nn.ModuleList(modules)
        self.norms = [m for m in modules[0].model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def on_predict_start(self) -> None:
        for m in self.norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the whole pass
            m.train()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        with torch.no_grad():
            self.tasks[dataloader_idx].logits(batch)
        return None


def reset_batchnorm(modules: Sequence[L.LightningModule], loaders: Sequence[DataLoader],
                    accelerator: str = "auto") -> bool:
    """Recompute the BatchNorm statistics of the network the ``modules`` share (``loaders[i]``
    feeds ``modules[i]``); ``False`` when it has no BatchNorm."""
    pass_ = _NormPass(modules)
    if not pass_.norms:
        return False
    momenta = [m.momentum for m in pass_.norms]
    try:
        _trainer(accelerator).predict(pass_, dataloaders=_pooled(loaders), return_predictions=False)
    finally:
        for m, momentum in zip(pass_.norms, momenta):
            m.momentum = momentum
            m.eval()
    return True


def accuracy_on(module: L.LightningModule, loader: DataLoader, accelerator: str = "auto") -> float:
    """The task module's own validation metric (its ``validation_step``) on ``loader``."""
    module.eval()
    result = _trainer(accelerator).validate(module, dataloaders=loader, verbose=False)
    return float(result[0]["val/acc"])


__all__ = ["activation_statistics", "reset_batchnorm", "accuracy_on", "training_loader"]
