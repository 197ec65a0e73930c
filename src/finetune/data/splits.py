"""Seeded split helpers: the one definition of "a fixed seeded permutation" used by every DataModule.

Why numpy's legacy ``RandomState``: its stream is frozen by NumPy's compatibility policy, so the
same ``(n, seed)`` gives the same permutation on every machine and NumPy/torch version, which is
what lets a validation split chosen today be re-created exactly when a sweep is re-run later
(``torch.randperm`` and ``numpy.random.Generator`` make no such promise).

Index lists are returned sorted so that ``Dataset.select`` reads rows in storage order; the split
is a *set* ("the first k of the permutation"), the order inside it carries no meaning.

Also here, so that every module takes its splits the same way: :func:`load_dataset_dict` (a local
``save_to_disk`` / ``imagefolder`` copy, or the hub) and :class:`SplitDataModule` (loaders with a
seeded training order, idempotent ``setup``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from .sampling import train_loader_kwargs


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """The permutation of ``range(n)`` that every split in this package is cut from."""
    if n < 0:
        raise ValueError(f"cannot permute a negative number of items ({n})")
    return np.random.RandomState(seed).permutation(n)


def split_count(n: int, fraction: float) -> int:
    """Items in the first part of a split: ``int(n * fraction)`` (floor, as the KnOTS code does)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split fraction must be in [0, 1], got {fraction}")
    return int(n * fraction)


def cut(n: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the first ``first`` items of the seeded permutation, and of the rest (both sorted)."""
    if not 0 <= first <= n:
        raise ValueError(f"cannot take {first} items out of {n}")
    perm = seeded_permutation(n, seed)
    return sorted(perm[:first].tolist()), sorted(perm[first:].tolist())


def val_test_from_test(n_test: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """docs/protocols.md A for tasks without a validation split: validation = first ``val_fraction`` of a
    seeded permutation of the test set, test = the rest. Returns ``(val_indices, test_indices)``."""
    return cut(n_test, split_count(n_test, val_fraction), seed)


def holdout(n: int, size: int | float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Hold out ``size`` items (a count, or a fraction when a float < 1) of ``n``.

    Returns ``(kept_indices, held_out_indices)`` — e.g. ``(train, validation)`` when a validation
    set is carved out of a training set whose official validation split serves as the test set.
    """
    count = split_count(n, size) if isinstance(size, float) and size < 1.0 else int(size)
    if count > n:
        raise ValueError(f"cannot hold out {count} items out of {n}")
    held, kept = cut(n, count, seed)
    return kept, held


def three_way(n: int, val_size: int, test_size: int, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Train / validation / test carved out of one split (for data sets published with one split only).

    Validation is the first ``val_size`` items of the permutation, test the next ``test_size``.
    """
    if val_size + test_size > n:
        raise ValueError(f"cannot take {val_size} + {test_size} items out of {n}")
    perm = seeded_permutation(n, seed)
    val = sorted(perm[:val_size].tolist())
    test = sorted(perm[val_size:val_size + test_size].tolist())
    train = sorted(perm[val_size + test_size:].tolist())
    return train, val, test


def check_disjoint(*parts: Sequence) -> None:
    """Raise if any index appears in two parts (a guard used by tests and by split-file writers)."""
    seen: set[int] = set()
    for part in parts:
        overlap = seen.intersection(part)
        if overlap:
            raise ValueError(f"splits overlap in {len(overlap)} indices, e.g. {sorted(overlap)[:5]}")
        seen.update(part)


# ----- where the splits come from -----------------------------------------------------------------
VALIDATION_NAMES = ("validation", "val", "valid", "dev")


def load_dataset_dict(task: str, data_root=None, hub_id: Optional[str] = None, config: Optional[str] = None,
                      revision: Optional[str] = None, local_builder: Optional[str] = None):
    """A ``datasets.DatasetDict`` for ``task``, from a local folder when ``data_root`` is given, else the hub.

    ``data_root`` may be a ``save_to_disk`` DatasetDict directory, or (when ``local_builder`` is given,
    e.g. ``"imagefolder"``) a folder that builder reads (``train/``, ``test/``, ... subfolders); a
    subfolder named after the task is used first, so one root can hold every task. Hub loading is
    real code (it needs network or a populated cache; tests never reach it).
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"task {task!r}: data_root {str(root)!r} does not exist")
        for candidate in (root / task, root):
            if (candidate / "dataset_dict.json").is_file():
                return load_from_disk(str(candidate))
        for candidate in (root / task, root):
            if (candidate / "dataset_info.json").is_file() or (candidate / "state.json").is_file():
                raise ValueError(f"task {task!r}: {str(candidate)!r} holds a single Dataset; save a DatasetDict "
                                 "with named splits (train / validation / test) instead")
        if local_builder is not None:
            folder = root / task if (root / task).is_dir() else root
            return load_dataset(local_builder, data_dir=str(folder))
        raise FileNotFoundError(f"task {task!r}: no DatasetDict (dataset_dict.json) under {str(root)!r} "
                                f"or {str(root / task)!r}")
    if hub_id is None:
        raise ValueError(f"task {task!r}: give data_root or a hub id")
    kwargs = {"revision": revision} if revision else {}
    dd = load_dataset(hub_id, config, **kwargs)
    if not isinstance(dd, DatasetDict):
        raise ValueError(f"task {task!r}: {hub_id} did not load as a DatasetDict")
    return dd


def get_split(dd, names: Sequence[str], task: str, what: str):
    """The first split of ``dd`` whose name is in ``names``; a clear error naming the task otherwise."""
    for name in names:
        if name in dd:
            return dd[name]
    raise KeyError(f"task {task!r}: needs a {what} split (one of {list(names)}); found {sorted(dd.keys())}")


# ----- the DataModule machinery every module shares -----------------------------------------------
class SplitDataModule(L.LightningDataModule):
    """Builds ``self.splits`` (``{"train"|"val"|"test": dataset or None}``) once and serves loaders.

    ``setup`` is idempotent because :class:`src.finetune.base.TaskModule` calls it too, to read
    ``label_names`` before Lightning does. Training order comes from a generator seeded with
    ``seed``, so the same config gives the same batches.
    """

    task: str = ""

    def __init__(self, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: Optional[dict] = None

    def build_splits(self) -> dict:
        raise NotImplementedError

    def collate_fn(self):
        raise NotImplementedError

    @property
    def num_classes(self) -> Optional[int]:
        names = getattr(self, "label_names", None)
        return len(names) if names is not None else None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is None:
            self.splits = self.build_splits()

    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.splits.items() if v is not None}

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        data = self.splits.get(split)
        if data is None:
            raise ValueError(f"task {self.task!r}: there is no {split!r} split here "
                             f"(available: {sorted(k for k, v in self.splits.items() if v is not None)})")
        order = train_loader_kwargs(data, self.seed) if shuffle else {}
        return DataLoader(data, batch_size=self.batch_size, **order,
                          num_workers=self.num_workers, collate_fn=self.collate_fn(),
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
