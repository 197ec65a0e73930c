"""The merged-model directory: what ``src.merge`` writes and ``src.evaluate`` reads.

Layout::

    <dir>/merge.json                     MergeInfo below: method, hyperparameters, inputs, contents
    <dir>/adapter_config.json + adapter_model.safetensors
                                         a PEFT LoRA adapter (``save_as`` adapter): merged updates
    <dir>/model.safetensors (or shards + model.safetensors.index.json)
                                         merged WEIGHTS: ``complete`` (every base tensor, loadable with
                                         ``from_pretrained`` when the base was a model directory) or
                                         ``partial`` (only the merged tensors; the rest is the base's)
    <dir>/updates.safetensors (or shards + updates.safetensors.index.json)
                                         merged UPDATES ``dW`` (no base was given): add them to the base;
                                         named so that no loader mistakes them for weights
    <dir>/README.md                      a short model card

``merge.json`` describes every input (``tasks``: task directory, task name, base-model id,
family, kind and label names, as far as the input records them), so an evaluator knows which
tasks a merged model serves and with which heads, without the caller repeating it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

MERGE_JSON = "merge.json"
MERGE_FORMAT_VERSION = 2
WEIGHTS_STEM, UPDATES_STEM = "model", "updates"


class MergedOutputError(ValueError):
    """A merged-model directory is missing a file or holds an invalid one."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


def describe_input(reader: Any, spec: Any = None) -> dict[str, Any]:
    """What ``merge.json`` records about one input (a merge-stage reader): its task directory
    (not the ``adapter/`` inside it), task, base-model id, family, kind and label names."""
    info = getattr(reader, "task_info", None)
    path = getattr(reader, "task_dir", None) or (None if getattr(reader, "in_memory", False) else getattr(reader, "path", None))
    config = getattr(reader, "config", None)
    base = info.base_model if info is not None else (config or {}).get("base_model_name_or_path") if isinstance(config, dict) else None
    return {
        "path": None if path is None else str(path),
        "task": None if info is None else info.task,
        "base_model": base or None,
        "family": None if info is None else info.family,
        "kind": getattr(reader, "kind", None),
        "label_names": None if info is None else list(info.label_names),
    }


def read_merge_info(directory) -> dict[str, Any]:
    """``merge.json`` of a merged-model directory, upgraded to the current fields."""
    directory = Path(directory)
    path = directory / MERGE_JSON
    if not path.is_file():
        raise MergedOutputError(directory, f"not a merged model: {MERGE_JSON} is missing")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergedOutputError(path, f"unreadable: {e}") from None
    if not isinstance(info, dict) or "method" not in info:
        raise MergedOutputError(path, "must be a JSON object with at least 'method'")
    tasks = info.get("tasks") or []
    # format 1 recorded input paths only
    info["tasks"] = [t if isinstance(t, dict) else {"path": str(t), "task": None, "base_model": None, "family": None,
                                                     "kind": None, "label_names": None} for t in tasks]
    info.setdefault("partial", info.get("save_as") == "safetensors" and not info.get("complete_model", False))
    return info


def weight_files(directory, contents: str) -> list[Path]:
    """The safetensors files of a dense merged model (``contents``: weights or updates)."""
    directory = Path(directory)
    stem = UPDATES_STEM if contents == "updates" else WEIGHTS_STEM
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise MergedOutputError(index, f"not a valid safetensors index ({e})") from None
        return [directory / n for n in names]
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    if contents == "updates" and (directory / f"{WEIGHTS_STEM}.safetensors").is_file():
        return [directory / f"{WEIGHTS_STEM}.safetensors"]  # format 1 wrote updates as model.safetensors
    raise MergedOutputError(directory, f"holds no {stem}.safetensors (merge.json says the contents are {contents})")


def task_names(info: dict[str, Any]) -> list[Optional[str]]:
    return [t.get("task") for t in info.get("tasks", [])]
