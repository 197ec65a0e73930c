"""Reports from hand-built rows: every expected cell is computed by hand here."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from src.evaluate.report import (MISSING, main, plot_heldin_vs_generalization, plot_sensitivity,
                                 render_table)
from src.evaluate.rows import make_row

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FT = {"a": 0.90, "b": 0.80, "c": 0.60}  # finetuned accuracy per task (val and test alike)


def R(**kw):
    kw.setdefault("experiment", "demo")
    kw.setdefault("split", "test")
    kw.setdefault("metric", "acc")
    return make_row(**kw)


def task_rows(method, label, stage, values, params=None, split="test", finetuned=True, **kw):
    return [R(method=method, label=label, stage=stage, params=params, task=t, split=split, value=v,
              finetuned=FT[t] if finetuned else None, **kw) for t, v in values.items()]


TIES_GRID = {  # (lam, density) -> val accuracies
    (0.5, 0.2): {"a": 0.60, "b": 0.56, "c": 0.48},
    (1.0, 0.2): {"a": 0.72, "b": 0.64, "c": 0.60},
    (1.0, 0.5): {"a": 0.63, "b": 0.56, "c": 0.54},
}
TA_GRID = {  # lam -> {split: accuracies}
    0.3: {"val": {"a": 0.70, "b": 0.60, "c": 0.50}, "test": {"a": 0.68, "b": 0.58, "c": 0.47}},
    0.5: {"val": {"a": 0.80, "b": 0.70, "c": 0.55}, "test": {"a": 0.81, "b": 0.72, "c": 0.48}},
    1.0: {"val": {"a": 0.60, "b": 0.50, "c": 0.40}, "test": {"a": 0.58, "b": 0.49, "c": 0.39}},
}


def demo_rows():
    rows = []
    for (lam, density), values in TIES_GRID.items():
        rows += task_rows("ties", "TIES", "grid", values, {"lam": lam, "density": density}, split="val")
    # an incomplete grid point (only task a): left out of the plots
    rows += task_rows("ties", "TIES", "grid", {"a": 0.99}, {"lam": 0.7, "density": 0.2}, split="val")
    sel = {"lam": 1.0, "density": 0.2}
    rows += task_rows("ties", "TIES", "selected", {"a": 0.10}, sel)  # superseded below: the last row wins
    rows += task_rows("ties", "TIES", "selected", {"a": 0.72, "b": 0.64, "c": 0.54}, sel)
    # ensemble: no label (the method name shows) and no finetuned denominator (the finetuned line's is used)
    rows += task_rows("ensemble", None, "reference", {"a": 0.63, "b": 0.56, "c": 0.42}, finetuned=False)
    for lam, by_split in TA_GRID.items():
        for split, values in by_split.items():
            rows += task_rows("task_arithmetic", "Task Arithmetic", "grid", values,
                              {"lam": lam, "rescale": False}, split=split)
    rows += task_rows("task_arithmetic", "Task Arithmetic", "selected", TA_GRID[0.5]["test"],
                      {"lam": 0.5, "rescale": False})
    rows += task_rows("zeroshot", "Zero-shot", "reference", {"a": 0.45, "b": 0.40})  # no task c
    rows += task_rows("finetuned", "Finetuned", "reference", FT)
    rows += task_rows("finetuned", "Finetuned", "reference", {"a": 0.91, "b": 0.81, "c": 0.61}, split="val")
    # joint benchmark rows
    for method, label, stage, params, values in [
        ("ties", "TIES", "selected", sel, {("union", 1): 0.46, ("union", 3): 0.70, ("union", 5): 0.80,
                                           ("da", 1): 0.50, ("da", 3): 0.75, ("db", 1): 0.40}),
        ("ensemble", None, "reference", None, {("union", 1): 0.41, ("union", 3): 0.65, ("da", 1): 0.45}),
    ]:
        for (dataset, k), v in values.items():
            rows.append(R(method=method, label=label, stage=stage, params=params, task="joint",
                          dataset=dataset, metric=f"hits@{k}", value=v))
    return rows


def table_lines(text):
    return text.rstrip("\n").split("\n")


# ----------------------------------------------------------------------------- tables


def test_pertask_absolute_order_missing_params_and_last_duplicate_wins():
    lines = table_lines(render_table(demo_rows(), "pertask"))
    assert lines == [
        "| method | a | b | c | avg | params |",
        "|---|---:|---:|---:|---:|---|",
        "| Finetuned | 90.0 | 80.0 | 60.0 | 76.7 |  |",          # (90 + 80 + 60) / 3 = 76.67
        f"| Zero-shot | 45.0 | 40.0 | {MISSING} | {MISSING} |  |",  # no c: no avg either
        "| ensemble | 63.0 | 56.0 | 42.0 | 53.7 |  |",           # 161 / 3 = 53.67
        "| TIES | 72.0 | 64.0 | 54.0 | 63.3 | lam=1, density=0.2 |",  # a = 72.0, not the earlier 10.0
        "| Task Arithmetic | 81.0 | 72.0 | 48.0 | 67.0 | lam=0.5, rescale=False |",
    ]
    assert MISSING == "–"


def test_pertask_normalized_avg_is_mean_of_normalized_values():
    lines = table_lines(render_table(demo_rows(), "pertask", normalized=True))
    # TIES: 72/90 = 80, 64/80 = 80, 54/60 = 90 -> (80 + 80 + 90) / 3 = 83.33 (a ratio of means would be 82.6)
    # TA: 81/90 = 90, 72/80 = 90, 48/60 = 80 -> 86.67; ensemble has no `finetuned`: divided by the finetuned line
    assert lines[2:] == [
        "| Finetuned | 100.0 | 100.0 | 100.0 | 100.0 |  |",
        f"| Zero-shot | 50.0 | 50.0 | {MISSING} | {MISSING} |  |",
        "| ensemble | 70.0 | 70.0 | 70.0 | 70.0 |  |",
        "| TIES | 80.0 | 80.0 | 90.0 | 83.3 | lam=1, density=0.2 |",
        "| Task Arithmetic | 90.0 | 90.0 | 80.0 | 86.7 | lam=0.5, rescale=False |",
    ]


def test_pertask_params_modes_split_and_metric():
    rows = demo_rows()
    varied = table_lines(render_table(rows, "pertask", params="varied"))
    assert varied[-1].endswith("| 67.0 | lam=0.5 |")  # rescale never varies in TA's grid
    assert varied[-2].endswith("| lam=1, density=0.2 |")
    none = table_lines(render_table(rows, "pertask", params="none"))
    assert none[0] == "| method | a | b | c | avg |"
    # the val split holds only the finetuned reference (grid rows are not table rows)
    assert table_lines(render_table(rows, "pertask", split="val")) == [
        "| method | a | b | c | avg |", "|---|---:|---:|---:|---:|", "| Finetuned | 91.0 | 81.0 | 61.0 | 77.7 |"]  # 233 / 3
    with pytest.raises(ValueError, match="no rows for a pertask table"):
        render_table(rows, "pertask", metric="em_f1")
    with pytest.raises(ValueError, match="unknown table kind"):
        render_table(rows, "nope")


def test_cart_table_is_absolute_with_mean_column():
    lines = table_lines(render_table(demo_rows(), "cart"))
    assert lines[0] == "| method | a | b | c | mean |"
    assert lines[5] == "| TIES | 72.0 | 64.0 | 54.0 | 63.3 |"
    with pytest.raises(ValueError, match="absolute"):
        render_table(demo_rows(), "cart", normalized=True)


def test_joint_table_union_hits_then_per_dataset():
    lines = table_lines(render_table(demo_rows(), "joint"))
    assert lines == [
        "| method | Union Hits@1 | Union Hits@3 | Union Hits@5 | da Hits@1 | db Hits@1 | params |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| ensemble | 41.0 | 65.0 | {MISSING} | 45.0 | {MISSING} |  |",
        "| TIES | 46.0 | 70.0 | 80.0 | 50.0 | 40.0 | lam=1, density=0.2 |",
    ]
    all_k = table_lines(render_table(demo_rows(), "joint", all_k=True, params="none"))
    assert all_k[0] == "| method | Union Hits@1 | Union Hits@3 | Union Hits@5 | da Hits@1 | da Hits@3 | db Hits@1 |"
    assert all_k[3] == "| TIES | 46.0 | 70.0 | 80.0 | 50.0 | 75.0 | 40.0 |"
    one = table_lines(render_table(demo_rows(), "joint", metric="hits@3", params="none"))
    assert one[0] == "| method | Union Hits@3 | da Hits@3 |"
    assert one[2:] == [f"| ensemble | 65.0 | {MISSING} |", "| TIES | 70.0 | 75.0 |"]


def test_several_experiments_are_told_apart_or_filtered():
    rows = demo_rows() + [R(experiment="other", method="ties", label="TIES", stage="selected",
                            params={"lam": 0.3}, task="a", value=0.5)]
    lines = table_lines(render_table(rows, "pertask", params="none"))
    assert lines[2].startswith("| demo: Finetuned |")
    assert lines[-1] == f"| other: TIES | 50.0 | {MISSING} | {MISSING} | {MISSING} |"
    assert render_table(rows, "pertask", experiment="demo") == render_table(demo_rows(), "pertask")


# ----------------------------------------------------------------------------- compositional


def comp_rows():
    def row(method, label, stage, task, group, value, metric="acc", split="test", params=None):
        return make_row(experiment="comp", method=method, label=label, stage=stage, params=params, task=task,
                        group=group, split=split, metric=metric, value=value)
    rows = [
        row("zeroshot", "Pretrained", "reference", "h1", "held_in", 0.50),
        row("zeroshot", "Pretrained", "reference", "h2", "held_in", 0.30, metric="em_f1"),
        row("zeroshot", "Pretrained", "reference", "g1", "generalization", 0.35),  # no g2
        row("task_arithmetic", "TA", "selected", "h1", "held_in", 0.70, params={"lam": 0.5}),
        row("task_arithmetic", "TA", "selected", "h2", "held_in", 0.50, metric="em_f1", params={"lam": 0.5}),
        row("task_arithmetic", "TA", "selected", "h2", "held_in", 0.99, metric="f1", params={"lam": 0.5}),
        row("task_arithmetic", "TA", "selected", "g1", "generalization", 0.40, params={"lam": 0.5}),
        row("task_arithmetic", "TA", "selected", "g2", "generalization", 0.30, params={"lam": 0.5}),
    ]
    grid = {  # (method, lam) -> (h1, h2, g1, g2) on val
        ("task_arithmetic", 0.3): (0.60, 0.40, 0.42, 0.30),
        ("task_arithmetic", 0.5): (0.70, 0.52, 0.40, 0.28),
        ("task_arithmetic", 1.0): (0.75, 0.60, 0.33, 0.21),
        ("ties", 0.5): (0.66, 0.50, 0.41, 0.31),
        ("ties", 1.0): (0.72, 0.58, 0.36, 0.20),
    }
    for (method, lam), (h1, h2, g1, g2) in grid.items():
        label = "TA" if method == "task_arithmetic" else "TIES"
        for task, group, value, metric in [("h1", "held_in", h1, "acc"), ("h2", "held_in", h2, "em_f1"),
                                           ("g1", "generalization", g1, "acc"), ("g2", "generalization", g2, "acc")]:
            rows.append(row(method, label, "grid", task, group, value, metric=metric, split="val",
                            params={"lam": lam}))
    return rows, grid


def test_compositional_table_means_per_group_with_each_tasks_metric():
    rows, _ = comp_rows()
    lines = table_lines(render_table(rows, "compositional"))
    # TA: held-in (70 + 50) / 2 = 60 (h2's em_f1, not its f1), generalization (40 + 30) / 2 = 35
    assert lines == [
        "| method | held-in avg | generalization avg | params |",
        "|---|---:|---:|---|",
        f"| Pretrained | 40.0 | {MISSING} |  |",
        "| TA | 60.0 | 35.0 | lam=0.5 |",
    ]
    f1 = table_lines(render_table(rows, "compositional", metric={"h2": "f1"}, params="none"))
    assert f1[3] == "| TA | 84.5 | 35.0 |"  # (70 + 99) / 2


def test_scatter_r_equals_numpy_corrcoef(tmp_path):
    rows, grid = comp_rows()
    held_in = [(h1 + h2) / 2 for h1, h2, _, _ in grid.values()]
    general = [(g1 + g2) / 2 for _, _, g1, g2 in grid.values()]
    res = plot_heldin_vs_generalization(rows, tmp_path / "scatter.png")
    assert res["n"] == len(grid) == 5
    assert sorted(p["held_in"] for p in res["points"]) == pytest.approx(sorted(held_in))
    assert res["r"] == pytest.approx(np.corrcoef(held_in, general)[0, 1], abs=1e-12)
    assert 0.0 <= res["p"] <= 1.0
    png = (tmp_path / "scatter.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


# ----------------------------------------------------------------------------- sensitivity


def _mean(values):
    return 100 * sum(values) / len(values)


def test_sensitivity_slices_through_selected_point(tmp_path):
    with pytest.warns(UserWarning, match="1 grid point"):  # TIES lam 0.7 lacks tasks b and c
        res = plot_sensitivity(demo_rows(), tmp_path / "sens.png")
    panels = {(p["method"], p["param"]): p for p in res["panels"]}
    assert sorted(panels) == [("task_arithmetic", "lam"), ("ties", "density"), ("ties", "lam")]
    ties_lam = panels[("ties", "lam")]  # density held at the selected 0.2
    assert ties_lam["selected"] == 1.0 and ties_lam["anchor"] == "selected"
    assert list(ties_lam["series"]) == ["val"]  # no test grid rows
    assert [x for x, _ in ties_lam["series"]["val"]] == [0.5, 1.0]
    assert [y for _, y in ties_lam["series"]["val"]] == pytest.approx(
        [_mean(TIES_GRID[(0.5, 0.2)].values()), _mean(TIES_GRID[(1.0, 0.2)].values())])
    assert ties_lam["selected_test"] == pytest.approx(_mean([0.72, 0.64, 0.54]))
    ties_density = panels[("ties", "density")]  # lam held at the selected 1.0
    assert [x for x, _ in ties_density["series"]["val"]] == [0.2, 0.5]
    assert ties_density["series"]["val"][1][1] == pytest.approx(_mean(TIES_GRID[(1.0, 0.5)].values()))
    ta = panels[("task_arithmetic", "lam")]
    assert set(ta["series"]) == {"val", "test"} and ta["selected"] == 0.5
    assert [y for _, y in ta["series"]["test"]] == pytest.approx(
        [_mean(TA_GRID[lam]["test"].values()) for lam in (0.3, 0.5, 1.0)])
    png = (tmp_path / "sens.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_sensitivity_normalized_and_best_anchor_without_selection(tmp_path):
    rows = [r for r in demo_rows() if not (r["method"] == "task_arithmetic" and r["stage"] == "selected")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = plot_sensitivity(rows, tmp_path / "sens.png", normalized=True, methods=["task_arithmetic"])
    (ta,) = res["panels"]
    assert ta["anchor"] == "best" and ta["selected"] == 0.5  # best mean on val
    val = dict(ta["series"]["val"])
    assert val[0.5] == pytest.approx(_mean([0.80 / 0.9, 0.70 / 0.8, 0.55 / 0.6]))
    with pytest.raises(ValueError, match="no grid rows"):
        plot_sensitivity(rows, tmp_path / "x.png", metric="em_f1")


# ----------------------------------------------------------------------------- command line


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_module_writes_markdown_and_png(tmp_path):
    rows_file = write_rows(tmp_path / "rows.jsonl", demo_rows())
    out, png = tmp_path / "out" / "table.md", tmp_path / "out" / "sens.png"
    proc = subprocess.run(
        [sys.executable, "-m", "src.evaluate.report", str(rows_file), "--table", "pertask", "--normalized",
         "--split", "test", "--experiment", "demo", "--out", str(out), "--plot", "sensitivity",
         "--plot-out", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == render_table(demo_rows(), "pertask", normalized=True)
    data = png.read_bytes()
    assert len(data) > 0 and data.startswith(PNG_MAGIC)


def test_cli_in_process_scatter_stdout_and_errors(tmp_path, capsys):
    rows, _ = comp_rows()
    rows_file = write_rows(tmp_path / "comp.jsonl", rows)
    png = tmp_path / "scatter.png"
    assert main([str(rows_file), "--table", "compositional", "--plot", "scatter", "--plot-out", str(png)]) == 0
    captured = capsys.readouterr()
    assert captured.out == render_table(rows, "compositional")
    assert "Pearson r" in captured.err
    assert png.read_bytes().startswith(PNG_MAGIC)
    # a later file's row wins over an earlier one's
    newer = write_rows(tmp_path / "newer.jsonl", [dict(rows[3], value=0.9)])  # TA h1 0.70 -> 0.90
    assert main([str(rows_file), str(newer), "--table", "compositional", "--params", "none"]) == 0
    assert "| TA | 70.0 | 35.0 |" in capsys.readouterr().out  # (90 + 50) / 2
    for argv in ([str(rows_file)],                                                # nothing to do
                 [str(rows_file), "--table", "joint"],                            # no joint rows
                 [str(rows_file), "--table", "pertask", "--out", str(rows_file)],  # would overwrite its input
                 [str(tmp_path / "missing.jsonl"), "--table", "pertask"],
                 [str(rows_file), "--plot", "scatter"]):                          # no --plot-out
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert rows_file.read_text(encoding="utf-8").count("\n") == len(rows)
