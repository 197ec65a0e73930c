"""Plain averaging: ``dW_m = mean_i dW_i``.

Without a base model the updates are the task weights themselves, so this is weight
averaging ``W = mean_i W_i``; with a base it gives the same weights (``W0 + mean dW``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import MergeMethod, TensorGroup, register
from ..updates import densify


@register
class Average(MergeMethod):
    """Mean of the task updates (weight averaging; needs no base model)."""

    name = "average"
    needs_base = False

    @dataclass
    class Params:
        """Average has no hyperparameters (every paper uses the uniform mean)."""

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        return torch.stack([densify(u) for u in state.updates]).mean(dim=0)
