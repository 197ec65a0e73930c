"""Matching every perm of ``M`` models: activation, weight and dual-space (MuDSC) searches.

``match_models`` solves the perms of a spec (ties together) with one solver (``align`` or
``zip``, ``solvers.py``) on one similarity per perm:

* activations only (``alpha = 0``): ``C_act`` — the correlation of the units' activations on
  data (``ActivationStatistics``) — is fixed, so one pass solves everything (ZipIt, activation
  alignment).
* weights involved (``alpha > 0``): coordinate ascent. Perms (tie groups) are visited in a
  seeded random order; each is re-solved on ``C = alpha * C_weight + (1 - alpha) * C_act``
  where ``C_weight`` is recomputed with the neighbours' current matchings (MuDSC Eq. 7-8;
  ``alpha = 1``: Git Re-Basin weight matching). A sweep's objective is the mean matched
  similarity over perms; the search keeps the best sweep and stops after ``patience`` sweeps
  without improvement or ``max_iter`` sweeps. ``variant="alg1"`` follows the paper's
  Algorithm 1 instead, which compounds the previous combined matrix
  (``C <- alpha * C_weight + (1 - alpha) * C_prev``) so the activation term fades geometrically;
  the default ``"eq8"`` keeps the fixed activation term the paper's Eq. 8 (and the authors'
  code) uses, so that ``alpha`` keeps meaning the share of each space.
  The search starts from the activation solution when there is an activation term (as MuDSC's
  code does) and from the identity otherwise (as weight matching does).

Git Re-Basin stops when a whole sweep changes no permutation (``patience=1`` with an exact
objective); MuDSC's code uses up to 100 sweeps with patience 5 — the defaults here.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .merge import correlation, weight_similarity
from .solvers import Match, align, zip_units
from .spec import PermutationSpec


def activation_similarity(stats: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per perm, the correlation matrix of the stacked models' units from streamed sums
    (``count``, ``sum``, ``gram``: see ``statistics.py``)."""
    out = {}
    for perm, s in stats.items():
        n = float(s["count"])
        mean = s["sum"].double() / n
        cov = s["gram"].double() / n - torch.outer(mean, mean)
        out[perm] = correlation(cov).float()
    return out


def _solve(solver: str, sims, perms, models: int, zip_alpha: float, zip_beta: float) -> list[Match]:
    if solver == "align":
        return align(sims, perms, models)
    if solver == "zip":
        return zip_units(sims, perms, models, alpha=zip_alpha, beta=zip_beta)
    raise ValueError(f"solver must be 'align' or 'zip', got {solver!r}")


def match_models(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]],
                 act: Optional[Mapping[str, torch.Tensor]] = None, solver: str = "align", alpha: float = 0.0,
                 variant: str = "eq8", similarity: str = "correlation", max_iter: int = 100, patience: int = 5,
                 seed: int = 0, zip_alpha: float = 0.0, zip_beta: float = 1.0,
                 report: Optional[dict] = None) -> dict[str, Match]:
    """A :class:`Match` per perm (module docstring). ``act``: activation similarity per perm
    (:func:`activation_similarity`); required when ``alpha < 1``. ``report`` (a dict) receives
    ``sweeps`` (coordinate-ascent sweeps run, 0 for a single pass) and ``objective``."""
    report = {} if report is None else report
    report["sweeps"] = 0
    models = len(states)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if variant not in ("eq8", "alg1"):
        raise ValueError(f"variant must be 'eq8' or 'alg1', got {variant!r}")
    for i, state in enumerate(states):
        spec.check(state, f"model {i}")
    units = spec.tied()
    if alpha < 1.0:
        missing = [p for p in spec.perms if act is None or p not in act]
        if missing:
            raise ValueError(f"activation statistics are missing for perms {missing[:3]} (alpha < 1 needs them)")
    matches: dict[str, Match] = {}

    def solve(unit: list[str], sims: list[torch.Tensor]) -> float:
        found = _solve(solver, sims, [spec.perms[p] for p in unit], models, zip_alpha, zip_beta)
        for p, m in zip(unit, found):
            matches[p] = m
        return sum(m.score for m in found) / len(found)

    if alpha < 1.0:  # the activation solution: the answer (alpha = 0) or the start
        for unit in units:
            solve(unit, [act[p] for p in unit])
        if alpha == 0.0:
            report["objective"] = sum(m.score for m in matches.values()) / len(matches)
            return matches
    else:
        for p, perm in spec.perms.items():
            matches[p] = Match.identity(perm.size, models)
    combined = {p: act[p] for p in spec.perms} if alpha < 1.0 else {}
    generator = torch.Generator().manual_seed(int(seed))
    best, best_matches, stall = -float("inf"), dict(matches), 0
    for _ in range(int(max_iter)):
        report["sweeps"] += 1
        scores = {}
        for u in torch.randperm(len(units), generator=generator).tolist():
            unit = units[u]
            sims = []
            for p in unit:
                w = weight_similarity(spec, p, matches, states, similarity, first_rows=solver == "align")
                if alpha == 1.0:
                    c = w
                else:  # (an alignment reads model 0's rows only: w holds just those)
                    c = alpha * w + (1 - alpha) * (act[p] if variant == "eq8" else combined[p])[:len(w)]
                    combined[p] = c
                sims.append(c)
            scores[u] = solve(unit, sims)
        objective = sum(scores.values()) / len(scores)
        if objective > best + 1e-9:
            best, best_matches, stall = objective, dict(matches), 0
        else:
            stall += 1
            if stall >= patience:
                break
    report["objective"] = best
    return best_matches
