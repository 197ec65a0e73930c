"""The models an evaluation run scores, all served by ONE loaded base network.

:class:`ModelBank` loads the base model once (``TaskModule.load_base`` of the first task) and
builds one light TaskModule per task that shares it, each with its own head. A model to score
— a task model, a merged directory, a sweep's grid point — is a *weight state*: parameter name
(the base model's ``state_dict`` names, as everywhere in the project) -> full weight. It is
copied into the base parameters in place (:meth:`ModelBank.weights`) and the originals are
copied back afterwards, bit for bit, so the next model starts from the pristine base. A head
stored inside the base network (Llama's ``score``) is not shared: each task module runs on a view
of the base with its own copy of those tensors (:func:`private_tensors`).

Task models and merged adapters are read with the merge stage's readers (one adapter reader
in the project): a LoRA update becomes ``W0 + scale * B @ A``, a merged ``updates`` file
``W0 + dW``, merged weights are taken as they are.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open

from ..finetune.load import build_module, load_head
from ..merge.base_ids import canonical_base
from ..merge.sources import PeftAdapterReader, SafetensorsReader, open_task
from ..merge.updates import densify
from ..merged_output import MergedOutputError, read_merge_info, weight_files
from ..task_checkpoint import TaskCheckpointError, TaskInfo, head_path, read_task_info

WeightState = Mapping[str, torch.Tensor]


class EvaluationError(ValueError):
    """Inputs of an evaluation that do not fit together (one line, naming the file)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


class WeightSwap:
    """Copies weight states into a module's parameters and restores the originals exactly.

    The original of a tensor is copied once, the first time it is swapped out, and kept for the
    run (a sweep swaps the same tensors at every grid point); ``restore`` copies back only what is
    swapped out now."""

    def __init__(self, model: torch.nn.Module):
        self.tensors = dict(model.state_dict(keep_vars=True))
        self._originals: dict[str, torch.Tensor] = {}
        self._swapped: set[str] = set()

    def apply(self, state: WeightState, where: str = "<weights>") -> None:
        with torch.no_grad():
            for name, value in state.items():
                target = self.tensors.get(name)
                if target is None:
                    raise EvaluationError(where, f"tensor {name!r} is not a parameter of the base model")
                if tuple(value.shape) != tuple(target.shape):
                    raise EvaluationError(where, f"tensor {name!r} has shape {tuple(value.shape)}, the base model's "
                                                 f"has {tuple(target.shape)}")
                if name not in self._originals:
                    self._originals[name] = target.detach().clone()
                target.copy_(value.to(device=target.device, dtype=target.dtype))
                self._swapped.add(name)

    def restore(self) -> None:
        with torch.no_grad():
            for name in self._swapped:
                self.tensors[name].copy_(self._originals[name])
        self._swapped.clear()

    def original(self, name: str) -> torch.Tensor:
        """The base model's own value of ``name`` (whether or not it is swapped out now)."""
        return self._originals.get(name, self.tensors[name]).detach()


def datamodule_of(info: TaskInfo, task_dir: Path, overrides: Optional[Mapping[str, Any]] = None):
    """The task's DataModule as its ``task.json`` records it (``overrides``: init args to change,
    e.g. ``data_root`` or ``eval_batch_size`` on another machine)."""
    import importlib
    import inspect

    spec = (info.hparams or {}).get("datamodule") or {}
    if "class_path" not in spec:
        raise EvaluationError(task_dir / "task.json", "hparams.datamodule is missing: cannot tell which data to evaluate on")
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = dict(spec.get("init_args") or {})
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in (overrides or {}).items():  # one override set serves every task: skip what a class lacks
        if key in args or key in accepted:
            args[key] = value
    return cls(**args)


def _base_tensors_of(values, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``tensors`` whose storage holds one of ``values``."""
    ptrs = {v.data_ptr() for v in values if v.numel()}
    return [name for name, t in tensors.items() if t.numel() and t.data_ptr() in ptrs]


def private_tensors(root: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module:
    """A view of ``root`` that shares every submodule, parameter and buffer except ``names``
    (state-dict names), which it holds as copies: shallow copies of the modules on their paths."""
    def view(module: torch.nn.Module) -> torch.nn.Module:
        out = copy.copy(module)
        out._modules, out._parameters, out._buffers = dict(module._modules), dict(module._parameters), dict(module._buffers)
        return out

    top = view(root)
    made = {id(top)}
    for name in names:
        *path, leaf = name.split(".")
        parent = top
        for part in path:
            child = parent._modules[part]
            if id(child) not in made:
                child = view(child)
                made.add(id(child))
                parent._modules[part] = child
            parent = child
        if leaf in parent._parameters:
            parent._parameters[leaf] = torch.nn.Parameter(parent._parameters[leaf].detach().clone(), requires_grad=False)
        else:
            parent._buffers[leaf] = parent._buffers[leaf].detach().clone()
    return top


def _same_network(a: TaskInfo, b: TaskInfo) -> bool:
    """Full finetunes of one architecture that differ only in their initialization (``#init-``
    suffix of the base id): every weight of either model comes from its own checkpoint."""
    return a.kind == b.kind == "full" and a.base_model.split("#init-")[0] == b.base_model.split("#init-")[0]


class ModelBank:
    """One base network and a TaskModule per task sharing it (see the module docstring).

    Args:
        task_dirs: task-checkpoint directories: the tasks to serve (their heads, labels, data).
        base: ``None`` (the base that ``task.json`` records), or a local directory of its weights.
        device: where the base network lives.
    """

    def __init__(self, task_dirs: Sequence[Union[str, Path]], base: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu", mixed_inits: bool = False):
        if not task_dirs:
            raise ValueError("an evaluation needs at least one task checkpoint")
        self.task_dirs: dict[str, Path] = {}
        self.infos: dict[str, TaskInfo] = {}
        for d in task_dirs:
            d = Path(d)
            info = read_task_info(d)
            if info.task in self.infos:
                raise EvaluationError(d, f"task {info.task!r} is also {self.task_dirs[info.task]}")
            self.task_dirs[info.task], self.infos[info.task] = d, info
        first = next(iter(self.infos.values()))
        for task, info in self.infos.items():
            if mixed_inits and _same_network(info, first):
                continue  # full weights from different initializations of one network (experiment E)
            if canonical_base(info.base_model) != canonical_base(first.base_model):
                raise EvaluationError(self.task_dirs[task], f"was finetuned from {info.base_model!r}, the other tasks "
                                                            f"from {first.base_model!r}: one base per evaluation")
        self.base_model_id = first.base_model
        self.mixed_inits = mixed_inits
        self.modules = {task: build_module(info, self.task_dirs[task]) for task, info in self.infos.items()}
        loader = next(iter(self.modules.values()))
        if base is not None:
            loader.pretrained = str(base)
        self.base = loader.load_base()  # once per run
        self.base.requires_grad_(False).eval()
        for task, module in self.modules.items():
            if hasattr(module, "attach_base"):
                module.attach_base(self.base, trainable=False)
            else:
                module.model = self.base
            self._load_own_head(module, head_path(self.task_dirs[task]))
            module.requires_grad_(False).eval()
        self.base.to(device)
        for module in self.modules.values():
            module.to(device)
        self.swap = WeightSwap(self.base)

    def _load_own_head(self, module, path: Path) -> None:
        """Load ``module``'s head; a head that lives inside the base network (Llama's ``score``)
        gets tensors of its own, so that every task keeps its head on the one shared base."""
        tensors = self.base.state_dict(keep_vars=True)
        with safe_open(str(path), framework="pt") as f:
            named = [k for k in f.keys() if k in tensors]  # head tensors the base may hold
        originals = {k: tensors[k].detach().clone() for k in named}
        load_head(path, module)
        inside = _base_tensors_of(module.head_state_dict().values(), tensors)
        if not inside:
            return
        if module.model is not self.base or not set(inside) <= set(originals):
            raise EvaluationError(path, f"the head is stored in the base model's {inside[:3]}, which "
                                        f"{type(module).__name__} does not let tasks share")
        module.model = private_tensors(self.base, inside)
        with torch.no_grad():
            for name in inside:
                tensors[name].copy_(originals[name])

    @property
    def tasks(self) -> list[str]:
        return list(self.infos)

    @contextlib.contextmanager
    def weights(self, state: Optional[WeightState], where: str = "<weights>") -> Iterator[None]:
        """The base network holds ``state`` (``None``: the base's own weights) inside the block."""
        try:
            if state:
                self.swap.apply(state, where)
            yield
        finally:
            self.swap.restore()

    # ----- weight states ---------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """The base weights as a state dict for the merge stage (``Sweep(base=...)``). The tensors
        alias the live parameters: merges must run while no state is swapped in (they do).
        Integer buffers are included (the merge copies them, never merges them): a full task model's
        ``model.safetensors`` names them too (ResNet's ``num_batches_tracked``), and the merge
        refuses task tensors its base does not have."""
        return {n: t.detach() for n, t in self.swap.tensors.items()
                if t.is_floating_point() or not isinstance(t, torch.nn.Parameter)}

    def with_updates(self, updates: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``W0 + dW`` for each update (dense tensor or :class:`LowRank`)."""
        out = {}
        for name, update in updates.items():
            if name not in self.swap.tensors:
                raise EvaluationError("<updates>", f"tensor {name!r} is not a parameter of the base model")
            w0 = self.swap.original(name)
            out[name] = (w0.float() + densify(update).to(w0.device, torch.float32)).to(w0.dtype)
        return out

    def task_state(self, task: str) -> dict[str, torch.Tensor]:
        """The finetuned weights of ``task``'s own model."""
        reader = open_task(self.task_dirs[task])
        if reader.kind == "lora":
            return self.with_updates({name: reader.load(name) for name in reader.keys()})
        return {name: reader.load(name) for name in reader.keys()}

    def merged_state(self, merged_dir: Union[str, Path], task: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The weights a merged-model directory stands for; checks that it was merged from this
        base and (``task``) that it includes that task."""
        merged_dir = Path(merged_dir)
        info = read_merge_info(merged_dir)
        self.check_merged(merged_dir, info, task)
        if info.get("save_as") == "adapter":
            reader = PeftAdapterReader(merged_dir)
            return self.with_updates({name: reader.load(name) for name in reader.keys()})
        files = weight_files(merged_dir, info.get("contents", "weights"))
        state: dict[str, torch.Tensor] = {}
        for path in files:
            reader = SafetensorsReader(path)
            for name in reader.keys():
                target = self.swap.tensors.get(name)
                if target is None or (not target.is_floating_point() and isinstance(target, torch.nn.Parameter)):
                    if info.get("complete_model"):
                        continue  # e.g. non-parameter tensors a model file carries
                    raise EvaluationError(path, f"tensor {name!r} is not a parameter of the base model")
                if not target.is_floating_point():
                    continue  # integer buffers (BatchNorm's num_batches_tracked): copied by the merge, never merged
                value = reader.load(name)
                if info.get("complete_model") and torch.equal(value.to(self.swap.tensors[name].device),
                                                              self.swap.original(name)):
                    continue  # unmerged tensors copied from the base: nothing to swap
                state[name] = value
        if info.get("contents") == "updates":
            return self.with_updates(state)
        return state

    def check_merged(self, merged_dir: Path, info: Mapping[str, Any], task: Optional[str]) -> None:
        recorded = info.get("base_model_id") or next((t.get("base_model") for t in info["tasks"] if t.get("base_model")), None)
        if recorded and self.mixed_inits:  # one architecture from different initializations: compare the architecture
            recorded, expected = recorded.split("#init-")[0], self.base_model_id.split("#init-")[0]
        else:
            expected = self.base_model_id
        if recorded and canonical_base(recorded) != canonical_base(expected):
            raise EvaluationError(merged_dir / "merge.json", f"was merged from task models of base {recorded!r}, "
                                                             f"but the tasks evaluated here use {self.base_model_id!r}")
        names = [t.get("task") for t in info["tasks"]]
        if task is not None and any(names) and task not in names:
            raise EvaluationError(merged_dir / "merge.json", f"task {task!r} is not in this merge (merged tasks: "
                                                             f"{', '.join(n for n in names if n)})")


def load_merged(merged_dir: Union[str, Path], task: Union[str, Path], base: Optional[Union[str, Path]] = None,
                device: Union[str, torch.device] = "cpu"):
    """The TaskModule of ``task`` (its name among the merged tasks, or a task directory) running the
    merged model in ``merged_dir`` — for notebooks and one-off checks. An evaluation run keeps one
    :class:`ModelBank` instead, so the base is loaded once for every task and every model.
    """
    merged_dir = Path(merged_dir)
    info = read_merge_info(merged_dir)
    task_dir = Path(task)
    if not (task_dir / "task.json").is_file():
        paths = {t.get("task"): t.get("path") for t in info["tasks"]}
        if str(task) not in paths or not paths[str(task)]:
            known = ", ".join(str(k) for k in paths if k)
            raise EvaluationError(merged_dir / "merge.json", f"task {task!r} is not in this merge (merged tasks: {known})")
        task_dir = Path(paths[str(task)])
    try:
        bank = ModelBank([task_dir], base=base, device=device)
    except TaskCheckpointError as e:
        raise EvaluationError(e.path, str(e).split(": ", 1)[-1]) from None
    name = bank.tasks[0]
    state = bank.merged_state(merged_dir, name)
    bank.swap.apply(state, str(merged_dir))  # never restored: this base belongs to the returned module
    return bank.modules[name]


__all__ = ["ModelBank", "WeightSwap", "EvaluationError", "MergedOutputError", "load_merged", "datamodule_of"]
