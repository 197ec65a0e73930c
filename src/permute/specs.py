"""The permutation specs this project ships (see ``spec.py`` for what a spec says).

* :func:`mlp_spec`: the demo's MLP (``fc1 .. fc{n}`` hidden layers with ReLU, ``proj`` into the
  text-embedding width): one perm per hidden layer.
* :func:`resnet20_spec`: CIFAR ResNet-20 (``src/finetune/models/resnet.py``), BatchNorm or
  GroupNorm. The residual stream is one perm per stage, shared by the stem (stage 1) or the
  first block's shortcut convolution (stages 2, 3) and every block's second convolution of
  the stage; each block's hidden channels are another perm. GroupNorm channels are permuted
  in whole groups (and within groups): group ``g`` normalizes channels ``g*c .. (g+1)*c-1``.
* :func:`clip_vision_spec`: the CLIP / ViT vision tower (transformers' ``CLIPModel`` names).
  One residual-stream perm shared by the embeddings, the pre-LayerNorm, every block and the
  post-LayerNorm and consumed by the visual projection; per block a query/key perm and a
  value/output perm, both in whole heads (tied: the head order is one), and an MLP perm.

:func:`spec_for` picks the spec of a task module (by its family and architecture fields).
"""
from __future__ import annotations

import math
from typing import Any

from .spec import Perm, PermutationSpec, Point, inp, out


def mlp_spec(in_dim: int, width: int, hidden_layers: int, out_dim: int) -> PermutationSpec:
    perms, axes, points = {}, {}, {}
    prev = None
    for i in range(1, hidden_layers + 1):
        h = f"h{i}"
        perms[h] = Perm(width)
        axes[f"fc{i}.weight"] = (out(h), inp(prev) if prev else None)
        axes[f"fc{i}.bias"] = (out(h),)
        points[h] = [Point(f"fc{i + 1}" if i < hidden_layers else "proj", io="input")]
        prev = h
    axes["proj.weight"] = (None, inp(prev))
    axes["proj.bias"] = (None,)
    return PermutationSpec(perms, axes, points)


def _norm_axes(prefix: str, perm: str, norm: str) -> dict[str, tuple]:
    names = ("weight", "bias", "running_mean", "running_var") if norm == "batch" else ("weight", "bias")
    return {f"{prefix}.{n}": (out(perm),) for n in names}


def resnet20_spec(width: int = 1, norm: str = "batch", groups: int = 8, blocks: int = 3,
                  proj: bool = True) -> PermutationSpec:
    """ResNet-20 as built by ``src.finetune.models.resnet.ResNet20`` (``proj``: its final Linear
    into the text-embedding width, part of the network)."""
    w = int(width)

    def perm(channels: int) -> Perm:
        return Perm(channels, channels // math.gcd(groups, channels) if norm == "group" else 1)

    perms, axes, points = {}, {}, {}
    perms["res1"] = perm(16 * w)
    axes["conv1.weight"] = (out("res1"), None, None, None)
    axes.update(_norm_axes("bn1", "res1", norm))
    res = "res1"
    for s, planes in enumerate((16 * w, 32 * w, 64 * w), start=1):
        for b in range(blocks):
            pre = f"layer{s}.{b}"
            hidden = f"{pre}.hidden"
            perms[hidden] = perm(planes)
            new_res = res
            if b == 0 and s > 1:  # shortcut convolution: a new residual stream
                new_res = f"res{s}"
                perms[new_res] = perm(planes)
                axes[f"{pre}.shortcut.0.weight"] = (out(new_res), inp(res), None, None)
                axes.update(_norm_axes(f"{pre}.shortcut.1", new_res, norm))
            axes[f"{pre}.conv1.weight"] = (out(hidden), inp(res), None, None)
            axes.update(_norm_axes(f"{pre}.bn1", hidden, norm))
            axes[f"{pre}.conv2.weight"] = (out(new_res), inp(hidden), None, None)
            axes.update(_norm_axes(f"{pre}.bn2", new_res, norm))
            points[hidden] = [Point(f"{pre}.conv2", io="input", unit_axis=1)]
            points.setdefault(new_res, []).append(Point(pre, unit_axis=1))
            res = new_res
    if proj:
        axes["proj.weight"] = (None, inp(res))
        axes["proj.bias"] = (None,)
        points[res].append(Point("proj", io="input"))
    return PermutationSpec(perms, axes, points)


def clip_vision_spec(hidden: int, heads: int, intermediate: int, layers: int,
                     prefix: str = "vision_model.", projection: str = "visual_projection.weight") -> PermutationSpec:
    """The CLIP vision tower with transformers' names (``vision_model.encoder.layers.{i}...``)."""
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
    p = prefix
    perms = {"res": Perm(hidden)}
    axes: dict[str, tuple] = {
        f"{p}embeddings.class_embedding": (out("res"),),
        f"{p}embeddings.patch_embedding.weight": (out("res"), None, None, None),
        f"{p}embeddings.position_embedding.weight": (None, out("res")),
        f"{p}pre_layrnorm.weight": (out("res"),), f"{p}pre_layrnorm.bias": (out("res"),),
        f"{p}post_layernorm.weight": (out("res"),), f"{p}post_layernorm.bias": (out("res"),),
    }
    points = {"res": [Point(f"{p}pre_layrnorm")]}
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        qk, vo, mlp = f"layers.{i}.qk", f"layers.{i}.vo", f"layers.{i}.mlp"
        perms[qk] = Perm(hidden, hidden // heads, tie=f"layers.{i}.heads")
        perms[vo] = Perm(hidden, hidden // heads, tie=f"layers.{i}.heads")
        perms[mlp] = Perm(intermediate)
        for ln in ("layer_norm1", "layer_norm2"):
            axes[f"{b}{ln}.weight"] = (out("res"),)
            axes[f"{b}{ln}.bias"] = (out("res"),)
        for proj, perm in (("q_proj", qk), ("k_proj", qk), ("v_proj", vo)):
            axes[f"{b}self_attn.{proj}.weight"] = (out(perm), inp("res"))
            axes[f"{b}self_attn.{proj}.bias"] = (out(perm),)
        axes[f"{b}self_attn.out_proj.weight"] = (out("res"), inp(vo))
        axes[f"{b}self_attn.out_proj.bias"] = (out("res"),)
        axes[f"{b}mlp.fc1.weight"] = (out(mlp), inp("res"))
        axes[f"{b}mlp.fc1.bias"] = (out(mlp),)
        axes[f"{b}mlp.fc2.weight"] = (out("res"), inp(mlp))
        axes[f"{b}mlp.fc2.bias"] = (out("res"),)
        points[qk] = [Point(f"{b}self_attn.q_proj"), Point(f"{b}self_attn.k_proj")]
        points[vo] = [Point(f"{b}self_attn.out_proj", io="input")]
        points[mlp] = [Point(f"{b}mlp.fc2", io="input")]
        points["res"].append(Point(f"{b[:-1]}"))
    if projection:
        axes[projection] = (None, inp("res"))
    return PermutationSpec(perms, axes, points)


def spec_for(module: Any) -> PermutationSpec:
    """The spec of a task module's network (``module.model``), from its family."""
    family = getattr(module, "family", None)
    if family == "resnet-cifar":
        return resnet20_spec(module.width, module.norm, module.groups, proj=True)
    if family == "mlp-scratch":
        return mlp_spec(module.in_dim, module.width, module.hidden_layers, module.out_dim)
    if family == "clip-hf":
        vc = module.model.config.vision_config
        return clip_vision_spec(vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers)
    raise ValueError(f"no permutation spec for the {family!r} family (specs exist for resnet-cifar, mlp-scratch, "
                     "clip-hf: src/permute/specs.py)")
