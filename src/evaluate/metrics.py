"""Classification metrics of the evaluation stage: accuracy, Hits@k (plain and joint label space),
normalized accuracy, output ensembles and group averages.

Every score is a fraction in [0, 1], sample-weighted (the number of correct examples over the
number of examples) unless said otherwise.

Hits@k "by string". In the joint (union) label space of several tasks the same string can be a
label of two tasks (``forest`` is a EuroSAT, a RESISC45 and a SUN397 class). With an
``equivalent`` map (class id -> canonical id, :meth:`JointLabelSpace.canonical`) classes of one
canonical id are one label: the scores are first reduced to one score per canonical label (the
maximum over its classes), then the top k of those *distinct* labels are taken, and an example is
a hit when its gold label's canonical id is among them. So a duplicated string never takes two
of the k slots, and predicting any class of the gold string counts (Hits@1 by string is "the
arg-max class has the gold's name").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

REPO_ROOT = Path(__file__).resolve().parents[2]
JOINT_LABELS = "data/joint_labels.json"
CHUNK = 8192  # rows per Hits@k update


# ----- accuracy / Hits@k ---------------------------------------------------------------------
def _as_targets(targets: Tensor, n: int) -> Tensor:
    targets = torch.as_tensor(targets)
    if targets.ndim != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class ids, got {targets.dtype}")
    return targets.long()


def _check_logits(logits: Tensor) -> Tensor:
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError("no examples or no classes")
    return logits.float()


def accuracy(logits_or_preds: Tensor, targets: Tensor) -> float:
    """Fraction of correct examples. ``logits_or_preds``: ``(N, C)`` scores (arg-max prediction)
    or ``(N,)`` predicted class ids. torchmetrics ``multiclass_accuracy(average="micro")``."""
    x = torch.as_tensor(logits_or_preds)
    if x.ndim == 2:
        logits = _check_logits(x)
        targets = _as_targets(targets, logits.shape[0])
        num_classes = logits.shape[1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(f"targets out of range for {num_classes} classes")
        preds = logits
    elif x.ndim == 1:
        if x.dtype.is_floating_point:
            raise TypeError("1-D predictions must be integer class ids (pass (N, C) logits otherwise)")
        if x.numel() == 0:
            raise ValueError("no examples")
        preds = x.long()
        targets = _as_targets(targets, preds.shape[0])
        if min(preds.min(), targets.min()) < 0:
            raise ValueError("class ids must be non-negative")
        num_classes = int(max(preds.max(), targets.max())) + 1
    else:
        raise ValueError(f"expected (N, C) logits or (N,) predictions, got shape {tuple(x.shape)}")
    if num_classes == 1:  # torchmetrics needs two classes; with one every prediction is right
        return 1.0
    return float(multiclass_accuracy(preds, targets.to(preds.device), num_classes=num_classes, average="micro"))


def collapse_equivalent(logits: Tensor, targets: Tensor, equivalent: Tensor) -> tuple[Tensor, Tensor]:
    """Scores over the distinct canonical labels: ``(N, G)`` with, per canonical label, the maximum
    score of its classes (groups in order of their smallest canonical id), and the targets as
    group indices. ``equivalent`` ``(C,)``: any integer group id per class."""
    logits = _check_logits(logits)
    equivalent = torch.as_tensor(equivalent, device=logits.device)
    if equivalent.shape != (logits.shape[1],):
        raise ValueError(f"equivalent must have shape ({logits.shape[1]},), got {tuple(equivalent.shape)}")
    groups, inverse = torch.unique(equivalent.long(), return_inverse=True)
    index = inverse.unsqueeze(0).expand_as(logits)
    collapsed = torch.full((logits.shape[0], len(groups)), -math.inf, dtype=logits.dtype, device=logits.device)
    collapsed = collapsed.scatter_reduce(1, index, logits, reduce="amax", include_self=True)
    return collapsed, inverse[targets.to(inverse.device)]


def hits_at_k(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 3, 5),
              equivalent: Optional[Tensor] = None) -> dict[int, float]:
    """Fraction of examples whose gold label is among the ``k`` highest scores, for each ``k``.

    ``equivalent`` ``(C,)`` maps each class to a canonical id: classes sharing one are one label
    (scores reduced to the maximum per canonical label, top-k over distinct labels; see the module
    docstring). ``k`` larger than the number of (distinct) labels counts every example as a hit.
    Ties are broken by ``torch.topk`` (torchmetrics ``multiclass_accuracy(top_k=k, average="micro")``).
    """
    logits = _check_logits(logits)
    targets = _as_targets(targets, logits.shape[0]).to(logits.device)
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets out of range for {logits.shape[1]} classes")
    if equivalent is not None:
        logits, targets = collapse_equivalent(logits, targets, equivalent)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    num_classes = logits.shape[1]
    out = {}
    for k in ks:
        if k >= num_classes:
            out[k] = 1.0
            continue
        # in chunks of rows (torchmetrics builds an (N, C) top-k indicator): sample-weighted, so exact
        metric = MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro").to(logits.device)
        for start in range(0, logits.shape[0], CHUNK):
            metric.update(logits[start:start + CHUNK], targets[start:start + CHUNK])
        out[k] = float(metric.compute())
    return out


# ----- joint label space -------------------------------------------------------------------------
def label_key(name: str) -> str:
    """The "by string" identity of a label: case-insensitive, whitespace-normalized."""
    return " ".join(str(name).split()).casefold()


@dataclass
class JointLabelSpace:
    """The union label space of several tasks: their class lists concatenated in ``order``; an
    aliased task (``svhn -> mnist``) reuses its target's ids and adds none.

    ``names[i]`` / ``tasks[i]``: the label string and the owning task of joint id ``i``."""

    names: list[str]
    tasks: list[str]
    order: list[str]
    offsets: dict[str, int]
    sizes: dict[str, int]
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.names) != len(self.tasks):
            raise ValueError(f"{len(self.names)} names but {len(self.tasks)} owning tasks")
        start = 0
        for task in self.order:
            if self.offsets.get(task) != start:
                raise ValueError(f"task {task!r}: offset {self.offsets.get(task)} but its labels start at {start}")
            size = self.sizes[task]
            if self.tasks[start:start + size] != [task] * size:
                raise ValueError(f"task {task!r}: joint ids {start}..{start + size - 1} are not all its own")
            start += size
        if start != len(self.names):
            raise ValueError(f"the tasks cover {start} labels, the space has {len(self.names)}")
        for alias, target in self.aliases.items():
            if target not in self.order:
                raise ValueError(f"alias {alias!r} -> {target!r}: no such task")
            if alias in self.order:
                raise ValueError(f"{alias!r} is both a task and an alias")
            if self.offsets.setdefault(alias, self.offsets[target]) != self.offsets[target]:
                raise ValueError(f"alias {alias!r} has offset {self.offsets[alias]}, its target {self.offsets[target]}")

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_tasks(cls, label_names: Mapping[str, Sequence[str]],
                   aliases: Optional[Mapping[str, str]] = None) -> "JointLabelSpace":
        """Concatenate the tasks' label lists in the mapping's order. A task in ``aliases`` maps onto
        its target's ids; it may be listed in ``label_names`` too (then with as many labels)."""
        aliases = dict(aliases or {})
        names, tasks, order, offsets, sizes = [], [], [], {}, {}
        for task, labels in label_names.items():
            if task in aliases:
                continue
            labels = list(labels)
            if not labels:
                raise ValueError(f"task {task!r} has no labels")
            order.append(task)
            offsets[task], sizes[task] = len(names), len(labels)
            names.extend(labels)
            tasks.extend([task] * len(labels))
        for alias, target in aliases.items():
            if target not in offsets:
                raise ValueError(f"alias {alias!r} -> {target!r}: no such task")
            if alias in label_names and len(label_names[alias]) != sizes[target]:
                raise ValueError(f"alias {alias!r} has {len(label_names[alias])} labels, {target!r} {sizes[target]}")
        return cls(names, tasks, order, offsets, sizes, aliases)

    @classmethod
    def from_file(cls, path: Union[str, Path] = JOINT_LABELS) -> "JointLabelSpace":
        """Read ``data/joint_labels.json`` (keys ``order``, ``names``, ``tasks``, ``offsets``,
        ``aliases``, ``num_labels``). A relative path that does not exist from the working
        directory is taken from the repository root."""
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        data = json.loads(path.read_text())
        names, tasks = list(data["names"]), list(data["tasks"])
        order = list(data["order"])
        sizes = {t: tasks.count(t) for t in order}
        space = cls(names, tasks, order, {t: int(o) for t, o in data["offsets"].items()}, sizes,
                    dict(data.get("aliases") or {}))
        if "num_labels" in data and int(data["num_labels"]) != len(names):
            raise ValueError(f"{path}: num_labels {data['num_labels']} but {len(names)} names")
        unknown = set(space.offsets) - set(order) - set(space.aliases)
        if unknown:
            raise ValueError(f"{path}: offsets of unknown tasks {sorted(unknown)}")
        return space

    # ----- lookups ----------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def resolve(self, task: str) -> str:
        """The task whose ids ``task`` uses (itself, or its alias target)."""
        task = self.aliases.get(task, task)
        if task not in self.sizes:
            raise KeyError(f"task {task!r} is not in the joint label space ({', '.join(self.order)})")
        return task

    def offset(self, task: str) -> int:
        return self.offsets[self.resolve(task)]

    def size(self, task: str) -> int:
        return self.sizes[self.resolve(task)]

    def task_to_joint(self, task: str, n_labels: Optional[int] = None) -> Tensor:
        """``(n_labels,)`` joint id of each of the task's local label ids (``offset + arange``)."""
        size = self.size(task)
        if n_labels is not None and int(n_labels) != size:
            raise ValueError(f"task {task!r} has {size} labels in the joint space, got n_labels={n_labels}")
        return torch.arange(size, dtype=torch.long) + self.offset(task)

    def canonical(self, rule: str = "id") -> Tensor:
        """``(C,)`` canonical id per joint class: ``"id"`` the identity, ``"string"`` the first joint
        id with the same :func:`label_key` (case-insensitive, whitespace-normalized name)."""
        if rule == "id":
            return torch.arange(len(self.names), dtype=torch.long)
        if rule == "string":
            first: dict[str, int] = {}
            return torch.tensor([first.setdefault(label_key(n), i) for i, n in enumerate(self.names)],
                                dtype=torch.long)
        raise ValueError(f"rule must be 'id' or 'string', got {rule!r}")

    def duplicates(self) -> list[str]:
        """Label strings (as first spelled, in joint order) that occur under more than one id."""
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            seen.setdefault(label_key(name), []).append(i)
        return [self.names[ids[0]] for ids in seen.values() if len(ids) > 1]

    def joint_head(self, heads: Mapping[str, Tensor]) -> Tensor:
        """``(C, D)`` joint classification head: each task's ``(C_task, D)`` head rows at its ids.
        Every task of ``order`` is needed; an aliased task's head (checked for shape) adds nothing."""
        missing = [t for t in self.order if t not in heads]
        if missing:
            raise KeyError(f"no head for task(s) {missing}")
        unknown = [t for t in heads if t not in self.sizes and t not in self.aliases]
        if unknown:
            raise KeyError(f"head(s) of unknown task(s) {unknown}")
        dims = set()
        for task, head in heads.items():
            if head.ndim != 2 or head.shape[0] != self.size(task):
                raise ValueError(f"head of {task!r} has shape {tuple(head.shape)}, expected ({self.size(task)}, D)")
            dims.add(head.shape[1])
        if len(dims) != 1:
            raise ValueError(f"heads have different widths {sorted(dims)}")
        return torch.cat([heads[t] for t in self.order], dim=0)


def joint_hits(logits: Tensor, targets_joint: Tensor, datasets: Sequence[str], ks: Sequence[int] = (1, 3, 5),
               equivalent: Optional[Tensor] = None) -> dict:
    """Hits@k over the joint label space: ``{"union": {k: ...}, "per_dataset": {name: {k: ...}},
    "n": {"union": N, name: n}}``. ``union`` is sample-weighted over all examples; ``datasets[i]``
    names where example ``i`` comes from (per-dataset entries in order of first appearance)."""
    logits = _check_logits(logits)
    targets_joint = _as_targets(targets_joint, logits.shape[0])
    datasets = [str(d) for d in datasets]
    if len(datasets) != logits.shape[0]:
        raise ValueError(f"{len(datasets)} dataset names for {logits.shape[0]} examples")
    out = {"union": hits_at_k(logits, targets_joint, ks, equivalent), "per_dataset": {},
           "n": {"union": logits.shape[0]}}
    names = list(dict.fromkeys(datasets))
    for name in names:
        mask = torch.tensor([d == name for d in datasets], device=logits.device)
        out["per_dataset"][name] = hits_at_k(logits[mask], targets_joint[mask.to(targets_joint.device)], ks,
                                             equivalent)
        out["n"][name] = int(mask.sum())
    return out


# ----- normalized accuracy, ensembles, group averages ---------------------------------------------
def normalized_accuracy(merged: float, finetuned: float) -> float:
    """``merged / finetuned``: the merged model's score relative to the task's own finetuned model."""
    merged, finetuned = float(merged), float(finetuned)
    if not math.isfinite(finetuned) or finetuned <= 0:
        raise ValueError(f"normalized accuracy needs a positive finetuned score, got {finetuned}")
    return merged / finetuned


def _probabilities(logits: Sequence[Tensor]) -> Tensor:
    logits = list(logits)
    if not logits:
        raise ValueError("no models")
    shapes = {tuple(x.shape) for x in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every model's logits must have one (N, C) shape, got {sorted(shapes)}")
    return torch.stack([torch.as_tensor(x).float().softmax(dim=-1) for x in logits])


def ensemble_joint(logits: Sequence[Tensor]) -> Tensor:
    """``(N, C)`` ensemble scores: per class, the maximum over models of the softmax probabilities.
    Softmax first, then max, so that models whose logits have different scales compare."""
    return _probabilities(logits).amax(dim=0)


def ensemble_per_task(logits: Sequence[Tensor]) -> Tensor:
    """``(N,)`` predictions of the most confident model: for each example, the class of the highest
    softmax probability over all models (each model's ``(N, C)`` logits over the same labels, the
    task's own head). Ties go to the lowest class id. Equals ``ensemble_joint(logits).argmax(-1)``."""
    return ensemble_joint(logits).argmax(dim=-1)


def group_averages(values: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Plain mean of the tasks' values per group (e.g. ``held_in`` / ``generalization``), groups in
    order of first appearance in ``groups``. Every task of ``values`` needs a group and every task
    of ``groups`` a value, so that no average silently leaves a task out."""
    unassigned = [t for t in values if t not in groups]
    missing = [t for t in groups if t not in values]
    if unassigned or missing:
        raise KeyError(f"tasks without a group: {unassigned}; grouped tasks without a value: {missing}")
    out: dict[str, list[float]] = {}
    for task, group in groups.items():
        out.setdefault(group, []).append(float(values[task]))
    return {g: sum(v) / len(v) for g, v in out.items()}
