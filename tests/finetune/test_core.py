"""Finetune core: schedules, hparams, the export callback, task.json, loading errors, train_all."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from src.finetune.base import LoraSpec, OptimSpec, coerce_spec
from src.finetune.export import TaskCheckpointExport, export_task_checkpoint
from src.finetune.load import load_task_model
from src.finetune.optim import build_optimizer, lr_lambda
from src.task_checkpoint import TaskCheckpointError, is_task_dir, read_task_info

from .conftest import fake_task_checkpoint

REPO = Path(__file__).resolve().parents[2]


# ----- optimizer / schedule ----------------------------------------------------------------
def test_warmup_then_cosine_and_linear():
    cos = lr_lambda(OptimSpec(scheduler="cosine", warmup=0.1), 100)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5, abs=1e-6)
    assert cos(100) == pytest.approx(0.0, abs=1e-9)
    lin = lr_lambda(OptimSpec(scheduler="linear", warmup=5), 105)
    assert lin(4) == pytest.approx(1.0) and lin(55) == pytest.approx(0.5)
    const = lr_lambda(OptimSpec(scheduler="constant"), 10)
    assert const(7) == 1.0


def test_optimizer_takes_only_trainable_params():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    out = build_optimizer([a, b], OptimSpec(lr=0.5), 10)
    assert [p for g in out["optimizer"].param_groups for p in g["params"]] == [a]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([b], OptimSpec(), 10)


def test_specs_from_yaml_dicts():
    spec = coerce_spec(LoraSpec, {"r": 4, "target_modules": ["query"]})
    assert spec.r == 4 and spec.alpha == 16
    assert coerce_spec(OptimSpec, {"betas": [0.9, 0.98]}).betas == (0.9, 0.98)
    with pytest.raises(ValueError, match="unknown field"):
        coerce_spec(LoraSpec, {"rank": 4})


def test_hparams_are_plain_so_checkpoints_load_weights_only(make_clip):
    module = make_clip("lora")
    assert isinstance(module.hparams["lora"], dict) and isinstance(module.hparams["optim"], dict)
    assert module.lora.r == 4
    again = type(module)(**module.init_args())
    assert again.lora == module.lora and again.optim == module.optim


# ----- the export callback through a real fit ------------------------------------------------
def test_fit_writes_task_checkpoint_with_all_fields(make_clip, toy_dm, quiet_trainer, tmp_path):
    module = make_clip("lora")
    export = TaskCheckpointExport(output_dir=str(tmp_path / "ckpt" / "{task}"))
    trainer = quiet_trainer(max_epochs=2, callbacks=[export], limit_train_batches=3)
    trainer.fit(module, datamodule=toy_dm)
    out = tmp_path / "ckpt" / "toy"
    assert export.exported_to == out and is_task_dir(out)
    raw = json.loads((out / "task.json").read_text())
    for key in ("task", "base_model", "family", "kind", "label_names", "hparams", "metrics", "format_version"):
        assert key in raw, key
    info = read_task_info(out)
    assert info.task == "toy" and info.kind == "lora" and info.family == "clip-hf"
    assert info.base_model == module.base_model_id and info.base_model.startswith("tiny-clip#config-")
    assert info.label_names == toy_dm.label_names
    hp = info.hparams
    assert hp["lora"]["r"] == 4 and hp["optim"]["lr"] == pytest.approx(1e-2)
    assert hp["module"]["class_path"] == "src.finetune.models.clip.ClipClassifier"
    assert hp["templates"] == toy_dm.templates
    assert hp["trainer"]["max_epochs"] == 2 and hp["selection"]["select"] == "best"
    assert hp["datamodule"]["init_args"]["batch_size"] == 8
    for stage in ("zeroshot", "finetuned"):
        for split in ("val_acc", "test_acc"):
            assert 0.0 <= info.metrics[stage][split] <= 1.0
    assert info.metrics["finetuned"]["val_acc"] == pytest.approx(export.best_score)
    assert (out / "adapter" / "adapter_config.json").is_file()
    head = load_file(str(out / "head.safetensors"))
    assert head["weight"].shape == (3, 16) and head["logit_scale"].shape == ()
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_best_weights_are_exported_not_last(make_clip, toy_dm, quiet_trainer, tmp_path):
    """Weights wrecked after the last validation must not reach the checkpoint: the callback
    restores the best-validation snapshot before exporting."""
    import lightning as L

    class Wreck(L.Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.add_(10.0)

    module = make_clip("lora")
    export = TaskCheckpointExport(output_dir=str(tmp_path / "{task}"))
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[Wreck(), export])
    trainer.fit(module, datamodule=toy_dm)
    snapshot = export.state_dict()["best_state"]
    assert snapshot and all("lora_" in k for k in snapshot)
    loaded = load_task_model(tmp_path / "toy")
    params = dict(loaded.named_parameters())
    for name, value in snapshot.items():
        torch.testing.assert_close(params[name], value)
    info = read_task_info(tmp_path / "toy")
    assert info.metrics["finetuned"]["val_acc"] == pytest.approx(export.best_score)


def test_lightning_checkpoint_is_small_and_resumes(make_clip, toy_dm, quiet_trainer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = make_clip("lora")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "runs", save_last=True)
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True,
                            callbacks=[ckpt_cb, TaskCheckpointExport(output_dir=str(tmp_path / "a"))])
    trainer.fit(module, datamodule=toy_dm)
    last = tmp_path / "runs" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # plain hparams and tensors only
    keys = set(ckpt["state_dict"])
    assert keys and all("lora_" in k or k.startswith("head") for k in keys), sorted(keys)[:5]
    # resume to 8 steps
    module2 = make_clip("lora")
    export2 = TaskCheckpointExport(output_dir=str(tmp_path / "b"))
    trainer2 = quiet_trainer(max_steps=8, callbacks=[export2])
    trainer2.fit(module2, datamodule=toy_dm, ckpt_path=str(last), weights_only=True)
    assert trainer2.global_step == 8
    a, b = read_task_info(tmp_path / "a"), read_task_info(tmp_path / "b")
    assert a.metrics["zeroshot"] == b.metrics["zeroshot"]  # restored, not re-measured after training
    # a checkpoint of another model (full finetune: other trainable keys) is refused
    other = make_clip("full")
    with pytest.raises(RuntimeError, match="does not fit"):
        quiet_trainer(max_steps=8).fit(other, datamodule=toy_dm, ckpt_path=str(last), weights_only=True)


def test_failed_export_leaves_nothing(built_clip, tmp_path, monkeypatch):
    module = built_clip("lora")

    def boom(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "save_head", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_task_checkpoint(module, tmp_path / "toy", "toy")
    assert list(tmp_path.iterdir()) == []


# ----- corrupt / mismatched checkpoints ------------------------------------------------------
@pytest.fixture
def exported(built_clip, tmp_path):
    def make(kind):
        return export_task_checkpoint(built_clip(kind), tmp_path / kind, "toy")

    return make


def test_missing_head_names_the_file(exported):
    out = exported("lora")
    (out / "head.safetensors").unlink()
    with pytest.raises(TaskCheckpointError, match=r"head\.safetensors.*missing"):
        load_task_model(out)


def test_missing_adapter_weights_names_the_file(exported):
    out = exported("lora")
    (out / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(TaskCheckpointError, match=r"adapter_model\.safetensors"):
        load_task_model(out)


def test_adapter_with_wrong_module_names_the_file(exported):
    out = exported("lora")
    path = out / "adapter" / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(iter(state))
    state[key.replace("vision_model.encoder", "vision_model.decoder")] = state.pop(key)
    save_file(state, str(path))
    with pytest.raises(TaskCheckpointError, match=r"adapter_model\.safetensors.*no module"):
        load_task_model(out)


def test_adapter_with_wrong_shape_names_the_file(exported):
    out = exported("lora")
    path = out / "adapter" / "adapter_model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(path))
    with pytest.raises(TaskCheckpointError, match=r"adapter_model\.safetensors.*input features"):
        load_task_model(out)


def test_full_weights_wrong_key_or_shape_or_nan_name_the_file(exported):
    out = exported("full")
    path = out / "model.safetensors"
    good = load_file(str(path))
    bad = dict(good)
    bad["vision_model.not_a_layer.weight"] = torch.zeros(2)
    save_file(bad, str(path))
    with pytest.raises(TaskCheckpointError, match=r"model\.safetensors.*not parameters of the base"):
        load_task_model(out)
    bad = dict(good)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    bad[key] = torch.zeros(3, 3)
    save_file(bad, str(path))
    with pytest.raises(TaskCheckpointError, match=r"model\.safetensors.*shape"):
        load_task_model(out)
    bad = dict(good)
    bad[key] = torch.full_like(good[key], float("nan"))
    save_file(bad, str(path))
    with pytest.raises(TaskCheckpointError, match=r"model\.safetensors.*NaN"):
        load_task_model(out)


def test_head_with_wrong_rows_names_the_file(exported):
    out = exported("lora")
    save_file({"weight": torch.zeros(5, 16), "logit_scale": torch.tensor(1.0)}, str(out / "head.safetensors"))
    with pytest.raises(TaskCheckpointError, match=r"head\.safetensors.*5 rows"):
        load_task_model(out)


def test_base_model_mismatch_names_task_json(exported, make_clip):
    out = exported("lora")
    with pytest.raises(TaskCheckpointError, match=r"task\.json.*trained from base"):
        load_task_model(out, base="openai/clip-vit-base-patch32")
    other = make_clip("lora", init_seed=7)  # another random base
    with pytest.raises(TaskCheckpointError, match=r"task\.json.*trained from base"):
        load_task_model(out, base=other)
    raw = json.loads((out / "task.json").read_text())
    raw["base_model"] = "someone/else"
    (out / "task.json").write_text(json.dumps(raw))
    with pytest.raises(TaskCheckpointError, match=r"task\.json.*base_model"):
        load_task_model(out)


def test_given_base_module_is_used(exported, make_clip, toy_dm):
    out = exported("full")
    base = make_clip("full").load_base()
    model = load_task_model(out, base=base)
    assert model.unwrapped_model() is base
    batch = next(iter(toy_dm.val_dataloader()))
    torch.testing.assert_close(model.logits(batch), load_task_model(out).logits(batch))


def test_missing_task_json_is_clear(tmp_path):
    with pytest.raises(TaskCheckpointError, match=r"task\.json is missing"):
        load_task_model(tmp_path)


# ----- CLI and train_all ------------------------------------------------------------------
def test_train_all_skips_existing_task(tmp_path, tiny_demo_config, capsys):
    from src.finetune import train_all

    cfg = tiny_demo_config(tmp_path)
    out = tmp_path / "out"
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  world_cities: {}\n  color_names: {data.init_args.task: color_names}\n")
    # world_cities already has a checkpoint (its files' content is not read, only their presence)
    fake_task_checkpoint(out / "world_cities")
    rc = train_all.main(["--config", str(cfg), "--tasks-file", str(tasks), "--output", str(out)])
    lines = capsys.readouterr().out
    assert rc == 0, lines
    assert "[1/2] world_cities: skipped" in lines
    assert "[2/2] color_names: training" in lines and "[2/2] color_names: done" in lines
    info = read_task_info(out / "color_names")
    assert info.task == "color_names" and info.family == "demo-text"
    assert info.hparams["trainer"]["global_step"] == 2
    assert read_task_info(out / "world_cities").base_model == "x"  # untouched
    # a second run skips both
    rc = train_all.main(["--config", str(cfg), "--tasks-file", str(tasks), "--output", str(out)])
    lines = capsys.readouterr().out
    assert rc == 0 and lines.count("skipped") == 2


def test_train_all_dry_run_prints_commands(tmp_path, capsys):
    from src.finetune import train_all

    rc = train_all.main(["--config", "configs/finetune/demo.yaml", "--tasks", "bbc_news", "--output",
                         str(tmp_path), "--dry-run", "--", "--trainer.max_epochs", "1"])
    line = capsys.readouterr().out
    assert rc == 0
    assert "--data.init_args.task bbc_news" in line and f"--export.output_dir {tmp_path / 'bbc_news'}" in line
    assert line.rstrip().endswith("--trainer.max_epochs 1")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    """Each experiment config is valid for LightningCLI (classes importable, args known)."""
    cfg = yaml.safe_load(path.read_text())
    for group in ("model", "data"):
        module_name, _, cls = cfg[group]["class_path"].rpartition(".")
        try:
            __import__(module_name)
        except ImportError as e:
            pytest.skip(f"{module_name} not importable here: {e}")
    parsed = _parse_only(path)
    assert parsed["model"]["class_path"] == cfg["model"]["class_path"]
    assert parsed["data"]["class_path"] == cfg["data"]["class_path"]


def _parse_only(path: Path) -> dict:
    """Parse (and type-check) a config with the CLI's parser without instantiating anything."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from src.finetune.base import TaskModule
    from src.finetune.export import TaskCheckpointExport

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.add_lightning_class_args(TaskModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    parser.add_lightning_class_args(TaskCheckpointExport, "export")
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    cfg = parser.parse_path(str(path))
    return yaml.safe_load(parser.dump(cfg))


def test_config_check_catches_a_wrong_argument(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "finetune" / "demo.yaml").read_text())
    cfg["model"]["init_args"]["lora"]["rank"] = 8  # LoraSpec has `r`, not `rank`
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="rank"):
        _parse_only(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune" / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_tasks_files_read(path):
    from src.finetune.train_all import read_tasks_file, task_args

    tasks = read_tasks_file(path)
    assert tasks
    for name, overrides in tasks.items():
        args = task_args(name, overrides)
        assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2])
