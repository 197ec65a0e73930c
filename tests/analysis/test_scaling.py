"""Scaling with the number of merged models (src/analysis/scaling.py): the three samplers, the
confidence interval against a hand-worked case, the SLERP -> MLERP substitution, and end-to-end
runs on the tiny demo task models of tests/evaluate/conftest.py whose aggregated numbers are
recomputed here from the rows (selection re-derived from the grid rows, normalized accuracy from
the finetuned reference rows, the interval from tabulated t quantiles)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
from collections import Counter

import pytest

from src.analysis.scaling import (aggregate, cart_subsets, knots_subsets, main, mean_ci, nested_samples,
                                  run_scaling, subset_config, subset_methods)
from src.evaluate import EvalConfig, MethodSpec
from src.evaluate.rows import read_rows
from tests.evaluate.conftest import TASKS, demo_tasks  # noqa: F401  (the fixture)

EIGHT = [f"t{i}" for i in range(8)]
#: two-sided 95 % t quantiles t_{0.975, df} from a printed table
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764}


# ----- samplers ---------------------------------------------------------------------------
def test_nested_samples_extend_each_other_differ_across_draws_and_are_seeded():
    samples = nested_samples(EIGHT, sizes=range(2, 9), draws=20, seed=0)
    assert sorted(samples) == list(range(2, 9))
    for m in range(2, 9):
        assert len(samples[m]) == 20
        for s in samples[m]:
            assert len(s) == m and len(set(s)) == m and set(s) <= set(EIGHT)
    for d in range(20):  # within a draw, the size-m sample is the size-(m-1) one plus one task
        for m in range(3, 9):
            assert samples[m][d][:m - 1] == samples[m - 1][d]
    # the draws are different orders: 20 distinct full orders, and not one shared pair
    assert len(set(samples[8])) == 20
    assert len({frozenset(s) for s in samples[2]}) > 1
    assert nested_samples(EIGHT, range(2, 9), 20, seed=0) == samples
    assert nested_samples(EIGHT, range(2, 9), 20, seed=1) != samples
    # defaults by setting: 20 draws for vision, 5 for language; a draw does not depend on how many
    assert [len(v) for v in nested_samples(EIGHT).values()] == [20] * 7
    language = nested_samples(EIGHT, setting="language")
    assert [len(v) for v in language.values()] == [5] * 7
    assert all(language[m] == samples[m][:5] for m in range(2, 9))


def test_cart_takes_every_subset():
    subsets = cart_subsets(EIGHT, sizes=range(2, 9))
    # C(8, m) for m = 2..8
    assert {m: len(v) for m, v in subsets.items()} == {2: 28, 3: 56, 4: 70, 5: 56, 6: 28, 7: 8, 8: 1}
    for m, ss in subsets.items():
        assert len({frozenset(s) for s in ss}) == len(ss)
        assert all(len(s) == m and set(s) <= set(EIGHT) for s in ss)
    assert sorted(cart_subsets(TASKS)) == [2, 3]  # default sizes 2..n


def test_knots_draws_distinct_combinations_and_all_of_them_when_fewer_exist():
    subsets = knots_subsets(EIGHT, sizes=range(2, 9), draws=10, seed=0)
    # min(10, C(8, m)): 10 for m = 2..6, all 8 for m = 7, the one for m = 8
    assert {m: len(v) for m, v in subsets.items()} == {2: 10, 3: 10, 4: 10, 5: 10, 6: 10, 7: 8, 8: 1}
    for m, ss in subsets.items():
        assert len({frozenset(s) for s in ss}) == len(ss), f"size {m}: a combination drawn twice"
        assert all(len(s) == m and len(set(s)) == m and set(s) <= set(EIGHT) for s in ss)
    assert {frozenset(s) for s in subsets[7]} == {frozenset(c) for c in itertools.combinations(EIGHT, 7)}
    assert len(knots_subsets(EIGHT, sizes=[2], draws=50)[2]) == 28  # C(8, 2) < 50: every pair once
    assert knots_subsets(EIGHT, range(2, 9), 10, seed=0) == subsets
    assert knots_subsets(EIGHT, range(2, 9), 10, seed=1)[4] != subsets[4]
    with pytest.raises(ValueError, match="sizes"):
        knots_subsets(TASKS)  # the default sizes 2..8 need 8 tasks


# ----- the confidence interval ------------------------------------------------------------
def test_mean_ci_matches_a_hand_worked_case():
    # [1, 2, 3, 4]: mean 2.5; s^2 = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3 = 5 / 3, s = 1.2910;
    # t_{0.975, 3} = 3.1824 (table); half-width = 3.1824 * 1.2910 / sqrt(4) = 2.0542
    s = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)
    assert s == pytest.approx(1.2910, abs=1e-4)
    mean, half = mean_ci([1, 2, 3, 4])
    assert mean == 2.5
    assert half == pytest.approx(T975[3] * s / 2, abs=1e-3)
    assert half == pytest.approx(2.054, abs=1e-3)
    assert mean_ci([1, 2, 3, 4], level=0.9)[1] < half  # a lower level, a narrower interval
    assert mean_ci([0.7]) == (0.7, None)  # one value: the mean, no interval
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


# ----- one subset's configuration ------------------------------------------------------------
def test_slerp_becomes_mlerp_past_two_models_and_merged_directories_are_refused():
    methods = [MethodSpec("average", label="Average"), {"method": "slerp", "fixed": {"t": 0.3}}]
    two, three = subset_methods(methods, 2), subset_methods(methods, 3)
    assert [(s.method, s.label) for s in two] == [("average", "Average"), ("slerp", "SLERP / MLERP")]
    assert two[1].fixed == {"t": 0.3}
    assert [(s.method, s.label, s.fixed) for s in three] == [("average", "Average", None),
                                                               ("mlerp", "SLERP / MLERP", None)]
    both = [MethodSpec("slerp", label="SLERP"), MethodSpec("mlerp", label="MLERP")]
    assert [(s.method, s.label) for s in subset_methods(both, 2)] == [("slerp", "SLERP"), ("mlerp", "MLERP")]
    assert [(s.method, s.label) for s in subset_methods(both, 3)] == [("mlerp", "MLERP")]
    with pytest.raises(ValueError, match="merged directory"):
        subset_methods([MethodSpec("merged", path="somewhere")], 2)


def test_subset_config_per_protocol():
    base = EvalConfig(experiment="x", tasks=["d/a", "d/b", "d/c", "d/e"], generalization=["d/h"], protocol="quick",
                      methods=[MethodSpec("average")], grid_generalization=True)
    base.joint.enabled = True
    knots = subset_config(base, ["d/c", "d/a"], "knots")
    assert knots.tasks == ["d/a", "d/c"]  # the config's order
    assert knots.generalization == [] and knots.grid_generalization is False
    assert knots.protocol == "knots" and knots.joint.enabled is False and knots.report is False
    comp = subset_config(base, ["d/c", "d/a"], "compositional", grid_protocol="quick")
    assert comp.generalization == ["d/b", "d/e", "d/h"] and comp.grid_generalization is True
    assert comp.protocol == "quick"
    assert base.joint.enabled is True and base.tasks == ["d/a", "d/b", "d/c", "d/e"]  # not modified
    with pytest.raises(ValueError, match="not among"):
        subset_config(base, ["d/z"], "cart")
    chosen = dataclasses.replace(base, methods=[MethodSpec("average"), MethodSpec("slerp", label="SLERP")],
                                 only=["SLERP"])
    three = subset_config(chosen, ["d/a", "d/b", "d/c"], "compositional")
    assert [(s.method, s.label) for s in three.methods] == [("average", None), ("mlerp", "SLERP / MLERP")]
    assert three.only == ["SLERP", "SLERP / MLERP"]  # --only SLERP still runs it under its new label


# ----- end to end on the tiny demo task models -------------------------------------------------
LAMS_KNOTS = [0.3, 1.0]
LAMS_COMP = [0.5, 0.7]  # another grid: the same subset then holds two selections of TA


def base_config(demo_tasks, rows, lams) -> EvalConfig:
    return EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS], protocol="knots",
                      methods=[MethodSpec("average", label="Average"), MethodSpec("task_arithmetic", label="TA")],
                      grid={"lam": list(lams)}, rows=str(rows), progress=False, ensemble=False, zeroshot=False)


@pytest.fixture(scope="module")
def knots_run(demo_tasks, tmp_path_factory):
    rows = tmp_path_factory.mktemp("scaling") / "rows.jsonl"
    config = base_config(demo_tasks, rows, LAMS_KNOTS)
    return config, run_scaling(config, "knots", sizes=[2, 3], draws=5, seed=0)


def pick(rows, **what):
    return [r for r in rows if all(r.get(k) == v for k, v in what.items())]


def selected_lam(rows, subset, held_in, lams, normalized=True):
    """TA's lambda as selection should pick it: the argmax over ``lams`` (first on ties) of the mean
    over the held-in tasks of validation accuracy (divided by the finetuned validation accuracy)."""
    def score(lam):
        vals = []
        for t in held_in:
            (g,) = [r for r in pick(rows, method="task_arithmetic", stage="grid", split="val", task=t,
                                    tasks=sorted(subset)) if r["params"]["lam"] == lam]
            (f,) = pick(rows, method="finetuned", split="val", task=t, tasks=sorted(subset))
            vals.append(g["value"] / f["value"] if normalized else g["value"])
        return sum(vals) / len(vals)
    return max(lams, key=lambda lam: (score(lam), -lams.index(lam)))


def ci(values):
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975[n - 1] * s / math.sqrt(n)


def test_knots_scaling_end_to_end(knots_run):
    config, result = knots_run
    pairs = [("bbc_news", "color_names"), ("bbc_news", "world_cities"), ("color_names", "world_cities")]
    assert result.subsets == {2: pairs, 3: [TASKS]}  # C(3, 2) = 3 <= 5 draws: every pair
    rows = read_rows(config.rows)
    expected = {}  # (label, m) -> per-subset mean normalized accuracy
    for m, subsets in result.subsets.items():
        for subset in subsets:
            tasks = sorted(subset)
            mine = pick(rows, tasks=tasks)
            assert {r["task"] for r in mine} == set(subset)  # knots: evaluated on the merged tasks only
            lam = selected_lam(rows, subset, subset, LAMS_KNOTS)
            for method, label in (("average", "Average"), ("task_arithmetic", "TA")):
                sel = pick(mine, method=method, stage="selected", split="test", metric="acc")
                assert sorted(r["task"] for r in sel) == tasks
                if method == "task_arithmetic":  # selected on this subset's validation rows
                    assert {r["params"]["lam"] for r in sel} == {lam}
                per_task = []
                for r in sel:
                    (ref,) = pick(mine, method="finetuned", stage="reference", split="test", task=r["task"])
                    per_task.append(r["value"] / ref["value"])
                expected.setdefault((label, m), []).append(sum(per_task) / len(per_task))
    points = result.aggregate["points"]["normalized"]
    assert result.aggregate["lines"] == ["Average", "TA"]
    for (label, m), values in expected.items():
        mean, half = ci(values)
        got = points[label][m]
        assert got["n"] == len(values) == len(result.subsets[m])
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        if half is None:
            assert got["half_width"] is None
        else:
            assert got["half_width"] == pytest.approx(half, rel=2e-4)
    # the table prints them (percent, one decimal)
    text = result.written[0].read_text()
    assert result.written[0].name == "scaling.md" and result.written[1].name == "scaling.png"
    for label in ("Average", "TA"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {label} |")]
        p2, p3 = points[label][2], points[label][3]
        assert line == f"| {label} | {100 * p2['mean']:.1f} ± {100 * p2['half_width']:.1f} | {100 * p3['mean']:.1f} |"
    png = result.written[1].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def _forbid(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a finished scaling run called {what} again")
    return refuse


def test_rerun_evaluates_nothing_and_report_only_renders_the_same(knots_run, tmp_path, monkeypatch):
    import src.evaluate.loop as loop
    import src.evaluate.run as run

    config, result = knots_run
    rows = tmp_path / "rows.jsonl"
    shutil.copy(config.rows, rows)
    before = rows.read_bytes()
    monkeypatch.setattr(loop.Evaluator, "metrics", _forbid("Evaluator.metrics"))
    monkeypatch.setattr(loop.Evaluator, "predict", _forbid("Evaluator.predict"))
    monkeypatch.setattr(run, "ModelBank", _forbid("ModelBank (loading the base)"))
    again = run_scaling(dataclasses.replace(config, rows=str(rows)), "knots", sizes=[2, 3], draws=5, seed=0)
    assert rows.read_bytes() == before
    assert again.aggregate == result.aggregate

    # the command line, from the rows alone; the config's own protocol (quick) overridden
    methods = "\n".join(f"  - {{method: {m.method}, label: {m.label}}}" for m in config.methods)
    yaml = tmp_path / "x.yaml"
    yaml.write_text(f"experiment: tiny\ntasks: [{', '.join(config.tasks)}]\nrows: {rows}\nprotocol: quick\n"
                    f"methods:\n{methods}\nprogress: false\n")
    out = tmp_path / "out"
    rc = main(["--config", str(yaml), "--protocol", "knots", "--sizes", "[2, 3]", "--draws", "5", "--seed", "0",
               "--report_only", "true", "--out", str(out)])
    assert rc == 0
    assert (out / "scaling.md").read_text() == result.written[0].read_text()
    assert (out / "scaling.png").is_file()
    assert main(["--config", str(yaml), "--report_only", "true", "--out", str(out)]) == 2  # quick: not a scaling protocol


def test_compositional_scaling_end_to_end(knots_run, demo_tasks, tmp_path):
    config, _ = knots_run
    rows_file = tmp_path / "rows.jsonl"
    shutil.copy(config.rows, rows_file)  # the knots selections of the same subsets are in the file too
    comp = dataclasses.replace(base_config(demo_tasks, rows_file, LAMS_COMP), protocol="compositional",
                               methods=[MethodSpec("task_arithmetic", label="TA"), MethodSpec("slerp")])
    result = run_scaling(comp, sizes=[2, 3], draws=3, seed=0)
    for d in range(3):
        assert result.subsets[3][d][:2] == result.subsets[2][d]
    # seed 0 draws one pair twice and another once: the repeat counts per draw
    assert sorted(Counter(frozenset(s) for s in result.subsets[2]).values()) == [1, 2]
    rows = read_rows(rows_file)
    expected = {}  # (group, label, m) -> per-draw averages (a pair drawn twice counts twice)
    for m, samples in result.subsets.items():
        for sample in samples:
            tasks = sorted(sample)
            outside = [t for t in TASKS if t not in sample]
            lam = selected_lam(rows, sample, sample, LAMS_COMP)
            for method, label in (("task_arithmetic", "TA"), ("slerp" if m == 2 else "mlerp", "SLERP / MLERP")):
                sel = pick(rows, method=method, stage="selected", split="test", tasks=tasks, metric="acc")
                if method == "task_arithmetic":
                    sel = [r for r in sel if r["params"]["lam"] == lam]
                assert {r["label"] for r in sel} == {label}
                assert sorted(r["task"] for r in sel) == sorted(TASKS)  # held-in and generalization
                value = {r["task"]: r["value"] for r in sel}
                assert {r["task"] for r in sel if r["group"] == "generalization"} == set(outside) or m == 3
                expected.setdefault(("held_in", label, m), []).append(sum(value[t] for t in sample) / m)
                if outside:
                    expected.setdefault(("generalization", label, m), []).append(
                        sum(value[t] for t in outside) / len(outside))
    agg = result.aggregate
    assert agg["lines"] == ["TA", "SLERP / MLERP"]
    for (group, label, m), values in expected.items():
        mean, half = ci(values)
        got = agg["points"][group][label][m]
        assert got["n"] == len(values) == 3
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["half_width"] == pytest.approx(half, rel=2e-4, abs=1e-12)
    assert 3 not in agg["points"]["generalization"]["TA"]  # nothing is outside the full set
    text = result.written[0].read_text()
    assert "## Held-in average (%)" in text and "## Generalization average (%)" in text
    gen = agg["points"]["generalization"]["SLERP / MLERP"][2]
    general = text.split("## Generalization average (%)")[1]
    assert f"| SLERP / MLERP | {100 * gen['mean']:.1f} ± {100 * gen['half_width']:.1f} | – |" in general
    # from the same rows, the knots aggregation still reads the knots selections
    again = aggregate(rows, "knots", {2: [p for p in itertools.combinations(TASKS, 2)]}, grid_protocol="knots")
    assert again["points"]["normalized"]["TA"][2] == knots_run[1].aggregate["points"]["normalized"]["TA"][2]
