"""Training order that depends only on ``(seed, epoch)``, so a resumed run sees the same data.

A ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` advances one
generator through the epochs of a run: epoch 2 of an uninterrupted run is the generator's second
permutation, but a run resumed from the epoch-1 checkpoint builds a fresh loader and replays the
first. :class:`EpochShuffleSampler` draws epoch ``e``'s permutation from a generator seeded with
``(seed, e)``; Lightning calls :meth:`~EpochShuffleSampler.set_epoch` before every epoch
(including the first after a resume). It is a ``RandomSampler``, so under DDP Lightning replaces
it with a ``DistributedSampler`` (which is itself seeded per epoch).

:func:`train_loader_kwargs` also gives the loader a private generator for its per-iterator base
seed, which otherwise comes from (and advances) the global torch RNG that dropout and
augmentations use, and the resumed run's RNG state (see ``src/finetune/resume.py``) would be off
by one draw.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import RandomSampler

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden ratio: epochs of one seed never collide with other seeds'


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * _MIX + int(epoch)) % (2 ** 63)


class EpochShuffleSampler(RandomSampler):
    """A permutation of the dataset per epoch, drawn from ``(seed, epoch)`` only."""

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.data_source)


def train_loader_kwargs(data, seed: int) -> dict:
    """``DataLoader`` keyword arguments for a shuffled training split: the per-epoch sampler and
    a private generator for the loader's base seed (worker seeds), so the global RNG is untouched."""
    return {"sampler": EpochShuffleSampler(data, seed), "generator": torch.Generator().manual_seed(int(seed))}
