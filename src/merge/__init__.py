"""Merge stage: combine task models finetuned from one base model, without training.

Python API (the CLI ``python -m src.merge`` calls the same :func:`merge`)::

    from src.merge import merge, merge_state_dicts, Sweep
    merge("knots", ["ckpt/cars", "ckpt/dtd"], output="merged/knots",
          params={"base_method": "ties", "lam": 0.6, "density": 0.2})
    merged = merge_state_dicts("ties", [sd1, sd2], base=sd0, lam=1.0, density=0.2)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .engine import MergeEngine, MergeResult
from .errors import MergeInputError
from .registry import MergeMethod, TensorGroup, get_method, list_methods, register
from .sweep import Sweep, expand_grid
from .updates import LowRank

__all__ = [
    "merge", "merge_state_dicts", "Sweep", "expand_grid", "MergeEngine", "MergeResult", "MergeInputError",
    "MergeMethod", "TensorGroup", "LowRank", "get_method", "list_methods", "register",
]


def merge(
    method: Union[str, MergeMethod],
    tasks: Sequence[Any],
    base: Any = None,
    output: Union[str, Path, None] = None,
    params: Optional[Mapping[str, Any]] = None,
    device: str = "cpu",
    save_as: str = "auto",
    progress: bool = True,
    ckpt_prefix: str = "",
    statistics: Any = None,
    **engine_options,
) -> MergeResult:
    """Merge ``tasks`` (paths, state dicts or readers) onto ``base`` with ``method``.

    ``save_as``: ``"auto"`` writes a PEFT adapter when every input is a LoRA adapter and
    the method keeps updates low rank (KnOTS, TA, CART), else safetensors of merged
    weights; ``output=None`` returns the tensors instead of writing them. ``statistics``: the
    data statistics data-dependent methods read (Fisher, RegMean, MaTS): a tag such as
    ``train-n256-seed0`` (each task directory's ``statistics/<tag>/``), or one mapping per task
    of ``kind -> path or {name: tensor}``.
    """
    engine = MergeEngine(method, tasks, base=base, device=device, progress=progress, ckpt_prefix=ckpt_prefix,
                         statistics=statistics)
    return engine.run(dict(params or {}), output=output, save_as=save_as, **engine_options)


def merge_state_dicts(method: str, tasks: Sequence[Mapping], base: Optional[Mapping] = None,
                      save_as: str = "safetensors", statistics: Optional[Sequence[Mapping]] = None, **params) -> dict:
    """In-memory merge of state dicts (or dicts of :class:`LowRank`): returns merged tensors.
    ``statistics``: per task, ``{kind: {name: tensor}}`` for data-dependent methods."""
    return merge(method, tasks, base=base, params=params, save_as=save_as, progress=False,
                 statistics=statistics).tensors
