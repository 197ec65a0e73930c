"""Optimizer and learning-rate schedule, configured from YAML (AdamW or SGD + cosine/linear warmup)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch


@dataclass
class OptimSpec:
    """AdamW with a warmup then cosine / linear / constant decay, stepped every optimizer step.

    ``warmup`` < 1 is a fraction of the total steps (docs/protocols.md B: 0.06), >= 1 a step count.
    ``optimizer="sgd"`` (ZipIt / MuDSC from-scratch training, docs/protocols.md E) uses ``momentum``,
    ``nesterov`` and ``weight_decay`` (L2 added to the gradient); ``betas`` / ``eps`` are AdamW's.
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.0
    min_lr_ratio: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    nesterov: bool = False


def lr_lambda(spec: OptimSpec, total_steps: int):
    warmup = int(spec.warmup * total_steps) if spec.warmup < 1 else int(spec.warmup)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if spec.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if spec.scheduler == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay

    return factor


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimSpec, total_steps: Optional[int]):
    """Lightning ``configure_optimizers`` return value for ``params`` (trainable only)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the LoRA target modules / finetune mode")
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps)
    elif spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                              nesterov=spec.nesterov)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {spec.optimizer!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, total_steps or 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
