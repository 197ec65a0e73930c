"""Lazy readers of task models and base models, one tensor at a time.

Every reader exposes ``path``, ``keys()`` (base-model parameter names), ``shape(key)``,
``dtype(key)`` and ``load(key)``. Task readers also say ``kind``: ``"lora"`` readers return
:class:`LowRank` task updates, ``"full"`` readers return task *weights* (the engine
subtracts the base). Nothing is read until ``load``; safetensors files are read with
positioned reads, never memory-mapped, so resident memory holds only what was loaded.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open

from ..task_checkpoint import TaskCheckpointError, adapter_dir, full_weights_path, is_task_dir, read_task_info
from .errors import MergeInputError
from .updates import LowRank

SAFETENSORS_INDEX = "model.safetensors.index.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class SafetensorsReader:
    """A safetensors file, or a sharded checkpoint given by its ``*.index.json``.

    The headers are validated by ``safetensors`` once, when the reader opens; tensors are then
    read with positioned reads (``os.preadv``) from one descriptor per file into memory of
    their own. Nothing is memory-mapped, so no page of an input file ever counts in this
    process's resident memory, and no file is reopened or its header parsed again per
    tensor. ``read_into`` reads any element range of a tensor into a caller's buffer: the
    engine streams element-wise merges through small reused buffers.
    """

    kind = "full"

    def __init__(self, path):
        self.path = Path(path)
        self._fds: dict[Path, int] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (file, absolute offset, bytes)
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        files = self._shards()
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:  # validates header, offsets, size
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self._meta[key] = (torch.Size(sl.get_shape()), _dtype(sl.get_dtype(), file))
                spans = _data_spans(file)
            except MergeInputError:
                raise
            except Exception as e:  # safetensors raises several types for corrupt files
                raise MergeInputError(file, f"not a readable safetensors file ({e})") from None
            for key, (offset, nbytes) in spans.items():
                shape, dtype = self._meta[key]
                if nbytes != shape.numel() * dtype.itemsize:
                    raise MergeInputError(file, f"tensor '{key}' has {nbytes} bytes, expected {shape} {dtype}")
                self._where[key] = (file, offset, nbytes)

    def _shards(self) -> list[Path]:
        if not self.path.exists():
            raise MergeInputError(self.path, "does not exist")
        if self.path.name.endswith(".index.json"):
            try:
                index = json.loads(self.path.read_text())
                weight_map = index["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise MergeInputError(self.path, f"not a valid safetensors index ({e})") from None
            files = sorted({self.path.parent / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise MergeInputError(self.path, f"names shard(s) that do not exist: {missing}")
            return files
        return [self.path]

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> torch.Size:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def load(self, key: str) -> torch.Tensor:
        shape, dtype = self._meta[key]
        flat = torch.empty(shape.numel(), dtype=dtype)
        self.read_into(key, 0, flat)
        return flat.view(shape)

    def load_many(self, keys: list[str]) -> list[torch.Tensor]:
        return [self.load(k) for k in keys]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements ``start .. start + out.numel()`` of the flattened tensor, into ``out``
        (contiguous, of the tensor's dtype)."""
        file, offset, nbytes = self._where[key]
        size = out.element_size()
        want, pos = out.numel() * size, offset + start * size
        if out.dtype != self._meta[key][1] or not out.is_contiguous() or start < 0 or pos + want > offset + nbytes:
            raise ValueError(f"read_into('{key}', {start}): {out.numel()} {out.dtype} elements do not fit the tensor")
        if want == 0:
            return
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            got = 0
            while got < want:
                n = os.preadv(fd, [buf[got:]], pos + got)
                if n <= 0:
                    raise MergeInputError(file, f"is truncated: tensor '{key}' needs bytes up to {offset + nbytes}, "
                                                f"the file has {os.fstat(fd).st_size}")
                got += n
        except OSError as e:
            raise MergeInputError(file, f"cannot read tensor '{key}' ({e})") from None
        if not _LITTLE_ENDIAN and size > 1:  # safetensors stores little-endian values
            b = out.view(-1).view(torch.uint8).numpy().reshape(-1, size)
            b[:] = b[:, ::-1].copy()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """``key -> (absolute byte offset, byte length)`` from a safetensors header."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


_LITTLE_ENDIAN = sys.byteorder == "little"


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype(name: str, file) -> torch.dtype:
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise MergeInputError(file, f"unsupported tensor dtype {name}") from None


class StateDictReader:
    """An in-memory state dict (tensors, or :class:`LowRank` updates for ``kind="lora"``)."""

    in_memory = True

    def __init__(self, state: Mapping[str, Any], name: str = "<state dict>", kind: Optional[str] = None):
        self.path = Path(name)
        self._state = dict(state)
        if kind is None:
            kind = "lora" if self._state and all(isinstance(v, LowRank) for v in self._state.values()) else "full"
        if kind == "lora" and not all(isinstance(v, LowRank) for v in self._state.values()):
            raise MergeInputError(name, "a LoRA state dict must hold only LowRank updates")
        self.kind = kind

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> torch.Size:
        return self._state[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def load(self, key: str):
        return self._state[key]


class LightningCheckpointReader(StateDictReader):
    """A Lightning ``.ckpt`` (or any ``torch.save``d state dict), read with ``weights_only=True``.

    The file is memory-mapped so tensors are paged in one at a time. ``prefix`` is stripped
    from the keys (e.g. ``"model."`` for a LightningModule holding the network as
    ``self.model``); by default names are aligned to the base model by the engine.
    """

    in_memory = False  # memory-mapped: re-reading is cheap, keeping states is not

    def __init__(self, path, prefix: str = ""):
        path = Path(path)
        if not path.is_file():
            raise MergeInputError(path, "does not exist")
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                # a legacy (non-zip) torch.save file cannot be memory-mapped: read it into memory
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise MergeInputError(path, _torch_load_problem(e, path)) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MergeInputError(path, "holds no state_dict of tensors")
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        super().__init__(state, str(path), kind="full")


def _torch_load_problem(e: Exception, path: Path) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: torch's message spans
    paragraphs, with terminal colour codes and the advice to retry with ``weights_only=False``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"(?i)unsupported (?:global:? )?GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds pickled Python objects or code (GLOBAL {found.group(1)}), not only tensors; it was not "
                "unpickled (checkpoints are read with torch.load(weights_only=True))")
    if "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = detail.group(1).strip() if detail else "not a checkpoint of tensors"
        return f"is corrupt or not a torch checkpoint of tensors (torch.load(weights_only=True): {detail})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    try:
        import zipfile

        with open(path, "rb") as f:
            if f.read(2) == b"PK" and not zipfile.is_zipfile(path):
                return f"is truncated or corrupt: a torch zip checkpoint without its central directory ({first})"
    except OSError:
        pass
    return f"cannot be loaded with torch.load(weights_only=True) ({first})"


class PeftAdapterReader:
    """A PEFT LoRA adapter directory: factors kept, ``lora_alpha / r`` (or rsLoRA) applied.

    Keys are mapped from ``base_model.model.<module>.lora_{A,B}.weight`` to the base
    parameter ``<module>.weight``. Non-LoRA tensors (``modules_to_save`` heads) are task
    specific and listed in ``extras``, never merged.
    """

    kind = "lora"

    def __init__(self, path):
        self.path = Path(path)
        cfg_path = self.path / PEFT_CONFIG
        if not cfg_path.is_file():
            raise MergeInputError(self.path, f"not a PEFT adapter directory: {PEFT_CONFIG} is missing")
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeInputError(cfg_path, f"unreadable ({e})") from None
        _check_adapter_config(self.config, cfg_path)
        if self.config.get("peft_type", "LORA") != "LORA":
            raise MergeInputError(cfg_path, f"peft_type {self.config.get('peft_type')!r} is not LORA")
        if self.config.get("use_dora"):
            raise MergeInputError(cfg_path, "DoRA adapters are not plain low-rank updates and cannot be merged here")
        weights = self.path / PEFT_WEIGHTS
        if not weights.is_file():
            raise MergeInputError(self.path, f"{PEFT_WEIGHTS} is missing")
        self._file = SafetensorsReader(weights)
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self._modules: dict[str, tuple[str, str]] = {}
        self.extras: list[str] = []
        pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        found: dict[str, dict[str, str]] = {}
        for key in self._file.keys():
            m = pattern.match(key)
            if m is None:
                self.extras.append(key)
                continue
            found.setdefault(m.group(1), {})[m.group(2)] = key
        for module, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise MergeInputError(weights, f"module '{module}' has lora_{next(iter(ab))} but not its pair")
            self._modules[module + ".weight"] = (ab["A"], ab["B"])
        if not self._modules:
            raise MergeInputError(weights, "holds no LoRA weights")
        for key, (a, _) in self._modules.items():
            module = key[: -len(".weight")]
            r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
            if self._file.shape(a)[0] != r:
                raise MergeInputError(cfg_path, f"says rank {r} for '{module}' but {PEFT_WEIGHTS} holds rank "
                                      f"{self._file.shape(a)[0]} (r / rank_pattern do not match the weights)")

    def scale(self, key: str) -> float:
        module = key[: -len(".weight")]
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def keys(self) -> list[str]:
        return list(self._modules)

    def shape(self, key: str) -> torch.Size:
        a, b = self._modules[key]
        shape = torch.Size((self._file.shape(b)[0], self._file.shape(a)[1]))
        return torch.Size(reversed(shape)) if self.fan_in_fan_out else shape

    def dtype(self, key: str) -> torch.dtype:
        return self._file.dtype(self._modules[key][0])

    def rank(self, key: str) -> int:
        return self._file.shape(self._modules[key][0])[0]

    def load(self, key: str) -> LowRank:
        a, b = self._modules[key]
        A, B = self._file.load_many([a, b])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeInputError(self._file.path, f"'{key}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not pair")
        if self.fan_in_fan_out:  # stored transposed (Conv1D layers): dW^T = B A -> dW = A^T B^T
            return LowRank(A.T, B.T, self.scale(key))
        return LowRank(B, A, self.scale(key))


def _check_adapter_config(config, path) -> None:
    """The fields the merge reads have the types PEFT writes; anything else is named."""
    if not isinstance(config, dict):
        raise MergeInputError(path, f"must hold a JSON object, got {type(config).__name__}")

    def positive_number(name, value, integer):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise MergeInputError(path, f"{name} must be {kind}, got {value!r}")

    if "r" in config:
        positive_number("r", config["r"], integer=True)
    if "lora_alpha" in config:
        positive_number("lora_alpha", config["lora_alpha"], integer=False)
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise MergeInputError(path, f"{field} must be a mapping of module patterns to values, got {pattern!r}")
        for module, value in pattern.items():
            positive_number(f"{field}[{module!r}]", value, integer)
            try:
                re.compile(module)
            except re.error as e:
                raise MergeInputError(path, f"{field} key {module!r} is not a valid pattern ({e})") from None
    for field in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if field in config and config[field] is not None and not isinstance(config[field], bool):
            raise MergeInputError(path, f"{field} must be true or false, got {config[field]!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise MergeInputError(path, f"base_model_name_or_path must be a string, got {base!r}")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: first key matching the end of the module name."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?{pat}$", module):
            return value
    return default


def _hf_model_dir(path: Path):
    """The weights of a Hugging Face model directory."""
    for name in (SAFETENSORS_INDEX, "model.safetensors"):
        if (path / name).is_file():
            return SafetensorsReader(path / name)
    for name in ("pytorch_model.bin",):
        if (path / name).is_file():
            return LightningCheckpointReader(path / name)
    return None


def open_task(spec: Union[str, Path, Mapping, Any], ckpt_prefix: str = ""):
    """A reader for one task model given as a path, a state dict, or a reader already."""
    if hasattr(spec, "load") and hasattr(spec, "keys") and hasattr(spec, "kind"):
        return spec
    if isinstance(spec, Mapping):
        return StateDictReader(spec)
    path = Path(spec)
    if not path.exists():
        raise MergeInputError(path, "does not exist")
    if path.is_dir():
        if is_task_dir(path):
            try:
                info = read_task_info(path)
            except TaskCheckpointError as e:
                raise MergeInputError(e.path, str(e).split(": ", 1)[-1]) from None
            reader = PeftAdapterReader(adapter_dir(path)) if info.kind == "lora" else SafetensorsReader(full_weights_path(path))
            reader.task_info = info
            reader.task_dir = path  # merge.json records the task directory, not adapter/ inside it
            return reader
        if (path / PEFT_CONFIG).is_file():
            return PeftAdapterReader(path)
        reader = _hf_model_dir(path)
        if reader is not None:
            return reader
        raise MergeInputError(path, "directory is neither a task checkpoint, a PEFT adapter nor a model directory")
    if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        return SafetensorsReader(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return LightningCheckpointReader(path, prefix=ckpt_prefix)
    raise MergeInputError(path, f"unknown checkpoint type '{path.suffix}' (expected .safetensors, .ckpt/.pt/.bin, or a directory)")


def open_base(spec: Union[str, Path, Mapping, None]):
    """A reader for the base (pretrained) model, or ``None``."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return StateDictReader(spec, "<base state dict>", kind="full")
    if hasattr(spec, "load") and hasattr(spec, "keys"):
        return spec
    path = Path(spec)
    if path.is_dir():
        reader = _hf_model_dir(path)
        if reader is None:
            raise MergeInputError(path, "base model directory has no model.safetensors, index or pytorch_model.bin")
        return reader
    return open_task(path)


def align_names(reader, base_keys: set[str]) -> dict[str, str]:
    """Map the reader's keys onto base-model names: exact, else by one consistent prefix.

    Lightning checkpoints prefix names (``model.``), sentence encoders drop them
    (``encoder.`` vs ``bert.encoder.``). One prefix added or removed for every key is
    accepted; anything else is an error naming the file and an unmatched key.
    """
    keys = reader.keys()
    if all(k in base_keys for k in keys):
        return {k: k for k in keys}
    probe = next(k for k in keys if k not in base_keys)
    candidates = []
    for b in base_keys:
        if b.endswith("." + probe):
            candidates.append(("add", b[: -len(probe)]))
        elif probe.endswith("." + b):
            candidates.append(("strip", probe[: -len(b)]))
    for how, prefix in candidates:
        if how == "add":
            mapping = {k: prefix + k for k in keys}
        else:
            mapping = {k: k[len(prefix):] for k in keys if k.startswith(prefix)}
        if len(mapping) == len(keys) and all(v in base_keys for v in mapping.values()):
            return mapping
    raise MergeInputError(reader.path, f"parameter '{probe}' does not exist in the base model")
