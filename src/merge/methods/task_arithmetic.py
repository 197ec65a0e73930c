"""Task Arithmetic: ``dW_m = lam * sum_i dW_i`` (or ``lam * mean_i dW_i``).

With per-task coefficients (``weights`` and/or a ``coefficients`` table, src/merge/coefficients.py):
``dW_m = lam * sum_i w_i c_i(name) dW_i`` (``mean``: ``lam / n * ...``) — AdaMerging's merged
model when ``c`` is a learned table and ``lam = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..coefficients import Coefs, check_coefficient_params, task_coefficients
from ..registry import MergeMethod, TensorGroup, register
from ..updates import Update
from ..streaming import linear_combination


@register
class TaskArithmetic(MergeMethod):
    """Scaled sum (or mean) of the task vectors, one coefficient shared by all tasks."""

    name = "task_arithmetic"
    accepts_low_rank = True  # LoRA inputs stay factored: the merge is a concatenation
    streams_linear = True  # dense safetensors inputs are streamed (src/merge/streaming.py)

    @dataclass
    class Params:
        """Hyperparameters of Task Arithmetic.

        lam: scaling coefficient shared by all tasks. Default 1.0 (plain sum). The TA paper
            tunes it on validation in [0, 1]; KnOTS authors: 0.1 with ``sum`` (ViT-B/32
            LoRA), 0.3 with ``mean`` (ViT-L/14).
        reduce: ``"sum"`` (the TA paper) or ``"mean"`` (the KnOTS authors' ViT-L/14 runs).
            Default ``"sum"``. ``mean`` with ``lam=1`` is plain averaging.
        weights: per-task multipliers ``w_i`` in merge order (one per task model). Default
            None (all 1). Task ``i``'s coefficient becomes ``lam * w_i`` (``mean``: ``lam / n * w_i``).
        coefficients: path of a coefficient table (JSON, src/merge/coefficients.py): per-task
            multipliers per parameter tensor, ``c_i(name)`` (unlisted tensors: its ``default``),
            e.g. a learned AdaMerging table. Default None. Combined with ``weights``:
            ``dW = lam * sum_i w_i c_i(name) dW_i``.
        """

        lam: float = 1.0
        reduce: str = "sum"
        weights: Optional[list[float]] = None
        coefficients: Optional[str] = None

        def __post_init__(self):
            if self.reduce not in ("sum", "mean"):
                raise ValueError(f"task_arithmetic: reduce must be 'sum' or 'mean', got {self.reduce!r}")
            check_coefficient_params("task_arithmetic", self)

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> Update:
        return self.combine(state, params, task_coefficients(params, state.name, state.num_tasks, self.name))

    # ----- per-task coefficients (AdaMerging: src/evaluate/adamerging.py) ---------------
    def coefficient_state(self, state: TensorGroup, params: Params, stats: dict) -> Optional[TensorGroup]:
        """What ``combine`` needs of one tensor, whatever the coefficients: the task updates."""
        return state

    def combine(self, state: TensorGroup, params: Params, coefs: Optional[Coefs]) -> Update:
        """``lam * sum_i coefs[i] * dW_i`` (``coefs=None``: all 1); ``coefs`` may be tensors (autograd)."""
        n = state.num_tasks
        coef = params.lam if params.reduce == "sum" else params.lam / n
        if coefs is None:
            return linear_combination(state, [coef] * n, self.compute_dtype)
        return linear_combination(state, [coef * coefs[i] for i in range(n)], self.compute_dtype)
