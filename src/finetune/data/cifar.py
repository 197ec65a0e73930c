"""CIFAR-10 / CIFAR-100 restricted to one of ``num_subsets`` disjoint class subsets (docs/protocols.md E, MuDSC / ZipIt).

The classes are split the way the ZipIt / MuDSC code does it (a random half of the classes per
model: 50+50 for CIFAR-100, 5+5 for CIFAR-10), but reproducibly: subset ``k`` is the ``k``-th
contiguous chunk of a seeded permutation of the class ids (:func:`class_subsets`, numpy's frozen
``RandomState`` as every split in this package), seeded by ``split_seed`` (default: ``seed``). The
papers' several model pairs per setting are several class splits: ``split_seed`` p for pair p, and
the task name then says it (``cifar100-split3-0of2``; without ``split_seed``: ``cifar100-0of2``).
Labels are re-indexed within the subset (0..C-1, in the subset's order); ``label_names`` are the
subset's CIFAR class names (``data/cifar/*.json``, ``_`` -> space); ``templates = ["a photo of a
{}."]`` for the CLIP text-embedding head.

Splits: test = the official test set restricted to the subset; validation = a seeded
``val_fraction`` of the subset's training images; train = the rest. Images: standard CIFAR
augmentation for training (random crop 32 with 4-pixel zero padding, horizontal flip), then
normalization with the CIFAR mean / std ZipIt uses -- torch ops only (no torchvision).
Batches: ``pixel_values`` (B, 3, 32, 32) float32, ``labels`` (B,).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .sampling import train_loader_kwargs
from .splits import SplitDataModule, get_split, holdout, load_dataset_dict, seeded_permutation

DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "cifar"
DATASETS = ("cifar10", "cifar100")
TEMPLATES = ["a photo of a {}."]
# ZipIt's datasets/cifar.py constants (per-channel mean / std of CIFAR in 0..255)
CIFAR_MEAN = (125.307, 122.961, 113.8575)
CIFAR_STD = (51.5865, 50.847, 51.255)


@lru_cache(maxsize=None)
def _spec(dataset: str) -> dict:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return json.loads((DATA_DIR / f"{dataset}.json").read_text())


def cifar_classes(dataset: str) -> list[str]:
    """The CIFAR class names in label-id order (raw, with underscores)."""
    return list(_spec(dataset)["classes"])


def class_subsets(num_classes: int, num_subsets: int, seed: int) -> list[list[int]]:
    """Disjoint class-id subsets covering ``range(num_classes)``: contiguous chunks of a seeded permutation.

    Chunk sizes differ by at most one (``np.array_split``); each subset keeps the permutation order.
    """
    if not 1 <= num_subsets <= num_classes:
        raise ValueError(f"cannot split {num_classes} classes into {num_subsets} subsets")
    perm = seeded_permutation(num_classes, seed)
    return [chunk.tolist() for chunk in np.array_split(perm, num_subsets)]


def to_tensor_uint8(image) -> torch.Tensor:
    """PIL image / HWC array -> (3, H, W) uint8 tensor."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def augment(images: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop (zero padding ``padding``, same size) and random horizontal flip of (B, C, H, W)."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(b):
        crop = padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 / 0..255 (B, 3, H, W) -> normalized float32."""
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() - mean) / std


class CifarCollate:
    """Rows ``{image_key: PIL, label_key: int}`` -> normalized ``pixel_values`` and re-indexed ``labels``."""

    def __init__(self, image_key: str, label_key: str, remap: dict[int, int], train: bool):
        self.image_key, self.label_key, self.remap, self.train = image_key, label_key, remap, train

    def __call__(self, rows: list[dict]) -> dict:
        images = torch.stack([to_tensor_uint8(r[self.image_key]) for r in rows])
        if self.train:
            images = augment(images)
        labels = torch.tensor([self.remap[int(r[self.label_key])] for r in rows], dtype=torch.long)
        return {"pixel_values": normalize(images), "labels": labels}


class _Subset(torch.utils.data.Dataset):
    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.data[self.indices[i]]


class CifarSubsetDataModule(SplitDataModule):
    """One class subset of CIFAR-10 / CIFAR-100 (labels 0..C-1 within the subset).

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        subset: which subset (0 .. num_subsets-1).
        num_subsets: number of disjoint class subsets (2: 50+50 / 5+5).
        hub_id: Hugging Face dataset id (default ``uoft-cs/cifar10`` / ``uoft-cs/cifar100``).
        data_root: a local ``save_to_disk`` DatasetDict (``train`` / ``test``), directly or in a
            subfolder named after ``dataset``.
        seed: seeds the validation hold-out and the training order, and the class permutation
            unless ``split_seed`` is given.
        val_fraction: share of the subset's training images held out for validation.
        split_seed: seeds the class permutation alone (one model pair's class split); the task
            name becomes ``<dataset>-split<split_seed>-<subset>of<num_subsets>``. ``None``: ``seed``
            does, and the task name is ``<dataset>-<subset>of<num_subsets>``.
    """

    def __init__(self, dataset: Literal["cifar10", "cifar100"] = "cifar100", subset: int = 0, num_subsets: int = 2,
                 hub_id: Optional[str] = None, data_root: Optional[str] = None, batch_size: int = 128,
                 num_workers: int = 4, seed: int = 0, val_fraction: float = 0.1, split_seed: Optional[int] = None):
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        spec = _spec(dataset)
        self.dataset = dataset
        if not 0 <= subset < num_subsets:
            raise ValueError(f"subset must be in 0..{num_subsets - 1}, got {subset}")
        self.subset, self.num_subsets = subset, num_subsets
        self.split_seed = None if split_seed is None else int(split_seed)
        split_name = "" if self.split_seed is None else f"split{self.split_seed}-"
        self.task = f"{dataset}-{split_name}{subset}of{num_subsets}"
        self.hub_id = hub_id or spec["hub_id"]
        self.data_root = data_root
        self.val_fraction = val_fraction
        names = cifar_classes(dataset)
        class_seed = seed if self.split_seed is None else self.split_seed
        self.class_ids: list[int] = class_subsets(len(names), num_subsets, class_seed)[subset]
        self.label_names: list[str] = [names[c].replace("_", " ") for c in self.class_ids]
        self.templates: list[str] = list(TEMPLATES)
        self.remap = {c: i for i, c in enumerate(self.class_ids)}
        self._columns: Optional[tuple[str, str]] = None

    def _find_columns(self, features) -> tuple[str, str]:
        image = next((k for k in ("img", "image", "png") if k in features), None)
        label = next((k for k in (_spec(self.dataset)["label_column"], "label", "fine_label") if k in features), None)
        if image is None or label is None:
            raise ValueError(f"task {self.task!r}: cannot find image and label columns among {list(features)}")
        return image, label

    def build_splits(self) -> dict:
        dd = load_dataset_dict(self.dataset, self.data_root, self.hub_id)
        train = get_split(dd, ("train",), self.task, "train")
        test = get_split(dd, ("test",), self.task, "test")
        self._columns = self._find_columns(train.features)
        label_key = self._columns[1]
        wanted = set(self.class_ids)

        def rows_of(split) -> list[int]:
            return [i for i, y in enumerate(split[label_key]) if int(y) in wanted]

        train_rows = rows_of(train)
        kept, held = holdout(len(train_rows), float(self.val_fraction), self.seed)
        return {"train": _Subset(train, [train_rows[i] for i in kept]),
                "val": _Subset(train, [train_rows[i] for i in held]),
                "test": _Subset(test, rows_of(test))}

    def collate_fn(self, split: str = "test") -> CifarCollate:
        """Training batches are augmented; validation / test batches are only normalized."""
        self.setup()
        image_key, label_key = self._columns
        return CifarCollate(image_key, label_key, self.remap, train=(split == "train"))

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        data = self.splits.get(split)
        if data is None:
            raise ValueError(f"task {self.task!r}: there is no {split!r} split")
        order = train_loader_kwargs(data, self.seed) if shuffle else {}
        return DataLoader(data, batch_size=self.batch_size, **order,
                          num_workers=self.num_workers, collate_fn=self.collate_fn(split),
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
