"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., 2023).

Two scope choices change results, so both exist as options:

* ``trim_scope``: each task's top-k over the whole flattened model (``"global"``: the
  original TIES, KnOTS and FusionBench code, and the compositional-generalization paper) or
  within each tensor (``"tensor"``: PEFT, mergekit; huge models then merge one tensor at a
  time with no first pass).
* ``sign_fill``: entries whose elected sign is 0 take the majority sign of the whole model
  (``"global"``: the original TIES and KnOTS code) or of their own tensor, i.e. parameter
  block (``"tensor"``).

The compositional-generalization paper ("Realistic Evaluation of Model Merging for
Compositional Generalization", App. H.1) trims globally and fills zero signs per tensor:
``trim_scope="global", sign_fill="tensor"``. PEFT and mergekit do not fill: an elected sign
of 0 counts as positive, which differs from either fill only where trimmed values cancel
exactly. See docs/algorithms.md#ties.

Either scope keeps exactly ``k = int(density * N)`` entries per task (N: the model's or
the tensor's entries), also when magnitudes tie with the ``k``-th largest, which is
common in bf16: among tied entries, those first in (tensor order, flat row-major index)
order are kept (see :class:`~src.merge.reductions.TopKThresholds`). The tensor order is
the engine's (the base model's parameter order), whatever order tensors are merged in.

Per-task coefficients (``weights`` and/or a ``coefficients`` table, src/merge/coefficients.py)
multiply each task's trimmed and elected vector ``E_i`` (its kept entries that agree with the
elected sign; the election itself is unweighted) before the disjoint merge:
``dW = lam * sum_i w_i c_i(name) E_i / count`` with ``disjoint="mean"`` (``count``: the number
of entries ``E_i != 0``, as without coefficients; PEFT's ``ties`` with ``weights``), or
``dW = lam * sum_i w_i c_i(name) E_i`` with ``disjoint="sum"`` (AdaMerging++: the "dis-sum" of
the AdaMerging code, ``W0 + sum_i lambda_i E_i``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..coefficients import Coefs, all_ones, check_coefficient_params, task_coefficients, weighted_combination
from ..registry import MergeMethod, ReductionSpec, TensorGroup, register
from ..reductions import SignSum, TopKThreshold
from ..updates import densify
from ._kernels import TieQuota, elect_chunks, elected_sign_sum, ties_combine, topk_trim

#: Names of the global reductions in the ``stats`` dict handed to ``merge``.
THRESHOLDS = "ties_trim_thresholds"
MAJORITY_SIGN = "ties_majority_sign"

SCOPES = ("global", "tensor")
DISJOINT = ("mean", "sum")


def stacked_updates(group: TensorGroup) -> torch.Tensor:
    """The dense task updates of one tensor, stacked: ``(n_tasks, *shape)``."""
    return torch.stack([densify(u) for u in group.updates])


def check_scope(method: str, field: str, value: str) -> None:
    if value not in SCOPES:
        raise ValueError(f"{method}: {field} must be 'global' or 'tensor', got {value!r}")


def elected_entries(x: torch.Tensor, thresholds: Optional[Sequence[float]] = None,
                    fill: Union[None, float, Callable[[], float]] = None, tie_quota: TieQuota = None) -> torch.Tensor:
    """Each task's trimmed vector with only the entries that agree with the elected sign:
    ``E_i = trim(x)_i`` where ``sign(trim(x)_i) == elect_sign(trim(x))``, else 0 (same shape as ``x``).

    The same trim, election and zero-sign fill as :func:`~src.merge.methods._kernels.ties_combine`
    (whose output is ``sum_i E_i / #{i: E_i != 0}``), chunked the same way; ``fill`` is called
    only where an elected sign is 0 over nonzero values.
    """
    out = torch.empty(x.shape[0], x[0].numel(), dtype=x.dtype, device=x.device)

    def emit(cols, xt, s):
        out[:, cols] = xt * ((xt * s) > 0)

    elect_chunks(x, thresholds, fill, tie_quota, emit)
    return out.reshape(x.shape)


def disjoint_combination(elected: torch.Tensor, coefs: Optional[Coefs], disjoint: str, lam: float) -> torch.Tensor:
    """``lam * sum_i coefs[i] E_i`` (``disjoint="sum"``), divided by ``#{i: E_i != 0}`` (``"mean"``).
    ``coefs=None``: all 1. Out of place, so ``coefs`` may be tensors (AdaMerging's autograd)."""
    n = elected.shape[0]
    out = weighted_combination(elected, [1.0] * n if coefs is None else coefs)
    if disjoint == "mean":
        out = out / (elected != 0).sum(dim=0).clamp(min=1)
    return out * lam


@register
class Ties(MergeMethod):
    """``dW_m = lam * disjoint_mean(elect_sign(trim(dW)))``, global or per-tensor scope."""

    name = "ties"
    deferred_reductions = (MAJORITY_SIGN,)  # needed only where trimmed values cancel exactly
    # the trim thresholds and majority sign never depend on lam, disjoint or the coefficients
    reduction_keys = ("density", "trim_scope", "sign_fill")

    @dataclass
    class Params:
        """Hyperparameters of TIES.

        lam: scaling coefficient shared by all tasks. Default 1.0 (the TIES paper's
            recommended value for full finetunes). KnOTS authors: 0.3 (ViT-B/32 and
            ViT-L/14 LoRA).
        density: fraction of each task's entries kept by magnitude (``k`` of top-k%):
            exactly ``int(density * N)``, ties broken by position (module docstring).
            Default 0.2 (TIES paper, k = 20%). KnOTS authors: 0.3 (ViT-B/32), 0.2 (ViT-L/14).
        trim_scope: ``"global"`` (default; original TIES, KnOTS, FusionBench, and the
            compositional-generalization paper): each task's top-k over the whole flattened
            model, via a streaming exact reduction. ``"tensor"`` (PEFT, mergekit): top-k
            within each tensor.
        sign_fill: sign given to entries whose elected sign is 0. ``"global"`` (default;
            original TIES, KnOTS): majority sign of the whole model. ``"tensor"``: majority
            sign of the tensor (parameter block); the compositional-generalization paper
            uses it together with ``trim_scope="global"``.
        disjoint: how the elected entries are combined. ``"mean"`` (default; the TIES paper):
            per entry, the (weighted) sum over the tasks whose entry survived, divided by their
            number. ``"sum"``: that sum undivided (AdaMerging++'s "dis-sum"; re-applying its
            learned table needs ``disjoint="sum", lam=1``).
        weights: per-task multipliers ``w_i`` in merge order. Default None (all 1).
        coefficients: path of a coefficient table (src/merge/coefficients.py), ``c_i(name)``
            per tensor, e.g. a learned AdaMerging++ table. Default None. Task ``i``'s elected
            vector is multiplied by ``w_i c_i(name)`` before the disjoint merge; the sign election
            and the count of the mean stay unweighted (module docstring).
        """

        lam: float = 1.0
        density: float = 0.2
        trim_scope: str = "global"
        sign_fill: str = "global"
        disjoint: str = "mean"
        weights: Optional[list[float]] = None
        coefficients: Optional[str] = None

        def __post_init__(self):
            if not 0.0 <= self.density <= 1.0:
                raise ValueError(f"ties: density must be in [0, 1], got {self.density}")
            check_scope("ties", "trim_scope", self.trim_scope)
            check_scope("ties", "sign_fill", self.sign_fill)
            if self.disjoint not in DISJOINT:
                raise ValueError(f"ties: disjoint must be 'mean' or 'sum', got {self.disjoint!r}")
            check_coefficient_params("ties", self)

    def reductions(self, params: Params) -> list[ReductionSpec]:
        specs: list[ReductionSpec] = []
        if params.trim_scope == "global":
            specs.append((THRESHOLDS, lambda stats: TopKThreshold(stacked_updates, params.density)))
        if params.sign_fill == "global":
            # model-wide majority = sign of the sum of every entry's elected (unfilled) sign
            specs.append(
                (MAJORITY_SIGN, lambda stats: SignSum(lambda g: elected_sign_sum(*self.trim_inputs(g, params, stats))))
            )
        return specs

    def trim_inputs(self, group: TensorGroup, params: Params, stats: dict):
        """The stacked updates of ``group``, each task's trim threshold and tie quota
        (``None``: keep every entry tied with the threshold)."""
        x = stacked_updates(group)
        if params.trim_scope == "global":
            return x, stats[THRESHOLDS], stats[THRESHOLDS].tie_quota(group.name)
        trims = [topk_trim(xi, params.density) for xi in x]
        return x, [t for t, _ in trims], [q for _, q in trims]

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        coefs = task_coefficients(params, state.name, state.num_tasks, self.name)
        if params.disjoint == "mean" and all_ones(coefs):  # the plain TIES path, unchanged
            x, thresholds, quota = self.trim_inputs(state, params, stats)
            fill = (lambda: stats[MAJORITY_SIGN]) if params.sign_fill == "global" else None
            return ties_combine(x, thresholds, fill, tie_quota=quota).mul_(params.lam)
        return self.combine(self.coefficient_state(state, params, stats), params, coefs)

    # ----- per-task coefficients (AdaMerging++: src/evaluate/adamerging.py) -------------
    def coefficient_state(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        """The elected vectors ``E`` of one tensor, ``(n_tasks, *shape)``: independent of the coefficients."""
        x, thresholds, quota = self.trim_inputs(state, params, stats)
        fill = (lambda: stats[MAJORITY_SIGN]) if params.sign_fill == "global" else None
        return elected_entries(x, thresholds, fill, tie_quota=quota)

    def combine(self, elected: torch.Tensor, params: Params, coefs: Optional[Coefs]) -> torch.Tensor:
        """``lam * disjoint_{mean|sum}(coefs[i] * E_i)``; ``coefs`` may be tensors (autograd)."""
        return disjoint_combination(elected, coefs, params.disjoint, params.lam)
