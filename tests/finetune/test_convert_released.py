"""src.finetune.convert_released: task-vectors released pickles -> task checkpoints, offline.

The released files are ``torch.save`` pickles of whole modules whose classes live in modules
named ``src.modeling`` (task_vectors), ``open_clip.model`` / ``open_clip.transform`` (open_clip
2.0.2) and ``torchvision.transforms.*``. None of those is installed here (and ``src`` is THIS
project's package), so the tests build look-alikes: tiny classes that mirror those classes'
attributes (built from real ``torch.nn`` modules, as open_clip's are) with their
``__module__`` / ``__qualname__`` set to the released names. Pickle writes a class by name
and checks that ``sys.modules[module].<name>`` is that class, so while ``torch.save`` runs the
names are registered as stand-in module objects in ``sys.modules`` (``src.modeling`` becomes a
temporary entry beside the real ``src`` package; no file is touched), and removed again before
the converter runs, which proves it needs none of them.
"""
from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from src.finetune.convert_released import (ALLOW_LIST, ConversionError, PickledObject, convert,
                                           expected_visual_shapes, load_released, main, module_state_dict)
from src.task_checkpoint import read_task_info


# ----- look-alikes of the released classes ------------------------------------------------------
def _released(module: str, name: str):
    def mark(obj):
        obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
        return obj
    return mark


@_released("open_clip.model", "LayerNorm")
class OCLayerNorm(nn.LayerNorm):
    pass


@_released("open_clip.model", "QuickGELU")
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@_released("open_clip.model", "ResidualAttentionBlock")
class ResidualAttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = OCLayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_attn = nn.Identity()
        self.ln_2 = OCLayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("ln", nn.Identity()),
                                              ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * d, d))]))


@_released("open_clip.model", "Transformer")
class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


@_released("open_clip.model", "VisualTransformer")
class VisualTransformer(nn.Module):
    def __init__(self, image_size=8, patch_size=4, width=8, layers=2, heads=2, output_dim=6):
        super().__init__()
        self.image_size, self.patch_size = (image_size, image_size), (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = OCLayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = OCLayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))
        self.image_mean, self.image_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@_released("open_clip.model", "CLIP")
class CLIP(nn.Module):
    def __init__(self, embed_dim=6, ctx=5, vocab=11, width=8):
        super().__init__()
        self.context_length = ctx
        self.visual = VisualTransformer(output_dim=embed_dim)
        self.transformer = Transformer(width, 1, 2)
        self.vocab_size = vocab
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width))
        self.ln_final = OCLayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)


@_released("open_clip.transform", "_convert_to_rgb")
def _convert_to_rgb(image):
    return image.convert("RGB")


@_released("torchvision.transforms.functional", "InterpolationMode")
class InterpolationMode(enum.Enum):
    BICUBIC = "bicubic"


@_released("torchvision.transforms.transforms", "Compose")
class Compose:
    def __init__(self, transforms):
        self.transforms = transforms


@_released("torchvision.transforms.transforms", "ToTensor")
class ToTensor:
    pass


@_released("torchvision.transforms.transforms", "Resize")
class Resize(nn.Module):
    def __init__(self, size, interpolation):
        super().__init__()
        self.size, self.interpolation, self.max_size, self.antialias = size, interpolation, None, None


@_released("torchvision.transforms.transforms", "CenterCrop")
class CenterCrop(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = (size, size)


@_released("torchvision.transforms.transforms", "RandomResizedCrop")
class RandomResizedCrop(nn.Module):
    def __init__(self, size, interpolation):
        super().__init__()
        self.size, self.scale, self.ratio, self.interpolation = (size, size), (0.9, 1.0), (3 / 4, 4 / 3), interpolation


@_released("torchvision.transforms.transforms", "Normalize")
class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std, self.inplace = mean, std, False


@_released("src.modeling", "ImageEncoder")
class ImageEncoder(nn.Module):
    """task_vectors src/modeling.py ImageEncoder (keep_lang=False deletes the text transformer)."""

    def __init__(self):
        super().__init__()
        self.model = CLIP()
        norm = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        self.train_preprocess = Compose([RandomResizedCrop(8, InterpolationMode.BICUBIC), _convert_to_rgb,
                                         ToTensor(), norm])
        self.val_preprocess = Compose([Resize(8, InterpolationMode.BICUBIC), CenterCrop(8), _convert_to_rgb,
                                       ToTensor(), norm])
        self.cache_dir = None
        delattr(self.model, "transformer")


@_released("src.modeling", "ClassificationHead")
class ClassificationHead(nn.Linear):
    """task_vectors src/modeling.py ClassificationHead."""

    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))


LOOK_ALIKES = [OCLayerNorm, QuickGELU, ResidualAttentionBlock, Transformer, VisualTransformer, CLIP, _convert_to_rgb,
               InterpolationMode, Compose, ToTensor, Resize, CenterCrop, RandomResizedCrop, Normalize, ImageEncoder,
               ClassificationHead]
FAKE_MODULES = ("src.modeling", "open_clip", "open_clip.model", "open_clip.transform", "torchvision",
                "torchvision.transforms", "torchvision.transforms.transforms", "torchvision.transforms.functional")


@contextlib.contextmanager
def released_names():
    """Register the look-alikes under the released module names while a pickle is written."""
    fakes = {name: types.ModuleType(name) for name in FAKE_MODULES}
    for obj in LOOK_ALIKES:
        setattr(fakes[obj.__module__], obj.__qualname__, obj)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in fakes.items():
            mp.setitem(sys.modules, name, module)
        yield
    assert not any(sys.modules.get(name) is module for name, module in fakes.items())


def save_released(obj, path: Path, legacy: bool = False) -> Path:
    with released_names(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")  # legacy format, renamed classes
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class Evil:
    """Pickles as a call of ``func`` (a global the allow-list must refuse)."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return ImageEncoder()


@pytest.fixture
def label_file(tmp_path) -> Path:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"label_names": ["cat", "dog", "car"], "templates": ["a photo of a {}."]}))
    return path


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ----- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_converts_image_encoder_pickle(tmp_path, encoder, label_file, legacy):
    ckpt = save_released(encoder, tmp_path / "finetuned.pt", legacy)
    assert "src.modeling" not in sys.modules and "open_clip" not in sys.modules and "torchvision" not in sys.modules

    loaded = load_released(ckpt)
    assert isinstance(loaded.obj, PickledObject) and loaded.root_class == "src.modeling.ImageEncoder"
    assert {"open_clip.model.VisualTransformer", "open_clip.transform._convert_to_rgb",
            "torchvision.transforms.functional.InterpolationMode", "src.modeling.ImageEncoder"} <= set(loaded.globals)
    # the walk over the stand-ins yields exactly nn.Module.state_dict() (non-persistent attn_mask left out)
    walked = module_state_dict(loaded.obj, ckpt)
    reference = encoder.state_dict()
    assert list(walked) == list(reference)
    assert all(torch.equal(walked[k], reference[k]) for k in reference)

    out = tmp_path / "out" / "cars"
    assert main(["--checkpoint", str(ckpt), "--task", "cars", "--base", "open_clip:tiny-test:none",
                 "--labels-from", str(label_file), "--output", str(out)]) == 0
    assert _listing(out) == ["model.safetensors", "task.json"]  # no head without --head / --compute-head
    assert _listing(out.parent) == ["cars"]  # no temporary debris

    weights = load_file(str(out / "model.safetensors"))
    expected = {f"visual.{k}": v for k, v in encoder.model.visual.state_dict().items()}
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key

    info = read_task_info(out)
    assert (info.task, info.base_model, info.family, info.kind) == ("cars", "open_clip:tiny-test:none",
                                                                    "clip-open_clip", "full")
    assert info.label_names == ["cat", "dog", "car"] and info.hparams["templates"] == ["a photo of a {}."]
    source = info.hparams["source"]
    assert source["sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert source["file"] == str(ckpt.resolve()) and source["root_class"] == "src.modeling.ImageEncoder"
    assert source["visual_prefix"] == "model.visual." and source["tensors"] == len(expected)
    assert sorted(source["not_exported"]) == sorted(k for k in reference if not k.startswith("model.visual."))
    assert info.hparams["head"] is None and "datamodule" not in info.hparams

    from src.finetune.load import build_module

    module = build_module(info, out)  # what evaluation rebuilds: the open_clip ClipClassifier, no open_clip import
    assert type(module).__name__ == "ClipClassifier" and module.backend == "open_clip"
    assert module.base_model_id == info.base_model and module.family == info.family
    assert "open_clip" not in sys.modules


def test_released_head_and_vision_task_labels(tmp_path, encoder):
    from src.finetune.data.labels import class_names, templates

    names = class_names("eurosat")
    torch.manual_seed(1)
    unit = nn.functional.normalize(torch.randn(len(names), 6), dim=-1)
    scale = 1 / 0.07
    head = ClassificationHead(normalize=True, weights=unit * scale)  # heads.py: weights *= logit_scale.exp()
    ckpt = save_released(encoder, tmp_path / "finetuned.pt")
    head_file = save_released(head, tmp_path / "head_EuroSATVal.pt")

    out = convert(ckpt, "eurosat", tmp_path / "eurosat", base="open_clip:tiny-test:none", labels_from="EuroSAT",
                  head=str(head_file))
    tensors = load_file(str(out / "head.safetensors"))
    assert sorted(tensors) == ["logit_scale", "weight"]
    assert torch.allclose(tensors["weight"], unit, atol=1e-6)
    assert abs(float(tensors["logit_scale"]) - math.log(scale)) < 1e-5
    # the project's logits (exp(scale) * cos) equal the released head's on normalized features
    feats = torch.randn(4, 6)
    ours = tensors["logit_scale"].exp() * nn.functional.normalize(feats, dim=-1) @ tensors["weight"].T
    theirs = head(feats / feats.norm(dim=-1, keepdim=True))
    assert torch.allclose(ours, theirs, atol=1e-4)

    info = read_task_info(out)
    assert info.label_names == names and info.hparams["templates"] == templates("eurosat")
    dm = info.hparams["datamodule"]
    assert dm["class_path"] == "src.finetune.data.vision.VisionTaskDataModule" and dm["init_args"]["task"] == "eurosat"
    assert info.hparams["head"]["from"] == "released ClassificationHead"
    assert info.hparams["head"]["sha256"] == __import__("hashlib").sha256(head_file.read_bytes()).hexdigest()

    # a head whose class count does not match the labels is refused, nothing written
    with pytest.raises(ConversionError, match=r"head has \d+ classes but"):
        convert(ckpt, "dtd", tmp_path / "dtd", base="open_clip:tiny-test:none", labels_from="dtd", head=str(head_file))
    assert not (tmp_path / "dtd").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("func, refused", [(os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval")])
def test_refuses_globals_off_the_allow_list(tmp_path, encoder, label_file, capsys, func, refused, legacy):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    encoder.cache_dir = Evil(func, command)  # deep inside the module tree, after many allowed objects
    ckpt = save_released(encoder, tmp_path / "finetuned.pt", legacy)
    assert (refused.split(".")[0], refused.split(".")[1]) not in ALLOW_LIST
    out_parent = tmp_path / "out"
    out_parent.mkdir()

    code = main(["--checkpoint", str(ckpt), "--task", "cars", "--base", "open_clip:tiny-test:none",
                 "--labels-from", str(label_file), "--output", str(out_parent / "cars")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(ckpt) in err and f"refused to unpickle {refused}" in err
    assert not marker.exists()  # the call never ran
    assert _listing(out_parent) == []  # no output, no temporary directory
    with pytest.raises(ConversionError, match=rf"refused to unpickle {refused}"):
        load_released(ckpt)


def test_refuses_torchscript_and_wrong_architecture(tmp_path, encoder, label_file):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ConversionError, match="TorchScript"):
        load_released(scripted)

    ckpt = save_released(encoder, tmp_path / "finetuned.pt")
    with pytest.raises(ConversionError, match="not open_clip ViT-B-32's"):
        convert(ckpt, "cars", tmp_path / "cars", labels_from=str(label_file))  # tiny tower, ViT-B-32 base
    assert not (tmp_path / "cars").exists()


def test_vit_b32_table_matches_the_architecture():
    shapes = expected_visual_shapes("ViT-B-32")
    assert len(shapes) == 8 + 12 * 12
    # CLIP ViT-B/32's image tower incl. its projection: 87,849,216 parameters
    assert sum(math.prod(s) for s in shapes.values()) == 87_849_216
    assert expected_visual_shapes("RN50") is None
