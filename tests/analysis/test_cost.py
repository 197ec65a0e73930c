"""src/analysis/cost.py: the paper's FLOP counts against hand arithmetic, their structure, the
prerequisites table against the registry and the engine's behaviour, and the command line."""
from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from src.analysis import cost
from src.analysis.cost import PREREQUISITES, flops, mats_kfac_flops

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# FLOPs at the paper's layer, worked by hand: mT5-xl wi, d = 2048 inputs, k = 5120 outputs, M = 5
#   d k   = 2048 * 5120        = 10,485,760
#   d^2 k = 2048 * 2048 * 5120 = 21,474,836,480
# ---------------------------------------------------------------------------------------------
D, K, M5 = 2048, 5120, 5
PAPER_LAYER = {
    "average": 52_428_800,             # 5 dk
    "task_arithmetic": 115_343_360,    # (2*5 + 1) = 11 dk
    "dare": 325_058_560,               # (6*5 + 1) = 31 dk
    "ties": 220_200_960,               # (4*5 + 1) = 21 dk
    "fisher": 146_800_640,             # (3*5 - 1) = 14 dk
    "regmean": 150_460_170_240,        # (5 + 2) d^2k + (15 - 2) dk = 150,323,855,360 + 136,314,880
}
# MaTS, N = 50: (5 + 50) d^2k + (10 + 250 - 2) dk = 1,181,116,006,400 + 2,705,326,080
MATS_N50 = 1_183_821_332_480
# K-FAC MaTS (this project's count): 5 dk (d + k) (50 + 1) = 5 * 10,485,760 * 7,168 * 51
KFAC_N50 = 19_166_291_558_400


@pytest.mark.parametrize("method,expected", sorted(PAPER_LAYER.items()))
def test_flops_at_the_papers_layer(method, expected):
    assert flops(method, D, K, M5) == expected


def test_mats_and_kfac_at_the_papers_layer():
    assert flops("mats", D, K, M5, N=50) == MATS_N50
    assert mats_kfac_flops(D, K, M5, 50) == KFAC_N50
    # N = 0: only the right-hand side, (5 + 0) d^2k + (10 - 2) dk
    assert flops("mats", D, K, M5, N=0) == 107_374_182_400 + 83_886_080


def test_flops_on_a_small_layer_by_hand():
    # d = 2, k = 3 (dk = 6, d^2k = 12), M = 2, N = 1
    assert flops("average", 2, 3, 2) == 12
    assert flops("task_arithmetic", 2, 3, 2) == 30
    assert flops("dare", 2, 3, 2) == 78
    assert flops("ties", 2, 3, 2) == 54
    assert flops("fisher", 2, 3, 2) == 30
    assert flops("regmean", 2, 3, 2) == 4 * 12 + 4 * 6        # 72
    assert flops("mats", 2, 3, 2, N=1) == 3 * 12 + 7 * 6      # 78
    assert mats_kfac_flops(2, 3, 2, 1) == 2 * 6 * 5 * 2       # 120


# per extra model: what each formula adds (multiples of dk and d^2k)
PER_MODEL = {"average": (1, 0), "task_arithmetic": (2, 0), "dare": (6, 0), "ties": (4, 0), "fisher": (3, 0),
             "regmean": (3, 1), "mats": (2, 1)}


@pytest.mark.parametrize("method", sorted(PER_MODEL))
def test_each_extra_model_adds_a_fixed_amount(method):
    d, k = 48, 80
    a, b = PER_MODEL[method]
    hp = {"N": 7} if method == "mats" else {}
    for M in range(1, 9):
        assert flops(method, d, k, M + 1, **hp) - flops(method, d, k, M, **hp) == a * d * k + b * d * d * k
        # doubling M adds M times the per-model amount
        assert flops(method, d, k, 2 * M, **hp) - flops(method, d, k, M, **hp) == M * (a * d * k + b * d * d * k)


def test_linear_in_k_and_d_squared_only_for_the_gram_methods():
    d, k, M = 32, 40, 4
    for method in PER_MODEL:
        hp = {"N": 5} if method == "mats" else {}
        assert flops(method, d, 2 * k, M, **hp) == 2 * flops(method, d, k, M, **hp)
        doubled_d = flops(method, 2 * d, k, M, **hp) / flops(method, d, k, M, **hp)
        if method in ("regmean", "mats"):
            assert 3.0 < doubled_d < 4.0   # the d^2 k term dominates
        else:
            assert doubled_d == 2.0
    # each CG iteration adds d^2 k + 5 dk
    for N in range(0, 6):
        assert flops("mats", d, k, M, N=N + 1) - flops("mats", d, k, M, N=N) == d * d * k + 5 * d * k


def test_order_at_the_papers_layer():
    order = ["average", "task_arithmetic", "fisher", "ties", "dare", "regmean"]
    values = [flops(m, D, K, M5) for m in order] + [flops("mats", D, K, M5, N=50)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_flops_refuses_what_it_cannot_count():
    with pytest.raises(ValueError, match="incomplete"):
        flops("mlerp", D, K, M5)
    with pytest.raises(ValueError, match="no count"):
        flops("slerp", D, K, 2)
    with pytest.raises(ValueError, match="needs"):
        flops("mats", D, K, M5)
    with pytest.raises(ValueError, match="takes no"):
        flops("ties", D, K, M5, density=0.2)
    with pytest.raises(ValueError, match="M must be"):
        flops("average", D, K, 0)
    with pytest.raises(ValueError, match="N must be"):
        flops("mats", D, K, M5, N=-1)


def test_case_flops_and_paper_times():
    assert cost.case_flops("regmean-f32", D, K, M5, 50)[0] == PAPER_LAYER["regmean"]
    assert cost.case_flops("mats-gram", D, K, M5, 50)[0] == MATS_N50
    value, _, source = cost.case_flops("mats-kfac", D, K, M5, 50)
    assert value == KFAC_N50 and "not the paper" in source
    assert cost.case_flops("knots", D, K, M5, 50)[0] is None
    assert cost.case_flops("mlerp", D, K, M5, 50)[0] is None
    table4 = {"average": 1.2, "task_arithmetic": 1.9, "dare": 2.6, "ties": 2.1, "fisher": 0.8,
              "regmean": 49.9, "mats-gram": 4280.0, "mats-kfac": 4280.0, "mlerp": None, "cart": None}
    assert {label: cost.paper_ms(label) for label in table4} == table4


# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------

def registry():
    from src.merge.registry import list_methods

    return list_methods()


def test_every_method_of_the_toolkit_has_a_row():
    from src.evaluate.adamerging import LABELS
    from src.permute.run import METHODS

    expected = set(registry()) | set(LABELS.values()) | (set(METHODS) - {"average"})
    assert set(PREREQUISITES) == expected
    assert expected >= {"average", "task_arithmetic", "ties", "dare", "slerp", "mlerp", "knots", "cart", "fisher",
                        "regmean", "mats", "adamerging", "adamerging++", "cart++", "git_rebasin", "act_align",
                        "zipit", "weight_zip", "mudsc_align", "mudsc_zip"}


def test_merge_rows_agree_with_the_registry():
    for name, cls in registry().items():
        row = PREREQUISITES[name]
        method = cls()
        assert row.stage == "merge"
        assert row.needs_base == cls.needs_base, name
        assert row.statistics == tuple(method.required_statistics(method.make_params())), name
        assert set(row.statistics) | set(row.statistics_alternatives) == set(cls.requires), name


def test_merge_rows_by_hand():
    no_base = {"average", "slerp", "mlerp", "fisher", "regmean"}
    for name in registry():
        assert PREREQUISITES[name].needs_base == (name not in no_base), name
    assert PREREQUISITES["fisher"].statistics == ("fisher",)
    assert PREREQUISITES["regmean"].statistics == ("gram",)
    assert PREREQUISITES["mats"].statistics == ("kfac_in", "kfac_out")
    assert set(PREREQUISITES["mats"].statistics_alternatives) == {"gram", "fisher"}
    # labels: the Fisher and K-FAC's output factor need them, the Gram matrix only inputs
    assert PREREQUISITES["fisher"].labeled_data and not PREREQUISITES["fisher"].unlabeled_data
    assert PREREQUISITES["regmean"].unlabeled_data and not PREREQUISITES["regmean"].labeled_data
    assert "kfac_out" in PREREQUISITES["mats"].labeled_data and "kfac_in" in PREREQUISITES["mats"].unlabeled_data
    for name in ("average", "task_arithmetic", "ties", "dare", "slerp", "mlerp", "knots", "cart"):
        row = PREREQUISITES[name]
        assert row.statistics == () and row.unlabeled_data is None and row.labeled_data is None, name


def test_which_statistics_need_labels_matches_the_statistics_pass():
    from src.statistics.collect import NORMALIZATION
    from src.task_statistics import KINDS

    assert set(cost.KIND_NEEDS_LABELS) == set(KINDS)
    for kind, labeled in cost.KIND_NEEDS_LABELS.items():
        text = NORMALIZATION[kind]
        assert ("log-likelihood" in text or "NLL" in text) == labeled, kind


def _tiny_inputs(M=2, out_f=6, in_f=4):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(out_f, in_f, generator=g)}
    tasks = [{"w": base["w"] + 0.1 * torch.randn(out_f, in_f, generator=g)} for _ in range(M)]

    def spd(n):
        a = torch.randn(n, n, generator=g)
        return a @ a.T + torch.eye(n)

    side = [{"fisher": torch.rand(out_f, in_f, generator=g) + 0.1, "gram": spd(in_f), "kfac_in": spd(in_f),
             "kfac_out": spd(out_f)} for _ in range(M)]
    return base, tasks, side


@pytest.mark.parametrize("name", ["average", "task_arithmetic", "ties", "dare", "slerp", "mlerp", "knots", "cart",
                                  "fisher", "regmean", "mats"])
def test_the_engine_needs_exactly_what_the_row_says(name):
    """With the row's base and statistics a merge runs; without the base it fails iff the row says
    the base is needed; without statistics it fails iff the row lists some."""
    from src.merge import MergeEngine

    row = PREREQUISITES[name]
    base, tasks, side = _tiny_inputs()
    stats = [{kind: {"w": s[kind]} for kind in row.statistics} for s in side] if row.statistics else None
    out = MergeEngine(name, tasks, base=base, progress=False, statistics=stats).run({}).tensors["w"]
    assert out.shape == (6, 4) and torch.isfinite(out).all()

    def without(base_, stats_):
        try:
            MergeEngine(name, tasks, base=base_, progress=False, statistics=stats_).run({})
        except ValueError as e:
            return str(e)
        return None

    error = without(None, stats)
    assert (error is not None) == row.needs_base, (name, error)
    if error is not None:
        assert "needs a base model" in error
    error = without(base, None)
    assert (error is not None) == bool(row.statistics), (name, error)
    if error is not None:
        assert "statistics" in error


def test_evaluation_and_permutation_rows():
    from src.evaluate.adamerging import KINDS, LABELS
    from src.permute.run import METHODS

    for kind, label in LABELS.items():
        row = PREREQUISITES[label]
        assert row.stage == "evaluate" and row.unlabeled_data and row.labeled_data is None
        assert row.needs_base == registry()[KINDS[kind][0]].needs_base
    assert {LABELS[k]: KINDS[k][0] for k in LABELS} == {"adamerging": "task_arithmetic", "adamerging++": "ties",
                                                        "cart++": "cart"}
    activations = {"act_align", "zipit", "mudsc_align", "mudsc_zip"}
    searched = {"mudsc_align", "mudsc_zip"}
    for name in set(METHODS) - {"average"}:
        row = PREREQUISITES[name]
        assert row.stage == "permute" and not row.needs_base
        assert (row.statistics == ("activations",)) == (name in activations), name
        assert (row.labeled_data is not None) == (name in searched), name
        assert "BatchNorm" in row.unlabeled_data  # every permutation merge resets BatchNorm by default


# ---------------------------------------------------------------------------------------------
# Timing and the command line
# ---------------------------------------------------------------------------------------------

def test_the_benchmark_uses_the_shared_timing_code():
    spec = importlib.util.spec_from_file_location("bench_data_methods", ROOT / "benchmarks" / "bench_data_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.time_case is cost.time_case and bench.make_inputs is cost.make_inputs and bench.CASES is cost.CASES
    assert bench.paper_gflop("regmean", M5, D, K, 50) == "150.5"
    assert bench.paper_gflop("mats-kfac", M5, D, K, 50) == "19,166.3"


def test_time_case_repeats_and_budget():
    base, tasks, side = cost.make_inputs(3, 16, 8, kinds=("gram",))
    assert set(side[0]) == {"gram"}
    params, times = cost.time_case("regmean", base, tasks, side, torch.device("cpu"), repeats=3, budget=60.0,
                                   iterations=5)
    assert params == {"a": 0.9} and len(times) == 3 and all(t > 0 for t in times)
    _, times = cost.time_case("mats-gram", base, tasks, side, torch.device("cpu"), repeats=3, budget=0.0, iterations=5)
    assert len(times) == 1  # over budget after the first run


def _rows(md: str, section: str) -> dict[str, str]:
    """First cell (method name in backticks) -> the whole row, for the table under ``section``."""
    part = md.split(section, 1)[1].split("\n## ", 1)[0]
    return {line.split("|")[1].strip().strip("`") + "|" + line.split("|")[2].strip(): line
            for line in part.splitlines() if line.startswith("| `")}


def test_cli_without_measuring_writes_every_row(tmp_path):
    assert cost.main(["--measure", "false", "--output", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "cost.md").read_text()
    rows = _rows(md, "## Layer 5120 x 2048")
    by_method = {key.split("|")[0]: line for key, line in rows.items()}
    assert set(by_method) == set(registry())
    assert "150,460,170,240" in by_method["regmean"] and "49.9" in by_method["regmean"]
    assert "1,183,821,332,480" in by_method["mats"] and "4,280.0" in by_method["mats"]
    assert "325,058,560" in by_method["dare"] and "2.6" in by_method["dare"]
    assert "incomplete" in by_method["mlerp"]
    assert all("not measured" in line for line in by_method.values())
    needs = _rows(md, "## What each method needs")
    assert {key.split("|")[0] for key in needs} == set(PREREQUISITES)
    data = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert [r["label"] for r in data["layers"][0]["rows"]] == [r for r in cost.table_rows({})]


def test_cli_measures_one_fast_method_on_a_tiny_layer(tmp_path):
    out = tmp_path / "tiny"
    assert cost.main(["--shapes", "12x8", "--models", "3", "2", "--methods", "task_arithmetic", "slerp",
                      "--repeats", "2", "--output", str(out)]) == 0
    md = (out / "cost.md").read_text()
    rows = {k.split("|")[0]: v for k, v in _rows(md, "## Layer 12 x 8 (out x in: d = 8, k = 12), M = 3").items()}
    cells = [c.strip() for c in rows["task_arithmetic"].split("|")]
    # | method | case | formula | multiply-adds | GMAC | ms | runs | paper |
    assert cells[4] == f"{7 * 8 * 12:,}"            # (2*3 + 1) d k = 672
    assert float(cells[6].replace(",", "")) > 0 and cells[7] == "2"
    assert cells[8] == ""                           # Table 4 only beside its own layer
    assert "skipped: merges exactly 2 models" in rows["slerp"]
    assert "not measured" in rows["ties"]
    data = json.loads((out / "cost.json").read_text())
    m2 = {r["label"]: r for r in data["layers"][1]["rows"]}
    assert data["layers"][1]["M"] == 2 and m2["slerp"]["runs"] == 2 and len(m2["slerp"]["times_ms"]) == 2


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cost.main(["--shapes", "5120by2048", "--output", str(tmp_path)])
    assert e.value.code == 2
    (tmp_path / "file").write_text("x")
    assert cost.main(["--measure", "false", "--output", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs an imported module
def test_module_entry_point(tmp_path, monkeypatch):
    """``python -m src.analysis.cost`` (run in this interpreter: a new one would re-import Lightning)."""
    monkeypatch.setattr(sys, "argv", ["cost", "--shapes", "8x4", "--measure", "false", "--output", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("src.analysis.cost", run_name="__main__", alter_sys=False)
    assert e.value.code == 0
    assert "| `regmean` |" in (tmp_path / "cost.md").read_text()


def test_cli_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    from src.analysis.cost import main

    (tmp_path / "cost.md").write_text("my notes\n")
    assert main(["--output", str(tmp_path), "--measure", "false"]) == 2
    assert "cost.md" in capsys.readouterr().err and (tmp_path / "cost.md").read_text() == "my notes\n"
    assert not (tmp_path / "cost.json").exists()
    (tmp_path / "cost.md").unlink()
    assert main(["--output", str(tmp_path), "--measure", "false"]) == 0
    assert main(["--output", str(tmp_path), "--measure", "false"]) == 0  # its own files are replaced
