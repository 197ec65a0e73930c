"""Tiny demo-family task checkpoints for the evaluation-stage tests (test_models.py, test_run.py).

Three LoRA task models of one random tiny BERT (``tests/finetune/conftest.py: TINY_BERT``, the real
MiniLM tokenizer), on disjoint demo tasks, with random LoRA factors (different per task) and
small validation / test splits recorded in ``task.json`` (``hparams.datamodule``). Nothing is
trained: building all three takes about two seconds.

The helpers below compute what the evaluation stage computes *without* it: a task module on a
fresh base (``plain_module``), the recorded splits as batches (``split_batches``), accuracy by a
plain loop (``loop_accuracy``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("bbc_news", "color_names", "world_cities")  # sorted: see test_run.py on task order
SIZES = {"train_size": 4, "val_size": 20, "test_size": 24}  # eval batches of 16: a short last batch
LORA_SCALE = 0.15  # std of the random LoRA factors (B and A): the tasks' models differ visibly


def tiny_bert() -> dict:
    from tests.finetune.conftest import TINY_BERT

    return dict(TINY_BERT)


def datamodule_spec(task: str) -> dict:
    return {"class_path": "src.finetune.data.demo.DemoDataModule",
            "init_args": {"task": task, "tokenizer": TOKENIZER, "batch_size": 8, "eval_batch_size": 16, "seed": 0,
                          **SIZES}}


def build_task_checkpoint(root: Path, task: str, seed: int, r: int = 4) -> Path:
    """A LoRA task checkpoint of ``task`` (rank ``r``, alpha ``2r``) at ``root/task``: tiny BERT,
    label-embedding head, random LoRA factors."""
    from src.finetune.base import LoraSpec
    from src.finetune.data.demo import DEMO_TASKS
    from src.finetune.export import export_task_checkpoint
    from src.finetune.models.demo_text import DEMO_LORA_TARGETS, DemoTextClassifier

    module = DemoTextClassifier(pretrained="tiny-bert", finetune="lora", model_config=tiny_bert(), tokenizer=TOKENIZER,
                                lora=LoraSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=list(DEMO_LORA_TARGETS)))
    spec = DEMO_TASKS[task]
    module.label_names = list(spec.label_names)
    module.build_model(module.label_names, list(spec.templates))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(LORA_SCALE * torch.randn(p.shape, generator=g))
    return export_task_checkpoint(module, root / task, task, extra_hparams={"datamodule": datamodule_spec(task)})


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory) -> dict[str, Path]:
    """``{task: task-checkpoint directory}`` for ``TASKS`` (built once per test module)."""
    root = tmp_path_factory.mktemp("tasks")
    return {task: build_task_checkpoint(root, task, seed=200 + i) for i, task in enumerate(TASKS)}


# ----- independent computations ---------------------------------------------------------
def split_batches(task_dir, split: str) -> list[dict]:
    """The batches of ``split`` of the DataModule that ``task.json`` records (built directly)."""
    from src.finetune.data.demo import DemoDataModule
    from src.task_checkpoint import read_task_info

    spec = read_task_info(task_dir).hparams["datamodule"]
    assert spec["class_path"].endswith("DemoDataModule")
    dm = DemoDataModule(**spec["init_args"])
    dm.setup("validate")
    return list(dm.val_dataloader() if split == "val" else dm.test_dataloader())


def plain_module(task_dir, updates: Optional[Mapping[str, torch.Tensor]] = None):
    """``task_dir``'s module (its head) on a fresh, unwrapped base; ``updates`` (dense ``dW`` by
    base parameter name) are added to the base weights."""
    from src.finetune.load import build_module, load_head
    from src.task_checkpoint import head_path, read_task_info

    task_dir = Path(task_dir)
    module = build_module(read_task_info(task_dir), task_dir)
    base = module.load_base()
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, dw in (updates or {}).items():
            params[name].add_(dw.to(params[name].dtype))
    module.attach_base(base, trainable=False)
    load_head(head_path(task_dir), module)
    return module.requires_grad_(False).eval()


@torch.no_grad()
def loop_logits(module, batches) -> torch.Tensor:
    module.eval()
    return torch.cat([module.logits(b).float() for b in batches])


def labels_of(batches) -> torch.Tensor:
    return torch.cat([b["labels"] for b in batches])


def loop_accuracy(module, batches) -> float:
    logits, labels = loop_logits(module, batches), labels_of(batches)
    return (logits.argmax(-1) == labels).float().mean().item()
