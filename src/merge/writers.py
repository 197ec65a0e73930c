"""Writers of merged models: sharded safetensors and PEFT LoRA adapters.

Both write into a directory that only appears once complete (see
:class:`src.task_checkpoint.atomic_directory`), so a failed merge leaves nothing behind.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .sources import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, SAFETENSORS_INDEX
from .updates import LowRank

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: bounds the writer's buffer (and so peak memory)


class ShardedSafetensorsWriter:
    """Buffers tensors up to ``max_shard_bytes``, then writes a shard.

    Peak memory of the writer is one shard; one file ``model.safetensors`` when everything
    fits, else ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    as Hugging Face writes them.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Optional[dict] = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata or None)
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / "model.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return files


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
