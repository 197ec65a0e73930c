"""DARE: drop-and-rescale task updates, then Task Arithmetic or TIES without trimming.

The drop mask of a tensor comes from a generator owned by the merge and seeded from
``(seed, tensor name)`` only, so the same seed gives the same masks whatever the global
RNG state, the order tensors are visited in, or the device (masks are drawn on CPU): a
streaming merge, a sweep and a re-run all agree.

Per-task coefficients (``weights`` and/or a ``coefficients`` table, src/merge/coefficients.py)
multiply each task's dropped-and-rescaled update (``linear``: ``lam * sum_i w_i c_i(name)
drop(dW_i)``), or its elected vector before the disjoint mean (``ties``, as in TIES: the sign
election and the count stay unweighted).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..coefficients import all_ones, check_coefficient_params, task_coefficients
from ..registry import MergeMethod, ReductionSpec, TensorGroup, register
from ..reductions import SignSum
from ._kernels import dare_drop, elected_sign_sum, ties_combine
from .ties import check_scope, disjoint_combination, elected_entries, stacked_updates

MAJORITY_SIGN = "dare_majority_sign"


def dare_seed(seed: int, name: str) -> int:
    """Stable 63-bit generator seed of one tensor (not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_generator(seed: int, name: str) -> torch.Generator:
    """A fresh CPU generator for the drop mask of tensor ``name``."""
    return torch.Generator(device="cpu").manual_seed(dare_seed(seed, name))


@register
class Dare(MergeMethod):
    """``dare_linear``: ``lam * sum_i drop(dW_i)``; ``dare_ties``: ``lam * disjoint_mean``."""

    name = "dare"
    deferred_reductions = (MAJORITY_SIGN,)  # needed only where trimmed values cancel exactly
    # the majority sign never depends on lam or the coefficients
    reduction_keys = ("p", "mode", "seed", "sign_fill")

    @dataclass
    class Params:
        """Hyperparameters of DARE.

        p: drop probability of each entry; survivors are rescaled by ``1/(1-p)``.
            Default 0.2 (KnOTS authors' DARE-TIES, ViT-B/32 LoRA; 0.1 for KnOTS-DARE-TIES).
            The DARE paper drops up to 0.9 of full-finetune deltas.
        lam: scaling coefficient shared by all tasks. Default 1.0. KnOTS authors: 0.6 for
            DARE-TIES (ViT-B/32).
        mode: ``"linear"`` (default; Task Arithmetic sum after the drop, PEFT's
            ``dare_linear``) or ``"ties"`` (sign election + disjoint mean, no trimming).
        seed: seed of the drop masks. Default 0. The KnOTS protocol runs 420..424 and keeps
            the best on validation.
        sign_fill: ``mode="ties"`` only: sign of entries whose elected sign is 0 —
            ``"tensor"`` (default) majority of the tensor, or ``"global"`` majority of the
            whole model (a first pass over the model with the same masks).
        weights: per-task multipliers ``w_i`` in merge order. Default None (all 1).
        coefficients: path of a coefficient table (src/merge/coefficients.py), ``c_i(name)``
            per tensor. Default None. Each task's dropped update (``ties``: its elected vector)
            is multiplied by ``w_i c_i(name)`` (module docstring).
        """

        p: float = 0.2
        lam: float = 1.0
        mode: str = "linear"
        seed: int = 0
        sign_fill: str = "tensor"
        weights: Optional[list[float]] = None
        coefficients: Optional[str] = None

        def __post_init__(self):
            if not 0.0 <= self.p < 1.0:
                raise ValueError(f"dare: p must be in [0, 1), got {self.p}")
            if self.mode not in ("linear", "ties"):
                raise ValueError(f"dare: mode must be 'linear' or 'ties', got {self.mode!r}")
            check_scope("dare", "sign_fill", self.sign_fill)
            check_coefficient_params("dare", self)

    def dropped(self, group: TensorGroup, params: Params) -> torch.Tensor:
        """Stacked updates after drop-and-rescale, masks from ``(seed, group.name)``."""
        return dare_drop(stacked_updates(group), params.p, dare_generator(params.seed, group.name))

    def reductions(self, params: Params) -> list[ReductionSpec]:
        if params.mode == "ties" and params.sign_fill == "global":
            return [(MAJORITY_SIGN, lambda stats: SignSum(lambda g: elected_sign_sum(self.dropped(g, params))))]
        return []

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        coefs = task_coefficients(params, state.name, state.num_tasks, self.name)
        x = self.dropped(state, params)
        fill = (lambda: stats[MAJORITY_SIGN]) if params.sign_fill == "global" else None
        if all_ones(coefs):  # the plain DARE paths, unchanged
            if params.mode == "linear":
                return params.lam * x.sum(dim=0)
            return ties_combine(x, None, fill).mul_(params.lam)
        if params.mode == "linear":
            return disjoint_combination(x, coefs, "sum", params.lam)
        return disjoint_combination(elected_entries(x, None, fill), coefs, "mean", params.lam)
