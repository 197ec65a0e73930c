"""Rebuild a task model from its task-checkpoint directory: base + adapter / full weights + head.

>>> model = load_task_model("checkpoints/demo/bbc_news")      # a TaskModule in eval mode
>>> logits = model.logits(batch)                               # (B, len(model.label_names))

Everything read is checked first; a missing file, unexpected keys or shapes, NaN/inf values,
or a base model other than the one the task model was trained from raise
:class:`~src.task_checkpoint.TaskCheckpointError` naming the file and the problem.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..task_checkpoint import (ADAPTER_DIR, FULL_WEIGHTS, HEAD_WEIGHTS, TASK_JSON, TaskCheckpointError,
                               TaskInfo, read_task_info)
from .base import TaskModule

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(\.weight)?$")


def _import_class(path: str, where) -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise TaskCheckpointError(where, f"module class_path {path!r} is not a dotted path")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise TaskCheckpointError(where, f"cannot import module class {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise TaskCheckpointError(where, f"{path!r} is not a TaskModule subclass")
    return cls


def build_module(info: TaskInfo, task_dir: Path) -> TaskModule:
    """The (unbuilt) TaskModule that ``task.json`` describes."""
    where = task_dir / TASK_JSON
    spec = (info.hparams or {}).get("module")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TaskCheckpointError(where, "hparams.module.class_path is missing: cannot tell which model class to rebuild")
    cls = _import_class(spec["class_path"], where)
    try:
        module = cls(**(spec.get("init_args") or {}))
    except (TypeError, ValueError) as e:
        raise TaskCheckpointError(where, f"cannot construct {spec['class_path']} from hparams.module.init_args: {e}") from None
    module.label_names = list(info.label_names)
    templates = (info.hparams or {}).get("templates")
    module.templates = list(templates) if templates else None
    if module.family != info.family:
        raise TaskCheckpointError(where, f"family is {info.family!r} but {spec['class_path']} is {module.family!r}")
    if module.base_model_id != info.base_model:
        raise TaskCheckpointError(where, f"base_model {info.base_model!r} does not match the model the recorded "
                                         f"init_args build ({module.base_model_id!r})")
    return module


def _base_id_of(base: torch.nn.Module) -> Optional[str]:
    if isinstance(base, TaskModule):
        return base.base_model_id
    ident = getattr(base, "base_model_id", None)
    if ident:
        return str(ident)
    config = getattr(base, "config", None)
    ident = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(ident) if ident else None


def _resolve_base(module: TaskModule, info: TaskInfo, task_dir: Path, base) -> torch.nn.Module:
    where = task_dir / TASK_JSON
    if base is None:
        return module.load_base()
    if isinstance(base, (str, os.PathLike)):
        base = str(base)
        if os.path.isdir(base):  # a local copy of the base weights: trusted to be that model
            module.pretrained = base
            model = module.load_base()
            return model
        if base != info.base_model:
            raise TaskCheckpointError(where, f"task model was trained from base {info.base_model!r}, not {base!r}")
        return module.load_base()
    if isinstance(base, TaskModule):
        if base.base_model_id != info.base_model:
            raise TaskCheckpointError(where, f"task model was trained from base {info.base_model!r}, "
                                             f"but the given base is {base.base_model_id!r}")
        base = base.unwrapped_model()
    elif not isinstance(base, torch.nn.Module):
        raise TypeError(f"base must be None, a path / model id or an nn.Module, got {type(base).__name__}")
    ident = _base_id_of(base)
    if ident and not os.path.isdir(ident) and ident != info.base_model:
        raise TaskCheckpointError(where, f"task model was trained from base {info.base_model!r}, "
                                         f"but the given base is {ident!r}")
    if hasattr(base, "peft_config"):
        raise TaskCheckpointError(where, "the given base already carries a PEFT adapter; pass the plain base model")
    return base


def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise TaskCheckpointError(path, f"tensor {key!r} holds NaN or inf values")


def check_adapter(adapter: Path, base: torch.nn.Module) -> None:
    """Adapter files present; every key ``base_model.model.<module>.lora_X.weight`` names a module
    of ``base`` with matching shapes; values finite."""
    config_path, weights_path = adapter / ADAPTER_CONFIG, adapter / ADAPTER_WEIGHTS
    if not adapter.is_dir():
        raise TaskCheckpointError(adapter, "adapter directory is missing")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise TaskCheckpointError(path, "missing file")
    try:
        json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskCheckpointError(config_path, f"unreadable: {e}") from None
    modules = dict(base.named_modules())
    try:
        handle = safe_open(str(weights_path), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise TaskCheckpointError(weights_path, f"unreadable safetensors file: {e}") from None
    with handle as f:
        keys = list(f.keys())
        if not keys:
            raise TaskCheckpointError(weights_path, "holds no tensors")
        for key in keys:
            if not key.startswith(PEFT_PREFIX):
                raise TaskCheckpointError(weights_path, f"key {key!r} does not start with {PEFT_PREFIX!r}")
            rest = key[len(PEFT_PREFIX):]
            match = _LORA_KEY.match(rest)
            if match is None:
                # modules_to_save copies (e.g. a trained classification head): a base parameter name
                if rest not in dict(base.named_parameters()):
                    raise TaskCheckpointError(weights_path, f"key {key!r} names neither a LoRA factor nor a base parameter")
                continue
            name, part = match.group("module"), match.group("part")
            target = modules.get(name)
            if target is None:
                raise TaskCheckpointError(weights_path, f"key {key!r}: the base model has no module {name!r}")
            tensor = f.get_tensor(key)
            _check_finite(weights_path, key, tensor)
            weight = getattr(target, "weight", None)
            if part in ("lora_A", "lora_B") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and tensor.ndim == 2:
                out_features, in_features = weight.shape
                if part == "lora_A" and tensor.shape[1] != in_features:
                    raise TaskCheckpointError(weights_path, f"key {key!r} has shape {tuple(tensor.shape)} but module "
                                                            f"{name!r} takes {in_features} input features")
                if part == "lora_B" and tensor.shape[0] != out_features:
                    raise TaskCheckpointError(weights_path, f"key {key!r} has shape {tuple(tensor.shape)} but module "
                                                            f"{name!r} has {out_features} output features")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a small safetensors file; a missing or corrupt file names itself."""
    if not path.is_file():
        raise TaskCheckpointError(path, "missing file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise TaskCheckpointError(path, f"unreadable safetensors file: {e}") from None


def check_full_weights(path: Path, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = read_safetensors(path)
    if not state:
        raise TaskCheckpointError(path, "holds no tensors")
    base_state = base.state_dict()
    unknown = [k for k in state if k not in base_state]
    if unknown:
        raise TaskCheckpointError(path, f"{len(unknown)} key(s) are not parameters of the base model, "
                                        f"e.g. {unknown[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(base_state[key].shape):
            raise TaskCheckpointError(path, f"tensor {key!r} has shape {tuple(tensor.shape)}, the base model's "
                                            f"has {tuple(base_state[key].shape)}")
        _check_finite(path, key, tensor)
    return state


def load_head(path: Path, module: TaskModule) -> None:
    state = read_safetensors(path)
    for key, tensor in state.items():
        _check_finite(path, key, tensor)
    try:
        module.load_head_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise TaskCheckpointError(path, f"invalid head: {e}") from None


def load_task_model(task_dir, base: Union[None, str, os.PathLike, torch.nn.Module] = None,
                    device: Optional[Union[str, torch.device]] = None) -> TaskModule:
    """Rebuild the task model saved in ``task_dir``; returns its TaskModule in eval mode.

    Args:
        task_dir: a task-checkpoint directory.
        base: None (build the base model that ``task.json`` names), a model id (must equal
            ``task.json``'s ``base_model``), a local directory holding the base weights, or a
            base ``nn.Module`` / TaskModule (used, and modified, in place: pass a copy to keep it).
        device: where to put the model.
    """
    task_dir = Path(task_dir)
    info = read_task_info(task_dir)
    module = build_module(info, task_dir)
    base_model = _resolve_base(module, info, task_dir, base)
    base_model.requires_grad_(False)
    if info.kind == "lora":
        adapter = task_dir / ADAPTER_DIR
        check_adapter(adapter, base_model)
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base_model, str(adapter), is_trainable=False)
        except Exception as e:
            raise TaskCheckpointError(adapter, f"PEFT could not load the adapter: {e}") from None
        module.model = model
    else:
        path = task_dir / FULL_WEIGHTS
        state = check_full_weights(path, base_model)
        base_model.load_state_dict(state, strict=False)
        if hasattr(module, "attach_base"):
            module.attach_base(base_model, trainable=False)
        else:
            module.model = base_model
    load_head(task_dir / HEAD_WEIGHTS, module)
    module.requires_grad_(False)
    module.eval()
    if device is not None:
        module.to(device)
    return module
