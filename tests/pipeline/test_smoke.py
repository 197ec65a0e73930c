"""Every experiment script (scripts/experiments/*.sh) end to end in smoke mode: tiny random models,
synthetic data, CPU. The script is run as a user runs it (SMOKE=1 bash ...), then checked: every
task model was trained, the report holds the experiment's tables, and a second run redoes nothing."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from src.pipeline.experiments import EXPERIMENTS

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "scripts" / "experiments").glob("*.sh"))


def run_script(script: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOKE": "1", "SMOKE_ROOT": str(root), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_every_experiment_has_a_script():
    assert {s.stem for s in SCRIPTS} == set(EXPERIMENTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_experiment_script_smoke(script, tmp_path):
    exp = EXPERIMENTS[script.stem]
    root = tmp_path / "smoke"
    done = run_script(script, root)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    for task in exp.smoke_tasks + exp.smoke_generalization:
        assert (root / "tasks" / task / "task.json").is_file(), task
    report = (root / "results" / "report.md").read_text()
    assert "## Accuracy (%)" in report
    rows = [json.loads(line) for line in (root / "results" / "rows.jsonl").read_text().splitlines()]
    labels = {r["label"] for r in rows}
    assert "Finetuned" in labels and len(labels) > 2  # references and merges
    if exp.permute:
        assert "MuDSC Table 1 layout" in report
        assert {"Average", "Git Re-Basin", "ZipIt", "MuDSC-Zip"} <= labels
    if exp.multitask:  # the multitask baseline, trained on the mixture and scored as a merged model
        assert {"Multitask", "Traditional MTL"} & labels
    if exp.smoke_generalization:
        assert "## Held-in vs generalization" in report
    for analysis in exp.analyses:  # each analysis writes its table (and figure) from the smoke run
        assert (root / "results" / analysis / f"{analysis}.md").is_file(), analysis
    if "cka" in exp.analyses:
        assert (root / "results" / "cka" / "cka.png").is_file()
    if "joint" in {r["task"] for r in rows}:
        assert "## Joint benchmark" in report
    if script.stem == "E_mudsc_cifar100":  # a second run resumes: nothing is retrained, merged or re-scored
        stamp = (root / "tasks" / exp.smoke_tasks[0] / "model.safetensors").stat().st_mtime_ns
        again = run_script(script, root)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (root / "tasks" / exp.smoke_tasks[0] / "model.safetensors").stat().st_mtime_ns == stamp
        assert len((root / "results" / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_smoke_never_writes_into_a_real_data_directory(tmp_path, capsys):
    from src.pipeline.__main__ import main

    real = tmp_path / "root" / "data" / "mnist"
    real.mkdir(parents=True)
    (real / "train.csv").write_text("real data\n")
    assert main(["A_knots_vitb32", "--smoke", "--root", str(tmp_path / "root"), "--stages", "finetune"]) == 2
    assert "smoke mode did not write" in capsys.readouterr().err
    assert sorted(p.name for p in real.iterdir()) == ["train.csv"]
    assert not (tmp_path / "root" / "tasks").exists()
