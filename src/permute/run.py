"""Permutation merging of task models trained from different initializations, end to end.

``run_permutation(PermuteConfig(...))`` (or ``python -m src.permute``) loads the task models,
collects their activation statistics on training data once (cached under
``<output>/statistics/``), and for each method matches the models' units, merges, resets the
BatchNorm statistics on training data and writes a merged-model directory
``<output>/<method>/`` (``merge.json`` + ``model.safetensors``: the whole merged network, the
same architecture as the inputs) that ``python -m src.evaluate`` scores with ``method: merged``.
Alignment methods also write the aligned task checkpoints (``<output>/<method>/aligned/<task>``,
``task.json`` saying what they were aligned to) that ``python -m src.merge`` accepts.

Methods (``METHODS``; ``docs/algorithms.md#permutation-based-merging``):

=============  ======  =======================================================
name           solver  similarity
=============  ======  =======================================================
average        —       none: plain average (the baseline)
git_rebasin    align   weights: inner products, coordinate ascent (Git Re-Basin)
act_align      align   activations: correlation (Git Re-Basin activation matching)
zipit          zip     activations (ZipIt!)
weight_zip     zip     weights: correlation, coordinate ascent
mudsc_align    align   alpha * weights + (1 - alpha) * activations (MuDSC)
mudsc_zip      zip     same (MuDSC)
=============  ======  =======================================================

MuDSC's ``alpha`` is searched per model pair on **training** data as the paper does: every grid
value is merged (BatchNorm reset) and scored by the mean accuracy of the merged network on
held-out training examples of each task (not the examples of the statistics); ``alpha`` fixes it.
A method finished earlier with the same settings is skipped on a re-run.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..merged_output import MERGE_FORMAT_VERSION, MERGE_JSON
from ..safe_output import MERGE_MARKER, atomic_directory, check_output
from ..task_checkpoint import FULL_WEIGHTS, HEAD_WEIGHTS, TaskInfo, head_path, read_task_info, write_task_info
from .matcher import activation_similarity, match_models
from .merge import aligned_states, merge_states
from .solvers import Match
from .specs import spec_for

METHODS: dict[str, dict[str, Any]] = {
    "average": {"solver": None},
    "git_rebasin": {"solver": "align", "alpha": 1.0, "similarity": "inner", "patience": 1},
    "act_align": {"solver": "align", "alpha": 0.0},
    "zipit": {"solver": "zip", "alpha": 0.0},
    "weight_zip": {"solver": "zip", "alpha": 1.0},
    "mudsc_align": {"solver": "align", "alpha": "search"},
    "mudsc_zip": {"solver": "zip", "alpha": "search"},
}
LABELS = {"average": "Average", "git_rebasin": "Git Re-Basin", "act_align": "Activation Align", "zipit": "ZipIt",
          "weight_zip": "Weight Zip", "mudsc_align": "MuDSC-Align", "mudsc_zip": "MuDSC-Zip"}


@dataclass
class PermuteConfig:
    """Args:
        tasks: task-checkpoint directories of one architecture (different initializations
            allowed); the first is the reference that alignments permute onto.
        output: a directory for the run: one merged-model directory per method, the statistics cache.
        methods: names from ``METHODS``.
        n_examples: training examples per task for the activation statistics.
        search_examples: further training examples per task that score MuDSC's alpha grid.
        reset_examples: training examples per task for the BatchNorm reset.
        alpha: MuDSC's weight-space share; ``None``: searched over ``alpha_grid``.
        alpha_grid: the search grid.
        variant: ``eq8`` (fixed activation term) or ``alg1`` (compounded): ``matcher.py``.
        zip_alpha, zip_beta: ZipIt's repeated-merge decay and same-model budget.
        max_iter, patience: the coordinate-ascent sweeps (MuDSC's code: 100, 5).
        seed: the sweep order and the example subsets.
        reset_bn: recompute BatchNorm statistics after merging.
        accelerator: Lightning accelerator for the data passes.
        batch_size: batch size of the data passes (default: the datamodule's).
        data: init-arg overrides of the tasks' DataModules (``data_root``...).
        overwrite: replace existing method outputs even when their settings differ.
    """

    tasks: list[str]
    output: str
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_examples: int = 500
    search_examples: int = 500
    reset_examples: int = 500
    alpha: Optional[float] = None
    alpha_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    variant: str = "eq8"
    zip_alpha: float = 0.0
    zip_beta: float = 1.0
    max_iter: int = 100
    patience: int = 5
    seed: int = 0
    reset_bn: bool = True
    accelerator: str = "auto"
    batch_size: Optional[int] = None
    data: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


class PermutationRun:
    def __init__(self, config: PermuteConfig, progress: bool = True):
        from ..finetune.load import load_task_model
        from ..evaluate.models import datamodule_of

        unknown = [m for m in config.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown permutation method(s) {unknown}; known: {', '.join(METHODS)}")
        if len(config.tasks) < 2:
            raise ValueError("permutation merging needs at least two task models")
        self.config, self.progress = config, progress
        self.task_dirs = [Path(t) for t in config.tasks]
        self.infos = [read_task_info(d) for d in self.task_dirs]
        arch = {i.base_model.split("#init-")[0] for i in self.infos}
        if len(arch) > 1 or any(i.kind != "full" for i in self.infos):
            raise ValueError(f"permutation merging needs full task models of one architecture; got {sorted(arch)} "
                             f"({', '.join(i.kind for i in self.infos)})")
        self.modules = [load_task_model(d) for d in self.task_dirs]
        for m in self.modules:
            m.requires_grad_(False).eval()
        self.spec = spec_for(self.modules[0])
        self.states = [{k: v.detach().clone() for k, v in m.model.state_dict().items()} for m in self.modules]
        self.datamodules = [datamodule_of(i, d, config.data) for i, d in zip(self.infos, self.task_dirs)]
        self.output = Path(config.output)
        self._act = None
        self._loader_cache: dict[tuple[int, int], list] = {}
        self.networks = [m.model for m in self.modules]  # each task module's own network
        self.last_search: dict[str, Any] = {}  # sweeps and objective of the latest matching

    # ----- data -------------------------------------------------------------------------
    def _loaders(self, n: int, offset: int = 0):
        """Per task, ``n`` seeded training examples after ``offset`` (built once per run: the alpha
        search resets BatchNorm and scores every grid value on the same examples)."""
        from .data_passes import training_loader

        key = (n, offset)
        if key not in self._loader_cache:
            loaders = [training_loader(dm, n, self.config.seed, self.config.batch_size, offset)
                       for dm in self.datamodules]
            for info, loader in zip(self.infos, loaders):
                if len(loader.dataset) < n:
                    print(f"note: {info.task}: its training split has {len(loader.dataset)} examples left for {n} "
                          f"asked (after {offset} used for the statistics); using {len(loader.dataset)}", file=sys.stderr)
            self._loader_cache[key] = loaders
        return self._loader_cache[key]

    def activation_similarity(self) -> dict[str, torch.Tensor]:
        """Correlations from the cached statistics (computed on first need)."""
        if self._act is None:
            from .data_passes import activation_statistics

            path = self.output / "statistics" / f"activations-n{self.config.n_examples}-seed{self.config.seed}.safetensors"
            meta = {"tasks": [str(d.resolve()) for d in self.task_dirs]}
            stats = None
            if path.is_file():
                flat = load_file(str(path))
                recorded = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
                if recorded == meta:
                    stats = {}
                    for key, value in flat.items():
                        perm, _, what = key.rpartition("/")
                        stats.setdefault(perm, {})[what] = value
            if stats is None:
                stats = activation_statistics(self.modules, self.spec, self._loaders(self.config.n_examples),
                                              self.config.accelerator)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file({f"{p}/{k}": v.contiguous() for p, s in stats.items() for k, v in s.items()}, str(tmp))
                path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
                os.replace(tmp, path)
            self._act = activation_similarity(stats)
        return self._act

    # ----- one merge --------------------------------------------------------------------
    def match(self, method: str, alpha: Optional[float] = None) -> dict[str, Match]:
        opts = dict(METHODS[method])
        solver = opts.pop("solver")
        if solver is None:
            return {p: Match.identity(perm.size, len(self.states)) for p, perm in self.spec.perms.items()}
        a = opts.pop("alpha")
        a = alpha if a == "search" else a
        c = self.config
        act = self.activation_similarity() if a < 1.0 else None
        return match_models(self.spec, self.states, act, solver=solver, alpha=a, variant=c.variant,
                            similarity=opts.get("similarity", "correlation"), max_iter=c.max_iter,
                            patience=opts.get("patience", c.patience), seed=c.seed, zip_alpha=c.zip_alpha,
                            zip_beta=c.zip_beta, report=self.last_search)

    def merged_network(self, matches: dict[str, Match]) -> dict[str, torch.Tensor]:
        """The merged state, loaded into model 0's network with BatchNorm reset (returned)."""
        from .data_passes import reset_batchnorm

        state = merge_states(self.spec, matches, self.states)
        net = self.modules[0].model
        net.load_state_dict(state)
        if self.config.reset_bn:
            shared = [self._with_network(i) for i in range(len(self.modules))]
            reset_batchnorm(shared, self._loaders(self.config.reset_examples), self.config.accelerator)
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    def _with_network(self, i: int):
        """Task ``i``'s module running model 0's network (the merged one)."""
        module = self.modules[i]
        if i > 0:
            module.model = self.modules[0].model
        return module

    def _restore(self) -> None:
        """Every task module back on its own network, model 0's network back to its weights."""
        self.networks[0].load_state_dict(self.states[0])
        for module, network in zip(self.modules, self.networks):
            module.model = network

    def score(self, state: dict[str, torch.Tensor]) -> float:
        """Mean accuracy of ``state`` on held-out training examples of each task (alpha search)."""
        from .data_passes import accuracy_on

        self.modules[0].model.load_state_dict(state)
        loaders = self._loaders(self.config.search_examples, offset=self.config.n_examples)
        accs = [accuracy_on(self._with_network(i), loader, self.config.accelerator) for i, loader in enumerate(loaders)]
        return sum(accs) / len(accs)

    def run_method(self, method: str) -> dict[str, Any]:
        """Match, merge and reset; returns the record (``state``, ``matches``, ``alpha``, ``search``)."""
        try:
            if METHODS[method].get("alpha") == "search" and self.config.alpha is None:
                search = {}
                best = None
                for a in self.config.alpha_grid:
                    matches = self.match(method, a)
                    state = self.merged_network(matches)
                    search[a] = self.score(state)
                    if best is None or search[a] > search[best[0]]:
                        best = (a, matches, state, dict(self.last_search))
                    self._restore()
                alpha, matches, state, self.last_search = best
                return {"state": state, "matches": matches, "alpha": alpha, "search": search}
            alpha = self.config.alpha if METHODS[method].get("alpha") == "search" else METHODS[method].get("alpha")
            matches = self.match(method, alpha)
            state = self.merged_network(matches)
            return {"state": state, "matches": matches, "alpha": alpha, "search": None}
        finally:
            self._restore()

    # ----- outputs ----------------------------------------------------------------------
    def settings(self, method: str) -> dict[str, Any]:
        c = asdict(self.config)
        keep = ("n_examples", "search_examples", "reset_examples", "alpha", "alpha_grid", "variant", "zip_alpha",
                "zip_beta", "max_iter", "patience", "seed", "reset_bn")
        return {"method": method, **{k: c[k] for k in keep}, **{k: v for k, v in METHODS[method].items()}}

    def _finished(self, target: Path, settings: dict[str, Any]) -> bool:
        marker = target / MERGE_JSON
        if not marker.is_file():
            return False
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return info.get("permutation", {}).get("settings") == settings and \
            [t.get("path") for t in info.get("tasks", [])] == [str(d) for d in self.task_dirs]

    def write(self, method: str) -> Path:
        target = self.output / method
        settings = self.settings(method)
        if self._finished(target, settings) and not self.config.overwrite:
            return target
        check_output(target, inputs=self.task_dirs, marker=MERGE_MARKER,
                     overwrite=self.config.overwrite or (target / MERGE_JSON).is_file())
        record = self.run_method(method)
        tasks = [{"path": str(d), "task": i.task, "base_model": i.base_model, "family": i.family, "kind": i.kind,
                  "label_names": list(i.label_names)} for d, i in zip(self.task_dirs, self.infos)]
        scores = {k: float(v) for k, v in (record["search"] or {}).items()}
        info = {
            "format_version": MERGE_FORMAT_VERSION, "method": method, "label": LABELS[method],
            "params": {"alpha": record["alpha"]} if record["alpha"] is not None else {},
            "tasks": tasks, "contents": "weights", "complete_model": True, "partial": False, "save_as": "safetensors",
            "permutation": {"settings": settings, "reference": str(self.task_dirs[0]),
                            "alpha_search": {str(k): v for k, v in scores.items()} or None,
                            "objective": _objective(record["matches"]), "sweeps": self.last_search.get("sweeps", 0),
                            "bn_reset": self.config.reset_bn},
        }
        aligned = None
        if METHODS[method]["solver"] == "align":
            aligned = aligned_states(self.spec, record["matches"], self.states)
        with atomic_directory(target) as tmp:
            save_file({k: v.contiguous() for k, v in record["state"].items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            (tmp / MERGE_JSON).write_text(json.dumps(info, indent=2) + "\n")
            if aligned is not None:
                for d, task_info, state in zip(self.task_dirs, self.infos, aligned):
                    self._write_aligned(tmp / "aligned" / task_info.task, d, task_info, state, method)
        return target

    def _write_aligned(self, where: Path, task_dir: Path, info: TaskInfo, state, method: str) -> None:
        where.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(where / FULL_WEIGHTS), metadata={"format": "pt"})
        (where / HEAD_WEIGHTS).write_bytes(head_path(task_dir).read_bytes())
        ref = self.infos[0]
        aligned = TaskInfo(**{**asdict(info), "aligned_to": {"frame": ref.base_model, "reference": str(self.task_dirs[0]),
                                                            "method": method, "source": str(task_dir)}})
        write_task_info(where, aligned)

    def run(self) -> list[Path]:
        from tqdm.auto import tqdm

        out = []
        bar = tqdm(self.config.methods, desc="permutation merges", disable=not self.progress)
        for method in bar:
            bar.set_postfix_str(method)
            out.append(self.write(method))
        return out


def _objective(matches: dict[str, Match]) -> Optional[float]:
    scores = [m.score for m in matches.values() if m.score == m.score]
    return sum(scores) / len(scores) if scores else None


def run_permutation(config: PermuteConfig, progress: bool = True) -> list[Path]:
    return PermutationRun(config, progress).run()
