"""Base LightningModule of every task model, and the contract the task-checkpoint export uses.

A family module (CLIP, Llama NLI, mT5, demo text encoder) subclasses :class:`TaskModule`
and implements ``build_model(label_names, templates)`` (called once in ``setup`` with the
datamodule's labels) and ``logits(batch)``; classification loss, accuracy, optimizer and
export come from here. Seq2seq modules override ``training_step``/``evaluate_batch``.

Loading a saved task model (``src.finetune.load.load_task_model``) additionally uses
``load_base()`` (the pretrained base network, unwrapped) and ``load_head_state_dict``;
families that implement them can be reloaded from their task checkpoint directory.
"""
from __future__ import annotations

import hashlib
import json

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchmetrics import MeanMetric

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

        kwargs = dict(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            bias=self.bias,
        )
        kwargs.update(extra)
        return LoraConfig(**kwargs)


def coerce_spec(cls, value):
    """``None`` -> default ``cls()``, a dict (from YAML / a checkpoint's hparams) -> ``cls(**dict)``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        value = dict(value)
        if "betas" in value and value["betas"] is not None:
            value["betas"] = tuple(value["betas"])
        return cls(**value)
    raise TypeError(f"expected {cls.__name__}, dict or None, got {type(value).__name__}")


def jsonable(value):
    """Plain JSON/YAML-safe copy of hyperparameters (dataclasses -> dicts, tuples -> lists)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return repr(value)


def _weights_only_safe(value):
    """Checkpoint-safe form of an hparam: dataclasses become dicts (``torch.load(weights_only=True)``)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def config_fingerprint(model_config: dict, init_seed: int) -> str:
    """A short id of a model built from a config: its weights are fixed by config and seed."""
    blob = json.dumps({"config": model_config, "seed": init_seed}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def config_model_id(pretrained: str, model_config: Optional[dict], init_seed: int) -> str:
    """The base-model id recorded in task.json: the hub id, or the id of a config-built model."""
    if model_config is None:
        return pretrained
    return f"{pretrained}#config-{config_fingerprint(model_config, init_seed)}"


def seeded_build(fn, seed: int):
    """Build a randomly initialized model reproducibly without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


class TaskModule(L.LightningModule):
    """Classification by logits over the datamodule's ``label_names``.

    Subclass contract:
      * ``family``: the task-checkpoint family name (``task.json``);
      * ``build_model(label_names, templates)``: create ``self.model`` (the network whose
        ``state_dict`` names are the base model's names, PEFT-wrapped for LoRA) and the head;
      * ``logits(batch) -> (B, C)``;
      * ``trained_state_dict()``: full-finetune weights under base-model names (default:
        the trainable parameters of ``self.model``);
      * ``save_adapter(directory)``: the PEFT adapter (default: ``self.model.save_pretrained``);
      * ``head_state_dict()``: the task head (never merged);
    and, to be reloadable with ``src.finetune.load.load_task_model``:
      * ``load_base()``: the pretrained base network, not wrapped, all weights frozen;
      * ``load_head_state_dict(state)``: inverse of ``head_state_dict``;
      * ``base_model_id``: the id written to / checked against ``task.json``.
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
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        self.pretrained = pretrained
        self.finetune = finetune
        self.lora = coerce_spec(LoraSpec, lora)
        self.optim = coerce_spec(OptimSpec, optim)
        self.label_smoothing = float(label_smoothing)
        self.label_names: Optional[list[str]] = None
        self.templates: Optional[list[str]] = None
        self.model = None
        # sample-weighted accuracy over a whole split (sum correct / sum examples), DDP-synced
        self.val_acc = MeanMetric()
        self.test_acc = MeanMetric()
        # Collects the init args of the whole subclass chain. Dataclasses are stored as dicts so
        # that Lightning checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        for store in (self._hparams, getattr(self, "_hparams_initial", {})):
            for k in list(store):
                store[k] = _weights_only_safe(store[k])
        # Lightning checkpoints keep only trainable parameters and the head (frozen weights come
        # from `pretrained`), so resuming must not insist on every key.
        self.strict_loading = False

    # ----- to implement -------------------------------------------------------------
    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        raise NotImplementedError

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_base(self) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild its base model (load_base)")

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot load a head (load_head_state_dict)")

    @property
    def base_model_id(self) -> str:
        return self.pretrained

    # ----- defaults that fit PEFT-wrapped / plain `self.model` -------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        """The base network (inside the PEFT wrapper for LoRA)."""
        model = self.model
        if model is None:
            raise RuntimeError(f"{type(self).__name__}: model not built yet (setup / build_model)")
        if hasattr(model, "get_base_model"):
            return model.get_base_model()
        return model

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        if self.finetune != "full":
            raise RuntimeError("trained_state_dict is for full finetunes; LoRA exports an adapter")
        model = self.unwrapped_model()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def save_adapter(self, directory: Path) -> None:
        if self.finetune != "lora" or not hasattr(self.model, "save_pretrained"):
            raise RuntimeError("save_adapter needs a PEFT-wrapped model (finetune='lora')")
        self.model.save_pretrained(str(directory))

    def wrap_lora(self, base: torch.nn.Module, target_modules) -> torch.nn.Module:
        """PEFT LoRA around ``base`` (all base weights frozen, only LoRA factors trainable)."""
        from peft import get_peft_model

        base.requires_grad_(False)
        return get_peft_model(base, self.lora.peft_config(target_modules=target_modules))

    # ----- shared machinery ---------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.label_names is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "label_names"):
            raise RuntimeError(f"{type(self).__name__} needs a datamodule exposing `label_names`")
        # Lightning has already called dm.setup(stage) before this hook.
        self.label_names = list(dm.label_names)
        templates = getattr(dm, "templates", None)
        self.templates = list(templates) if templates else None
        self.build_model(self.label_names, self.templates)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def example_losses(self, batch: dict) -> torch.Tensor:
        """``(B,)`` negative log-likelihood of each example's gold label (no label smoothing): what
        the data statistics (``src.statistics``: Fisher, K-FAC) differentiate per example."""
        return F.cross_entropy(self.logits(batch).float(), batch["labels"], reduction="none")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch)
        loss = self.loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def evaluate_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(number correct, number of examples) of one batch."""
        preds = self.logits(batch).argmax(dim=-1)
        return (preds == batch["labels"]).sum(), torch.tensor(len(preds), device=preds.device)

    def update_split_metric(self, metric: MeanMetric, batch: dict) -> int:
        """Add one batch to a split's sample-weighted metric; returns the batch's example count.
        The one metric code: Lightning's validation / test steps (finetuning and the evaluation
        stage) and the export's evaluation outside the loops all go through it."""
        correct, total = self.evaluate_batch(batch)
        total = total.to(correct.device)
        if int(total) > 0:
            metric.update(correct.float() / total.float(), weight=total.float())
        return int(total)

    def _eval_step(self, batch: dict, split: str) -> None:
        metric = self.val_acc if split == "val" else self.test_acc
        n = self.update_split_metric(metric, batch)
        if n:
            self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Logits and labels (the evaluation stage's Ensemble and joint benchmark score these)."""
        return {"logits": self.logits(batch).float(), "labels": batch["labels"]}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        steps = int(steps) if steps is not None and steps != float("inf") else None
        return build_optimizer(self.parameters(), self.optim, steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what training changes: trainable parameters and the head / buffers
        outside ``self.model``. Frozen base weights are rebuilt from ``pretrained``."""
        state = checkpoint.get("state_dict")
        if not state:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in state.items() if k in trainable or not k.startswith("model.")
        }
        checkpoint["label_names"] = self.label_names
        checkpoint["templates"] = self.templates

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``strict_loading`` is off (frozen weights are not saved), so check by hand: every saved
        key must exist here, and every trainable parameter must have been saved."""
        state = checkpoint.get("state_dict")
        if state is None or self.model is None:
            return
        own = self.state_dict()
        unexpected = [k for k in state if k not in own]
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        missing = [k for k in trainable if k not in state]
        if unexpected or missing:
            raise RuntimeError(
                f"checkpoint does not fit {type(self).__name__}: {len(unexpected)} unexpected key(s) "
                f"{unexpected[:3]}, {len(missing)} trainable parameter(s) missing {missing[:3]}")
        saved = checkpoint.get("label_names")
        if saved is not None and self.label_names is not None and list(saved) != list(self.label_names):
            raise RuntimeError(f"checkpoint was trained on labels {saved}, the datamodule has {self.label_names}")

    # ----- export helpers -----------------------------------------------------------
    def init_args(self) -> dict[str, Any]:
        """JSON-safe init arguments (what ``load_task_model`` passes back to the class)."""
        return jsonable({k: v for k, v in self.hparams.items() if not str(k).startswith("_")})

    def task_hparams(self) -> dict[str, Any]:
        return {
            "pretrained": self.pretrained,
            "finetune": self.finetune,
            "lora": asdict(self.lora) if self.finetune == "lora" else None,
            "optim": asdict(self.optim),
            "label_smoothing": self.label_smoothing,
            "templates": self.templates,
            "module": {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                       "init_args": self.init_args()},
        }

    def save_head(self, path: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}, str(path))


# ----- helpers shared by the "frozen text-embedding head" families (CLIP, demo) ----------
class EmbeddingHeadMixin:
    """Head = one L2-normalized embedding per class; logits = exp(logit_scale) * f @ head^T.

    ``head.safetensors`` holds ``weight`` (C, D) and ``logit_scale`` (the log of the scale,
    as CLIP stores it), so an evaluator can compute logits from the file alone.
    """

    head: torch.Tensor

    def set_head(self, weight: torch.Tensor, logit_scale: Union[float, torch.Tensor]) -> None:
        weight = weight.detach().float()
        scale = torch.as_tensor(logit_scale, dtype=torch.float32).detach().reshape(())
        if "head" in self._buffers:
            self.head = weight
            self.head_logit_scale = scale
        else:
            self.register_buffer("head", weight, persistent=True)
            self.register_buffer("head_logit_scale", scale, persistent=True)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head, "logit_scale": self.head_logit_scale}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "weight" not in state:
            raise KeyError("head state has no 'weight'")
        weight = state["weight"]
        if weight.ndim != 2:
            raise ValueError(f"head weight must be 2-D (classes, dim), got shape {tuple(weight.shape)}")
        if self.label_names is not None and weight.shape[0] != len(self.label_names):
            raise ValueError(f"head has {weight.shape[0]} rows but there are {len(self.label_names)} labels")
        scale = state.get("logit_scale", torch.tensor(0.0))
        self.set_head(weight, scale)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features.float(), dim=-1)
        return self.head_logit_scale.exp() * features @ self.head.to(features.dtype).T


def class_embeddings(encode, label_names: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
    """Per class: encode every template, L2-normalize, average, renormalize -> (C, D).

    ``encode(list_of_strings) -> (N, D)`` is the frozen text tower (no normalization needed).
    """
    if not templates:
        raise ValueError("at least one template is needed")
    texts = [t.format(name) for name in label_names for t in templates]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunks.append(F.normalize(encode(texts[i : i + batch_size]).float(), dim=-1))
    emb = torch.cat(chunks).view(len(label_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
