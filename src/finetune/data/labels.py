"""Class names and templates of the eight KnOTS / task-vectors vision tasks, and the joint label set.

The strings live in ``data/vision/<task>.json`` (transcribed from mlfoundations/task_vectors, see
``classnames_source`` in each file) so the text heads built from them are the ones the papers
used; this module only reads them. The joint ("union") benchmark of KnOTS classifies every test
image over one head of 748 labels: the class lists concatenated in the order Cars, DTD, EuroSAT,
GTSRB, MNIST, RESISC45, SUN397, with SVHN's digits mapped onto MNIST's (its only deduplication).
``data/joint_labels.json`` is that list written out; :func:`joint_label_names` recomputes it from
the per-task files and a test keeps the two identical.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
VISION_DIR = DATA_DIR / "vision"
JOINT_LABELS_FILE = DATA_DIR / "joint_labels.json"

VISION_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")
JOINT_ORDER = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397")
JOINT_ALIASES = {"svhn": "mnist"}  # SVHN's '0'..'9' are MNIST's '0'..'9' in the joint head


def check_vision_task(task: str) -> str:
    if task not in VISION_TASKS:
        raise ValueError(f"unknown vision task {task!r}; known tasks: {', '.join(VISION_TASKS)}")
    return task


@lru_cache(maxsize=None)
def vision_task(task: str) -> dict:
    """The parsed ``data/vision/<task>.json`` (class names, templates, their sources)."""
    path = VISION_DIR / f"{check_vision_task(task)}.json"
    if not path.is_file():
        raise FileNotFoundError(f"label file for task {task!r} not found: {path}")
    doc = json.loads(path.read_text())
    if len(doc["classnames"]) != doc["num_classes"]:
        raise ValueError(f"{path}: {len(doc['classnames'])} class names but num_classes={doc['num_classes']}")
    return doc


def class_names(task: str) -> list[str]:
    return list(vision_task(task)["classnames"])


def templates(task: str) -> list[str]:
    """Format strings with one ``{}`` for the class name (task_vectors ``templates.py``)."""
    return list(vision_task(task)["templates"])


def dataset_names(task: str) -> Optional[list[str]]:
    """Names the raw data sets use for the classes (e.g. EuroSAT folder names), when they differ."""
    names = vision_task(task).get("dataset_names")
    return list(names) if names else None


def normalize_name(name: str) -> str:
    """Case-, space-, '_'- and punctuation-insensitive key for matching a data set's class names."""
    return re.sub(r"[^0-9a-z]+", "", str(name).lower())


def label_remap(task: str, source_names: Sequence[str]) -> Optional[list[int]]:
    """Map a data set's label ids onto this task's class order by name, when the names allow it.

    Returns ``remap`` with ``remap[source_id] = our_id``, or ``None`` when the names cannot be
    matched (then the ids are taken to already follow the canonical order, which holds for the
    default hub mirrors). This matters for ``imagefolder`` copies, whose ids are the alphabetical
    order of folder names (Cars' official order is not alphabetical).
    """
    keys = {normalize_name(n): i for i, n in enumerate(class_names(task))}
    for i, n in enumerate(dataset_names(task) or []):
        keys.setdefault(normalize_name(n), i)
    remap = [keys.get(normalize_name(n)) for n in source_names]
    if any(r is None for r in remap) or len(set(remap)) != len(remap):
        return None
    return remap  # type: ignore[return-value]


# ----- joint label set -------------------------------------------------------------------------
def joint_offsets() -> dict[str, int]:
    """First joint id of each task's block (SVHN shares MNIST's block)."""
    offsets, start = {}, 0
    for task in JOINT_ORDER:
        offsets[task] = start
        start += len(class_names(task))
    for alias, target in JOINT_ALIASES.items():
        offsets[alias] = offsets[target]
    return offsets


def joint_label_names() -> list[str]:
    return [name for task in JOINT_ORDER for name in class_names(task)]


def joint_label_tasks() -> list[str]:
    """Which task each joint label comes from (its class name is encoded with that task's templates)."""
    return [task for task in JOINT_ORDER for _ in class_names(task)]


def joint_label(task: str, local_label: int) -> int:
    """Joint id of ``local_label`` of ``task`` (SVHN's digit d -> MNIST's digit d)."""
    n = len(class_names(check_vision_task(task)))
    if not 0 <= int(local_label) < n:
        raise ValueError(f"label {local_label} out of range for task {task!r} ({n} classes)")
    return joint_offsets()[task] + int(local_label)


def joint_label_map(task: str) -> list[int]:
    """``[joint_label(task, i) for i in range(num_classes)]``, for vectorised use (``torch.tensor(map)[y]``)."""
    offset = joint_offsets()[check_vision_task(task)]
    return [offset + i for i in range(len(class_names(task)))]


def joint_labels_document() -> dict:
    """The content of ``data/joint_labels.json``."""
    names = joint_label_names()
    return {
        "description": "KnOTS joint (union) label set: class lists of Cars, DTD, EuroSAT, GTSRB, MNIST, "
                       "RESISC45, SUN397 concatenated in that order; SVHN maps onto MNIST's digits.",
        "num_labels": len(names),
        "order": list(JOINT_ORDER),
        "aliases": dict(JOINT_ALIASES),
        "offsets": joint_offsets(),
        "names": names,
        "tasks": joint_label_tasks(),
    }


def load_joint_labels(path: Path = JOINT_LABELS_FILE) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"joint label file not found: {path}")
    return json.loads(Path(path).read_text())


def write_joint_labels(path: Path = JOINT_LABELS_FILE) -> Path:
    """(Re)write ``data/joint_labels.json`` from the per-task files."""
    Path(path).write_text(json.dumps(joint_labels_document(), indent=1, ensure_ascii=False) + "\n")
    return Path(path)


if __name__ == "__main__":
    print(write_joint_labels())
