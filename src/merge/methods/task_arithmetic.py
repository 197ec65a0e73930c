"""Task Arithmetic: ``dW_m = lam * sum_i dW_i`` (or ``lam * mean_i dW_i``)."""
from __future__ import annotations

from dataclasses import dataclass


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
        """

        lam: float = 1.0
        reduce: str = "sum"

        def __post_init__(self):
            if self.reduce not in ("sum", "mean"):
                raise ValueError(f"task_arithmetic: reduce must be 'sum' or 'mean', got {self.reduce!r}")

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> Update:
        n = state.num_tasks
        coef = params.lam if params.reduce == "sum" else params.lam / n
        return linear_combination(state, [coef] * n, self.compute_dtype)
