"""Dispatching an evaluation as submitit jobs (src/evaluate/dispatch.py) on the tiny demo LoRA
task models: the jobs run as real local processes through submitit's LocalExecutor, and what they
collect must be the rows the in-process EvaluationRun writes (same keys, same values; only the
timing fields differ). Also: collect is idempotent, a failed job is named, the plan's grouping."""
from __future__ import annotations

import dataclasses

import pytest

from src.evaluate import EvalConfig, EvaluationRun, JointSpec, MethodSpec
from src.evaluate.dispatch import collect, dispatch, main, method_order, parts_dir_of, plan, statistics_needed
from src.evaluate.rows import read_rows, row_key
from src.evaluate.run import write_reports

from .conftest import TASKS

TIMING = ("wall_s", "time")
METHODS = [MethodSpec("task_arithmetic", label="TA", stages=[{"lam": [0.5, 1.0]}]),
           MethodSpec("ties", label="TIES", fixed={"density": 0.5}, stages=[{"lam": [0.5, 1.0]}])]
BROKEN = MethodSpec("ties", label="Broken", fixed={"no_such_hyperparameter": 1})


def config_for(demo_tasks, rows, methods=METHODS) -> EvalConfig:
    return EvalConfig(experiment="tiny", tasks=[str(demo_tasks[t]) for t in TASKS[:2]], protocol=None,
                      methods=list(methods), rows=str(rows), progress=False, ensemble=True, zeroshot=True,
                      joint=JointSpec(enabled=True))


def by_key(rows) -> dict[str, dict]:
    out = {}
    for r in rows:
        assert row_key(r) not in out, f"duplicate row {r}"
        out[row_key(r)] = {k: v for k, v in r.items() if k not in TIMING}
    return out


@pytest.fixture(scope="module")
def runs(demo_tasks, tmp_path_factory):
    """The same evaluation in process and dispatched (plus a job that fails) through local processes."""
    inproc = tmp_path_factory.mktemp("inproc") / "rows.jsonl"
    run = EvaluationRun(config_for(demo_tasks, inproc))
    run.run()
    write_reports(run)
    rows = tmp_path_factory.mktemp("dispatched") / "rows.jsonl"
    config = config_for(demo_tasks, rows, METHODS + [BROKEN])
    messages = []
    result = dispatch(config, executor="local", jobs=2, say=messages.append)
    return inproc, config, result, messages


def test_dispatched_rows_equal_the_in_process_rows(runs):
    inproc, config, result, _ = runs
    expected = by_key(read_rows(inproc))
    got = by_key(read_rows(config.rows))
    # every kind of row is there: references, grid and selected points, Ensemble, joint Hits@k
    assert {(r["method"], r["stage"]) for r in expected.values()} >= {
        ("finetuned", "reference"), ("zeroshot", "reference"), ("ensemble", "reference"),
        ("task_arithmetic", "grid"), ("task_arithmetic", "selected"), ("ties", "grid"), ("ties", "selected")}
    assert any(r["task"] == "joint" for r in expected.values())
    assert got.keys() == expected.keys()
    assert got == expected
    # the report rendered from the collected rows is the in-process one
    assert (inproc.parent / "report.md").read_text() == (parts_dir_of(config).parent / "report.md").read_text()


def test_each_job_wrote_its_own_part(runs):
    _, config, result, _ = runs
    parts = parts_dir_of(config)
    assert sorted(p.name for p in parts.glob("*.jsonl")) == ["TA.jsonl", "TIES.jsonl", "ensemble.jsonl",
                                                             "references.jsonl"]
    methods = {name: {r["method"] for r in read_rows(parts / f"{name}.jsonl")} for name in ("TA", "TIES", "ensemble")}
    # a method job reads the references from the references part and never writes them again
    assert methods == {"TA": {"task_arithmetic"}, "TIES": {"ties"}, "ensemble": {"ensemble"}}
    assert result.rows_total == len(read_rows(config.rows))


def test_a_failed_job_is_reported_by_name(runs):
    _, _, result, messages = runs
    assert list(result.failed) == ["Broken"]
    assert "no_such_hyperparameter" in result.failed["Broken"]
    assert any(m.startswith("job Broken: FAILED") and "no_such_hyperparameter" in m for m in messages)
    assert sorted(result.jobs) == ["Broken", "TA", "TIES", "ensemble", "references"]


def test_collect_is_idempotent(runs, capsys):
    _, config, _, _ = runs
    rows_before = open(config.rows, "rb").read()
    report = parts_dir_of(config).parent / "report.md"
    report_before = report.read_text()
    added, total, _ = collect(config)
    assert added == 0 and open(config.rows, "rb").read() == rows_before
    assert report.read_text() == report_before
    # the command line's collect step, twice more
    argv = ["--experiment", "tiny", "--tasks", str(config.tasks), "--rows", str(config.rows), "--progress", "false",
            "--collect_only", "true"]
    assert main(argv) == 0 and main(argv) == 0
    assert "collect: 0 new rows" in capsys.readouterr().out
    assert open(config.rows, "rb").read() == rows_before


def test_collect_merges_parts_deduplicated_into_an_existing_rows_file(runs, tmp_path):
    _, config, _, _ = runs
    rows = read_rows(config.rows)
    half = tmp_path / "rows.jsonl"
    half.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows[: len(rows) // 2]))
    moved = dataclasses.replace(config, rows=str(half), report=False)
    jobs = [dataclasses.replace(j, part=str(parts_dir_of(config) / f"{j.name}.jsonl"),
                                timing=str(tmp_path / "none.json")) for wave in plan(moved) for j in wave]
    added, total, _ = collect(moved, jobs)
    assert total == len(rows) and added == len(rows) - len(rows) // 2
    assert by_key(read_rows(half)) == by_key(rows)


def test_plan_groups_reuse_and_precomputes_statistics(demo_tasks, tmp_path):
    config = EvalConfig(experiment="p", tasks=[str(demo_tasks[t]) for t in TASKS], protocol="quick",
                        rows=str(tmp_path / "rows.jsonl"),
                        methods=[MethodSpec("mats", label="MaTS"), MethodSpec("ties"), MethodSpec("task_arithmetic"),
                                 MethodSpec("regmean"), MethodSpec("fisher", statistics={"n": 64})])
    waves = plan(config)
    assert [[j.name for j in w] for w in waves] == [["references"], ["MaTS", "ties", "regmean", "fisher", "ensemble"]]
    # MaTS starts from TA's selected lambda: one job, in which run() selects both
    assert waves[1][0].only == ["MaTS", "task_arithmetic"]
    # collect appends rows as an in-process run writes them: TA's search runs inside MaTS', first
    assert method_order(config) == {"task_arithmetic": 0, "MaTS": 1, "ties": 2, "regmean": 3, "fisher": 4}
    needed = statistics_needed(config, [MethodSpec("mats"), MethodSpec("regmean"), MethodSpec("ties"),
                                        MethodSpec("fisher", statistics={"n": 64})])
    assert needed == {("train", 256, 0): {"kfac_in", "kfac_out", "gram"}, ("train", 64, 0): {"fisher"}}
    only = plan(dataclasses.replace(config, only=["ties"], ensemble=False))
    assert [[j.name for j in w] for w in only] == [["references"], ["ties"]]


def test_slurm_options_become_sbatch_lines(tmp_path, monkeypatch):
    """No SLURM here: a stand-in ``srun`` on PATH lets submitit build its SlurmExecutor, whose sbatch
    file is rendered (never submitted)."""
    from src.evaluate.dispatch import SlurmOptions, make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    options = SlurmOptions(partition="gpu", gpus_per_node=1, cpus_per_task=6, timeout_min=90, account="lab",
                           setup=["module load cuda"], additional={"exclude": "node7"})
    executor = make_executor("slurm", tmp_path / "logs", options, "eval-tiny")
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --time=90", "#SBATCH --account=lab", "#SBATCH --exclude=node7",
                 "#SBATCH --job-name=eval-tiny", "#SBATCH --nodes=1", "module load cuda"):
        assert line in text, (line, text)
