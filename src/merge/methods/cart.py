"""CART: weight averaging plus the low-rank part of the centered task vectors.

``W = W_avg + lam * sum_i LR_k(W_i - W_avg)`` (Choi et al., "Revisiting Weight Averaging
for Model Merging"). Since ``W_i - W_avg = dW_i - mean_j dW_j``, the merged update is
``mean_i dW_i + lam * sum_i LR_k(dW_i - mean_j dW_j)``. ``prepare`` centers and takes the
full SVD of every centered update once, ``merge`` only truncates, so a ``lam`` / rank
sweep never repeats an SVD. LoRA inputs stay factored: all centered updates live in
``span(Q_B) x span(Q_A)`` and only ``nr x nr`` cores are decomposed.

Per-task coefficients (``weights`` and/or a ``coefficients`` table, src/merge/coefficients.py)
weight each task's low-rank centered vector: ``W = W_avg + lam * sum_i w_i c_i(name)
LR_k(W_i - W_avg)`` (CART++, Eq. 6 of the CART paper, with ``lam = 1`` and a learned table).
Tensors that get the plain average (not 2-D, not matched by ``low_rank_params``, ``k = 0``)
take no coefficient.

Two options for the CART paper's rank analyses (Fig. 1, 2, 5; ``src/analysis/rank_sweeps.py``),
both off by default (the defaults are CART):

* ``center=False`` — plain (uncentred) task vectors: ``W = W0 + lam * sum_i LR_k(dW_i)``, task
  arithmetic with each ``dW_i`` replaced by its rank-``k`` approximation. At full rank this is
  task arithmetic (``lam * sum_i dW_i``), at ``k = 0`` the base model. Tensors without a
  low-rank step (not 2-D, not matched by ``low_rank_params``) get their full task vectors,
  ``lam * sum_i dW_i`` (task arithmetic, no coefficient), the counterpart of CART's ``W_avg``.
* ``order="bottom"`` — keep the ``k`` *smallest* of the ``min(O, I)`` singular directions
  instead of the largest ("reverse order", CART Fig. 5). The directions beyond a matrix's rank
  have singular value 0: for LoRA updates (rank ``<= n r``) the bottom ``k`` contribute nothing
  until ``k > min(O, I) - rank``. ``top`` rank ``k`` plus ``bottom`` rank ``min(O, I) - k`` is
  the full-rank merge.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..coefficients import Coefs, check_coefficient_params, task_coefficients
from ..linalg import centered_lowrank_cores
from ..registry import MergeMethod, TensorGroup, register
from ..updates import LowRank, Update, densify


@dataclass
class CartState:
    """Mean update plus the SVD ``U diag(S) Vh`` of each centered update (batched; of each
    update itself when ``centered`` is ``False``).

    Factored (LoRA) route: ``mean``, ``U``, ``Vh`` are cores in the frame
    ``Q_B (.) Q_A^T``; dense route: ``QB is None`` and they are full-size. ``U is None``
    for tensors that only ever get the average (not 2-D).
    """

    name: str
    shape: torch.Size
    mean: torch.Tensor
    U: Optional[torch.Tensor] = None
    S: Optional[torch.Tensor] = None
    Vh: Optional[torch.Tensor] = None
    QB: Optional[torch.Tensor] = None
    QA: Optional[torch.Tensor] = None
    #: ``U S Vh`` decompose the centred updates (``True``) or the updates themselves (``center=False``)
    centered: bool = True
    num_tasks: int = 1


@register
class Cart(MergeMethod):
    """Average + ``lam`` x rank-``k`` centered task vectors (2-D weights only)."""

    name = "cart"
    accepts_low_rank = True
    compute_dtype = torch.float64
    prepare_keys = ("center",)
    reduction_keys = ()

    @dataclass
    class Params:
        """Hyperparameters of CART (defaults: authors' released ViT-B/32 8-task config).

        lam: coefficient of the summed low-rank centered vectors ("prior"). Default 2.0.
            Authors: 14 tasks 1.5, 20 tasks 1.9.
        rank_ratio: rho; ``k = max(1, int(rho * min(O, I)))`` for ``rho > 0``, ``k = 0`` for
            ``rho == 0`` (plain averaging). Default 0.12. Authors: 14 tasks 0.16, 20 tasks
            0.32; the paper finds about 0.08 works across settings.
        rank: fixed ``k`` overriding ``rank_ratio`` when set. Default None.
        low_rank_params: regex (``re.search`` on the parameter name) selecting the 2-D
            tensors that get the low-rank step. Default None = every 2-D tensor. The authors
            use the attention and MLP matrices only (``attn|mlp``, open_clip names), so
            embeddings / projections get the average; ``configs/merge/cart.yaml`` sets that.
            Every other tensor (non-2-D, or not matched) gets exactly the average.
        weights: per-task multipliers ``w_i`` of the low-rank centered vectors, in merge order.
            Default None (all 1).
        coefficients: path of a coefficient table (src/merge/coefficients.py), ``c_i(name)``
            per tensor, e.g. a learned CART++ (AdaMerging on CART) table. Default None.
            ``W = W_avg + lam * sum_i w_i c_i(name) LR_k(W_i - W_avg)``.
        center: ``True`` (default, CART): decompose the centred vectors ``W_i - W_avg``.
            ``False``: decompose the plain task vectors ``dW_i``, ``W = W0 + lam * sum_i w_i
            c_i(name) LR_k(dW_i)`` (task arithmetic with rank-``k`` task vectors, CART Fig. 1);
            tensors without a low-rank step then get ``lam * sum_i dW_i``. An analysis option.
        order: ``"top"`` (default, CART): keep the ``k`` largest singular directions.
            ``"bottom"``: keep the ``k`` smallest of the ``min(O, I)`` directions (CART Fig. 5's
            reverse order; directions beyond the matrix's rank have singular value 0). An
            analysis option.
        """

        lam: float = 2.0
        rank_ratio: float = 0.12
        rank: Optional[int] = None
        low_rank_params: Optional[str] = None
        weights: Optional[list[float]] = None
        coefficients: Optional[str] = None
        center: bool = True
        order: str = "top"

        def __post_init__(self):
            if not 0.0 <= self.rank_ratio <= 1.0:
                raise ValueError(f"cart: rank_ratio must be in [0, 1], got {self.rank_ratio}")
            if self.rank is not None and self.rank < 0:
                raise ValueError(f"cart: rank must be >= 0, got {self.rank}")
            if self.low_rank_params is not None:
                try:
                    re.compile(self.low_rank_params)
                except re.error as e:
                    raise ValueError(f"cart: low_rank_params is not a valid regex: {e}") from None
            if not isinstance(self.center, bool):
                raise ValueError(f"cart: center must be true or false, got {self.center!r}")
            if self.order not in ("top", "bottom"):
                raise ValueError(f"cart: order must be 'top' or 'bottom', got {self.order!r}")
            check_coefficient_params("cart", self)

    def prepare(self, group: TensorGroup, params: Params) -> CartState:
        """Centering + full SVD of each centered update (factored for LoRA inputs); with
        ``center=False`` the SVD of each update itself (``mean`` is still the mean update).

        Every 2-D tensor is decomposed, matched by ``low_rank_params`` or not: prepare reads
        only ``center`` (``prepare_keys``), so changing any other field never re-runs prepare.
        """
        ups, shape, n = group.updates, group.shape, len(group.updates)
        if len(shape) != 2:
            return CartState(group.name, shape, torch.stack([densify(u) for u in ups]).mean(0),
                             centered=params.center, num_tasks=n)
        if all(isinstance(u, LowRank) for u in ups):
            c = centered_lowrank_cores([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups])
            cores = c.C if params.center else c.C + c.mean  # the updates' own cores: D_i = C_i + mean
            U, S, Vh = torch.linalg.svd(cores, full_matrices=False)
            return CartState(group.name, shape, c.mean, U, S, Vh, c.QB, c.QA, centered=params.center, num_tasks=n)
        x = torch.stack([densify(u) for u in ups])
        mean = x.mean(0)
        U, S, Vh = torch.linalg.svd(x.sub_(mean) if params.center else x, full_matrices=False)
        return CartState(group.name, shape, mean, U, S, Vh, centered=params.center, num_tasks=n)

    @staticmethod
    def rank_of(shape: torch.Size, params: Params) -> int:
        """``k`` for a tensor of ``shape`` (``min(O, I)`` of the full tensor, not the core)."""
        if params.rank is not None:
            return params.rank
        if params.rank_ratio == 0:
            return 0
        return max(1, int(params.rank_ratio * min(shape[0], shape[1])))

    def low_rank_step(self, state: CartState, params: Params) -> bool:
        """Whether this tensor gets the low-rank step (2-D and matched by ``low_rank_params``)."""
        return state.U is not None and (
            params.low_rank_params is None or re.search(params.low_rank_params, state.name) is not None
        )

    def directions(self, state: CartState, params: Params) -> tuple[int, int]:
        """``(start, stop)``: the singular directions of ``state``'s SVDs the merge keeps (indices
        into ``S``, descending). ``top``: the first ``k``. ``bottom``: the last ``k`` of the tensor's
        ``min(O, I)``; the factored SVD holds only the leading ``len(S)`` of them (the others are
        exactly 0), so only those that fall inside it are kept."""
        if not self.low_rank_step(state, params):
            return 0, 0
        m = min(state.shape[0], state.shape[1])
        k, c = min(self.rank_of(state.shape, params), m), state.S.shape[-1]
        if params.order == "top":
            return 0, min(k, c)
        return min(m - k, c), c

    def truncation(self, state: CartState, params: Params) -> int:
        """Number of singular directions kept for this tensor at ``params`` (0: no low-rank term;
        the tensor gets the plain average, or with ``center=False`` the base or, without a
        low-rank step, its full task vectors)."""
        start, stop = self.directions(state, params)
        return stop - start

    def merge(self, state: CartState, params: Params, stats: dict) -> Update:
        coefs = None
        if self.truncation(state, params) > 0:  # the average takes no coefficient
            coefs = task_coefficients(params, state.name, state.U.shape[0], self.name)
        return self.combine(state, params, coefs)

    # ----- per-task coefficients (CART++: src/evaluate/adamerging.py) -------------------
    def coefficient_state(self, state: CartState, params: Params, stats: dict) -> Optional[CartState]:
        """The prepared state when coefficients act on this tensor (``k > 0``), else ``None``."""
        return state if self.truncation(state, params) > 0 else None

    def combine(self, state: CartState, params: Params, coefs: Optional[Coefs]) -> Update:
        """``mean + lam * sum_i coefs[i] LR_k(centered_i)`` (``coefs=None``: all 1, the plain CART
        merge); ``coefs`` may be a tensor (autograd). Factored for LoRA inputs. With
        ``center=False``: ``lam * sum_i coefs[i] LR_k(dW_i)``; ``order`` picks the directions."""
        start, stop = self.directions(state, params)
        k = stop - start
        if state.centered:
            out = state.mean
        elif self.low_rank_step(state, params):
            out = torch.zeros_like(state.mean)
        else:  # uncentred, no low-rank step: the full task vectors, lam * sum_i dW_i
            out = state.mean * (params.lam * state.num_tasks)
        if k == 0 and state.QB is None:
            return out.clone() if out is state.mean else out  # never hand out the cached state (a sweep reuses it)
        if k > 0:
            n, p = state.U.shape[0], state.U.shape[1]
            Uk = state.U[:, :, start:stop] * state.S[:, None, start:stop]
            if coefs is not None:
                c = coefs if isinstance(coefs, torch.Tensor) else torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in coefs])
                Uk = Uk * c.to(device=Uk.device, dtype=Uk.dtype).view(n, 1, 1)
            Uk = Uk.transpose(0, 1).reshape(p, n * k)
            out = torch.addmm(out, Uk, state.Vh[:, start:stop, :].reshape(n * k, -1), alpha=params.lam)
        if state.QB is None:
            return out
        return LowRank(B=state.QB, A=out @ state.QA.T, scale=1.0)
