"""How similar are the task updates' outputs? Linear CKA before and after KnOTS' alignment.

The analysis of KnOTS (Stoica et al., arXiv:2410.19735, Fig. 2 and App. B): for task models
finetuned from one base, compare what each task's update *outputs* at every attention projection
on the same data, for every pair of tasks, with linear CKA (Kornblith et al., "Similarity of
Neural Network Representations Revisited", ICML 2019), averaged over layers and pairs. Low CKA
between LoRA updates means the updates process the same inputs through unaligned subspaces;
KnOTS' joint SVD expresses every task in one shared basis, which raises it.

Three kinds of update output, for task ``i`` at a layer with input ``x``:

* ``full``: the layer's output minus the pretrained layer's output on the same ``x``,
  ``(W_i x + b_i) - (W_0 x + b_0) = dW_i x + db_i``. It is computed as ``dW_i x`` from the
  weights (``dW_i = W_i - W_0`` read from the checkpoint; LoRA checkpoints: ``scale B_i A_i``
  densified). The bias difference ``db_i`` is the same for every sample and linear CKA centers
  its inputs, so leaving it out changes nothing: the two are equal, exactly.
* ``lora``: the LoRA branch's output ``scale_i B_i A_i x`` (LoRA checkpoints only), computed
  from the factors. For a LoRA model this is the same update as ``full``, taken through its factors.
* ``knots``: KnOTS' joint SVD of the layer's concatenated updates, exactly as the merge stage
  builds it (:func:`src.merge.linalg.factored_concat_svd` for LoRA,
  :func:`~src.merge.linalg.dense_concat_svd` otherwise; float64; components with singular
  value ``<= svd_tol`` dropped): ``[dW_1 ... dW_n] = U S [V_1^T ... V_n^T]``, so the aligned
  update of task ``i`` is ``U S V_i^T`` and the analysis compares ``V_i^T x``, task ``i``'s
  coordinates in the shared basis (``knots_scaled=True``: ``S V_i^T x``, what KnOTS merges).

**The input ``x``** of every layer is the one it sees in a single forward pass of the
*pretrained* model, and every task's update is applied to that same ``x``. CKA then compares
the updates themselves (their outputs on identical inputs, as the paper compares the updates'
outputs on the same data); feeding each update the input of its own finetuned model would mix
in how the earlier layers' updates changed that input, so a difference at layer 10 could come
from layer 2. One pass also serves every task and kind.

**Samples** are token positions (``samples="tokens"``, default): every unpadded position of every
example (the batch's ``attention_mask`` marks padding where its shape matches the layer input;
otherwise, e.g. for vision tokens, every position counts). ``samples="mean"``: one sample per
example, the mean of its unpadded positions' inputs. Data: the ``split`` (``val`` or ``test``)
of **every** task, a seeded subset of ``n`` examples each (fewer where a split is smaller), pooled.

**Streaming, bounded memory.** Each task's update output is linear in the input, ``z_i = O_i F_i x``
(full: ``F_i = dW_i``, ``O_i = 1``; LoRA: ``F_i = A_i``, ``O_i = scale_i B_i``; KnOTS:
``F_i = V_i^T``, ``O_i = 1``). For a layer the pass accumulates only the centered second moments
``M`` of ``y = P x``, where ``P`` stacks the tasks' ``F_i`` when that has fewer rows than
``x`` has features (LoRA / KnOTS: ``p <= n r``) and is the identity otherwise (full finetunes:
``p = in_features``), streamed with Chan's pairwise update in float64 in a Lightning
``predict`` loop with forward hooks on the layers. Memory is ``p x p`` float64 per layer and
kind, independent of the number of examples (a full-finetune analysis of a 4096-wide model
holds 128 MiB per layer). Then, exactly, the centered cross-products of two tasks' outputs are
``Z_j^T Z_i = O_j F~_j M F~_i^T O_i^T`` (``F~``: ``F`` in the coordinates of ``y``), and with
``M = L L^T``, ``HSIC_ij = ||Z_j^T Z_i||_F^2 = <G_i, G_j>`` with ``G_i = L^T F~_i^T O_i^T O_i F~_i L``
(``p x p``), so ``CKA_ij = <G_i, G_j> / (||G_i||_F ||G_j||_F)``. A pair where a task has no
update at a layer (zero output) has no CKA there (``null``), and is left out of the averages.

Results (:class:`CKAResult`): per kind, per layer and pair, the mean over layers per pair, the
mean over pairs per layer, and the average over both; ``cka.json``, a Markdown table and
``cka.png`` (:func:`write_outputs`). Command line::

    python -m src.analysis.cka --tasks '[ckpt/a, ckpt/b, ckpt/c]' --kind '[lora, knots]' --n 64 --output out/cka

Layers: the ``nn.Linear`` modules of the base network (inside PEFT LoRA layers: the base
``Linear``, as ``src/statistics/collect.py`` finds them) whose name matches ``layers``, a regular
expression searched in the module name; the default covers HF CLIP (``q_proj k_proj v_proj
out_proj``), BERT (``query key value attention.output.dense``) and Llama (``q_proj k_proj
v_proj o_proj``). Layers that never run in the forward pass (e.g. CLIP's text tower when the task
scores images with fixed label embeddings) and layers no task updates are listed as skipped.

Limits: one device (``devices=1``); encoder-decoder models count every decoder position
(only the batch's ``attention_mask`` is used as a token mask).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..merge.linalg import DEFAULT_TOL, dense_concat_svd, factored_concat_svd
from ..merge.updates import LowRank, densify

#: Attention projections of HF CLIP, BERT and Llama (searched in the module name).
DEFAULT_LAYERS = r"(^|\.)(q_proj|k_proj|v_proj|out_proj|o_proj|query|key|value|attention\.output\.dense)$"
KINDS = ("full", "lora", "knots")
SAMPLES = ("tokens", "mean")
KIND_LABELS = {"full": "full finetune: dW x", "lora": "LoRA: s B A x", "knots": "KnOTS-aligned: V_i^T x"}
FORMAT_VERSION = 1
JSON_NAME, MARKDOWN_NAME, PNG_NAME = "cka.json", "cka.md", "cka.png"


# ============================================================================ linear CKA
def _matrix(X, name: str) -> torch.Tensor:
    t = torch.as_tensor(X).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"linear_cka: {name} must be a (samples, features) matrix, got shape {tuple(t.shape)}")
    return t


def linear_cka(X, Y, method: str = "auto") -> float:
    """Linear CKA of two activation matrices with the same rows (samples), any column counts.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` the
    column-centered matrices, in float64. ``method``: ``"features"`` (the formula as written,
    ``O(n dx dy)``), ``"gram"`` (the same through the ``n x n`` Gram matrices
    ``<Xc Xc^T, Yc Yc^T> / (||Xc Xc^T|| ||Yc Yc^T||)``, cheaper when features outnumber samples)
    or ``"auto"`` (the cheaper of the two). NaN when either matrix is constant (undefined).
    Accepts torch tensors or NumPy arrays; a 1-D input is one feature.
    """
    X, Y = _matrix(X, "X"), _matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka: X has {X.shape[0]} samples, Y has {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError("linear_cka needs at least two samples")
    n, dx, dy = X.shape[0], X.shape[1], Y.shape[1]
    if method == "auto":
        feature_cost = n * (dx * dy + dx * dx + dy * dy)
        gram_cost = n * n * (dx + dy) + 3 * n * n
        method = "gram" if gram_cost < feature_cost else "features"
    Xc, Yc = X - X.mean(dim=0), Y - Y.mean(dim=0)
    if method == "features":
        xy = (Yc.T @ Xc).square().sum()
        xx, yy = (Xc.T @ Xc).square().sum(), (Yc.T @ Yc).square().sum()
    elif method == "gram":
        K, L = Xc @ Xc.T, Yc @ Yc.T  # already centered: H K H = Xc Xc^T for column-centered Xc
        xy, xx, yy = (K * L).sum(), K.square().sum(), L.square().sum()
    else:
        raise ValueError(f"linear_cka: method must be 'auto', 'features' or 'gram', got {method!r}")
    denom = math.sqrt(float(xx) * float(yy))
    return float(xy) / denom if denom > 0 else float("nan")


class CenteredMoments:
    """Streamed (weighted) sample count, mean and centered scatter ``sum_n w_n (z_n - mean)(z_n - mean)^T``.

    Batches are combined with Chan et al.'s pairwise update (each batch centered on its own mean),
    in float64 and without host synchronization, so large means do not cancel the scatter away.
    """

    def __init__(self):
        self.count: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None
        self.scatter: Optional[torch.Tensor] = None

    @staticmethod
    def batch(Z: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """``(count, mean, scatter)`` of one batch ``Z`` (samples, features); ``weights`` (samples,)."""
        Z = Z.to(torch.float64)
        if weights is None:
            w = None
            count = torch.tensor(float(Z.shape[0]), dtype=torch.float64, device=Z.device)
            mean = Z.mean(dim=0) if Z.shape[0] else Z.new_zeros(Z.shape[1])
        else:
            w = weights.to(device=Z.device, dtype=torch.float64).reshape(-1)
            count = w.sum()
            mean = (w @ Z) / count.clamp_min(1e-300)
        D = Z - mean
        scatter = (D * w[:, None]).T @ D if w is not None else D.T @ D
        return count, mean, scatter

    def add(self, count: torch.Tensor, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        """Merge a batch's ``(count, mean, scatter)`` (from :meth:`batch`)."""
        if self.count is None:
            self.count, self.mean, self.scatter = count.clone(), mean.clone(), scatter.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        frac = count / total.clamp_min(1e-300)
        self.mean = self.mean + delta * frac
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.count * frac)
        self.count = total

    def update(self, Z: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        self.add(*self.batch(Z, weights))

    def centered(self) -> torch.Tensor:
        """The centered scatter (float64, on the CPU)."""
        if self.scatter is None:
            raise ValueError("CenteredMoments: no samples were added")
        return self.scatter.detach().to("cpu", torch.float64)


class StreamingLinearCKA:
    """:func:`linear_cka` of ``X`` and ``Y`` given in row batches: ``update(X_b, Y_b)``, then
    ``value()``. Memory ``(dx + dy)^2`` float64, independent of the number of samples."""

    def __init__(self):
        self.moments = CenteredMoments()
        self.dx: Optional[int] = None

    def update(self, X, Y, weights=None) -> None:
        X, Y = _matrix(X, "X"), _matrix(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"StreamingLinearCKA: X has {X.shape[0]} samples, Y has {Y.shape[0]}")
        if self.dx is None:
            self.dx = X.shape[1]
        self.moments.update(torch.cat([X, Y], dim=1), None if weights is None else torch.as_tensor(weights))

    def value(self) -> float:
        M = self.moments.centered()
        d = self.dx
        xy = M[d:, :d].square().sum()
        xx, yy = M[:d, :d].square().sum(), M[d:, d:].square().sum()
        denom = math.sqrt(float(xx) * float(yy))
        return float(xy) / denom if denom > 0 else float("nan")


# ============================================================================ per-layer plans
@dataclass
class _Plan:
    """One kind at one layer: ``z_i = O_i F~_i (P x)`` for each task (``None``: no update)."""

    kind: str
    layer: str
    P: Optional[torch.Tensor]  # (p, in) float64; None: the identity (p = in)
    factors: list  # per task: (start, stop) rows of P, or a (r_i, p) matrix F~_i, or None
    out_grams: list  # per task: O_i^T O_i (r_i, r_i), or None for O_i = identity
    moments: CenteredMoments = field(default_factory=CenteredMoments)
    device_P: Optional[torch.Tensor] = None


def _kind_factors(kind: str, layer: str, updates: Sequence[Optional[Any]], svd_tol: float, knots_scaled: bool):
    """``(F_i, K_i = O_i^T O_i or None)`` per task (``None`` where it has no update), or a reason string."""
    present = [i for i, u in enumerate(updates) if u is not None]
    if not present:
        return "no task updates this layer"
    F: list = [None] * len(updates)
    K: list = [None] * len(updates)
    if kind == "full":
        for i in present:
            F[i] = densify(updates[i]).to(torch.float64)
    elif kind == "lora":
        for i in present:
            u = updates[i]
            F[i] = u.A.to(torch.float64)
            B = u.B.to(torch.float64)
            K[i] = (B.T @ B) * (float(u.scale) ** 2)
    elif kind == "knots":
        ups = [updates[i] for i in present]
        if all(isinstance(u, LowRank) for u in ups):
            svd = factored_concat_svd([u.B.to(torch.float64) for u in ups], [u.A.to(torch.float64) for u in ups],
                                      [float(u.scale) for u in ups], svd_tol, scaled=knots_scaled)
        else:
            mats = [densify(u).to(torch.float64) for u in ups]
            svd = dense_concat_svd(mats, svd_tol, scaled=knots_scaled)
        if svd.S.numel() == 0:
            return f"the joint SVD has no singular value above svd_tol={svd_tol}"
        for j, i in enumerate(present):
            F[i] = svd.Vh[j]  # V_i^T (k, in), or S V_i^T
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return F, K


def _make_plan(kind: str, layer: str, updates, in_features: int, svd_tol: float, knots_scaled: bool):
    got = _kind_factors(kind, layer, updates, svd_tol, knots_scaled)
    if isinstance(got, str):
        return got
    F, K = got
    rows = sum(f.shape[0] for f in F if f is not None)
    if rows < in_features:  # accumulate the stacked projections: p = rows < in_features
        blocks, factors, start = [], [], 0
        for f in F:
            if f is None:
                factors.append(None)
                continue
            blocks.append(f)
            factors.append((start, start + f.shape[0]))
            start += f.shape[0]
        return _Plan(kind, layer, torch.cat(blocks, dim=0).contiguous(), factors, K)
    return _Plan(kind, layer, None, F, K)


def _plan_cka(plan: _Plan, tasks: Sequence[str]) -> dict[str, Optional[float]]:
    """CKA of every pair of tasks from the plan's moments (module docstring: ``<G_i, G_j>``)."""
    M = plan.moments.centered()
    M = (M + M.T) / 2
    evals, evecs = torch.linalg.eigh(M)
    L = evecs * evals.clamp(min=0).sqrt()  # M = L L^T
    grams: list[Optional[torch.Tensor]] = []
    for factor, K in zip(plan.factors, plan.out_grams):
        if factor is None:
            grams.append(None)
            continue
        A = L[factor[0]:factor[1]] if isinstance(factor, tuple) else factor @ L  # F~_i L: (r_i, p)
        grams.append(A.T @ (K @ A) if K is not None else A.T @ A)
    norms = [None if g is None else float(g.square().sum()) for g in grams]
    out: dict[str, Optional[float]] = {}
    for i, j in _pairs(len(tasks)):
        gi, gj = grams[i], grams[j]
        if gi is None or gj is None or not norms[i] or not norms[j]:
            out[pair_name(tasks[i], tasks[j])] = None
            continue
        out[pair_name(tasks[i], tasks[j])] = float((gi * gj).sum()) / math.sqrt(norms[i] * norms[j])
    return out


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def pair_name(a: str, b: str) -> str:
    return f"{a} vs {b}"


# ============================================================================ the data pass
def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return t.data_ptr()


def _make_pass_module(modules: Mapping[str, Any], order: Sequence[str], hooked: Mapping[Any, str],
                      plans: Mapping[str, list[_Plan]], samples: str):
    import lightning as L
    from torch import nn

    class CKAPass(L.LightningModule):
        """Runs the pretrained network over the pooled examples (``order[dataloader_idx]``'s module
        for its task's batches) and feeds each hooked layer's input to its plans' moments."""

        def __init__(self):
            super().__init__()
            self.tasks = nn.ModuleDict(dict(modules))
            self.order = list(order)
            self.hooked = dict(hooked)  # nn.Linear -> layer name
            self.plans = plans
            self.samples = samples
            self.ctx: Optional[tuple[int, Optional[torch.Tensor]]] = None
            self.cache: dict[tuple, tuple] = {}
            self.counts: dict[str, torch.Tensor] = {}
            self.handles: list = []

        def on_predict_start(self) -> None:
            for layer_plans in self.plans.values():
                for plan in layer_plans:
                    plan.device_P = None if plan.P is None else plan.P.to(self.device)
            for module in self.hooked:
                self.handles.append(module.register_forward_hook(self._forward))

        def on_predict_end(self) -> None:
            self.remove_hooks()

        def remove_hooks(self) -> None:
            for h in self.handles:
                h.remove()
            self.handles = []

        def _samples(self, x: torch.Tensor, layer: str):
            size, mask = self.ctx
            width = x.shape[-1]
            if x.dim() >= 2 and x.shape[0] == size:
                x3 = x.reshape(size, -1, width)
                m = mask if mask is not None and tuple(mask.shape) == tuple(x3.shape[:2]) else None
            elif self.samples == "mean":
                raise ValueError(f"layer {layer}: input of shape {tuple(x.shape)} does not start with the batch "
                                 f"dimension ({size} examples): samples='mean' needs it")
            else:
                x3, m = x.reshape(1, -1, width), None
            if self.samples == "tokens":
                return x3.reshape(-1, width), (None if m is None else m.reshape(-1))
            if m is None:
                return x3.mean(dim=1), None
            m = m.to(x3.dtype)
            per = m.sum(dim=1)
            return (x3 * m[..., None]).sum(dim=1) / per.clamp_min(1)[:, None], (per > 0).to(torch.float64)

        def _forward(self, module, args, output):
            if self.ctx is None or not args or not isinstance(args[0], torch.Tensor):
                return
            layer = self.hooked[module]
            x = args[0].detach()
            z, w = self._samples(x, layer)
            n = torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device) if w is None \
                else w.to(torch.float64).sum()
            self.counts[layer] = n if layer not in self.counts else self.counts[layer] + n
            key = (_storage_ptr(x), x.storage_offset(), tuple(x.shape), x.stride(), x._version)
            for plan in self.plans[layer]:
                if plan.device_P is None:  # identity: q / k / v read one tensor, one batch statistic
                    # one entry (q, k, v run one after another); x is kept alive with it, so no other
                    # tensor can take its storage (and key) while it is cached
                    cached = self.cache.get(key)
                    if cached is None:
                        self.cache.clear()
                        cached = self.cache[key] = (x, CenteredMoments.batch(z, w))
                    stats = cached[1]
                else:
                    stats = CenteredMoments.batch(z.to(torch.float64) @ plan.device_P.T, w)
                plan.moments.add(*stats)

        def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
            task = self.order[dataloader_idx]
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            size = len(next(v for v in batch.values() if isinstance(v, torch.Tensor))) if isinstance(batch, Mapping) \
                else len(batch[0])
            self.ctx = (size, mask.to(torch.float64) if isinstance(mask, torch.Tensor) else None)
            try:
                self.tasks[task].logits(batch)
            finally:
                self.ctx = None
                self.cache.clear()
            return None

    return CKAPass()


# ============================================================================ the analysis
@dataclass
class CKAResult:
    """What :func:`cka_analysis` found; ``document`` is ``cka.json``."""

    document: dict

    @property
    def kinds(self) -> list[str]:
        return list(self.document["results"])

    def per_layer(self, kind: str) -> dict[str, dict[str, Optional[float]]]:
        """``{layer: {pair: CKA or None}}``."""
        return {layer: dict(v["pairs"]) for layer, v in self.document["results"][kind]["layers"].items()}

    def per_pair(self, kind: str) -> dict[str, Optional[float]]:
        """``{pair: mean over layers}``."""
        return dict(self.document["results"][kind]["pairs"])

    def average(self, kind: str) -> Optional[float]:
        return self.document["results"][kind]["average"]

    @property
    def rows(self) -> list[dict]:
        return list(self.document["rows"])

    def markdown(self) -> str:
        return render_markdown(self.document)


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _check_kinds(kinds) -> list[str]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kind must be among {', '.join(KINDS)} (one or several), got {bad or kinds}")
    return kinds


def _task_updates(task_dir: Path, base_keys: set, base_weights: Mapping[str, torch.Tensor], names: Sequence[str]):
    """``({weight name: Update}, checkpoint kind)`` of the task for the weights in ``names``
    (``base_keys``: every tensor name of the base model, to map the checkpoint's names onto)."""
    from ..merge.sources import align_names, open_task

    reader = open_task(task_dir)
    mapping = align_names(reader, base_keys)  # reader key -> base name
    inverse = {v: k for k, v in mapping.items()}
    out: dict[str, Any] = {}
    for name in names:
        key = inverse.get(name)
        if key is None:
            continue
        if reader.kind == "lora":
            out[name] = reader.load(key).to(dtype=torch.float64)
        else:
            w = reader.load(key).to(torch.float64)
            w0 = base_weights[name].detach().to("cpu", torch.float64)
            if tuple(w.shape) != tuple(w0.shape):
                raise ValueError(f"{task_dir}: {name} has shape {tuple(w.shape)}, the base model's {tuple(w0.shape)}")
            out[name] = w - w0
    return out, reader.kind


def cka_analysis(tasks: Sequence[Union[str, Path]], kinds: Union[str, Sequence[str]] = ("lora", "knots"), n: int = 64,
                 split: str = "val", seed: int = 0, layers: str = DEFAULT_LAYERS, samples: str = "tokens",
                 batch_size: Optional[int] = None, data: Optional[Mapping[str, Any]] = None,
                 base: Optional[Union[str, Path]] = None, accelerator: str = "auto", svd_tol: float = DEFAULT_TOL,
                 knots_scaled: bool = False, progress: bool = False) -> CKAResult:
    """Linear CKA between every pair of tasks' update outputs at every matching layer (module docstring).

    Args:
        tasks: two or more task-checkpoint directories finetuned from one base.
        kinds: ``"full"``, ``"lora"``, ``"knots"`` or several (one data pass serves them all).
        n: examples per task from ``split`` (``"val"`` or ``"test"``), the first ``n`` of a
            ``seed``-ed permutation (``src.statistics.collect.subset_indices``); fewer if the split is smaller.
        layers: regular expression searched in the base network's Linear module names.
        samples: ``"tokens"`` (every unpadded position) or ``"mean"`` (per-example mean input).
        batch_size: default each DataModule's evaluation batch size.
        data: init-argument overrides of the tasks' DataModules (e.g. ``{"data_root": ...}``).
        base: a local directory holding the base weights (default: what ``task.json`` records).
        svd_tol, knots_scaled: KnOTS' singular-value cut-off; compare ``S V_i^T x`` instead of ``V_i^T x``.
    """
    from lightning.pytorch.utilities import CombinedLoader
    from torch.utils.data import DataLoader, Subset

    from ..evaluate.loop import split_loader
    from ..evaluate.models import ModelBank, datamodule_of
    from ..finetune.quiet import quiet_lightning_info
    from ..statistics.collect import linear_layers, subset_indices

    kinds = _check_kinds(kinds)
    task_dirs = [Path(t) for t in tasks]
    if len(task_dirs) < 2:
        raise ValueError("a CKA analysis needs at least two task checkpoints")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test' (held-out data), got {split!r}")
    if samples not in SAMPLES:
        raise ValueError(f"samples must be one of {SAMPLES}, got {samples!r}")
    if int(n) < 1:
        raise ValueError(f"n must be positive, got {n}")
    try:
        pattern = re.compile(layers)
    except re.error as e:
        raise ValueError(f"layers {layers!r} is not a valid regular expression ({e})") from None

    bank = ModelBank(task_dirs, base=base)
    names = bank.tasks
    first = bank.modules[names[0]]
    hooked_layers = {key: module for key, module in linear_layers(first).items() if pattern.search(key)}
    if not hooked_layers:
        raise ValueError(f"no Linear layer of {type(first.unwrapped_model()).__name__} matches layers={layers!r}")
    base_weights = {name: bank.swap.original(name) for name in (f"{k}.weight" for k in hooked_layers)}

    updates: dict[str, list] = {f"{k}.weight": [None] * len(names) for k in hooked_layers}
    ckpt_kinds = {}
    for i, task in enumerate(names):
        found, ckpt_kinds[task] = _task_updates(bank.task_dirs[task], set(bank.swap.tensors), base_weights,
                                                list(updates))
        for name, u in found.items():
            updates[name][i] = u
    if "lora" in kinds:
        full = [t for t in names if ckpt_kinds[t] != "lora"]
        if full:
            raise ValueError(f"kind 'lora' compares LoRA branches, but {', '.join(full)} "
                             f"{'is a full finetune' if len(full) == 1 else 'are full finetunes'} "
                             "(use kind 'full': the update dW x)")

    plans: dict[str, list[_Plan]] = {}
    skipped: dict[str, dict[str, str]] = {k: {} for k in kinds}
    for key, module in hooked_layers.items():
        for kind in kinds:
            plan = _make_plan(kind, key, updates[f"{key}.weight"], module.in_features, svd_tol, knots_scaled)
            if isinstance(plan, str):
                skipped[kind][key] = plan
            else:
                plans.setdefault(key, []).append(plan)
    if not plans:
        raise ValueError(f"no task updates any of the {len(hooked_layers)} layers matching {layers!r}")

    # ---- data: the split of every task, a seeded subset each, pooled in task order
    loaders, used = [], {}
    for task in names:
        info = bank.infos[task]
        dm = datamodule_of(info, bank.task_dirs[task], data)
        loader = split_loader(dm, split)
        dataset = loader.dataset
        take = min(int(n), len(dataset))
        if take == 0:
            raise ValueError(f"{bank.task_dirs[task]}: the {split} split is empty")
        indices = subset_indices(len(dataset), take, seed)
        size = int(batch_size or getattr(dm, "eval_batch_size", None) or loader.batch_size or 16)
        loaders.append(DataLoader(Subset(dataset, indices), batch_size=size, shuffle=False,
                                  collate_fn=loader.collate_fn))
        used[task] = {"examples": take, "split_size": len(dataset), "indices": indices}

    import lightning as L

    pass_ = _make_pass_module(bank.modules, names, {m: k for k, m in hooked_layers.items() if k in plans}, plans,
                              samples)
    quiet_lightning_info()
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, inference_mode=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"predict returned None")  # accumulates on purpose
            trainer.predict(pass_, dataloaders=CombinedLoader(loaders, mode="sequential"), return_predictions=False)
    finally:
        pass_.remove_hooks()
    for module in bank.modules.values():
        module.to("cpu")

    # ---- CKA per kind, layer, pair
    pairs = [pair_name(names[i], names[j]) for i, j in _pairs(len(names))]
    results: dict[str, dict] = {}
    rows: list[dict] = []
    samples_seen = {k: float(v) for k, v in pass_.counts.items()}
    for kind in kinds:
        per_layer: dict[str, dict] = {}
        for key in hooked_layers:
            plan = next((p for p in plans.get(key, []) if p.kind == kind), None)
            if plan is None:
                continue
            if plan.moments.count is None or float(plan.moments.count) < 2:
                skipped[kind][key] = "the layer did not run in the forward pass" if plan.moments.count is None \
                    else "fewer than two samples"
                continue
            values = _plan_cka(plan, names)
            per_layer[key] = {"pairs": values, "mean": _mean(values.values()),
                              "dim": int(plan.P.shape[0]) if plan.P is not None else int(hooked_layers[key].in_features)}
            rows += [{"kind": kind, "layer": key, "pair": p, "cka": v} for p, v in values.items()]
        per_pair = {p: _mean(per_layer[layer]["pairs"][p] for layer in per_layer) for p in pairs}
        results[kind] = {"label": KIND_LABELS[kind], "layers": per_layer, "pairs": per_pair,
                         "average": _mean(per_pair.values()), "skipped": skipped[kind]}

    document = {
        "format_version": FORMAT_VERSION,
        "analysis": "linear CKA between task-update outputs, every pair of tasks (KnOTS Fig. 2, App. B)",
        "tasks": [{"task": t, "path": str(bank.task_dirs[t]), "checkpoint": ckpt_kinds[t], **used[t]} for t in names],
        "base_model": bank.base_model_id,
        "data": {"split": split, "n": int(n), "seed": int(seed), "samples": samples, "pooled": "all tasks, task order",
                 "samples_per_layer": samples_seen},
        "input": "each layer's input in one forward pass of the pretrained model, shared by every task's update",
        "layer_pattern": layers,
        "knots": {"svd_tol": svd_tol, "compared": "S V_i^T x" if knots_scaled else "V_i^T x"},
        "pairs": pairs,
        "results": results,
        "rows": rows,
    }
    return CKAResult(document)


# ============================================================================ reports
def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def render_markdown(document: Mapping[str, Any]) -> str:
    """The summary (average CKA per kind and pair) and one per-layer table per kind."""
    pairs = list(document["pairs"])
    results = document["results"]
    data = document["data"]
    out = [f"# CKA of task-update outputs\n\n{len(document['tasks'])} tasks, {data['split']} split, "
           f"{data['n']} examples per task (seed {data['seed']}), samples: {data['samples']}; "
           f"inputs: {document['input']}.\n"]
    body = [[KIND_LABELS[k], *(_fmt(r["pairs"][p]) for p in pairs), _fmt(r["average"])] for k, r in results.items()]
    out.append("Mean over layers per pair, and over pairs:\n\n" + _table(["kind", *pairs, "average"], body))
    for kind, r in results.items():
        body = [[layer, *(_fmt(v["pairs"][p]) for p in pairs), _fmt(v["mean"])] for layer, v in r["layers"].items()]
        body.append(["mean over layers", *(_fmt(r["pairs"][p]) for p in pairs), _fmt(r["average"])])
        out.append(f"## {KIND_LABELS[kind]}\n\n" + _table(["layer", *pairs, "mean over pairs"], body))
        if r["skipped"]:
            out.append("Skipped: " + "; ".join(f"{k} ({why})" for k, why in r["skipped"].items()) + "\n")
    return "\n".join(out)


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def plot(document: Mapping[str, Any], path) -> Path:
    """``cka.png``: the average CKA per kind (bars; dots: each pair's mean over layers) and the
    mean over pairs at every layer (lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = document["results"]
    layers = list(dict.fromkeys(layer for r in results.values() for layer in r["layers"]))
    fig = Figure(figsize=(4 + max(6.0, 0.28 * len(layers)), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(2.0, 0.07 * len(layers))]})
    for x, (kind, r) in enumerate(results.items()):
        ax_bar.bar(x, r["average"] or 0.0, color=f"C{KINDS.index(kind)}", alpha=0.8)
        dots = [v for v in r["pairs"].values() if v is not None]
        ax_bar.plot([x] * len(dots), dots, "k.", ms=4)
        ys = [r["layers"][layer]["mean"] if layer in r["layers"] else None for layer in layers]
        ax_line.plot(range(len(layers)), [float("nan") if y is None else y for y in ys], "o-", ms=3,
                     color=f"C{KINDS.index(kind)}", label=KIND_LABELS[kind])
    ax_bar.set_xticks(range(len(results)), [KIND_LABELS[k].split(":")[0] for k in results])
    ax_bar.set_ylim(0, 1)
    ax_bar.set_ylabel("linear CKA (mean over layers and pairs)")
    ax_bar.set_title("task updates' outputs")
    ax_line.set_xticks(range(len(layers)), _short_names(layers), rotation=90, fontsize=6)
    ax_line.set_ylim(0, 1)
    ax_line.set_ylabel("CKA (mean over pairs)")
    ax_line.set_title("per layer")
    ax_line.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_outputs(result: CKAResult, output, overwrite: bool = False) -> list[Path]:
    """``cka.json``, ``cka.md``, ``cka.png`` in ``output``, written atomically (``src/safe_output.py``:
    never into or over an input; an earlier CKA output is replaced)."""
    from ..safe_output import atomic_directory, check_output

    check_output(output, [t["path"] for t in result.document["tasks"]], marker=JSON_NAME, overwrite=overwrite)
    output = Path(output)
    with atomic_directory(output) as tmp:
        (tmp / JSON_NAME).write_text(json.dumps(result.document, indent=2) + "\n")
        (tmp / MARKDOWN_NAME).write_text(result.markdown())
        plot(result.document, tmp / PNG_NAME)
    return [output / JSON_NAME, output / MARKDOWN_NAME, output / PNG_NAME]


# ============================================================================ command line
@dataclass
class CKAConfig:
    """``python -m src.analysis.cka``: linear CKA of task-update outputs (KnOTS Fig. 2).

    Args:
        tasks: task-checkpoint directories finetuned from one base (two or more).
        output: the directory for cka.json, cka.md and cka.png.
        kind: full, lora, knots, or a list of them (one data pass).
        n: examples per task from the split (pooled over all tasks).
        split: val or test.
        seed: seed of the example subsets.
        layers: regular expression searched in Linear module names.
        samples: tokens (every unpadded position) or mean (one per example).
        batch_size: default each DataModule's evaluation batch size.
        data: DataModule init-argument overrides (e.g. {data_root: ...}).
        base: a local directory holding the base model's weights.
        accelerator: as for lightning.Trainer (one device).
        svd_tol: KnOTS' singular-value cut-off.
        knots_scaled: compare S V_i^T x instead of V_i^T x.
        overwrite: replace an existing output directory that is not an earlier CKA output.
        progress: show Lightning's progress bar.
    """

    tasks: list[str]
    output: str
    kind: Union[list[str], str] = "lora"
    n: int = 64
    split: str = "val"
    seed: int = 0
    layers: str = DEFAULT_LAYERS
    samples: str = "tokens"
    batch_size: Optional[int] = None
    data: Optional[dict] = None
    base: Optional[str] = None
    accelerator: str = "auto"
    svd_tol: float = DEFAULT_TOL
    knots_scaled: bool = False
    overwrite: bool = False
    progress: bool = True


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m src.analysis.cka", description=__doc__.splitlines()[0],
                            default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(CKAConfig, as_group=False)
    return parser


def main(argv=None) -> int:
    import sys

    from ..finetune.quiet import quiet_known_noise
    from ..merge.errors import MergeInputError
    from ..safe_output import OutputError, check_output
    from ..task_checkpoint import TaskCheckpointError

    quiet_known_noise()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    config = CKAConfig(**{k: v for k, v in vars(cfg).items() if k in CKAConfig.__dataclass_fields__})
    try:
        check_output(config.output, config.tasks, marker=JSON_NAME, overwrite=config.overwrite)  # before any work
        result = cka_analysis(config.tasks, config.kind, n=config.n, split=config.split, seed=config.seed,
                              layers=config.layers, samples=config.samples, batch_size=config.batch_size,
                              data=config.data, base=config.base, accelerator=config.accelerator,
                              svd_tol=config.svd_tol, knots_scaled=config.knots_scaled, progress=config.progress)
        paths = write_outputs(result, config.output, overwrite=config.overwrite)
    except (OutputError, TaskCheckpointError, MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.markdown())
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    from ..merge.memory import use_free_cores

    use_free_cores()
    sys.exit(main())
