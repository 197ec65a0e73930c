"""Scaling with the number of merged models, under the three papers' protocols.

For each size m, subsets of the experiment's task models are drawn, each subset is merged and
evaluated by the evaluation stage (:class:`src.evaluate.EvaluationRun` with ``tasks=subset``:
every method selected on validation for that subset, as the protocol says), and the test
numbers are averaged over the subsets of a size with a 95 % confidence interval.

Protocols (``docs/protocols.md``):

* ``knots`` — KnOTS' ablation: ``draws`` random, distinct task combinations per size (all of them
  when fewer exist), each merged model evaluated only on the tasks it merges; the measure is the
  normalized accuracy (mean over the merged tasks of merged / finetuned).
* ``cart`` — CART: every one of the C(n, m) subsets; normalized accuracy as for ``knots``.
* ``compositional`` — the compositional paper's nested samples: per draw a random order of the
  tasks, the size-m sample is its first m (so a draw's samples are nested); 20 draws for vision,
  5 for language. The tasks outside a sample (and the config's ``generalization`` tasks) are that
  sample's generalization tasks: evaluated, never merged, never used for selection. Two
  measures: the held-in and the generalization absolute averages. SLERP, defined for two models,
  is replaced by MLERP past two (see :func:`subset_config`).

Samplers (pure, seeded with ``numpy.random.default_rng([seed, m])`` per size or ``[seed, d]`` per
draw, so adding a size or a draw leaves the others as they were): :func:`knots_subsets`,
:func:`cart_subsets`, :func:`nested_samples`. Each returns ``{m: [subset, ...]}``.

The runner (:func:`run_scaling`) appends to the experiment's rows file: rows are keyed by the
sorted merged task set, so subsets do not collide with each other nor with the full run, and a
re-run skips every finished measurement. The aggregation (:func:`aggregate`) reads rows only;
``scaling.md`` and ``scaling.png`` are rendered from it (``--report_only true`` re-renders
without evaluating).

Command line::

    python -m src.analysis.scaling --config configs/evaluate/<x>.yaml --protocol knots|cart|compositional \\
        --sizes '[2,3,4]' --draws 5 --seed 0 [--setting vision|language] [--grid_protocol quick] \\
        [--out DIR] [--report_only true] [any EvalConfig field, as for python -m src.evaluate]
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np

PROTOCOLS = ("knots", "cart", "compositional")
#: nested samples per setting (the compositional paper: 20 draws for vision, 5 for language)
DEFAULT_DRAWS = {"vision": 20, "language": 5}
#: random combinations per size for ``knots`` when none is given
KNOTS_DRAWS = 10
#: a task's metric when its rows hold several (the first present wins)
PRIMARY_METRICS = ("acc@union", "acc", "em_f1", "sp_rouge")
#: what each protocol averages: (group, title) per measure
MEASURES = {
    "knots": (("normalized", "normalized accuracy (%)"),),
    "cart": (("normalized", "normalized accuracy (%)"),),
    "compositional": (("held_in", "held-in average (%)"), ("generalization", "generalization average (%)")),
}
#: methods never drawn as a scaling line (the finetuned models are the denominators / upper bound)
NOT_LINES = ("finetuned",)
MISSING = "–"

Subsets = dict[int, list[tuple]]


# ----------------------------------------------------------------------------- samplers


def _sizes(n: int, sizes: Optional[Iterable[int]]) -> list[int]:
    out = list(range(2, n + 1)) if sizes is None else [int(m) for m in sizes]
    bad = [m for m in out if not 1 <= m <= n]
    if bad:
        raise ValueError(f"sizes {bad}: a subset of {n} tasks has 1..{n} of them")
    if len(set(out)) != len(out):
        raise ValueError(f"sizes {out}: each size once")
    return sorted(out)


def _tasks(tasks: Sequence[Hashable]) -> list:
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct, got {tasks}")
    return tasks


def knots_subsets(tasks: Sequence[Hashable], sizes: Iterable[int] = range(2, 9), draws: int = KNOTS_DRAWS,
                  seed: int = 0) -> Subsets:
    """KnOTS: per size m, ``draws`` distinct random combinations of m tasks (every combination,
    in ``itertools.combinations`` order, when there are at most ``draws``). A subset lists its
    tasks in the order of ``tasks``; the subsets of a size come in draw order."""
    tasks = _tasks(tasks)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    out: Subsets = {}
    for m in _sizes(len(tasks), sizes):
        if math.comb(len(tasks), m) <= draws:
            out[m] = list(itertools.combinations(tasks, m))
            continue
        rng = np.random.default_rng([int(seed), m])
        seen: list[tuple] = []
        chosen: set[tuple[int, ...]] = set()
        while len(seen) < draws:  # rejection: at most draws < C(n, m) distinct ones are needed
            idx = tuple(sorted(int(i) for i in rng.choice(len(tasks), size=m, replace=False)))
            if idx not in chosen:
                chosen.add(idx)
                seen.append(tuple(tasks[i] for i in idx))
        out[m] = seen
    return out


def cart_subsets(tasks: Sequence[Hashable], sizes: Optional[Iterable[int]] = None) -> Subsets:
    """CART: every one of the C(n, m) subsets of each size (default sizes 2..n)."""
    tasks = _tasks(tasks)
    return {m: list(itertools.combinations(tasks, m)) for m in _sizes(len(tasks), sizes)}


def nested_samples(tasks: Sequence[Hashable], sizes: Optional[Iterable[int]] = None, draws: Optional[int] = None,
                   seed: int = 0, setting: str = "vision") -> Subsets:
    """The compositional paper's nested samples: draw ``d`` is a random order of the tasks and its
    size-m sample is the first m of that order, so ``out[m][d][:m - 1] == out[m - 1][d]``.
    ``out[m][d]`` is draw d's sample (one per draw, repeats possible across draws). ``draws``
    defaults to 20 (``setting="vision"``) or 5 (``"language"``)."""
    tasks = _tasks(tasks)
    if draws is None:
        if setting not in DEFAULT_DRAWS:
            raise ValueError(f"setting must be one of {sorted(DEFAULT_DRAWS)}, got {setting!r}")
        draws = DEFAULT_DRAWS[setting]
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    sizes = _sizes(len(tasks), sizes)
    orders = [[tasks[int(i)] for i in np.random.default_rng([int(seed), d]).permutation(len(tasks))]
              for d in range(draws)]
    return {m: [tuple(order[:m]) for order in orders] for m in sizes}


def sample(protocol: str, tasks: Sequence[Hashable], sizes: Optional[Iterable[int]] = None,
           draws: Optional[int] = None, seed: int = 0, setting: str = "vision") -> Subsets:
    """The subsets ``protocol`` evaluates (``draws`` is ignored by ``cart``: it takes them all)."""
    if protocol == "knots":
        return knots_subsets(tasks, range(2, len(tasks) + 1) if sizes is None else sizes,
                             KNOTS_DRAWS if draws is None else draws, seed)
    if protocol == "cart":
        return cart_subsets(tasks, sizes)
    if protocol == "compositional":
        return nested_samples(tasks, sizes, draws, seed, setting)
    raise ValueError(f"scaling protocol must be one of {PROTOCOLS}, got {protocol!r}")


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, Optional[float]]:
    """The mean of ``values`` and the half-width of its ``level`` confidence interval with the t
    distribution: ``t_{(1+level)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation
    (ddof 1). With one value there is no interval: the half-width is ``None`` (tables print the
    mean alone, plots draw no band). No values is an error."""
    from scipy.stats import t

    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci: no values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf((1.0 + level) / 2.0, n - 1)) * s / math.sqrt(n)


# ----------------------------------------------------------------------------- one subset's run


def _method_spec(value):
    from ..evaluate.run import MethodSpec

    if isinstance(value, MethodSpec):
        return dataclasses.replace(value)
    if isinstance(value, Mapping):
        return MethodSpec(**value)
    if isinstance(value, str):
        return MethodSpec(method=value)
    raise TypeError(f"a method is a name or a mapping, got {value!r}")


def subset_methods(methods: Sequence[Any], m: int) -> list:
    """The base config's methods for a size-m subset. SLERP merges exactly two models: past two
    (m != 2) it becomes MLERP (the compositional paper's substitute) labelled ``"<label> / MLERP"``
    at every size, so it is one line; when the config has MLERP already, SLERP runs at m = 2 only
    (the same MLERP measurement would otherwise be made twice under two labels). A ``merged``
    directory merges a fixed task set: refused."""
    specs = [_method_spec(s) for s in methods]
    has_mlerp = any(s.method == "mlerp" for s in specs)
    out = []
    for spec in specs:
        if spec.method == "merged":
            raise ValueError(f"method {spec.label or spec.path!r}: a merged directory holds one fixed task set; "
                             "scaling merges each subset (drop it, e.g. with --only)")
        if spec.method == "slerp":
            if has_mlerp:
                if m == 2:
                    out.append(spec)
                continue
            label = f"{spec.label or 'SLERP'} / MLERP"
            out.append(dataclasses.replace(spec, label=label) if m == 2 else
                       type(spec)(method="mlerp", label=label))
            continue
        out.append(spec)
    return out


def subset_config(base, subset_dirs: Sequence[str], protocol: str, grid_protocol: Optional[str] = None):
    """The :class:`EvalConfig` of one subset: ``tasks`` = the subset (in the base config's order);
    ``generalization`` = the base config's tasks outside it plus its ``generalization`` tasks
    (``compositional``) or none (``knots`` / ``cart``: merged tasks only); grids of
    ``grid_protocol`` (default: ``protocol``); the joint benchmark off (scaling aggregates per-task
    numbers) and no per-run report (it would describe one subset)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"scaling protocol must be one of {PROTOCOLS}, got {protocol!r}")
    pool = [str(t) for t in base.tasks]
    subset = [str(t) for t in subset_dirs]
    unknown = [t for t in subset if t not in pool]
    if unknown:
        raise ValueError(f"subset tasks {unknown} are not among the config's tasks")
    tasks = [t for t in pool if t in subset]
    generalization = ([t for t in pool if t not in subset] + [str(t) for t in base.generalization]
                      if protocol == "compositional" else [])
    only = base.only
    if only:  # a SLERP chosen by --only keeps running under its new label
        renamed = [spec.label or "SLERP" for spec in map(_method_spec, base.methods)
                   if spec.method == "slerp" and (spec.method in only or (spec.label or spec.method) in only)]
        only = list(only) + [f"{label} / MLERP" for label in renamed]
    return dataclasses.replace(base, tasks=tasks, generalization=generalization, only=only,
                               protocol=grid_protocol or protocol, methods=subset_methods(base.methods, len(tasks)),
                               grid_generalization=base.grid_generalization and bool(generalization),
                               joint=dataclasses.replace(base.joint, enabled=False), report=False)


def rows_path(config) -> Path:
    return Path(str(config.rows).replace("{experiment}", config.experiment))


# ----------------------------------------------------------------------------- aggregation


def _row_key(r):
    from ..evaluate.rows import row_key

    return row_key(r)


def _metric_for(metrics: set[str], wanted: Optional[str]) -> Optional[str]:
    if wanted and wanted != "auto":
        return wanted if wanted in metrics else None
    for m in PRIMARY_METRICS:
        if m in metrics:
            return m
    return next(iter(metrics)) if len(metrics) == 1 else None


def aggregate(rows: Iterable[Mapping[str, Any]], protocol: str,
              subsets: Optional[Mapping[int, Sequence[Sequence[str]]]] = None,
              *, experiment: Optional[str] = None, pool: Optional[Sequence[str]] = None,
              grid_protocol: Optional[str] = None, metric: Optional[str] = None, level: float = 0.95,
              methods: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Per line (method, told apart by its label) and size: the mean over subsets of the
    protocol's measure with its confidence interval, from test rows alone.

    Args:
        rows: result rows (a later row with the same key wins).
        protocol: ``knots`` / ``cart`` (measure: mean normalized accuracy over the merged tasks) or
            ``compositional`` (held-in average, and generalization average over the evaluated tasks
            outside the subset, both absolute).
        subsets: ``{m: [task names, ...]}`` as sampled (a subset drawn twice counts twice); default:
            every merged task set the rows hold, once.
        experiment: only rows of this experiment.
        pool: every task name of the experiment (tasks + generalization): a subset's generalization
            tasks are the pool's outside it. Default: the tasks its finetuned references cover.
        grid_protocol: the grids the subsets were selected on: when a subset's rows hold several
            selected points of a line (the subset selected under several protocols), the point
            with a row tagged with this protocol counts (else the last written).
        metric: the metric to average (default: each task's first of ``PRIMARY_METRICS``).
        level: confidence level.
        methods: only these methods (rows' ``method``) are lines (default: every one but the
            finetuned references); a rows file shared by several runs holds other methods too.

    A subset counts for a line only when the line has every task the measure averages; ``n`` says
    how many subsets did. Returns ``{"protocol", "measures": [(group, title)], "sizes", "subsets":
    {m: count}, "lines": [label], "points": {group: {label: {m: {"mean", "half_width", "n",
    "values"}}}}}`` (fractions, not percent).
    """
    from ..evaluate.rows import normalized as normalized_value

    if protocol not in PROTOCOLS:
        raise ValueError(f"scaling protocol must be one of {PROTOCOLS}, got {protocol!r}")
    methods = None if methods is None else set(methods)
    latest: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        key = _row_key(r)
        latest.pop(key, None)
        latest[key] = r
    # (tasks key, line) -> {params: {task: {metric: row}}}; finetuned references apart
    groups: dict[tuple, dict[str, dict[str, dict[str, Mapping[str, Any]]]]] = {}
    tagged: dict[tuple, set[str]] = {}  # the params groups with a row selected under grid_protocol
    refs: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    order: list[tuple[str, str]] = []  # (method, label) by first appearance
    for r in latest.values():
        if experiment is not None and r.get("experiment") != experiment:
            continue
        if r.get("split") != "test" or r.get("task") == "joint" or r.get("value") is None:
            continue
        if r.get("stage") not in ("selected", "reference") or not r.get("tasks"):
            continue
        tkey = tuple(sorted(r["tasks"]))
        method = str(r.get("method"))
        if method in NOT_LINES:
            refs.setdefault((tkey, r["task"]), {})[r["metric"]] = r
            continue
        if methods is not None and method not in methods:
            continue
        label = str(r.get("label") or method)
        if (method, label) not in order:
            order.append((method, label))
        params = json.dumps(r.get("params"), sort_keys=True, default=str)
        line_groups = groups.setdefault((tkey, label), {})
        group = line_groups[params] = line_groups.pop(params, {})  # the last-written group last
        group.setdefault(r["task"], {})[r["metric"]] = r
        sel = r.get("selection") or {}
        if sel.get("protocol") == grid_protocol:
            tagged.setdefault((tkey, label), set()).add(params)
    # a merged task set selected under several protocols holds one group of selected rows per
    # selected point (rows are keyed by params, not by who selected them: a point two protocols
    # both selected is one measurement, its rows tagged by the protocol that wrote them first).
    # The line's rows: the group with a row selected under grid_protocol; else the only group;
    # else the last written.
    cells: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for (tkey, label), line_groups in groups.items():
        mine = [p for p in line_groups if p in tagged.get((tkey, label), set())]
        chosen = (mine or list(line_groups))[-1]
        for task, metrics in line_groups[chosen].items():
            cells[(tkey, label, task)] = metrics
    ref_rank = {"zeroshot": 0, "ensemble": 1}
    labels: list[str] = []
    for method, label in sorted(order, key=lambda ml: (ref_rank.get(ml[0], 2), order.index(ml))):
        if label not in labels:
            labels.append(label)

    if subsets is None:
        found: dict[int, list[tuple]] = {}
        for tkey in sorted({k[0] for k in cells}, key=lambda k: (len(k), k)):
            found.setdefault(len(tkey), []).append(tkey)
        subsets = found
    subsets = {int(m): [tuple(sorted(s)) for s in ss] for m, ss in sorted(subsets.items())}

    def value(tkey, label, task, normalized: bool) -> Optional[float]:
        metrics = cells.get((tkey, label, task))
        if not metrics:
            return None
        name = _metric_for(set(metrics), metric)
        if name is None:
            return None
        row = metrics[name]
        if not normalized:
            return float(row["value"])
        v = normalized_value(row)
        if v is None:  # no denominator in the row: the finetuned reference of the same subset
            ref = refs.get((tkey, task), {}).get(name)
            if ref is not None and ref.get("value"):
                v = float(row["value"]) / float(ref["value"])
        return v

    def mean_over(tkey, label, tasks, normalized) -> Optional[float]:
        if not tasks:
            return None
        vals = [value(tkey, label, t, normalized) for t in tasks]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    def outside(tkey) -> list[str]:
        if pool is not None:
            return [t for t in pool if t not in tkey]
        return sorted({task for (k, task) in refs if k == tkey and task not in tkey})

    measures = MEASURES[protocol]
    points: dict[str, dict[str, dict[int, dict[str, Any]]]] = {g: {} for g, _ in measures}
    for m, ss in subsets.items():
        for label in labels:
            per_group: dict[str, list[float]] = {g: [] for g, _ in measures}
            for tkey in ss:
                if protocol == "compositional":
                    got = {"held_in": mean_over(tkey, label, list(tkey), False),
                           "generalization": mean_over(tkey, label, outside(tkey), False)}
                else:
                    got = {"normalized": mean_over(tkey, label, list(tkey), True)}
                for g, v in got.items():
                    if v is not None:
                        per_group[g].append(v)
            for g, vals in per_group.items():
                if vals:
                    mean, hw = mean_ci(vals, level)
                    points[g].setdefault(label, {})[m] = {"mean": mean, "half_width": hw, "n": len(vals),
                                                          "values": vals}
    return {"protocol": protocol, "measures": list(measures), "sizes": list(subsets),
            "subsets": {m: len(ss) for m, ss in subsets.items()}, "level": level,
            "lines": [lb for lb in labels if any(lb in points[g] for g, _ in measures)], "points": points}


# ----------------------------------------------------------------------------- report


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}"


def render_scaling_table(agg: Mapping[str, Any], group: str) -> str:
    """A Markdown table: one line per method, one column per size; a cell is ``mean ± half-width``
    in percent (the mean alone from one subset), ``(k/N)`` when only k of the N subsets count."""
    sizes = agg["sizes"]
    header = ["method"] + [f"m = {m}" for m in sizes]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(sizes) + "|"]
    for label in agg["lines"]:
        pts = agg["points"][group].get(label)
        if not pts:
            continue
        cells = []
        for m in sizes:
            p = pts.get(m)
            if p is None:
                cells.append(MISSING)
                continue
            text = _pct(p["mean"]) + ("" if p["half_width"] is None else f" ± {_pct(p['half_width'])}")
            if p["n"] != agg["subsets"][m]:
                text += f" ({p['n']}/{agg['subsets'][m]})"
            cells.append(text)
        lines.append("| " + " | ".join([label.replace("|", "\\|")] + cells) + " |")
    return "\n".join(lines) + "\n"


def render_scaling_report(agg: Mapping[str, Any], experiment: str, subsets: Optional[Mapping[int, Sequence]] = None,
                          settings: Optional[Mapping[str, Any]] = None) -> str:
    protocol = agg["protocol"]
    what = {"knots": "random task combinations per size, each merged model evaluated on the tasks it merges",
            "cart": "every subset of each size, each merged model evaluated on the tasks it merges",
            "compositional": "nested samples (each draw a random task order, the size-m sample its first m); "
                             "generalization = the evaluated tasks outside the sample"}[protocol]
    level = round(100 * agg.get("level", 0.95))
    parts = [f"# {experiment}: scaling with the number of merged models\n",
             f"Protocol `{protocol}`: {what}. Hyperparameters selected on validation per subset; test numbers. "
             f"A cell is the mean over the subsets of a size ± the half-width of its {level} % confidence "
             "interval (t distribution; one subset: the mean alone); `(k/N)`: k of the N subsets have the "
             "method's numbers.\n"]
    if settings:
        parts.append("Settings: " + ", ".join(f"{k} `{v}`" for k, v in settings.items()) + ".\n")
    parts.append("Subsets per size: " + ", ".join(f"m = {m}: {n}" for m, n in agg["subsets"].items()) + ".\n")
    for group, title in agg["measures"]:
        parts += [f"## {title[0].upper() + title[1:]}\n", render_scaling_table(agg, group)]
    if subsets:
        parts.append("## Subsets\n")
        for m, ss in subsets.items():
            parts.append(f"- m = {m}: " + "; ".join("{" + ", ".join(map(str, s)) + "}" for s in ss))
        parts.append("")
    return "\n".join(parts)


def plot_scaling(agg: Mapping[str, Any], path, experiment: str = "") -> Path:
    """One panel per measure (compositional: held-in and generalization): per method the mean
    over subsets against the number of merged models, its confidence interval as a band."""
    from ..evaluate.report import _new_figure, _save_png

    measures = agg["measures"]
    fig = _new_figure(1, len(measures), 5.0, 3.8)
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, (group, title) in zip(axes, measures):
        for label in agg["lines"]:
            pts = agg["points"][group].get(label)
            if not pts:
                continue
            ms = sorted(pts)
            mean = np.array([100 * pts[m]["mean"] for m in ms])
            line, = ax.plot(ms, mean, marker="o", label=label)
            banded = [m for m in ms if pts[m]["half_width"] is not None]
            if banded:
                lo = [100 * (pts[m]["mean"] - pts[m]["half_width"]) for m in banded]
                hi = [100 * (pts[m]["mean"] + pts[m]["half_width"]) for m in banded]
                ax.fill_between(banded, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xticks(agg["sizes"])
        ax.set_xlabel("number of merged models")
        ax.set_ylabel(title)
        ax.set_title(title.split(" (")[0])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{experiment}: scaling ({agg['protocol']} protocol, {round(100 * agg.get('level', 0.95))} % CI)")
    return _save_png(fig, path)


def write_scaling_report(agg: Mapping[str, Any], out, experiment: str, subsets=None, settings=None) -> list[Path]:
    """``scaling.md`` and ``scaling.png`` in ``out`` (an existing ``scaling.md`` is replaced only
    when it is one of ours)."""
    from ..safe_output import replace_own_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "scaling.md"
    replace_own_file(md, render_scaling_report(agg, experiment, subsets, settings),
                 f"# {experiment}: scaling with the number of merged models")
    return [md, plot_scaling(agg, out / "scaling.png", experiment)]


# ----------------------------------------------------------------------------- runner


@dataclasses.dataclass
class ScalingResult:
    subsets: Subsets  # {m: [task names, ...]} as sampled
    aggregate: dict[str, Any]
    rows: Path
    written: list[Path]


def _task_names(dirs: Sequence[str], lenient: bool = False) -> Optional[list[str]]:
    """The task names ``task.json`` records (``lenient``: just the file, the weights may be absent;
    ``None`` when one is unreadable)."""
    from ..task_checkpoint import TASK_JSON, read_task_info

    names = []
    for d in dirs:
        if not lenient:
            names.append(read_task_info(d).task)
            continue
        try:
            names.append(json.loads((Path(d) / TASK_JSON).read_text())["task"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return names


def config_methods(config, sizes: Iterable[int]) -> set[str]:
    """The rows' ``method`` names a scaling run of ``config`` writes for subsets of ``sizes``: its
    methods (SLERP / MLERP as substituted; ``only`` respected) and the references it enables."""
    names = {"zeroshot"} if config.zeroshot else set()
    if config.ensemble:
        names.add("ensemble")
    for m in sizes:
        only = subset_config(config, config.tasks[:m], "knots").only  # with SLERP's new label
        for spec in subset_methods(config.methods, m):
            if not only or spec.method in only or (spec.label or spec.method) in only:
                names.add(spec.method)
    return names


def _check(base, protocol: Optional[str]) -> str:
    protocol = protocol or base.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"scaling protocol must be one of {PROTOCOLS} (--protocol), got {protocol!r}; "
                         "--grid_protocol quick searches the short grids instead of the protocol's")
    return protocol


def scaling_report(base_config, protocol: Optional[str] = None, sizes: Optional[Iterable[int]] = None,
                   draws: Optional[int] = None, seed: int = 0, *, setting: str = "vision",
                   grid_protocol: Optional[str] = None, out=None, write: bool = True) -> ScalingResult:
    """Aggregate (and render) from the rows file alone: the subsets are sampled again from the
    task names of the config's ``task.json`` files; when those are unreadable, every merged task
    set of the requested sizes in the rows counts once."""
    from ..evaluate.rows import read_rows
    from ..safe_output import note

    protocol = _check(base_config, protocol)
    path = rows_path(base_config)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows to report")
    names = _task_names([str(t) for t in base_config.tasks], lenient=True)
    held_out = _task_names([str(t) for t in base_config.generalization], lenient=True)
    if names is None:
        note("task.json of a config task is unreadable: every merged task set in the rows counts once")
        subsets = None
        pool = None
    else:
        subsets = sample(protocol, names, sizes, draws, seed, setting)
        pool = names + (held_out or []) if held_out is not None else None
    if subsets is None and sizes is not None:
        wanted = {int(m) for m in sizes}
        found: dict[int, list[tuple]] = {}
        for r in rows:
            if r.get("experiment") == base_config.experiment and r.get("tasks") and len(r["tasks"]) in wanted:
                t = tuple(sorted(r["tasks"]))
                if t not in found.setdefault(len(t), []):
                    found[len(t)].append(t)
        subsets = found
    agg = aggregate(rows, protocol, subsets, experiment=base_config.experiment, pool=pool,
                    grid_protocol=grid_protocol or protocol,
                    methods=config_methods(base_config, subsets or range(1, len(base_config.tasks) + 1)))
    used = {"knots": draws or KNOTS_DRAWS, "cart": "all subsets",
            "compositional": draws or DEFAULT_DRAWS.get(setting)}[protocol]
    settings = {"sizes": agg["sizes"], "draws": used, "seed": seed, "grids": grid_protocol or protocol,
                "select_on": base_config.select_on}
    if protocol == "compositional":
        settings["setting"] = setting
    written = write_scaling_report(agg, out or path.parent, base_config.experiment, subsets, settings) if write else []
    return ScalingResult(subsets or {}, agg, path, written)


def run_scaling(base_config, protocol: Optional[str] = None, sizes: Optional[Iterable[int]] = None,
                draws: Optional[int] = None, seed: int = 0, *, setting: str = "vision",
                grid_protocol: Optional[str] = None, out=None, report: Optional[bool] = None) -> ScalingResult:
    """Evaluate every sampled subset of ``base_config.tasks`` through the evaluation stage, then
    aggregate from the rows (:func:`aggregate`) and write ``scaling.md`` / ``scaling.png``.

    Args:
        base_config: the experiment's :class:`EvalConfig`; its ``tasks`` are the pool subsets are
            drawn from, its rows file receives every subset's rows.
        protocol: ``knots`` | ``cart`` | ``compositional`` (default: the config's ``protocol``):
            the sampler, what a merged model is evaluated on, and the grids searched.
        sizes: subset sizes (default 2..n).
        draws: ``knots``: combinations per size (default 10); ``compositional``: nested draws
            (default by ``setting``: 20 vision, 5 language); ``cart`` takes every subset.
        seed: the sampler's seed.
        grid_protocol: search these grids instead of ``protocol``'s (``quick`` on a laptop).
        out: where ``scaling.md`` / ``.png`` go (default: next to the rows).
        report: write them (default: the config's ``report``).
    """
    from ..evaluate.run import EvaluationRun

    protocol = _check(base_config, protocol)
    pool_dirs = [str(t) for t in base_config.tasks]
    names = _task_names(pool_dirs)
    _task_names([str(t) for t in base_config.generalization])  # every task.json readable before hours of work
    dir_of = dict(zip(names, pool_dirs))
    subsets = sample(protocol, names, sizes, draws, seed, setting)
    subset_methods(base_config.methods, 2)  # refuse a merged directory before any evaluation
    todo: list[tuple[str, ...]] = []
    for ss in subsets.values():
        for s in ss:
            key = tuple(sorted(s))
            if key not in todo:  # a nested draw may repeat a sample: evaluated once, counted per draw
                todo.append(key)
    for i, key in enumerate(todo):
        if base_config.progress:
            print(f"scaling ({protocol}): subset {i + 1}/{len(todo)}, m = {len(key)}: {', '.join(key)}",
                  file=sys.stderr)
        EvaluationRun(subset_config(base_config, [dir_of[t] for t in key], protocol, grid_protocol)).run()
    result = scaling_report(base_config, protocol, sizes, draws, seed, setting=setting, grid_protocol=grid_protocol,
                            out=out, write=base_config.report if report is None else report)
    return dataclasses.replace(result, subsets=subsets)


# ----------------------------------------------------------------------------- command line


def build_parser():
    from jsonargparse import ArgumentParser

    from ..evaluate.run import EvalConfig

    parser = ArgumentParser(prog="python -m src.analysis.scaling", description=__doc__.splitlines()[0],
                            default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(EvalConfig, as_group=False)
    parser.add_argument("--sizes", type=Optional[list[int]], default=None, help="subset sizes (default 2..n)")
    parser.add_argument("--draws", type=Optional[int], default=None,
                        help="knots: combinations per size (10); compositional: nested draws (20 vision, 5 language)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--setting", type=str, default="vision", help="compositional default draws: vision | language")
    parser.add_argument("--grid_protocol", type=Optional[str], default=None,
                        help="search these grids instead of --protocol's (e.g. quick)")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="directory of scaling.md / .png (default: the rows')")
    parser.add_argument("--report_only", type=bool, default=False,
                        help="render from the existing rows, evaluate nothing")
    return parser


def main(argv=None) -> int:
    from ..evaluate.__main__ import guarded, parse_config

    code, parsed = guarded(lambda: parse_config(build_parser(), argv))
    if code:
        return code
    cfg, config = parsed
    kwargs = dict(setting=cfg.setting, grid_protocol=cfg.grid_protocol, out=cfg.out)
    action = scaling_report if cfg.report_only else run_scaling
    code, result = guarded(lambda: action(config, None, cfg.sizes, cfg.draws, cfg.seed, **kwargs))
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
