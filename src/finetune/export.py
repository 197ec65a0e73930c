"""Write the task-checkpoint directory at the end of ``fit`` (see ``src/task_checkpoint.py``).

:class:`TaskCheckpointExport` is a Lightning callback. It

1. evaluates the untrained model on the validation and test splits when fit starts (the
   zero-shot accuracy that normalized accuracy and the reports need);
2. keeps a CPU copy of the trainable parameters at the best ``monitor`` value (``select="best"``;
   with ``"last"`` the final weights are exported);
3. when fit ends, restores the selected weights, evaluates validation and test again, and writes
   ``adapter/`` (LoRA) or ``model.safetensors`` (full, base-model parameter names),
   ``head.safetensors`` and ``task.json`` atomically (``atomic_directory``) on global rank 0,
   then prints where it went and the zero-shot / finetuned accuracies.

The output directory is checked when fit is set up, before the model is built or trained
(``src/safe_output.py: check_output``): never an input of the run (a local base model, tokenizer
or data directory the config names), the working directory or one of its parents, and never an
existing non-empty directory that is not an earlier task checkpoint (it has no ``task.json``)
unless ``overwrite`` is set. Replacing an earlier task checkpoint is announced.

Its state (zero-shot metrics, best score and weights) is saved in Lightning checkpoints, so a
resumed fit (``--ckpt_path``) exports the same thing an uninterrupted one would.

**Sharded strategies** (``rebuild``; default: on for FSDP and DeepSpeed). With DDP every rank holds
the whole module, so the steps above read it in place. Under FSDP the LightningModule's parameters
are shards (flattened views, many empty), and under DeepSpeed they are half-precision copies
(ZeRO-3: also partitioned) while the float32 master weights live in the optimizer; reading them in
place would export a shard or a bf16 rounding. There the trained weights are consolidated first
(:func:`consolidated_trained_state`; the trainable parameters and the buffers of the modules that
own them, the keys of the best-weights snapshot):

* FSDP: ``FullyShardedDataParallel.summon_full_params(writeback=False, rank0_only=True,
  offload_to_cpu=True)`` on every rank (a collective), copied to the CPU on global rank 0; needs
  ``use_orig_params=True`` (Lightning's default); wrapper names (``_fsdp_wrapped_module.``) removed;
* DeepSpeed (any ZeRO stage): ``trainer.save_checkpoint`` (every rank writes its partition; a
  filesystem all nodes share) into ``<default_root_dir>/export-deepspeed/<best|last>``, then on
  rank 0 DeepSpeed's ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (what Lightning's
  ``convert_zero_checkpoint_to_fp32_state_dict`` calls): the float32 master weights.

Global rank 0 then rebuilds the module unsharded on the CPU from its own constructor arguments
(``type(module)(**module.init_args())`` + ``build_model``, as ``load_task_model`` does: the
pretrained base and the same head), loads the consolidated weights into it, evaluates it in
float32 on its device (the zero-shot numbers too, on a fresh rebuild when fit starts) and exports
it with the same :func:`export_task_checkpoint` as DDP; the other ranks wait at a barrier (raise the
strategy's ``timeout`` when these evaluations take longer than its default 30 minutes). Rank 0
needs room for one float32 copy of the model on its device next to its training shard. The CPU
tests run this path on one device (``rebuild=True``) and the consolidation functions with the
distributed primitives replaced; FSDP's and DeepSpeed's own gathering is not exercised without GPUs.
``python -m src.finetune fit`` adds it as the ``export`` config group (``--export.output_dir``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file
from torchmetrics import MeanMetric

from ..safe_output import TASK_MARKER, atomic_directory, check_output, note
from ..task_checkpoint import ADAPTER_DIR, FULL_WEIGHTS, HEAD_WEIGHTS, TaskInfo, write_task_info
from .base import TaskModule, jsonable

log = logging.getLogger(__name__)


def task_name(datamodule) -> str:
    task = getattr(datamodule, "task", None)
    if task is None:
        raise RuntimeError(f"{type(datamodule).__name__} exposes no `task` name")
    return str(task).replace(os.sep, "_")


def resolve_output_dir(output_dir: Optional[str], task: str) -> Path:
    """``output_dir`` with ``{task}`` filled in; default ``$CHECKPOINT_ROOT/{task}`` (``checkpoints``)."""
    if output_dir is None:
        output_dir = os.path.join(os.environ.get("CHECKPOINT_ROOT", "checkpoints"), "{task}")
    return Path(str(output_dir).replace("{task}", task))


#: Init arguments of models and datamodules that name something a run reads: a base model,
#: tokenizer / processor, data directory. Those that are existing local paths are protected.
INPUT_ARGS = ("pretrained", "tokenizer", "processor", "clip_model", "text_model", "data_root", "data_dir", "root",
              "hub_id")


def input_paths(*arg_dicts) -> list[str]:
    """The existing local paths among the input-naming arguments (``INPUT_ARGS``) of init-arg
    dicts (a hub id such as ``openai/clip-vit-base-patch32`` is an input only when a local
    directory of that name exists, which is then what Hugging Face loads)."""
    found: list[str] = []
    for args in arg_dicts:
        for key in INPUT_ARGS:
            value = (args or {}).get(key)
            if isinstance(value, (str, os.PathLike)) and str(value).strip():
                path = os.path.expanduser(str(value))
                if os.path.exists(path) and path not in found:
                    found.append(path)
    return found


def _init_args(obj) -> dict[str, Any]:
    if obj is None:
        return {}
    args = dict(getattr(obj, "hparams", {}) or {})
    for key in INPUT_ARGS:
        if key not in args and isinstance(getattr(obj, key, None), (str, os.PathLike)):
            args[key] = getattr(obj, key)
    return args


def run_inputs(module, datamodule=None) -> list[str]:
    """Local paths a fit of ``module`` on ``datamodule`` reads (see :func:`input_paths`)."""
    return input_paths(_init_args(module), _init_args(datamodule))


def format_metrics(metrics: dict) -> str:
    """``zero-shot val 83.3 / test 75.0 -> finetuned val 93.3 / test 91.0`` (accuracy in %)."""
    def split(stage: str) -> str:
        m = metrics.get(stage) or {}
        f = lambda x: "-" if x is None else f"{100 * x:.1f}"
        return f"val {f(m.get('val_acc'))} / test {f(m.get('test_acc'))}"

    return f"zero-shot {split('zeroshot')} -> finetuned {split('finetuned')}"


@torch.no_grad()
def evaluate_accuracy(module: TaskModule, loader, trainer: Optional[L.Trainer] = None,
                      progress: Optional[str] = None) -> float:
    """Sample-weighted accuracy of ``module`` over ``loader``, computed by the code of the module's
    validation step (``update_split_metric``: the task's own per-example metric where the module
    defines one, e.g. SP-ROUGE for mT5 summaries). It runs inside ``fit`` (zero-shot before
    training, the selected weights after), where Lightning's loops cannot be re-entered; the
    evaluation stage runs the same steps through ``trainer.validate`` / ``trainer.test``.
    ``progress``: show a transient progress bar with this description."""
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True)
    was_training = module.training
    module.eval()
    context = contextlib.nullcontext()
    if trainer is not None:
        context = trainer.precision_plugin.forward_context()
    metric = MeanMetric(sync_on_compute=False).to(module.device)  # the validation step's metric, per process
    total = 0
    try:
        with context:
            for batch in loader:
                if trainer is not None:
                    batch = trainer.strategy.batch_to_device(batch)
                else:
                    batch = module.transfer_batch_to_device(batch, module.device, 0)
                total += module.update_split_metric(metric, batch)
    finally:
        module.train(was_training)
    return float(metric.compute()) if total else float("nan")


def evaluate_splits(module: TaskModule, datamodule, splits=("val", "test"), trainer=None,
                    progress: Optional[str] = None) -> dict[str, float]:
    out = {}
    for split in splits:
        getter = getattr(datamodule, f"{split}_dataloader", None)
        if getter is None:
            continue
        try:
            loader = getter()
        except (NotImplementedError, KeyError, AttributeError):
            continue
        if loader is None:
            continue
        out[f"{split}_acc"] = evaluate_accuracy(module, loader, trainer, f"{progress} {split}" if progress else None)
    return out


def datamodule_hparams(datamodule) -> dict[str, Any]:
    if datamodule is None:
        return {}
    args = {k: v for k, v in (getattr(datamodule, "hparams", {}) or {}).items() if not str(k).startswith("_")}
    return {"class_path": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "init_args": jsonable(args)}


def trainer_hparams(trainer: Optional[L.Trainer]) -> dict[str, Any]:
    if trainer is None:
        return {}
    return jsonable({
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "global_step": trainer.global_step,
        "seed": os.environ.get("PL_GLOBAL_SEED"),
    })


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def export_task_checkpoint(module: TaskModule, output_dir, task: str, metrics: Optional[dict] = None,
                           extra_hparams: Optional[dict] = None, inputs: Optional[list] = None,
                           overwrite: bool = False) -> Path:
    """Write ``module`` as a task-checkpoint directory (atomically) and return its path.

    ``output_dir`` is checked first (``check_output``: ``inputs``, default the module's local
    input paths; an existing non-empty directory without ``task.json`` needs ``overwrite``)."""
    check_output(output_dir, run_inputs(module) if inputs is None else inputs, TASK_MARKER, overwrite)
    if module.label_names is None:
        raise RuntimeError("the module has no label_names: build it (setup) before exporting")
    hparams = module.task_hparams()
    hparams.update(extra_hparams or {})
    info = TaskInfo(
        task=task,
        base_model=module.base_model_id,
        family=module.family,
        kind=module.finetune,
        label_names=list(module.label_names),
        hparams=jsonable(hparams),
        metrics=jsonable(metrics or {}),
    )
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        if module.finetune == "lora":
            module.save_adapter(tmp / ADAPTER_DIR)
            if not (tmp / ADAPTER_DIR / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"{type(module).__name__}.save_adapter wrote no adapter_model.safetensors")
        else:
            state = module.trained_state_dict()
            if not state:
                raise RuntimeError("no trained parameters to export (full finetune)")
            save_file(_cpu_state(state), str(tmp / FULL_WEIGHTS), metadata={"format": "pt"})
        module.save_head(tmp / HEAD_WEIGHTS)
        write_task_info(tmp, info)
    return output_dir


# ----- sharded strategies: consolidate, rebuild on rank 0 ------------------------------------
#: prefixes wrappers insert into parameter names (FSDP units, activation checkpointing,
#: torch.compile, Lightning < 2.1's DeepSpeed wrapper)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_forward_module.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def sharding_of(trainer) -> Optional[str]:
    """``"fsdp"`` or ``"deepspeed"`` when the trainer's strategy keeps the module sharded / in
    half-precision copies; ``None`` (DDP, one device) when every rank holds the whole module."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    return None


def trained_state_keys(module: torch.nn.Module) -> list[str]:
    """The names a snapshot of ``module`` holds: trainable parameters and the buffers of the modules
    that own them (``TaskCheckpointExport._snapshot``)."""
    return list(TaskCheckpointExport._snapshot(module, copy=False))


def fsdp_trained_state(trainer, pl_module) -> Optional[dict[str, torch.Tensor]]:
    """Collective (every rank calls it): on global rank 0 full CPU copies of ``pl_module``'s trained
    weights, gathered by FSDP; ``None`` on the other ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if getattr(trainer.strategy, "kwargs", {}).get("use_orig_params") is False:
        raise RuntimeError("the task-checkpoint export under FSDP needs use_orig_params=True (Lightning's "
                           "default): the parameters keep their names and requires_grad")
    with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True):
        if not trainer.is_global_zero:
            return None
        return {clean_name(k): v for k, v in TaskCheckpointExport._snapshot(pl_module).items()}


def deepspeed_trained_state(checkpoint_dir, keys) -> dict[str, torch.Tensor]:
    """The float32 master weights named ``keys`` from a Lightning DeepSpeed checkpoint directory (any
    ZeRO stage; reads every rank's partition files: call it on one process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), exclude_frozen_parameters=True)
    except TypeError:  # DeepSpeed < 0.14: no exclude_frozen_parameters
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    state = {clean_name(k): v for k, v in state.items()}
    return {k: state[k] for k in keys if k in state}


def consolidated_trained_state(trainer, pl_module, checkpoint_dir=None, keys=None) -> Optional[dict]:
    """The trained weights of ``pl_module`` as full CPU tensors on global rank 0 (``None`` elsewhere).
    Collective under FSDP and DeepSpeed (every rank calls it). DeepSpeed: from ``checkpoint_dir``
    when given (the best validation's checkpoint), else from a checkpoint saved now."""
    kind = sharding_of(trainer)
    if kind == "fsdp":
        return fsdp_trained_state(trainer, pl_module)
    if kind == "deepspeed":
        if checkpoint_dir is None:
            checkpoint_dir = deepspeed_checkpoint(trainer, "last")
        if not trainer.is_global_zero:
            return None
        return deepspeed_trained_state(checkpoint_dir, keys if keys is not None else trained_state_keys(pl_module))
    return TaskCheckpointExport._snapshot(pl_module) if trainer.is_global_zero else None


def deepspeed_checkpoint(trainer, name: str) -> Path:
    """Collective: save the trainer's state (DeepSpeed: every rank's partition, the float32 master
    weights included) to ``<default_root_dir>/export-deepspeed/<name>``."""
    path = Path(trainer.default_root_dir) / "export-deepspeed" / name
    trainer.save_checkpoint(str(path))
    return path


def rebuild_module(pl_module: TaskModule, state: Optional[dict] = None) -> TaskModule:
    """An unsharded CPU copy of ``pl_module`` built from its constructor arguments (the pretrained base,
    the same head), with ``state`` (trained weights by name) loaded; every trainable parameter must be
    in ``state``."""
    with torch.random.fork_rng(devices=[]):  # building (LoRA's init) must not move the training's RNG
        module = type(pl_module)(**pl_module.init_args())
        module.label_names = None if pl_module.label_names is None else list(pl_module.label_names)
        module.templates = list(pl_module.templates) if pl_module.templates else None
        module.build_model(module.label_names, module.templates)
    module.eval()
    if state is not None:
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        missing = [n for n in trainable if n not in state]
        if missing:
            raise RuntimeError(f"the consolidated weights lack {len(missing)} trainable parameter(s) of "
                               f"{type(module).__name__}, e.g. {missing[:3]}")
        TaskCheckpointExport._restore(module, state)
    return module


class TaskCheckpointExport(Callback):
    """Evaluate before training, keep the best weights, write the task checkpoint after fit.

    Args:
        output_dir: target directory; ``{task}`` is replaced by the datamodule's task name.
            Default ``$CHECKPOINT_ROOT/{task}`` (``checkpoints/{task}``).
        select: ``"best"`` (highest ``monitor`` seen at a validation) or ``"last"``.
        monitor: logged metric to select on (higher is better).
        zero_shot: evaluate the model before training (val and test).
        test: evaluate the test split (zero-shot and finetuned).
        overwrite: replace an existing non-empty directory that is not an earlier task checkpoint
            (without it such an ``output_dir`` is refused before training starts).
        verbose: print where the task checkpoint went and its accuracies when fit ends.
        rebuild: evaluate and export an unsharded copy rebuilt on global rank 0 from the
            consolidated trained weights (see the module docstring); default ``None``: for FSDP and
            DeepSpeed, whose modules hold shards / half-precision copies (``--export.rebuild true``
            forces it on any strategy).
    """

    def __init__(self, output_dir: Optional[str] = None, select: Literal["best", "last"] = "best",
                 monitor: str = "val/acc", zero_shot: bool = True, test: bool = True,
                 overwrite: bool = False, verbose: bool = True, rebuild: Optional[bool] = None):
        super().__init__()
        if select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', got {select!r}")
        self.output_dir = output_dir
        self.select = select
        self.monitor = monitor
        self.zero_shot = zero_shot
        self.test = test
        self.overwrite = overwrite
        self.verbose = verbose
        self.rebuild = rebuild
        self.best_checkpoint: Optional[str] = None  # DeepSpeed: the best validation's checkpoint
        self.zeroshot_metrics: Optional[dict[str, float]] = None
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_epoch: Optional[int] = None
        self.last_score: Optional[float] = None
        self._best_state: Optional[dict[str, torch.Tensor]] = None
        self.exported_to: Optional[Path] = None
        self.finetuned_metrics: Optional[dict[str, float]] = None

    @property
    def splits(self):
        return ("val", "test") if self.test else ("val",)

    def target(self, trainer: L.Trainer) -> Path:
        return resolve_output_dir(self.output_dir, task_name(trainer.datamodule))

    def check_target(self, trainer: L.Trainer, pl_module: TaskModule) -> Optional[str]:
        """Refuse (``OutputError``) an output path that would destroy data; the note to show when
        an earlier output will be replaced."""
        return check_output(self.target(trainer), run_inputs(pl_module, trainer.datamodule), TASK_MARKER,
                            self.overwrite)

    # ----- hooks ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: TaskModule, stage: str) -> None:
        # before the model is built and trained: a refused path must not cost a training run
        if stage != "fit":
            return
        replacing = self.check_target(trainer, pl_module)
        if replacing and trainer.is_global_zero:
            note(replacing)

    def rebuilds(self, trainer: L.Trainer) -> bool:
        """Whether the export goes through a rebuilt copy (``rebuild``, default: FSDP and DeepSpeed)."""
        return self.rebuild if self.rebuild is not None else sharding_of(trainer) is not None

    def on_fit_start(self, trainer: L.Trainer, pl_module: TaskModule) -> None:
        if self.zero_shot and self.zeroshot_metrics is None:
            if self.rebuilds(trainer):  # the untrained model, unsharded, on rank 0
                if trainer.is_global_zero:
                    module = rebuild_module(pl_module).to(trainer.strategy.root_device)
                    self.zeroshot_metrics = evaluate_splits(module, trainer.datamodule, self.splits, None,
                                                            self._progress(trainer, "zero-shot"))
                    del module
                trainer.strategy.barrier("task_checkpoint_zeroshot")
            else:
                self.zeroshot_metrics = evaluate_splits(pl_module, trainer.datamodule, self.splits, trainer,
                                                        self._progress(trainer, "zero-shot"))
            if trainer.is_global_zero:
                log.info("zero-shot accuracy: %s", self.zeroshot_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: TaskModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        self.last_score = value
        if self.select == "best" and (self.best_score is None or value > self.best_score):
            # the monitored value is synced across ranks, so every rank takes this branch together
            self.best_score, self.best_step, self.best_epoch = value, trainer.global_step, trainer.current_epoch
            if not self.rebuilds(trainer):
                self._best_state = self._snapshot(pl_module)
            elif sharding_of(trainer) == "deepspeed":
                self.best_checkpoint = str(deepspeed_checkpoint(trainer, "best"))
            else:  # FSDP (gathered to rank 0) or a forced rebuild
                self._best_state = consolidated_trained_state(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: TaskModule) -> None:
        # rank-consistent (best_score is set on every rank; under FSDP only rank 0 holds the state)
        best = self.select == "best" and self.best_score is not None and (
            self._best_state is not None or self.best_checkpoint is not None or self.rebuilds(trainer))
        module = pl_module
        if self.rebuilds(trainer):
            if best and sharding_of(trainer) == "deepspeed":
                state = consolidated_trained_state(trainer, pl_module, checkpoint_dir=self.best_checkpoint)
            elif best:
                state = self._best_state
            else:
                state = consolidated_trained_state(trainer, pl_module)  # the last weights
            if trainer.is_global_zero:
                module = rebuild_module(pl_module, state).to(trainer.strategy.root_device)
                self.finetuned_metrics = evaluate_splits(module, trainer.datamodule, self.splits, None,
                                                         self._progress(trainer, "finetuned"))
                module = module.to("cpu")
            else:
                self.finetuned_metrics = {}
        else:
            if best:
                self._restore(pl_module, self._best_state)
            self.finetuned_metrics = evaluate_splits(pl_module, trainer.datamodule, self.splits, trainer,
                                                     self._progress(trainer, "finetuned"))
        finetuned = dict(self.finetuned_metrics)
        selected_step = self.best_step if best else trainer.global_step
        finetuned["step"] = selected_step
        if self.best_epoch is not None and self.select == "best":
            finetuned["epoch"] = self.best_epoch
        metrics = {"finetuned": finetuned}
        if self.zeroshot_metrics is not None:
            metrics["zeroshot"] = dict(self.zeroshot_metrics)
        if self.last_score is not None:
            metrics["last"] = {"val_acc": self.last_score, "step": trainer.global_step}
        task = task_name(trainer.datamodule)
        target = self.target(trainer)
        extra = {
            "selection": {"select": self.select, "monitor": self.monitor},
            "datamodule": datamodule_hparams(trainer.datamodule),
            "trainer": trainer_hparams(trainer),
        }
        if trainer.is_global_zero:
            export_task_checkpoint(module, target, task, metrics, extra,
                                   inputs=run_inputs(pl_module, trainer.datamodule), overwrite=self.overwrite)
            log.info("task checkpoint written to %s (%s)", target, metrics)
            if self.verbose:
                print(f"task checkpoint written to {target}\n  accuracy (%): {format_metrics(metrics)}", flush=True)
        trainer.strategy.barrier("task_checkpoint_export")
        if trainer.is_global_zero and sharding_of(trainer) == "deepspeed":  # the consolidation's checkpoints
            shutil.rmtree(Path(trainer.default_root_dir) / "export-deepspeed", ignore_errors=True)
        self.exported_to = target

    @staticmethod
    def _progress(trainer: L.Trainer, what: str) -> Optional[str]:
        """A bar for the evaluations outside Lightning's loops when the trainer shows progress."""
        return f"{what} accuracy" if trainer.progress_bar_callback is not None and trainer.is_global_zero else None

    @staticmethod
    def _snapshot(pl_module: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
        """The trainable parameters and the buffers of the modules that own them: BatchNorm
        running statistics change with the weights (best weights with the last epoch's
        statistics would be wrong); frozen modules' buffers are left out to keep it small.
        ``copy=False``: the tensors themselves (for their names)."""
        take = (lambda t: t.detach().to("cpu", copy=True)) if copy else (lambda t: t)
        state = {n: take(p) for n, p in pl_module.named_parameters() if p.requires_grad}
        for prefix, module in pl_module.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                for name, buf in module.named_buffers(recurse=False):
                    state[f"{prefix}.{name}" if prefix else name] = take(buf)
        return state

    @staticmethod
    def _restore(pl_module: TaskModule, state: dict[str, torch.Tensor]) -> None:
        tensors = dict(pl_module.named_parameters())
        tensors.update(dict(pl_module.named_buffers()))
        with torch.no_grad():
            for name, value in state.items():
                if name in tensors:
                    tensors[name].copy_(value.to(tensors[name].device, tensors[name].dtype))

    # ----- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "zeroshot_metrics": self.zeroshot_metrics,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "last_score": self.last_score,
            "best_state": self._best_state,
            "best_checkpoint": self.best_checkpoint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zeroshot_metrics = state_dict.get("zeroshot_metrics")
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self.best_epoch = state_dict.get("best_epoch")
        self.last_score = state_dict.get("last_score")
        self._best_state = state_dict.get("best_state")
        self.best_checkpoint = state_dict.get("best_checkpoint")
