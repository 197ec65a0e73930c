"""An evaluation run: references, selection sweeps, Ensemble and the joint benchmark -> result rows.

One run serves one experiment (a set of task models finetuned from one base):

1. **References** — every task's own finetuned model and the zero-shot base, on validation and
   test (the finetuned values are the denominators of normalized accuracy).
2. **Methods** — each merge method is searched with its protocol (``protocols.py``): every grid
   point is merged in memory by one :class:`src.merge.Sweep` (SVDs, centering and global
   statistics once), swapped into the loaded base and scored on **validation**; the selected
   point is scored on **test** (``stage: selected``) and on the joint benchmark. A merged
   directory (``path:``) is evaluated as it is.
3. **Ensemble** — not a merge: per task the most confident of the task models; joint, the
   per-class max over the task models.
4. Rows are appended as they finish (``rows.py``); a re-run skips every measurement it has,
   and a grid point whose rows all exist is not even merged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..merge import Sweep, get_method
from ..merge.sweep import expand_grid
from .loop import Evaluator, dataset_size, split_loader
from .models import EvaluationError, ModelBank, datamodule_of
from ..merged_output import read_merge_info
from .protocols import restrict, search_for
from ..safe_output import note, replace_own_file
from ..task_checkpoint import read_task_info
from ..task_statistics import statistics_tag
from .rows import RowStore, make_row


@dataclass
class MethodSpec:
    """One line of the results table.

    Args:
        method: a merge method's registry name (``python -m src.merge --list``), or ``merged``
            to evaluate an existing merged directory given as ``path``.
        label: its name in tables (default: the method name).
        fixed: hyperparameters held fixed (override the protocol's).
        stages: the search (override the protocol's): a list of grids, searched in order.
        reuse: ``{hyperparameter: other method}`` or ``{hyperparameter: "method.param"}``: take that
            value from the other method's selection (MaTS' ``lam_init`` from TA's ``lam``).
        path: the merged directory for ``method: merged``.
        statistics: data statistics of data-dependent methods (Fisher, RegMean, MaTS): overrides
            of the run's ``statistics`` (``split``, ``n``, ``seed``). A grid may also search the
            number of examples as ``n_examples`` (Fisher: 256..2048, KnOTS App. E).
    """

    method: str
    label: Optional[str] = None
    fixed: Optional[dict[str, Any]] = None
    stages: Optional[list[dict[str, list]]] = None
    reuse: Optional[dict[str, str]] = None
    path: Optional[str] = None
    statistics: Optional[dict[str, Any]] = None


@dataclass
class JointSpec:
    """The joint benchmark: one head over the union of the tasks' labels, all test sets pooled.

    Args:
        enabled: run it.
        ks: Hits@k for these k.
        duplicate_labels: ``id`` (a prediction counts only as the exact label id, the authors'
            rule) or ``string`` (any label with the same name counts).
        label_file: a fixed label space (``data/joint_labels.json`` for the KnOTS benchmark);
            default: the tasks' labels concatenated in task order.
    """

    enabled: bool = False
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    duplicate_labels: str = "id"
    label_file: Optional[str] = None


@dataclass
class EvalConfig:
    """Everything an evaluation run needs (``configs/evaluate/*.yaml``).

    Args:
        experiment: name stored with every row.
        tasks: task-checkpoint directories of the merged (held-in) tasks.
        generalization: task-checkpoint directories evaluated but never merged (held-out tasks).
        base: local directory of the base model (default: the one ``task.json`` records).
        rows: the JSON-lines result file (``{experiment}`` is filled in).
        protocol: ``knots`` | ``compositional`` | ``cart`` | ``quick`` | null (see protocols.py).
        methods: the methods to evaluate.
        grid: restrict grids from the command line, e.g. ``{lam: [0.3, 0.5]}``.
        only: evaluate only these methods (labels or names).
        select_on: ``normalized`` (mean over held-in tasks of merged / finetuned) or ``absolute``.
        metric: ``auto`` (each task's own metric: accuracy, or EM/F1 mean for QA and SP-ROUGE for
            summarization with mT5) or the name of a metric the task modules log.
        grid_splits: splits every grid point is scored on (``[val]``; add ``test`` for sensitivity
            curves of test accuracy).
        grid_generalization: also score every grid point on the generalization tasks (never used to
            select; for the held-in vs generalization scatter and sensitivity curves).
        task_head: ``own`` (each task scored with its own head: its own labels, the default and the
            authors' released DomainNet setting) or ``union`` (a head over every evaluated task's
            labels, identical label lists counted once: the DomainNet paper's "merged" head;
            rows' metric ``acc@union``).
        ensemble: evaluate the Ensemble baseline.
        zeroshot: evaluate the base model with each task's head.
        joint: the joint benchmark.
        data: DataModule init-arg overrides for every task (``data_root``, ``eval_batch_size``...).
        statistics: where data-dependent methods' statistics come from: ``split`` (train, val: the
            papers differ), ``n`` examples, ``seed`` of the subset; computed once per task model
            into its ``statistics/<split>-n<n>-seed<seed>/`` and reused (``python -m src.statistics``).
        accelerator, devices, strategy, precision: the Lightning Trainer's.
        merge_device: where merges are computed.
        report: write ``report.md`` (tables) and ``sensitivity.png`` next to the rows.
        progress: show progress bars.
    """

    experiment: str = "experiment"
    tasks: list[str] = field(default_factory=list)
    generalization: list[str] = field(default_factory=list)
    base: Optional[str] = None
    rows: str = "results/{experiment}/rows.jsonl"
    protocol: Optional[str] = None
    methods: list[MethodSpec] = field(default_factory=list)
    grid: Optional[dict[str, list]] = None
    only: Optional[list[str]] = None
    select_on: str = "normalized"
    metric: str = "auto"
    grid_splits: list[str] = field(default_factory=lambda: ["val"])
    grid_generalization: bool = False
    task_head: str = "own"
    ensemble: bool = True
    zeroshot: bool = True
    joint: JointSpec = field(default_factory=JointSpec)
    data: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=lambda: {"split": "train", "n": 256, "seed": 0})
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    merge_device: str = "cpu"
    report: bool = True
    progress: bool = True


def order_dependent(method: str, params: dict) -> bool:
    """Merges whose result depends on the order of the task models (DARE draws each task's mask from
    a generator seeded by the task's position), so rows must say the order."""
    return method == "dare" or (method == "knots" and params.get("base_method") == "dare_ties")


#: methods whose coefficients are learned on unlabeled data -> the task vectors they weight
LEARNED = {"adamerging": "ta", "adamerging++": "ties", "cart++": "cart"}
#: ``fixed`` keys of a learned method that set the optimization, not the merge
RECIPE_KEYS = ("steps", "lr", "batch_size", "init", "layer_wise", "seed", "eval_batches")


def _as_method_spec(value) -> MethodSpec:
    if isinstance(value, MethodSpec):
        return value
    if isinstance(value, dict):
        return MethodSpec(**value)
    if isinstance(value, str):
        return MethodSpec(method=value)
    raise TypeError(f"a method is a name or a mapping, got {value!r}")


class EvaluationRun:
    """Executes an :class:`EvalConfig` (see the module docstring); ``run()`` returns the rows."""

    def __init__(self, config: EvalConfig):
        self.config = config
        if config.task_head not in ("own", "union"):
            raise ValueError(f"task_head must be 'own' or 'union', got {config.task_head!r}")
        if config.select_on not in ("normalized", "absolute"):
            raise ValueError(f"select_on must be 'normalized' or 'absolute', got {config.select_on!r}")
        if len(config.tasks) < 1:
            raise ValueError("tasks: at least one task checkpoint directory is needed")
        if "val" not in config.grid_splits:
            raise ValueError(f"grid_splits must include val (selection is on validation), got {config.grid_splits}")
        if str(config.devices) not in ("1", "[0]") and config.devices not in (1, [0]):
            raise ValueError(f"devices {config.devices!r}: an evaluation runs on one device, so that every example "
                             "counts once (Lightning's distributed sampler repeats examples to even out ranks); "
                             "set devices: 1 (statistics and finetuning use several)")
        self.methods = [_as_method_spec(m) for m in config.methods]
        self.rows_path = Path(str(config.rows).replace("{experiment}", config.experiment))
        self.store = RowStore(self.rows_path)
        self._bank: Optional[ModelBank] = None
        self._evaluator: Optional[Evaluator] = None
        self._loaders: dict[tuple[str, str], Any] = {}
        self.selected: dict[str, dict[str, Any]] = {}  # label -> selected params
        self.timing: list[dict[str, float]] = []  # per grid point: merge + apply vs evaluate seconds
        # the task.json files (cheap): names, metrics and kinds without loading any model
        infos = [read_task_info(d) for d in list(config.tasks) + list(config.generalization)]
        self._infos = {info.task: info for info in infos}
        self.held_in = [info.task for info in infos[:len(config.tasks)]]
        self.held_out = [info.task for info in infos[len(config.tasks):]]
        # built on first need: a fully cached re-run loads no model and no data
        self._datamodules: dict[str, Any] = {}
        self._logit_cache: dict[tuple, Any] = {}
        self._joint_space = None
        self._joint_modules: dict[Optional[str], Any] = {}
        self._union = None

    # ----- lazily built: a fully cached re-run loads nothing ---------------------------
    @property
    def bank(self) -> ModelBank:
        if self._bank is None:
            # models from different initializations (experiment E) can be scored (references,
            # Ensemble), never merged nor compared with "the" base
            mixed = not self.config.zeroshot and all(m.method == "merged" for m in self.methods)
            self._bank = ModelBank(list(self.config.tasks) + list(self.config.generalization), base=self.config.base,
                                   device=self._device(), mixed_inits=mixed)
        return self._bank

    def _device(self) -> str:
        accel = self.config.accelerator
        if accel == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if accel == "gpu" else accel

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            c = self.config
            # Lightning's per-loop bars only on a terminal (in a log they are a wall of lines); the
            # run's own bar over grid points always shows
            self._evaluator = Evaluator(c.accelerator, c.devices, c.strategy, c.precision,
                                        c.progress and sys.stderr.isatty())
        return self._evaluator

    @property
    def all_tasks(self) -> list[str]:
        return self.held_in + self.held_out

    def group(self, task: str) -> Optional[str]:
        if not self.config.generalization:
            return None
        return "held_in" if task in self.held_in else "generalization"

    def loader(self, task: str, split: str):
        key = (task, split)
        if key not in self._loaders:
            bank = self.bank
            if task not in self._datamodules:
                self._datamodules[task] = datamodule_of(bank.infos[task], bank.task_dirs[task], self.config.data)
            self._loaders[key] = split_loader(self._datamodules[task], split)
        return self._loaders[key]

    # ----- rows ----------------------------------------------------------------------
    def _what(self, method: str, params: dict, task: str, split: str, stage: str, metric: Optional[str] = None,
              dataset: Optional[str] = None) -> dict[str, Any]:
        if self.config.task_head == "union" and task != "joint":  # the labels a task was scored among
            params = {**params, "union_tasks": sorted(self.all_tasks)}
        return {"experiment": self.config.experiment, "method": method, "params": params, "tasks": sorted(self.held_in),
                "task": task, "split": split, "metric": metric or self.metric_of(task), "stage": stage, "dataset": dataset}

    def metric_of(self, task: str) -> str:
        """The name rows give ``task``'s selection metric: what its module scores (``val/acc`` holds
        the task's own metric: accuracy, or EM/F1 / SP-ROUGE for mT5 generation tasks)."""
        if self.config.metric != "auto":
            return self.config.metric
        args = ((self._infos[task].hparams or {}).get("module") or {}).get("init_args") or {}
        own = args.get("metric")  # resolved at export (mT5); other families score accuracy
        if self.config.task_head == "union":
            return "acc@union"
        return "acc" if own in (None, "auto", "accuracy") else str(own)

    def evaluate_task(self, task: str, split: str, what: str):
        """``task``'s metrics on ``split`` with the model now in the base: through its module's own
        steps (``task_head: own``), or as accuracy among the union of every task's labels."""
        if self.config.task_head == "own":
            return self.evaluator.metrics(self.bank.modules[task], self.loader(task, split), split, what)
        from .loop import SplitResult
        from .metrics import accuracy

        if not self.classifies(task):
            raise ValueError(f"task_head union: task {task!r} generates text; use task_head own")
        if self._union is None:
            space = self.label_space(self.all_tasks)
            self._union = (space, self.head_module(self.all_tasks, space))
        space, module = self._union
        start = time.perf_counter()
        logits, labels = self.evaluator.predict(module, self.loader(task, split), what)
        targets = space.task_to_joint(task, len(self.bank.infos[task].label_names))[labels]
        return SplitResult({"acc@union": accuracy(logits, targets)}, len(labels), time.perf_counter() - start)

    def finetuned(self, task: str, split: str, metric: Optional[str] = None) -> Optional[float]:
        row = self.store.get(**self._what("finetuned", {}, task, split, "reference", metric))
        return None if row is None else row["value"]

    def score_tasks(self, method: str, label: str, params: dict, model: str, state_fn, tasks: Sequence[str],
                    split: str, stage: str, selection: Optional[dict] = None, own_task_state: bool = False) -> dict[str, float]:
        """Score one model on ``tasks`` (rows cached); ``state_fn()`` gives its weights, only when needed."""
        values: dict[str, float] = {}
        missing = [t for t in tasks if not self.store.has(**self._what(method, params, t, split, stage))]
        for t in tasks:
            if t not in missing:
                values[t] = self.store.get(**self._what(method, params, t, split, stage))["value"]
        if not missing:
            return values
        bank = self.bank
        state = None if own_task_state else state_fn()
        for t in missing:
            if own_task_state:
                state = state_fn(t)
            start = time.perf_counter()
            with bank.weights(state, model):
                result = self.evaluate_task(t, split, f"{label} on {t} {split}")
            logged = self.metric_of(t) if self.config.task_head == "union" else \
                "acc" if self.config.metric == "auto" else self.config.metric
            if logged not in result.metrics:
                raise EvaluationError(bank.task_dirs[t], f"the task module logs {sorted(result.metrics)} on {split}, "
                                                         f"not the metric {logged!r}")
            metrics = {(self.metric_of(t) if k == logged else k): v for k, v in result.metrics.items()}
            rows = []
            for name, value in metrics.items():
                rows.append(make_row(**self._what(method, params, t, split, stage, name), label=label, model=model,
                                     group=self.group(t), value=value, n=result.n,
                                     finetuned=None if method == "finetuned" else self.finetuned(t, split, name),
                                     selection=selection, wall_s=round(result.wall_s, 3)))
            self.store.add(rows)
            values[t] = metrics[self.metric_of(t)]
        return values

    def score(self, values: dict[str, float], split: str) -> float:
        """The selection score: mean over held-in tasks, normalized or absolute."""
        held = [t for t in self.held_in if t in values]
        if self.config.select_on == "absolute":
            return sum(values[t] for t in held) / len(held)
        refs = {t: self.finetuned(t, split) for t in held}
        zero = [t for t, r in refs.items() if not r]
        if zero:
            raise ValueError(f"select_on normalized: the finetuned {split} score of {zero} is 0; "
                             "use select_on: absolute")
        return sum(values[t] / refs[t] for t in held) / len(held)

    # ----- stages ----------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        self.references()
        for spec in self.methods:
            if self.config.only and spec.method not in self.config.only and (spec.label or spec.method) not in self.config.only:
                continue
            self.method(spec)
        if self.config.ensemble and len(self.held_in) > 1:
            self.ensemble()
        if self.timing:
            self.write_timing()
        return list(self.store)

    def write_timing(self) -> None:
        """Per method: seconds to merge + apply a grid point vs to evaluate it (``timing.json``)."""
        summary: dict[str, dict[str, float]] = {}
        for t in self.timing:
            s = summary.setdefault(t["method"], {"points": 0, "merge_apply_s": 0.0, "evaluate_s": 0.0})
            s["points"] += 1
            s["merge_apply_s"] += t["merge_apply_s"]
            s["evaluate_s"] += t["evaluate_s"]
        for s in summary.values():
            s["merge_apply_fraction"] = s["merge_apply_s"] / max(s["evaluate_s"], 1e-9)
        path = self.rows_path.parent / "timing.json"
        replace_own_file(path, json.dumps({"grid_splits": self.config.grid_splits, "per_method": summary}, indent=2) + "\n",
                         '{\n  "grid_splits"', hint="choose another --rows directory")

    def references(self) -> None:
        tasks = self.all_tasks
        for split in ("val", "test"):
            self.score_tasks("finetuned", "Finetuned", {}, "task models", lambda t: self.bank.task_state(t), tasks,
                             split, "reference", own_task_state=True)
            if self.config.zeroshot:
                self.score_tasks("zeroshot", "Zero-shot", {}, "base model", lambda: None, tasks, split, "reference")

    def method(self, spec: MethodSpec) -> None:
        label = spec.label or spec.method
        if spec.method == "merged":
            if not spec.path:
                raise ValueError(f"method {label!r}: 'merged' needs a path")
            # the merge's own hyperparameters (a permutation merge's searched alpha) label the rows
            params = {"path": str(spec.path), **(read_merge_info(spec.path).get("params") or {})}
            state = lambda: self.bank.merged_state(spec.path)
            self.score_tasks("merged", label, params, str(spec.path), state, self.all_tasks, "test", "selected",
                             {"on": None, "protocol": "as merged"})
            self.joint(label, "merged", params, str(spec.path), state)
            return
        if spec.method in LEARNED:
            self.learned(spec)
            return
        merge_method = get_method(spec.method)
        search = restrict(search_for(spec.method, self.config.protocol,
                                     {"fixed": spec.fixed, "stages": spec.stages, "reuse": spec.reuse}), self.config.grid)
        chosen = dict(search["fixed"])
        for param, source in search["reuse"].items():  # "method" (same name) or "method.param"
            other, _, other_param = str(source).partition(".")
            if other not in self.selected:  # e.g. --only: its selection (rows cached or not) first
                source_spec = next((m for m in self.methods if other in (m.method, m.label)), None)
                if source_spec is None:
                    raise ValueError(f"method {label!r} reuses {param!r} from {other!r}, which this run does not have")
                self.method(source_spec)
            chosen[param] = self.selected[other][other_param or param]
        sweeps: dict[tuple, Sweep] = {}  # one per statistics tag and kinds (the data a merge reads)
        stats = {**self.config.statistics, **(spec.statistics or {})}
        sources: dict[str, tuple[str, int, int]] = {}  # statistics tag -> (split, n, seed)

        def full(point: dict) -> dict:
            """The row's hyperparameters: the method's (all fields) + the statistics it reads."""
            merge_point = {k: v for k, v in {**chosen, **point}.items() if k != "n_examples"}
            params = dataclasses.asdict(merge_method.make_params(**merge_point))
            if merge_method.required_statistics(merge_method.make_params(**merge_point)):
                n = {**chosen, **point}.get("n_examples", stats["n"])
                where = (stats["split"], int(n), int(stats.get("seed", 0)))
                params["statistics"] = statistics_tag(*where)
                sources[params["statistics"]] = where
            if order_dependent(spec.method, params):  # rows key tasks sorted; DARE's masks follow the order
                params["task_order"] = list(self.held_in)
            return params

        def state_of(params: dict):
            tag = params.get("statistics")
            merge_params = {k: v for k, v in params.items() if k not in ("statistics", "task_order")}
            kinds = merge_method.required_statistics(merge_method.make_params(**merge_params))
            key = (tag, tuple(kinds))  # a grid over MaTS' subspace reads other kinds
            if key not in sweeps:
                if tag is not None:
                    self.ensure_statistics(kinds, *sources[tag])
                sweeps[key] = Sweep(merge_method, self.config.tasks, base=self.bank.base_state(),
                                    device=self.config.merge_device, progress=False, statistics=tag)
            start = time.perf_counter()
            state = self.bank.with_updates(sweeps[key].merge(merge_params, as_updates=True))
            self._merge_s = time.perf_counter() - start
            return state

        model_id = f"{spec.method}@{self.config.experiment}"
        best_score = None  # the incumbent: a later stage only moves away from it when a point beats it
        for s, stage in enumerate(search["stages"]):
            points = expand_grid(stage)
            best = None
            bar = tqdm(points, desc=f"{label}: stage {s + 1}/{len(search['stages'])}", leave=False,
                       disable=not self.config.progress, dynamic_ncols=True)
            for point in bar:
                params = full(point)
                self._merge_s = 0.0
                cache: dict[str, Any] = {}
                state = lambda: cache.setdefault("s", state_of(params))
                start = time.perf_counter()
                values = {}
                for split in self.config.grid_splits:
                    at_grid = self.held_in + (self.held_out if self.config.grid_generalization else [])
                    v = self.score_tasks(spec.method, label, params, model_id, state, at_grid, split, "grid")
                    if split == "val":
                        values = v
                if cache:
                    total = time.perf_counter() - start
                    self.timing.append({"method": spec.method, "merge_apply_s": self._merge_s,
                                        "evaluate_s": total - self._merge_s})
                score = self.score(values, "val")
                if best_score is None or score > best_score:  # ties keep the earlier point
                    best, best_score = point, score
            chosen.update(best or {})
        params = full({})
        self.selected[spec.method] = params
        self.selected[label] = params
        selection = {"on": "val", "protocol": self.config.protocol, "select_on": self.config.select_on}
        state = lambda: state_of(params)
        cached: dict[str, Any] = {}
        once = lambda: cached.setdefault("s", state())
        self.score_tasks(spec.method, label, params, model_id, once, self.all_tasks, "test", "selected", selection)
        self.joint(label, spec.method, params, model_id, once)

    def learned(self, spec: MethodSpec) -> None:
        """AdaMerging, AdaMerging++ and CART++: coefficients learned on the held-in tasks' UNLABELED
        test inputs (entropy minimization, as the papers do), saved as a table next to the rows and
        re-applied by a plain merge; the learned table is reused by a re-run."""
        from ..merge.coefficients import CoefficientTable
        from .adamerging import learn_coefficients

        label = spec.label or spec.method
        fixed = dict(spec.fixed or {})
        recipe = {k: fixed.pop(k) for k in RECIPE_KEYS if k in fixed}
        safe = "".join(c if c.isalnum() or c in "+-_" else "_" for c in spec.method)
        # one table per (method, merge settings, recipe, tasks in merge order): a changed recipe or
        # task list learns anew instead of reusing a table learned for something else
        ident = hashlib.sha1(json.dumps([spec.method, fixed, recipe, self.held_in], sort_keys=True,
                                        default=str).encode()).hexdigest()[:10]
        path = self.rows_path.parent / "coefficients" / f"{safe}-{ident}.json"
        table = CoefficientTable.load(path) if path.is_file() else None
        if table is not None and list(table.tasks) == list(self.held_in):
            meta = table.meta
            method, merge_params = meta["method"], {**meta["method_params"], "coefficients": str(path)}
        else:
            result = learn_coefficients(self.bank, LEARNED[spec.method], self.held_in, lambda t: self.loader(t, "test"),
                                        merge_params=fixed, output=path, merge_device=self.config.merge_device,
                                        progress=self.config.progress, **recipe)
            method, merge_params = result.method, result.merge_params
        params = {**dataclasses.asdict(get_method(method).make_params(**merge_params)), "learned": spec.method,
                  **{k: v for k, v in recipe.items()}}
        selection = {"on": "test inputs, unlabeled (entropy)", "protocol": spec.method}
        cached: dict[str, Any] = {}

        def state():
            if "s" not in cached:
                sweep = Sweep(method, self.config.tasks, base=self.bank.base_state(),
                              device=self.config.merge_device, progress=False)
                cached["s"] = self.bank.with_updates(sweep.merge(merge_params, as_updates=True))
            return cached["s"]

        model_id = f"{spec.method}@{self.config.experiment}"
        self.score_tasks(spec.method, label, params, model_id, state, self.all_tasks, "test", "selected", selection)
        self.joint(label, spec.method, params, model_id, state)

    def ensure_statistics(self, kinds: Sequence[str], split: str, n: int, seed: int) -> None:
        """Each merged task model's statistics of ``kinds`` on ``n`` examples of ``split`` (computed
        once into its ``statistics/<tag>/``, then read)."""
        from ..statistics import collect_statistics

        # LoRA task models change (and a merge of them touches) only the adapted layers
        layers = "trained" if all(self._infos[t].kind == "lora" for t in self.held_in) else "all"
        for task_dir in self.config.tasks:
            collect_statistics(task_dir, kinds=tuple(kinds), split=split, n=n, seed=seed,
                               accelerator=self.config.accelerator, devices=1, data=self.config.data,
                               layers=layers, progress=self.config.progress, base=self.config.base)

    # ----- Ensemble and joint ------------------------------------------------------------
    def _logits(self, task_model: str, head_task: str, data_task: str) -> torch.Tensor:
        key = (task_model, head_task, data_task)
        if key not in self._logit_cache:
            bank = self.bank
            with bank.weights(bank.task_state(task_model), str(bank.task_dirs[task_model])):
                self._logit_cache[key] = self.evaluator.predict(bank.modules[head_task], self.loader(data_task, "test"),
                                                                f"{task_model} model on {data_task}")
        return self._logit_cache[key]

    def ensemble(self) -> None:
        from .metrics import accuracy, ensemble_per_task

        for t in self.held_in:
            what = self._what("ensemble", {}, t, "test", "reference")
            if self.store.has(**what) or not self.classifies(t):
                continue  # done, or generated text: no class scores to take the most confident of
            start = time.perf_counter()
            labels = self._logits(t, t, t)[1]
            preds = ensemble_per_task([self._logits(m, t, t)[0] for m in self.held_in])
            value = accuracy(preds, labels)
            self.store.add([make_row(**what, label="Ensemble", model="task models", group=self.group(t), value=value,
                                     n=len(labels), finetuned=self.finetuned(t, "test"),
                                     wall_s=round(time.perf_counter() - start, 3))])
        if self.config.joint.enabled:
            from .metrics import ensemble_joint

            def pooled():
                per_model = [self._joint_logits(self.bank.task_state(m), str(self.bank.task_dirs[m]), owner=m)
                             for m in self.held_in]
                return ensemble_joint([p[0] for p in per_model]), per_model[0][1], per_model[0][2]

            self.joint("Ensemble", "ensemble", {}, "task models", None, joint_logits=pooled)

    def classifies(self, task: str) -> bool:
        """Whether ``task``'s module scores classes (the Ensemble and the joint head need logits)."""
        return bool(getattr(self.bank.modules[task], "is_classification", True))

    def label_space(self, tasks: Sequence[str], label_file: Optional[str] = None):
        """The union of ``tasks``' labels: ``label_file`` (e.g. the KnOTS 748 labels), else the tasks'
        label lists concatenated in order, a task whose list equals an earlier one's sharing its ids
        (SVHN's digits are MNIST's; DomainNet pairs of one category share its classes)."""
        from .metrics import JointLabelSpace

        if label_file:
            return JointLabelSpace.from_file(label_file)
        names = {t: list(self._infos[t].label_names) for t in tasks}
        aliases: dict[str, str] = {}
        for i, t in enumerate(tasks):
            same = next((u for u in tasks[:i] if u not in aliases and names[u] == names[t]), None)
            if same is not None:
                aliases[t] = same
        return JointLabelSpace.from_tasks(names, aliases)

    def joint_space(self):
        if self._joint_space is None:
            self._joint_space = self.label_space(self.held_in, self.config.joint.label_file)
        return self._joint_space

    def head_module(self, tasks: Sequence[str], space, owner: Optional[str] = None):
        """A task module on the shared base whose head concatenates ``tasks``' heads in ``space``'s
        order; the head's other entries (the logit scale) are ``owner``'s
        (default: the first task's)."""
        from ..finetune.load import build_module

        bank, first = self.bank, owner or tasks[0]
        heads = {t: bank.modules[t].head_state_dict() for t in tasks}
        if any("weight" not in h for h in heads.values()) or any(m.model is not bank.base for m in bank.modules.values()):
            raise ValueError(f"a head over several tasks' labels needs heads held outside the base network "
                             f"(CLIP, demo, ResNet); the {bank.infos[first].family} family keeps its head in the base")
        module = build_module(bank.infos[first], bank.task_dirs[first])
        module.label_names = list(space.names)
        if hasattr(module, "attach_base"):
            module.attach_base(bank.base, trainable=False)
        else:
            module.model = bank.base
        try:
            head = {"weight": space.joint_head({t: h["weight"] for t, h in heads.items()})}
        except KeyError as e:  # a label file naming tasks that are not evaluated here
            raise ValueError(f"joint label space: {e.args[0]}") from None
        head.update({k: v for k, v in heads[first].items() if k != "weight"})
        module.load_head_state_dict(head)
        return module.requires_grad_(False).eval().to(next(bank.base.parameters()).device)

    def joint_module(self, owner: Optional[str] = None):
        if owner not in self._joint_modules:
            self._joint_modules[owner] = self.head_module(self.held_in, self.joint_space(), owner)
        return self._joint_modules[owner]

    def _joint_logits(self, state, model: str, owner: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        bank, space = self.bank, self.joint_space()
        module = self.joint_module(owner)
        logits, targets, datasets = [], [], []
        with bank.weights(state, model):
            for t in self.held_in:
                out, labels = self.evaluator.predict(module, self.loader(t, "test"), f"joint: {model} on {t}")
                logits.append(out)
                targets.append(space.task_to_joint(t, len(bank.infos[t].label_names))[labels])
                datasets += [t] * len(labels)
        return torch.cat(logits), torch.cat(targets), datasets

    def joint(self, label: str, method: str, params: dict, model: str, state_fn, joint_logits=None) -> None:
        spec = self.config.joint
        if not spec.enabled:
            return
        from .metrics import joint_hits


        metrics = [f"hits@{k}" for k in spec.ks]
        datasets = ["union"] + self.held_in
        space_id = spec.label_file or "tasks"  # the label space: a fixed file, or the tasks' labels in order
        whats = {(d, m): self._what(method, {**params, "duplicate_labels": spec.duplicate_labels,
                                             "label_space": space_id}, "joint", "test",
                                    "selected" if method not in ("ensemble", "finetuned") else "reference", m, d)
                 for d in datasets for m in metrics}
        if all(self.store.has(**w) for w in whats.values()):
            return
        generative = [t for t in self.held_in if not self.classifies(t)]
        if generative:
            raise ValueError(f"joint benchmark: tasks {generative} generate text; it needs classification tasks "
                             "(set joint.enabled false)")
        start = time.perf_counter()
        if joint_logits is not None:
            logits, targets, names = joint_logits()
        else:
            logits, targets, names = self._joint_logits(state_fn(), model)
        space = self.joint_space()
        equivalent = space.canonical(spec.duplicate_labels)
        hits = joint_hits(logits, targets, names, ks=spec.ks, equivalent=equivalent)
        wall = round(time.perf_counter() - start, 3)
        rows = []
        for (d, m), what in whats.items():
            k = int(m.split("@")[1])
            value = hits["union"][k] if d == "union" else hits["per_dataset"][d][k]
            rows.append(make_row(**what, label=label, model=model, value=value, n=hits["n"][d], wall_s=wall))
        self.store.add(rows)


def run_evaluation(config: EvalConfig) -> list[dict[str, Any]]:
    """Run ``config`` (see :class:`EvalConfig`); returns every row of its result file."""
    return EvaluationRun(config).run()




def write_reports(run: EvaluationRun) -> list[Path]:
    """``report.md`` (tables) and ``sensitivity.png`` next to the rows, rendered from the rows only."""
    from .report import plot_heldin_vs_generalization, plot_sensitivity, render_table

    rows = [r for r in run.store if r.get("experiment") == run.config.experiment
            and r.get("tasks") == sorted(run.held_in)]  # not merges of another task set in the same file
    metric = {t: run.metric_of(t) for t in run.all_tasks}  # each task's own (accuracy, EM/F1, SP-ROUGE)
    out = run.rows_path.parent
    selection = ("Hyperparameters selected on validation "
                 f"(protocol `{run.config.protocol}`, score: {run.config.select_on} accuracy averaged over the tasks).\n"
                 if run.config.protocol else "Merged models scored as given (their hyperparameters were chosen when merging).\n")
    parts = [f"# {run.config.experiment}: test results\n", selection]
    if run.methods and all(m.method == "merged" for m in run.methods) and any(r.get("task") == "joint" for r in rows):
        parts += ["## Joint and per-task accuracy (%) (MuDSC Table 1 layout)\n", render_table(rows, "mudsc")]
    parts += ["## Accuracy (%)\n", render_table(rows, "pertask", params="varied", metric=metric),
             "## Normalized accuracy (% of each task's finetuned model)\n",
             render_table(rows, "pertask", normalized=True, params="none", metric=metric)]
    if run.config.generalization:
        parts += ["## Held-in vs generalization\n", render_table(rows, "compositional")]
    if any(r.get("task") == "joint" for r in rows):
        parts += ["## Joint benchmark: Hits@k (%) over the union of the labels\n", render_table(rows, "joint", params="none")]
    report = out / "report.md"
    replace_own_file(report, "\n".join(parts), f"# {run.config.experiment}: test results",
                     hint="choose another --rows directory")
    written = [report]
    if any(r.get("stage") == "grid" and r.get("method") != "finetuned" for r in rows):
        held = [metric[t] for t in run.held_in]
        try:
            plot_sensitivity(rows, out / "sensitivity.png", normalized=True, splits=tuple(run.config.grid_splits),
                             metric=max(set(held), key=held.count), experiment=run.config.experiment)
            written.append(out / "sensitivity.png")
        except ValueError as e:  # e.g. every grid a single point: no curve to draw
            note(f"no sensitivity plot: {e}")
        # selection never sees generalization data, so grid points are scored on it only with
        # grid_generalization: the scatter needs those rows
        if any(r.get("stage") == "grid" and r.get("group") == "generalization" for r in rows):
            plot_heldin_vs_generalization(rows, out / "heldin_vs_generalization.png", experiment=run.config.experiment)
            written.append(out / "heldin_vs_generalization.png")
    return written
