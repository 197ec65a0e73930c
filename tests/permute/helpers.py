"""Small networks and wrappers for the permutation tests."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn


class MLP(nn.Module):
    """The demo MLP's layout (``fc1 .. fcN``, ``proj``)."""

    def __init__(self, in_dim=12, width=8, hidden_layers=3, out_dim=5):
        super().__init__()
        for k in range(1, hidden_layers + 1):
            setattr(self, f"fc{k}", nn.Linear(in_dim if k == 1 else width, width))
        self.hidden_layers = hidden_layers
        self.proj = nn.Linear(width, out_dim)

    def forward(self, x):
        x = x.flatten(1)
        for k in range(1, self.hidden_layers + 1):
            x = torch.relu(getattr(self, f"fc{k}")(x))
        return self.proj(x)


class Task(L.LightningModule):
    """A task module as the permutation passes see one: ``.model`` and ``.logits(batch)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def logits(self, batch):
        return self.model(batch["x"])


def loader(x: torch.Tensor, batch_size: int = 7):
    data = [{"x": row} for row in x]
    return torch.utils.data.DataLoader(data, batch_size=batch_size,
                                       collate_fn=lambda items: {"x": torch.stack([i["x"] for i in items])})


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial norm parameters and running statistics (fresh ones are 1 / 0)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            m.weight.data = torch.randn(m.weight.shape, generator=generator)
            m.bias.data = torch.randn(m.bias.shape, generator=generator)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.running_mean.shape, generator=generator)
            m.running_var = torch.rand(m.running_var.shape, generator=generator) + 0.5
