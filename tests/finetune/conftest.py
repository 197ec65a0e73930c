"""Tiny models built from configs (random weights, no hub) and toy data for the finetune tests."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from src.pipeline.smoke import TINY_BERT, TINY_CLIP  # noqa: E402  (one definition: smoke mode and tests)

TOY_LABELS = ["cat", "dog", "car"]
TOY_TEMPLATES = ["a photo of a {}.", "a blurry picture of a {}."]


class ToyImages(torch.utils.data.Dataset):
    """Class-dependent patterns plus noise: learnable in a few steps."""

    def __init__(self, n: int, num_classes: int, image_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(num_classes, 3, image_size, image_size, generator=torch.Generator().manual_seed(123))
        self.labels = torch.arange(n) % num_classes
        self.images = patterns[self.labels] + 0.5 * torch.randn(n, 3, image_size, image_size, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class ToyImageDataModule(L.LightningDataModule):
    def __init__(self, n_train: int = 48, n_eval: int = 24, batch_size: int = 8, image_size: int = 32, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.task = "toy"
        self.label_names = list(TOY_LABELS)
        self.templates = list(TOY_TEMPLATES)
        self.sets = {
            "train": ToyImages(n_train, len(TOY_LABELS), image_size, seed),
            "val": ToyImages(n_eval, len(TOY_LABELS), image_size, seed + 1),
            "test": ToyImages(n_eval, len(TOY_LABELS), image_size, seed + 2),
        }
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self):
        return DataLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return DataLoader(self.sets["val"], batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], batch_size=self.batch_size)


@pytest.fixture
def tiny_clip_config():
    import copy

    return copy.deepcopy(TINY_CLIP)


@pytest.fixture
def toy_dm():
    return ToyImageDataModule()


def _make_clip(finetune: str = "lora", **kw):
    from src.finetune.base import LoraSpec, OptimSpec
    from src.finetune.models.clip import ClipClassifier

    kw.setdefault("lora", LoraSpec(r=4, alpha=8, dropout=0.0))
    kw.setdefault("optim", OptimSpec(lr=1e-2, weight_decay=0.0, scheduler="constant"))
    return ClipClassifier(pretrained="tiny-clip", finetune=finetune, model_config=TINY_CLIP, **kw)


def _quiet_trainer(**kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kw)
    return L.Trainer(**defaults)


class LossLog(L.Callback):
    """Records the training loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_losses(module, dm, steps: int) -> list[float]:
    """Train ``steps`` steps on the CPU without validation; the training loss of each step."""
    log = LossLog()
    _quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[log]).fit(module, datamodule=dm)
    return log.losses


@pytest.fixture
def built_clip(toy_dm):
    """A built (setup) LoRA ClipClassifier over the toy labels."""
    def build(finetune: str = "lora", **kw):
        module = _make_clip(finetune, **kw)
        module.label_names = list(toy_dm.label_names)
        module.build_model(module.label_names, toy_dm.templates)
        return module

    return build


@pytest.fixture
def make_clip():
    """Factory: an unbuilt ClipClassifier over the tiny config."""
    return _make_clip


@pytest.fixture
def quiet_trainer():
    """Factory: a CPU Trainer without logger, checkpoints or progress bar."""
    return _quiet_trainer


@pytest.fixture
def toy_dm_cls():
    return ToyImageDataModule


@pytest.fixture
def tiny_bert_config():
    import copy

    return copy.deepcopy(TINY_BERT)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_tiny_demo_config(path, tiny_bert: dict, trainer: dict | None = None, model: dict | None = None,
                           data: dict | None = None, export: dict | None = None):
    """configs/finetune/demo.yaml with a tiny random BERT and a few examples, written to ``path``
    (a directory: ``tiny_demo.yaml`` in it). ``trainer`` / ``model`` (init args) / ``data`` (init
    args) / ``export`` update the defaults (2 steps, one epoch, no callbacks)."""
    import copy
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load(Path(REPO, "configs", "finetune", "demo.yaml").read_text())
    cfg["trainer"].update(max_steps=2, max_epochs=1, val_check_interval=None, callbacks=[])
    cfg["trainer"].update(trainer or {})
    cfg["model"]["init_args"]["model_config"] = copy.deepcopy(tiny_bert)
    cfg["model"]["init_args"]["pretrained"] = "tiny-bert"
    cfg["model"]["init_args"]["tokenizer"] = "sentence-transformers/all-MiniLM-L6-v2"
    cfg["model"]["init_args"].update(model or {})
    cfg["data"]["init_args"].update(train_size=16, val_size=8, test_size=8, batch_size=8)
    cfg["data"]["init_args"].update(data or {})
    cfg["export"].update(export or {})
    out = Path(path) / "tiny_demo.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture
def tiny_demo_config(tiny_bert_config):
    """Factory: ``make(directory, trainer=..., model=..., data=..., export=...)`` writes a tiny demo
    config (see :func:`write_tiny_demo_config`) and returns its path."""
    def make(path, **kw):
        return write_tiny_demo_config(path, tiny_bert_config, **kw)

    return make


def fake_task_checkpoint(directory, task: str = "world_cities", base_model: str = "x", complete: bool = True):
    """A task-checkpoint directory whose files exist (their content is not a model): what
    ``train_all`` takes for a finished task. ``complete=False`` leaves out the adapter weights."""
    import json
    from pathlib import Path

    directory = Path(directory)
    (directory / "adapter").mkdir(parents=True)
    (directory / "task.json").write_text(json.dumps(
        {"task": task, "base_model": base_model, "family": "demo-text", "kind": "lora", "label_names": ["a"]}))
    (directory / "adapter" / "adapter_config.json").write_text("{}")
    (directory / "head.safetensors").write_bytes(b"not read")
    if complete:
        (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"not read")
    return directory
