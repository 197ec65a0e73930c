"""SLERP (2 models) and MLERP (norm-preserving average of any number), per tensor.

Both are defined on the task WEIGHTS (``group.weights()``), not on the updates, and return
``merged_weight - base`` so that the engine's ``base + update`` gives the merged weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import MergeMethod, TensorGroup, register


def _as_update(group: TensorGroup, merged: torch.Tensor) -> torch.Tensor:
    return merged if group.base is None else merged - group.base


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64))


@register
class Slerp(MergeMethod):
    """Spherical interpolation of two models' flattened tensors."""

    name = "slerp"
    needs_base = False
    num_tasks = 2

    @dataclass
    class Params:
        """Hyperparameters of SLERP.

        t: interpolation position in [0, 1]; 0 gives task model 0, 1 gives task model 1.
            Default 0.5 (the usual choice, e.g. mergekit examples).
        eps: a tensor whose norm is <= eps has no direction, so the pair is interpolated
            linearly. Default 1e-8 (mergekit).
        dot_threshold: when ``|cos angle| > dot_threshold`` the tensors are nearly colinear
            (``sin angle`` ~ 0 makes SLERP ill-conditioned) and linear interpolation is used
            instead. Default 0.9995 (mergekit's DOT_THRESHOLD, ~1.8 degrees).
        """

        t: float = 0.5
        eps: float = 1e-8
        dot_threshold: float = 0.9995

        def __post_init__(self):
            if not 0.0 <= self.t <= 1.0:
                raise ValueError(f"slerp: t must be in [0, 1], got {self.t}")
            if not 0.0 <= self.dot_threshold <= 1.0:
                raise ValueError(f"slerp: dot_threshold is a |cosine| in [0, 1], got {self.dot_threshold}")
            if not self.eps >= 0.0:
                raise ValueError(f"slerp: eps must be >= 0, got {self.eps}")

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        if state.num_tasks != 2:
            raise ValueError(f"slerp merges exactly 2 task models, got {state.num_tasks} (tensor {state.name!r})")
        v0, v1 = state.weights()
        t = params.t
        n0, n1 = _norm(v0), _norm(v1)
        if n0 <= params.eps or n1 <= params.eps:
            return _as_update(state, torch.lerp(v0, v1, t))
        dot = float(torch.dot(v0.reshape(-1).double(), v1.reshape(-1).double())) / (n0 * n1)
        dot = max(-1.0, min(1.0, dot))
        if abs(dot) > params.dot_threshold:
            return _as_update(state, torch.lerp(v0, v1, t))
        theta = math.acos(dot)
        s0 = math.sin((1.0 - t) * theta) / math.sin(theta)
        s1 = math.sin(t * theta) / math.sin(theta)
        return _as_update(state, s0 * v0 + s1 * v1)


@register
class Mlerp(MergeMethod):
    """Average of the weights rescaled to the largest input norm (per tensor)."""

    name = "mlerp"
    needs_base = False

    @dataclass
    class Params:
        """MLERP has no hyperparameters (norm-preserving average as in "Realistic Evaluation")."""

    def merge(self, state: TensorGroup, params: Params, stats: dict) -> torch.Tensor:
        weights = state.weights()
        avg = torch.stack(weights).mean(dim=0)
        avg_norm = _norm(avg)
        if avg_norm == 0.0:  # no direction to rescale: the average it is
            return _as_update(state, avg)
        target = max(_norm(w) for w in weights)
        return _as_update(state, avg * (target / avg_norm))
