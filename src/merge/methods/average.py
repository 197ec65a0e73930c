"""Plain averaging: ``dW_m = mean_i dW_i``.

Without a base model the updates are the task weights themselves, so this is weight
averaging ``W = mean_i W_i``; with a base it gives the same weights (``W0 + mean dW``).
"""
from __future__ import annotations

from dataclasses import dataclass


from ..registry import MergeMethod, TensorGroup, register
from ..updates import Update, weighted_sum


@register
class Average(MergeMethod):
    """Mean of the task updates (weight averaging; needs no base model)."""

    name = "average"
    needs_base = False
    accepts_low_rank = True  # LoRA inputs stay factored (the average of updates is a concatenation)

    @dataclass
    class Params:
        """Average has no hyperparameters (every paper uses the uniform mean)."""

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> Update:
        n = state.num_tasks
        return weighted_sum(state.updates, [1.0 / n] * n)
