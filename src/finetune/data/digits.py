"""scikit-learn's bundled digits (8x8 images, 10 classes, 1797 examples) restricted to one of ``num_subsets``
disjoint class subsets: the data of the offline permutation-merging demo (no download).

The 10 digits are split as :class:`~src.finetune.data.cifar.CifarSubsetDataModule` splits CIFAR's
classes (:func:`~src.finetune.data.cifar.class_subsets`): subset ``k`` is the ``k``-th contiguous
chunk of a seeded permutation of the digits (seed 0, 2 subsets: digits 2 8 4 9 1 and 6 7 3 0 5).
Labels are re-indexed within the subset (0..C-1, in the subset's order); ``label_names`` are the
digits as words ("two", "eight", ...); ``templates = ["a photo of the digit {}."]``.

Splits: the subset's images (in ``load_digits`` order) are cut by a seeded permutation
(:func:`~src.finetune.data.splits.three_way`): validation the first ``val_fraction``, test the next
``test_fraction``, train the rest. The data is a ``datasets.Dataset`` (``pixels``: 64 ints 0..16,
``label``: the digit). Batches: ``pixel_values`` (B, 64) float32 in [0, 1] (pixels / 16),
``labels`` (B,) int64. No augmentation.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .cifar import class_subsets
from .splits import SplitDataModule, three_way

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}."]
IN_DIM = 64
PIXEL_MAX = 16.0


@lru_cache(maxsize=1)
def digits_dataset():
    """All of ``sklearn.datasets.load_digits`` as a ``datasets.Dataset`` (``pixels``, ``label``)."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = Features({"pixels": Sequence(Value("uint8"), length=IN_DIM), "label": ClassLabel(names=DIGIT_NAMES)})
    return Dataset.from_dict({"pixels": bunch.data.astype("uint8").tolist(), "label": bunch.target.tolist()},
                             features=features)


class DigitsCollate:
    """Rows ``{"pixels": 64 ints, "label": digit}`` -> ``pixel_values`` (B, 64) in [0, 1] and re-indexed ``labels``."""

    def __init__(self, remap: dict[int, int]):
        self.remap = dict(remap)

    def __call__(self, rows: list[dict]) -> dict:
        pixels = torch.tensor([r["pixels"] for r in rows], dtype=torch.float32) / PIXEL_MAX
        labels = torch.tensor([self.remap[int(r["label"])] for r in rows], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


class DigitsSubsetDataModule(SplitDataModule):
    """One class subset of scikit-learn's digits (labels 0..C-1 within the subset).

    Args:
        subset: which subset (0 .. num_subsets-1).
        num_subsets: number of disjoint digit subsets (2: 5 + 5).
        seed: seeds the digit permutation, the train / val / test split and the training order.
        val_fraction, test_fraction: shares of the subset's images held out for validation / test.
        batch_size: training and evaluation batch size.
    """

    def __init__(self, subset: int = 0, num_subsets: int = 2, seed: int = 0, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        if not 0 <= subset < num_subsets:
            raise ValueError(f"subset must be in 0..{num_subsets - 1}, got {subset}")
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
        self.subset, self.num_subsets = int(subset), int(num_subsets)
        self.task = f"digits-{self.subset}of{self.num_subsets}"
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.class_ids: list[int] = class_subsets(len(DIGIT_NAMES), self.num_subsets, seed)[self.subset]
        self.label_names: list[str] = [DIGIT_NAMES[c] for c in self.class_ids]
        self.templates: list[str] = list(TEMPLATES)
        self.remap = {c: i for i, c in enumerate(self.class_ids)}

    def split_rows(self) -> dict[str, list[int]]:
        """Row indices into :func:`digits_dataset` of each split (sorted, disjoint)."""
        wanted = set(self.class_ids)
        rows = [i for i, y in enumerate(digits_dataset()["label"]) if int(y) in wanted]
        n = len(rows)
        train, val, test = three_way(n, int(n * self.val_fraction), int(n * self.test_fraction), self.seed)
        return {"train": [rows[i] for i in train], "val": [rows[i] for i in val], "test": [rows[i] for i in test]}

    def build_splits(self) -> dict:
        data = digits_dataset()
        return {split: data.select(rows) for split, rows in self.split_rows().items()}

    def collate_fn(self, split: Optional[str] = None) -> DigitsCollate:
        return DigitsCollate(self.remap)
