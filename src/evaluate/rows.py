"""Result rows: the one schema every evaluation writes and every report reads.

A row is one number: ``metric`` of ``method`` (at hyperparameters ``params``) on ``task``'s
``split``. Rows are appended to a JSON-lines file as they finish, so a killed run keeps what
it measured and a re-run skips it (:meth:`RowStore.has`, keyed by :func:`row_key`).

Fields (``ROW_FIELDS``):

=============  ==========================================================================
experiment     config name, e.g. ``demo`` or ``knots-vitb32``
method         merge method name (``ties``), or ``finetuned`` / ``zeroshot`` / ``ensemble``
label          display name of the method in tables (``TIES``)
params         the method's full hyperparameters (every field, defaults included)
model          id of the evaluated model: merged-model id, task dir, ...
tasks          the merged task names (sorted)
task           the evaluated task, or ``joint`` for the union-of-labels benchmark
group          ``held_in`` / ``generalization`` (compositional protocols) or ``null``
split          ``val`` or ``test``
metric         ``acc``, ``hits@1``, ``hits@3``, ``hits@5``, ``em_f1``, ``sp_rouge``, ...
value          the number (a fraction: accuracy 0.93, not 93)
n              number of examples it averages over
finetuned      the same metric of that task's own finetuned model on the same split (the
               denominator of normalized accuracy), or ``null``
stage          ``grid`` (a grid point evaluated for selection), ``selected`` (the point chosen
               on validation, evaluated again on test), or ``reference`` (no selection)
selection      for ``selected`` rows: ``{"on": "val", "score": ..., "protocol": ...}``
dataset        for joint rows: the dataset the images come from, or ``union``
wall_s         seconds spent evaluating this (task, split)
time           ISO timestamp when the row was written
=============  ==========================================================================
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

ROW_FIELDS = ("experiment", "method", "label", "params", "model", "tasks", "task", "group", "split", "metric",
              "value", "n", "finetuned", "stage", "selection", "dataset", "wall_s", "time")
#: the fields that say *what* was measured (not its value or when): a row with the same key is the same measurement
KEY_FIELDS = ("experiment", "method", "params", "tasks", "task", "split", "metric", "stage", "dataset")


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value) if abs(value) < 2 ** 53 else value
    return value


def row_key(row: Mapping[str, Any]) -> str:
    """A stable id of what a row measures: method + full params + tasks + task + split + metric (+ stage)."""
    blob = json.dumps({f: _canonical(row.get(f)) for f in KEY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def make_row(**fields: Any) -> dict[str, Any]:
    """A complete row: unknown fields are refused, missing ones are ``None``; ``time`` is filled in."""
    unknown = set(fields) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown row field(s) {sorted(unknown)}; known: {ROW_FIELDS}")
    row = {f: fields.get(f) for f in ROW_FIELDS}
    if row["value"] is not None:
        row["value"] = float(row["value"])
    if row["tasks"] is not None:
        row["tasks"] = sorted(row["tasks"])
    row["time"] = row["time"] or time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def normalized(row: Mapping[str, Any]) -> Optional[float]:
    """``value / finetuned`` (normalized accuracy), ``None`` when the row has no reference."""
    ref = row.get("finetuned")
    if ref is None or row.get("value") is None or not ref or not math.isfinite(ref):
        return None
    return float(row["value"]) / float(ref)


def read_rows(path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # interrupted mid-write: the measurement is redone
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON row") from None
    return rows


class RowStore:
    """Append-only JSON-lines rows with a key index (what a resumed run can skip)."""

    def __init__(self, path):
        self.path = Path(path)
        self._drop_torn_tail()
        self.rows = read_rows(self.path)
        self._keys = {row_key(r): r for r in self.rows}

    def _drop_torn_tail(self) -> None:
        """A killed run's half-written last line is cut off (its measurement is redone); a complete
        last row without its newline gets one, so appended rows start on a line of their own."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            for i, line in enumerate(data[:cut].splitlines()):  # never cut into a file that is not rows
                try:
                    ok = isinstance(json.loads(line), dict) if line.strip() else True
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"{self.path}: line {i + 1} is not a JSON row; not a rows file")
            try:
                json.loads(data[cut:])
            except ValueError:
                f.truncate(cut)
            else:
                f.write(b"\n")

    def has(self, **what: Any) -> bool:
        return row_key(what) in self._keys

    def get(self, **what: Any) -> Optional[dict[str, Any]]:
        return self._keys.get(row_key(what))

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows (flushed and fsynced: a kill loses at most the row being written)."""
        rows = [make_row(**r) if set(r) != set(ROW_FIELDS) else dict(r) for r in rows]
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self.rows.append(row)
            self._keys[row_key(row)] = row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
