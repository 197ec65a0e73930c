"""Permutation specs: which tensor axes each unit permutation of a network acts on.

A network's hidden units can be reordered without changing its function, as long as every
tensor that produces or consumes those units is reordered the same way. A
:class:`PermutationSpec` lists, for one architecture:

* ``perms``: the unit permutations (a residual stream, a block's hidden channels, an
  attention's query/key features...), each with its size and group structure
  (:class:`Perm`: attention heads and GroupNorm groups are permuted as whole groups, and
  within groups);
* ``axes``: for each tensor of the network's state dict (parameters and buffers, named as in
  the task checkpoint), each axis's role: ``(perm, "out")`` when the tensor *produces* the
  perm's units along that axis (a weight's output rows, a bias, a norm's scale, a running mean,
  a position embedding's feature axis), ``(perm, "in")`` when it *consumes* them (a weight's
  input columns), ``None`` when no perm acts on it. Tensors the spec does not name are not
  permuted (they are averaged like any unpermuted axis);
* ``points``: where each perm's units can be observed as activations (a module's output or
  input, and which axis holds the units) for activation matching.

The spec is all an architecture needs: statistics, solvers and merging read nothing else
(``src/permute/specs.py`` holds the ones this project ships). The merge of ``M`` models given,
per perm ``p`` and model ``i``, a merge matrix ``M_p,i`` (``k x d``: merged unit = weighted
sum of model units) and an unmerge matrix ``U_p,i`` (``d x k``: model unit ~ merged units) is,
for every tensor, ``sum_i W_i`` with ``M_p,i`` applied along each "out" axis and ``U_p,i^T``
along each "in" axis (``src/permute/merge.py``); a permutation is the case ``M = P / M``,
``U = P^T``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

import torch

Role = Literal["out", "in"]
Axis = Optional[tuple[str, Role]]


@dataclass(frozen=True)
class Perm:
    """One unit permutation.

    Args:
        size: number of units.
        group_size: units per group; whole groups move together (and units move within
            their group). 1: no group structure.
        tie: perms with the same ``tie`` share one group order (the query/key and the
            value/output features of one attention: head ``h`` must stay head ``h`` for both).
    """

    size: int
    group_size: int = 1
    tie: Optional[str] = None

    @property
    def groups(self) -> int:
        return self.size // self.group_size


@dataclass(frozen=True)
class Point:
    """Where a perm's units are observed: ``module``'s output (or its first positional input,
    ``io="input"``), with the units along ``unit_axis`` (1 for NCHW maps, -1 for tokens)."""

    module: str
    io: Literal["output", "input"] = "output"
    unit_axis: int = -1


def out(perm: str) -> tuple[str, Role]:
    return (perm, "out")


def inp(perm: str) -> tuple[str, Role]:
    return (perm, "in")


@dataclass
class PermutationSpec:
    perms: dict[str, Perm]
    axes: dict[str, tuple[Axis, ...]]
    points: dict[str, list[Point]] = field(default_factory=dict)

    def __post_init__(self):
        for name, axes in self.axes.items():
            for axis in axes:
                if axis is not None and axis[0] not in self.perms:
                    raise ValueError(f"spec: tensor {name!r} names an unknown perm {axis[0]!r}")
                if axis is not None and axis[1] not in ("out", "in"):
                    raise ValueError(f"spec: tensor {name!r}: role must be 'out' or 'in', got {axis[1]!r}")
        for name, perm in self.perms.items():
            if perm.size % perm.group_size:
                raise ValueError(f"spec: perm {name!r} of {perm.size} units is not a whole number of "
                                 f"groups of {perm.group_size}")
        for name in self.points:
            if name not in self.perms:
                raise ValueError(f"spec: activation points for an unknown perm {name!r}")

    def tied(self) -> list[list[str]]:
        """The perms solved together: each tie's perms, and every untied perm alone, in spec order."""
        units: dict[str, list[str]] = {}
        for name, perm in self.perms.items():
            units.setdefault(perm.tie or f"\0{name}", []).append(name)
        for members in units.values():
            sizes = {(self.perms[m].groups, self.perms[m].group_size > 1) for m in members}
            if len(sizes) > 1:
                raise ValueError(f"spec: tied perms {members} have different group counts")
        return list(units.values())

    def tensors_of(self, perm: str) -> list[tuple[str, int, Role]]:
        """``(tensor, axis, role)`` for every axis ``perm`` acts on."""
        return [(name, a, axis[1]) for name, axes in self.axes.items()
                for a, axis in enumerate(axes) if axis is not None and axis[0] == perm]

    def check(self, state: Mapping[str, torch.Tensor], where: str = "<model>") -> None:
        """Every tensor the spec names exists with the sizes its perms say."""
        for name, axes in self.axes.items():
            if name not in state:
                raise ValueError(f"{where}: tensor {name!r} of the permutation spec is missing")
            t = state[name]
            if t.dim() != len(axes):
                raise ValueError(f"{where}: tensor {name!r} has {t.dim()} axes, the spec gives {len(axes)}")
            for a, axis in enumerate(axes):
                if axis is not None and t.shape[a] != self.perms[axis[0]].size:
                    raise ValueError(f"{where}: tensor {name!r} axis {a} has {t.shape[a]} units, perm "
                                     f"{axis[0]!r} has {self.perms[axis[0]].size}")


def permute_state(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                  state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its units reordered: new unit ``m`` of perm ``p`` is old unit ``perms[p][m]``
    (along "out" and "in" axes alike). Perms not in ``perms`` stay as they are."""
    result = dict(state)
    for name, axes in spec.axes.items():
        t = state[name]
        for a, axis in enumerate(axes):
            if axis is not None and axis[0] in perms:
                t = t.index_select(a, perms[axis[0]].to(t.device))
        result[name] = t
    return result


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random permutation per perm that respects groups and ties (whole groups move, units
    move within groups, tied perms share their group order)."""
    result: dict[str, torch.Tensor] = {}
    for members in spec.tied():
        first = spec.perms[members[0]]
        group_order = torch.randperm(first.groups, generator=generator)
        for name in members:
            perm = spec.perms[name]
            within = [torch.randperm(perm.group_size, generator=generator) for _ in range(perm.groups)]
            result[name] = torch.cat([int(g) * perm.group_size + within[int(g)] for g in group_order])
    return result
