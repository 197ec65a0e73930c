"""Rank sweeps: accuracy against the rank a merge keeps (CART) and against the LoRA rank (KnOTS).

Two analyses, each run through the evaluation stage (:class:`src.evaluate.EvaluationRun`: one
:class:`~src.evaluate.MethodSpec` per point, every grid point merged in memory, rows appended to one
rows file, finished rows skipped on a re-run), then rendered from the rows alone into
``rank_sweeps.md`` (tables) and ``rank_sweeps.png`` (accuracy against rank, one line per variant).

**CART** (Choi et al., arXiv:2412.12153, Fig. 1, 2 and 5): the merge of the config's ``tasks`` at
each retained rank ``k`` of the task updates, given as fractions of ``min(O, I)`` (``rank_ratios``,
default 0.01 .. 1.0) or as absolute ranks (``ranks``), for the variants (the ``cart`` method's
``center`` / ``order`` options, ``src/merge/methods/cart.py``):

* ``centered`` — CART: ``W_avg + lam * sum_i LR_k(W_i - W_avg)``, the top ``k`` directions;
* ``uncentered`` — plain task vectors: ``W0 + lam * sum_i LR_k(dW_i)`` (TA with rank-``k`` task
  vectors; full rank = task arithmetic);
* ``centered_bottom`` — CART's reverse order: the ``k`` smallest singular directions of the
  centred vectors (Fig. 5);
* ``uncentered_bottom`` — the same for the plain task vectors.

``lam`` is **selected on validation per point** (the run's ``select_on`` score: mean normalized,
or absolute, accuracy over the tasks) over a grid: by default CART's (0.5 .. 3.0, the ``cart``
protocol) for the centred variants and task arithmetic's (0.1 .. 1.0) for the uncentred ones, since
the two scale differently (centred vectors sum to zero). ``lam`` may instead be a number (held
fixed at every point, no selection), one grid for every variant, or ``{variant: number or grid}``.
Full-rank centred CART is the average whatever ``lam``; ``k = 0`` gives the average (centred) or
the base model (uncentred). The run also evaluates ``average`` (a reference line). With two tasks
the centred vectors are ``+-`` the same matrix, so centred CART *is* the average at every rank.

**KnOTS** (Stoica et al., arXiv:2410.19735, Fig. 4 and Sec. 5.4): KnOTS-TIES against TIES at each
LoRA rank, every rank a separate set of task models (``lora_tasks``: ``{rank: [task dirs]}``,
the paper's ranks 4, 16, 64, 256, 768), and KnOTS' row- against column-wise concatenation
(``knots_concat``, the method's ``concat``). Hyperparameters are selected on validation with the
``knots_protocol`` grids (default ``knots``: lambda, then top-k), for every rank separately;
``knots_fixed`` / ``knots_stages`` override the fixed values / the stages of both methods.

Rows: one rows file (``<out>/rows.jsonl``; ``out`` defaults to ``rank_sweeps/`` next to the config's
``rows``, so the main evaluation's rows and ``timing.json`` are left alone) for both analyses, experiment names
``<experiment>/cart_rank`` and ``<experiment>/lora_r<rank>`` (rows of different LoRA ranks have the
same task names and must not share a key; every experiment has its own finetuned / zero-shot
reference rows). The report reads only the rows: the variant and the rank of a CART point come
from its ``params`` (``center``, ``order``, ``rank`` or ``rank_ratio``), a KnOTS line from
``method`` and ``params`` (``concat``, ``base_method``), the LoRA rank from the experiment name.
Numbers are test values of the point selected on validation (``stage: selected``); when the
rows hold two selected points for one cell (e.g. runs with different lambda grids), the later
written wins.

LoRA task models: every update of a rank-``r`` adapter lies in an ``n r``-dimensional span, so CART
ranks above ``n r`` all give the full-rank merge, and the bottom ``k`` directions are exactly zero
until ``k > min(O, I) - n r``; the CART figures are about full finetunes.

Command line::

    python -m src.analysis.rank_sweeps --config configs/evaluate/<x>.yaml \\
        [--rank_ratios '[0.01, 0.04, 0.12, 1.0]' | --ranks '[1, 4, 16]'] [--variants '[centered, uncentered]'] \\
        [--lam 1.0 | --lam '[0.5, 1.0]' | --lam '{centered: [1, 2], uncentered: 0.3}'] \\
        [--lora_tasks '{4: [r4/a, r4/b], 16: [r16/a, r16/b]}'] [--knots_concat '[column, row]'] \\
        [--knots_protocol quick] [--sweeps '[cart, knots]'] [--out DIR] [--report_only true] \\
        [any EvalConfig field, as for python -m src.evaluate; its methods are not used]
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

#: what the sweeps write and read
SWEEPS = ("cart", "knots")


class Variant(NamedTuple):
    center: bool
    order: str
    label: str


VARIANTS: dict[str, Variant] = {
    "centered": Variant(True, "top", "CART (centred, top-k)"),
    "uncentered": Variant(False, "top", "Task vectors (uncentred, top-k)"),
    "centered_bottom": Variant(True, "bottom", "CART reverse (centred, bottom-k)"),
    "uncentered_bottom": Variant(False, "bottom", "Task vectors reverse (uncentred, bottom-k)"),
}
DEFAULT_VARIANTS = ("centered", "uncentered", "centered_bottom")
#: fractions of min(O, I) (the CART paper's figures run from ~1 % to full rank; ~8 % is its optimum)
DEFAULT_RANK_RATIOS = (0.01, 0.02, 0.04, 0.08, 0.12, 0.25, 0.5, 1.0)
#: lambda grids per variant when none is given: CART's (protocol ``cart``) and task arithmetic's
CART_LAMS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
TA_LAMS = tuple(round(0.1 * i, 1) for i in range(1, 11))
DEFAULT_LAMS = {"centered": CART_LAMS, "centered_bottom": CART_LAMS, "uncentered": TA_LAMS, "uncentered_bottom": TA_LAMS}
#: the KnOTS paper's LoRA ranks (Fig. 4)
KNOTS_LORA_RANKS = (4, 16, 64, 256, 768)
CONCATS = ("column", "row")
KNOTS_BASE_NAMES = {"ta": "TA", "ties": "TIES", "dare_ties": "DARE-TIES"}
#: a task's metric when its rows hold several (the first present wins)
PRIMARY_METRICS = ("acc@union", "acc", "em_f1", "sp_rouge")
MISSING = "–"
CART_SUFFIX = "/cart_rank"
LORA_SUFFIX = re.compile(r"/lora_r(\d+)$")
AXIS_TITLES = {"rank_ratio": "rank ratio (fraction of min(O, I))", "rank": "rank k"}

Lam = Union[float, list[float], dict[str, Union[float, list[float]]], None]


@dataclass
class RankSweepConfig:
    """What the sweeps evaluate (the rest, tasks included, is the :class:`EvalConfig`).

    Args:
        sweeps: ``cart`` and / or ``knots`` (default: each one whose inputs are given: ``cart``
            when the config has ``tasks``, ``knots`` when ``lora_tasks`` is given).
        rank_ratios: CART points as fractions of ``min(O, I)`` (``k = max(1, int(r * min(O, I)))``,
            ``0``: ``k = 0``).
        ranks: CART points as absolute ranks (replaces ``rank_ratios`` when given).
        variants: CART variants (keys of ``VARIANTS``).
        lam: CART's lambda: ``None`` (each variant's default grid, selected on validation per
            point), a number (fixed), a list (one grid for every variant) or ``{variant: number or
            list}`` (the other variants keep their defaults).
        low_rank_params: CART's ``low_rank_params`` (regex of the tensors that get the low-rank
            step; default every 2-D tensor).
        cart_average: also evaluate ``average`` in the CART experiment (the reference line).
        lora_tasks: ``{LoRA rank: [task dirs]}`` for the KnOTS sweep (same tasks at every rank).
        knots_concat: KnOTS concatenations evaluated (``column``, ``row``).
        knots_protocol: grids for TIES and KnOTS-TIES (``knots``, ``quick``; ``None``: no search,
            the methods' defaults with ``knots_fixed``).
        knots_fixed: hyperparameters fixed for both (added to the protocol's fixed values).
        knots_stages: the search of both, replacing the protocol's (``[]``: none).
    """

    sweeps: Optional[list[str]] = None
    rank_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RANK_RATIOS))
    ranks: Optional[list[int]] = None
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    lam: Lam = None
    low_rank_params: Optional[str] = None
    cart_average: bool = True
    lora_tasks: dict[int, list[str]] = field(default_factory=dict)
    knots_concat: list[str] = field(default_factory=lambda: list(CONCATS))
    knots_protocol: Optional[str] = "knots"
    knots_fixed: Optional[dict[str, Any]] = None
    knots_stages: Optional[list[dict[str, list]]] = None

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants {unknown or '[]'}: choose among {list(VARIANTS)}")
        if self.ranks is not None:
            if not self.ranks or any(isinstance(k, bool) or int(k) != k or k < 0 for k in self.ranks):
                raise ValueError(f"ranks must be non-negative integers, got {self.ranks}")
            self.ranks = [int(k) for k in self.ranks]
        elif not self.rank_ratios or any(not 0.0 <= float(r) <= 1.0 for r in self.rank_ratios):
            raise ValueError(f"rank_ratios must be fractions in [0, 1], got {self.rank_ratios}")
        bad = [c for c in self.knots_concat if c not in CONCATS]
        if bad:
            raise ValueError(f"knots_concat {bad}: choose among {list(CONCATS)}")
        if any(int(r) < 1 for r in self.lora_tasks):
            raise ValueError(f"lora_tasks: LoRA ranks must be positive, got {sorted(self.lora_tasks)}")
        self.lora_tasks = {int(r): [str(d) for d in dirs] for r, dirs in self.lora_tasks.items()}
        if self.sweeps is not None:
            bad = [s for s in self.sweeps if s not in SWEEPS]
            if bad:
                raise ValueError(f"sweeps {bad}: choose among {list(SWEEPS)}")
        for variant in self.variants:
            lam_of(variant, self.lam)  # refuse a bad lam before any work


def lam_of(variant: str, lam: Lam) -> Union[float, list[float]]:
    """The lambda of ``variant``: a number (fixed) or a grid (selected on validation)."""
    if isinstance(lam, Mapping):
        unknown = [k for k in lam if k not in VARIANTS]
        if unknown:
            raise ValueError(f"lam: unknown variant(s) {unknown}; variants are {list(VARIANTS)}")
        lam = lam.get(variant)
    if lam is None:
        return list(DEFAULT_LAMS[variant])
    if isinstance(lam, (list, tuple)):
        if not lam:
            raise ValueError(f"lam for {variant}: an empty grid")
        return [float(x) for x in lam]
    return float(lam)


# ----------------------------------------------------------------------------- method specs


def _point_fixed(axis: str, x: Union[int, float]) -> dict[str, Any]:
    return {"rank": int(x)} if axis == "rank" else {"rank_ratio": float(x), "rank": None}


def _point_text(axis: str, x: Union[int, float]) -> str:
    return f"rank {x}" if axis == "rank" else f"rank ratio {x:g}"


def cart_points(sweep: RankSweepConfig) -> tuple[str, list]:
    """``(axis, points)``: ``("rank", [k, ...])`` or ``("rank_ratio", [r, ...])``."""
    if sweep.ranks is not None:
        return "rank", list(sweep.ranks)
    return "rank_ratio", [float(r) for r in sweep.rank_ratios]


def cart_method_specs(sweep: RankSweepConfig) -> list:
    """One ``cart`` MethodSpec per (variant, point): ``fixed`` sets the rank, ``center``,
    ``order`` (and ``lam`` when fixed); ``stages`` searches lambda on validation (or nothing)."""
    from ..evaluate.run import MethodSpec

    axis, points = cart_points(sweep)
    specs = [MethodSpec("average", label="Average", stages=[])] if sweep.cart_average else []
    for name in sweep.variants:
        v = VARIANTS[name]
        lam = lam_of(name, sweep.lam)
        for x in points:
            fixed = {"center": v.center, "order": v.order, **_point_fixed(axis, x)}
            if sweep.low_rank_params is not None:
                fixed["low_rank_params"] = sweep.low_rank_params
            if isinstance(lam, list):
                stages = [{"lam": list(lam)}]
            else:
                fixed["lam"], stages = lam, []
            specs.append(MethodSpec("cart", label=f"{v.label}, {_point_text(axis, x)}", fixed=fixed, stages=stages))
    return specs


def knots_method_specs(sweep: RankSweepConfig) -> list:
    """TIES and KnOTS-TIES (one per concatenation), searched with ``knots_protocol``'s grids
    (``knots_fixed`` added to the fixed values, ``knots_stages`` replacing the stages)."""
    from ..evaluate.protocols import search_for
    from ..evaluate.run import MethodSpec

    extra = dict(sweep.knots_fixed or {})
    specs = []
    ties = search_for("ties", sweep.knots_protocol)
    specs.append(MethodSpec("ties", label="TIES", fixed={**ties["fixed"], **extra},
                            stages=ties["stages"] if sweep.knots_stages is None else [dict(s) for s in sweep.knots_stages]))
    knots = search_for("knots", sweep.knots_protocol)
    for concat in sweep.knots_concat:
        fixed = {**knots["fixed"], **extra, "base_method": "ties", "concat": concat}
        stages = knots["stages"] if sweep.knots_stages is None else [dict(s) for s in sweep.knots_stages]
        specs.append(MethodSpec("knots", label=f"KnOTS-TIES ({concat})", fixed=fixed, stages=stages))
    return specs


def cart_experiment(experiment: str) -> str:
    return f"{experiment}{CART_SUFFIX}"


def lora_experiment(experiment: str, rank: int) -> str:
    return f"{experiment}/lora_r{int(rank)}"


def sweep_rows_path(base, out=None) -> Path:
    """``<out>/rows.jsonl``; ``out`` defaults to ``rank_sweeps/`` next to the config's rows file (a
    file of its own: the main evaluation's ``timing.json`` next to its rows is left alone)."""
    return Path(out or default_out(base)) / "rows.jsonl"


def default_out(base) -> Path:
    return Path(str(base.rows).replace("{experiment}", base.experiment)).parent / "rank_sweeps"


def _run_config(base, experiment: str, tasks: Sequence[str], methods: list, rows: Path, protocol: Optional[str]):
    """The base config with this sweep's experiment, tasks, methods and rows; no Ensemble, no joint
    benchmark, no generalization tasks, no per-run report (the sweep renders its own)."""
    return dataclasses.replace(base, experiment=experiment, tasks=[str(t) for t in tasks], generalization=[],
                               methods=methods, rows=str(rows), protocol=protocol, grid=None, only=None,
                               ensemble=False, grid_generalization=False,
                               joint=dataclasses.replace(base.joint, enabled=False), report=False)


def sweeps_to_run(base, sweep: RankSweepConfig) -> list[str]:
    if sweep.sweeps is None:
        return [s for s, given in (("cart", bool(base.tasks)), ("knots", bool(sweep.lora_tasks))) if given]
    if "cart" in sweep.sweeps and not base.tasks:
        raise ValueError("the cart sweep needs the config's tasks (--tasks)")
    if "knots" in sweep.sweeps and not sweep.lora_tasks:
        raise ValueError("the knots sweep needs --lora_tasks '{rank: [task dirs], ...}'")
    return [s for s in SWEEPS if s in sweep.sweeps]


# ----------------------------------------------------------------------------- aggregation (rows only)


def _latest(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per row key, the last written, in the order of those last occurrences."""
    from ..evaluate.rows import row_key

    out: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        key = row_key(r)
        out.pop(key, None)
        out[key] = r
    return list(out.values())


def _params_json(params: Optional[Mapping[str, Any]], drop: Sequence[str] = ()) -> str:
    return json.dumps({k: v for k, v in (params or {}).items() if k not in drop}, sort_keys=True, default=str)


def _primary(metrics: Mapping[str, Mapping[str, Any]], wanted: Optional[str]) -> Optional[Mapping[str, Any]]:
    if wanted:
        return metrics.get(wanted)
    for m in PRIMARY_METRICS:
        if m in metrics:
            return metrics[m]
    return next(iter(metrics.values())) if len(metrics) == 1 else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


class _Experiment:
    """The test rows of one experiment: selected points grouped by (method, params), references."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], metric: Optional[str]):
        self.metric = metric
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}  # (method, params json) -> group
        self.refs: dict[str, dict[str, dict[str, Mapping[str, Any]]]] = {}  # method -> task -> metric -> row
        self.lam_grids: dict[tuple[str, str], set] = {}  # (method, params json without lam) -> lams on the grid
        for r in rows:
            if r.get("value") is None or r.get("task") == "joint":
                continue
            method, stage = str(r.get("method")), r.get("stage")
            if stage == "grid" and r.get("split") == "val":
                lam = (r.get("params") or {}).get("lam")
                if lam is not None:
                    self.lam_grids.setdefault((method, _params_json(r.get("params"), ("lam",))), set()).add(lam)
                continue
            if r.get("split") != "test":
                continue
            if stage == "reference":
                self.refs.setdefault(method, {}).setdefault(r["task"], {})[r["metric"]] = r
            elif stage == "selected":
                key = (method, _params_json(r.get("params")))
                group = self.groups.pop(key, None) or {"method": method, "params": dict(r.get("params") or {}),
                                                       "label": r.get("label"), "tasks": list(r.get("tasks") or []),
                                                       "task": {}}
                group["task"].setdefault(r["task"], {})[r["metric"]] = r
                self.groups[key] = group  # re-inserted: groups end up ordered by their last row

    def finetuned(self, task: str, metric: str) -> Optional[float]:
        row = self.refs.get("finetuned", {}).get(task, {}).get(metric)
        return None if row is None else float(row["value"])

    def point(self, tasks: Sequence[str], per_task: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
        """Per-task values (fractions), their normalized values, and both means over ``tasks``
        (``None`` unless every task has its number)."""
        values: dict[str, Optional[float]] = {}
        normalized: dict[str, Optional[float]] = {}
        for t in tasks:
            row = _primary(per_task.get(t, {}), self.metric)
            if row is None:
                values[t] = normalized[t] = None
                continue
            values[t] = float(row["value"])
            ref = row.get("finetuned")
            if ref is None:
                ref = self.finetuned(t, row["metric"])
            normalized[t] = values[t] / float(ref) if ref else None
        return {"values": values, "normalized": normalized, "mean": _mean(list(values.values())),
                "normalized_mean": _mean(list(normalized.values()))}

    def references(self, tasks: Sequence[str], methods: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """``{name: point}`` of the reference methods present (``(method, name)``); a merge method
        among them (``average``) is read from its selected rows."""
        out = {}
        for method, name in methods:
            if method in self.refs:
                out[name] = self.point(tasks, self.refs[method])
                continue
            groups = [g for (m, _), g in self.groups.items() if m == method]
            if groups:
                out[name] = self.point(tasks, groups[-1]["task"])
        return out


def _variant_of(params: Mapping[str, Any]) -> Optional[str]:
    center, order = params.get("center", True), params.get("order", "top")
    return next((name for name, v in VARIANTS.items() if (v.center, v.order) == (bool(center), order)), None)


def _axis_of(params: Mapping[str, Any]) -> tuple[str, Union[int, float]]:
    if params.get("rank") is not None:
        return "rank", int(params["rank"])
    return "rank_ratio", float(params.get("rank_ratio", 0.12))


def aggregate(rows: Iterable[Mapping[str, Any]], experiment: str, metric: Optional[str] = None) -> dict[str, Any]:
    """Both sweeps' numbers from ``rows`` alone (fractions, not percent).

    Returns ``{"experiment", "cart": None | {"experiment", "tasks", "axes": {axis: {"points": [x...],
    "variants": {name: {x: point}}}}, "references": {name: point}, "select_on"}, "knots": None |
    {"ranks": [...], "lines": [...], "tasks", "points": {line: {rank: point}}, "references": {rank: {name:
    point}}}}``. A point: ``values`` / ``normalized`` per task, ``mean``, ``normalized_mean``,
    ``params`` (the selected hyperparameters), ``lam_grid`` (CART: the lambdas searched on
    validation for it; empty: lambda fixed).
    """
    rows = _latest(rows)
    by_experiment: dict[str, list] = {}
    for r in rows:
        by_experiment.setdefault(str(r.get("experiment")), []).append(r)
    result: dict[str, Any] = {"experiment": experiment, "cart": None, "knots": None}

    cart_rows = by_experiment.get(cart_experiment(experiment))
    if cart_rows:
        exp = _Experiment(cart_rows, metric)
        cart_groups = [g for (m, _), g in exp.groups.items() if m == "cart"]
        tasks = _task_order([g["tasks"] for g in cart_groups])
        axes: dict[str, dict[str, Any]] = {}
        select_on = set()
        for g in cart_groups:  # in the order of their last rows: a later selected point wins its cell
            variant = _variant_of(g["params"])
            if variant is None:
                continue
            axis, x = _axis_of(g["params"])
            point = exp.point(g["tasks"], g["task"])
            point["params"] = g["params"]
            point["tasks"] = g["tasks"]
            grid = exp.lam_grids.get(("cart", _params_json(g["params"], ("lam",))), set())
            point["lam_grid"] = sorted(grid)
            for per_metric in g["task"].values():
                for row in per_metric.values():
                    sel = row.get("selection") or {}
                    if sel.get("select_on"):
                        select_on.add(sel["select_on"])
            a = axes.setdefault(axis, {"points": [], "variants": {}})
            a["variants"].setdefault(variant, {})[x] = point
            if x not in a["points"]:
                a["points"].append(x)
        for a in axes.values():
            a["points"].sort()
            a["variants"] = {v: a["variants"][v] for v in VARIANTS if v in a["variants"]}
        refs = exp.references(tasks, (("finetuned", "Finetuned"), ("zeroshot", "Zero-shot"), ("average", "Average")))
        result["cart"] = {"experiment": cart_experiment(experiment), "tasks": tasks, "axes": axes,
                          "references": refs, "select_on": sorted(select_on)}

    lora = {}
    for name, exp_rows in by_experiment.items():
        m = LORA_SUFFIX.search(name)
        if m and name[:m.start()] == experiment:
            lora[int(m.group(1))] = _Experiment(exp_rows, metric)
    if lora:
        points: dict[str, dict[int, dict]] = {}
        references: dict[int, dict] = {}
        all_tasks = []
        for rank in sorted(lora):
            exp = lora[rank]
            tasks = _task_order([g["tasks"] for g in exp.groups.values()])
            all_tasks.append(tasks)
            for g in exp.groups.values():
                line = knots_line(g["method"], g["params"], g["label"])
                point = exp.point(g["tasks"], g["task"])
                point["params"] = g["params"]
                point["tasks"] = g["tasks"]
                points.setdefault(line, {})[rank] = point
            references[rank] = exp.references(tasks, (("finetuned", "Finetuned"), ("zeroshot", "Zero-shot")))
        result["knots"] = {"ranks": sorted(lora), "lines": sorted(points, key=_line_rank), "points": points,
                           "references": references, "tasks": _task_order(all_tasks)}
    return result


def _task_order(task_lists: Iterable[Sequence[str]]) -> list[str]:
    out: list[str] = []
    for ts in task_lists:
        for t in ts:
            if t not in out:
                out.append(t)
    return sorted(out)


def knots_line(method: str, params: Mapping[str, Any], label: Optional[str]) -> str:
    """A KnOTS-sweep line's name from what was merged: ``TIES``, ``KnOTS-TIES (column)``..."""
    if method == "ties":
        return "TIES"
    if method == "knots":
        base = KNOTS_BASE_NAMES.get(str(params.get("base_method", "ties")), str(params.get("base_method")))
        return f"KnOTS-{base} ({params.get('concat', 'column')})"
    return str(label or method)


def _line_rank(line: str) -> tuple:
    fixed = ["TIES", "KnOTS-TIES (column)", "KnOTS-TIES (row)"]
    return (fixed.index(line), "") if line in fixed else (len(fixed), line)


# ----------------------------------------------------------------------------- report


def _pct(v: Optional[float]) -> str:
    return MISSING if v is None else f"{100.0 * v:.1f}"


def _fmt_x(axis: str, x) -> str:
    return str(int(x)) if axis == "rank" else f"{x:g}"


def _fmt_param(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _references_line(refs: Mapping[str, Mapping[str, Any]]) -> str:
    parts = [f"{name} {_pct(p['mean'])} (normalized {_pct(p['normalized_mean'])})" for name, p in refs.items()]
    return "References (test, mean over the tasks, %): " + ("; ".join(parts) if parts else "none in the rows") + ".\n"


def _lam_note(variants: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> str:
    notes = []
    for v, pts in variants.items():
        grids = {tuple(p["lam_grid"]) for p in pts.values()}
        if grids == {()}:
            notes.append(f"{VARIANTS[v].label}: fixed")
        else:
            text = " / ".join("[" + ", ".join(_fmt_param(float(x)) for x in g) + "]" if g else "fixed" for g in sorted(grids))
            notes.append(f"{VARIANTS[v].label}: selected on validation per point over {text}")
    return "Lambda: " + "; ".join(notes) + ".\n"


def render_markdown(agg: Mapping[str, Any]) -> str:
    experiment = agg["experiment"]
    parts = [f"# {experiment}: rank sweeps\n",
             "Test accuracy (%) of the point selected on validation, rendered from the rows alone "
             "(`python -m src.analysis.rank_sweeps --report_only true`). `–`: a number missing from the rows "
             "(a mean only when every task has its number).\n"]
    cart = agg.get("cart")
    if cart:
        tasks = cart["tasks"]
        parts.append("## CART: accuracy against the retained rank\n")
        parts.append(f"Experiment `{cart['experiment']}`, tasks {', '.join(tasks)}. Variants: CART "
                     "`W_avg + lam * sum_i LR_k(W_i - W_avg)` (centred) against plain task vectors "
                     "`W0 + lam * sum_i LR_k(dW_i)` (uncentred), top-k or bottom-k (reverse order) singular "
                     "directions. Selection score: "
                     f"{', '.join(cart['select_on']) or 'none (fixed)'} accuracy averaged over the tasks.\n")
        parts.append(_references_line(cart["references"]))
        for axis, a in cart["axes"].items():
            xs = a["points"]
            head = [AXIS_TITLES[axis].split(" (")[0]] + [_fmt_x(axis, x) for x in xs]
            parts.append(f"### Mean test accuracy (%) against the {AXIS_TITLES[axis]}\n")
            parts.append(_table(["variant"] + head[1:], [[VARIANTS[v].label] + [_pct(pts.get(x, {}).get("mean")) for x in xs]
                                                          for v, pts in a["variants"].items()]))
            parts.append(f"### Mean normalized accuracy (%) against the {AXIS_TITLES[axis]}\n")
            parts.append(_table(["variant"] + head[1:],
                                [[VARIANTS[v].label] + [_pct(pts.get(x, {}).get("normalized_mean")) for x in xs]
                                 for v, pts in a["variants"].items()]))
            parts.append(f"### Selected lambda against the {AXIS_TITLES[axis]}\n")
            parts.append(_lam_note(a["variants"]))
            parts.append(_table(["variant"] + head[1:],
                                [[VARIANTS[v].label] + [_fmt_param(pts[x]["params"].get("lam")) if x in pts else MISSING
                                                        for x in xs] for v, pts in a["variants"].items()]))
            parts.append(f"### Per task, test accuracy (%) against the {AXIS_TITLES[axis]}\n")
            body = []
            for v, pts in a["variants"].items():
                for x in xs:
                    if x not in pts:
                        continue
                    p = pts[x]
                    body.append([VARIANTS[v].label, _fmt_x(axis, x), _fmt_param(p["params"].get("lam"))]
                                + [_pct(p["values"].get(t)) for t in tasks] + [_pct(p["mean"]), _pct(p["normalized_mean"])])
            parts.append(_table(["variant", head[0], "lam", *tasks, "mean", "normalized"], body))
    knots = agg.get("knots")
    if knots:
        ranks = knots["ranks"]
        parts.append("## KnOTS: TIES and KnOTS-TIES against the LoRA rank\n")
        parts.append(f"Experiments `{experiment}/lora_r<rank>` (a set of task models per LoRA rank), tasks "
                     f"{', '.join(knots['tasks'])}. Hyperparameters selected on validation at each rank. "
                     "`(column)` / `(row)`: KnOTS' column- / row-wise concatenation of the task updates.\n")
        head = ["method"] + [f"r = {r}" for r in ranks]
        parts.append("### Mean normalized accuracy (%) against the LoRA rank\n")
        parts.append(_table(head, [[line] + [_pct(knots["points"][line].get(r, {}).get("normalized_mean")) for r in ranks]
                                   for line in knots["lines"]]))
        parts.append("### Mean test accuracy (%) against the LoRA rank\n")
        ref_names = [n for n in ("Finetuned", "Zero-shot") if any(n in knots["references"][r] for r in ranks)]
        body = [[name] + [_pct(knots["references"][r].get(name, {}).get("mean")) for r in ranks] for name in ref_names]
        body += [[line] + [_pct(knots["points"][line].get(r, {}).get("mean")) for r in ranks] for line in knots["lines"]]
        parts.append(_table(head, body))
        parts.append("### Selected hyperparameters\n")
        parts.append(_table(head, [[line] + [_knots_params(knots["points"][line].get(r)) for r in ranks]
                                   for line in knots["lines"]]))
        parts.append("### Per task, test accuracy (%)\n")
        tasks = knots["tasks"]
        body = []
        for line in knots["lines"]:
            for r in ranks:
                p = knots["points"][line].get(r)
                if p is not None:
                    body.append([line, str(r)] + [_pct(p["values"].get(t)) for t in tasks]
                                + [_pct(p["mean"]), _pct(p["normalized_mean"])])
        parts.append(_table(["method", "LoRA rank", *tasks, "mean", "normalized"], body))
    if not cart and not knots:
        parts.append("No rank-sweep rows for this experiment.\n")
    return "\n".join(parts)


def _knots_params(point: Optional[Mapping[str, Any]]) -> str:
    if point is None:
        return MISSING
    p = point["params"]
    keys = ["lam", "density"] if p.get("base_method", "ties") != "dare_ties" else ["lam", "p", "seed"]
    return ", ".join(f"{k}={_fmt_param(p[k])}" for k in keys if k in p)


def plot_series(agg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The panels of ``rank_sweeps.png``: ``{"title", "xlabel", "ylabel", "xscale", "lines": {name:
    (xs, ys)}, "references": {name: y}}`` with y in percent (points without a mean are left out).
    CART panels plot the mean test accuracy (the CART paper's axis), the KnOTS panel the mean
    normalized accuracy (the KnOTS paper's)."""
    panels = []
    cart = agg.get("cart")
    if cart:
        for axis, a in cart["axes"].items():
            lines = {}
            for v, pts in a["variants"].items():
                xs = [x for x in a["points"] if x in pts and pts[x]["mean"] is not None]
                lines[VARIANTS[v].label] = (xs, [100.0 * pts[x]["mean"] for x in xs])
            refs = {name: 100.0 * p["mean"] for name, p in cart["references"].items() if p["mean"] is not None}
            positive = all(x > 0 for x in a["points"])
            panels.append({"title": "CART: accuracy against the retained rank", "xlabel": AXIS_TITLES[axis],
                           "ylabel": "mean test accuracy (%)", "xscale": "log" if positive else "linear",
                           "xticks": list(a["points"]), "lines": lines, "references": refs})
    knots = agg.get("knots")
    if knots:
        lines = {}
        for line in knots["lines"]:
            pts = knots["points"][line]
            xs = [r for r in knots["ranks"] if r in pts and pts[r]["normalized_mean"] is not None]
            lines[line] = (xs, [100.0 * pts[r]["normalized_mean"] for r in xs])
        panels.append({"title": "KnOTS: normalized accuracy against the LoRA rank", "xlabel": "LoRA rank",
                       "ylabel": "mean normalized accuracy (%)", "xscale": "log", "xticks": list(knots["ranks"]),
                       "lines": lines, "references": {}})
    return panels


def render_figure(agg: Mapping[str, Any]):
    """The figure of :func:`plot_series` (matplotlib, Agg canvas)."""
    from ..evaluate.report import _new_figure

    panels = plot_series(agg)
    fig = _new_figure(1, max(1, len(panels)), 5.4, 4.8)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for name, (xs, ys) in panel["lines"].items():
            ax.plot(xs, ys, marker="o", label=name)
        for i, (name, y) in enumerate(panel["references"].items()):
            ax.axhline(y, color="0.5", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=name)
        ax.set_xscale(panel["xscale"])
        ax.set_xticks(panel["xticks"])
        ax.set_xticklabels([f"{x:g}" for x in panel["xticks"]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if not panels:
        axes[0].text(0.5, 0.5, "no rank-sweep rows", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(f"{agg['experiment']}: rank sweeps")
    return fig


def write_report(agg: Mapping[str, Any], out) -> list[Path]:
    """``rank_sweeps.md`` and ``rank_sweeps.png`` in ``out`` (an existing ``rank_sweeps.md`` is
    replaced only when it is one of ours)."""
    from ..evaluate.report import _save_png
    from ..safe_output import replace_own_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "rank_sweeps.md"
    replace_own_file(md, render_markdown(agg), f"# {agg['experiment']}: rank sweeps")
    return [md, _save_png(render_figure(agg), out / "rank_sweeps.png")]


# ----------------------------------------------------------------------------- runner


@dataclass
class RankSweepResult:
    rows: Path
    aggregate: dict[str, Any]
    written: list[Path]


def rank_sweep_report(base, out=None, metric: Optional[str] = None, write: bool = True) -> RankSweepResult:
    """Aggregate (and render) from ``<out>/rows.jsonl`` alone."""
    from ..evaluate.rows import read_rows

    out = Path(out or default_out(base))
    path = sweep_rows_path(base, out)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows to report")
    agg = aggregate(rows, base.experiment, metric=None if metric in (None, "auto") else metric)
    if agg["cart"] is None and agg["knots"] is None:
        raise ValueError(f"{path}: no rows of experiment {cart_experiment(base.experiment)!r} nor "
                         f"{base.experiment + '/lora_r<rank>'!r}")
    return RankSweepResult(path, agg, write_report(agg, out) if write else [])


def run_rank_sweeps(base, sweep: RankSweepConfig, out=None, report: Optional[bool] = None) -> RankSweepResult:
    """Evaluate the sweeps through the evaluation stage, then render ``rank_sweeps.md`` / ``.png``.

    Args:
        base: the :class:`EvalConfig` (tasks of the CART sweep, data, devices, ``select_on``,
            ``grid_splits``, ``zeroshot``...; its ``methods`` are replaced by the sweep's).
        sweep: what to sweep (:class:`RankSweepConfig`).
        out: directory of ``rows.jsonl``, ``rank_sweeps.md`` and ``.png`` (default:
            ``rank_sweeps/`` next to the config's rows file).
        report: write the report (default: the config's ``report``).
    """
    from ..evaluate.run import EvaluationRun

    out = Path(out or default_out(base))
    rows = sweep_rows_path(base, out)
    todo = sweeps_to_run(base, sweep)
    if not todo:
        raise ValueError("nothing to sweep: give tasks (cart) and / or lora_tasks (knots)")
    if "cart" in todo:
        axis, points = cart_points(sweep)
        if base.progress:
            print(f"rank sweeps: CART, {len(sweep.variants)} variants x {len(points)} points ({axis})", file=sys.stderr)
        EvaluationRun(_run_config(base, cart_experiment(base.experiment), base.tasks, cart_method_specs(sweep), rows,
                                  None)).run()
    if "knots" in todo:
        for rank in sorted(sweep.lora_tasks):
            if base.progress:
                print(f"rank sweeps: KnOTS, LoRA rank {rank}", file=sys.stderr)
            EvaluationRun(_run_config(base, lora_experiment(base.experiment, rank), sweep.lora_tasks[rank],
                                      knots_method_specs(sweep), rows, sweep.knots_protocol)).run()
    write = base.report if report is None else report
    return rank_sweep_report(base, out, metric=base.metric, write=write)


# ----------------------------------------------------------------------------- command line


def build_parser():
    from jsonargparse import ArgumentParser

    from ..evaluate.run import EvalConfig

    parser = ArgumentParser(prog="python -m src.analysis.rank_sweeps", description=__doc__.splitlines()[0],
                            default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(EvalConfig, as_group=False)
    parser.add_class_arguments(RankSweepConfig, as_group=False)
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="directory of rows.jsonl, rank_sweeps.md / .png (default: rank_sweeps/ next to --rows)")
    parser.add_argument("--report_only", type=bool, default=False, help="render from the existing rows, evaluate nothing")
    return parser


def main(argv=None) -> int:
    from ..evaluate.__main__ import guarded, parse_config

    code, parsed = guarded(lambda: parse_config(build_parser(), argv))
    if code:
        return code
    cfg, config = parsed

    def action():
        if cfg.report_only:
            return rank_sweep_report(config, cfg.out, metric=config.metric)
        values = vars(cfg)
        sweep = RankSweepConfig(**{k: v for k, v in values.items() if k in RankSweepConfig.__dataclass_fields__})
        return run_rank_sweeps(config, sweep, cfg.out)

    code, result = guarded(action)
    if code:
        return code
    print(f"rows: {result.rows}")
    for path in result.written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from ..merge.memory import use_free_cores

    use_free_cores()
    sys.exit(main())
