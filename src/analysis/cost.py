"""What a merge costs and what it needs: FLOPs per layer, measured merge time per layer, prerequisites.

    python -m src.analysis.cost --output runs/cost                        # the paper's layer, timed here (CPU)
    python -m src.analysis.cost --shapes 5120x2048 --models 5 --measure false --output runs/cost
    python -m src.analysis.cost --methods regmean mats-gram mats-kfac --device cuda --output runs/cost_gpu

writes ``cost.md`` (and the same numbers as ``cost.json``) in ``--output``: per layer shape and
number of models, one row per merge method of the registry with its FLOP count (the formula and
its value), the measured merge time of one layer (median over repeats) and the paper's Table 4
time side by side; then what every method of the toolkit needs (:data:`PREREQUISITES`).

**Source.** Tam, Kant, Lester, Gilitschenski, Raffel, "Realistic Evaluation of Model Merging for
Compositional Generalization" (2024, arXiv:2409.18314), App. D: Table 3 (FLOPs to merge one
``d x k`` linear layer of ``M`` models; ``N``: MaTS' conjugate-gradient iterations; counted in
multiply-adds) and Table 4 (measured time to merge one mT5-xl feed-forward layer, 5120 x 2048,
``M = 5``, on the authors' GPU: Average 1.2 ms, TA 1.9, DARE 2.6, TIES 2.1, Fisher 0.8, RegMean
49.9, MaTS 4,280 ms).

**What was confirmed, and what was not.** The formulas and times here are the ones recorded in
this project's notes (``../shared/ALGORITHMS.md`` "Costs", ``docs/algorithms.md``,
``benchmarks/bench_data_methods.py``). A search of the stored public pages and documentation
(queries on the title, "Table 3" / "Table 4" / Tables 15-17, the formulas, the millisecond
figures) found the paper only through its abstract (huggingface.co/papers/2409.18314,
openreview.net/forum?id=Bq3fEAGXUL and ?id=j7ye0nXvEm, sciencestack.ai/paper/2409.18314), which
says the paper measures "the computational costs of different merging methods"; no text of App.
D, Table 3, Table 4 or Tables 15-17 was found. **None of the formulas or times below could be
checked against the paper here**; they are the project's record of it. In particular:

* MLERP is recorded only as ``(2M + 3) d k + ...`` (incomplete): :func:`flops` refuses ``mlerp``
  rather than guess the rest, and ``cost.md`` shows the recorded part without a value.
* DARE's ``(6M + 1) d k`` equals TIES' ``(4M + 1) d k`` plus ``2 d k`` per model (drop mask and
  rescale), which suggests the counted DARE is DARE followed by TIES' sign election (DARE-TIES);
  an inference, not confirmed. It is timed here with ``mode: ties``.
* MaTS' ``(M + N) d^2 k`` is one ``d x d`` by ``d x k`` product per model (the right-hand side)
  and per CG iteration: the cost of the Gram (RegMean) subspace's operator ``X -> X sum_i G_i``.
  The K-FAC operator ``X -> sum_i G_i X A_i`` costs ``M d k (d + k)`` per iteration
  (:func:`mats_kfac_flops`, this project's count, not the paper's). Which subspace, and how many
  iterations, Table 4's 4,280 ms used was not confirmed (the benchmark records 50 iterations);
  the default timed case is the Gram subspace with ``N = 50``.
* Tables 15-17 (per-shape numbers) were not found; every value in ``cost.md`` is the formula
  evaluated here. No count is recorded for SLERP (the paper evaluates SLERP / MLERP:
  docs/protocols.md), KnOTS, CART or the permutation methods; whether Table 3 counts SLERP is unknown.

**Shapes.** ``--shapes OUTxIN`` is a torch weight shape ``(out_features, in_features)``. ``d`` is
read as the input side (the side of the Gram matrix, whose square RegMean's and MaTS' ``d^2 k``
terms suggest) and ``k`` as the output side; this reading is the project's, not confirmed.
``5120x2048`` is then mT5-xl's ``wi`` (d_model 2048 -> d_ff 5120), as in
``benchmarks/bench_data_methods.py``: ``d = 2048``, ``k = 5120``. The recorded "5120 x 2048" does
not say whether the layer is ``wi`` or ``wo`` (``5120 -> 2048``, i.e. ``--shapes 2048x5120``); for
the ``d^2 k`` methods the two readings differ by 2.5x.

**Timing** is the benchmark's (``benchmarks/bench_data_methods.py`` imports it from here): random
inputs of the layer's shape in memory (task weights near a base, statistics of the right shapes:
diagonal Fisher, SPD Gram / K-FAC factors), a :class:`~src.merge.MergeEngine` opened before the
clock starts, ``engine.run(params)`` timed (updates formed from the base, statistics checked,
prepare, reductions, merge, ``W0`` added back), the median over ``--repeats`` runs, fewer when
the runs of a method exceed ``--budget`` seconds (MaTS K-FAC takes minutes on a CPU; it is not
in the default set). The paper's times are its GPU's: compare them with ``--device cuda``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics as stats_mod
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..safe_output import check_own_file, replace_own_file

PAPER = ("Tam et al. 2024, \"Realistic Evaluation of Model Merging for Compositional Generalization\" "
         "(arXiv:2409.18314), App. D")

# --------------------------------------------------------------------------------------------
# FLOPs (multiply-adds) per d x k linear layer, M models: the paper's Table 3 as recorded
# --------------------------------------------------------------------------------------------

#: method -> (formula as written, count(d, k, M, N)); ``N`` is used by MaTS only.
FORMULAS: dict[str, tuple[str, Callable[[int, int, int, int], int]]] = {
    "average": ("M d k", lambda d, k, M, N: M * d * k),
    "task_arithmetic": ("(2M + 1) d k", lambda d, k, M, N: (2 * M + 1) * d * k),
    "dare": ("(6M + 1) d k", lambda d, k, M, N: (6 * M + 1) * d * k),
    "ties": ("(4M + 1) d k", lambda d, k, M, N: (4 * M + 1) * d * k),
    "fisher": ("(3M - 1) d k", lambda d, k, M, N: (3 * M - 1) * d * k),
    "regmean": ("(M + 2) d² k + (3M - 2) d k", lambda d, k, M, N: (M + 2) * d * d * k + (3 * M - 2) * d * k),
    "mats": ("(M + N) d² k + (2M + 5N - 2) d k",
             lambda d, k, M, N: (M + N) * d * d * k + (2 * M + 5 * N - 2) * d * k),
}
#: methods whose recorded count is incomplete: the recorded part, never evaluated
UNCONFIRMED: dict[str, str] = {"mlerp": "(2M + 3) d k + …"}
#: hyperparameters a formula takes (and needs)
FORMULA_PARAMS: dict[str, tuple[str, ...]] = {"mats": ("N",)}
#: this project's count of MaTS with the K-FAC operator (not the paper's)
KFAC_FORMULA = "M d k (d + k) (N + 1)"

#: the paper's Table 4: ms to merge one mT5-xl feed-forward layer (5120 x 2048), M = 5, its GPU
PAPER_TABLE4_MS: dict[str, float] = {"average": 1.2, "task_arithmetic": 1.9, "dare": 2.6, "ties": 2.1,
                                     "fisher": 0.8, "regmean": 49.9, "mats": 4280.0}
PAPER_SHAPE = (5120, 2048)  # (out, in) as read here: d = 2048, k = 5120 (module docstring)
PAPER_MODELS = 5


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def flops(method: str, d: int, k: int, M: int, **hp: int) -> int:
    """Multiply-adds to merge one ``d x k`` linear layer (``d`` inputs, ``k`` outputs) of ``M``
    models with ``method``, by the paper's Table 3 as recorded (module docstring). MaTS needs
    ``N`` (CG iterations); no other method takes a hyperparameter. Methods without a recorded
    count (SLERP, KnOTS, CART, ...) and MLERP (recorded incomplete) are refused."""
    if method in UNCONFIRMED:
        raise ValueError(f"flops: the recorded count for {method!r} is incomplete ({UNCONFIRMED[method]}); "
                         "it could not be confirmed against the paper, so it is not evaluated")
    if method not in FORMULAS:
        raise ValueError(f"flops: no count is recorded for {method!r} (recorded: {', '.join(FORMULAS)})")
    d, k, M = _count("d", d, 1), _count("k", k, 1), _count("M", M, 1)
    takes = FORMULA_PARAMS.get(method, ())
    unknown = sorted(set(hp) - set(takes))
    if unknown:
        depends = ", ".join(takes) or "d, k, M only"
        raise ValueError(f"flops: {method!r} takes no {unknown} (its count depends on {depends})")
    missing = [p for p in takes if p not in hp]
    if missing:
        raise ValueError(f"flops: {method!r} needs {missing} (CG iterations)")
    N = _count("N", hp["N"], 0) if "N" in hp else 0
    return FORMULAS[method][1](d, k, M, N)


def mats_kfac_flops(d: int, k: int, M: int, N: int) -> int:
    """This project's count (not the paper's) for MaTS with the K-FAC operator: per CG iteration
    and for the right-hand side, ``M`` products ``G_i X A_i`` (``k x k`` by ``k x d``, then by
    ``d x d``): ``M d k (d + k) (N + 1)``."""
    d, k, M, N = _count("d", d, 1), _count("k", k, 1), _count("M", M, 1), _count("N", N, 0)
    return M * d * k * (d + k) * (N + 1)


# --------------------------------------------------------------------------------------------
# Timing one layer through the merge engine (shared with benchmarks/bench_data_methods.py)
# --------------------------------------------------------------------------------------------

#: label -> (method, params, statistics kinds) of a timed case
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "average": ("average", {}, ()),
    "task_arithmetic": ("task_arithmetic", {"lam": 0.3}, ()),
    "ties": ("ties", {"lam": 1.0, "density": 0.2}, ()),
    "dare": ("dare", {"p": 0.2, "lam": 1.0, "mode": "ties"}, ()),
    "fisher": ("fisher", {}, ("fisher",)),
    "regmean": ("regmean", {"a": 0.9}, ("gram",)),
    "regmean-f32": ("regmean", {"a": 0.9, "solve_dtype": "float32"}, ("gram",)),
    "mats-gram": ("mats", {"subspace": "gram", "lam_init": 0.3}, ("gram",)),
    "mats-kfac": ("mats", {"subspace": "kfac", "lam_init": 0.3}, ("kfac_in", "kfac_out")),
    "mlerp": ("mlerp", {}, ()),
    "slerp": ("slerp", {"t": 0.5}, ()),
    "knots": ("knots", {}, ()),
    "cart": ("cart", {}, ()),
}
#: what the CLI times by default: the paper's methods (MaTS in the subspace its count describes) and
#: MLERP; MaTS K-FAC (minutes on a CPU), KnOTS and CART (SVDs), RegMean in float32 on request
DEFAULT_MEASURE = ["average", "task_arithmetic", "dare", "ties", "fisher", "regmean", "mats-gram", "mlerp"]
STAT_KINDS = ("fisher", "gram", "kfac_in", "kfac_out")


def paper_ms(label: str) -> Optional[float]:
    """The paper's Table 4 time of the method a case label times (``None``: not in Table 4)."""
    return PAPER_TABLE4_MS.get(CASES[label][0]) if label in CASES else None


def case_flops(label: str, d: int, k: int, M: int, N: int) -> tuple[Optional[int], str, str]:
    """``(multiply-adds or None, formula, source)`` of a case label (see :func:`flops`)."""
    method = CASES[label][0] if label in CASES else label
    if label == "mats-kfac":
        return mats_kfac_flops(d, k, M, N), KFAC_FORMULA, "this project's count (K-FAC operator), not the paper's"
    if method in FORMULAS:
        hp = {"N": N} if "N" in FORMULA_PARAMS.get(method, ()) else {}
        return flops(method, d, k, M, **hp), FORMULAS[method][0], "paper, Table 3 (as recorded)"
    if method in UNCONFIRMED:
        return None, UNCONFIRMED[method], "recorded incomplete, not confirmed: not evaluated"
    return None, "—", "no count recorded"


def spd(k: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """A random SPD matrix ``M M^T / r + 0.1 I`` (a Gram-like spectrum), generated cheaply."""
    m = torch.randn(k, rank, generator=g)
    out = m @ m.T / rank
    out.diagonal().add_(0.1)
    return out


def make_inputs(M: int, out_f: int, in_f: int, seed: int = 0, kinds=STAT_KINDS):
    """A base weight ``w`` (``out_f x in_f``), ``M`` task weights near it, and per task the
    statistics ``kinds`` of the right shapes (drawn in the order of :data:`STAT_KINDS`)."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(out_f, in_f, generator=g) * 0.02}
    tasks = [{"w": base["w"] + 1e-3 * torch.randn(out_f, in_f, generator=g)} for _ in range(M)]
    make = {"fisher": lambda: torch.rand(out_f, in_f, generator=g) * 1e-6, "gram": lambda: spd(in_f, 256, g),
            "kfac_in": lambda: spd(in_f, 256, g), "kfac_out": lambda: spd(out_f, 256, g)}
    side = [{kind: make[kind]() for kind in STAT_KINDS if kind in kinds} for _ in range(M)]
    return base, tasks, side


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(label: str, base, tasks, side, device: torch.device, repeats: int, budget: float, iterations: int):
    """Time case ``label`` through :class:`~src.merge.MergeEngine`: the engine is opened before the
    clock starts; each repeat times ``engine.run(params)``; repeating stops after ``repeats`` runs
    or once the runs took more than ``budget`` seconds in all. Returns ``(params, seconds per run)``."""
    from ..merge import MergeEngine

    method, params, kinds = CASES[label]
    params = dict(params)
    if method == "mats":
        params["iterations"] = iterations
    statistics = [{kind: {"w": s[kind]} for kind in kinds} for s in side] if kinds else None
    engine = MergeEngine(method, tasks, base=base, device=device, progress=False, statistics=statistics)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = engine.run(params)
        sync(device)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(result.tensors["w"]).all()
        if sum(times) > budget:
            break
    return params, times


def measure(labels, out_f: int, in_f: int, M: int, device: torch.device, repeats: int, budget: float,
            iterations: int, seed: int = 0, log=None) -> dict[str, dict[str, Any]]:
    """Time every case of ``labels`` on one layer ``out_f x in_f`` of ``M`` models (inputs made once).
    A method that merges a fixed number of models other than ``M`` (SLERP: 2) is skipped with the reason."""
    from ..merge import get_method

    kinds = {k for label in labels for k in CASES[label][2]}
    base, tasks, side = make_inputs(M, out_f, in_f, seed, kinds)
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        method = CASES[label][0]
        fixed = type(get_method(method)).num_tasks
        if fixed is not None and fixed != M:
            out[label] = {"skipped": f"merges exactly {fixed} models (M = {M})"}
            continue
        params, times = time_case(label, base, tasks, side, device, repeats, budget, iterations)
        ms = [1e3 * t for t in times]
        out[label] = {"params": params, "times_ms": ms, "median_ms": stats_mod.median(ms), "runs": len(ms)}
        if log is not None:
            print(f"  {label} ({out_f}x{in_f}, M={M}): {out[label]['median_ms']:,.1f} ms (median of {len(ms)})",
                  file=log, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Prerequisites: derived from the registry, the evaluation stage and the permutation stage
# --------------------------------------------------------------------------------------------

#: does a statistics kind need labels? (src/statistics/collect.py: ``fisher`` squares gradients of the
#: gold label's log-likelihood, ``kfac_out`` is the covariance of the NLL's output gradients; ``gram``
#: and ``kfac_in`` are input covariances)
KIND_NEEDS_LABELS = {"fisher": True, "gram": False, "kfac_in": False, "kfac_out": True}


@dataclass(frozen=True)
class Prerequisite:
    """What one method needs besides the task models."""

    method: str
    #: ``merge`` (src/merge registry), ``evaluate`` (coefficients learned by the evaluation stage),
    #: ``permute`` (models from different initializations, src/permute)
    stage: str
    needs_base: bool
    #: as the registry describes it: ``yes``, ``yes (LoRA-only: no)``, ``no``
    base: str
    #: statistics kinds a merge with the default hyperparameters needs (``activations``: src/permute's)
    statistics: tuple[str, ...]
    #: further kinds the method may read instead, by hyperparameter (MaTS' subspaces)
    statistics_alternatives: tuple[str, ...]
    #: data without labels the method needs, or ``None``
    unlabeled_data: Optional[str]
    #: labelled training data the method needs, or ``None``
    labeled_data: Optional[str]
    #: where this row is derived from
    source: str
    note: str = ""


def _statistics_split() -> str:
    from ..statistics.collect import collect_statistics

    return inspect.signature(collect_statistics).parameters["split"].default


def _registry_rows(split: str) -> list[Prerequisite]:
    from ..merge.registry import describe, list_methods

    rows = []
    for name, cls in list_methods().items():
        method = cls()
        kinds = tuple(method.required_statistics(method.make_params()))
        alternatives = tuple(k for k in cls.requires if k not in kinds)
        plain = [k for k in kinds if not KIND_NEEDS_LABELS[k]]
        labeled = [k for k in kinds if KIND_NEEDS_LABELS[k]]
        rows.append(Prerequisite(
            method=name, stage="merge", needs_base=bool(cls.needs_base), base=describe(cls)["needs_base"],
            statistics=kinds, statistics_alternatives=alternatives,
            unlabeled_data=f"{split} inputs of each task ({', '.join(plain)})" if plain else None,
            labeled_data=f"{split} examples of each task with gold labels ({', '.join(labeled)})" if labeled else None,
            source=f"registry: {cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__} needs_base / requires / "
                   "required_statistics(defaults)",
            note=f"exactly {cls.num_tasks} models" if cls.num_tasks else ""))
    return rows


def _evaluation_rows(registry: dict[str, Prerequisite]) -> list[Prerequisite]:
    from ..evaluate.adamerging import KINDS, LABELS

    rows = []
    for kind, label in LABELS.items():
        merge_method = KINDS[kind][0]
        r = registry[merge_method]
        rows.append(Prerequisite(
            method=label, stage="evaluate", needs_base=r.needs_base, base=r.base, statistics=r.statistics,
            statistics_alternatives=(), unlabeled_data="inputs of every task, no labels (the evaluation passes its "
                                                       "test loaders); classification tasks with their heads",
            labeled_data=r.labeled_data, source=f"src/evaluate/adamerging.py KINDS[{kind!r}]: learns a "
                                                f"coefficient table re-applied by {merge_method}",
            note="coefficients fitted by entropy minimization on the inputs it is scored on (transductive)"))
    return rows


def _permutation_rows() -> list[Prerequisite]:
    from ..permute.run import METHODS, PermuteConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PermuteConfig) if f.default is not dataclasses.MISSING}
    rows = []
    for name, opts in METHODS.items():
        if name == "average":  # the same plain average as the registry's
            continue
        alpha = opts.get("alpha")
        searched = alpha == "search" and defaults["alpha"] is None
        activations = alpha == "search" or (alpha is not None and alpha < 1.0)
        unlabeled = []
        if activations:
            unlabeled.append("train inputs of each task (activation statistics)")
        if defaults["reset_bn"]:
            unlabeled.append("train inputs (BatchNorm reset, networks with BatchNorm)")
        rows.append(Prerequisite(
            method=name, stage="permute", needs_base=False, base="no (different initializations: no base)",
            statistics=("activations",) if activations else (), statistics_alternatives=(),
            unlabeled_data="; ".join(unlabeled) or None,
            labeled_data=("held-out train examples of each task with labels (alpha searched by accuracy)"
                          if searched else None),
            source=f"src/permute/run.py METHODS[{name!r}] = {opts} and PermuteConfig defaults",
            note=f"solver {opts['solver']}, alpha {alpha}"))
    return rows


def prerequisites() -> dict[str, Prerequisite]:
    """Every method of the toolkit: the merge registry, the evaluation stage's learned coefficients
    (AdaMerging, AdaMerging++, CART++) and the permutation methods, derived from the code."""
    registry = {r.method: r for r in _registry_rows(_statistics_split())}
    rows = list(registry.values()) + _evaluation_rows(registry) + _permutation_rows()
    return {r.method: r for r in rows}


class _LazyTable(Mapping):
    """:func:`prerequisites`, computed on first use (it imports the evaluation stage: Lightning)."""

    def __init__(self):
        self._rows: Optional[dict[str, Prerequisite]] = None

    def _table(self) -> dict[str, Prerequisite]:
        if self._rows is None:
            self._rows = prerequisites()
        return self._rows

    def __getitem__(self, key: str) -> Prerequisite:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: method name -> :class:`Prerequisite`, for every method of the toolkit (computed on first use)
PREREQUISITES: Mapping[str, Prerequisite] = _LazyTable()


# --------------------------------------------------------------------------------------------
# cost.md
# --------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int]:
    """``"5120x2048"`` -> ``(5120, 2048)`` = (out_features, in_features)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        out_f, in_f = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be OUTxIN (e.g. 5120x2048), got {text!r}") from None
    if out_f < 1 or in_f < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return out_f, in_f


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def table_rows(measured: dict[str, dict[str, Any]]) -> list[str]:
    """Case labels of the cost table: one per registry method (its first case, or the method name
    when no case times it), plus every further case that was measured."""
    from ..merge.registry import list_methods

    rows = [name if name in CASES else next((lb for lb, c in CASES.items() if c[0] == name), name)
            for name in list_methods()]
    rows += [lb for lb in measured if lb not in rows]
    order = list(FORMULAS) + list(UNCONFIRMED)
    order += [m for m in list_methods() if m not in order]
    return sorted(rows, key=lambda lb: (order.index(CASES[lb][0] if lb in CASES else lb), lb))


def is_paper_layer(out_f: int, in_f: int, M: int) -> bool:
    """Table 4's layer (5120 x 2048 in either orientation, M = 5): its times are shown beside only it."""
    return sorted((out_f, in_f)) == sorted(PAPER_SHAPE) and M == PAPER_MODELS


def _fmt_ms(x: Optional[float]) -> str:
    return "" if x is None else f"{x:,.1f}"


def cost_rows(out_f: int, in_f: int, M: int, N: int, measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    d, k = in_f, out_f
    rows = []
    for label in table_rows(measured):
        method = CASES[label][0] if label in CASES else label
        value, formula, source = case_flops(label, d, k, M, N)
        m = measured.get(label)
        rows.append({"label": label, "method": method, "formula": formula, "flops": value, "flops_source": source,
                     "params": (m or {}).get("params", dict(CASES[label][1]) if label in CASES else {}),
                     "median_ms": (m or {}).get("median_ms"), "runs": (m or {}).get("runs", 0),
                     "times_ms": (m or {}).get("times_ms", []), "skipped": (m or {}).get("skipped"),
                     "paper_ms": (paper_ms(label) if label in CASES else PAPER_TABLE4_MS.get(method))
                     if is_paper_layer(out_f, in_f, M) else None})
    return rows


#: the files the command writes and how each begins (only an earlier file of ours is replaced)
OUTPUTS = {"cost.md": "# Merge cost per layer", "cost.json": '{\n  "source": '}


def render(results: list[dict[str, Any]], prereq: Mapping[str, Prerequisite], settings: dict[str, Any]) -> str:
    lines = ["# Merge cost per layer", "",
             f"FLOP counts (multiply-adds) and the paper's times: {PAPER}, Table 3 and Table 4, **as recorded in this "
             "project's notes; not checked against the paper text** (its appendix was not found in the searched "
             "stores; `src/analysis/cost.py` says what is and is not confirmed). The paper's times were measured on "
             "its GPU.", ""]
    if settings["measure"]:
        lines += [f"Measured here: {settings['where']}, torch {torch.__version__}; one layer in memory, merged by "
                  "`MergeEngine.run` as in `benchmarks/bench_data_methods.py`; median of up to "
                  f"{settings['repeats']} runs, a method stops repeating after {settings['budget']:g} s.", ""]
    else:
        lines += ["Not measured (`--measure false`).", ""]
    for res in results:
        out_f, in_f, M, N = res["out"], res["in"], res["M"], res["N"]
        lines += [f"## Layer {out_f} x {in_f} (out x in: d = {in_f}, k = {out_f}), M = {M}, N = {N} CG iterations", "",
                  "| method | timed case | FLOPs formula | multiply-adds | GMAC | measured (ms, median) | runs | "
                  "paper Table 4, GPU (ms; its layer only) |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            hp = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "defaults"
            case = f"{r['label']} ({hp})" if r["label"] in CASES else "no timing case"
            formula = r["formula"] if r["flops_source"].startswith("paper") else f"{r['formula']} ({r['flops_source']})"
            value = "" if r["flops"] is None else f"{r['flops']:,}"
            gmac = "" if r["flops"] is None else f"{r['flops'] / 1e9:,.2f}"
            if r["skipped"]:
                ms = f"skipped: {r['skipped']}"
            elif r["median_ms"] is None:
                ms = "not measured"
            else:
                ms = _fmt_ms(r["median_ms"])
            lines.append(f"| `{r['method']}` | {case} | {formula} | {value} | {gmac} | {ms} | {r['runs'] or ''} | "
                         f"{_fmt_ms(r['paper_ms'])} |")
        lines.append("")
    lines += ["Table 4 does not say which MaTS subspace or number of iterations its 4,280 ms used; its shape's "
              "orientation (wi or wo) is not stated either (see the module docstring).", "",
              "## What each method needs", "",
              "Derived from the code: the merge registry (`needs_base`, `requires`, the statistics the default "
              "hyperparameters need), the evaluation stage's learned coefficients (`src/evaluate/adamerging.py`) "
              "and the permutation methods (`src/permute/run.py`). Statistics are computed once per task model "
              "(`python -m src.statistics`); `fisher` and `kfac_out` need gold labels, `gram` and `kfac_in` only "
              "inputs. Every method with hyperparameters is also selected on validation data by the evaluation "
              "protocols (not listed).", "",
              "| method | stage | base model | data statistics | unlabeled data | labeled training data | note |",
              "|---|---|---|---|---|---|---|"]
    for p in prereq.values():
        stats = ", ".join(p.statistics) or "—"
        if p.statistics_alternatives:
            stats += f" (or, by hyperparameter: {', '.join(p.statistics_alternatives)})"
        lines.append(f"| `{p.method}` | {p.stage} | {p.base} | {stats} | {p.unlabeled_data or '—'} | "
                     f"{p.labeled_data or '—'} | {p.note or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.analysis.cost", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[PAPER_SHAPE],
                   help="layer shapes OUTxIN (torch weight shape; d = IN, k = OUT); default the paper's 5120x2048")
    p.add_argument("--models", nargs="+", type=int, default=[PAPER_MODELS], help="numbers of models M (default 5)")
    p.add_argument("--measure", type=parse_bool, nargs="?", const=True, default=True,
                   help="time the merges (default true); false: FLOPs and prerequisites only")
    p.add_argument("--device", default="cpu", help="device of the timed merges (cpu, cuda, cuda:1)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_MEASURE, choices=list(CASES), metavar="CASE",
                   help=f"cases to time (default: {' '.join(DEFAULT_MEASURE)}; all: {' '.join(CASES)})")
    p.add_argument("--iterations", type=int, default=50, help="MaTS CG iterations N (counted and timed; default 50)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--budget", type=float, default=10.0, help="stop repeating a method after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--output", type=Path, required=True, help="directory for cost.md and cost.json")
    args = p.parse_args(argv)

    try:
        if any(m < 1 for m in args.models):
            raise ValueError(f"--models must be >= 1, got {args.models}")
        if args.iterations < 0 or args.repeats < 1 or not args.budget >= 0:
            raise ValueError("--iterations must be >= 0, --repeats >= 1 and --budget >= 0")
        if args.output.exists() and not args.output.is_dir():
            raise ValueError(f"{args.output}: exists and is not a directory")
        for name, signature in OUTPUTS.items():  # a file of the user's there is never replaced
            check_own_file(args.output / name, signature)
        device = torch.device(args.device)
        if args.measure and device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available")
    except (ValueError, RuntimeError) as e:  # OutputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    results = []
    for out_f, in_f in args.shapes:
        for M in args.models:
            measured = {}
            if args.measure:
                measured = measure(args.methods, out_f, in_f, M, device, args.repeats, args.budget, args.iterations,
                                   args.seed, log=sys.stderr)
            results.append({"out": out_f, "in": in_f, "d": in_f, "k": out_f, "M": M, "N": args.iterations,
                            "rows": cost_rows(out_f, in_f, M, args.iterations, measured)})
    prereq = dict(PREREQUISITES)
    settings = {"measure": args.measure, "where": where, "repeats": args.repeats, "budget": args.budget,
                "device": str(device), "seed": args.seed}
    args.output.mkdir(parents=True, exist_ok=True)
    replace_own_file(args.output / "cost.md", render(results, prereq, settings), OUTPUTS["cost.md"])
    payload = {"source": PAPER, "settings": {**settings, "torch": torch.__version__}, "layers": results,
               "prerequisites": [dataclasses.asdict(p) for p in prereq.values()]}
    replace_own_file(args.output / "cost.json", json.dumps(payload, indent=2) + "\n", OUTPUTS["cost.json"])
    print(f"wrote {args.output / 'cost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
