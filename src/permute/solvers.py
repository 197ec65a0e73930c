"""Solvers: from unit similarities to a matching (merge / unmerge matrices) for one perm.

Every solver reads the similarity matrix ``S`` of the ``M`` models' units stacked in model
order (``M*d x M*d``: block ``(i, j)`` compares model ``i``'s units with model ``j``'s) and
returns a :class:`Match`: per model a merge matrix (``k x d``: merged unit = weighted sum of
the model's units, weights summing to 1 over all models) and an unmerge matrix (``d x k``:
model unit ~ merged unit), plus the mean similarity of what it matched (the objective).

* :func:`align` — Git Re-Basin style: every model is permuted onto model 0 by a Hungarian
  assignment (``scipy.optimize.linear_sum_assignment``, maximizing) of block ``(0, i)``;
  merged unit ``m`` averages model 0's unit ``m`` with its partners.
* :func:`zip_units` — ZipIt's greedy matching over all ``M*d`` units (units of one model may
  merge too): repeatedly merge the most similar pair; a merged unit's similarities become the
  minimum of its members' times ``alpha`` (``alpha <= 0``: it never merges again with units
  of its members' models); each model may merge at most ``beta * (to_remove / M)`` pairs
  within itself (ZipIt's budget). Down to ``d`` merged units (ZipIt's ``r = 1 - 1/M``).
* Groups (attention heads, GroupNorm groups; ``Perm.group_size > 1``) and ties (perms that
  share one group order): :func:`align` and :func:`zip_units` work on groups — an inner
  Hungarian assignment per group pair gives the pair's mean matched similarity (summed over
  the tied perms), an outer assignment (alignment) or greedy pairing (zip, two models) over
  groups picks the group pairs, and units are matched inside each chosen pair by its inner
  assignment (MuDSC §3.4). A group is never split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .spec import Perm


class Match:
    """One perm's matching for ``M`` models (see the module docstring), held sparsely: per
    model the ``(merged unit, model unit, merge weight)`` entries. ``merge`` / ``unmerge`` give
    the dense matrices; :meth:`apply` multiplies along an axis without forming them (an index
    select for alignments, a sparse product for zips)."""

    def __init__(self, entries: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], sizes: Sequence[int],
                 merged: int, score: float, permutations: Optional[Sequence[torch.Tensor]] = None):
        self.entries, self.sizes, self.merged, self.score = list(entries), list(sizes), int(merged), float(score)
        self.permutations = None if permutations is None else [p.clone() for p in permutations]
        self._sparse: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def from_permutations(cls, perms: Sequence[torch.Tensor], score: float = float("nan")) -> "Match":
        n = len(perms)
        entries = [(torch.arange(len(p)), p.long(), torch.full((len(p),), 1.0 / n)) for p in perms]
        return cls(entries, [len(p) for p in perms], len(perms[0]), score, perms)

    @classmethod
    def identity(cls, size: int, models: int) -> "Match":
        return cls.from_permutations([torch.arange(size)] * models)

    @classmethod
    def from_members(cls, members: Sequence[Sequence[tuple[int, int]]], sizes: Sequence[int], score: float) -> "Match":
        """Merged unit ``m`` averages the ``(model, unit)`` pairs ``members[m]``."""
        per_model: list[list[tuple[int, int, float]]] = [[] for _ in sizes]
        for m, group in enumerate(members):
            for model, unit in group:
                per_model[model].append((m, unit, 1.0 / len(group)))
        entries = []
        for rows in per_model:
            r, c, v = zip(*rows) if rows else ((), (), ())
            entries.append((torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long),
                            torch.tensor(v, dtype=torch.float32)))
        return cls(entries, sizes, len(members), score)

    def _dense(self, i: int, values: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = self.entries[i]
        out = torch.zeros(self.merged, self.sizes[i])
        out[rows, cols] = values
        return out

    @property
    def merge(self) -> list[torch.Tensor]:
        """Per model ``k x d``: merged unit = sum of weights x the model's units."""
        return [self._dense(i, e[2]) for i, e in enumerate(self.entries)]

    @property
    def unmerge(self) -> list[torch.Tensor]:
        """Per model ``d x k``: a model unit reads its merged unit."""
        return [self._dense(i, torch.ones_like(e[2])).T.contiguous() for i, e in enumerate(self.entries)]

    def operator(self, i: int, kind: str) -> torch.Tensor:
        """Sparse ``k x d``: ``merge`` (``merge[i]``), ``spread`` (``unmerge[i]^T``) or ``members``
        (``merge[i] * M``: the model's units summed, for weight features)."""
        key = (i, kind)
        if key not in self._sparse:
            rows, cols, vals = self.entries[i]
            values = {"merge": vals, "spread": torch.ones_like(vals), "members": vals * len(self.entries)}[kind]
            self._sparse[key] = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (self.merged, self.sizes[i]),
                                                        check_invariants=True).coalesce()
        return self._sparse[key]

    def apply(self, t: torch.Tensor, axis: int, i: int, kind: str) -> torch.Tensor:
        """``operator(i, kind) @ t`` along ``axis``."""
        if self.permutations is not None:
            out = t.index_select(axis, self.permutations[i].to(t.device))
            return out * self.entries[i][2][0].item() if kind == "merge" else out
        moved = t.movedim(axis, 0)
        shape = moved.shape
        result = torch.sparse.mm(self.operator(i, kind).to(t.device), moved.reshape(shape[0], -1).float())
        return result.reshape(self.merged, *shape[1:]).movedim(0, axis).to(t.dtype)


def _lsa(block: np.ndarray) -> tuple[np.ndarray, float]:
    """Columns assigned to rows 0..d-1 (maximizing) and the mean matched similarity."""
    rows, cols = linear_sum_assignment(block, maximize=True)
    order = np.argsort(rows)
    cols = cols[order]
    return cols, float(block[np.arange(len(cols)), cols].mean())


def _block(S: torch.Tensor, d: int, i: int, j: int) -> np.ndarray:
    return S[i * d:(i + 1) * d, j * d:(j + 1) * d].double().cpu().numpy()


def _inner(blocks: Sequence[np.ndarray], gs: int, groups: int):
    """Per group pair ``(g, h)``: the inner assignment of each tied perm and the summed mean
    matched similarity."""
    scores = np.zeros((groups, groups))
    inner = [[[None] * groups for _ in range(groups)] for _ in blocks]
    for t, block in enumerate(blocks):
        b = block.reshape(groups, gs, groups, gs)
        for g in range(groups):
            for h in range(groups):
                cols, s = _lsa(b[g, :, h, :])
                inner[t][g][h] = cols
                scores[g, h] += s
    return scores, inner


def align(sims: Sequence[torch.Tensor], perms: Sequence[Perm], models: int) -> list[Match]:
    """Alignment of every model onto model 0 for one perm or a tie of perms (same groups)."""
    first = perms[0]
    d, gs, groups = first.size, first.group_size, first.groups
    per_model: list[list[torch.Tensor]] = [[torch.arange(p.size)] for p in perms]
    scores = [[] for _ in perms]
    for i in range(1, models):
        blocks = [_block(S, p.size, 0, i) for S, p in zip(sims, perms)]
        if gs == 1 and len(perms) == 1:
            cols, s = _lsa(blocks[0])
            per_model[0].append(torch.as_tensor(cols, dtype=torch.long))
            scores[0].append(s)
            continue
        group_scores, inner = _inner(blocks, gs, groups)
        g_rows, g_cols = linear_sum_assignment(group_scores, maximize=True)
        for t, p in enumerate(perms):
            cols = np.concatenate([inner[t][g][h] + h * p.group_size for g, h in sorted(zip(g_rows, g_cols))])
            per_model[t].append(torch.as_tensor(cols, dtype=torch.long))
            scores[t].append(float(blocks[t][np.arange(p.size), cols].mean()))
    return [Match.from_permutations(per_model[t], float(np.mean(scores[t]))) for t in range(len(perms))]


def greedy_merge(S: np.ndarray, origin: np.ndarray, keep: int, alpha: float, beta: float,
                 once: bool = False) -> tuple[list[list[int]], float]:
    """ZipIt's greedy merge of ``len(S)`` items down to ``keep`` (module docstring): returns the
    member lists of the kept items and the mean similarity of the merges made. ``once``: a merged
    item never merges again (a pairing: groups are zipped in pairs)."""
    n = len(S)
    S = np.array(S, dtype=np.float32, copy=True)
    np.fill_diagonal(S, -np.inf)
    models = int(origin.max()) + 1
    to_remove = n - keep
    budget = np.full(models, int((to_remove // models) * beta + 1e-4))
    for o in np.flatnonzero(budget <= 0):  # no budget at all: never merge within that model
        sel = origin == o
        S[np.ix_(sel, sel)] = -np.inf
    members = [[i] for i in range(n)]
    alive = np.ones(n, dtype=bool)
    origin = origin.copy()
    values = []
    row_arg = S.argmax(1)
    row_max = S[np.arange(n), row_arg]
    for _ in range(to_remove):
        masked = np.where(alive, row_max, -np.inf)
        i = int(masked.argmax())
        if not np.isfinite(masked[i]):  # only forbidden pairs left: take the best of them anyway
            idx = [m_ for m_ in np.flatnonzero(alive) if not once or len(members[m_]) == 1]
            i, j = int(idx[0]), int(idx[1])
            value = float("nan")
        else:
            j = int(row_arg[i])
            value = float(S[i, j])
        r, c = min(i, j), max(i, j)
        if np.isfinite(value):
            values.append(value)
        same = origin[r] == origin[c]
        row_origins = {int(origin[m_]) for m_ in (r, c)}
        new = np.minimum(S[r], S[c])
        if once:
            new[:] = -np.inf
        elif alpha <= 0:
            for o in row_origins:
                new[origin == o] = -np.inf
        else:
            new = new * alpha
        members[r] = members[r] + members[c]
        alive[c] = False
        S[c, :] = -np.inf
        S[:, c] = -np.inf
        new[c] = -np.inf
        new[r] = -np.inf
        S[r, :] = new
        S[:, r] = new
        if same:
            o = int(origin[r])
            budget[o] -= 1
            if budget[o] <= 0:
                sel = origin == o
                S[np.ix_(sel, sel)] = -np.inf
        # refresh the cached row maxima that may have changed
        stale = alive & ((row_arg == r) | (row_arg == c) | (S[:, r] > row_max))
        stale[r] = alive[r]
        if same and budget[int(origin[r])] <= 0:
            stale |= alive & (origin == origin[r])
        for m_ in np.flatnonzero(stale):
            row_arg[m_] = int(S[m_].argmax())
            row_max[m_] = S[m_, row_arg[m_]]
        row_max[c] = -np.inf
    kept = [members[i] for i in np.flatnonzero(alive)]
    return kept, float(np.mean(values)) if values else float("nan")


def zip_units(sims: Sequence[torch.Tensor], perms: Sequence[Perm], models: int, alpha: float = 0.0,
              beta: float = 1.0) -> list[Match]:
    """ZipIt matching (module docstring) of one perm or a tie of perms."""
    first = perms[0]
    d, gs, groups = first.size, first.group_size, first.groups
    if gs == 1 and len(perms) == 1:
        origin = np.repeat(np.arange(models), d)
        kept, score = greedy_merge(sims[0].float().cpu().numpy(), origin, d, alpha, beta)
        members = [[(int(u) // d, int(u) % d) for u in group] for group in kept]
        return [Match.from_members(members, [d] * models, score)]
    if models != 2:
        raise ValueError(f"zipping groups (attention heads, GroupNorm groups) is implemented for two models, got {models}")
    # group level: inner assignments for every pair of the 2G groups, then greedy pairing
    n_groups = 2 * groups
    group_sims = np.full((n_groups, n_groups), -np.inf)
    inner: dict[tuple[int, int], list[np.ndarray]] = {}
    for a in range(n_groups):
        for b in range(a + 1, n_groups):
            total, cols_t = 0.0, []
            for S, p in zip(sims, perms):
                ma, ga, mb, gb = a // groups, a % groups, b // groups, b % groups
                block = S[ma * p.size + ga * p.group_size: ma * p.size + (ga + 1) * p.group_size,
                          mb * p.size + gb * p.group_size: mb * p.size + (gb + 1) * p.group_size]
                cols, s = _lsa(block.double().cpu().numpy())
                total += s
                cols_t.append(cols)
            group_sims[a, b] = group_sims[b, a] = total / len(perms)
            inner[(a, b)] = cols_t
    origin = np.repeat(np.arange(2), groups)
    kept, score = greedy_merge(group_sims, origin, groups, alpha=0.0, beta=beta, once=True)
    out = []
    for t, p in enumerate(perms):
        members = []
        for group in kept:
            if len(group) == 1:  # (only when pairing was impossible) keep the group alone
                a = group[0]
                members += [[(a // groups, (a % groups) * p.group_size + u)] for u in range(p.group_size)]
                continue
            a, b = sorted(group)
            cols = inner[(a, b)][t]
            for u in range(p.group_size):
                members.append([(a // groups, (a % groups) * p.group_size + u),
                                (b // groups, (b % groups) * p.group_size + int(cols[u]))])
        out.append(Match.from_members(members, [p.size] * 2, score))
    return out
