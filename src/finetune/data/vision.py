"""The eight KnOTS / task-vectors vision tasks as LightningDataModules over Hugging Face ``datasets``.

Splits follow docs/protocols.md A: Cars, GTSRB, MNIST, SUN397 and SVHN publish no validation split, so
validation is the first ``val_fraction`` (20%) of a seeded permutation of the test set and test is
the other 80%; DTD, EuroSAT and RESISC45 use their own validation and test splits. Images are
preprocessed exactly as CLIP does (resize shortest side, center crop, CLIP mean/std), because the
task models are CLIP towers whose heads come from ``label_names`` x ``templates``.

Default sources (override with ``hub_id``, ``"repo"`` or ``"repo:config"``, or a local ``data_root``):

=========  ============================  ===================  ===============================
task       hub id                        splits read          validation
=========  ============================  ===================  ===============================
cars       tanganke/stanford_cars        train, test          20% of test (seeded)
dtd        mcimpoi/dtd_split_1           train, val, test     own (DTD partition 1)
eurosat    timm/eurosat-rgb              train, val, test     own
gtsrb      tanganke/gtsrb                train, test          20% of test (seeded)
mnist      ylecun/mnist                  train, test          20% of test (seeded)
resisc45   timm/resisc45                 train, val, test     own (Neumann et al. split files)
sun397     tanganke/sun397               train, test          20% of test (seeded)
svhn       ufldl-stanford/svhn:cropped_digits  train, test    20% of test (seeded)
=========  ============================  ===================  ===============================
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

from .labels import VISION_TASKS, check_vision_task, class_names, label_remap, templates
from .splits import (VALIDATION_NAMES, SplitDataModule, get_split, load_dataset_dict,
                     val_test_from_test)


@dataclass(frozen=True)
class VisionSource:
    hub_id: str
    config: Optional[str]
    val_from_test: bool  # True: no validation split published -> carve it out of test


VISION_SOURCES: dict[str, VisionSource] = {
    "cars": VisionSource("tanganke/stanford_cars", None, True),
    "dtd": VisionSource("mcimpoi/dtd_split_1", None, False),
    "eurosat": VisionSource("timm/eurosat-rgb", None, False),
    "gtsrb": VisionSource("tanganke/gtsrb", None, True),
    "mnist": VisionSource("ylecun/mnist", None, True),
    "resisc45": VisionSource("timm/resisc45", None, False),
    "sun397": VisionSource("tanganke/sun397", None, True),
    "svhn": VisionSource("ufldl-stanford/svhn", "cropped_digits", True),
}
assert set(VISION_SOURCES) == set(VISION_TASKS)


def build_image_processor(processor: str = "openai/clip-vit-base-patch32", image_size: Optional[int] = None):
    """CLIP's image preprocessing: from a hub id / local folder, or (``image_size`` given) built offline
    with CLIP's mean/std so tests and air-gapped machines need no download."""
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    # transformers>=5 makes CLIPImageProcessor the torchvision backend; CPU envs here have no
    # torchvision, so use the PIL implementation directly (same numbers, no fallback warning).
    pil = importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil")
    cls = transformers.CLIPImageProcessorPil if pil else transformers.CLIPImageProcessor
    if image_size is not None:
        return cls(size={"shortest_edge": int(image_size)},
                   crop_size={"height": int(image_size), "width": int(image_size)},
                   image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    return cls.from_pretrained(processor)


class ImageCollate:
    """Rows ``{image_key: PIL image, label_key: int}`` -> ``{"pixel_values": (B,3,H,W), "labels": (B,)}``."""

    def __init__(self, image_processor, image_key: str = "image", label_key: str = "label",
                 remap: Optional[list[int]] = None):
        self.image_processor = image_processor
        self.image_key = image_key
        self.label_key = label_key
        self.remap = remap

    def __call__(self, rows: list[dict]) -> dict:
        images = [row[self.image_key].convert("RGB") for row in rows]
        labels = [int(row[self.label_key]) for row in rows]
        if self.remap is not None:
            labels = [self.remap[y] for y in labels]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": torch.as_tensor(pixels, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.long)}


def _columns(features) -> tuple[str, str]:
    """(image column, label column) of a ``datasets`` split: the Image / ClassLabel features, else the usual names."""
    from datasets import ClassLabel, Image

    image = next((k for k, f in features.items() if isinstance(f, Image)), None)
    image = image or next((k for k in ("image", "img", "png", "jpg") if k in features), None)
    label = "label" if "label" in features else \
        next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
    if image is None or label is None:
        raise ValueError(f"cannot find image and label columns among {list(features)}")
    return image, label


class VisionTaskDataModule(SplitDataModule):
    """One of cars, dtd, eurosat, gtsrb, mnist, resisc45, sun397, svhn; batches ``pixel_values`` + ``labels``."""

    def __init__(self, task: str, data_root: Optional[str] = None, hub_id: Optional[str] = None,
                 processor: str = "openai/clip-vit-base-patch32", image_size: Optional[int] = None,
                 batch_size: int = 128, num_workers: int = 4, seed: int = 0, val_fraction: float = 0.2):
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.task = check_vision_task(task)
        self.data_root = data_root
        self.source = VISION_SOURCES[task]
        self.hub_id, self.hub_config = self.source.hub_id, self.source.config
        if hub_id is not None and hub_id != self.source.hub_id:
            self.hub_id, _, config = hub_id.partition(":")
            self.hub_config = config or None
        self.processor = processor
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.label_names: list[str] = class_names(task)
        self.templates: list[str] = templates(task)
        self._image_processor = None
        self._collate: Optional[ImageCollate] = None

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = build_image_processor(self.processor, self.image_size)
        return self._image_processor

    def prepare_data(self) -> None:
        if self.data_root is None:  # download once, on one process
            load_dataset_dict(self.task, None, self.hub_id, self.hub_config)

    def build_splits(self) -> dict:
        dd = load_dataset_dict(self.task, self.data_root, self.hub_id, self.hub_config, local_builder="imagefolder")
        train = get_split(dd, ("train",), self.task, "train")
        test_full = get_split(dd, ("test",), self.task, "test")
        if self.source.val_from_test:
            val_idx, test_idx = val_test_from_test(len(test_full), self.val_fraction, self.seed)
            val, test = test_full.select(val_idx), test_full.select(test_idx)
        else:
            val, test = get_split(dd, VALIDATION_NAMES, self.task, "validation"), test_full
        image_key, label_key = _columns(train.features)
        names = getattr(train.features[label_key], "names", None)
        remap = label_remap(self.task, names) if names else None
        if names and remap is None and len(names) != len(self.label_names):
            raise ValueError(f"task {self.task!r}: data has {len(names)} classes, expected {len(self.label_names)}")
        self._collate = ImageCollate(self.image_processor, image_key, label_key, remap)
        return {"train": train, "val": val, "test": test}

    def collate_fn(self) -> ImageCollate:
        self.setup()
        return self._collate
