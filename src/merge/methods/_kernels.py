"""Element-wise building blocks shared by TIES, DARE and KnOTS (one definition each).

All functions take a stacked tensor ``x`` of shape ``(n_tasks, ...)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def topk_threshold(values: torch.Tensor, density: float) -> float:
    """The ``k``-th largest magnitude of ``values``, ``k = int(density * numel)``.

    ``inf`` when ``k == 0`` (keep nothing), ``0`` when ``k == numel`` (keep everything).
    """
    n = values.numel()
    k = int(density * n)
    if k == 0:
        return float("inf")
    if k == n:
        return 0.0
    return float(torch.topk(values.detach().abs().reshape(-1), k, sorted=False).values.min())


def trim(x: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Zero the entries of task ``i`` whose magnitude is below ``thresholds[i]``."""
    t = torch.tensor(list(thresholds), dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(x.abs() >= t, x, torch.zeros((), dtype=x.dtype, device=x.device))


def elect_sign(x: torch.Tensor, fill: Optional[float] = None) -> torch.Tensor:
    """TIES sign election: ``sign(sum_i x_i)``; zeros take ``fill``.

    ``fill=None`` uses the majority sign of this tensor (``sign`` of the sum of elected
    signs), the per-tensor variant; pass the model-wide value for the original TIES.
    """
    s = torch.sign(x.sum(dim=0))
    if fill is None:
        fill = float(torch.sign(s.sum()))
    return torch.where(s == 0, torch.full_like(s, fill), s)


def disjoint_mean(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the nonzero values whose sign agrees with ``sign`` (0 if none)."""
    agree = (torch.sign(x) == sign.unsqueeze(0)) & (x != 0)
    total = torch.where(agree, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def dare_drop(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1/(1-p)``.

    The mask is drawn on the CPU from ``generator`` (owned by the merge, never the global
    RNG) so that results are the same on every device for a given seed.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    keep = torch.bernoulli(torch.full(x.shape, 1.0 - p, dtype=torch.float32), generator=generator)
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)
