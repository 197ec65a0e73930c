"""Tiny models and task checkpoints for merge tests (no hub)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, d: int = 12):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, 2 * d)


class TinyNet(nn.Module):
    """Names like a transformer: ``layers.{i}.q_proj.weight``."""

    def __init__(self, d: int = 12, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(TinyBlock(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(2 * d)
        self.register_buffer("position_ids", torch.arange(5))

    def forward(self, x):
        for layer in self.layers:
            x = layer.q_proj(x) + layer.v_proj(x)
        return self.norm(self.layers[-1].out_proj(x))


def base_model(seed: int = 0, d: int = 12) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(d)


def save_lora_adapter(base: TinyNet, directory: Path, seed: int, r: int = 4, alpha: int = 8,
                      targets=("q_proj", "v_proj"), use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter on a copy of ``base`` with random (nonzero) A and B."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                           use_rslora=use_rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(directory))
    return Path(directory)


def full_task_state(base: TinyNet, seed: int, noise: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + noise * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in base.state_dict().items()}


def reference_elect_and_merge(X: torch.Tensor, sizes: list[int], sign_fill: str, lam: float) -> torch.Tensor:
    """TIES' sign election and disjoint mean on trimmed, flattened task rows ``X`` (tasks, N),
    written directly from the paper; ``sizes``: the tensors' lengths (for ``sign_fill="tensor"``)."""
    s = torch.sign(X.sum(0))
    if sign_fill == "global":
        s[s == 0] = torch.sign(s.sum())
    else:
        for seg in torch.split(torch.arange(X.shape[1]), sizes):
            part = s[seg]
            part[part == 0] = torch.sign(part.sum())
            s[seg] = part
    agree = (torch.sign(X) == s) & (X != 0)
    return lam * (X * agree).sum(0) / agree.sum(0).clamp(min=1)


def run_method(name: str, groups, **params) -> dict[str, torch.Tensor]:
    """Drive a method like the engine: prepare each tensor, global reductions in order, merge."""
    from src.merge import get_method
    from src.merge.reductions import run_reduction

    method = get_method(name)
    p = method.make_params(**params)
    states = {g.name: method.prepare(g, p) for g in groups}
    stats: dict = {}
    for stat_name, factory in method.reductions(p):
        stats[stat_name] = run_reduction(factory(dict(stats)), lambda: list(states.items()))
    return {n: method.merge(s, p, stats) for n, s in states.items()}
