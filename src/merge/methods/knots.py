"""KnOTS: align the task updates of a layer by one SVD, then merge in the shared basis.

Per 2-D tensor, ``M = [dW_1 ... dW_n] = U S [V_1; ...; V_n]^T``; each task becomes
``S V_i^T`` (``k x I``) in the shared basis ``U``, and TA / TIES / DARE-TIES act on those
(Stoica et al., "Model merging with SVD to tie the KnOTS"). The SVD does not depend on
any merge hyperparameter, so ``prepare`` does it once per sweep; for LoRA inputs it uses
the factors (:func:`~src.merge.linalg.factored_concat_svd`) and the merged update stays
low rank: ``LowRank(B=U, A=merged)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..linalg import DEFAULT_TOL, FactoredCoefficients, dense_concat_svd, factored_concat_svd
from ..registry import MergeMethod, ReductionSpec, TensorGroup, register
from ..reductions import SignSum, TopKThreshold
from ..updates import LowRank, Update, densify
from ._kernels import dare_drop, elected_sign_sum, ties_combine, topk_trim
from .dare import dare_generator
from .ties import check_scope

#: Names of the global reductions in the ``stats`` dict handed to ``merge``.
THRESHOLDS = "knots_trim_thresholds"
MAJORITY_SIGN = "knots_majority_sign"

BASE_METHODS = ("ta", "ties", "dare_ties")


@dataclass
class KnotsState:
    """Prepared tensor: task coefficients ``X`` (``(n, k, D)``) in the shared basis ``U``.

    ``U is None`` for tensors merged element-wise (``dim < 2``; ``X`` is then the stacked
    updates). ``transposed``: row concatenation, where the basis spans the input side and
    ``X[i]`` holds ``(U_i S)^T``. ``low_rank``: return a :class:`LowRank` (LoRA inputs).
    ``coefficients`` is ``X`` itself or, for LoRA inputs, its factors (4x smaller; the
    global reductions read ``X`` several times, and a whole model's states stay cached).
    """

    name: str
    coefficients: Union[torch.Tensor, FactoredCoefficients]
    U: Optional[torch.Tensor]
    shape: torch.Size
    transposed: bool = False
    low_rank: bool = False

    @property
    def X(self) -> torch.Tensor:
        c = self.coefficients
        return c.materialize() if isinstance(c, FactoredCoefficients) else c


@register
class Knots(MergeMethod):
    """KnOTS-TA / KnOTS-TIES / KnOTS-DARE-TIES on SVD-aligned task updates."""

    name = "knots"
    deferred_reductions = (MAJORITY_SIGN,)  # needed only where trimmed values cancel exactly
    accepts_low_rank = True
    compute_dtype = torch.float64
    prepare_keys = ("concat", "svd_tol")
    reduction_keys = ("base_method", "density", "p", "seed", "trim_scope", "sign_fill")

    @dataclass
    class Params:
        """Hyperparameters of KnOTS (defaults: authors' ViT-B/32 rank-16 KnOTS-TIES).

        base_method: merge applied to the aligned ``S V_i^T``: ``"ta"``, ``"ties"``
            (default) or ``"dare_ties"``.
        lam: scaling coefficient shared by all tasks. Default 0.6 (KnOTS-TIES). Authors:
            KnOTS-DARE-TIES 0.7; KnOTS-TA = TA, 0.1 with ``sum`` (ViT-B/32).
        density: TIES keep fraction per task: exactly ``int(density * N)`` entries, ties
            broken by (tensor order, row-major index of ``S V_i^T``) as in ``ties``.
            Default 0.2 (authors' top-k 20).
        p: DARE drop probability. Default 0.1 (authors' KnOTS-DARE-TIES).
        seed: DARE mask seed (per tensor, from ``(seed, name)`` as in ``dare``). Default
            420, the first of the authors' seeds 420..424.
        trim_scope: ``"global"`` (default; authors): each task's top-k over all tensors'
            ``S V_i^T`` (and the raw values of 1-D tensors) flattened into one row;
            ``"tensor"``: within each tensor.
        sign_fill: zero elected signs take the majority sign of the whole model
            (``"global"``, default, authors) or of the tensor (``"tensor"``).
        concat: ``"column"`` (default; ``[dW_1 ... dW_n]``) or ``"row"`` (stack along the
            output dimension; the paper's ablation, 2.6 points worse).
        ta_reduce: ``"sum"`` (default) or ``"mean"`` (authors' ViT-L/14 TA).
        svd_tol: singular values ``<= svd_tol`` are dropped (authors: 1e-5).
        """

        base_method: str = "ties"
        lam: float = 0.6
        density: float = 0.2
        p: float = 0.1
        seed: int = 420
        trim_scope: str = "global"
        sign_fill: str = "global"
        concat: str = "column"
        ta_reduce: str = "sum"
        svd_tol: float = DEFAULT_TOL

        def __post_init__(self):
            if self.base_method not in BASE_METHODS:
                raise ValueError(f"knots: base_method must be one of {BASE_METHODS}, got {self.base_method!r}")
            if not 0.0 <= self.density <= 1.0:
                raise ValueError(f"knots: density must be in [0, 1], got {self.density}")
            if not 0.0 <= self.p < 1.0:
                raise ValueError(f"knots: p must be in [0, 1), got {self.p}")
            check_scope("knots", "trim_scope", self.trim_scope)
            check_scope("knots", "sign_fill", self.sign_fill)
            if self.concat not in ("column", "row"):
                raise ValueError(f"knots: concat must be 'column' or 'row', got {self.concat!r}")
            if self.ta_reduce not in ("sum", "mean"):
                raise ValueError(f"knots: ta_reduce must be 'sum' or 'mean', got {self.ta_reduce!r}")
            if self.svd_tol < 0:
                raise ValueError(f"knots: svd_tol must be >= 0, got {self.svd_tol}")

    # ---------------------------------------------------------------- prepare

    def prepare(self, group: TensorGroup, params: Params) -> KnotsState:
        """SVD alignment; the factored route whenever every update is LoRA (no flag)."""
        ups, shape = group.updates, group.shape
        row = params.concat == "row"
        if len(shape) < 2:
            return KnotsState(group.name, torch.stack([densify(u) for u in ups]), None, shape)
        if all(isinstance(u, LowRank) for u in ups):
            Bs, As = [u.B for u in ups], [u.A for u in ups]
            if row:  # row concatenation = column concatenation of the transposes
                Bs, As = [A.T for A in As], [B.T for B in Bs]
            svd = factored_concat_svd(Bs, As, [u.scale for u in ups], params.svd_tol, scaled=True, lazy=True)
            low_rank = True
        else:
            mats = [densify(u).reshape(shape[0], -1) for u in ups]  # conv etc.: (O, rest)
            if row:
                mats = [m.T for m in mats]
            svd = dense_concat_svd(mats, params.svd_tol, scaled=True)
            low_rank = False
        return KnotsState(group.name, svd.Vh, svd.U, shape, transposed=row, low_rank=low_rank)  # Vh = S V_i^T

    # ---------------------------------------------------------------- global reductions

    def reductions(self, params: Params) -> list[ReductionSpec]:
        specs: list[ReductionSpec] = []
        if params.base_method == "ties" and params.trim_scope == "global":
            specs.append((THRESHOLDS, lambda stats: TopKThreshold(lambda s: s.X, params.density)))
        if params.base_method != "ta" and params.sign_fill == "global":
            # model-wide majority = sign of the sum of every entry's elected (unfilled) sign
            specs.append(
                (MAJORITY_SIGN, lambda stats: SignSum(lambda s: elected_sign_sum(*self._sparsified(s, params, stats))))
            )
        return specs

    def sweep_state(self, state: KnotsState) -> KnotsState:
        """A sweep reads every state at each grid point: keep ``X`` materialized."""
        return dataclasses.replace(state, coefficients=state.X)

    # ---------------------------------------------------------------- merge

    def _sparsified(self, state: KnotsState, params: Params, stats: dict):
        """Task coefficients, trim thresholds and tie quotas (DARE: dropped, no trim)."""
        X = state.X
        if params.base_method == "dare_ties":
            return dare_drop(X, params.p, dare_generator(params.seed, state.name)), None, None
        if params.trim_scope == "global":
            return X, stats[THRESHOLDS], stats[THRESHOLDS].tie_quota(state.name)
        trims = [topk_trim(x, params.density) for x in X]
        return X, [t for t, _ in trims], [q for _, q in trims]

    def merge(self, state: KnotsState, params: Params, stats: dict) -> Update:
        if params.base_method == "ta":
            merged = state.X.sum(0) if params.ta_reduce == "sum" else state.X.mean(0)
            merged.mul_(params.lam)
        else:
            x, thresholds, quota = self._sparsified(state, params, stats)
            fill = (lambda: stats[MAJORITY_SIGN]) if params.sign_fill == "global" else None
            merged = ties_combine(x, thresholds, fill, tie_quota=quota).mul_(params.lam)
        if state.U is None:
            return merged
        if state.transposed:  # dW_m^T = U merged
            B, A = merged.T.contiguous(), state.U.T.contiguous()
        else:
            B, A = state.U, merged
        if state.low_rank:
            return LowRank(B=B, A=A, scale=1.0)
        return (B @ A).reshape(state.shape)
