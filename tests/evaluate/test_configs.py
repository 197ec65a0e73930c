"""Every evaluation config (configs/evaluate/*.yaml): parsed by the real CLI parser, its methods and
hyperparameters accepted by the merge registry under its protocol, its task directories where the
finetune configs write them; then run end to end through ``python -m src.evaluate``'s ``main`` with
the task checkpoints replaced by tiny demo-family LoRA models (tests/evaluate/conftest.py), every
grid restricted to one or two values, on the CPU."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from src.evaluate.__main__ import build_parser, main
from src.evaluate.metrics import JointLabelSpace
from src.evaluate.protocols import PROTOCOLS, search_for
from src.evaluate.rows import read_rows
from src.evaluate.run import LEARNED, RECIPE_KEYS
from src.merge import get_method
from src.merge.sweep import expand_grid

from .conftest import TASKS

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "evaluate").glob("*.yaml"))

# experiment -> (its finetune config, its tasks file) under configs/finetune/
PAPER = {
    "A_knots_vitb32_lora": ("A_knots_vitb32_lora.yaml", "A_vision.yaml"),
    "A_knots_vitl14_lora": ("A_knots_vitl14_lora.yaml", "A_vision.yaml"),
    "B_knots_llama3_nli": ("B_knots_llama3_8b_nli.yaml", "B_nli.yaml"),
    "C_cart_vitb32": ("C_cart_vitb32_openclip_full.yaml", "A_vision.yaml"),
    "C_cart_vitl14": ("C_cart_vitl14_openclip_full.yaml", "A_vision.yaml"),
    "D_domainnet": ("D_domainnet_vitb32_full.yaml", "D_domainnet.yaml"),
    "D_crosslingual": ("D_crosslingual_mt5xl.yaml", "D_crosslingual.yaml"),
    "E_mudsc_cifar100": ("E_mudsc_resnet20_cifar100.yaml", "E_cifar100_50_50.yaml"),
}
# experiments whose tasks file holds several independent groups evaluated one at a time (E: five model
# pairs); the config names the first group, others are given with --tasks
GROUPS = {"E_mudsc_cifar100": 2}


def parse(path: Path, *overrides: str):
    """The config as ``main`` sees it: parsed by the CLI parser, classes instantiated."""
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(path), *overrides])
    return (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(cfg)


def searches(cfg) -> list[tuple]:
    """``(spec, search)`` per searched merge method of ``cfg`` (``merged`` entries and learned
    coefficients, AdaMerging and the like, have no search)."""
    return [(spec, search_for(spec.method, cfg.protocol, {"fixed": spec.fixed, "stages": spec.stages,
                                                          "reuse": spec.reuse}))
            for spec in cfg.methods if spec.method != "merged" and spec.method not in LEARNED]


def learned(cfg) -> list:
    return [spec for spec in cfg.methods if spec.method in LEARNED]


def small_grid(cfg) -> dict[str, list]:
    """Every grid parameter of ``cfg`` cut to values from the middle of its first grid: two for
    ``lam`` (so that the selection chooses), one for the others."""
    grid: dict[str, list] = {}
    for _, search in searches(cfg):
        for stage in search["stages"]:
            for param, values in stage.items():
                if param == "n_examples":  # statistics on the tiny tasks' whole train split
                    grid[param] = [4]
                elif param not in grid:
                    mid = len(values) // 2
                    grid[param] = list(values[mid:mid + (2 if param == "lam" else 1)])
    return grid


def test_every_paper_experiment_has_a_config():
    assert {p.stem for p in CONFIGS} >= set(PAPER)


# ----- static checks ------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_every_hyperparameter_is_accepted(path):
    cfg = parse(path)
    assert cfg.experiment == path.stem
    assert cfg.protocol is None or cfg.protocol in PROTOCOLS
    assert cfg.select_on in ("normalized", "absolute")
    assert cfg.tasks and len(set(cfg.tasks)) == len(cfg.tasks)
    labels = [spec.label or spec.method for spec in cfg.methods]
    assert len(set(labels)) == len(labels), f"duplicate method labels {labels}"
    done: set[str] = set()
    for spec, search in searches(cfg):
        method = get_method(spec.method)  # an unknown name raises
        for param, other in search["reuse"].items():  # "method" or "method.param"
            assert other.split(".")[0] in done, f"{spec.label}: reuses {param!r} from {other!r}, which does not run before it"
        chosen = dict(search["fixed"])  # a reused value: the method's default here
        method.make_params(**chosen)
        merge_part = lambda point: {k: v for k, v in point.items() if k != "n_examples"}  # noqa: E731 (a statistics setting)
        for stage in search["stages"]:  # every point of the full (unrestricted) grid
            points = expand_grid(stage)
            assert points, f"{spec.label}: an empty stage"
            for point in points:
                assert all(n > 0 for n in [point.get("n_examples", 1)])
                method.make_params(**merge_part({**chosen, **point}))
            chosen.update(points[0])
        done |= {spec.method, spec.label or spec.method}
    for spec in cfg.methods:
        if spec.method == "merged":
            assert spec.path, f"{spec.label}: 'merged' needs a path"
    for spec in learned(cfg):  # the re-applying plain merge accepts the non-recipe settings
        target = {"ta": "task_arithmetic", "ties": "ties", "cart": "cart"}[LEARNED[spec.method]]
        get_method(target).make_params(**{k: v for k, v in (spec.fixed or {}).items() if k not in RECIPE_KEYS})
    joint = cfg.joint
    assert joint.duplicate_labels in ("id", "string")
    if joint.enabled and joint.label_file:
        space = JointLabelSpace.from_file(joint.label_file)
        # train_all names each task directory after its datamodule's task: the joint space needs all of them
        names = [Path(t).name for t in cfg.tasks]
        assert set(space.order) <= set(names), f"the label file's tasks {space.order} are not all merged"
        assert set(names) <= set(space.order) | set(space.aliases)


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_config_names_the_task_directories_finetuning_writes(experiment):
    cfg = parse(REPO / "configs" / "evaluate" / f"{experiment}.yaml")
    finetune_config, tasks_file = PAPER[experiment]
    finetune = REPO / "configs" / "finetune" / finetune_config
    tasks_file = REPO / "configs" / "finetune" / "tasks" / tasks_file
    output_dir = yaml.safe_load(finetune.read_text())["export"]["output_dir"]
    names = list(yaml.safe_load(tasks_file.read_text())["tasks"])
    expected = [output_dir.replace("{task}", name) for name in names]
    if experiment in GROUPS:
        size = GROUPS[experiment]
        assert len(expected) > size and len(expected) % size == 0, f"{tasks_file.name}: not groups of {size}"
        expected = expected[:size]
    assert cfg.tasks == expected
    assert cfg.rows == f"results/{experiment}/rows.jsonl"


# ----- end to end on tiny task checkpoints -------------------------------------------------------
def tiny_argv(path: Path, cfg, demo_tasks, rows_path: Path, held_out: bool) -> list[str]:
    """``--config path`` with the tiny task checkpoints, restricted grids, CPU, no label file."""
    grid = small_grid(cfg)
    argv = ["--config", str(path),
            "--tasks", json.dumps([str(demo_tasks[t]) for t in TASKS[:2]]),
            "--generalization", json.dumps([str(demo_tasks[TASKS[2]])] if held_out else []),
            "--rows", str(rows_path), "--accelerator", "cpu", "--devices", "1", "--strategy", "auto",
            "--precision", "32-true", "--merge_device", "cpu", "--joint.label_file", "null", "--progress", "false",
            "--statistics", json.dumps({"split": "train", "n": 4, "seed": 0})]  # the tiny tasks' whole train split
    # CART++'s low_rank_params name open_clip tensors (attn|mlp), which the tiny BERT does not have:
    # nothing would depend on its coefficients (a clear error, test_cart_pp_on_unmatched_tensors)
    # merged networks (permutation merges, python -m src.permute) need their directories: they are
    # run end to end on their own tiny models in tests/permute/test_experiment_e.py
    if any(s.method == "merged" for s in cfg.methods):
        kept = [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in cfg.methods
                if s.method != "merged"]
        argv += ["--methods", json.dumps(kept)]
    skip = [s.label or s.method for s in learned(cfg) if (s.fixed or {}).get("low_rank_params")]
    if skip:
        argv += ["--only", json.dumps([s.label or s.method for s in cfg.methods if (s.label or s.method) not in skip])]
    return argv + (["--grid", json.dumps(grid)] if grid else [])


def test_cart_pp_on_unmatched_tensors(demo_tasks, tmp_path, capsys):
    """CART++ whose low_rank_params match no tensor has nothing to learn: one clear error line."""
    path = REPO / "configs" / "evaluate" / "C_cart_vitb32.yaml"
    argv = tiny_argv(path, parse(path), demo_tasks, tmp_path / "rows.jsonl", held_out=False)
    argv += ["--methods", json.dumps([{"method": "cart++", "label": "CART++",
                                       "fixed": {"steps": 2, "low_rank_params": "attn|mlp"}}])]
    assert main(argv + ["--only", "null"]) == 2
    assert "nothing to learn" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_end_to_end_on_tiny_tasks(path, demo_tasks, tmp_path, capsys):
    cfg = parse(path)
    held_in = [TASKS[0], TASKS[1]]
    held_out = [TASKS[2]] if cfg.protocol == "compositional" else []  # a generalization task for D
    grid = small_grid(cfg)
    rows_path = tmp_path / "rows.jsonl"
    argv = tiny_argv(path, cfg, demo_tasks, rows_path, bool(held_out))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]

    rows = read_rows(rows_path)
    assert rows and all(r["experiment"] == cfg.experiment for r in rows)
    every = held_in + held_out

    def have(**what) -> list[dict]:
        return [r for r in rows if all(r.get(k) == v for k, v in what.items())]

    for split in ("val", "test"):
        assert {r["task"] for r in have(method="finetuned", split=split, stage="reference")} == set(every)
        assert {r["task"] for r in have(method="zeroshot", split=split)} == (set(every) if cfg.zeroshot else set())

    selected: dict[str, dict] = {}
    for spec, search in searches(cfg):
        label = spec.label or spec.method
        got = have(label=label, stage="selected", split="test", metric="acc")
        assert {r["task"] for r in got} == set(every), f"{label}: selected rows {got}"
        params = {json.dumps(r["params"], sort_keys=True) for r in got}
        assert len(params) == 1, f"{label}: one selected point, got {params}"
        selected[label] = chosen = got[0]["params"]
        assert {r["group"] for r in got} == ({"held_in", "generalization"} if held_out else {None})
        assert all(r["selection"]["on"] == "val" for r in got)
        for param, values in grid.items():
            if param in search["reuse"]:
                other = next(s.label or s.method for s, _ in searches(cfg)
                             if search["reuse"][param] in (s.method, s.label))
                assert chosen[param] == selected[other][param], f"{label}: {param} not reused from {other}"
            elif param == "n_examples" and any(param in stage for stage in search["stages"]):
                assert chosen["statistics"] == f"train-n{values[0]}-seed0"  # a statistics setting, in the tag
            elif any(param in stage for stage in search["stages"]):
                # a later stage keeps the incumbent (the value held fixed so far) unless a point beats it
                before = getattr(get_method(spec.method).make_params(**search["fixed"]), param)
                assert chosen[param] in [*values, before], f"{label}: {param}={chosen[param]} off the grid"
        if search["stages"]:
            assert have(label=label, stage="grid", split="val"), f"{label}: no grid rows"
        if "statistics" in chosen:  # data-dependent: the statistics it read are part of its params
            assert chosen["statistics"] == "train-n4-seed0"  # tiny_argv's --statistics
        if cfg.joint.enabled:
            assert {r["dataset"] for r in have(label=label, task="joint")} == {"union", *held_in}

    for spec in learned(cfg):  # coefficients learned on the tasks' unlabeled test inputs, re-applied by a merge
        if (spec.fixed or {}).get("low_rank_params"):
            continue  # left out of the tiny run (tiny_argv)
        got = have(label=spec.label or spec.method, stage="selected", split="test", metric="acc")
        assert {r["task"] for r in got} == set(every), f"{spec.label}: selected rows {got}"
        assert all(r["selection"]["on"].startswith("test inputs, unlabeled") and r["params"]["learned"] == spec.method
                   for r in got)
        (path,) = (tmp_path / "coefficients").glob(f"{spec.method}-*.json")  # named by method + settings
        table = json.loads(path.read_text())
        assert table["tasks"] == held_in and all(0.0 <= c <= 1.0 for c in table["default"])

    ensembled = {r["task"] for r in have(method="ensemble") if r["task"] != "joint"}
    assert ensembled == (set(held_in) if cfg.ensemble else set())
    if cfg.joint.enabled and cfg.ensemble:
        union = have(method="ensemble", task="joint", dataset="union")
        assert {r["metric"] for r in union} == {f"hits@{k}" for k in cfg.joint.ks}
    if cfg.report:
        assert (tmp_path / "report.md").is_file()


def test_compositional_report_with_a_generalization_task(demo_tasks, tmp_path, capsys):
    """Grid points are scored on generalization tasks only with grid_generalization (never used to
    select); the held-in vs generalization scatter is drawn only then."""
    path = REPO / "configs" / "evaluate" / "D_domainnet.yaml"
    cfg = parse(path)
    argv = tiny_argv(path, cfg, demo_tasks, tmp_path / "rows.jsonl", held_out=True) + ["--only", '["task_arithmetic"]']
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = read_rows(tmp_path / "rows.jsonl")
    assert not [r for r in rows if r["stage"] == "grid" and r["group"] == "generalization"]
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "heldin_vs_generalization.png").exists()
    assert main(argv + ["--grid_generalization", "true"]) == 0, capsys.readouterr().err[-2000:]
    rows = read_rows(tmp_path / "rows.jsonl")
    assert [r for r in rows if r["stage"] == "grid" and r["group"] == "generalization" and r["split"] == "val"]
    assert (tmp_path / "heldin_vs_generalization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-in" in (tmp_path / "report.md").read_text().lower()


def test_joint_label_file_with_an_aliased_task(demo_tasks, tmp_path, capsys):
    """A's joint benchmark: a label file whose last task is an alias (svhn -> mnist in
    data/joint_labels.json); here a second bbc_news model, ``bbc_copy``, aliases onto bbc_news."""
    from src.finetune.export import export_task_checkpoint
    from src.finetune.load import load_task_model
    from src.task_checkpoint import read_task_info

    from .conftest import datamodule_spec

    module = load_task_model(demo_tasks["bbc_news"])
    copy = export_task_checkpoint(module, tmp_path / "bbc_copy", "bbc_copy",
                                  extra_hparams={"datamodule": datamodule_spec("bbc_news")})
    labels = {t: read_task_info(demo_tasks[t]).label_names for t in ("bbc_news", "color_names")}
    space = JointLabelSpace.from_tasks({**labels, "bbc_copy": labels["bbc_news"]}, aliases={"bbc_copy": "bbc_news"})
    label_file = tmp_path / "joint_labels.json"
    label_file.write_text(json.dumps({"order": space.order, "aliases": space.aliases, "offsets": space.offsets,
                                      "names": space.names, "tasks": space.tasks, "num_labels": len(space.names)}))
    path = REPO / "configs" / "evaluate" / "A_knots_vitb32_lora.yaml"
    rows_path = tmp_path / "rows.jsonl"
    tasks = [str(demo_tasks["bbc_news"]), str(demo_tasks["color_names"]), str(copy)]
    code = main(["--config", str(path), "--tasks", json.dumps(tasks),
                 "--rows", str(rows_path), "--accelerator", "cpu", "--merge_device", "cpu", "--progress", "false",
                 "--joint.label_file", str(label_file), "--only", '["task_arithmetic"]', "--grid", '{"lam": [0.5]}',
                 "--zeroshot", "false", "--report", "false"])
    assert code == 0, capsys.readouterr().err[-3000:]
    joint = [r for r in read_rows(rows_path) if r["task"] == "joint" and r["metric"] == "hits@1"]
    for label in ("Task Arithmetic", "Ensemble"):
        mine = {r["dataset"]: r for r in joint if r["label"] == label}
        assert set(mine) == {"union", "bbc_news", "color_names", "bbc_copy"}
        assert mine["union"]["n"] == sum(mine[t]["n"] for t in ("bbc_news", "color_names", "bbc_copy"))
        # the copy is the same model on the same data, scored against the same label ids
        assert mine["bbc_copy"]["value"] == mine["bbc_news"]["value"]
