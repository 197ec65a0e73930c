r"""Multitask training: ONE network trained on the mixture of an experiment's held-in tasks.

The papers' multitask baseline (CART's "Traditional MTL", the compositional paper's "Multitask"):
instead of one task model per task, a single shared network is finetuned on all tasks at once,
each task keeping its own head (the frozen text-embedding head of CLIP-style families, a trainable
classification head for Llama NLI, the label strings / metric for mT5). The result is written as
a merged-model directory (``src/merged_output.py``), so that the evaluation stage scores it like
any merge (``method: merged``).

    python -m src.finetune.multitask --config configs/finetune/D_domainnet_vitb32_full.yaml \
        --tasks-file configs/finetune/tasks/D_domainnet.yaml --output checkpoints/D_domainnet-multitask \
        -- --data.init_args.data_root $DATA_ROOT/domainnet      # after --: LightningCLI arguments

**Configuration.** Everything comes from the experiment's finetune config, parsed by the same
LightningCLI as ``python -m src.finetune fit``: the model (class, init args, optimizer, LoRA), the
trainer (precision, steps / epochs, validation interval, callbacks such as EarlyStopping on
``val/acc``) and the datamodule. Each task's datamodule is built exactly as ``train_all`` builds it:
the config plus the task's ``data.*`` overrides from the tasks file (``--data.init_args.task NAME``
when it has none) plus the arguments after ``--``. Per-task ``trainer.*`` / ``model.*`` overrides
(the vision tasks' epochs, the demo's per-task learning rate) cannot apply to one shared model and
are ignored, with a note. ``export.select`` / ``export.monitor`` / ``export.test`` of the config
choose the weights (best mean validation accuracy, or the last) as for a task model.

**Mixing** (:class:`MixtureBatchSampler`). Every batch holds examples of ONE task, batched by that
task's own DataLoader settings (batch size, collate function: tokenization, image processing,
seq2seq targets), so that the task's own head and loss apply unchanged. This works for every family
with no shared collate format (label counts, target shapes and batch keys differ between tasks and
families); mixing across tasks happens over steps, and within one optimizer step when the config
accumulates gradients. ``proportional`` (default): every example of every task once per epoch, the
batches of all tasks in one seeded random order, so a task gets batches in proportion to its size.
``uniform``: every task contributes the same number of batches per epoch (that of the task with the
most batches; smaller tasks go through further permutations of their examples). The order depends
only on ``(seed, epoch)``; under DDP every rank takes every ``world_size``-th batch of the same order.

**Model** (:class:`MultitaskModule`). One instance of the config's TaskModule per task (its "view":
own label names, head, metric, loss), all sharing ONE network (``self.model``): the base is loaded
once, heads are computed from it per task (frozen text heads), LoRA is wrapped once. Llama NLI's
``score`` head lives inside the network: it is replaced by :class:`TaskHeads`, one trainable
``score`` per task (started from the same initial head), switched per batch. Training batches use
their task's own ``training_step``; validation runs every task's validation split through its own
metric code (``update_split_metric``) and logs ``val/acc/<task>`` and their unweighted mean
``val/acc`` (what model selection and early stopping monitor).

**Output** (merged-model directory, written through ``check_output`` + ``atomic_directory``):

* ``merge.json``: ``method: multitask``, ``tasks`` (task, base-model id, family, kind, label names
  and the task checkpoint path when one exists), the recipe, the selected step and every task's
  validation / test metrics;
* full finetunes: ``model.safetensors``, the trained weights under the base model's parameter
  names, exactly what a task checkpoint's ``model.safetensors`` holds (``contents: weights``);
* LoRA finetunes: the trained adapter ``adapter_config.json`` + ``adapter_model.safetensors``
  (``save_as: adapter``, ``contents: updates``), the format LoRA merges are written in; the
  evaluation applies it as ``W0 + scale * B @ A``;
* ``heads/<task>.safetensors``: each task's head as trained (none for mT5).

**Evaluation** needs each task's task checkpoint (the single-task finetunes): ``EvalConfig.tasks``
lists them and the evaluation takes each task's head, labels and data from it. For the
text-embedding heads these equal the multitask model's heads (same base, labels and templates; a
difference is reported). Llama's trained heads are not in the task checkpoints: with
``--heads-from-tasks`` each task's head is loaded from its task checkpoint and frozen during
multitask training, so that ``method: merged`` scores exactly the trained model; without it the
evaluation pairs the multitask backbone with the single-task heads (a warning says so).
``--task-checkpoints`` (default: the config's ``export.output_dir``) says where they are.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric

from ..merged_output import MERGE_FORMAT_VERSION, MERGE_JSON
from ..safe_output import MERGE_MARKER, TASK_MARKER, OutputError, atomic_directory, check_output, note
from ..task_checkpoint import HEAD_WEIGHTS, TaskCheckpointError, read_task_info
from .base import TaskModule, jsonable
from .data.sampling import epoch_seed
from .optim import build_optimizer

METHOD = "multitask"
LABEL = "Multitask"
MIXING = ("proportional", "uniform")
HEADS_DIR = "heads"


# ----- the mixture ------------------------------------------------------------------------------
def _batches(perm: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    out = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out


class _EpochHook:
    """What Lightning finds at ``loader.batch_sampler.sampler``: it calls ``set_epoch`` on it."""

    def __init__(self, owner: "MixtureBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class MixtureBatchSampler:
    """Single-task batches of global indices into a :class:`MixtureDataset` (see the module docstring).

    Args:
        sizes: examples per task.
        batch_sizes: batch size per task (one int: all tasks).
        mixing: ``proportional`` (every example once per epoch) or ``uniform`` (as many batches per
            task as the largest task has).
        seed: the order of epoch ``e`` depends only on ``(seed, e)``.
        drop_last: per task (or one bool): drop a task's last incomplete batch.
        num_replicas, rank: DDP: this rank's share (every ``num_replicas``-th batch of the shared
            order; the order is padded by its first batches to a multiple of ``num_replicas``).
    """

    def __init__(self, sizes: Sequence[int], batch_sizes, mixing: str = "proportional", seed: int = 0,
                 drop_last=False, num_replicas: int = 1, rank: int = 0):
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        self.sizes = [int(n) for n in sizes]
        if not self.sizes:
            raise ValueError("a mixture needs at least one task")
        n = len(self.sizes)
        self.batch_sizes = [int(batch_sizes)] * n if isinstance(batch_sizes, int) else [int(b) for b in batch_sizes]
        self.drop_last = [bool(drop_last)] * n if isinstance(drop_last, bool) else [bool(d) for d in drop_last]
        if len(self.batch_sizes) != n or len(self.drop_last) != n:
            raise ValueError("sizes, batch_sizes and drop_last must have one entry per task")
        for t, (size, bs, drop) in enumerate(zip(self.sizes, self.batch_sizes, self.drop_last)):
            if bs < 1:
                raise ValueError(f"task {t}: batch size must be positive, got {bs}")
            if size < 1 or (drop and size < bs):
                raise ValueError(f"task {t}: {size} training example(s) make no batch of {bs}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.mixing, self.seed = mixing, int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.epoch = 0
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_task(self) -> list[int]:
        """Batches each task contributes to one epoch (all ranks together, before DDP padding)."""
        own = [n // b if d else math.ceil(n / b) for n, b, d in zip(self.sizes, self.batch_sizes, self.drop_last)]
        return own if self.mixing == "proportional" else [max(own)] * len(own)

    def schedule(self, epoch: Optional[int] = None) -> list[tuple[int, list[int]]]:
        """``(task, local indices)`` of every batch of ``epoch`` for this rank, in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order: list[tuple[int, list[int]]] = []
        for t, need in enumerate(self.batches_per_task()):
            chunks: list[list[int]] = []
            while len(chunks) < need:  # uniform: smaller tasks go through further permutations
                perm = torch.randperm(self.sizes[t], generator=g).tolist()
                chunks += _batches(perm, self.batch_sizes[t], self.drop_last[t])
            order += [(t, c) for c in chunks[:need]]
        order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        if self.num_replicas > 1:
            pad = (-len(order)) % self.num_replicas
            order = (order + order[:pad])[self.rank::self.num_replicas]
        return order

    def __iter__(self) -> Iterator[list[int]]:
        for t, local in self.schedule():
            yield [self.offsets[t] + i for i in local]

    def __len__(self) -> int:
        total = sum(self.batches_per_task())
        return math.ceil(total / self.num_replicas)


class MixtureDataset(Dataset):
    """The tasks' training sets end to end; item ``i`` is ``(task index, that task's example)``."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.datasets = list(datasets)
        self.offsets = [0]
        for d in self.datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int):
        t = bisect.bisect_right(self.offsets, i) - 1
        return t, self.datasets[t][i - self.offsets[t]]


class MixtureCollate:
    """Collates a single-task batch with that task's own collate function -> ``{"task", "batch"}``."""

    def __init__(self, tasks: Sequence[str], collates: Sequence[Any]):
        self.tasks, self.collates = list(tasks), list(collates)

    def __call__(self, items):
        tasks = {t for t, _ in items}
        if len(tasks) != 1:
            raise RuntimeError(f"a multitask batch must hold one task, got tasks {sorted(tasks)}")
        t = tasks.pop()
        collate = self.collates[t] or torch.utils.data.default_collate
        return {"task": self.tasks[t], "batch": collate([item for _, item in items])}


def _loader_batch_size(loader: DataLoader) -> int:
    if loader.batch_size is not None:
        return int(loader.batch_size)
    bs = getattr(loader.batch_sampler, "batch_size", None)
    if bs is None:
        raise ValueError("a task's training DataLoader has no batch size (custom batch sampler)")
    return int(bs)


class MultitaskDataModule(L.LightningDataModule):
    """The tasks' datamodules mixed (training) and side by side (validation / test: one loader per task).

    Args:
        datamodules: ``{task name: LightningDataModule}`` (each exposing ``label_names``); the order
            is the task order everywhere (validation dataloader ``i`` is task ``i``).
        mixing: ``proportional`` or ``uniform`` (see :class:`MixtureBatchSampler`).
        seed: the training order's seed.
    """

    def __init__(self, datamodules: dict[str, L.LightningDataModule], mixing: str = "proportional", seed: int = 0):
        super().__init__()
        if not datamodules:
            raise ValueError("a multitask datamodule needs at least one task")
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        self.datamodules = dict(datamodules)
        self.tasks = list(self.datamodules)
        self.mixing, self.seed = mixing, int(seed)
        self.batch_sampler: Optional[MixtureBatchSampler] = None

    def prepare_data(self) -> None:
        for dm in self.datamodules.values():
            dm.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        for dm in self.datamodules.values():
            if getattr(dm, "trainer", None) is None and self.trainer is not None:
                dm.trainer = self.trainer
            dm.setup(stage)

    def label_names(self, task: str) -> Optional[list[str]]:
        names = getattr(self.datamodules[task], "label_names")
        return None if names is None else list(names)

    def templates(self, task: str) -> Optional[list[str]]:
        templates = getattr(self.datamodules[task], "templates", None)
        return list(templates) if templates else None

    def metric_task(self, task: str) -> Optional[str]:
        """The base task name a family's metric may depend on (mT5: ``squad`` of ``squad-en``)."""
        dm = self.datamodules[task]
        name = getattr(dm, "base_task", None) or getattr(dm, "task", None)
        return None if name is None else str(name).split("-")[0]

    def train_dataloader(self) -> DataLoader:
        loaders = [self.datamodules[t].train_dataloader() for t in self.tasks]
        for t, loader in zip(self.tasks, loaders):
            if isinstance(loader.dataset, torch.utils.data.IterableDataset) or not hasattr(loader.dataset, "__len__"):
                raise ValueError(f"task {t!r}: its training set is not a sized map-style dataset; it cannot be mixed")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.batch_sampler = MixtureBatchSampler(
            [len(lo.dataset) for lo in loaders], [_loader_batch_size(lo) for lo in loaders], self.mixing, self.seed,
            [bool(lo.drop_last) for lo in loaders], num_replicas=world, rank=rank)
        first = loaders[0]
        workers = max(lo.num_workers for lo in loaders)
        return DataLoader(MixtureDataset([lo.dataset for lo in loaders]), batch_sampler=self.batch_sampler,
                          collate_fn=MixtureCollate(self.tasks, [lo.collate_fn for lo in loaders]),
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=bool(first.pin_memory),
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> list:
        return [self.datamodules[t].val_dataloader() for t in self.tasks]

    def test_dataloader(self) -> list:
        return [self.datamodules[t].test_dataloader() for t in self.tasks]


# ----- the model ------------------------------------------------------------------------------
class TaskHeads(torch.nn.Module):
    """Stands in for a head module inside the network (Llama's ``score``): one head per task,
    ``current`` says whose head the next forward uses."""

    def __init__(self, heads: Sequence[torch.nn.Module]):
        super().__init__()
        self.heads = torch.nn.ModuleList(heads)
        self.current = 0

    def forward(self, *args, **kwargs):
        return self.heads[self.current](*args, **kwargs)


def _no_log(*args, **kwargs) -> None:
    """A task view's own ``self.log`` calls: the multitask module logs instead."""


def _share(view: TaskModule, network: torch.nn.Module) -> None:
    """Point ``view.model`` at the shared network without registering it in the view (it is
    registered once, as the multitask module's ``model``: one copy in state dicts and checkpoints)."""
    view._modules.pop("model", None)
    object.__setattr__(view, "model", network)


@contextlib.contextmanager
def _patched(obj, **attrs):
    """Instance attributes that shadow methods inside the block."""
    for name, value in attrs.items():
        object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        for name in attrs:
            obj.__dict__.pop(name, None)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("labels", "input_ids", "pixel_values"):
            if key in batch and hasattr(batch[key], "__len__"):
                return len(batch[key])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim:
                return len(value)
    return 1


def _is_llama(view: TaskModule) -> bool:
    from .models.llama_nli import LlamaNLIClassifier

    return isinstance(view, LlamaNLIClassifier)


class MultitaskModule(L.LightningModule):
    """One shared network, one view (a TaskModule of the experiment's class) per task.

    Args:
        views: unbuilt TaskModules, one per task, all with the same init args (the experiment's
            model config); each gets its task's labels, head and metric in :meth:`build`.
        tasks: the task names, in the datamodule's task order.
        task_heads: each task's task-checkpoint ``head.safetensors`` (or None): compared with the
            head built here (a note when they differ), or used (``heads_from_tasks``).
        heads_from_tasks: every task's head is loaded from ``task_heads`` and frozen.
    """

    def __init__(self, views: Sequence[TaskModule], tasks: Sequence[str],
                 task_heads: Optional[Sequence[Optional[Path]]] = None, heads_from_tasks: bool = False):
        super().__init__()
        if len(views) != len(tasks) or not views:
            raise ValueError("one view per task is needed")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique: {list(tasks)}")
        kinds = {(type(v), v.finetune) for v in views}
        if len(kinds) != 1:
            raise ValueError(f"every task must use one model class and finetune kind, got {kinds}")
        self.tasks = list(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.views = torch.nn.ModuleList(views)
        for view in views:
            object.__setattr__(view, "log", _no_log)
        self.val_metrics = torch.nn.ModuleList([MeanMetric() for _ in self.tasks])
        self.test_metrics = torch.nn.ModuleList([MeanMetric() for _ in self.tasks])
        self._counts = {"val": [0] * len(self.tasks), "test": [0] * len(self.tasks)}
        self.model: Optional[torch.nn.Module] = None
        self.dispatcher: Optional[TaskHeads] = None
        self.heads_source = "computed"
        self.task_heads = list(task_heads) if task_heads is not None else [None] * len(self.tasks)
        if len(self.task_heads) != len(self.tasks):
            raise ValueError("task_heads: one head file (or None) per task")
        self.heads_from_tasks = heads_from_tasks
        self.notes: list[str] = []
        self.strict_loading = False  # checkpoints keep only what training changes (as TaskModule's)

    # ----- building ---------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.model is not None

    @property
    def first(self) -> TaskModule:
        return self.views[0]

    def setup(self, stage: str) -> None:
        if self.built:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "datamodules"):
            raise RuntimeError("MultitaskModule needs a MultitaskDataModule")
        if list(dm.tasks) != self.tasks:
            raise RuntimeError(f"the datamodule's tasks {dm.tasks} are not the module's {self.tasks}")
        self.build([dm.label_names(t) for t in self.tasks], [dm.templates(t) for t in self.tasks],
                   [dm.metric_task(t) for t in self.tasks])

    def build(self, label_names: Sequence[Optional[list[str]]], templates: Sequence[Optional[list[str]]],
              metric_tasks: Optional[Sequence[Optional[str]]] = None) -> None:
        """Load the base once, give every view its labels / head / metric, share one network."""
        metric_tasks = list(metric_tasks or [None] * len(self.tasks))
        views = list(self.views)
        first = views[0]
        first._trainer = self._trainer  # Llama's quantized load places the weights on the trainer's device
        try:
            if _is_llama(first):
                network = self._build_llama(views, label_names)
            elif hasattr(first, "attach_base"):
                network = self._build_shared_base(views, label_names, templates)
            else:  # mT5: the network is the whole model, no head
                network = self._build_plain(views, label_names, templates)
        finally:
            first._trainer = None
        for view, task in zip(views, metric_tasks):
            _share(view, network)
            if getattr(view, "metric", None) == "auto" and hasattr(view, "resolve_metric"):
                view.metric = view.resolve_metric(task)  # the view has no trainer / datamodule to ask later
        self.model = network
        if self.heads_from_tasks:
            self.load_task_heads(self.task_heads)
        else:
            self._compare_heads()
        is_zero = self._trainer is None or self.trainer.is_global_zero
        for message in self.notes if is_zero else ():
            note(message)

    def _compare_heads(self) -> None:
        """Notes for the evaluation: it scores with each task checkpoint's head, not this module's."""
        if self.dispatcher is not None:
            if any(p is not None for p in self.task_heads):
                self.notes.append("the per-task heads are trained with the shared network and written to heads/; "
                                  "an evaluation with method: merged uses each task checkpoint's own head instead "
                                  "(--heads-from-tasks trains with those heads, frozen)")
            return
        for i, path in enumerate(self.task_heads):
            if path is None or not Path(path).is_file():
                continue
            theirs, ours = load_file(str(path)), self.head_state(i)
            same = set(theirs) == set(ours) and all(
                theirs[k].shape == ours[k].shape and torch.allclose(theirs[k].float(), ours[k].float().cpu(), atol=1e-5)
                for k in ours)
            if not same:
                self.notes.append(f"{self.tasks[i]}: the head built here differs from its task checkpoint's ({path}); "
                                  "an evaluation with method: merged uses the task checkpoint's "
                                  "(--heads-from-tasks trains with it)")

    @staticmethod
    def _set_labels(view: TaskModule, labels, templates) -> list[str]:
        view.label_names = list(labels) if labels is not None else []
        view.templates = list(templates) if templates else None
        return view.label_names

    def _build_shared_base(self, views, label_names, templates) -> torch.nn.Module:
        """Text-embedding-head families (CLIP, demo, from-scratch MLP / ResNet): every view's
        ``build_model`` computes its head from the one base; the base is attached (LoRA-wrapped,
        trainable parts set) once."""
        base = views[0].load_base()
        for view, labels, tmpl in zip(views, label_names, templates):
            labels = self._set_labels(view, labels, tmpl)
            with _patched(view, load_base=lambda: base, attach_base=lambda *a, **k: None):
                view.build_model(labels, view.templates)
        views[0].attach_base(base, trainable=True)
        return views[0].model

    def _build_plain(self, views, label_names, templates) -> torch.nn.Module:
        base = views[0].load_base()
        for view, labels, tmpl in zip(views, label_names, templates):
            labels = self._set_labels(view, labels, tmpl)
            with _patched(view, load_base=lambda: base):
                view.build_model(labels, view.templates)
        return views[0].model

    def _build_llama(self, views, label_names) -> torch.nn.Module:
        """Llama NLI: the first view builds the network (quantization, LoRA, gradient checkpointing
        as for a task model); its ``score`` head becomes one trainable copy per task."""
        from .models.llama_nli import HEAD_MODULE

        for view, labels in zip(views, label_names):
            self._set_labels(view, labels, None)
            if not 1 < len(view.label_names) <= view.num_labels:
                raise ValueError(f"{len(view.label_names)} label names for a {view.num_labels}-way head: "
                                 f"{view.label_names}")
        views[0].build_model(views[0].label_names)
        network = views[0].model
        head = views[0]._head()
        inner = views[0].unwrapped_model()
        heads = [copy.deepcopy(head) for _ in views]
        for h in heads:
            h.requires_grad_(True)
        self.dispatcher = TaskHeads(heads)
        setattr(inner, HEAD_MODULE, self.dispatcher)
        self.heads_source = "trained"
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and len(views) > 1 and \
                not (getattr(trainer.strategy, "_ddp_kwargs", None) or {}).get("find_unused_parameters"):
            self.notes.append("each step trains one task's head, so under DDP the other heads get no gradient: "
                              "use --trainer.strategy ddp_find_unused_parameters_true")
        return network

    def select(self, i: int) -> TaskModule:
        """Task ``i``'s view, with its head in place."""
        if self.dispatcher is not None:
            self.dispatcher.current = i
        return self.views[i]

    # ----- heads --------------------------------------------------------------------------------
    def head_state(self, i: int) -> dict[str, torch.Tensor]:
        """Task ``i``'s head as its task checkpoint's ``head.safetensors`` would hold it."""
        if self.dispatcher is not None:
            from .models.llama_nli import HEAD_MODULE

            return {f"{HEAD_MODULE}.{k}": v.detach() for k, v in self.dispatcher.heads[i].state_dict().items()}
        return {k: v.detach() for k, v in self.views[i].head_state_dict().items()}

    def load_task_heads(self, paths: Sequence[Optional[Path]]) -> None:
        """Each task's head from its task checkpoint's ``head.safetensors``, frozen (``--heads-from-tasks``)."""
        for i, path in enumerate(paths):
            if path is None:
                raise ValueError(f"task {self.tasks[i]!r}: no task checkpoint to take its head from")
            state = load_file(str(path))
            if self.dispatcher is not None:
                from .models.llama_nli import HEAD_MODULE

                prefix = HEAD_MODULE + "."
                head = self.dispatcher.heads[i]
                head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                head.requires_grad_(False)
            elif state:
                self.views[i].load_head_state_dict(state)
        self.heads_source = "task checkpoints"

    # ----- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        task = batch["task"]
        i = self.index[task]
        data = batch["batch"]
        loss = self.select(i).training_step(data, batch_idx)  # the task's own loss
        if self._trainer is not None:
            n = _batch_size(data)
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            self.log(f"train/loss/{task}", loss, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        steps = int(steps) if steps is not None and steps != float("inf") else None
        return build_optimizer(self.parameters(), self.first.optim, steps)

    # ----- validation / test: every task's split with its own metric ---------------------------
    def _start(self, split: str) -> None:
        metrics = self.val_metrics if split == "val" else self.test_metrics
        for m in metrics:
            m.reset()
        self._counts[split] = [0] * len(self.tasks)
        hook = "on_validation_epoch_start" if split == "val" else "on_test_epoch_start"
        for view in self.views:
            getattr(view, hook)()  # e.g. mT5 empties its kept generations

    def _step(self, split: str, batch: dict, dataloader_idx: int) -> None:
        metrics = self.val_metrics if split == "val" else self.test_metrics
        self._counts[split][dataloader_idx] += self.select(dataloader_idx).update_split_metric(
            metrics[dataloader_idx], batch)

    def _end(self, split: str) -> dict[str, float]:
        metrics = self.val_metrics if split == "val" else self.test_metrics
        values = {}
        for i, task in enumerate(self.tasks):
            if self._counts[split][i] == 0 and not getattr(metrics[i], "update_called", False):
                continue
            values[task] = float(metrics[i].compute())
            metrics[i].reset()
        for task, value in values.items():
            self.log(f"{split}/acc/{task}", value)
        if values:
            self.log(f"{split}/acc", sum(values.values()) / len(values), prog_bar=True)
        return values

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end("test")

    # ----- Lightning checkpoints (resume) --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in state.items()
                                        if k in trainable or not k.startswith("model.")}
        checkpoint["multitask"] = {"tasks": self.tasks, "label_names": [v.label_names for v in self.views]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("multitask") or {}
        if saved.get("tasks") is not None and list(saved["tasks"]) != self.tasks:
            raise RuntimeError(f"checkpoint was trained on tasks {saved['tasks']}, this run has {self.tasks}")
        state = checkpoint.get("state_dict")
        if state is None or not self.built:
            return
        own = self.state_dict()
        unexpected = [k for k in state if k not in own]
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in state]
        if unexpected or missing:
            raise RuntimeError(f"checkpoint does not fit this multitask model: {len(unexpected)} unexpected key(s) "
                               f"{unexpected[:3]}, {len(missing)} trainable parameter(s) missing {missing[:3]}")


# ----- evaluation outside the loops, export --------------------------------------------------------
@torch.no_grad()
def evaluate_tasks(module: MultitaskModule, datamodule: MultitaskDataModule, splits=("val", "test"),
                   trainer: Optional[L.Trainer] = None) -> dict[str, dict[str, float]]:
    """Every task's metric on ``splits`` with the module's current weights, through each task's own
    metric code (``src.finetune.export.evaluate_accuracy``), the shared network in eval mode."""
    from .export import evaluate_accuracy

    modes = {m: m.training for m in module.modules()}
    module.eval()
    out: dict[str, dict[str, float]] = {t: {} for t in module.tasks}
    try:
        for split in splits:
            getter = getattr(datamodule, f"{split}_dataloader")
            for i, (task, loader) in enumerate(zip(module.tasks, getter())):
                view = module.select(i)
                out[task][f"{split}_acc"] = evaluate_accuracy(view, loader, trainer)
                view.eval()
    finally:
        for m, training in modes.items():
            m.training = training
    return out


def task_entry(module: MultitaskModule, i: int, task_dir: Optional[Path]) -> dict[str, Any]:
    """``merge.json``'s description of task ``i`` (``src/merged_output.py: describe_input``)."""
    view = module.views[i]
    return {"path": None if task_dir is None else str(task_dir), "task": module.tasks[i],
            "base_model": view.base_model_id, "family": view.family, "kind": view.finetune,
            "label_names": list(view.label_names or [])}


def _safe_name(task: str) -> str:
    return task.replace(os.sep, "_").replace("/", "_")


def write_multitask_output(module: MultitaskModule, target, record: dict[str, Any],
                           task_dirs: Sequence[Optional[Path]] = ()) -> Path:
    """Write ``module`` as a merged-model directory at ``target`` (atomically; call
    :func:`check_multitask_output` first). ``record``: the training record kept in ``merge.json``."""
    from .export import _cpu_state

    first = module.first
    task_dirs = list(task_dirs) or [None] * len(module.tasks)
    lora = first.finetune == "lora"
    params = {k: record[k] for k in ("mixing", "seed") if k in record}
    if module.dispatcher is not None:  # trained heads, or the task checkpoints' (what the evaluation scores with)
        params["heads"] = module.heads_source
    info = {
        "format_version": MERGE_FORMAT_VERSION, "method": METHOD, "label": LABEL, "params": params,
        "base": None, "base_model_id": first.base_model_id,
        "tasks": [task_entry(module, i, d) for i, d in enumerate(task_dirs)],
        "save_as": "adapter" if lora else "safetensors", "contents": "updates" if lora else "weights",
        "complete_model": False, "partial": not lora,
        "heads": {t: f"{HEADS_DIR}/{_safe_name(t)}.safetensors" for i, t in enumerate(module.tasks)
                  if module.head_state(i)},
        "heads_source": module.heads_source,
        "multitask": jsonable(record),
    }
    target = Path(target)
    with atomic_directory(target) as tmp:
        if lora:
            first.save_adapter(tmp)
            if not (tmp / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"{type(first).__name__}.save_adapter wrote no adapter_model.safetensors")
        else:
            state = first.trained_state_dict()
            if not state:
                raise RuntimeError("no trained parameters to export (full finetune)")
            save_file(_cpu_state(state), str(tmp / "model.safetensors"), metadata={"format": "pt", "method": METHOD})
        for i, task in enumerate(module.tasks):
            head = module.head_state(i)
            if head:
                (tmp / HEADS_DIR).mkdir(exist_ok=True)
                save_file(_cpu_state(head), str(tmp / HEADS_DIR / f"{_safe_name(task)}.safetensors"),
                          metadata={"format": "pt"})
        (tmp / MERGE_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return target


def check_multitask_output(target, inputs: Sequence = (), task_dirs: Sequence = (), overwrite: bool = False):
    """``check_output`` for a multitask output, and never a task checkpoint: not one of the tasks'
    checkpoint directories, nothing inside or around one, not a directory holding ``task.json``
    (even with ``overwrite``)."""
    real = Path(os.path.realpath(os.path.expanduser(str(target))))
    for where in (real, *real.parents):
        if (where / TASK_MARKER).is_file():
            what = "is" if where == real else "lies inside"
            raise OutputError(target, f"{what} the task checkpoint {where}; a multitask model is written to a "
                                      "new directory, never into a task checkpoint")
    return check_output(target, [*inputs, *(d for d in task_dirs if d is not None)], MERGE_MARKER, overwrite)


class MultitaskExport(Callback):
    """Select the weights (best ``monitor`` or last), evaluate every task, write the output.

    Args:
        output: the merged-model directory to write.
        record: what ``merge.json`` records of the run (recipe, tasks file, ignored overrides...).
        task_dirs: each task's task checkpoint (or None), recorded in ``merge.json``.
        select, monitor, test: as ``TaskCheckpointExport``'s.
        inputs: local paths the run reads (protected by ``check_output``).
        overwrite: replace an existing non-empty directory that is not an earlier merged output.
    """

    def __init__(self, output, record: Optional[dict] = None, task_dirs: Sequence[Optional[Path]] = (),
                 select: str = "best", monitor: str = "val/acc", test: bool = True, inputs: Sequence = (),
                 overwrite: bool = False, verbose: bool = True):
        super().__init__()
        if select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', got {select!r}")
        self.output, self.record = Path(output), dict(record or {})
        self.task_dirs, self.inputs = list(task_dirs), list(inputs)
        self.select, self.monitor, self.test = select, monitor, test
        self.overwrite, self.verbose = overwrite, verbose
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_epoch: Optional[int] = None
        self.last_score: Optional[float] = None
        self._best_state: Optional[dict[str, torch.Tensor]] = None
        self.metrics: Optional[dict[str, dict[str, float]]] = None
        self.written: Optional[Path] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            replacing = check_multitask_output(self.output, self.inputs, self.task_dirs, self.overwrite)
            if replacing and trainer.is_global_zero:
                note(replacing)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        self.last_score = float(value)
        if self.select == "best" and (self.best_score is None or self.last_score > self.best_score):
            from .export import TaskCheckpointExport

            self.best_score, self.best_step, self.best_epoch = self.last_score, trainer.global_step, trainer.current_epoch
            self._best_state = TaskCheckpointExport._snapshot(pl_module)

    def on_fit_end(self, trainer, pl_module: MultitaskModule) -> None:
        from .export import TaskCheckpointExport, trainer_hparams

        selected = self.select == "best" and self._best_state is not None
        if selected:
            TaskCheckpointExport._restore(pl_module, self._best_state)
        dm = trainer.datamodule
        self.metrics = evaluate_tasks(pl_module, dm, ("val", "test") if self.test else ("val",), trainer)
        vals = [m["val_acc"] for m in self.metrics.values() if m.get("val_acc") == m.get("val_acc")]
        record = dict(self.record)
        record.update({
            "mixing": dm.mixing, "seed": dm.seed,
            "selection": {"select": self.select, "monitor": self.monitor, "score": self.best_score if selected
                          else self.last_score, "step": self.best_step if selected else trainer.global_step,
                          "epoch": self.best_epoch if selected else trainer.current_epoch},
            "metrics": self.metrics, "mean_val_acc": sum(vals) / len(vals) if vals else None,
            "trainer": trainer_hparams(trainer),
        })
        if dm.batch_sampler is not None:
            record["batches_per_epoch"] = dict(zip(dm.tasks, dm.batch_sampler.batches_per_task()))
            record["train_examples"] = dict(zip(dm.tasks, dm.batch_sampler.sizes))
        if trainer.is_global_zero:
            self.written = write_multitask_output(pl_module, self.output, record, self.task_dirs)
            if self.verbose:
                lines = ", ".join(f"{t} {100 * m.get('val_acc', float('nan')):.1f}" for t, m in self.metrics.items())
                print(f"multitask model written to {self.output}\n  validation accuracy (%): {lines}", flush=True)
        trainer.strategy.barrier("multitask_export")

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "best_epoch": self.best_epoch,
                "last_score": self.last_score, "best_state": self._best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self.best_epoch = state_dict.get("best_epoch")
        self.last_score = state_dict.get("last_score")
        self._best_state = state_dict.get("best_state")


# ----- the command line -----------------------------------------------------------------------------
def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """A task's tasks-file overrides -> (``data.*`` ones, which apply per task; the others, ignored)."""
    data = {k: v for k, v in overrides.items() if str(k).startswith("data.")}
    return data, {k: v for k, v in overrides.items() if k not in data}


def task_checkpoint_dir(pattern: Optional[str], task: str) -> Optional[Path]:
    """``pattern`` with ``{task}`` filled in, or ``pattern/task`` (a directory of task checkpoints)."""
    if not pattern:
        return None
    s = str(pattern)
    return Path(s.replace("{task}", task)) if "{task}" in s else Path(s) / task


def find_task_checkpoints(pattern: Optional[str], tasks: Sequence[str]) -> tuple[list[Optional[Path]], list[str]]:
    """Each task's task checkpoint where one exists (its ``task.json`` names the task), and notes."""
    found, notes = [], []
    for task in tasks:
        d = task_checkpoint_dir(pattern, task)
        if d is None or not (d / TASK_MARKER).is_file():
            found.append(None)
            notes.append(f"{task}: no task checkpoint at {d}" if d is not None else f"{task}: no task checkpoint given")
            continue
        try:
            read_task_info(d)
        except TaskCheckpointError as e:
            found.append(None)
            notes.append(f"{task}: {e}")
            continue
        found.append(d)
    return found, notes


def parse(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m src.finetune.multitask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="the experiment's finetune config (repeatable)")
    p.add_argument("--tasks-file", help="YAML: tasks -> per-task CLI overrides (as for train_all)")
    p.add_argument("--tasks", nargs="+", help="task names (default: all of --tasks-file)")
    p.add_argument("--output", required=True, help="the merged-model directory to write")
    p.add_argument("--mixing", choices=MIXING, default="proportional",
                   help="batches per task: proportional to its size (default) or the same for every task")
    p.add_argument("--seed", type=int, help="seed of the training order (default: the config's seed_everything, or 0)")
    p.add_argument("--task-checkpoints",
                   help="where the tasks' single-task checkpoints are: a directory of <task>/ or a pattern with "
                        "{task} (default: the config's export.output_dir); recorded in merge.json for the evaluation")
    p.add_argument("--heads-from-tasks", action="store_true",
                   help="take each task's head from its task checkpoint and keep it frozen (Llama: so that the "
                        "evaluation's heads are the trained model's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty OUTPUT that is not an earlier merged-model directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run directory")
    p.add_argument("--dry-run", action="store_true", help="say what would be trained and written, train nothing")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args, extra


def _fail(message: str) -> int:
    print(f"multitask: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    from .train_all import configured_inputs, latest_checkpoint, read_tasks_file, task_args

    args, extra = parse(argv)
    table = read_tasks_file(args.tasks_file) if args.tasks_file else {}
    names = list(args.tasks or table)
    if not names:
        return _fail("no tasks: give --tasks and/or --tasks-file")
    if len(set(names)) != len(names):
        return _fail(f"a task is named twice: {names}")
    output = Path(args.output)
    split = {name: split_overrides(table.get(name, {})) for name in names}
    ignored = {name: other for name, (_, other) in split.items() if other}

    # where the single-task checkpoints are (for the evaluation), and what this run reads
    try:
        inputs = []
        for name in names:
            inputs += [p for p in configured_inputs(args.config, split[name][0], extra) if p not in inputs]
    except (OSError, ValueError) as e:
        return _fail(f"cannot read --config: {e}")

    pattern = args.task_checkpoints
    if pattern is None:  # where `python -m src.finetune fit` with this config writes them
        for cfg in args.config:
            doc = yaml.safe_load(Path(cfg).read_text()) or {}
            pattern = ((doc.get("export") or {}).get("output_dir")) or pattern
        pattern = pattern or os.path.join(os.environ.get("CHECKPOINT_ROOT", "checkpoints"), "{task}")
    task_dirs, missing = find_task_checkpoints(pattern, names)
    try:
        replacing = check_multitask_output(output, inputs, task_dirs, args.overwrite)
    except OutputError as e:
        return _fail(f"refusing to start: {e}")
    if args.heads_from_tasks and any(d is None for d in task_dirs):
        return _fail("--heads-from-tasks needs every task's checkpoint: " + "; ".join(missing))
    run_dir = output.parent / ".runs" / output.name

    for name, other in ignored.items():
        print(f"multitask: {name}: per-task override(s) {other} do not apply to one shared model; ignored",
              flush=True)
    if missing:
        print("multitask: the evaluation of this model (method: merged) needs each task's task checkpoint "
              "(heads, labels, data); not found: " + "; ".join(missing), flush=True)
    if args.dry_run:
        for name in names:
            print(f"multitask: {name}: python -m src.finetune fit " + " ".join(
                ["--config " + c for c in args.config] + task_args(name, split[name][0]) + extra), flush=True)
        print(f"multitask: would write {output} (runs in {run_dir})" + (f"; {replacing}" if replacing else ""),
              flush=True)
        return 0

    from lightning.pytorch.cli import SaveConfigCallback

    from .__main__ import main as cli_main
    from .export import TaskCheckpointExport, datamodule_hparams, task_name
    from .quiet import quiet_known_noise

    quiet_known_noise()
    views, datamodules, trainer, export_cfg, seed = [], {}, None, {}, 0
    for name in names:
        cli_args = [a for c in args.config for a in ("--config", c)] + task_args(name, split[name][0])
        cli_args += ["--trainer.default_root_dir", str(run_dir), *extra, "--trainer.use_distributed_sampler", "false"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            cli = cli_main(cli_args, run=False)
        dm = cli.datamodule
        own = task_name(dm)  # what the task checkpoint's task.json calls the task (train_all: its directory name)
        if own in datamodules:
            return _fail(f"two tasks of the tasks file are the datamodule task {own!r}")
        views.append(cli.model)
        datamodules[own] = dm
        if trainer is None:
            trainer, config = cli.trainer, cli.config
            exp = config.get("export")
            export_cfg = exp.as_dict() if hasattr(exp, "as_dict") else dict(exp or {})
            seed = config.get("seed_everything")
    for name, own, d in zip(names, datamodules, task_dirs):
        if own != name:
            print(f"multitask: {name}: the datamodule calls this task {own!r}; merge.json uses that name", flush=True)
        if d is not None and read_task_info(d).task != own:
            return _fail(f"{d} is the task checkpoint of {read_task_info(d).task!r}, not of {own!r}")
    seed = args.seed if args.seed is not None else (seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
    # the single-task export and the config dump (of the first task's config) do not describe this run
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, (TaskCheckpointExport, SaveConfigCallback))]
    mixture = MultitaskDataModule(datamodules, args.mixing, seed)
    module = MultitaskModule(views, list(datamodules), [None if d is None else d / HEAD_WEIGHTS for d in task_dirs],
                             args.heads_from_tasks)
    record = {
        "mixing": args.mixing, "seed": seed, "configs": list(args.config), "tasks_file": args.tasks_file,
        "extra_args": extra, "ignored_overrides": ignored,
        "model": {"class_path": f"{type(views[0]).__module__}.{type(views[0]).__qualname__}",
                  "init_args": views[0].init_args()},
        "datamodules": {t: datamodule_hparams(dm) for t, dm in datamodules.items()},
    }
    export = MultitaskExport(output, record, task_dirs, export_cfg.get("select") or "best",
                             export_cfg.get("monitor") or "val/acc", bool(export_cfg.get("test", True)),
                             inputs, args.overwrite)
    trainer.callbacks.append(export)
    ckpt = None
    if args.resume:
        ckpt = latest_checkpoint(run_dir)
        print(f"multitask: resuming from {ckpt}" if ckpt else
              f"multitask: nothing to resume (no checkpoint under {run_dir}); training from the start", flush=True)
    trainer.fit(module, datamodule=mixture, ckpt_path=str(ckpt) if ckpt else None)
    return 0 if export.written is not None or not trainer.is_global_zero else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OutputError as e:
        sys.exit(f"error: {e}")
