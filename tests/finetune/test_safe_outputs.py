"""Finetuning never deletes what the user did not ask to replace (issue 6, finetune side).

``--export.output_dir`` (TaskCheckpointExport) and ``train_all --output`` refuse, before anything
is built or trained, a path that is, contains or lies inside an input (a local base model, a
data directory), the working directory or its parents, and an existing non-empty directory that
is not an earlier task checkpoint unless ``overwrite`` is given; replacing an earlier output is
announced.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from src.finetune.export import TaskCheckpointExport
from src.safe_output import OutputError
from src.task_checkpoint import read_task_info

from .conftest import REPO, TINY_CLIP, ToyImageDataModule, fake_task_checkpoint


class StepCount(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


class ToyWithDataRoot(ToyImageDataModule):
    """The toy task, as if read from ``data_root``."""

    def __init__(self, data_root: str):
        super().__init__()
        self.save_hyperparameters()
        self.data_root = data_root


def clip_on(pretrained: str):
    from src.finetune.base import LoraSpec, OptimSpec
    from src.finetune.models.clip import ClipClassifier

    return ClipClassifier(pretrained=pretrained, finetune="lora", model_config=TINY_CLIP,
                          lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                          optim=OptimSpec(lr=1e-2, weight_decay=0.0, scheduler="constant"))


def make_base(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def fit(module, dm, output_dir, quiet_trainer, **export_kw):
    steps = StepCount()
    export = TaskCheckpointExport(output_dir=str(output_dir), zero_shot=False, test=False, **export_kw)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, callbacks=[steps, export])
    trainer.fit(module, datamodule=dm)
    return steps


@pytest.mark.parametrize("where", ["the base", "inside the base", "the base's parent"])
def test_fit_refuses_the_base_model_before_building_anything(tmp_path, quiet_trainer, toy_dm, where):
    base = make_base(tmp_path / "models" / "base")
    before = snapshot(tmp_path / "models")
    target = {"the base": base, "inside the base": base / "toy", "the base's parent": base.parent}[where]
    module = clip_on(str(base))
    with pytest.raises(OutputError, match="input"):
        fit(module, toy_dm, target, quiet_trainer)
    assert module.model is None  # refused before the model was built, let alone trained
    assert snapshot(tmp_path / "models") == before


def test_fit_refuses_the_data_directory(tmp_path, quiet_trainer, make_clip):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("x,y\n")
    with pytest.raises(OutputError, match="input"):
        fit(make_clip("lora"), ToyWithDataRoot(str(data)), data / "{task}", quiet_trainer)
    assert (data / "train.csv").read_text() == "x,y\n" and [p.name for p in data.iterdir()] == ["train.csv"]


@pytest.mark.parametrize("target", [".", "work", ""])
def test_fit_refuses_the_working_directory_and_its_parents(tmp_path, quiet_trainer, make_clip, toy_dm,
                                                          monkeypatch, target):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    output = {".": ".", "work": str(work), "": str(tmp_path)}[target]
    module = make_clip("lora")
    with pytest.raises(OutputError):
        fit(module, toy_dm, output, quiet_trainer)
    assert module.model is None  # refused before anything was built or trained
    assert (work / "notes.txt").read_text() == "keep"


def test_fit_refuses_a_foreign_directory_unless_overwrite(tmp_path, quiet_trainer, make_clip, toy_dm, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.md").write_text("| a | b |")
    module = make_clip("lora")
    with pytest.raises(OutputError, match="not an earlier output.*--overwrite"):
        fit(module, toy_dm, results, quiet_trainer)
    assert module.model is None and (results / "table.md").read_text() == "| a | b |"

    steps = fit(make_clip("lora"), toy_dm, results, quiet_trainer, overwrite=True)
    assert steps.steps == 2
    assert "replacing the existing directory" in capsys.readouterr().err
    assert not (results / "table.md").exists() and read_task_info(results).task == "toy"


def test_fit_replaces_an_earlier_task_checkpoint_and_says_so(tmp_path, quiet_trainer, make_clip, toy_dm, capsys):
    earlier = fake_task_checkpoint(tmp_path / "toy", task="toy")
    fit(make_clip("lora"), toy_dm, earlier, quiet_trainer)
    assert f"replacing the earlier output at {earlier}" in capsys.readouterr().err
    assert read_task_info(earlier).base_model != "x"


def test_export_function_checks_its_output(tmp_path, built_clip):
    from src.finetune.export import export_task_checkpoint

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="refusing to replace"):
        export_task_checkpoint(built_clip("lora"), tmp_path / "mine", "toy")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


# ----- train_all ------------------------------------------------------------------------
def run_train_all(cfg, output, *extra, tasks=("color_names",)):
    from src.finetune import train_all

    return train_all.main(["--config", str(cfg), "--tasks", *tasks, "--output", str(output), *extra])


def test_train_all_refuses_the_working_directory_before_training(tmp_path, tiny_demo_config, monkeypatch, capsys):
    cfg = tiny_demo_config(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", str(work), str(tmp_path)):
        assert run_train_all(cfg, output) == 2
        err = capsys.readouterr().err
        assert "refusing to start: --output" in err
        assert ("working directory" in err) if output != "." else ("is not a name a new output can take" in err)
    assert list(work.iterdir()) == [] and not (tmp_path / ".runs").exists()


def test_train_all_refuses_a_foreign_task_directory_unless_overwrite(tmp_path, tiny_demo_config, capsys):
    cfg = tiny_demo_config(tmp_path, export={"zero_shot": False})
    out = tmp_path / "out"
    (out / "color_names").mkdir(parents=True)
    (out / "color_names" / "draft.txt").write_text("mine")
    assert run_train_all(cfg, out) == 2
    captured = capsys.readouterr()
    assert "color_names:" in captured.err and "--overwrite" in captured.err and "training" not in captured.out
    assert (out / "color_names" / "draft.txt").read_text() == "mine" and not (out / ".runs").exists()

    assert run_train_all(cfg, out, "--overwrite") == 0
    assert "replacing the existing directory" in capsys.readouterr().err
    assert not (out / "color_names" / "draft.txt").exists() and read_task_info(out / "color_names").task == "color_names"


def test_train_all_refuses_an_output_inside_a_local_base_model(tmp_path, tiny_demo_config, capsys):
    base = make_base(tmp_path / "base")
    before = snapshot(base)
    cfg = tiny_demo_config(tmp_path, model={"pretrained": str(base)})
    assert run_train_all(cfg, base) == 2
    assert f"lies inside the input {base}" in capsys.readouterr().err
    # the base named on the command line instead of in the config
    cfg = tiny_demo_config(tmp_path)
    assert run_train_all(cfg, base / "ckpts", "--", "--model.init_args.pretrained", str(base)) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert snapshot(base) == before


def test_fit_cli_refusal_is_one_line_not_a_traceback(tmp_path, tiny_demo_config):
    cfg = tiny_demo_config(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("keep")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "src.finetune", "fit", "--config", str(cfg),
                           "--export.output_dir", str(tmp_path / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'results'}: is a non-empty directory" in proc.stderr
    assert (tmp_path / "results" / "table.md").read_text() == "keep"
