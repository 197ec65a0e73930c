"""Hyperparameter-selection protocols: which grid each paper searches, in which order.

A method's search is a list of *stages*. Each stage is a grid over some hyperparameters; the
others keep the values fixed so far (the method's ``fixed`` values, then what earlier stages
selected). Every point is scored on **validation**; the best point of a stage is carried into
the next; the point selected last is evaluated on **test**. ``reuse`` copies a hyperparameter
from another method's selected point (the compositional paper runs DARE at TA's lambda).

Sources (see ``docs/protocols.md``):

* ``knots`` — KnOTS App. C: lambda 0.1..1.0 first with top-k 30% / DARE p 0.9 held fixed,
  then the pruning parameter (top-k 10..100%, p .99, .9 .. .1), DARE seeds 420..424.
* ``compositional`` — Realistic evaluation of merging: TA / TIES lambda 0.1..1.0 (TIES trims
  model-wide, fills zero signs per block), DARE p 0..0.9 at TA's selected lambda; selection
  on held-in validation only.
* ``cart`` — CART: lambda x rank ratio (the paper's setting rho ~ 8%; released configs
  lambda 1.5-2.0, rho 0.12-0.32).
* data-dependent methods: RegMean's ``a`` 0..1; MaTS' CG iterations 10..100 starting from TA's
  selected lambda (``reuse: {lam_init: task_arithmetic.lam}``); Fisher over the number of
  examples (``n_examples`` 256..2048, a statistics setting rather than a merge hyperparameter)
  and its scaling (KnOTS App. E). AdaMerging / AdaMerging++ / CART++ learn their coefficients
  instead of searching a grid (``run.py``).
* ``quick`` — the demo's short grids (a subset of ``knots``), to fit a 2-core laptop budget.
"""
from __future__ import annotations

from typing import Any, Optional

LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]
TOPK = [round(0.1 * i, 1) for i in range(1, 11)]
DARE_P_KNOTS = [0.99] + [round(0.1 * i, 1) for i in range(9, 0, -1)]
DARE_SEEDS = [420, 421, 422, 423, 424]
FISHER_N = [256, 512, 1024, 2048]  # examples the Fisher is estimated on (KnOTS App. E)
REGMEAN_A = [round(0.1 * i, 1) for i in range(0, 11)]  # off-diagonal scaling of the Gram matrices

Stage = dict[str, list]
Search = dict[str, Any]  # {"fixed": {...}, "stages": [Stage, ...], "reuse": {param: method}}

PROTOCOLS: dict[str, dict[str, Search]] = {
    "knots": {
        "average": {},
        "task_arithmetic": {"stages": [{"lam": LAMBDAS}]},
        "ties": {"fixed": {"density": 0.3}, "stages": [{"lam": LAMBDAS}, {"density": TOPK}]},
        "dare": {"fixed": {"mode": "ties", "p": 0.9, "seed": 420},
                 "stages": [{"lam": LAMBDAS}, {"p": DARE_P_KNOTS}, {"seed": DARE_SEEDS}]},
        "knots": {"fixed": {"base_method": "ties", "density": 0.3},
                  "stages": [{"lam": LAMBDAS}, {"density": TOPK}]},
        "cart": {"stages": [{"lam": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "rank_ratio": [0.04, 0.08, 0.12, 0.16, 0.32]}]},
        # KnOTS App. E baselines: Fisher over the number of examples and the scaling, RegMean's a
        "fisher": {"stages": [{"n_examples": FISHER_N}, {"normalize": ["none", "model"]}]},
        "regmean": {"stages": [{"a": REGMEAN_A}]},
    },
    "compositional": {
        "average": {},
        "mlerp": {},
        "slerp": {},
        "task_arithmetic": {"stages": [{"lam": LAMBDAS}]},
        "ties": {"fixed": {"trim_scope": "global", "sign_fill": "tensor"}, "stages": [{"lam": LAMBDAS}]},
        "dare": {"fixed": {"mode": "linear"}, "reuse": {"lam": "task_arithmetic"},
                 "stages": [{"p": [round(0.1 * i, 1) for i in range(0, 10)]}]},
        "fisher": {},  # statistics on the validation set in the paper: statistics.split val
        "regmean": {"stages": [{"a": REGMEAN_A}]},
        # MaTS starts from TA at its selected lambda, then N CG iterations 10..100
        "mats": {"reuse": {"lam_init": "task_arithmetic.lam"},
                 "stages": [{"iterations": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]}]},
    },
    "cart": {
        "average": {},
        "task_arithmetic": {"stages": [{"lam": LAMBDAS}]},
        "ties": {"stages": [{"lam": LAMBDAS}, {"density": TOPK}]},
        "cart": {"stages": [{"lam": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "rank_ratio": [0.04, 0.08, 0.12, 0.16, 0.32]}]},
        "fisher": {"stages": [{"n_examples": FISHER_N}]},
        "regmean": {"stages": [{"a": REGMEAN_A}]},
    },
    "quick": {
        "average": {},
        "task_arithmetic": {"stages": [{"lam": [0.3, 0.5, 0.7, 1.0]}]},
        "ties": {"fixed": {"density": 0.3}, "stages": [{"lam": [0.5, 0.7, 1.0]}, {"density": [0.2, 0.5]}]},
        "dare": {"fixed": {"mode": "ties", "p": 0.5, "seed": 420}, "stages": [{"lam": [0.5, 0.7, 1.0]}, {"p": [0.2, 0.7]}]},
        "knots": {"fixed": {"base_method": "ties", "density": 0.3}, "stages": [{"lam": [0.5, 0.7, 1.0]}, {"density": [0.2, 0.5]}]},
        "cart": {"stages": [{"lam": [0.5, 1.0, 1.5], "rank": [4, 8]}]},
        "fisher": {"stages": [{"normalize": ["none", "model"]}]},
        "regmean": {"stages": [{"a": [0.3, 0.6, 0.9]}]},
        "mats": {"reuse": {"lam_init": "task_arithmetic.lam"}, "stages": [{"iterations": [10, 50]}]},
    },
}


def search_for(method: str, protocol: Optional[str], override: Optional[Search] = None) -> Search:
    """The search of ``method`` under ``protocol``; ``override`` keys (fixed / stages / reuse) win."""
    base: Search = {}
    if protocol:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
        base = dict(PROTOCOLS[protocol].get(method, {}))
    for key, value in (override or {}).items():
        if value is not None:
            base[key] = value
    return {"fixed": dict(base.get("fixed") or {}), "stages": [dict(s) for s in base.get("stages") or []],
            "reuse": dict(base.get("reuse") or {})}


def restrict(search: Search, grid: Optional[dict[str, list]]) -> Search:
    """Replace the values of hyperparameters named in ``grid`` in every stage (command-line
    ``--grid '{lam: [0.3, 0.5]}'``); a stage whose parameter is not named keeps its values."""
    if not grid:
        return search
    stages = [{k: list(grid.get(k, v)) for k, v in stage.items()} for stage in search["stages"]]
    return {**search, "stages": stages}
