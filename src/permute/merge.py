"""Applying matchings to weights: the merged state, aligned task states, weight-space features.

For a tensor ``W_i`` of model ``i`` and a perm ``p`` acting on its axis ``a``:

* merging: along an "out" axis the merged tensor takes ``M_p,i @ W_i`` (merged units as weighted
  sums of the model's units), along an "in" axis ``U_p,i^T`` (the merged input feeds each
  model unit through the unmerge matrix); the merged tensor is the sum over models.
  Unpermuted tensors (a classifier's output axis, a text tower) are averaged; integer buffers
  are copied from model 0.
* weight-space features (MuDSC Eq. 6): unit ``u`` of perm ``p`` is described by every weight
  tied to it (rows where ``p`` is "out", columns where it is "in"), after the *other* axes of
  those tensors are brought into the merged coordinates with the neighbours' current matchings
  (``M*p.size`` rows where the neighbour is "out", ``U^T`` where it is "in"; both are the
  permutation for an alignment). Similarity: Pearson correlation of those vectors (MuDSC's code)
  or their inner product (Git Re-Basin's weight matching objective ``sum <W_0, P W_i>``),
  accumulated tensor by tensor so the long vectors are never formed.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .solvers import Match
from .spec import PermutationSpec, permute_state


def merge_states(spec: PermutationSpec, matches: Mapping[str, Match],
                 states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state from ``M`` models' states and a matching per perm (module docstring)."""
    models = len(states)
    merged: dict[str, torch.Tensor] = {}
    for name, t0 in states[0].items():
        if not t0.is_floating_point():
            merged[name] = t0.clone()
            continue
        axes = spec.axes.get(name) or ()
        # a merge matrix (an "out" axis) carries the 1/M of the average; otherwise divide here
        scale = 1.0 if any(a is not None and a[1] == "out" for a in axes) else 1.0 / models
        total = None
        for i, state in enumerate(states):
            t = state[name].float()
            for a, axis in enumerate(axes):
                if axis is not None:
                    t = matches[axis[0]].apply(t, a, i, "merge" if axis[1] == "out" else "spread")
            total = t if total is None else total + t
        merged[name] = (total * scale).to(t0.dtype)
    return merged


def aligned_states(spec: PermutationSpec, matches: Mapping[str, Match],
                   states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each model's state permuted into model 0's unit order (alignments only): averaging these
    gives :func:`merge_states`."""
    missing = [p for p, m in matches.items() if m.permutations is None]
    if missing:
        raise ValueError(f"perms {missing[:3]} were zipped, not aligned: there are no aligned task models to write")
    return [permute_state(spec, {p: m.permutations[i] for p, m in matches.items()}, state)
            for i, state in enumerate(states)]


def weight_similarity(spec: PermutationSpec, perm: str, matches: Mapping[str, Match],
                      states: Sequence[Mapping[str, torch.Tensor]], kind: str = "correlation",
                      first_rows: bool = False) -> torch.Tensor:
    """The ``M*d x M*d`` weight-space similarity of ``perm``'s units (module docstring).
    ``first_rows``: only model 0's ``d`` rows (``d x M*d``: all an alignment onto model 0 reads),
    half the products for two models."""
    models = len(states)
    d = spec.perms[perm].size
    rows = d if first_rows else models * d
    gram = torch.zeros(rows, models * d, dtype=torch.float64)
    sums = torch.zeros(models * d, dtype=torch.float64)
    squares = torch.zeros(models * d, dtype=torch.float64)
    length = 0
    for name, axis, _role in spec.tensors_of(perm):
        axes = spec.axes[name]
        feats = []
        for i, state in enumerate(states):
            t = state[name].float()
            for a, other in enumerate(axes):  # the other axes into merged coordinates
                if a != axis and other is not None and other[0] in matches:
                    t = matches[other[0]].apply(t, a, i, "members" if other[1] == "out" else "spread")
            feats.append(t.movedim(axis, 0).reshape(d, -1).float())
        F = torch.cat(feats, 0)
        gram += (F[:rows] @ F.T).double()  # float32 products, float64 totals over tensors
        sums += F.sum(1).double()
        squares += F.square().sum(1).double()
        length += F.shape[1]
    if kind not in ("correlation", "inner"):
        raise ValueError(f"weight similarity must be 'correlation' or 'inner', got {kind!r}")
    if kind == "correlation":
        n = max(length, 1)
        mean = sums / n
        std = (squares / n - mean.square()).clamp_min(0).sqrt()
        gram = (gram / n - torch.outer(mean[:rows], mean)) / torch.outer(std[:rows], std).clamp_min(1e-7)
    return gram.float()


def correlation(cov: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    std = cov.diagonal().clamp_min(0).sqrt()
    return cov / torch.outer(std, std).clamp_min(eps)
