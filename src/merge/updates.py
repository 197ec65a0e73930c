"""The two shapes a task update can take: a dense tensor or LoRA factors.

A task update of one parameter is ``dW = W_task - W_base``. LoRA task models give it in
factored form ``dW = scale * B @ A``; methods that can exploit the factors (KnOTS, CART)
must, all others call :func:`densify` one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass
class LowRank:
    """``scale * B @ A`` with ``B: (O, r)`` and ``A: (r, I)``."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    def to(self, device=None, dtype=None) -> "LowRank":
        return LowRank(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype), self.scale)

    def dense(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


Update = Union[torch.Tensor, LowRank]


def densify(update: Update) -> torch.Tensor:
    """The dense tensor of an update (no copy for dense updates)."""
    return update.dense() if isinstance(update, LowRank) else update


def is_low_rank(update: Update) -> bool:
    return isinstance(update, LowRank)


def weighted_sum(updates: list[Update], coefs: list[float]) -> Update:
    """``sum_i coefs[i] * updates[i]``, kept factored when every update is low rank.

    For LoRA inputs the sum is ``[c_1 s_1 B_1 ... c_n s_n B_n] @ [A_1; ...; A_n]`` (rank
    ``<= sum r_i``): no ``O x I`` matrix is formed, and the result can be saved as an adapter.
    """
    if updates and all(isinstance(u, LowRank) for u in updates):
        B = torch.cat([u.B * (c * u.scale) for u, c in zip(updates, coefs)], dim=1)
        A = torch.cat([u.A for u in updates], dim=0)
        return LowRank(B, A, 1.0)
    total = None
    for u, c in zip(updates, coefs):
        term = densify(u) * c
        total = term if total is None else total + term
    return total
