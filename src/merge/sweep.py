"""Hyperparameter sweeps that reuse every piece of hyperparameter-independent work.

Per tensor, ``prepare`` (KnOTS' SVD alignment, CART's centering + SVD) runs once per
distinct value of the method's ``prepare_keys``; global reductions run once per distinct
value of its ``reduction_keys``; only ``merge`` runs per grid point.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from .engine import MergeEngine
from .registry import MergeMethod


def expand_grid(grid: Union[Mapping[str, Sequence], Sequence[Mapping[str, Any]]]) -> list[dict]:
    """``{"lam": [.1, .2], "density": [.2]}`` -> the cartesian product; a list passes through."""
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [dict(point) for point in grid]


class Sweep:
    """Merges one set of task models at many hyperparameter settings.

    >>> sweep = Sweep("knots", tasks, base=None)
    >>> for point, merged in sweep.run({"lam": [.3, .6], "density": [.1, .2]}, fixed={"base_method": "ties"}):
    ...     evaluate(merged)

    ``merged`` maps parameter names to merged weights (``W0 + dW``, in the inputs' dtype),
    or to the merged updates (LoRA factors kept) with ``as_updates=True``. Prepared states
    are held in memory for the whole sweep: for LoRA inputs they are small (rank <= n r).
    """

    def __init__(self, method: Union[str, MergeMethod], tasks: Sequence[Any], base: Any = None,
                 device: str = "cpu", progress: bool = True, ckpt_prefix: str = "", statistics: Any = None):
        self.engine = MergeEngine(method, tasks, base=base, device=device, progress=progress, ckpt_prefix=ckpt_prefix,
                                  statistics=statistics)
        self.method = self.engine.method
        self._states: dict[tuple, dict[str, Any]] = {}
        self._stats: dict[tuple, dict] = {}
        self.prepare_calls = 0  # number of per-tensor prepare calls (what the cache saves)

    def _key(self, params: Any, fields: Optional[Sequence[str]]) -> tuple:
        values = dataclasses.asdict(params)
        names = sorted(values) if fields is None else fields
        return tuple((f, repr(values[f])) for f in names)

    def _prepared(self, params: Any) -> dict[str, Any]:
        key = self._key(params, self.method.prepare_keys)
        if key not in self._states:
            cache: dict[str, Any] = {}
            for _ in self.engine.prepared_states(params, cache)():
                self.prepare_calls += 1
            self._states[key] = {name: self.method.sweep_state(state) for name, state in cache.items()}
        return self._states[key]

    def merge(self, params: Any, as_updates: bool = False) -> dict[str, Any]:
        """The merged model at one setting (``params``: the method's Params or a dict)."""
        if isinstance(params, Mapping):
            params = self.method.make_params(**params)
        self.engine.check_statistics(params)
        states = self._prepared(params)
        skey = self._key(params, self.method.prepare_keys) + self._key(params, self.method.reduction_keys)
        if skey not in self._stats:
            self._stats[skey] = self.engine.reductions(params, lambda: iter(states.items()))
        stats = self._stats[skey]
        merged = {}
        for name in self.engine.names:
            if name in states:
                update = self.method.merge(states[name], params, stats)
                merged[name] = self.engine.finalize(name, update, as_update=as_updates,
                                                    base=getattr(states[name], "base", None))
            elif not as_updates:
                merged[name] = self.engine.passthrough(name)
        return merged

    def run(self, grid, fixed: Optional[Mapping[str, Any]] = None, as_updates: bool = False) -> Iterator[tuple[dict, dict]]:
        """Yield ``(point, merged)`` for every point of ``grid`` (see :func:`expand_grid`)."""
        for point in self.engine.bar(expand_grid(grid), f"{self.method.name}: sweep"):
            params = self.method.make_params(**{**(fixed or {}), **point})
            yield point, self.merge(params, as_updates=as_updates)
