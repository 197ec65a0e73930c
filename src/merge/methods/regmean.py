"""RegMean: per linear layer, the weights that best reproduce every task model's outputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(``bloomberg/dataless-model-merging``). For a linear layer ``y = W x`` (``W: O x I``) with input
Gram matrix ``G_i = X_i^T X_i / L_i`` on task ``i``, the merged ``W`` minimizes
``sum_i ||X_i W^T - X_i W_i^T||^2``, i.e. solves the normal equations::

    (sum_i G~_i) W^T = sum_i G~_i W_i^T,       G~_i = a G_i + (1 - a) diag(G_i)

(``a`` < 1 shrinks the off-diagonal part, a ridge-like regularizer). The system is linear and
``sum_i G~_i W0^T`` cancels on both sides, so it is solved for the update: the engine adds
``W0`` back, and without a base model the "updates" are the task weights themselves.

Solved by Cholesky (``cholesky_solve``), never an explicit inverse; when the factorization fails
(``a = 1`` with fewer tokens than input features leaves the sum singular) a small multiple of
the mean diagonal is added and the factorization retried, with a warning. Input features no
task ever activates (all-zero row and column in every ``G_i``) leave their column of ``W``
undetermined; it gets the average of the tasks' columns. Tensors without Gram statistics (biases,
LayerNorm, embeddings) are averaged.

The sums that do not depend on ``a`` (``sum G_i``, ``sum G_i dW_i^T``, their diagonal parts and
the average) are formed once in ``prepare``: a sweep over ``a`` then costs one solve per point.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..registry import MergeMethod, TensorGroup, register
from ..updates import densify
from .fisher import check_side_shape, weighted_mean

SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Jitter added to a matrix whose Cholesky factorization fails, relative to its mean diagonal.
JITTERS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def shrink_offdiag(G: torch.Tensor, a: float) -> torch.Tensor:
    """``a G + (1 - a) diag(G)``: the off-diagonal entries scaled by ``a`` (a new tensor)."""
    if a == 1.0:
        return G.clone()
    out = G * a
    out.diagonal().copy_(G.diagonal())
    return out


def spd_solve(S: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``S^-1 B`` for a symmetric positive (semi)definite ``S`` by Cholesky in ``dtype``; a jitter
    ``eps * mean(diag S)`` is added when the factorization fails (warned, naming ``what``)."""
    S = S.to(dtype)
    L, info = torch.linalg.cholesky_ex(S)
    if bool(info != 0):
        scale = S.diagonal().mean()
        eye = torch.eye(S.shape[0], dtype=dtype, device=S.device)
        for eps in JITTERS:
            L, info = torch.linalg.cholesky_ex(S + eye * (eps * scale))
            if not bool(info != 0):
                warnings.warn(f"{what}: the Gram system is singular; solved with a jitter of {eps:g} x mean diagonal",
                              stacklevel=3)
                break
        else:
            raise ValueError(f"{what}: the Gram system cannot be factorized (statistics not positive semidefinite?)")
    return torch.cholesky_solve(B.to(dtype), L)


def gram_sums(group: TensorGroup, method: str):
    """For a 2-D ``group`` with ``gram`` statistics: ``(sum G_i, sum diag G_i, sum G_i dW_i^T,
    sum diag(G_i) dW_i^T)``, the latter two ``(I, O)``; ``None`` for a tensor without them."""
    if not group.covered("gram"):
        return None
    if len(group.shape) != 2:
        raise ValueError(f"{method}: '{group.name}' has gram statistics but shape {tuple(group.shape)}; "
                         "Gram matrices belong to 2-D linear weights (out, in)")
    n_in = group.shape[1]
    check_side_shape(group, "gram", (n_in, n_in), method)
    G_sum = d_sum = BG = BD = None
    for u, G in zip(group.updates, group.side["gram"]):
        dWt = densify(u).T
        d = G.diagonal()
        bg, bd = G @ dWt, d[:, None] * dWt
        if G_sum is None:
            G_sum, d_sum, BG, BD = G.clone(), d.clone(), bg, bd
        else:
            G_sum.add_(G), d_sum.add_(d), BG.add_(bg), BD.add_(bd)
    return G_sum, d_sum, BG, BD


def solve_with_dead_features(S: torch.Tensor, B: torch.Tensor, diag: torch.Tensor, fallback: torch.Tensor,
                             dtype: torch.dtype, what: str) -> torch.Tensor:
    """The update ``X`` (O, I) with ``S X^T = B``, restricted to the input features whose
    diagonal ``diag`` is positive; the other columns are taken from ``fallback`` (O, I)."""
    if bool((diag < 0).any()):
        raise ValueError(f"{what}: Gram statistics have a negative diagonal entry (not a Gram matrix)")
    alive = diag > 0
    if bool(alive.all()):
        return spd_solve(S, B, dtype, what).T.to(fallback.dtype)
    idx = alive.nonzero().squeeze(1)
    out = fallback.clone()
    if idx.numel():
        X = spd_solve(S.index_select(0, idx).index_select(1, idx), B.index_select(0, idx), dtype, what)
        out[:, idx] = X.T.to(out.dtype)
    return out


@dataclass
class RegMeanState:
    """What ``merge`` needs of one tensor, independent of ``a``."""

    name: str
    base: Optional[torch.Tensor]
    mean: torch.Tensor  # average update (O, I): tensors without statistics, dead input features
    sums: Optional[tuple] = None  # gram_sums(...) for a linear weight with statistics


@register
class RegMean(MergeMethod):
    """Per linear layer ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` (input Gram matrices); others averaged."""

    name = "regmean"
    needs_base = False  # the normal equations are affine-invariant: W0 cancels
    requires = ("gram",)

    @dataclass
    class Params:
        """Hyperparameters of RegMean (needs ``gram`` statistics: ``--statistics TAG``).

        a: scale of the Gram matrices' off-diagonal entries, ``G~ = a G + (1 - a) diag(G)``
            (``a = 1``: plain regression; ``a = 0``: per input feature a weighted average by
            ``diag G_i``). Default 0.9: the value the MaTS authors time RegMean with
            (``r-three/mats`` ``src/merging/regmean.py``; their README sweeps 0..1). The
            RegMean paper tunes it; the compositional paper sweeps 0, 0.1, ..., 1.0
            (docs/protocols.md); FusionBench's CLIP config uses 0.6; the RegMean authors' code
            defaults to no scaling (``regmean_reduce_nondiag: -1``, i.e. ``a = 1``).
        solve_dtype: precision of the Cholesky solve, ``"float64"`` (default) or ``"float32"``.
            Gram matrices of transformer activations are badly conditioned (outlier features);
            float64 costs one factorization of an ``I x I`` matrix per layer. The sums are
            formed in float32 either way. Published code solves in float32 with
            ``torch.inverse``.
        """

        a: float = 0.9
        solve_dtype: str = "float64"

        def __post_init__(self):
            if not 0.0 <= self.a <= 1.0:
                raise ValueError(f"regmean: a must be in [0, 1], got {self.a}")
            if self.solve_dtype not in SOLVE_DTYPES:
                raise ValueError(f"regmean: solve_dtype must be one of {sorted(SOLVE_DTYPES)}, "
                                 f"got {self.solve_dtype!r}")

    def prepare(self, group: TensorGroup, params: Params) -> RegMeanState:
        n = group.num_tasks
        mean = weighted_mean(group.updates, [1.0] * n)
        return RegMeanState(group.name, group.base, mean, gram_sums(group, self.name))

    def merge(self, state: RegMeanState, params: Params, stats: dict) -> torch.Tensor:
        if state.sums is None:
            return state.mean
        G_sum, d_sum, BG, BD = state.sums
        a = params.a
        S = G_sum * a
        S.diagonal().copy_(d_sum)  # diag(G~_i) = diag(G_i)
        B = BG * a + BD * (1.0 - a) if a != 1.0 else BG
        return solve_with_dead_features(S, B, d_sum, state.mean, SOLVE_DTYPES[params.solve_dtype],
                                        f"regmean: '{state.name}'")
