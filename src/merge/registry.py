"""The merge-method protocol and the registry of methods by name.

A method is a small class with three steps, split so that sweeps and global reductions
can reuse work:

* ``prepare(group, params)`` – hyperparameter-independent work on ONE tensor (KnOTS' SVD
  alignment, CART's centering + SVD). Only the fields named in ``prepare_keys`` may be
  read from ``params``; a sweep computes it once per distinct value of those fields.
* ``reductions(params)`` – global reductions the merge needs first (a global TIES trim
  threshold, the model-wide majority sign). Each is a :class:`~src.merge.reductions.
  GlobalReduction` the engine feeds with every tensor's prepared state.
* ``merge(state, params, stats)`` – the merged *update* of one tensor (dense or
  :class:`~src.merge.updates.LowRank`); the engine adds the base weight.

Adding a method = one file in ``src/merge/methods/`` with a ``@register`` class, its
``Params`` dataclass (documented defaults), a config in ``configs/merge/`` and tests.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from .updates import Update


@dataclass
class TensorGroup:
    """Everything a method sees of one parameter tensor.

    ``base`` is the pretrained tensor ``W0`` (``None`` when no base model was given; the
    updates are then the task weights themselves, i.e. ``W0 = 0``). ``updates`` holds
    one task update per task model, in task order, already in the compute dtype/device.
    """

    name: str
    base: Optional[torch.Tensor]
    updates: list[Update]
    #: data statistics of this tensor per kind (``fisher``, ``gram``, ``kfac_in``, ``kfac_out``;
    #: see ``src/task_statistics.py``), one entry per task in task order, ``None`` for a tensor the
    #: statistics do not cover (e.g. a LayerNorm weight has no Gram matrix). Only the kinds the
    #: method ``requires`` are loaded.
    side: dict[str, list[Optional[torch.Tensor]]] = dataclasses.field(default_factory=dict)

    def covered(self, kind: str) -> bool:
        """Every task has ``kind`` statistics for this tensor."""
        entries = self.side.get(kind)
        return bool(entries) and all(e is not None for e in entries)

    @property
    def shape(self) -> torch.Size:
        u = self.updates[0]
        return u.shape

    @property
    def num_tasks(self) -> int:
        return len(self.updates)

    def weights(self) -> list[torch.Tensor]:
        """Dense task weights ``W_i = W0 + dW_i`` (methods defined on weights: SLERP, MLERP)."""
        from .updates import densify

        dense = [densify(u) for u in self.updates]
        return dense if self.base is None else [self.base + d for d in dense]


# A global statistic: name -> factory(stats computed so far) -> reduction.
ReductionSpec = tuple[str, Callable[[dict], Any]]


class MergeMethod:
    """Base class of every merge method. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    #: ``Params`` dataclass with every hyperparameter and its default.
    Params: ClassVar[type] = None  # type: ignore[assignment]
    #: ``False`` for methods defined without a base model (average, SLERP, MLERP).
    needs_base: ClassVar[bool] = True
    #: ``True`` when the method takes :class:`LowRank` updates as they are (KnOTS, CART);
    #: otherwise the engine densifies each update before ``prepare``.
    accepts_low_rank: ClassVar[bool] = False
    #: Params fields that ``prepare`` depends on (a sweep caches per distinct value).
    prepare_keys: ClassVar[tuple[str, ...]] = ()
    #: Params fields that ``reductions`` depend on (``None``: all of them); a sweep
    #: computes global reductions once per distinct value.
    reduction_keys: ClassVar[Optional[tuple[str, ...]]] = None
    #: Statistics computed only if a merge asks for them (``stats[key]``): TIES' model-wide
    #: majority sign fills only entries whose trimmed values cancel exactly, which almost
    #: never happens, so its pass over the model is usually skipped.
    deferred_reductions: ClassVar[tuple[str, ...]] = ()
    #: Number of task models the method requires (``None``: any number >= 1).
    num_tasks: ClassVar[Optional[int]] = None
    #: ``True`` for linear methods (``merge`` returns ``streaming.linear_combination``): on the
    #: CPU with safetensors inputs the engine streams them chunk by chunk (src/merge/streaming.py).
    streams_linear: ClassVar[bool] = False
    #: Compute in float64 (precision-sensitive SVDs) instead of float32.
    compute_dtype: ClassVar[torch.dtype] = torch.float32
    #: Kinds of data statistics the method may read (``TensorGroup.side``); the engine loads
    #: these for every tensor from each task's statistics (``merge(..., statistics=TAG)``).
    requires: ClassVar[tuple[str, ...]] = ()

    def required_statistics(self, params: Any) -> tuple[str, ...]:
        """The kinds a merge with ``params`` cannot do without (checked before merging)."""
        return self.requires

    def make_params(self, **overrides) -> Any:
        """The method's ``Params`` with ``overrides`` applied; unknown names are an error."""
        fields = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(
                f"method '{self.name}' has no hyperparameter(s) {sorted(unknown)}; "
                f"it takes {sorted(fields)}"
            )
        params = self.Params(**overrides)
        check_params(params, self.name)
        return params

    def prepare(self, group: TensorGroup, params: Any) -> Any:
        return group

    def reductions(self, params: Any) -> list[ReductionSpec]:
        return []

    def sweep_state(self, state: Any) -> Any:
        """The form of a prepared state kept for many merges (a sweep): trade memory for
        speed where ``prepare`` keeps things compact for one merge. Default: as is."""
        return state

    def merge(self, state: Any, params: Any, stats: dict) -> Update:
        raise NotImplementedError


def check_params(params: Any, method: str) -> None:
    """Refuse non-finite numbers (``1e400`` parses to inf, ``nan`` through the API): they
    would produce a model of NaN/inf that looks like any other output."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        for x in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"method '{method}': hyperparameter {f.name}={value!r} is not a finite number")


def describe(cls: type[MergeMethod]) -> dict[str, Any]:
    """One line about a method for ``--list``: what it does, what it needs, its defaults."""
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": cls.name,
        "description": doc[0] if doc else "",
        "needs_base": "yes (LoRA-only: no)" if cls.needs_base else "no",
        "lora": "kept factored" if cls.accepts_low_rank else "densified",
        "tasks": str(cls.num_tasks) if cls.num_tasks else "any",
        "defaults": {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                     for f in dataclasses.fields(cls.Params)},
    }


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty `name`")
    if cls.Params is None or not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__qualname__} must define a dataclass `Params`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"merge method '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> MergeMethod:
    """An instance of the method registered as ``name``."""
    from . import methods  # noqa: F401  (imports every method module, filling the registry)

    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown merge method '{name}'; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> dict[str, type[MergeMethod]]:
    from . import methods  # noqa: F401

    return dict(sorted(_REGISTRY.items()))
