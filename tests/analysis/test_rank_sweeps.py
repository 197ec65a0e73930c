"""Rank sweeps (src/analysis/rank_sweeps.py) and the CART options they use (``center``, ``order`` in
src/merge/methods/cart.py).

The options are checked against numpy SVDs computed here (dense and LoRA-factored routes, with and
without a base model), and by identities: full-rank centred CART = the average, full-rank uncentred
= task arithmetic, rank 0 = the average / the base, top-k + bottom-(m-k) = full rank. The sweep
runs end to end on tiny demo LoRA task models (tests/evaluate/conftest.py; 2 tasks, 3 rank points,
LoRA ranks 2 / 4 / 8), and every number of ``rank_sweeps.md`` and every plotted point of
``rank_sweeps.png`` is recomputed here from the rows (the validation argmax of lambda included)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from src.analysis.rank_sweeps import (VARIANTS, RankSweepConfig, aggregate, build_parser, cart_method_specs, main,
                                      render_figure, run_rank_sweeps)
from src.evaluate import EvalConfig, EvaluationRun, MethodSpec
from src.evaluate.rows import read_rows
from src.merge import Sweep
from src.merge.registry import TensorGroup, get_method
from src.merge.updates import LowRank, densify
from tests.evaluate.conftest import TASKS, build_task_checkpoint, demo_tasks  # noqa: F401  (the fixture)

D = torch.float64


# ----- numpy references ---------------------------------------------------------------------
def np_lowrank(x: np.ndarray, k: int, order: str) -> np.ndarray:
    """Rank-k approximation of ``x`` from its k largest (``top``) or k smallest (``bottom``) of its
    min(O, I) singular directions, by numpy."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    m = min(x.shape)
    k = min(k, m)
    idx = slice(0, k) if order == "top" else slice(m - k, m)
    return (u[:, idx] * s[idx]) @ vt[idx]


def np_merge(updates, lam: float, k: int, center: bool, order: str) -> np.ndarray:
    """The merged UPDATE: centred ``mean + lam sum_i LR_k(dW_i - mean)``, uncentred ``lam sum_i LR_k(dW_i)``."""
    x = np.stack(updates)
    mean = x.mean(0)
    if center:
        return mean + lam * sum(np_lowrank(xi - mean, k, order) for xi in x)
    return lam * sum(np_lowrank(xi, k, order) for xi in x)


def dense_updates(n=3, O=9, I=7, seed=0):
    g = np.random.default_rng(seed)
    return [g.standard_normal((O, I)) for _ in range(n)]


def lora_updates(n=3, O=12, I=10, r=2, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(O, r, generator=g, dtype=D), torch.randn(r, I, generator=g, dtype=D), scale)
            for _ in range(n)]


def cart(group, **params):
    method = get_method("cart")
    p = method.make_params(**params)
    return densify(method.merge(method.prepare(group, p), p, {}))


# ----- the CART options against numpy -------------------------------------------------------
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("order", ["top", "bottom"])
@pytest.mark.parametrize("k", [0, 1, 3, 6, 7])  # 9 x 7 matrices: min(O, I) = 7
def test_dense_options_match_numpy(center, order, k):
    ups = dense_updates()
    got = cart(TensorGroup("blk.attn.w", None, [torch.from_numpy(u) for u in ups]),
               lam=1.3, rank=k, center=center, order=order)
    assert np.allclose(got.numpy(), np_merge(ups, 1.3, k, center, order), atol=1e-10, rtol=0)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("order", ["top", "bottom"])
@pytest.mark.parametrize("k", [1, 3, 4, 5, 8, 10])  # 12 x 10, three rank-2 updates: rank <= 6, min(O, I) = 10
def test_lora_factored_options_match_numpy(center, order, k):
    ups = lora_updates()
    method = get_method("cart")
    p = method.make_params(lam=0.7, rank=k, center=center, order=order)
    out = method.merge(method.prepare(TensorGroup("blk.attn.w", None, ups), p), p, {})
    assert isinstance(out, LowRank)  # the factored route: nothing O x I was decomposed
    ref = np_merge([densify(u).numpy() for u in ups], 0.7, k, center, order)
    assert np.allclose(densify(out).numpy(), ref, atol=1e-9, rtol=0)
    # the dense route of the same updates agrees
    dense = cart(TensorGroup("blk.attn.w", None, [densify(u) for u in ups]), lam=0.7, rank=k, center=center, order=order)
    assert np.allclose(dense.numpy(), ref, atol=1e-9, rtol=0)


def test_top_bottom_and_uncentred_differ_and_rank_ratio_sets_k():
    ups = dense_updates(seed=3)
    group = TensorGroup("blk.attn.w", None, [torch.from_numpy(u) for u in ups])
    outs = {(c, o): cart(group, lam=1.0, rank=2, center=c, order=o) for c in (True, False) for o in ("top", "bottom")}
    for a in outs:
        for b in outs:
            if a != b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    # k = max(1, int(rho * min(O, I))) for either order: rho 0.3 of 7 -> k = 2
    for c in (True, False):
        for o in ("top", "bottom"):
            assert torch.allclose(cart(group, lam=1.0, rank_ratio=0.3, center=c, order=o), outs[c, o], atol=1e-12)
    # the default is CART exactly (centred, top-k)
    assert torch.equal(cart(group, lam=1.0, rank=2), outs[True, "top"])


def test_with_a_base_model_the_paper_formulas_on_weights():
    g = np.random.default_rng(7)
    base = g.standard_normal((8, 6))
    ups = dense_updates(n=3, O=8, I=6, seed=8)
    weights = [base + u for u in ups]
    avg = np.mean(weights, 0)
    method = get_method("cart")
    group = TensorGroup("blk.mlp.w", torch.from_numpy(base), [torch.from_numpy(u) for u in ups])
    for order in ("top", "bottom"):
        p = method.make_params(lam=1.5, rank=2, order=order)
        got = base + densify(method.merge(method.prepare(group, p), p, {})).numpy()
        assert np.allclose(got, avg + 1.5 * sum(np_lowrank(w - avg, 2, order) for w in weights), atol=1e-10)
        p = method.make_params(lam=0.4, rank=2, order=order, center=False)
        got = base + densify(method.merge(method.prepare(group, p), p, {})).numpy()
        assert np.allclose(got, base + 0.4 * sum(np_lowrank(w - base, 2, order) for w in weights), atol=1e-10)


# ----- identities -----------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["dense", "lora"])
def test_identities(route):
    ups = [torch.from_numpy(u) for u in dense_updates(seed=11)] if route == "dense" else lora_updates(seed=12)
    group = TensorGroup("blk.attn.w", None, ups)
    dense = torch.stack([densify(u) for u in ups])
    avg, total = dense.mean(0), dense.sum(0)
    m = min(group.shape)
    ta = get_method("task_arithmetic")
    ta_out = densify(ta.merge(ta.prepare(TensorGroup("w", None, [densify(u) for u in ups]), ta.make_params(lam=0.8)),
                              ta.make_params(lam=0.8), {}))
    assert torch.allclose(ta_out, 0.8 * total, atol=1e-12)
    for order in ("top", "bottom"):
        # full rank: centred = the average whatever lam (the centred vectors sum to zero) ...
        for lam in (0.5, 3.0):
            assert torch.allclose(cart(group, lam=lam, rank=m, order=order), avg, atol=1e-10)
            assert torch.allclose(cart(group, lam=lam, rank_ratio=1.0, order=order), avg, atol=1e-10)
        # ... uncentred = task arithmetic at the same lam
        assert torch.allclose(cart(group, lam=0.8, rank=m, center=False, order=order), ta_out, atol=1e-10)
        # rank 0: the average (centred), the base model (uncentred: no update)
        assert torch.allclose(cart(group, lam=2.0, rank=0, order=order), avg, atol=1e-12)
        assert torch.allclose(cart(group, lam=2.0, rank_ratio=0.0, order=order), avg, atol=1e-12)
        assert cart(group, lam=2.0, rank=0, center=False, order=order).abs().max() == 0
    # top k plus bottom (m - k) is the full-rank merge: centred (a - avg) + (b - avg) = 0, uncentred a + b = TA
    for k in range(0, m + 1):
        top, bottom = cart(group, lam=1.7, rank=k), cart(group, lam=1.7, rank=m - k, order="bottom")
        assert torch.allclose(top + bottom, 2 * avg, atol=1e-10), k
        top = cart(group, lam=1.7, rank=k, center=False)
        bottom = cart(group, lam=1.7, rank=m - k, center=False, order="bottom")
        assert torch.allclose(top + bottom, 1.7 * total, atol=1e-10), k


def test_lora_bottom_directions_beyond_the_rank_are_zero():
    # 12 x 10, three rank-2 updates: centred and uncentred updates have rank <= 6 < 10, so the
    # bottom 4 directions of each have singular value 0 (exactly: the factored SVD never holds them)
    group = TensorGroup("blk.attn.w", None, lora_updates(seed=13))
    avg = torch.stack([densify(u) for u in group.updates]).mean(0)
    for k in (1, 4):
        assert torch.allclose(cart(group, lam=2.0, rank=k, order="bottom"), avg, atol=1e-12)
        assert cart(group, lam=2.0, rank=k, center=False, order="bottom").abs().max() < 1e-12
    assert (cart(group, lam=2.0, rank=5, order="bottom") - avg).abs().max() > 1e-3


def test_tensors_without_a_low_rank_step_get_the_full_vectors():
    g = torch.Generator().manual_seed(5)
    bias = TensorGroup("blk.attn.b", None, [torch.randn(6, generator=g, dtype=D) for _ in range(3)])
    unmatched = TensorGroup("embed.w", None, [torch.randn(5, 4, generator=g, dtype=D) for _ in range(3)])
    for group in (bias, unmatched):
        x = torch.stack(group.updates)
        for order in ("top", "bottom"):
            # centred (CART): the average; uncentred: lam * sum_i dW_i (task arithmetic), whatever the rank
            assert torch.allclose(cart(group, lam=1.5, rank=1, order=order, low_rank_params="attn\\.w"), x.mean(0))
            got = cart(group, lam=1.5, rank=1, center=False, order=order, low_rank_params="attn\\.w")
            assert torch.allclose(got, 1.5 * x.sum(0), atol=1e-12)


def test_a_sweep_over_center_prepares_once_per_value_and_matches_single_merges():
    ups = lora_updates(n=3, seed=21)
    tasks = [{"blk.attn.w": u} for u in ups]
    sweep = Sweep("cart", tasks, progress=False)
    grid = {"center": [True, False], "order": ["top", "bottom"], "rank": [2, 7], "lam": [0.5, 1.5]}
    got = {tuple(sorted(p.items())): merged["blk.attn.w"] for p, merged in sweep.run(grid, as_updates=True)}
    assert sweep.prepare_calls == 2  # one SVD per distinct center
    dense = [densify(u).numpy() for u in ups]
    for key, update in got.items():
        p = dict(key)
        ref = np_merge(dense, p["lam"], p["rank"], p["center"], p["order"])
        assert np.allclose(densify(update).numpy(), ref, atol=1e-9), p


def test_params_are_checked_and_the_config_states_the_defaults():
    import yaml

    method = get_method("cart")
    with pytest.raises(ValueError, match="order"):
        method.make_params(order="reverse")
    with pytest.raises(ValueError, match="center"):
        method.make_params(center="no")
    p = method.make_params()
    assert (p.center, p.order) == (True, "top")
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "merge" / "cart.yaml").read_text())
    assert method.make_params(**cfg["params"]) == method.make_params(lam=2.0, rank_ratio=0.12, low_rank_params="attn|mlp")


# ----- method specs -----------------------------------------------------------------------------
def test_cart_specs_one_per_variant_and_point_with_lambda_grid_or_fixed():
    sweep = RankSweepConfig(rank_ratios=[0.04, 1.0], variants=["centered", "uncentered"],
                            lam={"centered": [1.0, 2.0], "uncentered": 0.3})
    specs = cart_method_specs(sweep)
    assert [s.method for s in specs] == ["average"] + ["cart"] * 4
    by = {(s.fixed["center"], s.fixed["rank_ratio"]): s for s in specs[1:]}
    assert by[True, 0.04].fixed == {"center": True, "order": "top", "rank_ratio": 0.04, "rank": None}
    assert by[True, 0.04].stages == [{"lam": [1.0, 2.0]}]
    assert by[False, 1.0].fixed == {"center": False, "order": "top", "rank_ratio": 1.0, "rank": None, "lam": 0.3}
    assert by[False, 1.0].stages == []
    ranks = cart_method_specs(RankSweepConfig(ranks=[0, 8], variants=["centered_bottom"], cart_average=False))
    assert [(s.fixed["rank"], s.fixed["order"], s.stages) for s in ranks] == [
        (0, "bottom", [{"lam": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}]), (8, "bottom", [{"lam": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}])]
    with pytest.raises(ValueError, match="variant"):
        RankSweepConfig(variants=["middle"])
    with pytest.raises(ValueError, match="rank_ratios"):
        RankSweepConfig(rank_ratios=[1.5])
    with pytest.raises(ValueError, match="unknown variant"):
        RankSweepConfig(lam={"centred": 1.0})


# ----- end to end on tiny demo LoRA task models --------------------------------------------------
CART_TASKS = TASKS[:2]
RATIOS = [0.04, 0.25, 1.0]  # hidden size 32: k = 1, 8, 32
LAMS = {"centered": [1.0, 2.0], "uncentered": [0.3, 0.6, 1.0], "centered_bottom": 1.5, "uncentered_bottom": 1.0}
LORA_RANKS = (2, 4, 8)
KNOTS_LAMS = [0.5, 1.0]


def build_lora_checkpoint(root: Path, task: str, seed: int, r: int) -> Path:
    """tests/evaluate/conftest.py's task checkpoint with LoRA rank ``r`` (alpha 2r), under ``root/r<r>``."""
    return build_task_checkpoint(root / f"r{r}", task, seed, r=r)


@pytest.fixture(scope="module")
def swept(demo_tasks, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("rank_sweeps")
    lora = {r: [str(build_lora_checkpoint(root / "tasks", t, 300 + 10 * r + i, r)) for i, t in enumerate(CART_TASKS)]
            for r in LORA_RANKS}
    base = EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in CART_TASKS], rows=str(root / "main.jsonl"),
                      progress=False)
    sweep = RankSweepConfig(rank_ratios=RATIOS, variants=list(VARIANTS), lam=LAMS, lora_tasks=lora, knots_protocol=None,
                            knots_fixed={"density": 0.5}, knots_stages=[{"lam": KNOTS_LAMS}])
    out = root / "out"
    result = run_rank_sweeps(base, sweep, out)
    return base, sweep, out, result


def pick(rows, **what):
    return [r for r in rows if all(r.get(k) == v for k, v in what.items())]


def md_line(text: str, section: str, first: str) -> list[str]:
    """The cells of the table line starting with ``first`` in the section titled ``section``."""
    body = text.split(section, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    (line,) = [ln for ln in body.splitlines() if ln.startswith(f"| {first} |")]
    return [c.strip() for c in line.strip("|").split("|")][1:]


def pct(v):
    return f"{100 * v:.1f}"


def test_cart_sweep_rows_selection_and_identities(swept):
    base, _, out, result = swept
    rows = read_rows(out / "rows.jsonl")
    assert result.rows == out / "rows.jsonl" and not (out.parent / "main.jsonl").exists()
    assert {r["experiment"] for r in rows} == {"tiny/cart_rank", "tiny/lora_r2", "tiny/lora_r4", "tiny/lora_r8"}
    exp = pick(rows, experiment="tiny/cart_rank")
    ft = {(r["task"], r["split"]): r["value"] for r in pick(exp, method="finetuned")}
    zeroshot = {r["task"]: r["value"] for r in pick(exp, method="zeroshot", split="test")}
    avg_rows = {r["task"]: r["value"] for r in pick(exp, method="average", split="test", stage="selected")}
    for name, v in VARIANTS.items():
        for ratio in RATIOS:
            mine = [r for r in pick(exp, method="cart") if r["params"]["center"] == v.center
                    and r["params"]["order"] == v.order and r["params"]["rank_ratio"] == ratio]
            sel = pick(mine, stage="selected", split="test")
            assert sorted(r["task"] for r in sel) == sorted(CART_TASKS)
            lam = {r["params"]["lam"] for r in sel}
            assert len(lam) == 1
            lam = lam.pop()
            grid = pick(mine, stage="grid", split="val")
            if isinstance(LAMS[name], list):  # the validation argmax (mean normalized accuracy; ties: the first)
                scores = {}
                for r in grid:
                    scores.setdefault(r["params"]["lam"], []).append(r["value"] / ft[r["task"], "val"])
                assert sorted(scores) == LAMS[name] and all(len(s) == 2 for s in scores.values())
                best = max(LAMS[name], key=lambda x: (sum(scores[x]) / 2, -LAMS[name].index(x)))
                assert lam == best
            else:
                assert not grid and lam == LAMS[name]
            values = {r["task"]: r["value"] for r in sel}
            if v.center:  # two tasks: the centred vectors are +-d, so CART is the average at every rank and order
                assert values == avg_rows, (name, ratio)
            if not v.center and v.order == "bottom" and ratio < 1.0:
                # bottom k <= 8 of 32 directions of rank-4 LoRA updates: all zero, the base model
                assert values == zeroshot, (name, ratio)
            if not v.center and ratio == 1.0:  # full rank, uncentred: task arithmetic at the same lam
                ta_rows = out.parent / f"ta-{name}.jsonl"
                EvaluationRun(dataclasses.replace(base, rows=str(ta_rows), methods=[
                    MethodSpec("task_arithmetic", fixed={"lam": lam}, stages=[])], ensemble=False, report=False)).run()
                ta = {r["task"]: r["value"] for r in pick(read_rows(ta_rows), method="task_arithmetic", split="test")}
                assert values == ta, name


def cart_expected(rows):
    """(variant, ratio) -> (per-task values, mean, normalized mean, lam), recomputed from the rows."""
    exp = pick(rows, experiment="tiny/cart_rank", split="test")
    ft = {r["task"]: r["value"] for r in pick(exp, method="finetuned")}
    out = {}
    for name, v in VARIANTS.items():
        for ratio in RATIOS:
            sel = [r for r in pick(exp, method="cart", stage="selected") if r["params"]["center"] == v.center
                   and r["params"]["order"] == v.order and r["params"]["rank_ratio"] == ratio]
            values = {r["task"]: r["value"] for r in sel}
            out[name, ratio] = (values, sum(values.values()) / 2, sum(values[t] / ft[t] for t in values) / 2,
                                sel[0]["params"]["lam"])
    return out


def test_report_numbers_equal_the_rows(swept):
    _, _, out, result = swept
    rows = read_rows(out / "rows.jsonl")
    text = (out / "rank_sweeps.md").read_text()
    assert [p.name for p in result.written] == ["rank_sweeps.md", "rank_sweeps.png"]
    expected = cart_expected(rows)
    acc = "### Mean test accuracy (%) against the rank ratio"
    norm = "### Mean normalized accuracy (%) against the rank ratio"
    lam = "### Selected lambda against the rank ratio"
    for name, v in VARIANTS.items():
        assert md_line(text, acc, v.label) == [pct(expected[name, x][1]) for x in RATIOS]
        assert md_line(text, norm, v.label) == [pct(expected[name, x][2]) for x in RATIOS]
        assert md_line(text, lam, v.label) == [f"{expected[name, x][3]:g}" for x in RATIOS]
    per_task = text.split("### Per task, test accuracy (%) against the rank ratio", 1)[1].split("\n## ", 1)[0]
    for (name, ratio), (values, mean, nmean, lam_) in expected.items():
        line = f"| {VARIANTS[name].label} | {ratio:g} | {lam_:g} | " + " | ".join(pct(values[t]) for t in CART_TASKS) \
            + f" | {pct(mean)} | {pct(nmean)} |"
        assert line in per_task.splitlines(), line
    assert "selected on validation per point over [1, 2]" in text and "CART reverse (centred, bottom-k): fixed" in text
    # references: finetuned, zero-shot, average (means over the tasks)
    exp = pick(rows, experiment="tiny/cart_rank", split="test")
    for method, title in (("finetuned", "Finetuned"), ("zeroshot", "Zero-shot"), ("average", "Average")):
        vals = [r["value"] for r in pick(exp, method=method)]
        assert len(vals) == 2 and f"{title} {pct(sum(vals) / 2)}" in text

    # KnOTS: per LoRA rank (its own experiment), selected on validation over lambda
    knots_norm = "### Mean normalized accuracy (%) against the LoRA rank"
    knots_acc = "### Mean test accuracy (%) against the LoRA rank"
    lines = {"TIES": ("ties", None), "KnOTS-TIES (column)": ("knots", "column"), "KnOTS-TIES (row)": ("knots", "row")}
    plotted = {}
    for line, (method, concat) in lines.items():
        norms, means = [], []
        for r in LORA_RANKS:
            exp = pick(rows, experiment=f"tiny/lora_r{r}", split="test")
            ft = {x["task"]: x["value"] for x in pick(exp, method="finetuned")}
            sel = [x for x in pick(exp, method=method, stage="selected")
                   if concat is None or x["params"]["concat"] == concat]
            assert sorted(x["task"] for x in sel) == sorted(CART_TASKS)
            assert {x["params"]["lam"] for x in sel} <= set(KNOTS_LAMS) and {x["params"]["density"] for x in sel} == {0.5}
            norms.append(sum(x["value"] / ft[x["task"]] for x in sel) / 2)
            means.append(sum(x["value"] for x in sel) / 2)
        assert md_line(text, knots_norm, line) == [pct(v) for v in norms]
        assert md_line(text, knots_acc, line) == [pct(v) for v in means]
        plotted[line] = norms

    # the figure plots exactly these numbers (CART: mean accuracy; KnOTS: normalized accuracy)
    fig = render_figure(result.aggregate)
    cart_ax, knots_ax = fig.axes[:2]
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in cart_ax.get_lines()}
    for name, v in VARIANTS.items():
        xs, ys = drawn[v.label]
        assert xs == RATIOS and np.allclose(ys, [100 * expected[name, x][1] for x in RATIOS], atol=1e-12)
    assert {"Finetuned", "Zero-shot", "Average"} <= set(drawn)
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in knots_ax.get_lines()}
    for line, norms in plotted.items():
        assert drawn[line][0] == list(LORA_RANKS) and np.allclose(drawn[line][1], [100 * v for v in norms], atol=1e-12)
    png = (out / "rank_sweeps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _forbid(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a finished sweep called {what} again")
    return refuse


def test_rerun_evaluates_nothing_and_the_cli_renders_the_same_from_rows(swept, tmp_path, monkeypatch):
    import src.evaluate.loop as loop
    import src.evaluate.run as run

    base, sweep, out, result = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = (copy / "rows.jsonl").read_bytes()
    monkeypatch.setattr(loop.Evaluator, "metrics", _forbid("Evaluator.metrics"))
    monkeypatch.setattr(run, "ModelBank", _forbid("ModelBank (loading the base)"))
    again = run_rank_sweeps(base, sweep, copy)
    assert (copy / "rows.jsonl").read_bytes() == before
    assert again.aggregate == result.aggregate
    assert aggregate(read_rows(copy / "rows.jsonl"), "tiny") == result.aggregate

    (copy / "rank_sweeps.md").unlink()
    yaml = tmp_path / "x.yaml"
    yaml.write_text(f"experiment: tiny\ntasks: [{', '.join(base.tasks)}]\nprogress: false\n")
    assert main(["--config", str(yaml), "--report_only", "true", "--out", str(copy)]) == 0
    assert (copy / "rank_sweeps.md").read_text() == (out / "rank_sweeps.md").read_text()
    assert main(["--config", str(yaml), "--report_only", "true", "--out", str(tmp_path / "none")]) == 2

    # the command line parses the sweep's options into RankSweepConfig
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(yaml), "--lora_tasks", json.dumps({"4": ["a", "b"], "16": ["c", "d"]}),
                             "--lam", json.dumps({"centered": [1, 2], "uncentered": 0.3}), "--ranks", "[1, 8]",
                             "--variants", "[centered, uncentered]", "--knots_concat", "[row]"])
    values = vars(cfg)
    parsed = RankSweepConfig(**{k: values[k] for k in RankSweepConfig.__dataclass_fields__})
    assert parsed.lora_tasks == {4: ["a", "b"], 16: ["c", "d"]} and parsed.ranks == [1, 8]
    assert parsed.lam == {"centered": [1, 2], "uncentered": 0.3} and parsed.knots_concat == ["row"]
