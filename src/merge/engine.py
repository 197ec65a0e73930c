"""The streaming merge engine: one tensor at a time, from every input, to the output.

The engine owns I/O, validation, dtypes, devices and memory; methods only see one
:class:`TensorGroup`. Peak memory is a few tensors per input (plus the output writer's
shard buffer), never N whole models. Global statistics take extra passes over the inputs
(re-read from disk for dense inputs, kept in memory when the prepared states are small).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..safe_output import MERGE_MARKER, OutputError, atomic_directory, check_free_space, check_output
from .errors import MergeInputError
from .memory import peak_rss_bytes, return_freed_memory_to_os, rss_bytes
from .registry import MergeMethod, TensorGroup, get_method
from .sources import PeftAdapterReader, align_names, open_base, open_task
from .statistics import LazyStatistics
from .updates import LowRank, Update, densify
from .writers import DEFAULT_SHARD_BYTES, PeftAdapterWriter, ShardedSafetensorsWriter

SAVE_AS = ("auto", "safetensors", "adapter")


@dataclass
class MergeResult:
    """What a merge produced: ``tensors`` (in-memory merges) or files under ``output``."""

    info: dict
    output: Optional[Path] = None
    tensors: Optional[dict[str, Any]] = None


class _MemoryMeter:
    """RSS at the start and the process high-water mark (exact, not sampled)."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, rss_bytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def report(self) -> dict:
        out = {"rss_at_start_bytes": self.start, "peak_rss_bytes": peak_rss_bytes()}
        if self.device.type == "cuda":
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


class MergeEngine:
    """Opens and validates the inputs of one merge; streams prepared tensor groups.

    ``tasks``: paths (PEFT adapter dirs, task dirs, safetensors, index.json, .ckpt), state
    dicts, or readers. ``base``: the same, or ``None`` (LoRA-only merges then produce the
    merged update; full-weight merges then treat the task weights as updates of zero).
    """

    def __init__(
        self,
        method: Union[str, MergeMethod],
        tasks: Sequence[Any],
        base: Any = None,
        device: Union[str, torch.device] = "cpu",
        progress: bool = True,
        ckpt_prefix: str = "",
    ):
        self.method = get_method(method) if isinstance(method, str) else method
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no GPU is available")
        self.progress = progress
        return_freed_memory_to_os()
        if not tasks:
            raise ValueError("a merge needs at least one task model")
        need = self.method.num_tasks
        if need is not None and len(tasks) != need:
            raise ValueError(f"method '{self.method.name}' merges exactly {need} task models, got {len(tasks)}")
        self.tasks = [open_task(t, ckpt_prefix=ckpt_prefix) for t in tasks]
        self.base = open_base(base)
        self.all_lora = all(t.kind == "lora" for t in self.tasks)
        if self.base is None and self.method.needs_base and not self.all_lora:
            raise ValueError(
                f"method '{self.method.name}' combines task updates (W_i - W0) and needs a base model; "
                "pass base=... (only LoRA-only merges may omit it: they output the merged update)"
            )
        self._validate()
        # W0 enters a group only to turn full weights into updates, or for methods defined on
        # weights (SLERP, MLERP); LoRA merges of low-rank methods never read it (adapter output)
        # or read it once, when writing W0 + dW.
        self.group_needs_base = not self.all_lora or not self.method.accepts_low_rank

    # ----- validation -----------------------------------------------------------------
    def _validate(self) -> None:
        first = self.tasks[0]
        named = [(t, t.task_info.base_model) for t in self.tasks if getattr(t, "task_info", None)]
        if len({b for _, b in named}) > 1:
            offender = next(t for t, b in named if b != named[0][1])
            raise MergeInputError(offender.path, f"was finetuned from another base model than {named[0][0].path} "
                                  f"({sorted({b for _, b in named})})")
        base_keys = set(self.base.keys()) if self.base is not None else None
        self._names: list[dict[str, str]] = []  # per task: merged name -> reader key
        for t in self.tasks:
            mapping = align_names(t, base_keys) if base_keys is not None else {k: k for k in t.keys()}
            self._names.append({v: k for k, v in mapping.items()})
        ref = self._names[0]
        for t, names in zip(self.tasks[1:], self._names[1:]):
            if names.keys() != ref.keys():
                extra = sorted(set(names) - set(ref))[:3]
                missing = sorted(set(ref) - set(names))[:3]
                what = "targets different modules than" if isinstance(t, PeftAdapterReader) else "has different parameters than"
                raise MergeInputError(t.path, f"{what} {first.path}: extra {extra}, missing {missing}")
        self.names = [n for n in (self.base.keys() if self.base is not None else ref) if n in ref]
        for name in self.names:
            shapes = [(t, t.shape(m[name])) for t, m in zip(self.tasks, self._names)]
            expected = self.base.shape(name) if self.base is not None else shapes[0][1]
            where = self.base.path if self.base is not None else first.path
            for t, shape in shapes:
                if tuple(shape) != tuple(expected):
                    raise MergeInputError(t.path, f"tensor '{name}' has shape {tuple(shape)}, expected {tuple(expected)} as in {where}")

    # ----- loading ----------------------------------------------------------------------
    def out_dtype(self, name: str) -> torch.dtype:
        if self.base is not None:
            return self.base.dtype(name)
        return self.tasks[0].dtype(self._names[0][name])

    def shape(self, name: str) -> torch.Size:
        if self.base is not None:
            return self.base.shape(name)
        return self.tasks[0].shape(self._names[0][name])

    def is_mergeable(self, name: str) -> bool:
        return self.out_dtype(name).is_floating_point

    def _check_finite(self, tensor: torch.Tensor, path, name: str) -> None:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MergeInputError(path, f"tensor '{name}' contains NaN or inf")

    def group(self, name: str) -> TensorGroup:
        """Load one parameter from every input, as task updates in the compute dtype/device."""
        dtype, dev = self.method.compute_dtype, self.device
        base = None
        if self.base is not None and self.group_needs_base:
            base = self.base.load(name)
            self._check_finite(base, self.base.path, name)
            base = base.to(device=dev, dtype=dtype)
        updates: list[Update] = []
        for t, names in zip(self.tasks, self._names):
            raw = t.load(names[name])
            if isinstance(raw, LowRank):
                self._check_finite(raw.B, t.path, name)
                self._check_finite(raw.A, t.path, name)
                u: Update = raw.to(device=dev, dtype=dtype)
            else:
                self._check_finite(raw, t.path, name)
                u = raw.to(device=dev, dtype=dtype)
                if base is not None:
                    u = u - base
            if isinstance(u, LowRank) and not self.method.accepts_low_rank:
                u = u.dense()
            updates.append(u)
        if any(isinstance(u, LowRank) for u in updates) and not all(isinstance(u, LowRank) for u in updates):
            updates = [densify(u) for u in updates]  # mixed LoRA and full inputs: dense route
        return TensorGroup(name=name, base=base, updates=updates)

    def passthrough(self, name: str) -> torch.Tensor:
        """A non-float tensor (integer buffers): copied from the base or the first task."""
        src = self.base if self.base is not None else self.tasks[0]
        key = name if self.base is not None else self._names[0][name]
        return src.load(key)

    def bar(self, iterable, desc: str, total: Optional[int] = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)

    # ----- merging ----------------------------------------------------------------------
    def prepared_states(self, params: Any, cache: Optional[dict] = None) -> Callable[[], Iterator[tuple[str, Any]]]:
        """A re-iterable of ``(name, prepared state)``; memoized in ``cache`` when given."""

        def items():
            for name in self.bar([n for n in self.names if self.is_mergeable(n)], f"{self.method.name}: statistics"):
                if cache is not None and name in cache:
                    yield name, cache[name]
                    continue
                state = self.method.prepare(self.group(name), params)
                if cache is not None:
                    cache[name] = state
                yield name, state

        return items

    def statistics(self, params: Any, states: Callable[[], Iterator[tuple[str, Any]]]) -> LazyStatistics:
        """The method's global statistics: computed now, or on first use if deferred."""
        stats = LazyStatistics(self.method.reductions(params), states)
        for key in stats:
            if key not in self.method.deferred_statistics:
                stats[key]
        return stats

    def finalize(self, name: str, update: Update, as_update: bool, base: Optional[torch.Tensor] = None):
        """The merged tensor to emit: the update itself, or ``W0 + dW`` in the output dtype.

        ``base``: ``W0`` when the caller already loaded it (else it is read here, once).
        """
        if as_update:
            return update
        dense = densify(update)
        if base is None and self.base is not None:
            base = self.base.load(name)
        merged = dense if base is None else base.to(device=dense.device, dtype=dense.dtype) + dense
        return merged.to(self.out_dtype(name))

    def resolve_save_as(self, save_as: str) -> str:
        if save_as not in SAVE_AS:
            raise ValueError(f"save_as must be one of {SAVE_AS}, got {save_as!r}")
        if save_as == "auto":
            return "adapter" if self.all_lora and self.method.accepts_low_rank else "safetensors"
        if save_as == "adapter" and not self.all_lora:
            raise ValueError("save_as='adapter' needs every task model to be a LoRA adapter")
        return save_as

    def run(
        self,
        params: Any = None,
        output: Union[str, Path, None] = None,
        save_as: str = "auto",
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        cache_states: Optional[bool] = None,
    ) -> MergeResult:
        """Merge once. With ``output`` the result is written atomically, else returned."""
        params = params if params is not None and not isinstance(params, dict) else self.method.make_params(**(params or {}))
        mode = self.resolve_save_as(save_as)
        start, meter = time.perf_counter(), _MemoryMeter(self.device)
        if cache_states is None:  # keep states when they are small: LoRA factors or in-memory inputs
            cache_states = self.all_lora or all(getattr(t, "in_memory", False) for t in self.tasks)
        cache: Optional[dict] = {} if cache_states and self.method.reductions(params) else None
        stats = self.statistics(params, self.prepared_states(params, cache))

        def produce(sink: Callable[[str, Any], None]) -> None:
            for name in self.bar(self.names, f"{self.method.name}: merge"):
                if not self.is_mergeable(name):
                    if mode == "safetensors":
                        sink(name, self.passthrough(name))
                    continue
                if cache is not None and name in cache:
                    state, base = cache.pop(name), None
                else:
                    group = self.group(name)
                    state, base = self.method.prepare(group, params), group.base
                update = self.method.merge(state, params, stats)
                if mode == "adapter" and not isinstance(update, LowRank):
                    raise ValueError(
                        f"method '{self.method.name}' returned a dense update for '{name}', which a LoRA adapter "
                        "cannot hold; use save_as='safetensors'"
                    )
                sink(name, self.finalize(name, update, as_update=(mode == "adapter"), base=base))
        
        info = {
            "method": self.method.name,
            "params": asdict(params),
            "base": None if self.base is None else str(self.base.path),
            "tasks": [str(t.path) for t in self.tasks],
            "save_as": mode,
            "device": str(self.device),
            "num_tensors": len(self.names),
            "torch": torch.__version__,
            "host": platform.node(),
        }
        if output is None:
            tensors: dict[str, Any] = {}
            produce(tensors.__setitem__)
            info.update(wall_time_s=time.perf_counter() - start, **meter.report())
            return MergeResult(info=info, tensors=tensors)

        output = Path(output)
        with atomic_directory(output) as tmp:
            if mode == "adapter":
                template = getattr(self.tasks[0], "config", None)
                writer = PeftAdapterWriter(tmp, template)
                produce(lambda n, u: writer.add(n, u, self.out_dtype(n)))
            else:
                layout = [(n, tuple(self.shape(n)), self.out_dtype(n)) for n in self.names]
                writer = ShardedSafetensorsWriter(tmp, layout, max_shard_bytes, {"format": "pt", "method": self.method.name})
                produce(writer.add)
            writer.close()
            info.update(wall_time_s=time.perf_counter() - start, **meter.report())
            (tmp / "merge.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        return MergeResult(info=info, output=output)
