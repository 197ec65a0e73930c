"""Data statistics of a task model: what ``src.statistics`` writes and data-dependent merges read.

Layout, inside the task-checkpoint directory (so they travel with the model they describe)::

    <task_dir>/statistics/<tag>/statistics.json      what was collected: kinds, split, n, seed, counts
    <task_dir>/statistics/<tag>/<kind>.safetensors   one tensor per parameter, keyed by the base
                                                     model's parameter name (as merges name them)

``tag`` = ``<split>-n<N>-seed<seed>`` (:func:`statistics_tag`): statistics of the same model on
the same data and number of examples are computed once and reused by every merge. Kinds:

============  ======================================  =========================================
kind          tensor per parameter ``W`` (out, in)     used by
============  ======================================  =========================================
``fisher``    diagonal empirical Fisher, ``W``'s       ``fisher``, MaTS' diagonal variant
              shape: mean over examples of squared
              per-example gradients of the gold
              label's log-likelihood
``gram``      ``(in, in)`` Gram matrix of the layer's  ``regmean``, MaTS' RegMean subspace
              inputs, summed over tokens, averaged
              over examples
``kfac_in``   ``(in, in)`` K-FAC input factor          ``mats`` (K-FAC Fisher ``G ⊗ A``)
              ``A = E[x x^T]``
``kfac_out``  ``(out, out)`` K-FAC output-gradient     ``mats``
              factor ``G = E[g g^T]``
============  ======================================  =========================================
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

STATISTICS_DIR = "statistics"
STATISTICS_JSON = "statistics.json"
KINDS = ("fisher", "gram", "kfac_in", "kfac_out")


class StatisticsError(ValueError):
    """Statistics a merge needs are missing or do not fit (one line, naming the file or task)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


def statistics_tag(split: str = "train", n: int = 256, seed: int = 0) -> str:
    """The directory name of statistics on ``n`` examples of ``split`` drawn with ``seed``."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"statistics split must be train, val or test, got {split!r}")
    if int(n) <= 0:
        raise ValueError(f"statistics need a positive number of examples, got n={n}")
    return f"{split}-n{int(n)}-seed{int(seed)}"


def statistics_dir(task_dir, tag: str) -> Path:
    return Path(task_dir) / STATISTICS_DIR / tag


def kind_path(task_dir, tag: str, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown statistics kind {kind!r}; known: {KINDS}")
    return statistics_dir(task_dir, tag) / f"{kind}.safetensors"


def read_statistics_info(task_dir, tag: str) -> Optional[dict[str, Any]]:
    """``statistics.json`` of ``tag`` (``None`` when those statistics were never collected)."""
    path = statistics_dir(task_dir, tag) / STATISTICS_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StatisticsError(path, f"unreadable: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("kinds"), dict):
        raise StatisticsError(path, "must be a JSON object with 'kinds'")
    return info


def available_kinds(task_dir, tag: str) -> list[str]:
    info = read_statistics_info(task_dir, tag)
    if info is None:
        return []
    return [k for k in info["kinds"] if kind_path(task_dir, tag, k).is_file()]
