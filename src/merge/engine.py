"""The streaming merge engine: one tensor at a time, from every input, to the output.

The engine owns I/O, validation, dtypes, devices and memory; methods only see one
:class:`TensorGroup`. Peak memory is a few tensors per input (plus the output writer's
shard buffer), never N whole models. global reductions take extra passes over the inputs
(re-read from disk for dense inputs, kept in memory when the prepared states are small).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..merged_output import MERGE_FORMAT_VERSION, describe_input
from ..safe_output import (MERGE_MARKER, atomic_directory, check_free_space, check_output, clean_debris,
                           note, output_identity)
from .errors import MergeInputError
from .memory import peak_rss_bytes, return_freed_memory_to_os, rss_bytes
from .model_files import copy_model_files, write_model_card
from .registry import MergeMethod, TensorGroup, check_params, get_method
from .base_ids import canonical_base, declared_base, resolve_base
from .sources import PeftAdapterReader, SafetensorsReader, StateDictReader, align_names, open_base, open_task
from .reductions import LazyReductions
from .streaming import StreamedSum, StreamedTensor
from .updates import LowRank, Update, densify
from .writers import DEFAULT_SHARD_BYTES, PeftAdapterWriter, ShardedSafetensorsWriter, _nbytes

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


def open_statistics(method: MergeMethod, tasks: Sequence[Any], specs: Sequence[Any], statistics: Any):
    """Per task, ``kind -> reader`` of its data statistics (``None`` without statistics).

    ``statistics``: a tag (``train-n256-seed0``: each task's ``<task_dir>/statistics/<tag>/``,
    see ``src/task_statistics.py``), or one mapping per task of ``kind -> path | {name: tensor}``.
    Only the kinds the method ``requires`` are opened.
    """
    from ..task_statistics import KINDS, kind_path, statistics_dir

    if statistics is None or not method.requires:
        return None
    if isinstance(statistics, (str, Path)):
        tag, out = str(statistics), []
        for t in tasks:
            task_dir = getattr(t, "task_dir", None)
            if task_dir is None:
                raise MergeInputError(t.path, f"statistics '{tag}' are looked up in task-checkpoint directories; "
                                              "this input is not one (pass statistics per task instead)")
            readers = {k: SafetensorsReader(kind_path(task_dir, tag, k)) for k in method.requires
                       if kind_path(task_dir, tag, k).is_file()}
            if not readers and not statistics_dir(task_dir, tag).is_dir():
                raise MergeInputError(task_dir, f"has no statistics '{tag}' (compute them with `python -m src.statistics`)")
            out.append(readers)
        return out
    if len(statistics) != len(tasks):
        raise ValueError(f"statistics: one entry per task model expected, got {len(statistics)} for {len(tasks)}")
    out = []
    for t, entry in zip(tasks, statistics):
        readers = {}
        for kind, source in dict(entry or {}).items():
            if kind not in KINDS:
                raise ValueError(f"statistics: unknown kind {kind!r}; known: {KINDS}")
            if kind in method.requires:
                readers[kind] = (SafetensorsReader(source) if isinstance(source, (str, Path))
                                 else StateDictReader(source, f"<{kind} statistics>", kind="full"))
        out.append(readers)
    return out


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/inf in ``tensor`` (non-float tensors trivially). The sum is NaN or inf whenever
    an entry is (or when it overflows): only then is every entry tested. One read of the
    tensor instead of isfinite's passes and mask (bf16, 65M entries: 10 ms instead of 860 ms)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _refuse_duplicates(tasks: Sequence[Any]) -> None:
    """The same task model twice silently doubles its weight in every method: refuse it."""
    seen: dict[str, Any] = {}
    for spec in tasks:
        if not isinstance(spec, (str, Path)):
            continue
        key = os.path.realpath(str(spec))
        if key in seen:
            raise MergeInputError(spec, f"is given twice as a task model (also as {seen[key]}); "
                                  "each task model may appear once")
        seen[key] = spec


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
        statistics: Any = None,
    ):
        self.method = get_method(method) if isinstance(method, str) else method
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"invalid device {device!r} ({e}); use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no GPU is available")
        if self.device.type == "cuda" and self.device.index is not None and self.device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) are visible")
        self.progress = progress
        return_freed_memory_to_os()
        if not tasks:
            raise ValueError("a merge needs at least one task model")
        need = self.method.num_tasks
        if need is not None and len(tasks) != need:
            raise ValueError(f"method '{self.method.name}' merges exactly {need} task models, got {len(tasks)}")
        _refuse_duplicates(tasks)
        self.task_specs = list(tasks)
        self.tasks = [open_task(t, ckpt_prefix=ckpt_prefix) for t in tasks]
        self.declared_base = self._common_declared_base()
        self.base_note: Optional[str] = None
        if isinstance(base, str) and base and not os.path.exists(base):  # a hub id: the local cache
            if self.declared_base is not None and canonical_base(base) != canonical_base(self.declared_base):
                raise MergeInputError(base, f"is not the base model the task models record ({self.declared_base!r})")
            local = resolve_base(base)
            if local is None:
                raise MergeInputError(base, "is neither a file or directory nor a model in the local Hugging Face cache")
            self.base_note = f"base model {base} found at {local}"
            base = str(local)
        elif base is None and self.declared_base is not None:
            local = resolve_base(self.declared_base)
            if local is not None:
                base = local
                self.base_note = f"base model {self.declared_base} (recorded by the task models) found at {local}"
        self.base_spec = base
        self.base = open_base(base)
        self.all_lora = all(t.kind == "lora" for t in self.tasks)
        if self.base is None and self.method.needs_base and not self.all_lora:
            hint = (f" (the task models record {self.declared_base!r}, which is not available offline)"
                    if self.declared_base else "")
            raise ValueError(
                f"method '{self.method.name}' combines task updates (W_i - W0) and needs a base model{hint}; "
                "pass base=... / --base PATH (only LoRA-only merges may omit it: they output the merged update)"
            )
        self._validate(ckpt_prefix)
        self.side = open_statistics(self.method, self.tasks, self.task_specs, statistics)
        self.side_kinds = tuple(self.method.requires)  # narrowed to what the params need (check_statistics)
        self.statistics_spec = statistics if isinstance(statistics, (str, Path)) or statistics is None else "<per task>"
        # W0 enters a group only to turn full weights into updates, or for methods defined on
        # weights (SLERP, MLERP); LoRA merges of low-rank methods never read it (adapter output)
        # or read it once, when writing W0 + dW.
        self.group_needs_base = not self.all_lora or not self.method.accepts_low_rank

    def _common_declared_base(self) -> Optional[str]:
        """The one base id the task models record; refuses task models naming different ones."""
        declared = [(t, declared_base(t)) for t in self.tasks]
        declared = [(t, b) for t, b in declared if b]
        if not declared:
            return None
        first, first_id = declared[0]
        for t, b in declared[1:]:
            if canonical_base(b) != canonical_base(first_id):
                hint = ""
                if b.split("#init-")[0] == first_id.split("#init-")[0]:
                    hint = ("; these are one architecture trained from different initializations: their units are "
                            "not aligned, so align them first (python -m src.permute --tasks [...] --output DIR "
                            "--methods [git_rebasin] writes aligned task models under DIR/git_rebasin/aligned/)")
                raise MergeInputError(t.path, f"was finetuned from another base model ({b!r}) than "
                                      f"{first.path} ({first_id!r}){hint}")
        return first_id

    # ----- validation -----------------------------------------------------------------
    def _validate(self, ckpt_prefix: str = "") -> None:
        first = self.tasks[0]
        for t in self.tasks:
            if not t.keys():
                hint = f" whose name starts with --ckpt_prefix {ckpt_prefix!r}" if ckpt_prefix else ""
                raise MergeInputError(t.path, f"holds no tensor{hint}; nothing to merge")
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
        if not any(self.is_mergeable(n) for n in self.names):
            raise MergeInputError(first.path, "shares no floating-point parameter with the other inputs"
                                  + (f" and the base model {self.base.path}" if self.base is not None else "")
                                  + "; nothing to merge")

    # ----- loading ----------------------------------------------------------------------
    def out_dtype(self, name: str) -> torch.dtype:
        """The base's dtype; without a base, the widest of the task models' dtypes (a float16
        first task must not turn another input's float32 values beyond its range into inf)."""
        if self.base is not None:
            return self.base.dtype(name)
        dtypes = [t.dtype(m[name]) for t, m in zip(self.tasks, self._names)]
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    def shape(self, name: str) -> torch.Size:
        if self.base is not None:
            return self.base.shape(name)
        return self.tasks[0].shape(self._names[0][name])

    def is_mergeable(self, name: str) -> bool:
        return self.out_dtype(name).is_floating_point

    def _check_finite(self, tensor: torch.Tensor, path, name: str) -> None:
        if not all_finite(tensor):
            raise MergeInputError(path, f"tensor '{name}' contains NaN or inf")

    def group(self, name: str) -> TensorGroup:
        """Load one parameter from every input, as task updates in the compute dtype/device.

        Linear methods (``streams_linear``: average, task arithmetic) on the CPU whose inputs
        are all safetensors get :class:`~src.merge.streaming.StreamedTensor` s instead:
        nothing is loaded here, ``finalize`` streams the merged tensor through the cache.
        """
        dtype, dev = self.method.compute_dtype, self.device
        readers = self.tasks + ([self.base] if self.base is not None and self.group_needs_base else [])
        if self.method.streams_linear and dev.type == "cpu" and all(
                hasattr(r, "read_into") for r in readers):
            return TensorGroup(name=name, base=StreamedTensor(self.base, name) if len(readers) > len(self.tasks) else None,
                               updates=[StreamedTensor(t, names[name]) for t, names in zip(self.tasks, self._names)])
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
                    u = u - base if u is raw else u.sub_(base)  # never modify a caller's tensor
            if isinstance(u, LowRank) and not self.method.accepts_low_rank:
                u = u.dense()
            updates.append(u)
        if any(isinstance(u, LowRank) for u in updates) and not all(isinstance(u, LowRank) for u in updates):
            updates = [densify(u) for u in updates]  # mixed LoRA and full inputs: dense route
        return TensorGroup(name=name, base=base, updates=updates, side=self.side_tensors(name))

    def side_tensors(self, name: str) -> dict[str, list[Optional[torch.Tensor]]]:
        """This tensor's data statistics per kind and task (float32, on the compute device)."""
        out: dict[str, list[Optional[torch.Tensor]]] = {}
        for kind in self.side_kinds:
            entries = []
            for t, readers in zip(self.tasks, self.side or []):
                reader = readers.get(kind)
                if reader is None or name not in reader.keys():
                    entries.append(None)
                    continue
                value = reader.load(name)
                self._check_finite(value, reader.path, name)
                entries.append(value.to(device=self.device, dtype=torch.float32))
            if entries and any(e is not None for e in entries) and not all(e is not None for e in entries):
                missing = next(t for t, e in zip(self.tasks, entries) if e is None)
                raise MergeInputError(getattr(missing, "task_dir", missing.path),
                                      f"has no {kind} statistics for '{name}' while the other task models do")
            out[kind] = entries
        return out

    def check_statistics(self, params: Any) -> None:
        """Every task has the statistics the method needs at ``params`` (else: which task lacks which)."""
        needed = self.method.required_statistics(params)
        self.side_kinds = tuple(needed) or tuple(self.method.requires)
        if not needed:
            return
        if self.side is None:
            raise ValueError(f"method '{self.method.name}' needs data statistics ({', '.join(needed)}) of every "
                             "task model: compute them with `python -m src.statistics` and pass statistics=TAG "
                             "(--statistics TAG)")
        for t, spec, readers in zip(self.tasks, self.task_specs, self.side):
            lacking = [k for k in needed if k not in readers]
            if lacking:
                raise MergeInputError(getattr(t, "task_dir", t.path),
                                      f"has no {', '.join(lacking)} statistics for method '{self.method.name}'"
                                      f" (compute them with `python -m src.statistics`)")

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
            for name in self.bar([n for n in self.names if self.is_mergeable(n)], f"{self.method.name}: reductions"):
                if cache is not None and name in cache:
                    yield name, cache[name]
                    continue
                state = self.method.prepare(self.group(name), params)
                if cache is not None:
                    cache[name] = state
                yield name, state

        return items

    def reductions(self, params: Any, states: Callable[[], Iterator[tuple[str, Any]]]) -> LazyReductions:
        """The method's global reductions: computed now, or on first use if deferred."""
        stats = LazyReductions(self.method.reductions(params), states)
        for key in stats:
            if key not in self.method.deferred_reductions:
                stats[key]
        return stats

    def finalize(self, name: str, update: Update, as_update: bool, base: Optional[torch.Tensor] = None):
        """The merged tensor to emit: the update itself, or ``W0 + dW`` in the output dtype.

        ``base``: ``W0`` when the caller already loaded it (else it is read here, once).
        """
        if isinstance(update, StreamedSum):  # streamed linear merge: computed here, chunk by chunk
            return update.dense(self._check_finite) if as_update else update.merged(self.out_dtype(name), self._check_finite)
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

    def input_paths(self) -> list:
        """Every file or directory this merge reads (protected from ``output``)."""
        paths = [p for p in self.task_specs if isinstance(p, (str, Path))]
        paths += [t.path for t in self.tasks if isinstance(getattr(t, "path", None), Path) and not getattr(t, "in_memory", False)]
        if isinstance(self.base_spec, (str, Path)):
            paths.append(self.base_spec)
        return paths

    def _check_output_tensor(self, name: str, tensor: Any) -> None:
        """No NaN/inf reaches an output file: a broken model is never written as a success."""
        parts = [tensor.A, tensor.B] if isinstance(tensor, LowRank) else [tensor]
        if all(all_finite(p) for p in parts):
            return
        if self.base is not None and name in self.base.keys():
            if not all_finite(self.base.load(name)):
                raise MergeInputError(self.base.path, f"tensor '{name}' contains NaN or inf")
        raise ValueError(f"merged tensor '{name}' has NaN or inf in {parts[0].dtype} (the merge exceeds the output "
                         "dtype's range, or the hyperparameters blow it up); nothing was written")

    def run(
        self,
        params: Any = None,
        output: Union[str, Path, None] = None,
        save_as: str = "auto",
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        cache_states: Optional[bool] = None,
        overwrite: bool = False,
    ) -> MergeResult:
        """Merge once. With ``output`` the result is written atomically, else returned.

        ``output`` is checked before any work (:func:`src.safe_output.check_output`): never an
        input, never a non-empty path that is not an earlier merge output unless ``overwrite``.
        With a base model, a safetensors output is a complete model: every base tensor (the
        unmerged ones copied), plus the base directory's config and tokenizer files.
        """
        params = params if params is not None and not isinstance(params, dict) else self.method.make_params(**(params or {}))
        check_params(params, self.method.name)
        self.check_statistics(params)
        mode = self.resolve_save_as(save_as)
        replacing = accepted = None
        if output is not None:
            clean_debris(output)  # a killed run's leftovers, before deciding what the path holds
            replacing = check_output(output, self.input_paths(), marker=MERGE_MARKER, overwrite=overwrite)
            accepted = output_identity(output)
        complete = output is not None and mode == "safetensors" and self.base is not None
        out_names = list(self.base.keys()) if complete else list(self.names)
        merged_names = set(self.names)
        layout = [(n, tuple(self.shape(n)), self.out_dtype(n)) for n in out_names] if mode == "safetensors" else []
        if output is not None:
            check_free_space(Path(output).parent, sum(_nbytes(shape, dtype) for _, shape, dtype in layout))
        for message in (self.base_note, replacing):
            if message:
                note(message)
        start, meter = time.perf_counter(), _MemoryMeter(self.device)
        if cache_states is None:  # keep states when they are small: LoRA factors or in-memory inputs
            cache_states = self.all_lora or all(getattr(t, "in_memory", False) for t in self.tasks)
        cache: Optional[dict] = {} if cache_states and self.method.reductions(params) else None
        stats = self.reductions(params, self.prepared_states(params, cache))

        def produce(sink: Callable[[str, Any], None]) -> None:
            for name in self.bar(out_names, f"{self.method.name}: merge"):
                if name not in merged_names or not self.is_mergeable(name):
                    if mode == "safetensors":
                        tensor = self.passthrough(name)
                        if name not in merged_names and not all_finite(tensor):
                            raise MergeInputError(self.base.path, f"tensor '{name}' contains NaN or inf")
                        sink(name, tensor)
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
                tensor = self.finalize(name, update, as_update=(mode == "adapter"), base=base)
                self._check_output_tensor(name, tensor)
                sink(name, tensor)

        # without a base, LoRA inputs merge to dW (and methods that need a base refuse full inputs)
        contents = "updates" if mode == "adapter" or (self.base is None and (self.all_lora or self.method.needs_base)) else "weights"
        info = {
            "format_version": MERGE_FORMAT_VERSION,
            "method": self.method.name,
            "params": asdict(params),
            "base": None if self.base is None else str(self.base.path),
            "base_model_id": self.declared_base,
            "tasks": [describe_input(t, spec) for t, spec in zip(self.tasks, self.task_specs)],
            "save_as": mode,
            "contents": contents,
            "complete_model": complete,
            "partial": mode == "safetensors" and not complete,
            "statistics": None if self.side is None else str(self.statistics_spec),
            "device": str(self.device),
            "num_tensors": len(out_names),
            "num_merged_tensors": len(self.names),
            "torch": torch.__version__,
            "host": platform.node(),
        }
        if output is None:
            tensors: dict[str, Any] = {}
            produce(tensors.__setitem__)
            info.update(wall_time_s=time.perf_counter() - start, **meter.report())
            return MergeResult(info=info, tensors=tensors)

        output = Path(output)
        with atomic_directory(output, expect=accepted) as tmp:
            if mode == "adapter":
                template = getattr(self.tasks[0], "config", None)
                writer = PeftAdapterWriter(tmp, template)
                produce(lambda n, u: writer.add(n, u, self.out_dtype(n)))
            else:
                writer = ShardedSafetensorsWriter(tmp, layout, max_shard_bytes, {"format": "pt", "method": self.method.name},
                                                  stem="updates" if contents == "updates" else "model")
                produce(writer.add)
            writer.close()
            if complete:
                copy_model_files(self.base_dir(), tmp)
            info.update(wall_time_s=time.perf_counter() - start, **meter.report())
            (tmp / MERGE_MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n")
            write_model_card(tmp, info)
        return MergeResult(info=info, output=output)

    def base_dir(self) -> Optional[Path]:
        """The base model's directory (config, tokenizer files), when the base came from one."""
        if not isinstance(self.base_spec, (str, Path)):
            return None
        path = Path(self.base_spec)
        if path.is_dir():
            return path
        return path.parent if (path.parent / "config.json").is_file() else None
