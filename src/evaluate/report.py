"""Reports rendered from result rows alone: Markdown tables shaped like the papers' tables, PNG plots.

No model is loaded: every table and plot is a pure function of rows (:mod:`src.evaluate.rows`),
so a report can be re-rendered, for another split, metric or normalization, without re-running
anything.

Command line (one or more row files; a later file's row wins over an earlier one's)::

    python -m src.evaluate.report ROWS.jsonl [MORE.jsonl ...] --table pertask|joint|cart|compositional
        [--normalized] [--split test] [--experiment NAME] [--metric acc] [--group held_in]
        [--all-k] [--params all|varied|none] [--out FILE.md]
        [--plot sensitivity|scatter --plot-out FILE.png] [--plot-split val]

Python::

    from src.evaluate.report import render_table, plot_sensitivity, plot_heldin_vs_generalization
    print(render_table(rows, "pertask", normalized=True))
    plot_sensitivity(rows, "sensitivity.png")

Conventions shared by every table and plot:

* **Duplicates**: rows with the same :func:`~src.evaluate.rows.row_key` are one measurement; the
  last one in the list (the last written) wins. When two different rows land in the same table
  cell (e.g. the same method evaluated with two ``params`` and no filter telling them apart),
  the later row wins too.
* **Lines** (table rows, plot series) are methods, told apart by ``(method, label)``; the line's
  name is ``label`` (``method`` when there is none). When the rows hold more than one
  experiment and none is chosen, lines are per experiment too and named ``experiment: label``.
* **Line order**: the references that are not merges come first, in the fixed order
  finetuned, zeroshot, ensemble (the upper bound, the lower bound, the multi-model baseline;
  KnOTS's joint table also lists the ensemble above the merges); then every other method in
  the order of its first row.
* **Values** are fractions in rows and percent with one decimal in tables (``0.9321`` ->
  ``93.2``); a missing cell is ``–``. An average (``avg``, ``mean``, group averages) is shown
  only when every cell it averages is there; otherwise it is ``–`` (an average over a
  different set of tasks would not be comparable with the other lines').
* **Normalized** values are ``value / finetuned`` (:func:`~src.evaluate.rows.normalized`); a row
  without a ``finetuned`` denominator is divided by the ``finetuned`` method's row of the same
  experiment, task, dataset, split and metric when the rows hold one (so the finetuned line is
  100). A normalized average is the mean of the normalized values, not a ratio of means.
* Tables use rows of stage ``selected`` (the point chosen on validation, evaluated on test) and
  ``reference`` (no selection) of one split (``test`` unless told); ``grid`` rows feed the plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from .rows import normalized as _normalized_value, read_rows, row_key

__all__ = ["TABLE_KINDS", "PLOT_KINDS", "REFERENCE_ORDER", "MISSING", "PRIMARY_METRICS",
           "render_table", "plot_sensitivity", "plot_heldin_vs_generalization", "main"]

TABLE_KINDS = ("pertask", "joint", "cart", "compositional", "mudsc")
PLOT_KINDS = ("sensitivity", "scatter")
#: the non-merge references, listed first in this order; every other method follows by first appearance
REFERENCE_ORDER = ("finetuned", "zeroshot", "ensemble")
#: what a missing cell shows
MISSING = "–"
#: stages a table reads
TABLE_STAGES = ("selected", "reference")
#: a task's metric when none is asked for and its rows have several (compositional table, scatter)
PRIMARY_METRICS = ("acc", "em_f1", "sp_rouge", "hits@1")
#: the groups of compositional protocols, in column order
GROUPS = ("held_in", "generalization")
_GROUP_TITLES = {"held_in": "held-in avg", "generalization": "generalization avg"}
PARAMS_MODES = ("all", "varied", "none")

Rows = Iterable[Mapping[str, Any]]


# ----------------------------------------------------------------------------- row handling


class _Line(NamedTuple):
    """One table line / plot series: a method (as labelled) of one experiment."""
    experiment: Optional[str]
    method: str
    label: str


def _dedup(rows: Rows) -> list[dict[str, Any]]:
    """One row per :func:`row_key`, the last one, in the order of those last occurrences."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        out.pop(key, None)
        out[key] = dict(row)
    return list(out.values())


def _canonical_json(value: Any) -> str:
    def canon(v):
        if isinstance(v, Mapping):
            return {str(k): canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v
    return json.dumps(canon(value), sort_keys=True, default=str)


def _is_joint(row: Mapping[str, Any]) -> bool:
    return row.get("task") == "joint"


def _select(rows: Sequence[Mapping[str, Any]], *, experiment=None, split=None, stages=None, metric=None,
            group=None, joint: Optional[bool] = None) -> list[Mapping[str, Any]]:
    """Rows matching every filter given (``None`` = any); ``metric`` may be a set of names."""
    metrics = {metric} if isinstance(metric, str) else (set(metric) if metric is not None else None)
    out = []
    for r in rows:
        if experiment is not None and r.get("experiment") != experiment:
            continue
        if split is not None and r.get("split") != split:
            continue
        if stages is not None and r.get("stage") not in stages:
            continue
        if metrics is not None and r.get("metric") not in metrics:
            continue
        if group is not None and r.get("group") != group:
            continue
        if joint is not None and _is_joint(r) != joint:
            continue
        if r.get("value") is None:
            continue
        out.append(r)
    return out


def _available(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the rows hold, for error messages."""
    def values(field):
        return sorted({str(r.get(field)) for r in rows})
    return (f"{len(rows)} rows; experiments {values('experiment')}, splits {values('split')}, "
            f"stages {values('stage')}, metrics {values('metric')}")


def _lines_of(rows: Sequence[Mapping[str, Any]]) -> tuple[list[_Line], bool]:
    """The lines of ``rows`` in report order, and whether lines are per experiment."""
    experiments = []
    for r in rows:
        if r.get("experiment") not in experiments:
            experiments.append(r.get("experiment"))
    multi = len(experiments) > 1
    first: list[_Line] = []
    for r in rows:
        line = _line(r, multi)
        if line not in first:
            first.append(line)

    def rank(item):
        i, line = item
        ref = REFERENCE_ORDER.index(line.method) if line.method in REFERENCE_ORDER else len(REFERENCE_ORDER)
        return experiments.index(line.experiment) if multi else 0, ref, i
    return [line for _, line in sorted(enumerate(first), key=rank)], multi


def _line(row: Mapping[str, Any], multi: bool) -> _Line:
    method = str(row.get("method"))
    return _Line(row.get("experiment") if multi else None, method, str(row.get("label") or method))


def _line_name(line: _Line) -> str:
    return f"{line.experiment}: {line.label}" if line.experiment is not None else line.label


def _reference_values(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, float]:
    """The finetuned method's values, the fallback denominators of normalized values."""
    refs = {}
    for r in rows:
        if r.get("method") == "finetuned" and r.get("value") is not None:
            refs[_ref_key(r)] = float(r["value"])
    return refs


def _ref_key(row: Mapping[str, Any]) -> tuple:
    return (row.get("experiment"), row.get("task"), row.get("dataset"), row.get("split"), row.get("metric"))


def _value(row: Mapping[str, Any], normalized: bool, refs: Mapping[tuple, float]) -> Optional[float]:
    """The row's fraction, or its normalized value (``None`` when there is no denominator)."""
    if row.get("value") is None:
        return None
    if not normalized:
        return float(row["value"])
    n = _normalized_value(row)
    if n is None:
        ref = refs.get(_ref_key(row))
        if ref and math.isfinite(ref):
            n = float(row["value"]) / ref
    return n


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean when every value is there (and there is at least one), else ``None``."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _fmt(value: Optional[float]) -> str:
    return MISSING if value is None else f"{100.0 * value:.1f}"


def _metric_sort_key(metric: str):
    m = re.fullmatch(r"hits@(\d+)", str(metric))
    return (0, int(m.group(1)), "") if m else (1, 0, str(metric))


def _metric_title(metric: str) -> str:
    m = re.fullmatch(r"hits@(\d+)", str(metric))
    return f"Hits@{m.group(1)}" if m else str(metric)


def _task_metrics(rows: Sequence[Mapping[str, Any]], metric) -> dict[Any, str]:
    """The metric each task is reported in: ``metric`` when given (a name, or a mapping task -> name),
    else the task's only metric, else the first of :data:`PRIMARY_METRICS` it has, else its first."""
    seen: dict[Any, list[str]] = {}
    for r in rows:
        seen.setdefault(r.get("task"), [])
        if r.get("metric") not in seen[r.get("task")]:
            seen[r.get("task")].append(r.get("metric"))
    chosen = {}
    for task, metrics in seen.items():
        if isinstance(metric, str):
            want = metric
        elif isinstance(metric, Mapping) and task in metric:
            want = metric[task]
        elif len(metrics) == 1:
            want = metrics[0]
        else:
            want = next((m for m in PRIMARY_METRICS if m in metrics), metrics[0])
        if want in metrics:
            chosen[task] = want
    return chosen


# ----------------------------------------------------------------------------- params column


def _fmt_param(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _compact_params(params: Optional[Mapping[str, Any]], keys: Optional[Sequence[str]] = None) -> str:
    """``lam=0.5, density=0.2``: the params (only ``keys``, when given) in their own order; unset
    (``None``) ones and file paths (a coefficient table) are left out of the table cell."""
    if not params:
        return ""
    return ", ".join(f"{k}={_fmt_param(v)}" for k, v in params.items()
                     if (keys is None or k in keys) and v is not None and k not in ("coefficients", "task_order"))


def _varied_keys(grid_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The params keys whose value differs among ``grid_rows`` (a key some rows lack varies too)."""
    keys: list[str] = []
    for r in grid_rows:
        for k in (r.get("params") or {}):
            if k not in keys:
                keys.append(k)
    return [k for k in keys if len({_canonical_json((r.get("params") or {}).get(k)) for r in grid_rows}) > 1]


def _params_cell(cell_rows: Sequence[Mapping[str, Any]], mode: str, grid_rows: Sequence[Mapping[str, Any]]) -> str:
    """The params of a line's non-reference rows; distinct settings (a per-task selection) joined by ``; ``."""
    if mode == "none":
        return ""
    keys = None
    if mode == "varied" and grid_rows:
        keys = _varied_keys(grid_rows)
    texts: list[str] = []
    for r in cell_rows:
        if r.get("stage") == "reference":
            continue
        text = _compact_params(r.get("params"), keys)
        if text and text not in texts:
            texts.append(text)
    return "; ".join(texts)


# ----------------------------------------------------------------------------- tables


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _mudsc_table(every, experiment, split, stages, normalized: bool) -> str:
    tasks_rows = _select(every, experiment=experiment, split=split, stages=stages, metric="acc", joint=False)
    joint_rows = [r for r in _select(every, experiment=experiment, split=split, stages=stages, metric="hits@1", joint=True)
                  if r.get("dataset") in (None, "union")]
    if not tasks_rows:
        raise ValueError(f"no per-task accuracy rows for a mudsc table (split {split!r}, experiment {experiment!r})")
    refs = _reference_values(_select(every, experiment=experiment, split=split))
    tasks = sorted({r["task"] for r in tasks_rows})
    lines: dict[tuple, dict[str, float]] = {}
    for r in tasks_rows + joint_rows:
        line = _Line(r.get("experiment"), r["method"], r.get("label") or r["method"])
        value = _value(r, normalized and r["task"] != "joint", refs)
        if value is not None:
            lines.setdefault(line, {})[r["task"]] = value
    order = sorted(lines, key=lambda l: (REFERENCE_ORDER.index(l.method) if l.method in REFERENCE_ORDER
                                         else len(REFERENCE_ORDER)))
    body = []
    for line in order:
        cells = lines[line]
        per_task = [cells.get(t) for t in tasks]
        avg = sum(per_task) / len(per_task) if all(v is not None for v in per_task) else None
        body.append([line.label] + [_fmt(v) for v in [cells.get("joint")] + per_task + [avg]])
    return _markdown(["method", "Joint"] + tasks + ["Avg"], body, [False] + [True] * (len(tasks) + 2))


def _fmt(value: Optional[float]) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def render_table(rows: Rows, kind: str, *, normalized: bool = False, split: str = "test",
                 experiment: Optional[str] = None, metric: Union[str, Mapping[str, str], None] = None,
                 group: Optional[str] = None, all_k: bool = False, params: str = "all",
                 stages: Sequence[str] = TABLE_STAGES) -> str:
    """A GitHub-Markdown table of ``rows`` (dicts of :data:`~src.evaluate.rows.ROW_FIELDS`).

    ``kind``:

    * ``pertask`` (KnOTS Table 1): one line per method, a column per task (sorted) of ``metric``
      (``acc``), ``avg``, and ``params``: the line's hyperparameters (``lam=0.5, density=0.2``;
      empty for reference rows; the column is left out when every line's is empty).
    * ``joint`` (KnOTS Table A2): rows of task ``joint``; ``Union Hits@k`` for every k the rows
      hold (or only ``metric``), then one column per dataset with the first metric (every metric
      with ``all_k``), and ``params``.
    * ``cart`` (CART Table 1): absolute ``metric`` (``acc``) per task and their ``mean``; no params.
    * ``mudsc`` (MuDSC Table 1): ``Joint`` (union Hits@1: every class of the combined tasks), then
      each task's accuracy with its own head and their ``Avg``; one line per method.
    * ``compositional``: ``held-in avg`` and ``generalization avg`` per method (the mean over the
      tasks of each ``group`` of their metric: ``metric``, or each task's own, see
      :data:`PRIMARY_METRICS`), and ``params``.

    ``normalized`` shows value / finetuned (see the module notes); ``split``, ``experiment``,
    ``group`` and ``stages`` filter the rows; ``params`` is ``all`` (every hyperparameter),
    ``varied`` (only those that vary among the method's grid rows) or ``none`` (no column).
    Raises ``ValueError`` when no row fits.
    """
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown table kind {kind!r}; known: {TABLE_KINDS}")
    if params not in PARAMS_MODES:
        raise ValueError(f"params must be one of {PARAMS_MODES}, not {params!r}")
    if kind == "cart" and normalized:
        raise ValueError("the cart table shows absolute accuracy; use the pertask table for normalized values")
    every = _dedup(rows)
    if kind == "mudsc":
        return _mudsc_table(every, experiment, split, tuple(stages), normalized)
    base = _select(every, experiment=experiment, split=split, stages=tuple(stages), group=group,
                   joint=(kind == "joint"))
    if kind == "joint":
        chosen = _select(base, metric=metric) if isinstance(metric, str) else base
    elif kind == "compositional":
        base = [r for r in base if r.get("group") in GROUPS]
        task_metric = _task_metrics(base, metric)
        chosen = [r for r in base if task_metric.get(r.get("task")) == r.get("metric")]
    elif isinstance(metric, str):
        chosen = _select(base, metric=metric)
    else:  # each task in its own metric (a mapping task -> name, else acc / EM-F1 / SP-ROUGE ...)
        task_metric = _task_metrics(base, metric)
        chosen = [r for r in base if task_metric.get(r.get("task")) == r.get("metric")]
    if not chosen:
        what = {"experiment": experiment, "split": split, "stages": list(stages), "metric": metric,
                "group": group, "task": "joint" if kind == "joint" else "not joint"}
        raise ValueError(f"no rows for a {kind} table with {what}; the rows hold {_available(every)}")
    refs = _reference_values(_select(every, experiment=experiment, split=split))
    lines, multi = _lines_of(chosen)
    grid = _select(every, experiment=experiment, stages=("grid",))

    def grid_of(line):
        return [r for r in grid if _line(r, multi) == line]

    if kind in ("pertask", "cart"):
        return _render_pertask(chosen, lines, multi, normalized, refs, kind, params, grid_of)
    if kind == "joint":
        return _render_joint(chosen, lines, multi, normalized, refs, all_k, params, grid_of)
    return _render_compositional(chosen, lines, multi, normalized, refs, params, grid_of)


def _cells(rows, multi, column_of) -> dict[tuple, Mapping[str, Any]]:
    """``(line, column) -> row``, the later row winning."""
    cells = {}
    for r in rows:
        cells[(_line(r, multi), column_of(r))] = r
    return cells


def _with_params(header, body, numeric, params_texts, mode):
    if mode != "none" and any(params_texts):
        header = [*header, "params"]
        body = [[*row, text] for row, text in zip(body, params_texts)]
        numeric = [*numeric, False]
    return _markdown(header, body, numeric)


def _render_pertask(rows, lines, multi, normalized, refs, kind, params, grid_of) -> str:
    tasks = sorted({r.get("task") for r in rows}, key=str)
    cells = _cells(rows, multi, lambda r: r.get("task"))
    body, params_texts = [], []
    for line in lines:
        here = [cells.get((line, t)) for t in tasks]
        values = [None if r is None else _value(r, normalized, refs) for r in here]
        body.append([_line_name(line), *(_fmt(v) for v in values), _fmt(_mean(values))])
        params_texts.append(_params_cell([r for r in here if r is not None], params, grid_of(line)))
    header = ["method", *map(str, tasks), "mean" if kind == "cart" else "avg"]
    numeric = [False] + [True] * (len(tasks) + 1)
    if kind == "cart":
        return _markdown(header, body, numeric)
    return _with_params(header, body, numeric, params_texts, params)


def _render_joint(rows, lines, multi, normalized, refs, all_k, params, grid_of) -> str:
    metrics = sorted({r.get("metric") for r in rows}, key=_metric_sort_key)
    datasets = sorted({r.get("dataset") for r in rows if r.get("dataset") != "union"}, key=lambda d: str(d).lower())
    columns = [("union", m) for m in metrics if any(r.get("dataset") == "union" and r.get("metric") == m for r in rows)]
    for d in datasets:
        have = [m for m in metrics if any(r.get("dataset") == d and r.get("metric") == m for r in rows)]
        columns += [(d, m) for m in (have if all_k else have[:1])]
    cells = _cells(rows, multi, lambda r: (r.get("dataset"), r.get("metric")))
    body, params_texts = [], []
    for line in lines:
        here = [cells.get((line, c)) for c in columns]
        body.append([_line_name(line), *(_fmt(None if r is None else _value(r, normalized, refs)) for r in here)])
        params_texts.append(_params_cell([r for r in here if r is not None], params, grid_of(line)))
    header = ["method", *(f"{'Union' if d == 'union' else d} {_metric_title(m)}" for d, m in columns)]
    return _with_params(header, body, [False] + [True] * len(columns), params_texts, params)


def _render_compositional(rows, lines, multi, normalized, refs, params, grid_of) -> str:
    groups = [g for g in GROUPS if any(r.get("group") == g for r in rows)]
    tasks = {g: sorted({r.get("task") for r in rows if r.get("group") == g}, key=str) for g in groups}
    cells = _cells(rows, multi, lambda r: (r.get("group"), r.get("task")))
    body, params_texts = [], []
    for line in lines:
        row_out, used = [_line_name(line)], []
        for g in groups:
            here = [cells.get((line, (g, t))) for t in tasks[g]]
            used += [r for r in here if r is not None]
            row_out.append(_fmt(_mean([None if r is None else _value(r, normalized, refs) for r in here])))
        body.append(row_out)
        params_texts.append(_params_cell(used, params, grid_of(line)))
    header = ["method", *(_GROUP_TITLES[g] for g in groups)]
    return _with_params(header, body, [False] + [True] * len(groups), params_texts, params)


# ----------------------------------------------------------------------------- plots


def _new_figure(nrows: int, ncols: int, width: float, height: float):
    """A figure drawn by the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    """Write the PNG through a temporary sibling, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _grid_points(rows, multi, normalized, refs) -> dict[tuple, dict]:
    """``(line, split, params json) -> {"params", "values": {task: value}}`` of grid rows."""
    points: dict[tuple, dict] = {}
    for r in rows:
        key = (_line(r, multi), r.get("split"), _canonical_json(r.get("params")) + "|" + _canonical_json(r.get("tasks")))
        point = points.setdefault(key, {"params": dict(r.get("params") or {}), "values": {}})
        point["values"][(r.get("group"), r.get("task"))] = _value(r, normalized, refs)
    return points


def _complete_means(points: dict[tuple, dict], what: str) -> dict[tuple, dict]:
    """Each point's mean over tasks (per group when grouped); a point lacking a task that other
    points of its line and split have is dropped, with one warning."""
    coverage: dict[tuple, set] = {}
    for (line, split, _), p in points.items():
        coverage.setdefault((line, split), set()).update(p["values"])
    kept, dropped = {}, 0
    for key, p in points.items():
        line, split, _ = key
        if set(p["values"]) != coverage[(line, split)] or any(v is None for v in p["values"].values()):
            dropped += 1
            continue
        kept[key] = p
    if dropped:
        warnings.warn(f"{what}: {dropped} grid point(s) left out: they lack a task (or a normalized "
                      f"denominator) that the other points of their method and split have", stacklevel=3)
    return kept


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_sensitivity(rows: Rows, path, *, metric: str = "acc", normalized: bool = False,
                     experiment: Optional[str] = None, group: Optional[str] = None,
                     methods: Optional[Sequence[str]] = None, splits: Sequence[str] = ("val", "test"),
                     title: Optional[str] = None) -> dict[str, Any]:
    """Hyperparameter sensitivity of every method with grid rows, as a PNG at ``path``.

    One panel per (method, varied hyperparameter): x = the hyperparameter's values, y = the
    mean over tasks of ``metric`` (percent; normalized if asked; only tasks of ``group`` when
    given), one line per split in ``splits`` that has grid rows (test grid rows are often absent:
    then only val). When a method's grid varies several hyperparameters, each panel is the slice
    through the selected point: the other varied hyperparameters are held at their selected
    values (the last ``selected`` row's params; without one, the best grid point on the first
    split), so a "tune lambda, then the pruning parameter" search gives one panel per parameter.
    The selected point is marked (dotted vertical line, stars on the curves; a star for the mean
    of its ``selected`` test rows too when there is no test grid). x is numeric when every value
    is a number, else categorical. A grid point lacking a task its method's other points have is
    left out (with a warning). Methods whose grid has one point only are skipped.

    ``methods`` restricts to those method names. Returns ``{"path", "panels"}``, each panel
    ``{"method", "label", "param", "series": {split: [(x, y%), ...]}, "selected": x or None,
    "anchor": "selected" | "best"}``. Raises ``ValueError`` when nothing can be plotted.
    """
    every = _dedup(rows)
    pool = _select(every, experiment=experiment, metric=metric, group=group, joint=False)
    if methods is not None:
        pool = [r for r in pool if r.get("method") in methods]
    grid = [r for r in pool if r.get("stage") == "grid" and r.get("split") in splits]
    if not grid:
        raise ValueError(f"no grid rows of metric {metric!r} (splits {list(splits)}, experiment {experiment!r}, "
                         f"group {group!r}) to plot; the rows hold {_available(every)}")
    refs = _reference_values(_select(every, experiment=experiment, metric=metric))
    lines, multi = _lines_of(grid)
    points = _complete_means(_grid_points(grid, multi, normalized, refs), "sensitivity")
    selected_rows = [r for r in pool if r.get("stage") == "selected"]

    panels = []
    for line in lines:
        mine = {k: p for k, p in points.items() if k[0] == line}
        line_grid = [r for r in grid if _line(r, multi) == line]
        varied = _varied_keys(line_grid)
        if not mine or not varied:
            continue
        means = {}  # split -> [(params, mean)]
        for (_, split, _), p in mine.items():
            means.setdefault(split, []).append((p["params"], sum(p["values"].values()) / len(p["values"])))
        sel = [r for r in selected_rows if _line(r, multi) == line]
        if sel:
            anchor, anchor_kind = dict(sel[-1].get("params") or {}), "selected"
        else:
            first = next(s for s in splits if s in means)
            anchor, anchor_kind = dict(max(means[first], key=lambda pm: pm[1])[0]), "best"
        for param in varied:
            others = [k for k in varied if k != param]
            # the curve through the anchor; in a staged search (lambda first at a starting top-k, then
            # top-k) the anchor's other values may have been tried with one value of `param` only:
            # then the curve is the stage that varied `param` (the other values it was searched at)
            key_of = lambda pr: tuple(_canonical_json(pr.get(k)) for k in others)  # noqa: E731
            first_split = next((sp for sp in splits if sp in means), None)
            counts: dict[tuple, set] = {}
            for pr, _ in means.get(first_split, []):
                counts.setdefault(key_of(pr), set()).add(_canonical_json(pr.get(param)))
            at = key_of(anchor)
            if len(counts.get(at, ())) < 2 and counts:
                at = max(counts, key=lambda k: len(counts[k]))
            series = {}
            for split in splits:
                pts = [(pr.get(param), y) for pr, y in means.get(split, []) if key_of(pr) == at]
                if pts:
                    series[split] = sorted(pts, key=lambda xy: (0, xy[0], "") if _is_number(xy[0]) else (1, 0, str(xy[0])))
            if not series:
                continue
            sel_test = None
            if anchor_kind == "selected" and "test" not in series:
                test_rows = [r for r in sel if r.get("split") == "test"]
                values = [_value(r, normalized, refs) for r in test_rows]
                sel_test = _mean(values)
            panels.append({"method": line.method, "label": _line_name(line), "param": param,
                           "series": {s: [(x, 100.0 * y) for x, y in v] for s, v in series.items()},
                           "selected": anchor.get(param), "anchor": anchor_kind,
                           "selected_test": None if sel_test is None else 100.0 * sel_test})
    if not panels:
        raise ValueError("no method's grid varies a hyperparameter (with complete points); nothing to plot")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(nrows, ncols, 4.2, 3.2)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ylabel = f"mean {'normalized ' if normalized else ''}{metric} (%)"
    for ax, panel in zip(axes, panels):
        xs_all = [x for s in panel["series"].values() for x, _ in s]
        numeric = all(_is_number(x) for x in xs_all)
        if numeric:
            def pos(x):
                return x
        else:
            cats = sorted({str(x) for x in xs_all})
            def pos(x, cats=cats):
                return cats.index(str(x)) if str(x) in cats else None
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        for split, pts in panel["series"].items():
            ax.plot([pos(x) for x, _ in pts], [y for _, y in pts], marker="o", label=split)
            hit = [y for x, y in pts if _canonical_json(x) == _canonical_json(panel["selected"])]
            if hit:
                ax.plot([pos(panel["selected"])], hit[:1], marker="*", markersize=14, color="black", linestyle="none")
        if panel["selected"] is not None and pos(panel["selected"]) is not None:
            ax.axvline(pos(panel["selected"]), color="gray", linestyle=":",
                       label="selected" if panel["anchor"] == "selected" else "best on " + next(iter(panel["series"])))
            if panel["selected_test"] is not None:
                ax.plot([pos(panel["selected"])], [panel["selected_test"]], marker="*", markersize=14,
                        color="tab:red", linestyle="none", label="selected (test)")
        ax.set_title(f"{panel['label']}: {panel['param']}")
        ax.set_xlabel(panel["param"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return {"path": _save_png(fig, path), "panels": panels}


def plot_heldin_vs_generalization(rows: Rows, path, *, split: str = "val",
                                  metric: Union[str, Mapping[str, str], None] = None, normalized: bool = False,
                                  experiment: Optional[str] = None, stages: Sequence[str] = ("grid",),
                                  title: Optional[str] = None) -> dict[str, Any]:
    """Held-in average vs generalization average of every grid point, as a PNG at ``path``.

    A point is one (method, params, merged tasks) of ``stages`` rows on ``split`` with ``group``
    held_in / generalization; its coordinates are the means (percent) over the tasks of each
    group of each task's metric (``metric``, or each task's own, see :data:`PRIMARY_METRICS`),
    normalized if asked. A point lacking a task other points of its method have is left out
    (with a warning), as is one without both groups. One colour per method; the title gives
    Pearson's r and its p-value over all points (``scipy.stats.pearsonr``; ``nan`` with fewer
    than 2 points or a constant coordinate).

    Returns ``{"path", "r", "p", "n", "points"}``, each point ``{"method", "label", "params",
    "held_in", "generalization"}`` (fractions). Raises ``ValueError`` when there is no point.
    """
    every = _dedup(rows)
    pool = _select(every, experiment=experiment, split=split, stages=tuple(stages), joint=False)
    pool = [r for r in pool if r.get("group") in GROUPS]
    task_metric = _task_metrics(pool, metric)
    pool = [r for r in pool if task_metric.get(r.get("task")) == r.get("metric")]
    refs = _reference_values(_select(every, experiment=experiment, split=split))
    lines, multi = _lines_of(pool)
    points = _complete_means(_grid_points(pool, multi, normalized, refs), "scatter")
    out = []
    for (line, _, _), p in points.items():
        by_group = {g: [v for (grp, _), v in p["values"].items() if grp == g] for g in GROUPS}
        if not all(by_group.values()):
            continue
        out.append({"method": line.method, "label": _line_name(line), "params": p["params"],
                    "held_in": sum(by_group["held_in"]) / len(by_group["held_in"]),
                    "generalization": sum(by_group["generalization"]) / len(by_group["generalization"])})
    if not out:
        raise ValueError(f"no {list(stages)} point on split {split!r} has both held_in and generalization rows; "
                         f"the rows hold {_available(every)}")
    x = [p["held_in"] for p in out]
    y = [p["generalization"] for p in out]
    r = p_value = float("nan")
    if len(out) >= 2 and len(set(x)) > 1 and len(set(y)) > 1:
        from scipy.stats import pearsonr
        res = pearsonr(x, y)
        r, p_value = float(res[0]), float(res[1])

    fig = _new_figure(1, 1, 5.5, 4.5)
    ax = fig.subplots()
    colours = {}
    for line in lines:
        mine = [p for p in out if p["label"] == _line_name(line) and p["method"] == line.method]
        if not mine:
            continue
        colours[line] = f"C{len(colours) % 10}"
        ax.scatter([100 * p["held_in"] for p in mine], [100 * p["generalization"] for p in mine],
                   color=colours[line], label=_line_name(line), alpha=0.8)
    kind = "normalized " if normalized else ""
    ax.set_xlabel(f"held-in avg {kind}({split}, %)")
    ax.set_ylabel(f"generalization avg {kind}({split}, %)")
    stats = f"Pearson r = {r:.3f}, p = {p_value:.3g}" if math.isfinite(r) else "Pearson r = nan"
    ax.set_title(f"{title + ': ' if title else ''}{stats} (n = {len(out)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return {"path": _save_png(fig, path), "r": r, "p": p_value, "n": len(out), "points": out}


# ----------------------------------------------------------------------------- command line


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.evaluate.report",
        description="Render Markdown tables and PNG plots from result rows (JSON lines); no model is loaded.")
    p.add_argument("rows", nargs="+", type=Path, help="row files (JSON lines); a later file's row wins")
    p.add_argument("--table", choices=TABLE_KINDS, help="the table to render")
    p.add_argument("--normalized", action="store_true", help="value / finetuned (not for --table cart)")
    p.add_argument("--split", default="test", help="split of the table's rows (default: test)")
    p.add_argument("--experiment", help="only rows of this experiment")
    p.add_argument("--metric", help="metric (default: acc for pertask/cart/sensitivity, every hits@k for joint, "
                                    "each task's own for compositional/scatter)")
    p.add_argument("--group", help="only rows of this group (held_in / generalization) for pertask/cart/sensitivity")
    p.add_argument("--all-k", action="store_true", help="joint: every metric per dataset, not only the first")
    p.add_argument("--params", choices=PARAMS_MODES, default="all",
                   help="params column: every hyperparameter, those varied in the grid, or none")
    p.add_argument("--out", type=Path, help="write the table here (default: print it)")
    p.add_argument("--plot", choices=PLOT_KINDS, help="also draw this plot (needs --plot-out)")
    p.add_argument("--plot-out", type=Path, help="PNG file of --plot")
    p.add_argument("--plot-split", default="val", help="scatter: split of the grid rows (default: val)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.table and not args.plot:
        parser.error("nothing to do: give --table and/or --plot")
    if args.plot and not args.plot_out:
        parser.error("--plot needs --plot-out FILE.png")
    if args.plot_out and not args.plot:
        parser.error("--plot-out needs --plot sensitivity|scatter")
    inputs = {os.path.realpath(p) for p in args.rows}
    for out in (args.out, args.plot_out):
        if out is not None and os.path.realpath(out) in inputs:
            parser.error(f"{out}: is one of the row files read; refusing to overwrite it")
    rows: list[dict[str, Any]] = []
    for path in args.rows:
        if not path.is_file():
            parser.error(f"{path}: no such row file")
        try:
            rows += read_rows(path)
        except ValueError as e:
            parser.error(str(e))
    if not rows:
        parser.error(f"no rows in {', '.join(map(str, args.rows))}")
    try:
        if args.table:
            text = render_table(rows, args.table, normalized=args.normalized, split=args.split,
                                experiment=args.experiment, metric=args.metric, group=args.group,
                                all_k=args.all_k, params=args.params)
            if args.out:
                _write_text(args.out, text)
                print(f"report: wrote {args.out}", file=sys.stderr)
            else:
                sys.stdout.write(text)
        if args.plot == "sensitivity":
            plot_sensitivity(rows, args.plot_out, metric=args.metric or "acc", normalized=args.normalized,
                             experiment=args.experiment, group=args.group)
            print(f"report: wrote {args.plot_out}", file=sys.stderr)
        elif args.plot == "scatter":
            res = plot_heldin_vs_generalization(rows, args.plot_out, split=args.plot_split, metric=args.metric,
                                                normalized=args.normalized, experiment=args.experiment)
            print(f"report: wrote {args.plot_out} (Pearson r = {res['r']:.3f}, p = {res['p']:.3g}, "
                  f"n = {res['n']})", file=sys.stderr)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
