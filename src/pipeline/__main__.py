"""``python -m src.pipeline NAME [--smoke] [--root DIR] [--stages finetune permute evaluate]``.

Runs one experiment of ``src/pipeline/experiments.py`` end to end through the stages' commands:

1. ``python -m src.finetune.train_all`` — every task model (a complete task checkpoint is skipped);
2. ``python -m src.finetune.multitask`` — the multitask baseline of C and D (one network on the mixture
   of the held-in tasks; the evaluation config scores it as ``method: merged``);
   ``python -m src.permute`` — experiment E's permutation merges (a finished method is skipped);
3. ``python -m src.evaluate`` — references, selection sweeps (data statistics computed on first
   need and cached in the task directories), learned coefficients, Ensemble, joint benchmarks,
   then ``report.md`` and the plots next to the rows (finished rows are skipped);
4. the experiment's analyses (``src/analysis``): CKA alignment of task updates (KnOTS), the cost
   table (FLOPs beside measured merge times, prerequisites; compositional paper), written next to
   the rows.

A killed run resumes where it stopped: run the same command again. ``--smoke`` runs the identical
pipeline on tiny random models and synthetic data on a CPU (``smoke.py``), under
``--root`` (default ``checkpoints/smoke/NAME``). ``--list`` prints the experiments and what each needs.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .experiments import EXPERIMENTS, Experiment

REPO = Path(__file__).resolve().parents[2]
STAGES = ("finetune", "multitask", "permute", "evaluate", "analyze")


def _flag(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def _overrides(prefix: str, values: dict) -> list[str]:
    return [f"--{prefix}.{k}={_flag(v)}" for k, v in values.items()]


def _task_data_args(cfg: dict, task_overrides: dict, name: str) -> dict:
    args = dict(cfg["data"].get("init_args") or {})
    dotted = {k[len("data.init_args."):]: v for k, v in task_overrides.items() if k.startswith("data.init_args.")}
    if not dotted:
        dotted = {"task": name}  # train_all's rule: a task without data overrides sets data.init_args.task
    args.update(dotted)
    return args


class Pipeline:
    def __init__(self, exp: Experiment, smoke: bool = False, root: Optional[str] = None):
        self.exp, self.smoke = exp, smoke
        self.finetune_config = REPO / "configs" / "finetune" / exp.finetune
        self.tasks_file = REPO / "configs" / "finetune" / "tasks" / exp.tasks_file
        self.evaluate_config = REPO / "configs" / "evaluate" / exp.evaluate
        self.permute_config = REPO / "configs" / "permute" / exp.permute if exp.permute else None
        self.root = Path(root or f"checkpoints/smoke/{exp.name}") if smoke else None
        self.checkpoints = self.root / "tasks" if smoke else Path(exp.checkpoints)

    @functools.cached_property
    def evaluation(self):
        """The evaluation config as its command line parses it (read once)."""
        from ..evaluate.__main__ import build_parser

        return build_parser().parse_args(["--config", str(self.evaluate_config)])

    # ----- the tasks --------------------------------------------------------------------
    @property
    def held_in(self) -> list[str]:
        if self.smoke:
            return list(self.exp.smoke_tasks)
        return list(self.exp.tasks) if self.exp.tasks else None

    @property
    def trained(self) -> Optional[list[str]]:
        return list(self.exp.smoke_tasks) + list(self.exp.smoke_generalization) if self.smoke else self.held_in

    # ----- stages -----------------------------------------------------------------------
    def finetune(self) -> int:
        from ..finetune.train_all import main as train_all

        argv = ["--config", str(self.finetune_config), "--tasks-file", str(self.tasks_file),
                "--output", str(self.checkpoints)]
        if self.trained:
            argv += ["--tasks", *self.trained]
        if self.smoke:
            argv += ["--", *self._smoke_finetune_overrides()]
        return train_all(argv)

    def _smoke_finetune_overrides(self) -> list[str]:
        from .smoke import SMOKE_LR, TINY_DATA, TINY_MODELS, TRAINER, WRITERS, smoke_data_root, tiny_overrides
        from ..finetune.train_all import read_tasks_file

        cfg = yaml.safe_load(self.finetune_config.read_text())
        model_cp, data_cp = cfg["model"]["class_path"], cfg["data"]["class_path"]
        data_root = smoke_data_root(self.root)
        table = read_tasks_file(self.tasks_file)
        for name in self.trained:
            WRITERS[data_cp](data_root, _task_data_args(cfg, table.get(name, {}), name))
        model = tiny_overrides(TINY_MODELS, model_cp, "model", cfg["model"].get("init_args") or {})
        model["optim.lr"] = SMOKE_LR
        data = tiny_overrides(TINY_DATA, data_cp, "data", cfg["data"].get("init_args") or {}, data_root)
        return (_overrides("trainer", TRAINER) + _overrides("model.init_args", model)
                + _overrides("data.init_args", data))

    def multitask_output(self) -> Path:
        return self.root / "merged" / Path(self.exp.multitask).name if self.smoke else Path(self.exp.multitask)

    def multitask(self) -> int:
        if not self.exp.multitask:
            return 0
        out = self.multitask_output()
        if (out / "merge.json").is_file():
            print(f"multitask: {out} exists (delete it to retrain)", file=sys.stderr)
            return 0
        from ..finetune.multitask import main as multitask_main

        argv = ["--config", str(self.finetune_config), "--tasks-file", str(self.tasks_file), "--output", str(out),
                "--task-checkpoints", str(self.checkpoints)]
        if self.held_in:
            argv += ["--tasks", *self.held_in]
        if self.smoke:
            argv += ["--", *self._smoke_finetune_overrides()]
        return multitask_main(argv)

    def permute(self) -> int:
        if self.permute_config is None:
            return 0
        from ..permute.__main__ import main as permute_main

        argv = ["--config", str(self.permute_config)]
        if self.smoke:
            argv += ["--tasks", json.dumps([str(self.checkpoints / t) for t in self.held_in]),
                     "--output", str(self.root / "merged"), "--n_examples", "24", "--search_examples", "16",
                     "--reset_examples", "24", "--alpha_grid", "[0.3, 0.7]", "--max_iter", "3",
                     "--accelerator", "cpu", "--batch_size", "8"]
        return permute_main(argv)

    def evaluate(self) -> int:
        from ..evaluate.__main__ import main as evaluate_main

        argv = ["--config", str(self.evaluate_config), "--print_report", "true"]
        if self.smoke:
            argv += self._smoke_evaluate_overrides()
        return evaluate_main(argv)

    def _smoke_evaluate_overrides(self) -> list[str]:
        from .smoke import smoke_grid, smoke_methods

        cfg = self.evaluation
        argv = ["--tasks", json.dumps([str(self.checkpoints / t) for t in self.held_in]),
                "--generalization", json.dumps([str(self.checkpoints / t) for t in self.exp.smoke_generalization]),
                "--rows", str(self.root / "results" / "rows.jsonl"), "--accelerator", "cpu", "--devices", "1",
                "--strategy", "auto", "--precision", "32-true", "--merge_device", "cpu", "--joint.label_file", "null",
                "--progress", "false", "--select_on", "absolute", "--methods", json.dumps(smoke_methods(cfg, self.root / "merged"))]
        statistics = dict(cfg.statistics or {})
        if statistics:
            argv += ["--statistics", json.dumps({**statistics, "n": 4})]
        grid = smoke_grid(cfg)
        return argv + (["--grid", json.dumps(grid)] if grid else [])

    # ----- analyses ---------------------------------------------------------------------
    def results_dir(self) -> Path:
        if self.smoke:
            return self.root / "results"
        rows = self.evaluation.rows
        return Path(str(rows).format(experiment=Path(self.exp.evaluate).stem)).parent

    def analyze(self) -> int:
        for name in self.exp.analyses:
            code = getattr(self, f"analysis_{name}")(self.results_dir() / name)
            if code:
                return code
        return 0

    def analysis_cka(self, out: Path) -> int:
        """KnOTS Fig. 2: CKA of the LoRA updates' outputs and of the KnOTS-aligned ones."""
        from ..analysis.cka import main as cka_main

        tasks = [str(self.checkpoints / t) for t in self.held_in] if self.smoke else \
            self._evaluation_tasks()
        argv = ["--tasks", json.dumps(tasks), "--kind", json.dumps(["lora", "knots"]), "--output", str(out),
                "--n", "4" if self.smoke else "64", "--overwrite", "true", "--progress", "false"]
        if self.smoke:
            argv += ["--accelerator", "cpu"]
        return cka_main(argv)

    def _merge_methods(self) -> list[dict]:
        """The evaluation config's merge methods, without ``merged`` directories (smoke: shortened)."""
        from .smoke import smoke_methods

        cfg = self.evaluation
        methods = smoke_methods(cfg, self.root / "merged") if self.smoke else smoke_methods(cfg, Path("."), shorten=False)
        return [m for m in methods if m["method"] != "merged"]

    def _evaluation_tasks(self) -> list[str]:
        return list(self.evaluation.tasks)

    def analysis_cost(self, out: Path) -> int:
        """The compositional paper's cost table: FLOPs and measured per-layer merge times, prerequisites."""
        from ..analysis.cost import main as cost_main

        argv = ["--output", str(out)]
        if self.smoke:  # a tiny layer, the element-wise methods only
            argv += ["--shapes", "64x32", "--models", "2", "--methods", "average", "task_arithmetic", "ties",
                     "--repeats", "1"]
        return cost_main(argv)

    def analysis_scaling(self, out: Path) -> int:
        """Scaling with the number of merged models under the experiment's paper protocol (KnOTS:
        random combinations; CART: all subsets; compositional: nested samples), mean and 95% CI."""
        from ..analysis.scaling import main as scaling_main

        protocol = self.exp.scaling_protocol
        argv = ["--config", str(self.evaluate_config), "--protocol", protocol, "--out", str(out)]
        if self.smoke:
            argv += self._smoke_evaluate_overrides() + ["--sizes", "[2]", "--draws", "1"]
        elif protocol == "compositional":
            argv += ["--setting", self.exp.scaling_setting]
        argv += ["--methods", json.dumps(self._merge_methods())]  # a merged directory holds one fixed task set
        return scaling_main(argv)

    def analysis_rank_sweeps(self, out: Path) -> int:
        """CART Fig. 1, 2, 5: accuracy vs retained rank, centered vs plain task vectors, top vs bottom directions."""
        from ..analysis.rank_sweeps import main as rank_sweeps_main

        argv = ["--config", str(self.evaluate_config), "--sweeps", '["cart"]', "--out", str(out)]
        if self.smoke:
            argv += self._smoke_evaluate_overrides() + ["--rank_ratios", "[0.25, 1.0]", "--lam", "1.0"]
        return rank_sweeps_main(argv)

    def run(self, stages=STAGES) -> int:
        for stage in stages:
            print(f"== {self.exp.name}: {stage}{' (smoke)' if self.smoke else ''}", file=sys.stderr)
            try:
                code = getattr(self, stage)()
            except ValueError as e:  # OutputError and the stages' input errors: one line, as the stages print them
                print(f"error: {e}", file=sys.stderr)
                code = 2
            if code:
                print(f"== {self.exp.name}: {stage} failed (exit {code}); fix it and run again: "
                      "finished work is kept", file=sys.stderr)
                return code
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", choices=sorted(EXPERIMENTS))
    parser.add_argument("--smoke", action="store_true", help="tiny random models and synthetic data on a CPU")
    parser.add_argument("--root", default=None, help="smoke mode: where everything goes (default checkpoints/smoke/NAME)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--list", action="store_true", help="print the experiments and what they need")
    args = parser.parse_args(argv)
    if args.list or not args.experiment:
        for e in EXPERIMENTS.values():
            print(f"{e.name}: {e.about}\n    needs: {e.needs}\n    writes: {e.checkpoints}/, {e.writes}")
        return 0 if args.list else 2
    return Pipeline(EXPERIMENTS[args.experiment], smoke=args.smoke, root=args.root).run(args.stages)


if __name__ == "__main__":
    sys.exit(main())
