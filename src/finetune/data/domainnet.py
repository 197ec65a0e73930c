"""DomainNet per (category, domain), as in "Realistic Evaluation of Model Merging for Compositional
Generalization" (docs/protocols.md D): one task model per pair, classifying among its category's classes
with a frozen CLIP text head over "a photo of a {}.".

``data/domainnet/categories.json`` holds the category -> classes table (345 classes in 24
categories; bandage and nail are in both tool and office) and ``pairs.json`` the 24 held-in and
120 held-out (category, domain) pairs. Images come from a local DomainNet copy (``data_root``) with
the official image lists ``<domain>_train.txt`` / ``<domain>_test.txt`` (lines
``<domain>/<class>/<file>.jpg <label>``). The paper's own train/validation "fold" files were not
published, so validation here is a seeded 10% of each domain's official train list and test is the
official test list; :func:`write_split_files` pins those lists under ``data/domainnet/splits/``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .labels import DATA_DIR
from .splits import SplitDataModule, check_disjoint, holdout
from .vision import ImageCollate, build_image_processor

DOMAINNET_DIR = DATA_DIR / "domainnet"
SPLITS_DIR = DOMAINNET_DIR / "splits"
TEMPLATES = ["a photo of a {}."]
VAL_FRACTION = 0.1


@lru_cache(maxsize=None)
def _categories_doc() -> dict:
    return json.loads((DOMAINNET_DIR / "categories.json").read_text())


def domains() -> list[str]:
    return list(_categories_doc()["domains"])


def categories() -> list[str]:
    return list(_categories_doc()["categories"])


def category_classes(category: str) -> list[str]:
    """DomainNet folder names of the category's classes, in label order."""
    table = _categories_doc()["categories"]
    if category not in table:
        raise ValueError(f"unknown DomainNet category {category!r}; known: {', '.join(table)}")
    return list(table[category])


def check_domain(domain: str) -> str:
    if domain not in domains():
        raise ValueError(f"unknown DomainNet domain {domain!r}; known: {', '.join(domains())}")
    return domain


def _pairs(key: str) -> list[tuple[str, str]]:
    doc = json.loads((DOMAINNET_DIR / "pairs.json").read_text())
    return [tuple(p) for p in doc[key]]


def held_in_pairs() -> list[tuple[str, str]]:
    """The 24 (category, domain) pairs that constituent models are trained on."""
    return _pairs("held_in")


def held_out_pairs() -> list[tuple[str, str]]:
    """The 120 other (category, domain) pairs (compositional generalization)."""
    return _pairs("held_out")


def read_image_list(path: Path) -> list[str]:
    """Relative image paths of a DomainNet list file (the label column is ignored: labels come from
    the class folder, so every list format — official, cleaned, ours — is read the same way)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DomainNet image list not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def class_of(relpath: str) -> str:
    return relpath.replace("\\", "/").split("/")[-2]


def derive_splits(data_root, domain: str, seed: int = 0) -> dict[str, list[str]]:
    """Train/val/test of one domain from the official lists: val = seeded 10% of train."""
    if data_root is None:
        raise ValueError(f"DomainNet {domain!r}: data_root is required (no pinned split files)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DomainNet {domain!r}: data_root {str(root)!r} does not exist")
    train_all = read_image_list(root / f"{domain}_train.txt")
    kept, held = holdout(len(train_all), VAL_FRACTION, seed)
    return {"train": [train_all[i] for i in kept], "val": [train_all[i] for i in held],
            "test": read_image_list(root / f"{domain}_test.txt")}


def domain_splits(data_root, domain: str, seed: int = 0) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` -> relative image paths of one domain (all classes).

    Pinned files ``data/domainnet/splits/seed<seed>/<domain>_<split>.txt`` win when present;
    otherwise the split is derived from the official lists under ``data_root``.
    """
    pinned = SPLITS_DIR / f"seed{seed}"
    if all((pinned / f"{domain}_{s}.txt").is_file() for s in ("train", "val", "test")):
        return {s: read_image_list(pinned / f"{domain}_{s}.txt") for s in ("train", "val", "test")}
    return derive_splits(data_root, domain, seed)


def write_split_files(data_root, seed: int = 0, out_dir: Optional[Path] = None) -> Path:
    """Write the derived train/val/test lists of every domain (to pin them in the repository)."""
    out = Path(out_dir) if out_dir is not None else SPLITS_DIR / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for domain in domains():
        parts = derive_splits(data_root, domain, seed)
        check_disjoint(parts["train"], parts["val"])
        for split, paths in parts.items():
            tmp = out / f".{domain}_{split}.txt.tmp"
            tmp.write_text("".join(p + "\n" for p in paths))
            tmp.replace(out / f"{domain}_{split}.txt")
    return out


class ImageListDataset(torch.utils.data.Dataset):
    """``(relative path, label)`` pairs read as ``{"image": PIL image, "label": int}``."""

    def __init__(self, root: Path, items: list[tuple[str, int]]):
        self.root = Path(root)
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        rel, label = self.items[i]
        with Image.open(self.root / rel) as img:
            return {"image": img.convert("RGB"), "label": label}


class DomainNetDataModule(SplitDataModule):
    """Images of one DomainNet domain restricted to one category's classes (labels 0..C-1)."""

    def __init__(self, category: str, domain: str, data_root: Optional[str],
                 processor: str = "openai/clip-vit-base-patch32", image_size: Optional[int] = None,
                 batch_size: int = 128, num_workers: int = 4, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.category, self.domain = category, check_domain(domain)
        self.classes = category_classes(category)
        self.task = f"{category}-{domain}"
        self.data_root = data_root
        self.processor, self.image_size = processor, image_size
        self.label_names: list[str] = [c.replace("_", " ") for c in self.classes]
        self.templates: list[str] = list(TEMPLATES)
        self._collate: Optional[ImageCollate] = None

    def build_splits(self) -> dict:
        if self.data_root is None or not Path(self.data_root).expanduser().is_dir():
            raise FileNotFoundError(f"task {self.task!r}: DomainNet data_root {self.data_root!r} does not exist")
        index = {c: i for i, c in enumerate(self.classes)}
        parts = domain_splits(self.data_root, self.domain, self.seed)
        root = Path(self.data_root).expanduser()
        return {split: ImageListDataset(root, [(p, index[class_of(p)]) for p in paths if class_of(p) in index])
                for split, paths in parts.items()}

    def collate_fn(self) -> ImageCollate:
        if self._collate is None:
            self._collate = ImageCollate(build_image_processor(self.processor, self.image_size))
        return self._collate


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Pin DomainNet train/val/test lists under data/domainnet/splits")
    parser.add_argument("--data-root", required=True, help="folder with <domain>_train.txt / <domain>_test.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_split_files(args.data_root, args.seed))
