"""The task-checkpoint directory: what finetuning writes and merging/evaluation read.

Layout of one task model::

    <dir>/task.json           TaskInfo below (base model, task, labels, hparams, accuracies)
    <dir>/adapter/            PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
                              when kind == "lora"
    <dir>/model.safetensors   full finetuned weights when kind == "full"; keys are the BASE
                              model's parameter names (only the trained parameters)
    <dir>/head.safetensors    the task's classification head (never merged)

Parameter names are always those of the base model's ``state_dict()`` (for PEFT adapters,
the module path inside ``base_model.model.``), so merge needs no conversion.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


FORMAT_VERSION = 1
TASK_JSON = "task.json"
ADAPTER_DIR = "adapter"
FULL_WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
KINDS = ("lora", "full")


class TaskCheckpointError(ValueError):
    """A task checkpoint directory is missing a file or holds an invalid one."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


@dataclass
class TaskInfo:
    task: str
    base_model: str
    family: str
    kind: str  # "lora" | "full"
    label_names: list[str]
    hparams: dict[str, Any] = field(default_factory=dict)
    # {"zeroshot": {"val_acc": .., "test_acc": ..}, "finetuned": {"val_acc": .., "test_acc": ..}}
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # set by permutation alignment (src/permute): {"frame": the reference's base-model id,
    # "reference": its task directory, "method": ..., "source": the unaligned task directory}
    aligned_to: Optional[dict[str, Any]] = None

    def to_json(self) -> str:
        data = asdict(self)
        if data["aligned_to"] is None:
            del data["aligned_to"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, path) -> "TaskInfo":
        required = ("task", "base_model", "family", "kind", "label_names")
        missing = [k for k in required if k not in data]
        if missing:
            raise TaskCheckpointError(path, f"missing field(s) {missing}")
        if data["kind"] not in KINDS:
            raise TaskCheckpointError(path, f"kind must be one of {KINDS}, got {data['kind']!r}")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TaskCheckpointError(path, f"format_version must be a positive integer, got {version!r}")
        for name, types in (("task", str), ("base_model", str), ("family", str), ("label_names", list),
                            ("hparams", dict), ("metrics", dict), ("aligned_to", (dict, type(None)))):
            if name in data and not isinstance(data[name], types):
                what = types.__name__ if isinstance(types, type) else "JSON object"
                raise TaskCheckpointError(path, f"{name} must be a {what}, got {data[name]!r}")
        if version > FORMAT_VERSION:
            raise TaskCheckpointError(path, f"format_version {data['format_version']} is newer than {FORMAT_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def is_task_dir(path) -> bool:
    return (Path(path) / TASK_JSON).is_file()


def read_task_info(directory) -> TaskInfo:
    path = Path(directory) / TASK_JSON
    if not path.is_file():
        raise TaskCheckpointError(directory, f"not a task checkpoint: {TASK_JSON} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TaskCheckpointError(path, f"unreadable: {e}") from None
    if not isinstance(data, dict):
        raise TaskCheckpointError(path, "must hold a JSON object")
    info = TaskInfo.from_dict(data, path)
    weights = Path(directory) / (ADAPTER_DIR if info.kind == "lora" else FULL_WEIGHTS)
    if not weights.exists():
        raise TaskCheckpointError(directory, f"kind is {info.kind!r} but {weights.name} is missing")
    return info


def adapter_dir(directory) -> Path:
    return Path(directory) / ADAPTER_DIR


def full_weights_path(directory) -> Path:
    return Path(directory) / FULL_WEIGHTS


def head_path(directory) -> Path:
    return Path(directory) / HEAD_WEIGHTS


def write_task_info(directory, info: TaskInfo) -> None:
    Path(directory, TASK_JSON).write_text(info.to_json() + "\n")
