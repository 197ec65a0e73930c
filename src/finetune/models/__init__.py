"""Task-model families (LightningModules subclassing :class:`src.finetune.base.TaskModule`).

* :class:`~src.finetune.models.clip.ClipClassifier` -- CLIP (HF or open_clip) + text head
* :class:`~src.finetune.models.demo_text.DemoTextClassifier` -- all-MiniLM-L6-v2 demo family
* ``src.finetune.models.llama_nli.LlamaNLIClassifier`` -- Llama sequence classifiers (NLI)
* ``src.finetune.models.mt5.MT5Seq2Seq`` -- mT5 seq2seq
* :class:`~src.finetune.models.mlp.MLPClassifier` -- from-scratch MLP + frozen MiniLM text head
  (offline permutation-merging demo, family ``mlp-scratch``)

Classes are imported lazily so that importing one family never needs another's extras.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "ClipClassifier": "src.finetune.models.clip",
    "DemoTextClassifier": "src.finetune.models.demo_text",
    "LlamaNLIClassifier": "src.finetune.models.llama_nli",
    "MT5Seq2Seq": "src.finetune.models.mt5",
    "MLPClassifier": "src.finetune.models.mlp",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
