"""CLIP image classifiers: Hugging Face ``CLIPModel`` (default) or open_clip, frozen text head.

Head: for each class, every template is encoded with the frozen text tower, L2-normalized,
averaged and renormalized; ``logits = logit_scale.exp() * normalize(image_features) @ head^T``.
Trained: LoRA (PEFT) on attention projections of the VISION TOWER only, or the whole vision
tower (full finetune). The text tower, ``visual_projection`` and ``logit_scale`` stay frozen.

The PEFT wrapper goes around the whole ``CLIPModel`` (target modules are restricted to the
vision tower by a regex), so adapter keys read ``base_model.model.vision_model....lora_A.weight``
and map onto ``CLIPModel.state_dict()`` names; full finetunes export ``vision_model.*`` names.

open_clip is an optional extra (it needs torchvision): it is imported only when
``backend="open_clip"``.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

import torch

from ..base import EmbeddingHeadMixin, LoraSpec, OptimSpec, TaskModule, class_embeddings, config_fingerprint, seeded_build

DEFAULT_TEMPLATES = ["a photo of a {}."]


class ByteTokenizer:
    """Deterministic stand-in tokenizer for text towers built from a config (tests, offline runs).

    UTF-8 bytes mapped onto the ids that are not special; ``[bos] + bytes + [eos]`` padded with
    ``pad``. With ``eos_last=True`` the eos id is the largest id (open_clip pools at argmax).
    """

    def __init__(self, vocab_size: int, bos: int, eos: int, pad: int, max_length: int):
        self.bos, self.eos, self.pad, self.max_length = bos, eos, pad, max_length
        special = {bos, eos, pad}
        self.ids = [i for i in range(vocab_size) if i not in special]
        if not self.ids:
            raise ValueError("vocab too small for ByteTokenizer")

    def encode(self, text: str) -> list[int]:
        body = [self.ids[b % len(self.ids)] for b in text.encode("utf-8")][: self.max_length - 2]
        return [self.bos, *body, self.eos]

    def __call__(self, texts: list[str], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
        seqs = [self.encode(t) for t in texts]
        width = pad_to or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ClipClassifier(EmbeddingHeadMixin, TaskModule):
    """CLIP image classifier with a frozen text-embedding head.

    Args:
        pretrained: HF hub id or local path (``backend="hf"``), or open_clip model name
            (``"ViT-B-32"``) with ``pretrained_tag`` (``"openai"``, ``"laion2b_s34b_b79k"``...).
        backend: ``"hf"`` (transformers ``CLIPModel``) or ``"open_clip"``.
        finetune: ``"lora"`` (vision-tower LoRA) or ``"full"`` (whole vision tower).
        lora: LoRA rank/alpha/dropout and the attention module names it targets; names are
            restricted to the vision tower. A regex string is used as given.
        templates: head templates when the datamodule gives none.
        model_config: build from this config (random weights, seeded by ``init_seed``)
            instead of loading ``pretrained`` (tests, offline demos). HF: ``CLIPConfig``
            kwargs; open_clip: ``open_clip.CLIP`` kwargs.
        tokenizer: tokenizer id/path (HF; default ``pretrained``). Config-built models without
            one use a deterministic byte tokenizer.
    """

    def __init__(
        self,
        pretrained: str = "openai/clip-vit-base-patch32",
        backend: Literal["hf", "open_clip"] = "hf",
        finetune: Literal["lora", "full"] = "lora",
        lora: Optional[LoraSpec] = None,
        optim: Optional[OptimSpec] = None,
        label_smoothing: float = 0.0,
        templates: Optional[list[str]] = None,
        model_config: Optional[dict[str, Any]] = None,
        init_seed: int = 0,
        pretrained_tag: Optional[str] = "openai",
        tokenizer: Optional[str] = None,
    ):
        super().__init__(pretrained=pretrained, finetune=finetune, lora=lora, optim=optim,
                         label_smoothing=label_smoothing)
        if backend not in ("hf", "open_clip"):
            raise ValueError(f"backend must be 'hf' or 'open_clip', got {backend!r}")
        self.backend = backend
        self.default_templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.model_config = model_config
        self.init_seed = init_seed
        self.pretrained_tag = pretrained_tag
        self.tokenizer_name = tokenizer

    # ----- identity -------------------------------------------------------------------
    @property
    def family(self) -> str:  # type: ignore[override]
        return "clip-hf" if self.backend == "hf" else "clip-open_clip"

    @property
    def base_model_id(self) -> str:
        name = self.pretrained if self.backend == "hf" else f"open_clip:{self.pretrained}:{self.pretrained_tag}"
        if self.model_config is not None:
            name = f"{name}#config-{config_fingerprint(self.model_config, self.init_seed)}"
        return name

    @property
    def vision_prefix(self) -> str:
        return "vision_model." if self.backend == "hf" else "visual."

    # ----- base model -----------------------------------------------------------------
    def load_base(self) -> torch.nn.Module:
        if self.backend == "hf":
            from transformers import CLIPConfig, CLIPModel

            if self.model_config is not None:
                config = CLIPConfig(**self.model_config)
                model = seeded_build(lambda: CLIPModel(config), self.init_seed)
            else:
                model = CLIPModel.from_pretrained(self.pretrained)
        else:
            import open_clip  # optional extra

            if self.model_config is not None:
                model = seeded_build(lambda: open_clip.CLIP(**self.model_config), self.init_seed)
            else:
                model = open_clip.create_model(self.pretrained, pretrained=self.pretrained_tag)
        model.requires_grad_(False)
        model.eval()
        return model

    def _tokenizer(self, base: torch.nn.Module):
        if self.backend == "hf":
            if self.model_config is not None and self.tokenizer_name is None:
                tc = base.config.text_config
                return ByteTokenizer(tc.vocab_size, tc.bos_token_id, tc.eos_token_id, tc.pad_token_id,
                                     tc.max_position_embeddings)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.tokenizer_name or self.pretrained)
        import open_clip

        if self.model_config is not None:
            ctx = int(base.context_length)
            vocab = int(base.vocab_size)
            bytes_tok = ByteTokenizer(vocab, 0, vocab - 1, 0, ctx)
            return lambda texts: bytes_tok(texts, pad_to=ctx)["input_ids"]
        return open_clip.get_tokenizer(self.pretrained)

    def text_encoder(self, base: torch.nn.Module):
        """``encode(list_of_str) -> (N, D)`` with the frozen text tower of ``base``."""
        tok = self._tokenizer(base)
        device = next(base.parameters()).device

        def encode(texts: list[str]) -> torch.Tensor:
            if self.backend == "hf":
                if isinstance(tok, ByteTokenizer):
                    inputs = tok(texts)
                else:
                    inputs = tok(texts, padding=True, truncation=True, return_tensors="pt")
                inputs = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask")}
                out = base.get_text_features(**inputs)
                return out if isinstance(out, torch.Tensor) else out.pooler_output
            return base.encode_text(tok(texts).to(device))

        return encode

    def compute_head(self, base: torch.nn.Module, label_names: list[str], templates: list[str]) -> torch.Tensor:
        was_training = base.training
        base.eval()
        try:
            return class_embeddings(self.text_encoder(base), label_names, templates)
        finally:
            base.train(was_training)

    def lora_targets(self):
        targets = self.lora.target_modules
        if isinstance(targets, str):
            return targets  # a regex, used as given
        names = "|".join(re.escape(t) for t in targets)
        return rf"{re.escape(self.vision_prefix)}(.*\.)?({names})"

    # ----- TaskModule contract -------------------------------------------------------
    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        templates = list(templates) if templates else self.default_templates
        self.templates = templates
        base = self.load_base()
        self.set_head(self.compute_head(base, label_names, templates), base.logit_scale.detach().float())
        self.attach_base(base)

    def attach_base(self, base: torch.nn.Module, trainable: bool = True) -> None:
        """Set ``self.model`` from ``base``: PEFT-wrapped for LoRA, vision tower trainable for full."""
        # train(): Lightning keeps submodules' modes, and load_base() returns an eval-mode model
        base.train(trainable)
        base.requires_grad_(False)
        if self.finetune == "lora":
            self.model = self.wrap_lora(base, self.lora_targets()) if trainable else base
        else:
            if trainable:
                tower = base.vision_model if self.backend == "hf" else base.visual
                tower.requires_grad_(True)
            self.model = base

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.backend == "hf":
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return self.model.encode_image(pixel_values)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head_logits(self.image_features(batch["pixel_values"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits({"pixel_values": pixel_values})
