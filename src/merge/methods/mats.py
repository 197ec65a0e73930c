"""MaTS: merge by matching the task models in their task parameter subspaces.

Tam et al., "Merging by Matching Models in Task Parameter Subspaces", TMLR 2024
(``r-three/mats``). Each task ``i`` gives a positive semidefinite operator ``F_i`` on the
parameters of one layer; the merge solves the linear system::

    sum_i F_i(theta) = sum_i F_i(theta_i)

by conjugate gradient (CG), for a fixed number of ``iterations``, from an initial merge (Task
Arithmetic at its selected ``lam``). Subspaces (``subspace``), for ``W: O x I``:

* ``"kfac"`` (the paper's method): the K-FAC block of the Fisher, ``F_i(X) = G_i X A_i``
  with ``A_i = E[x x^T]`` (``kfac_in``, ``I x I``) and ``G_i = E[g g^T]`` (``kfac_out``, ``O x O``).
* ``"gram"``: the RegMean objective, ``F_i(X) = X G~_i`` with the input Gram matrix
  (``gram``); converges to RegMean.
* ``"fisher"``: the diagonal Fisher, ``F_i(X) = F_i * X``; converges to Fisher merging
  without floor.

The system is linear, so it is solved for the update: with ``X = theta - W0``,
``sum_i F_i(X) = sum_i F_i(dW_i)``, started from ``lam_init * sum_i dW_i`` (exactly the MaTS
iteration from the Task Arithmetic model, in smaller numbers). Stopping early is the point (few
iterations stay near the initialization), so there is no tolerance: exactly ``iterations``
steps run on the group's device with no host round trip (a step whose curvature or residual
is 0 is a no-op). The operator and right-hand side are divided by the statistics' mean diagonal
first: the solution is unchanged, and the iteration's sums of squares stay far from float32
underflow (K-FAC output factors are often ~1e-12). The authors' code runs each matrix-vector
product through scipy on the host (4.3 s per mT5-xl layer in the compositional paper's Table 4).

Tensors without the subspace's statistics (biases, LayerNorm) are averaged, as in the MaTS
code (its non-merged weights are the plain average of the task models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..registry import MergeMethod, TensorGroup, register
from ..updates import densify
from .fisher import check_side_shape, weighted_mean
from .regmean import gram_sums, shrink_offdiag

SUBSPACES = {"kfac": ("kfac_in", "kfac_out"), "gram": ("gram",), "fisher": ("fisher",)}
INITS = ("task_arithmetic", "average", "base")


@dataclass
class MatsState:
    """One tensor ready for CG: the operator, the right-hand side and the initial points."""

    name: str
    base: Optional[torch.Tensor]
    mean: torch.Tensor  # average update
    total: Optional[torch.Tensor] = None  # sum of the updates (Task Arithmetic's direction)
    rhs: Optional[torch.Tensor] = None  # sum_i F_i(dW_i); None: averaged
    op: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # X -> sum_i F_i(X)
    #: CG runs kept by a sweep, per starting point: a larger ``iterations`` resumes the run
    runs: dict = field(default_factory=dict)


def unit(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (a 0-dim tensor), or 1 where it is 0: statistics are divided by their mean
    diagonal before CG, which leaves the solution unchanged (``c F(x) = c b``) and keeps the
    iteration's scalars far from float32 underflow (K-FAC output factors can be ~1e-12)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class ConjugateGradient:
    """CG on ``op(x) = b`` (``op`` symmetric PSD) from ``x0``, entirely on the tensors' device:
    scalars stay 0-dim tensors (no ``.item()``), and a step whose curvature ``p^T op(p)`` or
    residual is 0 (converged, or a singular direction) changes nothing. Resumable: ``run_to(N)``
    after ``run_to(k)``, k <= N, does exactly the steps k+1..N, so a sweep over the number of
    iterations pays for the largest one only and gets the same numbers as separate runs."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor):
        self.op, self.steps = op, 0
        self.x = x0.clone()
        self.r = b - op(self.x)
        self.p = self.r.clone()
        self.rr = torch.sum(self.r * self.r)
        self.zero = torch.zeros((), dtype=b.dtype, device=b.device)

    def run_to(self, iterations: int) -> torch.Tensor:
        while self.steps < iterations:
            Ap = self.op(self.p)
            pAp = torch.sum(self.p * Ap)
            alpha = torch.where(pAp > 0, self.rr / pAp, self.zero)
            self.x.add_(self.p * alpha)
            self.r.sub_(Ap.mul_(alpha))
            rr_new = torch.sum(self.r * self.r)
            beta = torch.where(self.rr > 0, rr_new / self.rr, self.zero)
            self.p.mul_(beta).add_(self.r)
            self.rr = rr_new
            self.steps += 1
        return self.x


def conjugate_gradient(op: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       iterations: int) -> torch.Tensor:
    """``iterations`` CG steps on ``op(x) = b`` from ``x0`` (see :class:`ConjugateGradient`)."""
    return ConjugateGradient(op, b, x0).run_to(iterations)


@register
class Mats(MergeMethod):
    """CG on ``sum_i F_i(W) = sum_i F_i(W_i)`` (K-FAC, RegMean or diagonal-Fisher subspace), from TA."""

    name = "mats"
    needs_base = True  # starts from Task Arithmetic (task updates); LoRA-only merges may omit it
    requires = ("kfac_in", "kfac_out", "gram", "fisher")  # those of the chosen subspace are needed
    prepare_keys = ("subspace", "a")

    @dataclass
    class Params:
        """Hyperparameters of MaTS (needs statistics of the subspace: ``--statistics TAG``).

        subspace: ``"kfac"`` (default; the paper's full-model method, ``kfac_in`` + ``kfac_out``
            statistics), ``"gram"`` (RegMean objective, ``gram``) or ``"fisher"`` (diagonal
            Fisher, ``fisher``).
        iterations: CG steps ``N``. Default 100: the MaTS README's full-model commands
            (``--num_iterations 100``; its (IA)^3 K-FAC command uses 10); the compositional paper
            selects ``N`` in 10..100 on validation (docs/protocols.md).
        lam_init: ``lam`` of the Task Arithmetic start ``W0 + lam_init * sum_i dW_i`` (``sum``
            reduce), meant to be TA's validation-selected ``lam``. Default 0.3: the TA model the
            MaTS README initializes full-model merges from (``task_vectors/model_lambda_0.3``).
        init: ``"task_arithmetic"`` (default, the paper), ``"average"`` (mean of the task
            models) or ``"base"`` (the pretrained weights); the MaTS code offers all three.
        a: scale of the off-diagonal entries of every matrix statistic (``gram``, ``kfac_in``,
            ``kfac_out``): ``a M + (1 - a) diag(M)``, as the MaTS code does with its
            ``model_lambda``. Default 1.0 (no scaling; the README's CG commands).
        """

        subspace: str = "kfac"
        iterations: int = 100
        lam_init: float = 0.3
        init: str = "task_arithmetic"
        a: float = 1.0

        def __post_init__(self):
            if self.subspace not in SUBSPACES:
                raise ValueError(f"mats: subspace must be one of {sorted(SUBSPACES)}, got {self.subspace!r}")
            if isinstance(self.iterations, bool) or int(self.iterations) != self.iterations or self.iterations < 0:
                raise ValueError(f"mats: iterations must be an integer >= 0, got {self.iterations!r}")
            self.iterations = int(self.iterations)
            if self.init not in INITS:
                raise ValueError(f"mats: init must be one of {INITS}, got {self.init!r}")
            if not 0.0 <= self.a <= 1.0:
                raise ValueError(f"mats: a must be in [0, 1], got {self.a}")

    def required_statistics(self, params: Params) -> tuple[str, ...]:
        return SUBSPACES[params.subspace]

    def prepare(self, group: TensorGroup, params: Params) -> MatsState:
        n = group.num_tasks
        kinds = SUBSPACES[params.subspace]
        covered = [k for k in kinds if group.covered(k)]
        mean = weighted_mean(group.updates, [1.0] * n)
        state = MatsState(group.name, group.base, mean)
        if not covered:
            return state
        if len(covered) != len(kinds):
            missing = sorted(set(kinds) - set(covered))
            raise ValueError(f"mats: '{group.name}' has {', '.join(covered)} statistics but no {', '.join(missing)}")
        state.total = mean * n
        if params.subspace == "fisher":
            check_side_shape(group, "fisher", tuple(group.shape), self.name)
            F_sum = None
            rhs = None
            for u, F in zip(group.updates, group.side["fisher"]):
                term = F * densify(u)
                rhs = term if rhs is None else rhs.add_(term)
                F_sum = F.clone() if F_sum is None else F_sum.add_(F)
            c = unit(F_sum.mean())
            F_sum.div_(c)
            state.rhs, state.op = rhs.div_(c), (lambda X: F_sum * X)
            return state
        if len(group.shape) != 2:
            raise ValueError(f"mats: '{group.name}' has {kinds[0]} statistics but shape {tuple(group.shape)}; "
                             "matrix statistics belong to 2-D linear weights (out, in)")
        n_out, n_in = group.shape
        if params.subspace == "gram":
            G_sum, d_sum, BG, BD = gram_sums(group, self.name)
            a = params.a
            c = unit(d_sum.mean())
            S = G_sum.mul_(a / c)
            S.diagonal().copy_(d_sum).div_(c)
            state.rhs = (BG * a + BD * (1.0 - a) if a != 1.0 else BG).T.div_(c).contiguous()  # sum_i dW_i G~_i
            state.op = lambda X: X @ S
            return state
        check_side_shape(group, "kfac_in", (n_in, n_in), self.name)
        check_side_shape(group, "kfac_out", (n_out, n_out), self.name)
        # the factors as they are (a = 1: no copy of the O x O matrices), the scale on the products
        A = [shrink_offdiag(x, params.a) if params.a != 1.0 else x for x in group.side["kfac_in"]]
        G = [shrink_offdiag(x, params.a) if params.a != 1.0 else x for x in group.side["kfac_out"]]
        c = unit(sum(x.diagonal().mean() for x in A) / n) * unit(sum(x.diagonal().mean() for x in G) / n)

        def op(X: torch.Tensor) -> torch.Tensor:
            out = None
            for Gi, Ai in zip(G, A):
                term = Gi @ (X @ Ai)
                out = term if out is None else out.add_(term)
            return out.div_(c)

        state.op = op
        rhs = None
        for u, Gi, Ai in zip(group.updates, G, A):
            term = Gi @ (densify(u) @ Ai)
            rhs = term if rhs is None else rhs.add_(term)
        state.rhs = rhs.div_(c)
        return state

    def merge(self, state: MatsState, params: Params, stats: dict) -> torch.Tensor:
        if state.rhs is None:
            return state.mean
        key = (params.init, params.lam_init if params.init == "task_arithmetic" else None)
        run = state.runs.get(key)
        if run is None or run.steps > params.iterations:
            if params.init == "task_arithmetic":
                x0 = state.total * params.lam_init
            elif params.init == "average":
                x0 = state.mean
            else:
                x0 = torch.zeros_like(state.mean)
            run = state.runs[key] = ConjugateGradient(state.op, state.rhs, x0)
        return run.run_to(params.iterations).clone()
