"""Data statistics of a task model in one Lightning pass: Gram matrices, diagonal Fisher, K-FAC.

What is computed (``src/task_statistics.py`` defines the files), for every ``nn.Linear`` of the
task model's base network (for LoRA models the base ``Linear`` inside each PEFT LoRA layer, whose
effective weight is ``W0 + scale * B @ A``), keyed by the base model's weight name
(``encoder.layer.0.attention.self.query.weight``), over ``N`` examples ``n`` with tokens ``t``
(``x``: the layer's input, ``g``: the gradient of the example's loss w.r.t. the layer's output,
``m``: the token mask, ``L_n``: the negative log-likelihood of example ``n``'s gold label,
``TaskModule.example_losses``)::

    gram[W]     = 1/N     sum_n sum_t m_nt x_nt x_nt^T                           (in, in)
    fisher[W]   = 1/N     sum_n (dL_n/dW)^2,  dL_n/dW = sum_t m_nt g_nt x_nt^T     W's shape
    fisher[b]   = 1/N     sum_n (sum_t m_nt g_nt)^2                               (bias)
    kfac_in[W]  = 1/T_W   sum_n sum_t m_nt x_nt x_nt^T                           (in, in)
    kfac_out[W] = 1/T_W   sum_n sum_t m_nt g_nt g_nt^T                           (out, out)

``T_W = sum_n sum_t m_nt``: the number of (unpadded) token positions the layer saw. The K-FAC
factors are per-token expectations, as MaTS computes them (r-three/mats,
``src/merging/save_metadata/save_gram_matrix.py``: masked ``x x^T`` and ``g g^T`` summed over
batch-size-1 examples, then ``normalize_activations`` divides by the total number of encoder or
decoder tokens); the Gram matrix is RegMean's (summed over tokens, averaged over examples), so
``gram = kfac_in * T_W / N``: one accumulator serves both. A Linear weight that another module
shares (an LM head tied to the input embedding) gets the statistics of its Linear use only
(``statistics.json`` lists such weights). MaTS' own ``g`` differentiates the
token-averaged target NLL (``EncoderDecoderWrapper.forward``); here ``L_n`` is the example's
summed NLL (a single label for classifiers, so the two agree there).

Token weighting: padded positions do not count. ``m`` is the batch's ``attention_mask`` (for
encoder-decoder models: inside the encoder and for inputs that are the encoder's output, e.g.
cross-attention keys / values; elsewhere in the decoder ``labels != -100``); a layer whose
sequence length matches no mask (vision tokens, pooled features) counts every position. With the
mask the statistics do not depend on how examples are batched (BERT-style encoders compute
activations at pad positions too, and RegMean implementations that sum the whole padded batch
would count them).

Per-example gradients come from hooks, not from ``.grad``: a forward hook keeps ``x``, a tensor
hook on the layer's output receives ``g`` when the SUM of the per-example losses is
back-propagated (examples do not interact in eval mode, so row ``n`` of ``g`` is example ``n``'s
own gradient), and ``dL_n/dW = g_n^T x_n`` is formed per example and squared. Frozen weights
need no ``requires_grad``: a layer input that does not require grad (the first layer after
frozen embeddings) is replaced by a leaf that does, so that the graph reaches every layer; a
module called more than once per forward sums its per-example gradients over the calls before
squaring (each call's ``x`` is paired with its own output's gradient). A tensor hook on the
output rather than a full backward hook: the pairing of ``x`` and ``g`` is then exact even for
such modules, and no ``BackwardHookFunction`` wraps every layer.

Layers: ``layers="all"`` (default) covers every Linear layer, so that any merge can use the
files (LoRA models with different targets, LoRA mixed with full finetunes). ``layers="trained"``
covers only the weights the task model changes (LoRA: the adapted layers, as MaTS computes its
Fisher of trainable parameters only): what merges of LoRA models with the same targets read,
at a fraction of the cost (the unadapted feed-forward layers are the widest).

Accumulation: each step's sums are float32 matrix products; they are summed in float32 over
``FLUSH_EVERY`` steps and then added to float64 totals (a float64 pass per step costs more than
the step's products on a CPU); the files hold float32.

The loop is Lightning's: :class:`StatisticsCollector` (manual optimization, no optimizer) runs
under ``trainer.fit(max_epochs=1)``; on several devices each rank takes every ``world``-th
example (the shorter ranks padded with zero-weight examples so that all run the same number of
steps) and the accumulators are summed over ranks at the end; only global rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from safetensors.torch import save_file
from torch import nn

from ..finetune.quiet import quiet_lightning_info

from ..task_statistics import (KINDS, STATISTICS_JSON, StatisticsError, kind_path, read_statistics_info,
                               statistics_dir, statistics_tag)

GRAD_KINDS = ("fisher", "kfac_out")
INPUT_KINDS = ("gram", "kfac_in")
IGNORE_INDEX = -100
#: Square (in, in) / (out, out) matrices are skipped for wider layers (an LM head's vocabulary:
#: 250k^2 entries); the Fisher of such a layer is still computed. Recorded in statistics.json.
MAX_FEATURES = 16384
#: Per-example weight gradients are formed for at most this many elements at a time.
CHUNK_ELEMENTS = 1 << 25
#: Steps summed in float32 before they are added to the float64 totals (at most a few hundred
#: examples per float32 sum; float64 across blocks: 8x fewer float64 passes than per step).
FLUSH_EVERY = 8
FORMAT_VERSION = 1


# ----- which layers --------------------------------------------------------------------------
LAYERS = ("all", "trained")


def linear_layers(task_module, only: Optional[Collection[str]] = None) -> dict[str, nn.Linear]:
    """``{base-model module name: nn.Linear}`` of the task model's base network.

    LoRA models: the base ``Linear`` inside each PEFT LoRA layer (``<name>.base_layer``) under
    ``<name>``; LoRA factors and ``modules_to_save``' frozen originals are skipped, the trained
    copy (``<name>.modules_to_save.<adapter>``) counts as ``<name>``. ``only``: keep the layers
    whose weight (``<name>.weight``) is one of these names.
    """
    root = task_module.unwrapped_model()
    out: dict[str, nn.Linear] = {}
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            parts = parts[:i] + parts[i + 2:]
        key = ".".join(p for p in parts if p != "base_layer")
        if only is None or f"{key}.weight" in only:
            out[key] = module
    return out


def trained_weights(task_module, task_dir=None) -> set[str]:
    """Base-model names of the weights the task model changes: for LoRA, the weights of the
    layers that carry a LoRA adapter and ``modules_to_save`` copies; for a full finetune, the
    tensors of its ``model.safetensors`` (``task_dir``) or else its trainable parameters."""
    root = task_module.unwrapped_model()
    if getattr(task_module, "finetune", None) != "full" and hasattr(task_module.model, "peft_config"):
        out = set()
        for name, module in root.named_modules():
            parts = name.split(".")
            if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Module):
                out.add(f"{name}.weight")
            elif parts[-2:-1] == ["modules_to_save"]:
                out.update(f"{'.'.join(parts[:-2])}.{p}" for p, _ in module.named_parameters())
        return out
    if task_dir is not None:
        from safetensors import safe_open

        from ..task_checkpoint import full_weights_path

        path = full_weights_path(task_dir)
        if Path(path).is_file():
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
    return {name for name, p in root.named_parameters() if p.requires_grad}


def _encoder_of(root: nn.Module) -> Optional[nn.Module]:
    config = getattr(root, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(getattr(root, "get_encoder", None)):
        return None
    return root.get_encoder()


# ----- accumulators --------------------------------------------------------------------------
@dataclass
class _Layer:
    key: str
    module: nn.Linear
    gram: bool
    kfac_out: bool
    fisher: bool
    acc: dict = field(default_factory=dict)  # name -> float64 sum (x, g, fisher_w, fisher_b, tokens)
    block: dict = field(default_factory=dict)  # name -> float32 sum of the steps since the last flush
    calls: int = 0  # forward calls in the current step
    pending_w: Optional[torch.Tensor] = None  # per-example gradients summed over calls (multi-call modules)
    pending_b: Optional[torch.Tensor] = None

    def add(self, name: str, value: torch.Tensor, owned: bool = False) -> None:
        """Add ``value`` to this block's sum (``owned``: a fresh float32 tensor nobody else holds)."""
        part = self.block.get(name)
        if part is None:
            self.block[name] = value.detach() if owned and value.dtype == torch.float32 \
                else value.detach().to(torch.float32, copy=True)
        else:
            part.add_(value.detach())

    def flush(self) -> None:
        """Add the float32 block sums (a few steps) to the float64 totals."""
        for name, part in self.block.items():
            total = self.acc.get(name)
            if total is None:
                self.acc[name] = part.to(torch.float64)
            else:
                total.add_(part)
        self.block = {}


@dataclass
class _Context:
    """The current batch's token masks (zero-weight examples already zeroed)."""

    size: int
    weights: torch.Tensor  # (B,) float32
    encoder: Optional[torch.Tensor]  # (B, T_enc)
    decoder: Optional[torch.Tensor]  # (B, T_dec)
    in_encoder: bool = False
    encoder_output: Optional[int] = None  # storage pointer of the encoder's last hidden state


@dataclass
class Statistics:
    """The result of one pass (global rank 0): tensors by kind and what they were computed on."""

    tensors: dict[str, dict[str, torch.Tensor]]
    examples: int
    tokens: dict[str, int]  # weight name -> T_W
    skipped: dict[str, list[str]]  # kind -> weight names too wide for it (MAX_FEATURES)
    tied: list[str] = field(default_factory=list)  # Linear weights another module shares (Linear use only)
    wall_s: float = 0.0


def squared_example_gradients(g: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                              one_by_one: Optional[bool] = None) -> torch.Tensor:
    """``sum_n (g_n^T x_n)^2`` for ``g`` (N, T, out), ``x`` (N, T, in): the summed squares of the
    per-example weight gradients, without holding all N of them. On the CPU one example at a time
    into a reused buffer (it stays in cache: 2-8x faster than one batched product), each up to its
    last unmasked position (``mask`` (N, T): ``g`` is already zero elsewhere); on accelerators in
    batched chunks of at most ``CHUNK_ELEMENTS`` (``one_by_one``: force either way)."""
    n, out_f, in_f = g.shape[0], g.shape[-1], x.shape[-1]
    gt = g.transpose(1, 2)
    if one_by_one if one_by_one is not None else g.device.type == "cpu":
        if mask is None:
            stops = [g.shape[1]] * n
        else:
            positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
            stops = ((mask != 0) * positions).amax(dim=1).tolist()
        total = torch.zeros(out_f, in_f, dtype=g.dtype) if not any(stops) else None
        buffer = None
        for i, stop in enumerate(stops):
            if stop == 0:
                continue
            if total is None:
                total = torch.mm(gt[i, :, :stop], x[i, :stop]).square_()
                buffer = torch.empty_like(total)
                continue
            torch.mm(gt[i, :, :stop], x[i, :stop], out=buffer)
            total.addcmul_(buffer, buffer)
        return total
    step = max(1, CHUNK_ELEMENTS // (out_f * in_f))
    total = None
    for i in range(0, n, step):
        part = torch.bmm(gt[i:i + step], x[i:i + step]).square_().sum(dim=0)
        total = part if total is None else total.add_(part)
    return total


def _mean(total: torch.Tensor, count: float) -> torch.Tensor:
    """A float64 sum divided by its count, as float32 on the CPU."""
    return total.to(device="cpu", dtype=torch.float32).div_(max(count, 1.0))


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return t.data_ptr()


class _Bar(TQDMProgressBar):
    def __init__(self, description: str):
        super().__init__()
        self.description = description

    @property
    def train_description(self) -> str:
        return self.description or super().train_description

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        if self.description:  # one description throughout (not "Training", then "Epoch 0")
            fixed, tqdm_class = self.description, type(bar)
            bar.set_description(fixed)
            bar.set_description = lambda desc=None, refresh=True: tqdm_class.set_description(bar, fixed, refresh)
        return bar


class _WeightedCollate:
    """``(batch, weights)``: the task's collate of the items, and 0 for padding items of a rank."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, items):
        weights = torch.tensor([w for _, w in items], dtype=torch.float32)
        return self.collate_fn([item for item, _ in items]), weights


class _RankShard(torch.utils.data.Dataset):
    """Every ``world``-th item of ``dataset`` from ``rank`` on, padded to ``length`` with
    zero-weight repeats of the first item."""

    def __init__(self, dataset, rank: int, world: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))
        self.length = math.ceil(len(dataset) / world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i < len(self.indices):
            return self.dataset[self.indices[i]], 1.0
        return self.dataset[0], 0.0


# ----- the Lightning loop --------------------------------------------------------------------
class StatisticsCollector(L.LightningModule):
    """Wraps a task module; one ``trainer.fit`` epoch over ``dataset`` accumulates ``kinds``.

    Args:
        task_module: a TaskModule (``example_losses``, ``unwrapped_model``), e.g. from
            ``load_task_model``; run in eval mode (:func:`compute_statistics` restores its modes
            and removes its hooks afterwards).
        kinds: a subset of ``fisher gram kfac_in kfac_out``.
        dataset, collate_fn: the examples (in order) and the task's collate function.
        batch_size: examples per step (the statistics do not depend on it).
        on_result: called on global rank 0 with the :class:`Statistics` at the end of the pass.
        layers: ``"all"`` Linear layers, ``"trained"`` (those whose weight the task model changes,
            :func:`trained_weights`), or the weight names to cover.
    """

    def __init__(self, task_module, kinds: Sequence[str], dataset, collate_fn: Callable, batch_size: int,
                 num_workers: int = 0, on_result: Optional[Callable[[Statistics], None]] = None,
                 max_features: int = MAX_FEATURES, layers: Union[str, Collection[str]] = "all"):
        super().__init__()
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"statistics kinds must be among {KINDS}, got {list(kinds)}")
        self.automatic_optimization = False
        self.task = task_module
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.grad = any(k in GRAD_KINDS for k in self.kinds)
        self.examples_data, self.collate, self.batch_size = dataset, collate_fn, int(batch_size)
        self.num_workers = num_workers
        self.on_result = on_result
        self.max_features = max_features
        # DDP needs a parameter that receives a gradient every step; the task's are frozen
        self.anchor = nn.Parameter(torch.zeros(()))
        self.layers: dict[nn.Module, _Layer] = {}
        self.skipped: dict[str, list[str]] = {k: [] for k in self.kinds if k != "fisher"}
        #: Linear layers whose forward never ran (a merge averages them): said, not silently dropped
        self.unused: list[str] = []
        if isinstance(layers, str):
            if layers not in LAYERS:
                raise ValueError(f"layers must be one of {LAYERS} or a collection of weight names, got {layers!r}")
            only = None if layers == "all" else trained_weights(task_module)
        else:
            only = set(layers)
        for key, module in linear_layers(task_module, only).items():
            wide_in, wide_out = module.in_features > max_features, module.out_features > max_features
            if wide_in:
                self.skipped.update({k: self.skipped[k] + [f"{key}.weight"] for k in INPUT_KINDS if k in self.kinds})
            if wide_out and "kfac_out" in self.kinds:
                self.skipped["kfac_out"].append(f"{key}.weight")
            self.layers[module] = _Layer(key, module, gram=any(k in self.kinds for k in INPUT_KINDS) and not wide_in,
                                         kfac_out="kfac_out" in self.kinds and not wide_out,
                                         fisher="fisher" in self.kinds)
        # a Linear weight that another module uses too (an LM head tied to the input embedding):
        # its statistics cover the Linear use only; statistics.json names them
        linear_weights = {id(m.weight): layer.key for m, layer in self.layers.items()}
        self.tied = sorted({f"{linear_weights[id(p)]}.weight" for m in task_module.unwrapped_model().modules()
                            if m not in self.layers for p in m.parameters(recurse=False) if id(p) in linear_weights})
        if not self.layers:
            raise ValueError(f"{type(task_module).__name__}: its network has no nn.Linear layer to collect statistics of")
        self.encoder = _encoder_of(task_module.unwrapped_model())
        self.examples: Optional[torch.Tensor] = None  # on the device: no synchronization per step
        self.steps = 0
        self.ctx: Optional[_Context] = None
        self.gram_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles: list = []
        self.result: Optional[Statistics] = None
        self._start = 0.0

    # -- data --
    def train_dataloader(self):
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.utils.data.DataLoader(_RankShard(self.examples_data, rank, world), batch_size=self.batch_size,
                                           shuffle=False, num_workers=self.num_workers,
                                           collate_fn=_WeightedCollate(self.collate))

    def configure_optimizers(self):
        return None

    # -- hooks --
    def add_hooks(self) -> None:
        if self.handles:
            return
        for module in self.layers:
            if self.grad:
                self.handles.append(module.register_forward_pre_hook(self._grad_entry))
            self.handles.append(module.register_forward_hook(self._forward))
        if self.encoder is not None:
            self.handles.append(self.encoder.register_forward_pre_hook(self._enter_encoder))
            self.handles.append(self.encoder.register_forward_hook(self._leave_encoder))

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _enter_encoder(self, module, args):
        if self.ctx is not None:
            self.ctx.in_encoder = True

    def _leave_encoder(self, module, args, output):
        if self.ctx is None:
            return
        self.ctx.in_encoder = False
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        if isinstance(hidden, torch.Tensor):
            self.ctx.encoder_output = _storage_ptr(hidden)

    def _grad_entry(self, module, args):
        """Let the graph reach this layer: an input that does not require grad becomes a leaf that does."""
        if self.ctx is None or not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if x.requires_grad or not x.is_floating_point():
            return None
        return (x.detach().requires_grad_(True),) + tuple(args[1:])

    def _mask(self, x: torch.Tensor, ctx: _Context) -> tuple[str, torch.Tensor]:
        """Which mask, and the (B, T) weights of the token positions of ``x`` (B, T, in)."""
        b, t = x.shape[0], x.shape[1]
        if ctx.decoder is not None and not ctx.in_encoder and _storage_ptr(x) != ctx.encoder_output:
            which, mask = "decoder", ctx.decoder
        else:
            which, mask = "encoder", ctx.encoder
        if mask is not None and tuple(mask.shape) == (b, t):
            return which, mask
        return "all", ctx.weights[:, None].expand(b, t)

    def _forward(self, module, args, output):
        ctx = self.ctx
        if ctx is None:
            return
        layer = self.layers[module]
        x = args[0]
        if x.dim() < 2 or x.shape[0] != ctx.size:
            raise StatisticsError(layer.key, f"input of shape {tuple(x.shape)} does not start with the batch dimension "
                                             f"({ctx.size} examples): per-example statistics need it")
        x3 = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        which, mask = self._mask(x3, ctx)
        mask = mask.to(device=x3.device, dtype=torch.float32)
        xf = x3.float()
        layer.add("tokens", mask.sum())
        if layer.gram:
            key = (_storage_ptr(x3), x3.storage_offset(), tuple(x3.shape), x3.stride(), x3._version, which)
            cached = self.gram_cache.get(key)
            if cached is None:
                flat = xf.flatten(0, 1)
                cached = (x3, (flat * mask.reshape(-1, 1)).T @ flat)
                self.gram_cache[key] = cached  # q / k / v read one tensor: one Gram matrix
            layer.add("x", cached[1])
        if (layer.fisher or layer.kfac_out) and isinstance(output, torch.Tensor) and output.requires_grad:
            layer.calls += 1
            output.register_hook(partial(self._backward, layer, xf, mask))

    def _backward(self, layer: _Layer, xf: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor):
        b = xf.shape[0]
        g = grad.detach().reshape(b, -1, grad.shape[-1]).float()
        gm = g * mask[..., None]
        if layer.kfac_out:
            layer.add("g", gm.flatten(0, 1).T @ g.flatten(0, 1), owned=True)
        if not layer.fisher:
            return None
        grad_b = gm.sum(dim=1) if layer.module.bias is not None else None
        if layer.calls > 1:  # the per-example gradient sums over calls: square once, after backward
            grad_w = torch.bmm(gm.transpose(1, 2), xf)
            layer.pending_w = grad_w if layer.pending_w is None else layer.pending_w + grad_w
            if grad_b is not None:
                layer.pending_b = grad_b if layer.pending_b is None else layer.pending_b + grad_b
            return None
        if g.shape[1] == 1:  # one position per example: (g x^T)^2 summed over examples = (g^2)^T (x^2)
            layer.add("fisher_w", gm[:, 0].square().T @ xf[:, 0].square(), owned=True)
        else:
            layer.add("fisher_w", squared_example_gradients(gm, xf, mask), owned=True)
        if grad_b is not None:
            layer.add("fisher_b", grad_b.square().sum(dim=0), owned=True)
        return None

    def _finish_step(self) -> None:
        for layer in self.layers.values():
            if layer.pending_w is not None:
                layer.add("fisher_w", layer.pending_w.square().sum(dim=0), owned=True)
            if layer.pending_b is not None:
                layer.add("fisher_b", layer.pending_b.square().sum(dim=0), owned=True)
            layer.pending_w = layer.pending_b = None
            layer.calls = 0
        self.gram_cache.clear()
        self.ctx = None
        self.steps += 1
        if self.steps % FLUSH_EVERY == 0:
            for layer in self.layers.values():
                layer.flush()

    # -- the loop --
    def on_train_start(self) -> None:
        self._start = time.perf_counter()
        self.add_hooks()

    def on_train_epoch_start(self) -> None:
        self.task.eval()  # no dropout: examples are independent, statistics are of the model itself

    def _context(self, batch: dict, weights: torch.Tensor) -> _Context:
        size = len(weights)
        encoder = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if encoder is not None:
            encoder = encoder.to(torch.float32) * weights[:, None]
        decoder = None
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if self.encoder is not None and isinstance(labels, torch.Tensor) and labels.dim() == 2:
            decoder = (labels != IGNORE_INDEX).to(torch.float32) * weights[:, None]
        return _Context(size=size, weights=weights, encoder=encoder, decoder=decoder)

    def training_step(self, batch, batch_idx: int):
        batch, weights = batch
        weights = weights.to(self.device, torch.float32)
        self.ctx = self._context(batch, weights)
        try:
            with torch.set_grad_enabled(self.grad):
                losses = self.task.example_losses(batch)
            if losses.shape != weights.shape:
                raise StatisticsError(type(self.task).__name__, f"example_losses returned shape {tuple(losses.shape)}, "
                                                                f"expected one loss per example ({len(weights)},)")
            if self.grad:
                total = (losses.float() * weights).sum() + 0.0 * self.anchor
                self.manual_backward(total)
            elif self.trainer.world_size > 1:
                self.manual_backward(0.0 * self.anchor)  # DDP expects a backward every step
        finally:
            self._finish_step()
        count = weights.sum().to(torch.float64)
        self.examples = count if self.examples is None else self.examples + count
        return None

    def on_train_end(self) -> None:
        self.remove_hooks()
        result = self._reduce()
        if self.trainer.is_global_zero:
            self.result = result
            if self.on_result is not None:
                self.on_result(result)

    def _reduce(self) -> Statistics:
        strategy = self.trainer.strategy
        device = self.device
        for layer in self.layers.values():
            layer.flush()

        def total(t: Optional[torch.Tensor], *shape: int) -> torch.Tensor:
            """The sum over ranks (a rank that never saw the layer contributes zeros of ``shape``)."""
            if t is None:
                t = torch.zeros(shape, dtype=torch.float64, device=device)
            return strategy.reduce(t.to(device), reduce_op="sum")

        examples = float(total(self.examples))
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.kinds}
        tokens: dict[str, int] = {}
        for layer in self.layers.values():
            # every rank runs every layer's reduction in the same order (a layer no rank used is skipped by all)
            seen = float(total(torch.tensor(1.0 if layer.acc else 0.0, dtype=torch.float64)))
            if seen == 0:  # never called through forward (e.g. nn.MultiheadAttention's out_proj)
                for kind in self.kinds:
                    self.skipped.setdefault(kind, []).append(f"{layer.key}.weight")
                self.unused.append(f"{layer.key}.weight")
                continue
            w_name, b_name = f"{layer.key}.weight", f"{layer.key}.bias"
            n_in, n_out = layer.module.in_features, layer.module.out_features
            n_tokens = float(total(layer.acc.get("tokens")))
            tokens[w_name] = int(round(n_tokens))
            if layer.gram:
                s = total(layer.acc.get("x"), n_in, n_in)
                if "gram" in self.kinds:
                    out["gram"][w_name] = _mean(s, examples)
                if "kfac_in" in self.kinds:
                    out["kfac_in"][w_name] = _mean(s, n_tokens)
            if layer.kfac_out:
                out["kfac_out"][w_name] = _mean(total(layer.acc.get("g"), n_out, n_out), n_tokens)
            if layer.fisher:
                out["fisher"][w_name] = _mean(total(layer.acc.get("fisher_w"), n_out, n_in), examples)
                if layer.module.bias is not None:
                    out["fisher"][b_name] = _mean(total(layer.acc.get("fisher_b"), n_out), examples)
        if self.unused and self.trainer.is_global_zero:
            from ..safe_output import note

            note(f"statistics: {len(self.unused)} linear layer(s) never ran their forward, e.g. {self.unused[:2]} "
                 "(nn.MultiheadAttention uses its out_proj weight directly and packs q/k/v into in_proj_weight): "
                 "no statistics for them (listed as skipped in statistics.json); data-dependent merges average them")
        return Statistics(tensors=out, examples=int(round(examples)), tokens=tokens, skipped=dict(self.skipped),
                          tied=list(self.tied), wall_s=time.perf_counter() - self._start)


def compute_statistics(task_module, dataset, collate_fn: Callable, kinds: Sequence[str] = KINDS, batch_size: int = 8,
                       accelerator: str = "auto", devices: Any = 1, strategy: Any = "auto", num_workers: int = 0,
                       progress: bool = True, description: str = "statistics",
                       on_result: Optional[Callable[[Statistics], None]] = None,
                       max_features: int = MAX_FEATURES, layers: Union[str, Collection[str]] = "all"
                       ) -> Optional[Statistics]:
    """One ``trainer.fit`` epoch of :class:`StatisticsCollector`; the :class:`Statistics` on global
    rank 0 (``None`` on the other ranks). ``on_result`` runs on global rank 0 inside the loop
    (where a spawned run's result exists)."""
    if len(dataset) == 0:
        raise ValueError("statistics need at least one example")
    collector = StatisticsCollector(task_module, kinds, dataset, collate_fn, batch_size, num_workers=num_workers,
                                    on_result=on_result, max_features=max_features, layers=layers)
    modes = {m: m.training for m in task_module.modules()}  # the pass runs in eval mode; restored after
    quiet_lightning_info()
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, callbacks=[_Bar(description)] if progress else None,
                        num_sanity_val_steps=0, use_distributed_sampler=False, log_every_n_steps=1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*configure_optimizers.*returned `None`")
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # on purpose
            trainer.fit(collector)
    finally:
        collector.remove_hooks()
        collector.ctx = None
        for module, training in modes.items():
            module.training = training
    return collector.result


# ----- task checkpoints: data, caching, files -------------------------------------------------
def _default_batch_size(dm, grad: bool) -> int:
    # a backward pass needs the memory of a training step: the training batch size fits
    names = ("batch_size", "eval_batch_size") if grad else ("eval_batch_size", "batch_size")
    for name in names:
        value = getattr(dm, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 8


def split_data(dm, split: str):
    """``(dataset, collate_fn)`` of ``split``. The training split is read with the evaluation
    collate when the datamodule has one (no random augmentation: reproducible statistics)."""
    from ..evaluate.loop import split_loader

    if split == "train":
        dm.setup("fit")
        loader = dm.train_dataloader()
        collate = loader.collate_fn
        for other in ("val", "test"):
            try:
                collate = split_loader(dm, other).collate_fn
                break
            except (ValueError, NotImplementedError, KeyError, AttributeError):
                continue
        return loader.dataset, collate
    loader = split_loader(dm, split)
    return loader.dataset, loader.collate_fn


def subset_indices(size: int, n: int, seed: int) -> list[int]:
    """The first ``n`` of a ``torch.Generator().manual_seed(seed)`` permutation of ``range(size)``."""
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
    return perm[: int(n)].tolist()


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def missing_kinds(task_dir, tag: str, kinds: Sequence[str], layers: str = "all") -> list[str]:
    """The requested kinds that ``statistics.json`` of ``tag`` does not list with their file (for
    ``layers="all"``, also those computed for the trained layers only)."""
    info = read_statistics_info(task_dir, tag) or {"kinds": {}}

    def present(kind: str) -> bool:
        entry = info["kinds"].get(kind)
        if not isinstance(entry, dict) or not kind_path(task_dir, tag, kind).is_file():
            return False
        return layers == "trained" or entry.get("layers", "all") == "all"

    return [k for k in kinds if not present(k)]


def _check_kinds(kinds) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown statistics kind(s) {unknown or kinds}; known: {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


NORMALIZATION = {
    "gram": "sum over unpadded tokens of x x^T, mean over examples",
    "fisher": "mean over examples of the squared per-example gradient of the gold label's log-likelihood",
    "kfac_in": "sum over examples and unpadded tokens of x x^T / number of tokens (MaTS)",
    "kfac_out": "sum over examples and unpadded tokens of g g^T / number of tokens (MaTS); g = dNLL/d(output)",
}


def write_statistics(task_dir, tag: str, stats: Statistics, meta: dict) -> Path:
    """Add ``stats`` to ``<task_dir>/statistics/<tag>/`` atomically (kinds already there are kept)."""
    from ..safe_output import atomic_directory

    target = statistics_dir(task_dir, tag)
    info = read_statistics_info(task_dir, tag) or {}
    kept = {k: v for k, v in (info.get("kinds") or {}).items()
            if k not in stats.tensors and kind_path(task_dir, tag, k).is_file()}
    with atomic_directory(target) as tmp:
        for kind in kept:
            src, dst = kind_path(task_dir, tag, kind), tmp / f"{kind}.safetensors"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        kinds = dict(kept)
        for kind, tensors in stats.tensors.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{kind}.safetensors"),
                      metadata={"kind": kind, "tag": tag, "examples": str(stats.examples)})
            entry = {"examples": stats.examples, "tensors": len(tensors), "normalization": NORMALIZATION[kind],
                     "created": created, "wall_s": round(stats.wall_s, 3), **meta.get("run", {})}
            if kind in ("kfac_in", "kfac_out"):
                entry["tokens"] = {name: stats.tokens[name] for name in tensors}
            if stats.skipped.get(kind):
                entry["skipped"] = list(stats.skipped[kind])
            if stats.tied:
                entry["tied_linear_use_only"] = list(stats.tied)
            kinds[kind] = entry
        document = {k: v for k, v in info.items() if k != "kinds"}
        document.update({k: v for k, v in meta.items() if k != "run"})
        document.update({"format_version": FORMAT_VERSION, "tag": tag, "examples": stats.examples,
                         "token_weighting": "attention mask: padded positions are not counted",
                         "kinds": {k: kinds[k] for k in KINDS if k in kinds}})
        (tmp / STATISTICS_JSON).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return target


def collect_statistics(task_dir, kinds: Sequence[str] = KINDS, split: str = "train", n: int = 256, seed: int = 0,
                       batch_size: Optional[int] = None, accelerator: str = "auto", devices: Any = 1,
                       data: Union[None, Mapping[str, Any], L.LightningDataModule] = None, *,
                       layers: str = "all", strategy: Any = "auto", progress: bool = True,
                       base: Optional[str] = None) -> Path:
    """Compute the task model's missing statistics ``kinds`` on ``n`` examples of ``split``; returns
    ``<task_dir>/statistics/<split>-n<n>-seed<seed>/``.

    Kinds that ``statistics.json`` already lists are not computed again (nothing is loaded when
    none is missing). Examples: the first ``n`` of a seeded permutation of the split (an error if
    the split is smaller). ``data``: init-argument overrides of the task's DataModule (as recorded
    in ``task.json``; e.g. ``{"data_root": ...}``) or a DataModule to use instead.
    ``batch_size``: default the DataModule's training batch size when gradients are needed
    (fisher, kfac_out), else its evaluation batch size. ``layers``: ``"all"`` Linear layers, or
    ``"trained"``: only those whose weight the task model changes (LoRA-adapted layers; a merge
    of LoRA models with the same targets needs no more; mixed LoRA / full merges need ``"all"``).
    Only the tag directory is written
    (atomically, by global rank 0); the task model's files are never touched.
    """
    from ..evaluate.models import datamodule_of
    from ..finetune.load import load_task_model
    from ..task_checkpoint import read_task_info

    task_dir = Path(task_dir)
    kinds = _check_kinds(kinds)
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    tag = statistics_tag(split, n, seed)
    info = read_task_info(task_dir)
    todo = missing_kinds(task_dir, tag, kinds, layers)
    if not todo:
        return statistics_dir(task_dir, tag)
    dm = data if isinstance(data, L.LightningDataModule) else datamodule_of(info, task_dir, data)
    dataset, collate = split_data(dm, split)
    if len(dataset) < int(n):
        raise ValueError(f"{task_dir}: the {split} split has {len(dataset)} examples, fewer than n={n} "
                         f"(pass n <= {len(dataset)})")
    subset = _Subset(dataset, subset_indices(len(dataset), n, seed))
    grad = any(k in GRAD_KINDS for k in todo)
    size = int(batch_size) if batch_size else _default_batch_size(dm, grad)
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    module = load_task_model(task_dir, base=base)  # base: a local copy of the recorded base model
    meta = {"task": info.task, "family": info.family, "base_model": info.base_model, "split": split, "n": int(n),
            "seed": int(seed), "run": {"batch_size": size, "layers": layers}}

    def write(stats: Statistics) -> None:
        write_statistics(task_dir, tag, stats, meta)

    compute_statistics(module, subset, collate, todo, batch_size=size, accelerator=accelerator, devices=devices,
                       strategy=strategy, num_workers=getattr(dm, "num_workers", 0) or 0, progress=progress,
                       description=f"statistics {info.task} ({', '.join(todo)})", on_result=write,
                       layers="all" if layers == "all" else trained_weights(module, task_dir))
    return statistics_dir(task_dir, tag)
