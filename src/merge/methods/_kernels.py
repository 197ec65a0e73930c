"""Element-wise building blocks shared by TIES, DARE and KnOTS (one definition each).

All functions take a stacked tensor ``x`` of shape ``(n_tasks, ...)``. ``trim``,
``elect_sign`` and ``disjoint_mean`` are the literal three-step definition of TIES; the
methods call the fused, chunked :func:`ties_combine`, which the tests check against them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..statistics import TopKThreshold, run_reduction


#: Above this many entries the exact histogram selection beats ``torch.topk`` (3x at 9.4M).
HISTOGRAM_SELECT_MIN = 1 << 20


def topk_threshold(values: torch.Tensor, density: float) -> float:
    """The ``k``-th largest magnitude of ``values``, ``k = int(density * numel)``.

    ``inf`` when ``k == 0`` (keep nothing), ``0`` when ``k == numel`` (keep everything).
    Large tensors use the exact bucket-histogram selection of
    :class:`~src.merge.statistics.TopKThreshold` (same result, 3x faster than ``topk``).
    """
    n = values.numel()
    k = int(density * n)
    if k == 0:
        return float("inf")
    if k == n:
        return 0.0
    if n >= HISTOGRAM_SELECT_MIN:
        flat = values.detach().reshape(1, -1)
        return run_reduction(TopKThreshold(lambda s: s, density), lambda: [("", flat)])[0]
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


# ----- fused, chunked TIES (what the methods call) -------------------------------------
#: Entries (over all tasks) processed at once: temporaries stay ~2 MB whatever the tensor.
CHUNK_ENTRIES = 1 << 18


def _column_chunks(flat: torch.Tensor):
    step = max(1, CHUNK_ENTRIES // flat.shape[0])
    for start in range(0, flat.shape[1], step):
        yield start, flat[:, start:start + step]


def _trim_chunk(xc: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return xc if t is None else xc * (xc.abs() >= t)


def _threshold_column(x: torch.Tensor, thresholds: Optional[Sequence[float]]) -> Optional[torch.Tensor]:
    if thresholds is None:
        return None
    return torch.tensor(list(thresholds), dtype=x.dtype, device=x.device).unsqueeze(1)


def ties_combine(x: torch.Tensor, thresholds: Optional[Sequence[float]] = None,
                 fill: Union[None, float, Callable[[], float]] = None) -> torch.Tensor:
    """``disjoint_mean(elect_sign(trim(x, thresholds), fill))`` in one chunked pass.

    Same result as the three reference functions above, with temporaries bounded by
    :data:`CHUNK_ENTRIES` instead of ~a dozen copies of the stacked tensor. Entries whose
    elected sign is 0 but that hold nonzero values (exact cancellation: rare) are fixed
    up at the end, once this tensor's majority sign is known. ``thresholds=None``: no trim.
    ``fill`` may be a callable (a model-wide statistic): it is called only if needed.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    t = _threshold_column(x, thresholds)
    out = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)
    sign_total = torch.zeros((), dtype=x.dtype, device=x.device)
    pending = []
    for start, xc in _column_chunks(flat):
        xt = _trim_chunk(xc, t)
        s = torch.sign(xt.sum(dim=0))
        # |x| where x is nonzero and of the elected sign, else 0: sum * s is the numerator
        agreeing = (xt * s).clamp_(min=0)
        count = (agreeing > 0).sum(dim=0).clamp_(min=1)
        out[start:start + xc.shape[1]] = agreeing.sum(dim=0).mul_(s).div_(count)
        sign_total += s.sum()
        zero = (s == 0).nonzero().squeeze(1)
        if zero.numel():  # elected sign 0: only those holding nonzero values need the fill
            unresolved = zero[(xt[:, zero] != 0).any(dim=0)]
            if unresolved.numel():
                pending.append(unresolved + start)
    if pending:
        f = float(torch.sign(sign_total)) if fill is None else float(fill() if callable(fill) else fill)
        if f != 0:
            idx = torch.cat(pending)
            agreeing = (_trim_chunk(flat[:, idx], t) * f).clamp_(min=0)
            out[idx] = agreeing.sum(dim=0).mul_(f).div_((agreeing > 0).sum(dim=0).clamp_(min=1))
    return out.reshape(x.shape[1:])


def elected_sign_sum(x: torch.Tensor, thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``sum(sign(sum_i trim(x)_i))`` over the entries of one tensor (a 0-d tensor).

    The per-tensor term of the model-wide majority sign (original TIES' zero-sign fill).
    """
    flat = x.reshape(x.shape[0], -1)
    t = _threshold_column(x, thresholds)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for _, xc in _column_chunks(flat):
        total += torch.sign(_trim_chunk(xc, t).sum(dim=0)).sum()
    return total
