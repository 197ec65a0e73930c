"""An evaluation run (src/evaluate/run.py) over tiny demo task models: selection sweeps, resuming
from the rows file, Ensemble and the joint benchmark. The rows are checked against computations
made here: the argmax of the selection score, merges scored by plain loops, Ensemble from
``load_task_model`` logits."""
from __future__ import annotations

import shutil

import pytest
import torch

from src.evaluate import EvalConfig, EvaluationRun, JointSpec, MethodSpec
from src.evaluate.rows import read_rows, row_key
from src.merge import merge

from .conftest import TASKS, labels_of, loop_accuracy, plain_module, split_batches

LAMS = [0.1, 0.5, 1.0]


def sweep_config(demo_tasks, rows) -> EvalConfig:
    return EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS], protocol=None,
                      methods=[MethodSpec("task_arithmetic", stages=[{"lam": list(LAMS)}])],
                      grid_splits=["val", "test"], rows=str(rows), progress=False, ensemble=False, zeroshot=False)


@pytest.fixture(scope="module")
def sweep(demo_tasks, tmp_path_factory):
    """One finished sweep: (its config, its rows file)."""
    rows = tmp_path_factory.mktemp("sweep") / "rows.jsonl"
    config = sweep_config(demo_tasks, rows)
    EvaluationRun(config).run()
    return config, rows


def pick(rows, **what):
    return [r for r in rows if all(r.get(k) == v for k, v in what.items())]


# ----- 4. the sweep selects the validation argmax -----------------------------------------
def test_sweep_selects_the_validation_argmax_and_reports_its_test_value(sweep, demo_tasks):
    _, path = sweep
    rows = read_rows(path)
    finetuned = {(r["task"], r["split"]): r["value"] for r in pick(rows, method="finetuned", stage="reference")}
    assert len(finetuned) == 2 * len(TASKS) and all(v > 0 for v in finetuned.values())

    grid = pick(rows, method="task_arithmetic", stage="grid", metric="acc")
    assert len(grid) == len(LAMS) * 2 * len(TASKS)
    assert sorted({r["params"]["lam"] for r in grid}) == LAMS
    by_point = {}
    for r in grid:
        by_point.setdefault(r["params"]["lam"], {})[r["task"], r["split"]] = r
    scores = {lam: sum(pts[t, "val"]["value"] / finetuned[t, "val"] for t in TASKS) / len(TASKS)
              for lam, pts in by_point.items()}
    assert len(set(scores.values())) == len(LAMS), f"the grid points tie ({scores}): the test would not tell"
    best = max(LAMS, key=lambda lam: scores[lam])
    # the fixture's seeds put the optimum inside the grid: picking the first or last point would fail
    assert best not in (LAMS[0], LAMS[-1]), f"the fixture no longer discriminates: scores {scores}"

    selected = pick(rows, method="task_arithmetic", stage="selected", metric="acc")
    assert sorted(r["task"] for r in selected) == sorted(TASKS)
    for r in selected:
        assert r["split"] == "test" and r["params"] == by_point[best][r["task"], "test"]["params"]
        assert r["params"]["lam"] == best
        assert r["value"] == by_point[best][r["task"], "test"]["value"]
        assert r["finetuned"] == finetuned[r["task"], "test"]
        assert r["selection"]["on"] == "val"
        assert r["n"] == 24

    # the selected point's test accuracy, merged and scored without the evaluation stage
    dirs = [demo_tasks[t] for t in TASKS]
    updates = merge("task_arithmetic", dirs, params={"lam": best}, save_as="safetensors", progress=False).tensors
    for r in selected:
        module = plain_module(demo_tasks[r["task"]], updates)
        assert r["value"] == pytest.approx(loop_accuracy(module, split_batches(demo_tasks[r["task"]], "test")), abs=1e-6)
    from src.finetune.load import load_task_model

    for t in TASKS:  # and the finetuned references
        for split in ("val", "test"):
            want = loop_accuracy(load_task_model(demo_tasks[t]), split_batches(demo_tasks[t], split))
            assert finetuned[t, split] == pytest.approx(want, abs=1e-6)


def test_task_order_does_not_matter(sweep, demo_tasks, tmp_path):
    config, path = sweep
    rows = tmp_path / "rows.jsonl"
    unsorted = [str(demo_tasks[t]) for t in (TASKS[1], TASKS[2], TASKS[0])]
    out = EvaluationRun(EvalConfig(**{**config.__dict__, "tasks": unsorted, "rows": str(rows)})).run()
    full = read_rows(path)
    assert {row_key(r): r["value"] for r in out} == {row_key(r): r["value"] for r in full}
    assert all(r["finetuned"] is not None for r in out if r["method"] != "finetuned")


# ----- 5. resuming --------------------------------------------------------------------------
def _forbid(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a resumed run called {what}")
    return refuse


def test_finished_run_reruns_nothing(sweep, tmp_path, monkeypatch):
    import src.evaluate.loop as loop
    import src.evaluate.run as run

    config, path = sweep
    rows = tmp_path / "rows.jsonl"
    shutil.copy(path, rows)
    before = rows.read_bytes()
    monkeypatch.setattr(loop.Evaluator, "metrics", _forbid("Evaluator.metrics"))
    monkeypatch.setattr(loop.Evaluator, "predict", _forbid("Evaluator.predict"))
    monkeypatch.setattr(run, "Sweep", _forbid("Sweep (a merge)"))
    monkeypatch.setattr(run, "ModelBank", _forbid("ModelBank (loading the base)"))
    monkeypatch.setattr("src.merge.engine.MergeEngine.run", _forbid("MergeEngine.run"))
    out = EvaluationRun(EvalConfig(**{**config.__dict__, "rows": str(rows)})).run()
    assert rows.read_bytes() == before
    assert len(out) == len(read_rows(path))


def _count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def _killed_copy(path, target, k):
    lines = path.read_text().splitlines(keepends=True)
    torn = lines[k][: len(lines[k]) // 2]  # the row being written when the run was killed
    target.write_text("".join(lines[:k]) + torn)
    return lines


def test_killed_run_redoes_only_the_missing_rows(sweep, tmp_path, monkeypatch):
    import src.evaluate.loop as loop

    config, path = sweep
    full = read_rows(path)
    k = len(full) // 2
    rows = tmp_path / "rows.jsonl"
    _killed_copy(path, rows, k)
    assert len(read_rows(rows)) == k
    calls = _count_calls(monkeypatch, loop.Evaluator, "metrics")
    out = EvaluationRun(EvalConfig(**{**config.__dict__, "rows": str(rows)})).run()
    assert len(calls) == len(full) - k  # one metric (acc) per evaluated (task, split): one row per call
    want = {row_key(r): r["value"] for r in full}
    got = {row_key(r): r["value"] for r in out}
    assert got == want  # every row once, the redone ones with the same values
    assert len(out) == len(full)


def test_rows_file_is_readable_after_resuming_a_torn_write(sweep, tmp_path):
    config, path = sweep
    full = read_rows(path)
    k = len(full) // 2
    rows = tmp_path / "rows.jsonl"
    _killed_copy(path, rows, k)
    EvaluationRun(EvalConfig(**{**config.__dict__, "rows": str(rows)})).run()
    again = read_rows(rows)  # what the next run and the report read
    assert {row_key(r) for r in again} == {row_key(r) for r in full} and len(again) == len(full)


# ----- 8. Ensemble and the joint benchmark ---------------------------------------------------
def _features(module, batches):
    with torch.no_grad():
        return torch.cat([module.encode(module.model, b["input_ids"], b["attention_mask"]) for b in batches])


def _head_logits(features, head):
    return head["logit_scale"].exp() * torch.nn.functional.normalize(features.float(), dim=-1) @ head["weight"].T


def test_ensemble_and_joint_rows(demo_tasks, tmp_path):
    from safetensors.torch import load_file

    from src.finetune.load import load_task_model
    from src.task_checkpoint import head_path

    rows_path = tmp_path / "rows.jsonl"
    config = EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS], protocol=None, methods=[],
                        rows=str(rows_path), progress=False, ensemble=True, zeroshot=False,
                        joint=JointSpec(enabled=True))
    rows = EvaluationRun(config).run()
    assert rows == read_rows(rows_path)

    # independent: each task model (PEFT-loaded) encodes every test set; heads applied by hand
    models = {m: load_task_model(demo_tasks[m]) for m in TASKS}
    heads = {t: load_file(str(head_path(demo_tasks[t]))) for t in TASKS}
    batches = {t: split_batches(demo_tasks[t], "test") for t in TASKS}
    feats = {(m, t): _features(models[m], batches[t]) for m in TASKS for t in TASKS}

    ensemble = [r for r in rows if r["method"] == "ensemble" and r["task"] != "joint"]
    assert sorted(r["task"] for r in ensemble) == sorted(TASKS)
    for r in ensemble:
        t = r["task"]
        probs = torch.stack([_head_logits(feats[m, t], heads[t]).softmax(-1) for m in TASKS])  # (models, N, C)
        confidence, classes = probs.max(-1)  # per model: its top class and its probability
        chosen = confidence.argmax(0)  # the most confident model per example
        preds = classes.gather(0, chosen[None])[0]
        want = (preds == labels_of(batches[t])).float().mean().item()
        assert r["split"] == "test" and r["metric"] == "acc" and r["stage"] == "reference"
        assert r["value"] == pytest.approx(want, abs=1e-6) and r["n"] == 24
        assert r["finetuned"] == pick(rows, method="finetuned", task=t, split="test")[0]["value"]
    own = {t: pick(rows, method="finetuned", task=t, split="test")[0]["value"] for t in TASKS}
    assert [r["value"] for r in ensemble] != [own[r["task"]] for r in ensemble]  # not just the task's own model

    joint = [r for r in rows if r["task"] == "joint"]
    assert {(r["method"], r["dataset"], r["metric"]) for r in joint} == {
        ("ensemble", d, f"hits@{k}") for d in ("union", *TASKS) for k in (1, 3, 5)}
    assert len(joint) == 4 * 3
    # joint head: the tasks' heads stacked in task order (all share logit scale 20)
    weight = torch.cat([heads[t]["weight"] for t in TASKS])
    offsets = dict(zip(TASKS, [0, *torch.tensor([len(heads[t]["weight"]) for t in TASKS]).cumsum(0).tolist()[:-1]]))
    targets = torch.cat([labels_of(batches[t]) + offsets[t] for t in TASKS])
    datasets = [t for t in TASKS for _ in range(len(labels_of(batches[t])))]
    scores = torch.stack([_head_logits(torch.cat([feats[m, t] for t in TASKS]), {"weight": weight, "logit_scale":
                                                                                 heads[TASKS[0]]["logit_scale"]}).softmax(-1)
                          for m in TASKS]).amax(0)
    for r in joint:
        k = int(r["metric"].split("@")[1])
        hit = (scores.topk(k, dim=-1).indices == targets[:, None]).any(-1).float()
        mask = torch.tensor([r["dataset"] in ("union", d) for d in datasets])
        assert r["value"] == pytest.approx(hit[mask].mean().item(), abs=1e-6), r
        assert r["n"] == int(mask.sum())
        assert r["params"] == {"duplicate_labels": "id", "label_space": "tasks"}


def test_union_head_scores_each_task_among_every_tasks_labels(demo_tasks, tmp_path):
    """task_head union (the DomainNet paper's "merged" head): a task's accuracy is the argmax over
    the heads of every evaluated task concatenated; rows say acc@union and never mix with own-head rows."""
    from safetensors.torch import load_file

    from src.finetune.load import load_task_model
    from src.task_checkpoint import head_path

    rows_path = tmp_path / "rows.jsonl"
    base = dict(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS], protocol=None, methods=[],
                rows=str(rows_path), progress=False, ensemble=False, zeroshot=False)
    rows = EvaluationRun(EvalConfig(**base, task_head="union")).run()
    heads = {t: load_file(str(head_path(demo_tasks[t]))) for t in TASKS}
    weight = torch.cat([heads[t]["weight"] for t in TASKS])
    sizes = [len(heads[t]["weight"]) for t in TASKS]
    offsets = dict(zip(TASKS, [sum(sizes[:i]) for i in range(len(TASKS))]))
    for t in TASKS:
        batches = split_batches(demo_tasks[t], "test")
        feats = _features(load_task_model(demo_tasks[t]), batches)
        logits = _head_logits(feats, {"weight": weight, "logit_scale": heads[t]["logit_scale"]})
        want = (logits.argmax(-1) == labels_of(batches) + offsets[t]).float().mean().item()
        (row,) = pick(rows, method="finetuned", task=t, split="test")
        assert row["metric"] == "acc@union" and row["value"] == pytest.approx(want, abs=1e-6)
        own = loop_accuracy(load_task_model(demo_tasks[t]), batches)
        assert want <= own + 1e-9  # more labels to confuse can only lower accuracy
    # the own-head run on the same rows file measures anew (a different metric key)
    rows = EvaluationRun(EvalConfig(**base)).run()
    assert {r["metric"] for r in rows} == {"acc", "acc@union"}


def test_review_fixes_guard_what_rows_and_tables_mean(demo_tasks, tmp_path):
    """Rows and learned tables are reused only for what they measured: a changed AdaMerging recipe
    learns a new table, reports keep to the run's task set, a source of a reused hyperparameter
    runs first under --only, and configurations that would count wrong are refused."""
    from src.evaluate.rows import RowStore
    from src.evaluate.run import write_reports

    tasks = [str(demo_tasks[t]) for t in TASKS]
    base = dict(experiment="tiny", protocol=None, rows=str(tmp_path / "rows.jsonl"), progress=False,
                ensemble=False, zeroshot=False)
    for steps in (2, 3):
        EvaluationRun(EvalConfig(**base, tasks=tasks, methods=[
            MethodSpec("adamerging", label="AdaMerging", fixed={"steps": steps, "batch_size": 4})])).run()
    assert len(list((tmp_path / "coefficients").glob("adamerging-*.json"))) == 2
    # the same rows file, another task set: the report shows only this run's merges
    run = EvaluationRun(EvalConfig(**base, tasks=tasks[:2], methods=[MethodSpec("average", label="Avg")]))
    run.run()
    write_reports(run)
    report = (tmp_path / "report.md").read_text()
    assert "AdaMerging" not in report and "Avg" in report and TASKS[2] not in report
    # --only a method that reuses another's selection: the source runs first
    spec = [MethodSpec("task_arithmetic", label="TA", stages=[{"lam": [0.3, 0.6]}]),
            MethodSpec("dare", label="DARE", fixed={"mode": "linear"}, reuse={"lam": "task_arithmetic"},
                       stages=[{"p": [0.1]}])]
    rows = EvaluationRun(EvalConfig(**base, tasks=tasks, methods=spec, only=["dare"])).run()
    dare = [r for r in rows if r["method"] == "dare" and r["stage"] == "selected"]
    ta = [r for r in rows if r["method"] == "task_arithmetic" and r["stage"] == "selected"]
    assert dare and ta and dare[0]["params"]["lam"] == ta[0]["params"]["lam"]
    assert dare[0]["params"]["task_order"] == list(TASKS) and "task_order" not in ta[0]["params"]  # DARE masks follow it
    with pytest.raises(ValueError, match="grid_splits must include val"):
        EvaluationRun(EvalConfig(**base, tasks=tasks, grid_splits=["test"]))
    with pytest.raises(ValueError, match="one device"):
        EvaluationRun(EvalConfig(**base, tasks=tasks, devices=2))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nimportant last line without newline")
    with pytest.raises(ValueError, match="not a rows file"):
        RowStore(notes)
    assert notes.read_text() == "my notes\nimportant last line without newline"


def test_reports_never_replace_a_users_file_next_to_the_rows(demo_tasks, tmp_path):
    from src.evaluate.run import write_reports

    (tmp_path / "report.md").write_text("my own notes\n")
    run = EvaluationRun(EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS[:2]], protocol=None,
                                   methods=[], rows=str(tmp_path / "rows.jsonl"), progress=False, ensemble=False,
                                   zeroshot=False))
    run.run()
    with pytest.raises(ValueError, match="not replaced"):
        write_reports(run)
    assert (tmp_path / "report.md").read_text() == "my own notes\n"
    (tmp_path / "report.md").unlink()
    write_reports(run)
    write_reports(run)  # its own earlier report is replaced
    assert (tmp_path / "report.md").read_text().startswith("# tiny: test results")
    assert not list(tmp_path.glob(".*.tmp"))
