"""Base LightningModule of every task model, and the contract the task-checkpoint export uses.

A family module (CLIP, Llama NLI, mT5, demo text encoder) subclasses :class:`TaskModule`
and implements ``build_model(label_names, templates)`` (called once in ``setup`` with the
datamodule's labels) and ``logits(batch)``; classification loss, accuracy, optimizer and
export come from here. Seq2seq modules override ``training_step``/``evaluate_batch``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .optim import OptimSpec, build_optimizer


@dataclass
class LoraSpec:
    """PEFT LoRA settings. ``target_modules`` is a list of names or one regex string (PEFT)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    use_rslora: bool = False
    bias: str = "none"

    def peft_config(self, **extra):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            bias=self.bias,
            **extra,
        )


class TaskModule(L.LightningModule):
    """Classification by logits over the datamodule's ``label_names``.

    Subclass contract:
      * ``family``: the task-checkpoint family name (``task.json``);
      * ``build_model(label_names, templates)``: create ``self.model`` (the network whose
        ``state_dict`` names are the base model's names, PEFT-wrapped for LoRA) and the head;
      * ``logits(batch) -> (B, C)``;
      * ``trained_state_dict()``: full-finetune weights under base-model names;
      * ``save_adapter(directory)``: the PEFT adapter (LoRA);
      * ``head_state_dict()``: the task head (never merged).
    """

    family: ClassVar[str] = ""

    def __init__(
        self,
        pretrained: str,
        finetune: Literal["lora", "full"] = "lora",
        lora: Optional[LoraSpec] = None,
        optim: Optional[OptimSpec] = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.pretrained = pretrained
        self.finetune = finetune
        self.lora = lora or LoraSpec()
        self.optim = optim or OptimSpec()
        self.label_smoothing = label_smoothing
        self.label_names: Optional[list[str]] = None
        self.save_hyperparameters()

    # ----- to implement -------------------------------------------------------------
    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        raise NotImplementedError

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_adapter(self, directory: Path) -> None:
        raise NotImplementedError

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ----- shared machinery ---------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.label_names is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "label_names"):
            raise RuntimeError(f"{type(self).__name__} needs a datamodule exposing `label_names`")
        if hasattr(dm, "prepare_data") and hasattr(dm, "setup"):
            dm.setup(stage)
        self.label_names = list(dm.label_names)
        self.build_model(self.label_names, getattr(dm, "templates", None))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch)
        loss = self.loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def evaluate_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(number correct, number of examples) of one batch."""
        preds = self.logits(batch).argmax(dim=-1)
        return (preds == batch["labels"]).sum(), torch.tensor(len(preds))

    def _eval_step(self, batch: dict, split: str) -> None:
        correct, total = self.evaluate_batch(batch)
        # sample-weighted accuracy over the whole split (sum / sum, not mean of batch means)
        self.log(f"{split}/acc", correct.float() / total, batch_size=int(total), on_epoch=True, prog_bar=True,
                 reduce_fx="mean", sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        steps = int(steps) if steps is not None and steps != float("inf") else None
        return build_optimizer(self.parameters(), self.optim, steps)

    # ----- export helpers -----------------------------------------------------------
    def task_hparams(self) -> dict[str, Any]:
        return {
            "pretrained": self.pretrained,
            "finetune": self.finetune,
            "lora": asdict(self.lora) if self.finetune == "lora" else None,
            "optim": asdict(self.optim),
            "label_smoothing": self.label_smoothing,
        }

    def save_head(self, path: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}, str(path))
