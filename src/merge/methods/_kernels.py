"""Element-wise building blocks shared by TIES, DARE and KnOTS (one definition each).

All functions take a stacked tensor ``x`` of shape ``(n_tasks, ...)``. ``trim``,
``elect_sign`` and ``disjoint_mean`` are the literal three-step definition of TIES; the
methods call the fused, chunked :func:`ties_combine`, which the tests check against them.

Trimming keeps exactly ``k = int(density * N)`` entries per task, also when many entries
tie with the ``k``-th largest magnitude (bf16 updates take few distinct values): a trim is
a per-task threshold plus an optional *tie quota* ``q`` — keep ``|x| > threshold`` and only
the first ``q`` entries (flat row-major order) with ``|x| == threshold``. ``None`` keeps
every tie (plain ``|x| >= threshold``, the fast path whenever that already keeps ``k``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ..reductions import TopKThreshold, run_reduction


#: Above this many entries the exact histogram selection beats ``torch.topk`` (3x at 9.4M).
HISTOGRAM_SELECT_MIN = 1 << 20


TieQuota = Optional[Sequence[Optional[int]]]  # per task: tied entries kept (None: all)


def topk_trim(values: torch.Tensor, density: float) -> tuple[float, Optional[int]]:
    """Threshold and tie quota that keep exactly the top ``k = int(density * numel)`` of ``values``.

    The threshold is the ``k``-th largest magnitude (``inf`` when ``k == 0``: keep nothing,
    ``0`` when ``k == numel``: keep everything); the quota is ``None`` when
    ``|x| >= threshold`` keeps exactly ``k``, else how many of the entries equal to the
    threshold to keep (the first ones in flat row-major order). Large tensors use the exact
    bucket-histogram selection of :class:`~src.merge.reductions.TopKThreshold` (3x faster
    than ``topk``; it counts the ties on the way).
    """
    n = values.numel()
    k = int(density * n)
    if k == 0:
        return float("inf"), None
    if k == n:
        return 0.0, None
    if n >= HISTOGRAM_SELECT_MIN:
        flat = values.detach().reshape(1, -1)
        res = run_reduction(TopKThreshold(lambda s: s, density), lambda: [("", flat)])
        quota = res.tie_quota("")
        return res[0], None if quota is None else quota[0]
    mags = values.detach().abs().reshape(-1)
    top = torch.topk(mags, k, sorted=False).values
    kth = top.min()
    if int((mags >= kth).sum()) == k:  # no surplus ties (always so for continuous values)
        return float(kth), None
    return float(kth), int((top == kth).sum())


def topk_threshold(values: torch.Tensor, density: float) -> float:
    """The ``k``-th largest magnitude of ``values``, ``k = int(density * numel)`` (see :func:`topk_trim`)."""
    return topk_trim(values, density)[0]


def _tie_cut(row: torch.Tensor, threshold: float, quota: int) -> int:
    """Flat index just past the ``quota``-th entry of ``row`` equal in magnitude to ``threshold``
    (``row.numel()`` if there are fewer). Chunked: no full-size temporary."""
    if quota <= 0:
        return 0
    row, seen = row.reshape(-1), 0
    for start in range(0, row.numel(), CHUNK_ENTRIES):
        eq = row[start:start + CHUNK_ENTRIES].abs() == threshold
        c = int(eq.sum())
        if seen + c >= quota:
            return start + int(eq.nonzero()[quota - seen - 1]) + 1
        seen += c
    return row.numel()


class _Trim:
    """The trim rule of a stacked tensor, handed out per block of flat columns.

    Task ``i`` keeps ``|x| >= t_i`` at columns before ``cut_i`` and ``|x| > t_i`` from
    ``cut_i`` on, which keeps ``|x| > t_i`` plus the first ``q_i`` ties (``cut_i`` is just
    past the ``q_i``-th tie; no quota: ``cut_i = numel``, the plain rule). Strict ``>`` is
    ``>=`` the next representable value, so a block that does not straddle a cut still
    uses one threshold per task: a ``(n, 1)`` column, as without quotas.
    """

    def __init__(self, x: torch.Tensor, thresholds: Sequence[float], tie_quota: TieQuota = None):
        n = x.shape[0]
        self.t = torch.tensor(list(thresholds), dtype=x.dtype, device=x.device).unsqueeze(1)
        self.cuts: Optional[list[int]] = None
        if tie_quota is not None and any(q is not None for q in tie_quota):
            flat = x.reshape(n, -1)
            self.cuts = [flat.shape[1] if q is None else _tie_cut(flat[i], float(thresholds[i]), int(q))
                         for i, q in enumerate(tie_quota)]
            self.strict = torch.nextafter(self.t, torch.full_like(self.t, float("inf")))
            self._cut_column = torch.tensor(self.cuts, device=x.device).unsqueeze(1)
            self._columns: dict[tuple[bool, ...], torch.Tensor] = {}  # per pattern of tasks before their cut

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Thresholds for flat columns ``start:stop``: ``(n, 1)``, or ``(n, stop - start)`` if a cut falls inside."""
        if self.cuts is None:
            return self.t
        if any(start < c < stop for c in self.cuts):
            return self.at(torch.arange(start, stop, device=self.t.device))
        key = tuple(c >= stop for c in self.cuts)
        if key not in self._columns:
            before = torch.tensor(key, device=self.t.device).unsqueeze(1)
            self._columns[key] = torch.where(before, self.t, self.strict)
        return self._columns[key]

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        """Thresholds for the given flat columns: ``(n, len(columns))`` (or ``(n, 1)``)."""
        if self.cuts is None:
            return self.t
        return torch.where(columns.unsqueeze(0) < self._cut_column, self.t, self.strict)


def keep_mask(x: torch.Tensor, thresholds: Sequence[float], tie_quota: TieQuota = None) -> torch.Tensor:
    """Boolean mask of the entries each task keeps (see the module docstring)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    return (flat.abs() >= _Trim(x, thresholds, tie_quota).block(0, flat.shape[1])).reshape(x.shape)


def trim(x: torch.Tensor, thresholds: Sequence[float], tie_quota: TieQuota = None) -> torch.Tensor:
    """Zero the entries of task ``i`` below ``thresholds[i]`` (and its ties beyond ``tie_quota[i]``)."""
    return torch.where(keep_mask(x, thresholds, tie_quota), x, torch.zeros((), dtype=x.dtype, device=x.device))


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


def elect_chunks(x: torch.Tensor, thresholds: Optional[Sequence[float]], fill: Union[None, float, Callable[[], float]],
                 tie_quota: TieQuota, emit: Callable[[Union[slice, torch.Tensor], torch.Tensor, torch.Tensor], None]) -> None:
    """TIES' trim and sign election over column chunks of ``x`` (``(n, *shape)``), with temporaries
    bounded by :data:`CHUNK_ENTRIES`: ``emit(cols, xt, s)`` receives each chunk's columns (a slice
    of the flattened tensor), its trimmed values ``xt`` (``(n, c)``) and elected signs ``s``. Columns
    whose elected sign is 0 but that hold nonzero values (exact cancellation: rare) are emitted a
    second time at the end (``cols`` an index tensor) with the fill sign: the tensor's majority sign,
    or ``fill`` (a number, or a callable for a model-wide statistic, called only if needed)."""
    flat = x.reshape(x.shape[0], -1)
    rule = None if thresholds is None else _Trim(x, thresholds, tie_quota)
    sign_total = torch.zeros((), dtype=x.dtype, device=x.device)
    pending = []
    for start, xc in _column_chunks(flat):
        stop = start + xc.shape[1]
        xt = _trim_chunk(xc, None if rule is None else rule.block(start, stop))
        s = torch.sign(xt.sum(dim=0))
        emit(slice(start, stop), xt, s)
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
            xt = _trim_chunk(flat[:, idx], None if rule is None else rule.at(idx))
            emit(idx, xt, torch.full((idx.numel(),), f, dtype=x.dtype, device=x.device))


def ties_combine(x: torch.Tensor, thresholds: Optional[Sequence[float]] = None,
                 fill: Union[None, float, Callable[[], float]] = None, tie_quota: TieQuota = None) -> torch.Tensor:
    """``disjoint_mean(elect_sign(trim(x, thresholds, tie_quota), fill))`` in one chunked pass
    (:func:`elect_chunks`); the same result as the three reference functions above, without ~a
    dozen copies of the stacked tensor. ``thresholds=None``: no trim."""
    out = torch.empty(x[0].numel(), dtype=x.dtype, device=x.device)

    def emit(cols, xt, s):
        # |x| where x is nonzero and of the elected sign, else 0: sum * s is the numerator
        agreeing = (xt * s).clamp_(min=0)
        out[cols] = agreeing.sum(dim=0).mul_(s).div_((agreeing > 0).sum(dim=0).clamp_(min=1))

    elect_chunks(x, thresholds, fill, tie_quota, emit)
    return out.reshape(x.shape[1:])


def elected_sign_sum(x: torch.Tensor, thresholds: Optional[Sequence[float]] = None,
                     tie_quota: TieQuota = None) -> torch.Tensor:
    """``sum(sign(sum_i trim(x)_i))`` over the entries of one tensor (a 0-d tensor).

    The per-tensor term of the model-wide majority sign (original TIES' zero-sign fill).
    """
    flat = x.reshape(x.shape[0], -1)
    rule = None if thresholds is None else _Trim(x, thresholds, tie_quota)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for start, xc in _column_chunks(flat):
        t = None if rule is None else rule.block(start, start + xc.shape[1])
        total += torch.sign(_trim_chunk(xc, t).sum(dim=0)).sum()
    return total
