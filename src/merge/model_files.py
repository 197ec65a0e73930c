"""The files around merged weights that make the output a model others can load and read.

A merge onto a base model directory writes a complete Hugging Face model directory, like
mergekit: the base's ``config.json``, generation config and tokenizer / processor files are
copied next to the merged weights, and a short model card (``README.md``) says how the
model was made.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

#: Weight files (and their indexes) of the base model: replaced by the merged ones.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NOT_COPIED = ("README.md", "merge.json", "task.json", ".gitattributes")


def copy_model_files(base_dir: Optional[Path], out_dir: Path) -> list[str]:
    """Copy the base directory's non-weight files (config, tokenizer, processor) to ``out_dir``.

    Only top-level regular files are copied; the merged weights were written already and
    are never overwritten. Returns the copied names.
    """
    if base_dir is None:
        return []
    copied = []
    for src in sorted(Path(base_dir).iterdir()):
        name = src.name
        if (not src.is_file() or name.startswith(".") or name in _NOT_COPIED or name in _WEIGHT_INDEXES
                or name.endswith(_WEIGHT_SUFFIXES) or (out_dir / name).exists()):
            continue
        shutil.copyfile(src, out_dir / name)
        copied.append(name)
    return copied


def write_model_card(out_dir: Path, info: dict) -> None:
    """A short README.md: what was merged, how, and how to load it."""
    params = json.dumps(info.get("params", {}), sort_keys=True)
    tasks = "\n".join(f"- `{t.get('task') or t.get('path')}` (`{t.get('path')}`)" if isinstance(t, dict) else f"- `{t}`"
                      for t in info.get("tasks", []))
    base = info.get("base_model_id") or info.get("base") or "none"
    if info.get("save_as") == "adapter":
        load = ("A PEFT LoRA adapter (scale 1): `PeftModel.from_pretrained(base_model, this_dir)` "
                f"on the base model `{base}`.")
    elif info.get("complete_model"):
        load = "A complete model directory: load it as the base model is loaded (e.g. `AutoModel.from_pretrained`)."
    else:
        what = "merged task updates (add them to the base weights)" if info.get("contents") == "updates" else "merged weights"
        load = f"Safetensors of the {what}, only the merged tensors: load them onto the base with `strict=False`."
    card = (
        f"# Merged model: {info.get('method')}\n\n"
        f"Made without training by merging {len(info.get('tasks', []))} task models with `{info.get('method')}` "
        f"(hyperparameters `{params}`) onto the base model `{base}`.\n\n"
        f"## Task models\n\n{tasks}\n\n## Loading\n\n{load}\n\n"
        "`merge.json` records the full provenance (inputs, hyperparameters, time, memory).\n"
    )
    (out_dir / "README.md").write_text(card)
