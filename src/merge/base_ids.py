"""Which base model a task model says it was finetuned from, and where that model is locally.

A task checkpoint records it in ``task.json`` (``base_model``); a plain PEFT adapter in
``adapter_config.json`` (``base_model_name_or_path``). Merging task models that name
different bases is refused; when no ``--base`` is given, the recorded id is looked up
offline (a local directory, the Hugging Face cache, or a model shipped in a Python package).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..pretrained import local_model_dir

_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)(?:/snapshots/[^/]+)?/?$")


def declared_base(reader) -> Optional[str]:
    """The base-model id a task reader records, or ``None`` when it records none."""
    info = getattr(reader, "task_info", None)
    if info is not None:
        aligned = getattr(info, "aligned_to", None)
        if aligned and aligned.get("frame"):  # permuted into a reference model's units (src/permute)
            return f"aligned-to:{aligned['frame']}"
        return str(info.base_model) or None
    config = getattr(reader, "config", None)
    if isinstance(config, dict):
        value = config.get("base_model_name_or_path")
        return str(value) if value else None
    return None


def canonical_base(model_id: str) -> str:
    """A comparable form: hub ids as ``org/name``, local paths resolved.

    A path inside the Hugging Face cache (``.../models--org--name/snapshots/<rev>``) is the
    hub id it caches, so an adapter saved from a cached model matches its hub id.
    """
    text = str(model_id).strip().rstrip("/")
    m = _CACHE_DIR.search(text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if os.path.isabs(text) or text.startswith("."):
        return os.path.realpath(text)
    return text


def resolve_base(model_id: str) -> Optional[Path]:
    """A local directory holding the model ``model_id``, found without the network, or ``None``."""
    return local_model_dir(model_id)
