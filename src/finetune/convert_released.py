"""Convert the task-vectors authors' released open_clip checkpoints into task checkpoints.

CART's tables and KnOTS' full-finetune analyses use the ViT checkpoints that Ilharco et al.
("Editing Models with Task Arithmetic", github mlfoundations/task_vectors) released: each is a
``torch.save`` of a WHOLE module, a pickle. ``finetuned.pt`` / ``zeroshot.pt`` hold their
``src.modeling.ImageEncoder`` (``self.model``: an open_clip ``CLIP`` with the text transformer
deleted, plus the torchvision ``train_preprocess`` / ``val_preprocess`` and ``cache_dir``);
``head_<Dataset>Val.pt`` holds their ``src.modeling.ClassificationHead`` (a ``torch.nn.Linear``
whose weight is ``exp(logit_scale) *`` the normalized zero-shot class embeddings, zero bias,
``normalize=True``). Their environment: open-clip-torch 2.0.2, torch 1.12.1, torchvision 0.13.1.

::

    python -m src.finetune.convert_released --checkpoint ViT-B-32/Cars/finetuned.pt --task cars \\
        --base open_clip:ViT-B-32:openai --labels-from cars --head ViT-B-32/head_CarsVal.pt \\
        --output checkpoints/C_vitb32_released/cars

Loading never runs plain ``torch.load`` on the file. It goes through ``torch.load(...,
weights_only=False, pickle_module=<this module's allow-list unpickler>)``: every global the
pickle names (``module.name``) must be on :data:`ALLOW_LIST`, else loading stops with
:class:`ConversionError` naming the file and the refused ``module.name`` before anything is
built from it (and nothing is written). Allowed globals are either harmless torch helpers
(tensor / parameter rebuilders, wrapped so no hooks or Python state ride along),
``collections.OrderedDict``, ``set``, ``torch.Size`` and dtypes, or inert STAND-INS: every
torch.nn, open_clip, torchvision and task-vectors class maps to a :class:`PickledObject`
subclass that only stores the attributes it is given, so neither open_clip, torchvision nor the
task_vectors repository has to be importable and no model code runs. Storages are resolved by
torch.load itself (a dtype record). TorchScript archives (which torch.load would hand to
``torch.jit.load``) are refused. The parameters and persistent buffers are then collected by
walking the stand-ins' ``_parameters`` / ``_buffers`` / ``_modules`` dicts, as
``nn.Module.state_dict()`` would.

What is converted
    * ``model.safetensors``: the image tower, ``model.visual.*`` of the ImageEncoder (also
      ``image_encoder.model.visual.*`` of an ImageClassifier, ``visual.*`` of a bare CLIP or a
      pickled state dict) renamed to ``visual.*`` -- the names this project's open_clip full
      finetunes export (``ClipClassifier.trained_state_dict``: the trainable ``visual`` tower of
      the open_clip ``CLIP``), dtypes as stored. For ViT-B-32 / ViT-B-16 / ViT-L-14 the names
      and shapes are checked against the architecture (:data:`VIT_SHAPES`).
    * ``task.json``: task, ``base_model`` = ``open_clip:<name>:<tag>`` as ``ClipClassifier``
      writes it, family ``clip-open_clip``, kind ``full``, label names (and templates) from
      ``--labels-from``, ``hparams.module`` (rebuilds ``ClipClassifier``), ``hparams.datamodule``
      when the labels came from a datamodule, ``hparams.source`` (file, sha256, size, root
      class, the pickle's globals, the tensors not exported) and ``hparams.head``.
    * ``head.safetensors`` (``weight``: L2-normalized class embeddings (C, D), ``logit_scale``)
      from ``--head`` (a released ClassificationHead pickle, loaded through the same allow-list;
      its rows all have norm ``exp(logit_scale)``, which is split off) or the head inside an
      ImageClassifier pickle; or, with ``--compute-head``, computed like this project's own
      finetunes do (the base model's frozen text tower x the task's templates): that needs
      open_clip (the GPU extra) and the pretrained weights, so it is a separate, optional step.

What is not converted
    * The text side left in the ImageEncoder (``token_embedding``, ``positional_embedding``,
      ``ln_final``, ``text_projection``, ``logit_scale``): frozen in their finetuning and not a
      trainable parameter here; listed in ``hparams.source.not_exported``.
    * The preprocessing transforms, ``cache_dir`` and every other Python attribute: dropped.
    * Training hyperparameters and accuracies: the pickle does not hold them (``metrics`` is
      empty; their recipe: AdamW lr 1e-5, wd 0.1, batch 128, cosine, 500 warmup steps).
    * Without ``--head`` / ``--compute-head`` no ``head.safetensors`` is written: merging reads
      only ``model.safetensors``, but evaluation and ``load_task_model`` need the head.
    * Other architectures (ResNet ``ModifiedResNet``, timm towers) load through the allow-list
      but their names/shapes are not checked here (``check_full_weights`` checks them against
      the base model when one is loaded).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..safe_output import TASK_MARKER, OutputError, atomic_directory, check_output, note
from ..task_checkpoint import FULL_WEIGHTS, HEAD_WEIGHTS, TaskInfo, write_task_info

CLIP_CLASS_PATH = "src.finetune.models.clip.ClipClassifier"
VISION_PREFIX = "visual."  # ClipClassifier.vision_prefix for backend="open_clip"


class ConversionError(ValueError):
    """A released checkpoint cannot be converted; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global (``module.name``) that is not on :data:`ALLOW_LIST`."""

    def __init__(self, source: str, module: str, name: str):
        self.source, self.module, self.name = source, module, name
        super().__init__(f"{source}: refused to unpickle {module}.{name}: not on the allow-list of "
                         "src.finetune.convert_released")


# ----- stand-ins ------------------------------------------------------------------------------
class PickledObject:
    """An object of an allow-listed class, rebuilt WITHOUT that class's code.

    The unpickler creates it with ``cls.__new__`` (NEWOBJ) or by calling it (REDUCE: the
    arguments are only stored) and gives it its attributes through :meth:`__setstate__`
    (stored in ``__dict__`` as they are). Nothing else is ever called on it; the converter
    reads ``__dict__`` directly. ``pickled_class`` is the ``module.name`` the pickle used.
    """

    pickled_class = "?"
    dump_patches = False  # read by torch.load's legacy-format source check (never writes .patch files)

    def __init__(self, *args, **kwargs):
        self.__dict__["_pickled_args"] = args
        if kwargs:
            self.__dict__["_pickled_kwargs"] = kwargs

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
                and (state[1] is None or isinstance(state[1], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slots state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickled_state"] = state

    def __repr__(self):
        return f"<stand-in for {self.pickled_class}>"


_STAND_IN_CACHE: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
    """The (cached) :class:`PickledObject` subclass standing in for ``module.name``."""
    key = (module, name)
    cls = _STAND_IN_CACHE.get(key)
    if cls is None:
        cls = type(name, (PickledObject,), {"pickled_class": f"{module}.{name}",
                                            "__module__": __name__, "__qualname__": f"stand_in[{module}.{name}]"})
        _STAND_IN_CACHE[key] = cls
    return cls


def pickled_class(obj) -> str:
    """``module.name`` of a stand-in, else the Python type's name."""
    if isinstance(obj, PickledObject):
        return obj.pickled_class
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# ----- safe rebuild helpers ---------------------------------------------------------------------
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` without the pickled backward hooks (never serialized
    with content; a crafted pickle could put objects there)."""
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, OrderedDict(),
                                           metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """Like ``torch._utils._rebuild_parameter_with_state`` but the Python attributes pickled
    with the parameter are dropped (only the values are converted)."""
    return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())


# ----- the allow-list ---------------------------------------------------------------------------
#: Globals that resolve to real objects: pure tensor builders and plain containers / values.
REAL_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): OrderedDict,  # Module._parameters/_buffers/_modules/hook dicts
    ("builtins", "set"): set,  # Module._non_persistent_buffers_set (protocol 2 pickles sets by reduce)
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    **{("torch", dt): getattr(torch, dt) for dt in ("float16", "float32", "float64", "bfloat16", "int64", "uint8")},
}

#: Classes (and the functions the preprocess pipelines reference) that become inert stand-ins.
#: Sources: task_vectors src/modeling.py (its classes), the open_clip 2.0.2 it pins
#: (environment.yml: open-clip-torch==2.0.2, torch 1.12.1, torchvision 0.13.1): model.py's
#: classes and the torch.nn modules their constructors use, transform.py's pipeline; and the
#: open_clip >= 2.7 locations of the same classes (open_clip.transformer, modified_resnet).
STAND_IN_GLOBALS: dict[str, tuple[str, ...]] = {
    # mlfoundations/task_vectors src/modeling.py
    "src.modeling": ("ImageEncoder", "ClassificationHead", "ImageClassifier", "MultiHeadImageClassifier"),
    # open_clip 2.0.2 src/open_clip/model.py
    "open_clip.model": ("CLIP", "VisualTransformer", "Transformer", "ResidualAttentionBlock", "LayerNorm",
                        "QuickGELU", "Attention", "ModifiedResNet", "Bottleneck", "AttentionPool2d",
                        "CustomTextCLIP"),
    # open_clip >= 2.7 (the same towers moved to transformer.py / modified_resnet.py)
    "open_clip.transformer": ("VisionTransformer", "TextTransformer", "Transformer", "ResidualAttentionBlock",
                              "LayerNorm", "LayerNormFp32", "QuickGELU", "LayerScale", "PatchDropout",
                              "Attention", "AttentionalPooler"),
    "open_clip.modified_resnet": ("ModifiedResNet", "Bottleneck", "AttentionPool2d"),
    # open_clip 2.0.2 src/open_clip/transform.py: the preprocess pipelines stored on the ImageEncoder
    "open_clip.transform": ("_convert_to_rgb", "ResizeMaxSize"),
    "builtins": ("min", "max"),  # ResizeMaxSize.fn (a reference to min, never called here)
    "torchvision.transforms.transforms": ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize",
                                          "RandomResizedCrop"),
    "torchvision.transforms.functional": ("InterpolationMode",),
    # torch.nn modules the open_clip towers are built from (pickled under their defining modules)
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.linear": ("Linear", "NonDynamicallyQuantizableLinear", "_LinearWithBias", "Identity"),
    "torch.nn.modules.activation": ("MultiheadAttention", "GELU", "ReLU"),
    "torch.nn.modules.container": ("Sequential", "ModuleList", "ModuleDict"),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.sparse": ("Embedding",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.pooling": ("AvgPool2d",),
}

#: Every ``(module, name)`` the unpickler accepts (storages are resolved by torch.load first).
ALLOW_LIST: frozenset[tuple[str, str]] = frozenset(
    set(REAL_GLOBALS) | {(m, n) for m, names in STAND_IN_GLOBALS.items() for n in names})


def _allow_list_module(source: str, seen: set) -> types.ModuleType:
    """A pickle-module object for ``torch.load(pickle_module=...)``: ``Unpickler`` whose
    ``find_class`` accepts only :data:`ALLOW_LIST` (recording what it resolved in ``seen``)."""

    class AllowListUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            # protocol-2 pickles (torch.save's default) write Python 2 names (__builtin__.set);
            # pickle's own find_class maps them back with the same tables
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            key = (module, name)
            if key in REAL_GLOBALS:
                seen.add(f"{module}.{name}")
                return REAL_GLOBALS[key]
            if key in ALLOW_LIST:
                seen.add(f"{module}.{name}")
                return stand_in(module, name)
            raise ForbiddenGlobal(source, str(module), str(name))

    def load(file, **kwargs):
        return AllowListUnpickler(file, **kwargs).load()

    def loads(data, **kwargs):
        return AllowListUnpickler(io.BytesIO(data), **kwargs).load()

    mod = types.ModuleType(f"{__name__}.allow_list_pickle")
    mod.Unpickler = AllowListUnpickler
    mod.load, mod.loads = load, loads
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


# ----- loading ------------------------------------------------------------------------------------
@dataclass
class LoadedPickle:
    path: Path
    obj: Any
    sha256: str
    size: int
    globals: list[str] = field(default_factory=list)

    @property
    def root_class(self) -> str:
        return pickled_class(self.obj)


def _sha256(f) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _refuse_torchscript(f, path) -> None:
    """torch.load hands TorchScript archives to torch.jit.load (it runs their code): refuse them."""
    f.seek(0)
    if zipfile.is_zipfile(f):
        f.seek(0)
        try:
            names = zipfile.ZipFile(f).namelist()
        except zipfile.BadZipFile as e:
            raise ConversionError(path, f"not a readable torch.save archive ({e})") from None
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            raise ConversionError(path, "is a TorchScript archive (it holds code); refused: only torch.save "
                                        "pickles of modules/tensors are converted")
    f.seek(0)
    try:  # torch's own test, on its own zip reader (the one torch.load uses)
        from torch.serialization import _is_torchscript_zip, _is_zipfile, _open_zipfile_reader
    except ImportError:  # private helpers moved: the zipfile check above stands
        return
    if _is_zipfile(f):
        with _open_zipfile_reader(f) as reader:
            if _is_torchscript_zip(reader):
                raise ConversionError(path, "is a TorchScript archive (it holds code); refused")
    f.seek(0)


def load_released(path) -> LoadedPickle:
    """Unpickle a released checkpoint through the allow-list (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, "no such file")
    seen: set[str] = set()
    with open(path, "rb") as f:
        digest = _sha256(f)
        size = f.tell()
        _refuse_torchscript(f, path)
        try:
            with warnings.catch_warnings():  # legacy files: the stand-ins have no source to compare
                warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
                obj = torch.load(f, map_location="cpu", weights_only=False, mmap=False,
                                 pickle_module=_allow_list_module(str(path), seen))
        except ForbiddenGlobal as e:
            raise ConversionError(path, f"refused to unpickle {e.module}.{e.name}: it is not on the allow-list "
                                        "of known task-vectors / open_clip / torch classes, so the file was not "
                                        "loaded and nothing was written") from None
        except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, TypeError, ValueError,
                KeyError, IndexError, zipfile.BadZipFile) as e:
            raise ConversionError(path, f"cannot be read as a torch.save checkpoint: {type(e).__name__}: {e}") from None
    return LoadedPickle(path, obj, digest, size, sorted(seen))


# ----- state dicts ------------------------------------------------------------------------------
def _plain_tensor(value, where, name) -> torch.Tensor:
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise ConversionError(where, f"{name} is a {pickled_class(value)}, not a tensor")
    return value.detach()


def module_state_dict(obj, where) -> "OrderedDict[str, torch.Tensor]":
    """``state_dict()`` of a stand-in module tree (parameters, persistent buffers), or the tensors
    of a pickled state dict, without running any module code."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ConversionError(where, "holds a dict whose keys are not all strings (not a state dict)")
        return OrderedDict((k, _plain_tensor(v, where, repr(k))) for k, v in obj.items())
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    stack: list[int] = []

    def visit(module, prefix: str) -> None:
        d = module.__dict__ if isinstance(module, PickledObject) else None
        if d is None or not isinstance(d.get("_parameters"), dict) or not isinstance(d.get("_modules", {}), dict):
            raise ConversionError(where, f"{prefix.rstrip('.') or 'the root object'} is a {pickled_class(module)}, "
                                         "not a torch.nn.Module")
        if id(module) in stack or len(stack) > 100:
            raise ConversionError(where, f"module {prefix.rstrip('.')} contains itself")
        stack.append(id(module))
        skip = d.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            tensors = d.get(group) or {}
            if not isinstance(tensors, dict):
                raise ConversionError(where, f"{prefix}{group} is not a dict")
            for name, value in tensors.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                out[prefix + str(name)] = _plain_tensor(value, where, prefix + str(name))
        for name, child in (d.get("_modules") or {}).items():
            if child is not None:
                visit(child, f"{prefix}{name}.")
        stack.pop()

    visit(obj, "")
    return out


#: Where the open_clip image tower sits in what the task-vectors code pickled.
VISUAL_PREFIXES = ("model.visual.",                # src.modeling.ImageEncoder (finetuned.pt, zeroshot.pt)
                   "image_encoder.model.visual.",  # src.modeling.ImageClassifier
                   "visual.")                      # a bare open_clip CLIP, or a pickled CLIP state dict

#: (width, layers, patch, image size, embed dim) of the task-vectors ViTs (open_clip model_configs).
VIT_SHAPES = {"ViT-B-32": (768, 12, 32, 224, 512), "ViT-B-32-quickgelu": (768, 12, 32, 224, 512),
              "ViT-B-16": (768, 12, 16, 224, 512), "ViT-L-14": (1024, 24, 14, 224, 768)}


def expected_visual_shapes(model_name: str) -> Optional[dict[str, tuple]]:
    """``visual.*`` names and shapes of open_clip's VisionTransformer for ``model_name`` (OpenAI
    layout: no layer scale, class-token pooling), or ``None`` for architectures not tabulated."""
    if model_name not in VIT_SHAPES:
        return None
    w, layers, patch, image, embed = VIT_SHAPES[model_name]
    grid = image // patch
    shapes = {"class_embedding": (w,), "positional_embedding": (grid * grid + 1, w), "proj": (w, embed),
              "conv1.weight": (w, 3, patch, patch), "ln_pre.weight": (w,), "ln_pre.bias": (w,),
              "ln_post.weight": (w,), "ln_post.bias": (w,)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                       b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                       b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                       b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                       b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
    return {VISION_PREFIX + k: v for k, v in shapes.items()}


def _check_values(where, state: dict[str, torch.Tensor]) -> None:
    for key, t in state.items():
        if not t.is_floating_point():
            raise ConversionError(where, f"tensor {key!r} has dtype {t.dtype}, expected floating point weights")
        if not bool(torch.isfinite(t).all()):
            raise ConversionError(where, f"tensor {key!r} holds NaN or infinite values")


def visual_state(loaded: LoadedPickle, model_name: str) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The image tower as ``visual.*`` tensors; the prefix it was found under; the other keys."""
    where = loaded.path
    state = module_state_dict(loaded.obj, where)
    prefix = next((p for p in VISUAL_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ConversionError(where, f"holds a {loaded.root_class} with no open_clip image tower (no keys under "
                                     f"{' / '.join(VISUAL_PREFIXES)}); keys: {list(state)[:5]}")
    visual = {VISION_PREFIX + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = [k for k in state if not k.startswith(prefix)]
    expected = expected_visual_shapes(model_name)
    if expected is not None:
        missing = [k for k in expected if k not in visual]
        unexpected = [k for k in visual if k not in expected]
        wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in visual.items()
                 if k in expected and tuple(v.shape) != expected[k]]
        if missing or unexpected or wrong:
            raise ConversionError(where, f"the image tower is not open_clip {model_name}'s: "
                                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                                         f"(e.g. {unexpected[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})")
    _check_values(where, visual)
    return visual, prefix, rest


def head_tensors(obj, where) -> dict[str, torch.Tensor]:
    """``head.safetensors`` tensors from a task-vectors ``ClassificationHead`` (normalize=True,
    weight = exp(logit_scale) * unit class embeddings, zero bias)."""
    if not isinstance(obj, PickledObject) or obj.pickled_class != "src.modeling.ClassificationHead":
        raise ConversionError(where, f"holds a {pickled_class(obj)}, expected a task-vectors "
                                     "src.modeling.ClassificationHead")
    if obj.__dict__.get("normalize") is not True:
        raise ConversionError(where, f"the head has normalize={obj.__dict__.get('normalize')!r}: only heads that "
                                     "normalize the image features (the zero-shot heads) convert to this "
                                     "project's head")
    params = module_state_dict(obj, where)
    if set(params) - {"weight", "bias"} or "weight" not in params:
        raise ConversionError(where, f"the head has tensors {list(params)}, expected weight and bias")
    weight = params["weight"].float()
    if weight.ndim != 2 or 0 in weight.shape:
        raise ConversionError(where, f"the head weight has shape {tuple(weight.shape)}, expected (classes, dim)")
    _check_values(where, {"weight": weight})
    bias = params.get("bias")
    if bias is not None and float(bias.float().abs().max()) > 1e-6:
        raise ConversionError(where, "the head has a non-zero bias, which this project's head (scaled cosine "
                                     "similarities) cannot hold")
    norms = weight.norm(dim=1)
    scale = float(norms.mean())
    if not scale > 0 or float((norms - scale).abs().max()) > 1e-3 * scale:
        raise ConversionError(where, f"the head's rows have norms {float(norms.min()):.4g}..{float(norms.max()):.4g}: "
                                     "not exp(logit_scale) times unit vectors, so no logit_scale reproduces it")
    return {"weight": (weight / norms[:, None]).contiguous(), "logit_scale": torch.tensor(math.log(scale))}


# ----- labels ----------------------------------------------------------------------------------
@dataclass
class Labels:
    names: list[str]
    templates: Optional[list[str]]
    datamodule: Optional[dict]  # hparams.datamodule (what evaluation rebuilds), when known
    source: str


def _label_file(path: Path) -> Labels:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(path, f"unreadable label file: {e}") from None
    templates = None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConversionError(path, f"not JSON: {e}") from None
        if isinstance(doc, dict):
            names = doc.get("label_names", doc.get("classnames"))
            templates = doc.get("templates")
        else:
            names = doc
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConversionError(path, "expected a non-empty list of class names (a JSON list, an object with "
                                    "'label_names' or 'classnames', or one name a line)")
    if templates is not None and (not isinstance(templates, list) or not all(isinstance(t, str) for t in templates)):
        raise ConversionError(path, "'templates' must be a list of strings")
    return Labels(list(names), list(templates) if templates else None, None, f"file {path}")


def _datamodule_labels(cls, task: str, where: str) -> Labels:
    from .export import datamodule_hparams

    kwargs = {"task": task} if "task" in inspect.signature(cls.__init__).parameters else {}
    try:
        dm = cls(**kwargs)
    except Exception as e:
        raise ConversionError(where, f"cannot construct {cls.__name__}({kwargs}): {e}") from None
    names = getattr(dm, "label_names", None)
    if not isinstance(names, (list, tuple)) or not names:
        raise ConversionError(where, f"{cls.__name__} exposes no label_names after construction")
    templates = getattr(dm, "templates", None)
    return Labels([str(n) for n in names], list(templates) if templates else None, datamodule_hparams(dm),
                  f"datamodule {cls.__module__}.{cls.__qualname__}({kwargs})")


def resolve_labels(spec: Optional[str], task: str) -> Labels:
    """``--labels-from``: a label file (.json / .txt), a vision task name (cars, DTD, ...: the
    task-vectors class names and templates of ``data/vision``), or a datamodule class path
    (constructed with ``task=<--task>``). Default: ``--task`` when it is a vision task."""
    from .data.labels import VISION_TASKS

    if spec is None:
        if task.lower() not in VISION_TASKS:
            raise ConversionError("--labels-from", f"task {task!r} is not one of the vision tasks "
                                                   f"({', '.join(VISION_TASKS)}): name a label file or datamodule")
        spec = task
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _label_file(path)
    if spec.lower() in VISION_TASKS:
        from .data.vision import VisionTaskDataModule

        return _datamodule_labels(VisionTaskDataModule, spec.lower(), "--labels-from")
    module_name, _, name = spec.rpartition(".")
    if module_name:
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as e:
            raise ConversionError("--labels-from",
                                  f"{spec!r} is no file, vision task or importable class: {e}") from None
        if isinstance(cls, type):
            return _datamodule_labels(cls, task, "--labels-from")
    raise ConversionError("--labels-from", f"{spec!r} is no label file, vision task or datamodule class path")


# ----- conversion --------------------------------------------------------------------------------
def parse_base(base: str) -> tuple[str, str]:
    """``open_clip:<model name>:<pretrained tag>`` -> (name, tag)."""
    parts = str(base).split(":")
    if len(parts) != 3 or parts[0] != "open_clip" or not parts[1] or not parts[2]:
        raise ConversionError("--base", f"{base!r}: expected open_clip:<model name>:<pretrained tag>, e.g. "
                                        "open_clip:ViT-B-32:openai (the released checkpoints are open_clip models)")
    return parts[1], parts[2]


def _source_record(loaded: LoadedPickle) -> dict[str, Any]:
    return {"file": str(loaded.path.resolve()), "sha256": loaded.sha256, "bytes": loaded.size,
            "root_class": loaded.root_class, "pickle_globals": loaded.globals}


def convert(checkpoint, task: str, output, base: str = "open_clip:ViT-B-32:openai", labels_from: Optional[str] = None,
            head: Optional[str] = None, compute_head: bool = False, overwrite: bool = False) -> Path:
    """Write the task checkpoint of a released task-vectors checkpoint (see the module docstring)."""
    model_name, tag = parse_base(base)
    if head is not None and compute_head:
        raise ConversionError("--head", "give either --head or --compute-head, not both")
    inputs = [str(checkpoint)] + ([str(head)] if head is not None else [])
    replacing = check_output(output, inputs, TASK_MARKER, overwrite)  # before any work
    if compute_head and importlib.util.find_spec("open_clip") is None:
        raise ConversionError("--compute-head", "needs open_clip (the optional GPU extra: pip install -e .[openclip]); "
                                                "convert without a head here, or pass the released head with --head")
    task = str(task).replace(os.sep, "_")
    if not task:
        raise ConversionError("--task", "a task name is required")
    labels = resolve_labels(labels_from, task)

    from .models.clip import ClipClassifier

    module = ClipClassifier(pretrained=model_name, backend="open_clip", finetune="full", pretrained_tag=tag)
    if module.vision_prefix != VISION_PREFIX:  # the names ClipClassifier's open_clip full finetunes export
        raise RuntimeError(f"ClipClassifier's open_clip tower prefix is {module.vision_prefix!r}, not {VISION_PREFIX!r}")
    loaded = load_released(checkpoint)
    visual, prefix, rest = visual_state(loaded, model_name)
    embed_dim = visual[VISION_PREFIX + "proj"].shape[1] if VISION_PREFIX + "proj" in visual else None

    head_state, head_record = None, None
    if head is not None:
        head_loaded = load_released(head)
        head_state = head_tensors(head_loaded.obj, head_loaded.path)
        head_record = {"from": "released ClassificationHead", **_source_record(head_loaded)}
    elif isinstance(loaded.obj, PickledObject) and loaded.obj.pickled_class == "src.modeling.ImageClassifier":
        inner = (loaded.obj.__dict__.get("_modules") or {}).get("classification_head")
        head_state = head_tensors(inner, loaded.path)
        head_record = {"from": "the ImageClassifier's classification_head", "file": str(loaded.path.resolve())}
        rest = [k for k in rest if not k.startswith("classification_head.")]
    if head_state is not None:
        rows, dim = head_state["weight"].shape
        if rows != len(labels.names):
            raise ConversionError(head or checkpoint, f"the head has {rows} classes but {labels.source} gives "
                                                      f"{len(labels.names)} labels")
        if embed_dim is not None and dim != embed_dim:
            raise ConversionError(head or checkpoint, f"the head's dimension {dim} is not the image tower's output "
                                                      f"dimension {embed_dim}")
    templates = labels.templates or list(module.default_templates)
    if compute_head:
        base_model = module.load_base()
        weight = module.compute_head(base_model, labels.names, templates)
        head_state = {"weight": weight.detach().float().cpu().contiguous(),
                      "logit_scale": base_model.logit_scale.detach().float().cpu().reshape(())}
        head_record = {"from": "computed: base text tower x templates (ClipClassifier.compute_head)"}

    source = _source_record(loaded)
    source.update({"format": "task_vectors torch.save pickle (whole module), loaded through an allow-list",
                   "visual_prefix": prefix, "tensors": len(visual),
                   "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in visual.values()}),
                   "not_exported": rest})
    hparams = {"pretrained": model_name, "finetune": "full", "lora": None, "templates": templates,
               "module": {"class_path": CLIP_CLASS_PATH, "init_args": module.init_args()},
               "source": source, "head": head_record,
               "converted_by": "src.finetune.convert_released",
               "training": "task_vectors recipe; its hyperparameters are not stored in the checkpoint"}
    if labels.datamodule is not None:
        hparams["datamodule"] = labels.datamodule
    info = TaskInfo(task=task, base_model=module.base_model_id, family=module.family, kind="full",
                    label_names=list(labels.names), hparams=hparams, metrics={})
    from safetensors.torch import save_file

    if replacing:
        note(replacing)
    output = Path(output)
    with atomic_directory(output) as tmp:
        save_file({k: v.contiguous().clone() for k, v in visual.items()}, str(tmp / FULL_WEIGHTS),
                  metadata={"format": "pt"})
        if head_state is not None:
            save_file(head_state, str(tmp / HEAD_WEIGHTS))
        write_task_info(tmp, info)
    return output


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.finetune.convert_released",
        description="Convert a task-vectors released open_clip checkpoint (a torch.save pickle of a whole "
                    "module) into a task checkpoint, unpickling only allow-listed classes.")
    parser.add_argument("--checkpoint", required=True, help="the released .pt (e.g. ViT-B-32/Cars/finetuned.pt)")
    parser.add_argument("--task", required=True, help="task name written to task.json (e.g. cars)")
    parser.add_argument("--base", default="open_clip:ViT-B-32:openai",
                        help="base model id open_clip:<name>:<tag> (default open_clip:ViT-B-32:openai)")
    parser.add_argument("--labels-from", default=None,
                        help="label file (.json/.txt), vision task name, or datamodule class path "
                             "(default: --task when it is a vision task)")
    parser.add_argument("--head", default=None, help="released ClassificationHead pickle (head_<Dataset>Val.pt)")
    parser.add_argument("--compute-head", action="store_true",
                        help="compute the zero-shot head from the base text tower (needs open_clip)")
    parser.add_argument("--output", required=True, help="the task-checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty directory that is not a task checkpoint")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.task, args.output, base=args.base, labels_from=args.labels_from,
                      head=args.head, compute_head=args.compute_head, overwrite=args.overwrite)
    except (ConversionError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    has_head = (out / HEAD_WEIGHTS).is_file()
    print(f"task checkpoint written to {out}" + ("" if has_head else
          " (no head.safetensors: merging works; evaluation needs --head or --compute-head)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
