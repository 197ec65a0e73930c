"""Fisher merging: a per-entry average weighted by each task's diagonal Fisher.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(``mmatena/model_merging``)::

    W = sum_i s_i F_i W_i / sum_i s_i F_i          (per entry; F_i: diagonal Fisher of task i)

The weights ``s_i F_i`` of an entry sum to one after the division, so the merge is the same on
weights and on task updates: ``W - W0 = sum_i s_i F_i dW_i / sum_i s_i F_i``. It is computed on
the updates (smaller numbers, the engine adds ``W0`` back) and needs no base model; without
one the "updates" are the task weights themselves.

Where every ``F_i`` of an entry is 0 (a parameter no example's gradient reached, e.g. the
embedding of a token absent from the data), the ratio is 0/0. Every published implementation
floors the Fisher for this (``fisher_floor``); one published version instead returns 0 there,
which resets those entries to the base weight: a bug. Here the floor is applied to every task
(as in the MaTS code), so such entries get the ``s``-weighted average of the tasks (the plain
average with the default ``scales``), and where the floor is 0 and every ``F_i`` is 0 the
average is used explicitly: the result is never NaN.

Tensors without Fisher statistics (the statistics did not cover them) are averaged (weighted
by ``scales``), i.e. merged as if their Fisher were constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..reductions import GlobalReduction
from ..registry import MergeMethod, ReductionSpec, TensorGroup, register
from ..updates import densify

#: Name of the model-wide Fisher norms in the ``stats`` handed to ``merge`` (``normalize="model"``).
FISHER_NORMS = "fisher_model_norms"

NORMALIZE = ("none", "tensor", "model")


def task_scales(scales: Optional[list[float]], n: int, method: str) -> list[float]:
    """The per-task coefficients ``s_i`` (all 1 by default); their number must match the tasks."""
    if scales is None:
        return [1.0] * n
    if len(scales) != n:
        raise ValueError(f"{method}: scales has {len(scales)} entries for {n} task models (one per task expected)")
    return [float(s) for s in scales]


def weighted_mean(updates, coefs: list[float]) -> torch.Tensor:
    """``sum_i c_i dW_i / sum_i c_i`` of dense updates (a new tensor)."""
    total = sum(coefs)
    out = None
    for u, c in zip(updates, coefs):
        if c == 0:
            continue
        term = densify(u) * (c / total)
        out = term if out is None else out.add_(term)
    return out if out is not None else torch.zeros_like(densify(updates[0]))


def check_side_shape(group: TensorGroup, kind: str, expected: tuple, method: str) -> None:
    """Every task's ``kind`` statistics of ``group`` have shape ``expected`` (else a clear error)."""
    for i, s in enumerate(group.side[kind]):
        if tuple(s.shape) != tuple(expected):
            raise ValueError(f"{method}: {kind} statistics of '{group.name}' (task {i}) have shape {tuple(s.shape)}, "
                             f"expected {tuple(expected)}")


class FisherNorms(GlobalReduction):
    """Per task, the L2 norm of its diagonal Fisher over every tensor it covers (one pass)."""

    def __init__(self):
        self._passes = 0
        self._sq: Optional[list[float]] = None

    def start_pass(self) -> bool:
        self._passes += 1
        return self._passes == 1

    def observe(self, name: str, state: TensorGroup) -> None:
        if not state.covered("fisher"):
            return
        sq = [float(f.double().square().sum()) for f in state.side["fisher"]]
        self._sq = sq if self._sq is None else [a + b for a, b in zip(self._sq, sq)]

    def result(self) -> Optional[list[float]]:
        return None if self._sq is None else [math.sqrt(v) for v in self._sq]


@register
class Fisher(MergeMethod):
    """Fisher-weighted average ``sum_i s_i F_i W_i / sum_i s_i F_i`` (diagonal Fisher; needs statistics)."""

    name = "fisher"
    needs_base = False  # a weighted average of weights: W0 cancels
    requires = ("fisher",)
    reduction_keys = ("normalize",)

    @dataclass
    class Params:
        """Hyperparameters of Fisher merging (needs ``fisher`` statistics: ``--statistics TAG``).

        fisher_floor: every ``F_i`` entry below it is raised to it, in every task, before
            weighting (after normalization when ``normalize`` is set). Entries where all tasks'
            Fishers are below the floor thus get the ``scales``-weighted (by default: plain)
            average. Default 1e-8, absolute, as in the MaTS authors' code (``r-three/mats``,
            ``set_minimum(fisher, 1e-8)`` on every task). Matena & Raffel's code floors only the
            first ("target") model at 1e-6; FusionBench adds 1e-6 to every Fisher; Bloomberg's
            RegMean code adds 1e-10. 0 disables the floor (all-zero entries still get the
            average, never NaN). The floor is absolute: Fisher values of large models can be
            far below 1e-8, so check the statistics' scale (or normalize) before relying on it.
        scales: per-task coefficients ``s_i`` (one per task model, in task order), multiplying
            each task's Fisher. Default ``None``: all equal (Matena & Raffel and FusionBench
            default to ``1/n``, the same merge). Matena & Raffel search them on a grid.
        normalize: divide each task's Fisher by its L2 norm first, so that tasks whose Fishers
            differ in scale (loss, number of classes, sequence length) weigh alike. ``"none"``
            (default: the Fisher-merging formula as published, and the MaTS code),
            ``"model"``: the norm over every tensor the statistics cover (a model-wide pass;
            Matena & Raffel's ``normalize_fishers=True`` default, FusionBench's
            ``normalize_fisher_weight=True`` default, Bloomberg's ``fisher_normalize: model``),
            ``"tensor"``: the norm of each tensor's Fisher (Bloomberg's ``param``).
        """

        fisher_floor: float = 1e-8
        scales: Optional[list[float]] = None
        normalize: str = "none"

        def __post_init__(self):
            if not self.fisher_floor >= 0:
                raise ValueError(f"fisher: fisher_floor must be >= 0, got {self.fisher_floor}")
            if self.normalize not in NORMALIZE:
                raise ValueError(f"fisher: normalize must be one of {NORMALIZE}, got {self.normalize!r}")
            if self.scales is not None:
                if any(not s >= 0 for s in self.scales) or not any(s > 0 for s in self.scales):
                    raise ValueError(f"fisher: scales must be >= 0 with at least one > 0, got {self.scales}")

    def reductions(self, params: Params) -> list[ReductionSpec]:
        if params.normalize == "model":
            return [(FISHER_NORMS, lambda stats: FisherNorms())]
        return []

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        n = state.num_tasks
        s = task_scales(params.scales, n, self.name)
        if not state.covered("fisher"):
            return weighted_mean(state.updates, s)
        check_side_shape(state, "fisher", tuple(state.shape), self.name)
        fishers = state.side["fisher"]
        if params.normalize == "model":
            norms = stats[FISHER_NORMS]
        elif params.normalize == "tensor":
            norms = [float(torch.linalg.vector_norm(f.double())) for f in fishers]
        else:
            norms = [1.0] * n
        num = den = None
        for u, f, si, norm in zip(state.updates, fishers, s, norms):
            if si == 0:
                continue
            if norm == 1.0:
                w = f.clamp(min=params.fisher_floor)
            elif norm > 0:
                w = torch.div(f, norm).clamp_(min=params.fisher_floor)
            else:  # this task's Fisher is 0 wherever it is defined: only the floor weighs it
                w = torch.full_like(f, params.fisher_floor)
            if si != 1.0:
                w.mul_(si)
            term = w * densify(u)
            num = term if num is None else num.add_(term)
            den = w if den is None else den.add_(w)
        merged = num.div_(den)
        if params.fisher_floor == 0:  # 0/0 where every weight is 0: the average instead of NaN
            merged = torch.where(den > 0, merged, weighted_mean(state.updates, s))
        return merged
