"""ResNet-20 for CIFAR trained from scratch with a frozen CLIP text-embedding head (docs/protocols.md E, MuDSC / ZipIt).

Network (:class:`ResNet20`): 3x3 conv to ``16*width`` channels, three stages of three basic blocks
(``16w``, ``32w``, ``64w`` channels, stride 1 / 2 / 2; 3x3-conv (padding 1, as ZipIt's and MuDSC's
``resnets.py``) + norm shortcut where the shape
changes), global average pooling -> a ``64*width`` feature, and a final linear ``proj`` into the
text-embedding width ``out_dim`` (ZipIt's models end the same way: their last linear maps to the
CLIP width and is merged with the rest). ``norm="batch"`` (BatchNorm) or ``"group"`` (GroupNorm,
the ResNet-20-GN of MuDSC). Every convolution and linear, ``proj`` included, gets Kaiming-normal
init from ``init_seed`` (ZipIt's ``_weights_init``): models with different ``init_seed`` start from
different initializations, which is what experiment E merges.

Head: the class names of the datamodule's subset, each encoded with every template by a frozen CLIP
text tower (``clip_model``, text tower + text projection only), L2-normalized, averaged,
renormalized, as for the CLIP families: ``logits = exp(logit_scale) * normalize(net(x)) @ head^T``,
scale 100 as in ZipIt's ``train_cliphead``. The network's ``out_dim`` is ``embed_dim`` (512 for
the CLIP ViT-B/32 text tower), given up front so that the network can be built before any head
(the evaluation stage builds the base network, then loads the heads).

Export: ``trained_state_dict`` is the whole network's state dict (parameters and BatchNorm running
statistics) under its own names (``conv1.weight``, ``layer2.0.bn1.running_mean``, ...,
``proj.weight``, ``proj.bias``); ``head_state_dict`` is the frozen text head only (``weight``,
``logit_scale``). Task checkpoints written before the projection moved into the network (head
entries ``proj.*``) are refused; retrain them.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import EmbeddingHeadMixin, OptimSpec, TaskModule, class_embeddings, config_fingerprint, seeded_build
from .clip import ByteTokenizer

DEFAULT_TEMPLATES = ["a photo of a {}."]
ZIPIT_LOGIT_SCALE = 100.0


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes, groups)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
                                          make_norm(norm, planes, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages x 3 basic blocks): the pooled ``64*width`` feature through the
    final linear ``proj`` into ``out_dim`` (the text-embedding width)."""

    def __init__(self, width: int = 1, norm: str = "batch", groups: int = 8, blocks: int = 3, *, out_dim: int):
        super().__init__()
        w = int(width)
        self.feature_dim, self.out_dim = 64 * w, int(out_dim)
        self.conv1 = nn.Conv2d(3, 16 * w, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 16 * w, groups)
        layers, in_planes = [], 16 * w
        for planes, stride in ((16 * w, 1), (32 * w, 2), (64 * w, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, norm, groups))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.proj = nn.Linear(self.feature_dim, self.out_dim)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.proj(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNetClassifier(EmbeddingHeadMixin, TaskModule):
    """ResNet-20 (from scratch, its last layer a learned projection) + frozen CLIP text-embedding head.

    Args:
        pretrained: a name for the architecture (no weights are loaded; the "base" is the random
            initialization of ``init_seed``).
        width: channel multiplier (ZipIt: x4 for CIFAR-10 5+5, x8 for CIFAR-100 50+50).
        norm: ``"batch"`` or ``"group"`` (GroupNorm with ``gcd(groups, channels)`` groups).
        init_seed: seed of the random initialization (the whole network, ``proj`` included).
        embed_dim: the text-embedding width, the network's output width (512: CLIP ViT-B/32's text
            projection); :meth:`build_model` checks that the text head has it.
        clip_model: hub id / folder of the CLIP model whose text tower encodes the class names.
        clip_config: build the text tower from this ``CLIPConfig`` dict instead (random weights,
            byte tokenizer; tests / offline).
        logit_scale: the (not logged) scale of the cosine logits.
        templates: head templates when the datamodule gives none.
    """

    family = "resnet-cifar"

    def __init__(
        self,
        pretrained: str = "resnet20",
        width: int = 1,
        norm: Literal["batch", "group"] = "batch",
        groups: int = 8,
        init_seed: int = 0,
        embed_dim: int = 512,
        finetune: Literal["full"] = "full",
        optim: Optional[OptimSpec] = None,
        label_smoothing: float = 0.0,
        clip_model: str = "openai/clip-vit-base-patch32",
        clip_config: Optional[dict[str, Any]] = None,
        logit_scale: float = ZIPIT_LOGIT_SCALE,
        templates: Optional[list[str]] = None,
        lora: Optional[dict] = None,
    ):
        if finetune != "full" or lora:
            raise ValueError("ResNetClassifier is trained from scratch (finetune='full', no lora)")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        super().__init__(pretrained=pretrained, finetune="full", optim=optim, label_smoothing=label_smoothing)
        self.width, self.norm, self.groups, self.init_seed = int(width), norm, int(groups), int(init_seed)
        self.embed_dim = int(embed_dim)
        self.clip_model, self.clip_config = clip_model, clip_config
        self.logit_scale_value = float(logit_scale)
        self.default_templates = list(templates) if templates else list(DEFAULT_TEMPLATES)

    @property
    def base_model_id(self) -> str:
        arch = {"width": self.width, "norm": self.norm, "groups": self.groups, "out_dim": self.embed_dim}
        return f"{self.pretrained}x{self.width}-{self.norm}#init-{config_fingerprint(arch, self.init_seed)}"

    # ----- building -----------------------------------------------------------------
    def load_base(self) -> nn.Module:
        """The whole network (``proj`` included) at its random initialization (``init_seed``), frozen."""
        model = seeded_build(lambda: ResNet20(self.width, self.norm, self.groups, out_dim=self.embed_dim),
                             self.init_seed)
        model.requires_grad_(False)
        model.eval()
        return model

    def text_encoder(self):
        """``encode(list_of_str) -> (N, D)`` with a frozen CLIP text tower (+ text projection)."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        if self.clip_config is not None:
            text_cfg = dict(self.clip_config.get("text_config") or {})
            text_cfg.setdefault("projection_dim", self.clip_config.get("projection_dim", 512))
            config = CLIPTextConfig(**text_cfg)
            tower = seeded_build(lambda: CLIPTextModelWithProjection(config), self.init_seed)
            tok = ByteTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id,
                                config.max_position_embeddings)
        else:
            from transformers import AutoTokenizer

            tower = CLIPTextModelWithProjection.from_pretrained(self.clip_model)
            hf_tok = AutoTokenizer.from_pretrained(self.clip_model)
            tok = lambda texts: hf_tok(texts, padding=True, truncation=True, return_tensors="pt")  # noqa: E731
        tower.eval().requires_grad_(False)

        def encode(texts: list[str]) -> torch.Tensor:
            inputs = tok(texts)
            return tower(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds

        return encode

    def build_model(self, label_names: list[str], templates: Optional[list[str]]) -> None:
        templates = list(templates) if templates else self.default_templates
        self.templates = templates
        head = class_embeddings(self.text_encoder(), label_names, templates)
        if head.shape[1] != self.embed_dim:
            raise ValueError(f"the text tower embeds the class names in {head.shape[1]} dimensions but embed_dim is "
                             f"{self.embed_dim}: set the model's embed_dim to {head.shape[1]} "
                             "(the network's output width)")
        self.set_head(head, math.log(self.logit_scale_value))
        self.attach_base(self.load_base(), trainable=True)

    def attach_base(self, base: nn.Module, trainable: bool = True) -> None:
        base.train(trainable)
        base.requires_grad_(trainable)
        self.model = base

    # ----- forward ------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head_logits(self.features(batch["pixel_values"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits({"pixel_values": pixel_values})

    # ----- export -------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole network (``proj`` included): parameters and normalization buffers (BatchNorm
        running statistics)."""
        return {k: v.detach() for k, v in self.unwrapped_model().state_dict().items()}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The frozen text head (``weight``, ``logit_scale``); its width must be the network's output width."""
        old = sorted(k for k in state if k.startswith("proj."))
        if old:
            raise ValueError(f"head entries {old}: the projection is now the network's last layer (model.safetensors); "
                             "this task checkpoint has the old layout, retrain it")
        weight = state.get("weight")
        if weight is not None and weight.ndim == 2 and weight.shape[1] != self.embed_dim:
            raise ValueError(f"the head has width {weight.shape[1]}, the network outputs embed_dim={self.embed_dim}")
        super().load_head_state_dict(state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the network's normalization buffers too (they are not trainable parameters)."""
        state = dict(checkpoint.get("state_dict") or {})
        super().on_save_checkpoint(checkpoint)
        if state:
            buffers = {f"model.{n}" for n, _ in self.model.named_buffers()}
            checkpoint["state_dict"].update({k: v for k, v in state.items() if k in buffers})
