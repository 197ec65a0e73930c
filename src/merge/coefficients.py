"""Per-task and per-parameter merge coefficients: ``weights`` and coefficient tables.

Task Arithmetic, TIES, DARE and CART take two optional hyperparameters:

* ``weights``: one multiplier per task model, in merge order (``[w_1, ..., w_T]``).
* ``coefficients``: the path of a :class:`CoefficientTable` (JSON), one multiplier per task
  for every parameter tensor (a learned AdaMerging result, ``src/evaluate/adamerging.py``).

The coefficient of task ``i`` for tensor ``name`` is ``w_i * c_i(name)`` (either factor 1 when
absent); how it enters each method is in the method's docstring and docs/algorithms.md
(AdaMerging). Without either (the defaults) every method computes exactly what it did before.

Table format (JSON)::

    {"format": "merge-coefficients", "version": 1,
     "tasks": ["cars", "dtd", "eurosat"],          # task names (or paths), in merge order
     "default": [0.3, 0.3, 0.3],                  # tensors not listed in "params"
     "params": {"vision.encoder.layers.0.q_proj.weight": [0.41, 0.27, 0.35], ...},
     "meta": {...}}                               # provenance (free-form, optional)

Task-wise tables have ``default`` only; layer-wise tables list every tensor with coefficients.
Numbers are stored with Python's shortest round-trip repr, so a float32 coefficient reloads as
exactly the same value.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

TABLE_FORMAT = "merge-coefficients"
TABLE_VERSION = 1

#: Per-task coefficients as a method receives them: Python floats (a merge), or a 1-D tensor /
#: 0-d tensors (AdaMerging's differentiable coefficients).
Coefs = Union[Sequence[float], Sequence[torch.Tensor], torch.Tensor]


class CoefficientTableError(ValueError):
    """A coefficient table that cannot be used (one line, naming the file)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


def _numbers(values: Any, where: str, what: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or not values:
        raise CoefficientTableError(where, f"{what} must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise CoefficientTableError(where, f"{what} holds {v!r}, not a finite number")
        out.append(float(v))
    return out


@dataclass
class CoefficientTable:
    """Merge coefficients: tasks x parameter groups (see the module docstring).

    Args:
        tasks: task names (or paths) in merge order; ``len(tasks)`` coefficients per entry.
        default: per-task coefficients of every tensor ``params`` does not list.
        params: parameter name -> per-task coefficients (layer-wise).
        meta: provenance (method, kind, steps, ...); not read by merges.
    """

    tasks: list[str]
    default: list[float]
    params: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate("<coefficient table>")

    def validate(self, where: str) -> None:
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise CoefficientTableError(where, "'tasks' must be a non-empty list of task names")
        self.tasks = [str(t) for t in self.tasks]
        n = len(self.tasks)
        self.default = _numbers(self.default, where, "'default'")
        if len(self.default) != n:
            raise CoefficientTableError(where, f"'default' has {len(self.default)} coefficients for {n} tasks")
        if not isinstance(self.params, dict):
            raise CoefficientTableError(where, "'params' must map parameter names to per-task coefficient lists")
        checked = {}
        for name, values in self.params.items():
            values = _numbers(values, where, f"params[{name!r}]")
            if len(values) != n:
                raise CoefficientTableError(where, f"params[{name!r}] has {len(values)} coefficients for {n} tasks")
            checked[str(name)] = values
        self.params = checked

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def layer_wise(self) -> bool:
        return bool(self.params)

    def for_param(self, name: str) -> list[float]:
        """The per-task coefficients of tensor ``name`` (``default`` when not listed)."""
        return list(self.params.get(name, self.default))

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "tasks": list(self.tasks),
                "default": list(self.default), "params": {k: list(v) for k, v in self.params.items()},
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "<coefficient table>") -> "CoefficientTable":
        if not isinstance(data, dict):
            raise CoefficientTableError(where, "a coefficient table is a JSON object with 'tasks', 'default', 'params'")
        if data.get("format", TABLE_FORMAT) != TABLE_FORMAT:
            raise CoefficientTableError(where, f"format is {data.get('format')!r}, not {TABLE_FORMAT!r}")
        missing = [k for k in ("tasks", "default") if k not in data]
        if missing:
            raise CoefficientTableError(where, f"missing {', '.join(repr(k) for k in missing)}")
        table = cls.__new__(cls)
        table.tasks, table.default = data["tasks"], data["default"]
        table.params, table.meta = data.get("params") or {}, dict(data.get("meta") or {})
        table.validate(where)
        return table

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CoefficientTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CoefficientTableError(path, "coefficient table does not exist") from None
        except OSError as e:
            raise CoefficientTableError(path, f"cannot read the coefficient table ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise CoefficientTableError(path, f"not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_dict(data, str(path))

    def save(self, path: Union[str, Path]) -> Path:
        """Write the table as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


# ----- the two hyperparameters of the methods -------------------------------------------
_CACHE: dict[tuple, CoefficientTable] = {}


def load_table(path: Union[str, Path]) -> CoefficientTable:
    """The table at ``path``, read once per file version (a merge asks for it per tensor)."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    table = CoefficientTable.load(p)
    if key is not None:
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = table
    return table


def check_coefficient_params(method: str, params: Any) -> None:
    """Validate ``weights`` and ``coefficients`` of a method's Params (called in ``__post_init__``).

    ``weights``' length is checked against the number of task models when merging (the Params
    do not know it), as is the table's.
    """
    weights = params.weights
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not len(weights):
            raise ValueError(f"{method}: weights must be a non-empty list of numbers (one per task model), got {weights!r}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError(f"{method}: weights must be numbers, got {w!r}")
        params.weights = [float(w) for w in weights]
    if params.coefficients is not None:
        if not isinstance(params.coefficients, (str, Path)):
            raise ValueError(f"{method}: coefficients is the path of a coefficient table (JSON), got "
                             f"{params.coefficients!r}")
        params.coefficients = str(params.coefficients)
        try:
            load_table(params.coefficients)
        except CoefficientTableError as e:
            raise ValueError(f"{method}: coefficients: {e}") from None


def task_coefficients(params: Any, name: str, num_tasks: int, method: str) -> Optional[list[float]]:
    """``[w_i * c_i(name)]`` for tensor ``name``, or ``None`` when neither ``weights`` nor a
    table is given (the method's default path). Lengths are checked against ``num_tasks``."""
    weights, path = params.weights, params.coefficients
    if weights is None and path is None:
        return None
    if weights is not None and len(weights) != num_tasks:
        raise ValueError(f"{method}: weights has {len(weights)} entries, the merge has {num_tasks} task models")
    coefs = None
    if path is not None:
        table = load_table(path)
        if table.num_tasks != num_tasks:
            raise ValueError(f"{method}: coefficient table {path} is for {table.num_tasks} tasks "
                             f"({', '.join(table.tasks)}), the merge has {num_tasks} task models")
        coefs = table.for_param(name)
    if weights is None:
        return coefs
    if coefs is None:
        return list(weights)
    return [w * c for w, c in zip(weights, coefs)]


def all_ones(coefs: Optional[Coefs]) -> bool:
    """No coefficients, or every one exactly 1 (Python floats): the method's default path applies."""
    if coefs is None:
        return True
    if isinstance(coefs, torch.Tensor):
        return False
    return all(not isinstance(c, torch.Tensor) and c == 1.0 for c in coefs)


def weighted_combination(vectors: torch.Tensor, coefs: Coefs) -> torch.Tensor:
    """``sum_i coefs[i] * vectors[i]`` over the first dimension, added in task order
    (``((c_1 v_1 + c_2 v_2) + c_3 v_3) ...``): the one definition that merges and AdaMerging
    share, so that both round alike. ``coefs``: floats, 0-d tensors or a 1-D tensor."""
    total = None
    for i in range(vectors.shape[0]):
        term = vectors[i] * coefs[i]
        total = term if total is None else total + term
    return total


__all__ = ["CoefficientTable", "CoefficientTableError", "load_table", "check_coefficient_params",
           "task_coefficients", "weighted_combination", "all_ones"]
