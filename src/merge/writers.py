"""Writers of merged models: sharded safetensors and PEFT LoRA adapters.

Both write into a directory that only appears once complete (see
:class:`src.safe_output.atomic_directory`), so a failed merge leaves nothing behind.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .sources import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from .updates import LowRank

DEFAULT_SHARD_BYTES = 5 << 30  # Hugging Face's default shard size; memory does not depend on it

_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardedSafetensorsWriter:
    """Streams tensors into safetensors files as they are produced: memory is one tensor.

    The safetensors format is an 8-byte header length, a JSON header with every tensor's
    dtype, shape and byte offsets, then the raw bytes. ``save_file`` needs every tensor in
    memory at once (and serializes a second copy); a merge knows every output name, shape
    and dtype before it starts, so the header is written first and each tensor's bytes are
    appended the moment it is merged. One ``model.safetensors`` when everything fits in
    ``max_shard_bytes``, else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` as Hugging Face writes them. ``stem="updates"`` names the
    files ``updates*.safetensors`` (merged task updates without a base: not loadable as weights).
    """

    def __init__(self, directory: Path, layout: list[tuple[str, tuple, torch.dtype]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Optional[dict] = None, stem: str = "model"):
        self.directory = Path(directory)
        self.stem = stem  # "updates" for merged task updates: never mistaken for loadable weights
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        n = len(shards)
        self.files = [self.directory / (f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors")
                      for i in range(1, n + 1)]
        self._plan = [(name, shape, dtype, i) for i, shard in enumerate(shards) for name, shape, dtype in shard]
        self._shards = shards
        self._next = 0
        self._handle = None
        self._open_shard = -1
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype, _ in self._plan)

    def _start_shard(self, i: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, offset = {}, 0
        if self.metadata:
            header["__metadata__"] = self.metadata
        for name, shape, dtype in self._shards[i]:
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.files[i], "wb")
        self._handle.write(struct.pack("<Q", len(blob)))
        self._handle.write(blob)
        self._open_shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise ValueError(f"unexpected tensor '{name}': every planned tensor was already written")
        want, shape, dtype, shard = self._plan[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"writer expected '{want}' {shape} {dtype}, got '{name}' {tuple(tensor.shape)} {tensor.dtype}")
        if shard != self._open_shard:
            self._start_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def close(self) -> list[Path]:
        if self._next != len(self._plan):
            missing = self._plan[self._next][0]
            raise ValueError(f"writer closed before '{missing}' was written")
        if self._handle is None:  # nothing planned: an empty, valid file
            self._start_shard(0)
        self._handle.close()
        self._handle = None
        if len(self.files) > 1:
            weight_map = {name: self.files[shard].name for name, _, _, shard in self._plan}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.files)


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class PeftAdapterWriter:
    """Writes merged low-rank updates ``B @ A`` as a PEFT LoRA adapter (scale 1).

    Merged ranks differ per module (KnOTS keeps ``k <= n r`` components), so the most
    common rank becomes ``r`` and the others go to ``rank_pattern``; ``lora_alpha`` equals
    the rank everywhere so PEFT's ``alpha / r`` scale is 1 and ``B @ A`` is the update.
    """

    def __init__(self, directory: Path, template_config: Optional[dict] = None):
        self.directory = Path(directory)
        self.template = dict(template_config or {})
        self._tensors: dict[str, torch.Tensor] = {}
        self._ranks: dict[str, int] = {}

    def add(self, name: str, update: LowRank, dtype: torch.dtype) -> None:
        if not name.endswith(".weight"):
            raise ValueError(f"'{name}': only '.weight' parameters can be LoRA-adapted")
        module = name[: -len(".weight")]
        B = (update.B * update.scale).to(dtype)
        self._tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = update.A.to(dtype).detach().cpu().contiguous()
        self._tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.detach().cpu().contiguous()
        self._ranks[module] = update.A.shape[0]

    def close(self) -> list[Path]:
        if not self._ranks:
            raise ValueError("no LoRA modules to write")
        r = Counter(self._ranks.values()).most_common(1)[0][0]
        # Full module paths: PEFT matches pattern keys against the end of module names.
        pattern = {m: k for m, k in self._ranks.items() if k != r}
        config = {
            "peft_type": "LORA",
            "task_type": self.template.get("task_type"),
            "base_model_name_or_path": self.template.get("base_model_name_or_path"),
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": sorted(self._ranks),
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        weights = self.directory / PEFT_WEIGHTS
        save_file(self._tensors, str(weights), metadata={"format": "pt"})
        (self.directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        return [weights, self.directory / PEFT_CONFIG]
