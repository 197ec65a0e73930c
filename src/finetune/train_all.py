"""Finetune every task of an experiment in sequence; tasks whose checkpoint exists are skipped.

    python -m src.finetune.train_all --config configs/finetune/demo.yaml \
        --tasks-file configs/finetune/tasks/demo.yaml --output checkpoints/demo
    python -m src.finetune.train_all --config configs/finetune/A_knots_vitb32_lora.yaml \
        --tasks-file configs/finetune/tasks/A_vision.yaml --tasks cars dtd --output checkpoints/A_vitb32 \
        -- --trainer.devices 2                      # anything after the options goes to LightningCLI

For task ``T`` it runs ``python -m src.finetune fit --config ... <task overrides>
--export.output_dir OUTPUT/T --trainer.default_root_dir OUTPUT/.runs/T`` (in this process, or
one subprocess per task with ``--isolate``, which multi-GPU strategies that re-launch the
script need). A tasks file maps task names to CLI overrides (dotted keys)::

    tasks:
      bbc_news: {}                                  # -> --data.init_args.task bbc_news
      world_cities: {trainer.max_epochs: 6}         # ... plus an override
      cloth_clipart: {data.init_args.category: cloth, data.init_args.domain: clipart}

A task without any ``data.init_args.*`` override gets ``--data.init_args.task <name>``.
``OUTPUT/T/task.json`` existing means done (``--force`` retrains); ``--resume`` continues an
interrupted task from the newest ``last.ckpt`` under ``OUTPUT/.runs/T``.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import yaml

from ..task_checkpoint import is_task_dir, read_task_info


def read_tasks_file(path) -> dict[str, dict]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if isinstance(tasks, list):
        tasks = {str(t): {} for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"{path}: expected a mapping `tasks: {{name: {{override: value}}}}` or a list of names")
    return {str(name): dict(overrides or {}) for name, overrides in tasks.items()}


def _cli_value(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def task_args(name: str, overrides: dict) -> list[str]:
    args = []
    if not any(str(k).startswith("data.init_args.") for k in overrides):
        args += ["--data.init_args.task", name]
    for key, value in overrides.items():
        args += [f"--{key}", _cli_value(value)]
    return args


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = sorted(run_dir.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
    return found[-1] if found else None


def fit_args(configs: list[str], name: str, overrides: dict, output: Path, extra: list[str],
             resume: bool) -> list[str]:
    args = ["fit"]
    for cfg in configs:
        args += ["--config", cfg]
    args += task_args(name, overrides)
    run_dir = output / ".runs" / name
    args += ["--export.output_dir", str(output / name), "--trainer.default_root_dir", str(run_dir)]
    args += extra
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            args += ["--ckpt_path", str(ckpt)]
    return args


def _fmt(metrics: dict, stage: str) -> str:
    m = metrics.get(stage) or {}
    val, test = m.get("val_acc"), m.get("test_acc")
    f = lambda x: "-" if x is None else f"{100 * x:.1f}"
    return f"val {f(val)} / test {f(test)}"


def run_fit(args: list[str], isolate: bool) -> None:
    if isolate:
        subprocess.run([sys.executable, "-m", "src.finetune", *args], check=True)
        return
    from .__main__ import main

    with warnings.catch_warnings():  # LightningCLI warns when sys.argv also holds arguments (ours)
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = main(args)
    del cli
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def parse(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m src.finetune.train_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="LightningCLI config (repeatable)")
    p.add_argument("--output", required=True, help="one task-checkpoint directory per task goes here")
    p.add_argument("--tasks", nargs="+", help="task names (default: all of --tasks-file)")
    p.add_argument("--tasks-file", help="YAML: tasks -> per-task CLI overrides")
    p.add_argument("--force", action="store_true", help="retrain tasks whose checkpoint exists")
    p.add_argument("--resume", action="store_true", help="resume from OUTPUT/.runs/TASK/**/last.ckpt when present")
    p.add_argument("--isolate", action="store_true", help="one subprocess per task")
    p.add_argument("--keep-going", action="store_true", help="continue with the next task after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the fit commands only")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return args, extra


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = parse(argv)
    table = read_tasks_file(args.tasks_file) if args.tasks_file else {}
    names = args.tasks or list(table)
    if not names:
        print("train_all: no tasks: give --tasks and/or --tasks-file", file=sys.stderr)
        return 2
    output = Path(args.output)
    failures, summary = [], []
    start = time.perf_counter()
    n = len(names)
    for i, name in enumerate(names, 1):
        target = output / name
        head = f"[{i}/{n}] {name}:"
        if is_task_dir(target) and not args.force:
            print(f"{head} skipped, {target} exists", flush=True)
            summary.append((name, "skipped", target))
            continue
        cmd = fit_args(args.config, name, table.get(name, {}), output, extra, args.resume)
        if args.dry_run:
            print(f"{head} python -m src.finetune {' '.join(cmd)}", flush=True)
            continue
        print(f"{head} training -> {target}", flush=True)
        t0 = time.perf_counter()
        try:
            run_fit(cmd, args.isolate)
            info = read_task_info(target)
        except (Exception, SystemExit) as e:  # LightningCLI exits on config errors
            if isinstance(e, SystemExit) and not e.code:
                e = RuntimeError("fit ended without writing a task checkpoint")
            print(f"{head} FAILED after {time.perf_counter() - t0:.0f}s: {e}", flush=True)
            failures.append(name)
            if not args.keep_going:
                break
            continue
        dt = time.perf_counter() - t0
        print(f"{head} done in {dt:.0f}s; zero-shot {_fmt(info.metrics, 'zeroshot')} -> "
              f"finetuned {_fmt(info.metrics, 'finetuned')}", flush=True)
        summary.append((name, f"{dt:.0f}s", target))
    if not args.dry_run:
        print(f"train_all: {len(names) - len(failures)}/{n} tasks ready in {output} "
              f"({time.perf_counter() - start:.0f}s)" + (f"; failed: {', '.join(failures)}" if failures else ""),
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
