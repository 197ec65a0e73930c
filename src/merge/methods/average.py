"""Plain averaging: ``dW_m = mean_i dW_i``.

Without a base model the updates are the task weights themselves, so this is weight
averaging ``W = mean_i W_i``; with a base it gives the same weights (``W0 + mean dW``).

Linear: on safetensors inputs the merge is streamed chunk by chunk (``src/merge/streaming.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import MergeMethod, TensorGroup, register
from ..streaming import linear_combination
from ..updates import Update


@register
class Average(MergeMethod):
    """Mean of the task updates (weight averaging; needs no base model)."""

    name = "average"
    needs_base = False
    accepts_low_rank = True  # LoRA inputs stay factored (the average of updates is a concatenation)
    streams_linear = True  # dense safetensors inputs come as StreamedTensor (src/merge/streaming.py)

    @dataclass
    class Params:
        """Average has no hyperparameters (every paper uses the uniform mean)."""

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> Update:
        n = state.num_tasks
        return linear_combination(state, [1.0 / n] * n, self.compute_dtype)
