"""AdaMerging, AdaMerging++ and CART++: merge coefficients learned at test time.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024,
``EnnengYang/AdaMerging``); CART++ is AdaMerging on CART's low-rank centered vectors (Choi et
al., Eq. 6). The merged weight of every parameter tensor ``l`` is::

    adamerging    (kind "ta"):   W_l = W0_l   + sum_i lambda_{i,l} dW_{i,l}          (task vectors)
    adamerging++  (kind "ties"): W_l = W0_l   + sum_i lambda_{i,l} E_{i,l}           (TIES-trimmed, elected)
    cart++        (kind "cart"): W_l = Wavg_l + sum_i lambda_{i,l} LR_k(W_i - Wavg)_l

``lambda`` (layer-wise: tasks x tensors; task-wise: one per task), initialised to 0.3 and clamped
to [0, 1], minimises the summed mean Shannon entropy of the merged model's predictions on
unlabelled test batches of every task (each task through its own head): Adam, lr 1e-3, 500
steps, 16 examples per task per step (the paper's recipe; all are arguments).

Nothing is re-implemented: the per-tensor vectors come from the merge stage's own methods
(``coefficient_state``: TA's updates, TIES' elected vectors, CART's centered SVD) and each step
combines them with the same function a merge with a coefficient table uses (``combine``), then
applies them like the evaluation applies a merge (:meth:`ModelBank.with_updates`). The merged
weights enter the ONE base network of the :class:`ModelBank` through
``torch.func.functional_call`` (no model is copied per step). The optimisation is a
LightningModule trained by ``trainer.fit`` with the coefficient tensor as its only parameter.

The result is a :class:`~src.merge.coefficients.CoefficientTable`; re-applied by a plain merge —
``task_arithmetic`` / ``ties`` (``disjoint="sum"``) / ``cart`` with ``lam=1`` and
``coefficients=<table path>`` (:attr:`AdaMergingResult.merge_params`) — it gives the merged
model the optimiser evaluated at its final coefficients, bit for bit when the merge runs on the
device the optimisation ran on (dense TA / TIES on any device: their combination is
element-wise; LoRA products and CART's matmul round differently on another device).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
import torch
from torch import nn

from ..merge import MergeEngine, get_method
from ..merge.coefficients import CoefficientTable
from ..merge.registry import TensorGroup
from ..merge.updates import LowRank
from .models import ModelBank

#: kind -> merge method re-applying its table, and the method hyperparameters the kind fixes.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "ta": ("task_arithmetic", {"lam": 1.0, "reduce": "sum"}),
    "ties": ("ties", {"lam": 1.0, "disjoint": "sum"}),
    "cart": ("cart", {"lam": 1.0}),
}
ALIASES = {"adamerging": "ta", "task_arithmetic": "ta", "adamerging++": "ties", "cart++": "cart"}
#: the names a kind goes by in rows and docs
LABELS = {"ta": "adamerging", "ties": "adamerging++", "cart": "cart++"}


def kind_of(name: str) -> str:
    kind = ALIASES.get(name, name)
    if kind not in KINDS:
        raise ValueError(f"AdaMerging: unknown kind {name!r}; use ta (adamerging), ties (adamerging++) or cart (cart++)")
    return kind


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax of each row of ``logits`` (nats), in float32."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _to(obj: Any, device: torch.device) -> Any:
    """A method's per-tensor state on ``device`` (tensors, LoRA factors, groups, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, LowRank):
        return obj.to(device=device)
    if isinstance(obj, TensorGroup):  # the base is never needed by combine: not carried
        return TensorGroup(obj.name, None, [_to(u, device) for u in obj.updates])
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), (torch.Tensor, LowRank))})
    return obj


def _base_prefix(module: nn.Module, base: nn.Module) -> str:
    """Where the shared base network sits inside a task module (``model.`` for every family)."""
    for path, sub in module.named_modules(remove_duplicate=False):
        if sub is base:
            return f"{path}." if path else ""
    if isinstance(getattr(module, "model", None), nn.Module):  # a private view (head inside the base)
        return "model."
    raise ValueError(f"{type(module).__name__} does not hold the bank's base network")


class _Logits(nn.Module):
    """``module.logits(batch)`` as a forward, so ``functional_call`` can run it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.task = module

    def forward(self, batch):
        return self.task.logits(batch)


class CoefficientLearner(L.LightningModule):
    """The coefficients (the only parameter) and the entropy objective; see the module docstring.

    Args:
        bank: the ModelBank whose base network and task heads serve the forward passes.
        tasks: task names in merge order.
        method: the merge method (``coefficient_state`` / ``combine``) and its ``params``.
        states: per tensor with coefficients, the method's coefficient state (on the bank's device).
        fixed: merged weights of tensors the coefficients do not touch (CART's averaged tensors).
        layer_wise: one coefficient per task and tensor (else one per task).
        init, lr, clamp: initial value, Adam's learning rate, the clamp range.
    """

    def __init__(self, bank: ModelBank, tasks: Sequence[str], method, params, states: Mapping[str, Any],
                 fixed: Mapping[str, torch.Tensor], layer_wise: bool = True, init: float = 0.3, lr: float = 1e-3,
                 clamp: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.tasks, self.names = list(tasks), list(states)
        self.method, self.params, self.states, self.fixed = method, params, dict(states), dict(fixed)
        self.layer_wise, self.lr, self.clamp = layer_wise, float(lr), (float(clamp[0]), float(clamp[1]))
        shape = (len(self.tasks), len(self.names)) if layer_wise else (len(self.tasks),)
        self.coefficients = nn.Parameter(torch.full(shape, float(init), dtype=torch.float32))
        # plain attributes: the bank's modules are not submodules (Lightning must not move or train() them)
        self.bank = bank
        self.device_of_states = next(bank.base.parameters()).device
        self.forwards: dict[str, tuple[nn.Module, str]] = {}
        for t in self.tasks:
            wrapper = _Logits(bank.modules[t])
            prefix = "task." + _base_prefix(bank.modules[t], bank.base)
            known = {n for n, _ in wrapper.named_parameters(remove_duplicate=False)}
            known |= {n for n, _ in wrapper.named_buffers(remove_duplicate=False)}
            missing = [n for n in list(self.names) + list(self.fixed) if prefix + n not in known]
            if missing:
                raise ValueError(f"task {t!r}: merged tensors {missing[:3]} are not in its module under {prefix!r}")
            self.forwards[t] = (wrapper, prefix)
        self.history: list[dict[str, Any]] = []

    # ----- the merged model ------------------------------------------------------------
    def lambdas(self) -> torch.Tensor:
        """The coefficients in use: clamped (``(tasks, tensors)`` layer-wise, ``(tasks,)`` task-wise)."""
        return self.coefficients.clamp(*self.clamp)

    def merged_params(self) -> dict[str, torch.Tensor]:
        """Every merged tensor at the current coefficients (differentiable in them): the method's
        ``combine`` with the coefficients as float64 (exactly the float32 values a table stores),
        applied as the evaluation applies a merge (``W0 + dW``, ``ModelBank.with_updates``)."""
        lam = self.lambdas().to(self.device_of_states, torch.float64)
        updates = {}
        for j, name in enumerate(self.names):
            updates[name] = self.method.combine(self.states[name], self.params, lam[:, j] if self.layer_wise else lam)
        merged = self.bank.with_updates(updates)
        merged.update(self.fixed)
        return merged

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The merged weights at the current coefficients (detached): what the optimiser evaluates."""
        with torch.no_grad():
            return {k: v.detach() for k, v in self.merged_params().items()}

    def task_logits(self, task: str, batch: Any, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``task``'s logits (its own head) with ``params`` substituted into the shared base."""
        wrapper, prefix = self.forwards[task]
        return torch.func.functional_call(wrapper, {prefix + n: w for n, w in params.items()}, (batch,))

    def objective(self, batches: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over tasks (merge order) of the mean entropy of each task's batch."""
        params = self.merged_params()
        per_task = {t: entropy(self.task_logits(t, batches[t], params)).mean() for t in self.tasks if t in batches}
        total = None
        for value in per_task.values():
            total = value if total is None else total + value
        return total, {t: float(v.detach()) for t, v in per_task.items()}

    # ----- Lightning -------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, per_task = self.objective(batch)
        self.history.append({"step": int(self.global_step), "entropy": float(loss.detach()), "per_task": per_task})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.coefficients], lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return {t: self.bank.modules[t].transfer_batch_to_device(b, device, dataloader_idx) for t, b in batch.items()}

    # ----- results ---------------------------------------------------------------------
    def table(self, meta: Optional[dict] = None) -> CoefficientTable:
        """The clamped coefficients as a table: ``default`` only (task-wise), or every tensor
        listed (layer-wise; ``default`` = the per-task mean over tensors, for tensors a later
        model might add)."""
        lam = self.lambdas().detach().cpu()
        if not self.layer_wise:
            return CoefficientTable(list(self.tasks), [float(v) for v in lam], {}, dict(meta or {}))
        params = {name: [float(v) for v in lam[:, j]] for j, name in enumerate(self.names)}
        default = [float(v) for v in lam.mean(dim=1)] if self.names else [0.0] * len(self.tasks)
        return CoefficientTable(list(self.tasks), default, params, dict(meta or {}))


@dataclass
class AdaMergingResult:
    """What :func:`learn_coefficients` returns.

    ``table`` (saved at ``path`` when an output was given); ``method`` + ``merge_params``: the
    plain merge that re-applies it (``merge_params["coefficients"]`` is ``path``); ``history``:
    per step ``{"step", "entropy" (summed over tasks), "per_task"}`` on that step's batches;
    ``initial_entropy`` / ``final_entropy``: the objective on fixed batches (the first
    ``eval_batches`` of each task's loader) at the initial and final coefficients; ``learner``:
    the trained module (``learner.merged_state()``: the merged weights it evaluates).
    """

    kind: str
    method: str
    merge_params: dict[str, Any]
    table: CoefficientTable
    history: list[dict[str, Any]]
    initial_entropy: float
    final_entropy: float
    wall_s: float
    path: Optional[Path] = None
    learner: Optional[CoefficientLearner] = field(default=None, repr=False)


def prepare_states(bank: ModelBank, kind: str, tasks: Sequence[str], merge_params: Optional[Mapping[str, Any]] = None,
                   merge_device: str = "cpu"):
    """The merge stage's per-tensor states for ``kind``: ``(method, params, states, fixed)``.

    ``states``: tensor name -> the method's coefficient state (on the bank's device); ``fixed``:
    merged weights of the tensors the coefficients do not touch. The task models are read as the
    evaluation's sweep reads them (task directories, the bank's base state), on ``merge_device``.
    """
    kind = kind_of(kind)
    name, forced = KINDS[kind]
    given = dict(merge_params or {})
    clash = sorted(k for k in given if k in forced or k in ("weights", "coefficients"))
    if clash:
        raise ValueError(f"AdaMerging ({LABELS[kind]}): {clash} are fixed by the algorithm "
                         f"({forced}; the learned coefficients replace weights/coefficients)")
    method = get_method(name)
    params = method.make_params(**{**given, **forced})
    engine = MergeEngine(method, [bank.task_dirs[t] for t in tasks], base=bank.base_state(), device=merge_device,
                         progress=False)
    cache: dict[str, Any] = {}
    for _ in engine.prepared_states(params, cache)():
        pass
    stats = engine.reductions(params, lambda: iter(cache.items()))
    for key in stats:  # deferred ones too (TIES' majority sign): the states are released one by one below
        stats[key]
    device = next(bank.base.parameters()).device
    states: dict[str, Any] = {}
    fixed_updates: dict[str, Any] = {}
    for tensor in engine.names:
        if tensor not in cache:
            continue
        state = method.coefficient_state(cache[tensor], params, stats)
        if state is None:
            fixed_updates[tensor] = method.merge(cache[tensor], params, stats)
        else:
            states[tensor] = _to(state, device)
        del cache[tensor]  # TIES: the elected vectors replace the task updates
    if not states:  # e.g. CART's low_rank_params matching none of this model's tensor names
        raise ValueError(f"AdaMerging ({LABELS[kind]}): no tensor of the merge depends on the coefficients "
                         f"({name} with {dict(given)} merges every tensor without them): nothing to learn")
    fixed = bank.with_updates(fixed_updates) if fixed_updates else {}
    return method, params, states, fixed


def _step_loader(loader, batch_size: int, seed: int, num_workers: Optional[int]):
    """The test set of ``loader`` reshuffled in batches of ``batch_size`` (AdaMerging's sampling)."""
    from torch.utils.data import DataLoader

    dataset = loader.dataset
    g = torch.Generator().manual_seed(seed)
    workers = getattr(loader, "num_workers", 0) if num_workers is None else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, collate_fn=loader.collate_fn,
                      num_workers=workers, drop_last=len(dataset) >= batch_size)


class _StepsBar(TQDMProgressBar):
    """One transient bar over the optimization steps (not Lightning's "Epoch n/-1" of an endless fit)."""

    def __init__(self, label: str):
        super().__init__(leave=False)
        self.label = label

    def on_train_epoch_start(self, trainer, *args, **kwargs):
        super().on_train_epoch_start(trainer, *args, **kwargs)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description(self.label)


def _trainer(device: torch.device, steps: int, progress: bool, label: str = "AdaMerging") -> L.Trainer:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    accelerator, devices = ("gpu", [device.index or 0]) if device.type == "cuda" else (device.type, 1)
    return L.Trainer(accelerator=accelerator, devices=devices, max_steps=steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                     callbacks=[_StepsBar(label)] if progress else None,
                     num_sanity_val_steps=0, limit_val_batches=0, precision="32-true")


def _fixed_entropy(learner: CoefficientLearner, batches: Mapping[str, list]) -> float:
    """The objective on fixed batches: per task, the mean entropy over all of its batches' examples."""
    with torch.no_grad():
        params = learner.merged_params()
        total = 0.0
        for t in learner.tasks:
            values = [entropy(learner.task_logits(t, b, params)) for b in batches[t]]
            total += float(torch.cat(values).mean())
    return total


def learn_coefficients(
    bank: ModelBank,
    kind: str,
    tasks: Sequence[str],
    loaders: Union[Mapping[str, Any], Callable[[str], Any]],
    merge_params: Optional[Mapping[str, Any]] = None,
    output: Union[str, Path, None] = None,
    layer_wise: bool = True,
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 500,
    batch_size: int = 16,
    clamp: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    eval_batches: Optional[int] = 4,
    merge_device: str = "cpu",
    num_workers: Optional[int] = None,
    progress: bool = False,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients (module docstring) for ``tasks`` of ``bank``.

    Args:
        bank: the evaluation's ModelBank (its base network, task heads and task directories).
        kind: ``ta`` (``adamerging``), ``ties`` (``adamerging++``) or ``cart`` (``cart++``).
        tasks: task names, in merge order (the order of the merge that re-applies the table).
        loaders: per task, its unlabelled data: ``{task: DataLoader}`` or ``loader(task)`` (the test
            loaders); its dataset and collate function are re-batched, shuffled, ``batch_size`` a step.
        merge_params: the method's other hyperparameters (TIES: ``density``, ``trim_scope``,
            ``sign_fill``; CART: ``rank_ratio``, ``rank``, ``low_rank_params``). ``lam``,
            ``reduce``/``disjoint``, ``weights`` and ``coefficients`` are fixed by the algorithm.
        output: where to save the table (JSON); ``merge_params`` of the result then name it.
        layer_wise: one coefficient per task and parameter tensor (else per task: task-wise).
        init, lr, steps, batch_size, clamp: the paper's 0.3, 1e-3, 500, 16, [0, 1].
        seed: of the batch shuffling.
        eval_batches: batches of each loader (in its order) for the initial / final entropy
            (``None``: all of them; 0: not measured).
        merge_device: where the task vectors are prepared (as the evaluation's ``merge_device``;
            CART's SVDs must run where the re-applying merge runs for a bit-identical result).
        num_workers: DataLoader workers of the step batches (default: the given loader's).
    """
    start = time.perf_counter()
    kind = kind_of(kind)
    tasks = list(tasks)
    if not tasks:
        raise ValueError("AdaMerging needs at least one task")
    unknown = [t for t in tasks if t not in bank.modules]
    if unknown:
        raise ValueError(f"AdaMerging: tasks {unknown} are not in the model bank (it has {bank.tasks})")
    generative = [t for t in tasks if not getattr(bank.modules[t], "is_classification", True)]
    if generative:
        raise ValueError(f"AdaMerging minimises the entropy of class predictions; tasks {generative} generate text")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo <= init <= hi:
        raise ValueError(f"AdaMerging: init {init} is outside the clamp range [{lo}, {hi}]")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"AdaMerging: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    get = loaders if callable(loaders) else loaders.__getitem__
    task_loaders = {t: get(t) for t in tasks}

    method, params, states, fixed = prepare_states(bank, kind, tasks, merge_params, merge_device)
    learner = CoefficientLearner(bank, tasks, method, params, states, fixed, layer_wise, init, lr, (lo, hi))
    device = learner.device_of_states
    fixed_batches = {}
    if eval_batches != 0:
        for t, loader in task_loaders.items():
            batches = []
            for i, b in enumerate(loader):
                if eval_batches is not None and i >= eval_batches:
                    break
                batches.append(bank.modules[t].transfer_batch_to_device(b, device, 0))
            fixed_batches[t] = batches
    initial = _fixed_entropy(learner.to(device), fixed_batches) if fixed_batches else float("nan")
    if steps:
        from lightning.pytorch.utilities import CombinedLoader

        train = CombinedLoader({t: _step_loader(loader, batch_size, seed + i, num_workers)
                                for i, (t, loader) in enumerate(task_loaders.items())}, mode="max_size_cycle")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging interval).*")
            _trainer(device, steps, progress, f"{LABELS[kind]}: steps").fit(learner, train_dataloaders=train)
    learner.to(device)  # Lightning's teardown moves the module to the CPU
    final = _fixed_entropy(learner, fixed_batches) if fixed_batches else float("nan")

    method_params = {k: v for k, v in dataclasses.asdict(params).items() if k not in ("weights", "coefficients")}
    meta = {"algorithm": LABELS[kind], "method": method.name, "method_params": method_params,
            "layer_wise": layer_wise, "init": init, "lr": lr, "steps": steps, "batch_size": batch_size,
            "clamp": [lo, hi], "seed": seed, "initial_entropy": initial if fixed_batches else None,
            "final_entropy": final if fixed_batches else None,
            "entropy": [h["entropy"] for h in learner.history],
            "entropy_per_task": {t: [h["per_task"][t] for h in learner.history] for t in tasks}}
    table = learner.table(meta)
    path = table.save(output) if output is not None else None
    merge_params_out = dict(method_params)
    if path is not None:
        merge_params_out["coefficients"] = str(path)
    return AdaMergingResult(kind, method.name, merge_params_out, table, list(learner.history), initial, final,
                            time.perf_counter() - start, path, learner)


__all__ = ["learn_coefficients", "prepare_states", "AdaMergingResult", "CoefficientLearner", "entropy", "KINDS",
           "kind_of"]
