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
A complete task checkpoint at ``OUTPUT/T`` (readable ``task.json``, its weights and head) means
done (``--force`` retrains); an incomplete one is retrained, after saying so, and replaced when
the new one is complete. ``--resume`` continues an interrupted task from the newest
checkpoint under ``OUTPUT/.runs/T`` (the configs save one every epoch, whatever ``val/acc``
did) or says that there is none and starts over.

Before anything is trained, every ``OUTPUT/T`` to write is checked (``src/safe_output.py``):
never an input the config names (a local base model, tokenizer or data directory), the working
directory or one of its parents, and never an existing non-empty directory that is not an
earlier task checkpoint unless ``--overwrite`` is given. ``OUTPUT`` itself holds the task
checkpoints and may exist; it must not be the working directory or one of its parents.
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

from ..safe_output import TASK_MARKER, OutputError, check_output
from ..task_checkpoint import ADAPTER_DIR, FULL_WEIGHTS, HEAD_WEIGHTS, TaskCheckpointError, read_task_info
from .export import format_metrics, input_paths


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
    """The newest Lightning checkpoint under ``run_dir`` (of equally new ones, ``last*.ckpt``)."""
    found = []
    for path in (run_dir.rglob("*.ckpt") if run_dir.is_dir() else ()):
        try:
            found.append((path.stat().st_mtime, path.name.startswith("last"), str(path)))
        except OSError:  # a `last.ckpt` link whose target is gone (killed while re-linking)
            continue
    return Path(max(found)[2]) if found else None


def run_dir_of(output: Path, name: str) -> Path:
    return output / ".runs" / name


def fit_args(configs: list[str], name: str, overrides: dict, output: Path, extra: list[str],
             ckpt_path: Optional[Path] = None, overwrite: bool = False) -> list[str]:
    args = ["fit"]
    for cfg in configs:
        args += ["--config", cfg]
    args += task_args(name, overrides)
    args += ["--export.output_dir", str(output / name), "--trainer.default_root_dir", str(run_dir_of(output, name))]
    args += ["--export.verbose", "false"]  # the task's line below says where it went and how good it is
    if overwrite:
        args += ["--export.overwrite", "true"]
    args += extra
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    return args


def task_checkpoint_problem(directory: Path) -> Optional[str]:
    """``None`` when ``directory`` is a complete task checkpoint, else what is wrong with it."""
    try:
        info = read_task_info(directory)
    except TaskCheckpointError as e:
        return str(e)
    need = [Path(ADAPTER_DIR) / "adapter_config.json", Path(ADAPTER_DIR) / "adapter_model.safetensors"] \
        if info.kind == "lora" else [Path(FULL_WEIGHTS)]
    for rel in need + [Path(HEAD_WEIGHTS)]:
        path = directory / rel
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path}: missing or empty"
    return None


def configured_inputs(configs: list[str], overrides: dict, extra: list[str]) -> list[str]:
    """Local paths the fit of one task reads, from the model / data init args named by the
    configs, the task's overrides and the extra LightningCLI arguments (see ``input_paths``)."""
    args: dict[str, dict] = {"model": {}, "data": {}}

    def put(key, value) -> None:
        parts = [p for p in str(key).lstrip("-").split(".") if p != "init_args"]
        if len(parts) == 2 and parts[0] in args:
            args[parts[0]][parts[1]] = value

    for cfg in configs:
        data = yaml.safe_load(Path(cfg).read_text()) or {}
        for group in args:
            spec = data.get(group) if isinstance(data, dict) else None
            if isinstance(spec, dict):
                for key, value in (spec.get("init_args") or {}).items():
                    put(f"{group}.{key}", value)
    for key, value in overrides.items():
        put(key, value)
    i = 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--") and "=" in arg:
            put(*arg.split("=", 1))
        elif arg.startswith("--") and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            put(arg, extra[i + 1])
            i += 1
        i += 1
    return input_paths(args["model"], args["data"])


def check_output_root(output: Path) -> None:
    """``OUTPUT`` holds task checkpoints (it may exist), but is never the working directory, one
    of its parents, the home or root directory, or an existing file."""
    check_output(output, (), None, overwrite=True)  # only its refusals matter here
    if output.exists() and not output.is_dir():
        raise OutputError(output, "is an existing file; --output names a directory of task checkpoints")


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty OUTPUT/TASK that is not a task checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="resume from the newest OUTPUT/.runs/TASK/**/*.ckpt (says so when there is none)")
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
    if not args.dry_run:
        from .quiet import quiet_known_noise

        quiet_known_noise()
    output = Path(args.output)
    # every output is checked before anything is trained: a refused path costs no training run
    problems, incomplete = [], {}
    try:
        check_output_root(output)
    except OutputError as e:
        problems.append(f"--output {e}")
    for name in names:
        target = output / name
        if target.exists():
            incomplete[name] = task_checkpoint_problem(target) if (target / TASK_MARKER).exists() else None
            if (target / TASK_MARKER).exists() and incomplete[name] is None and not args.force:
                continue  # done
        try:
            check_output(target, configured_inputs(args.config, table.get(name, {}), extra), TASK_MARKER,
                         args.overwrite)
        except OutputError as e:
            problems.append(f"{name}: {e}")
        except (OSError, yaml.YAMLError) as e:  # an unreadable --config
            problems.append(f"{name}: {e}")
    if problems:
        for problem in problems:
            print(f"train_all: refusing to start: {problem}", file=sys.stderr, flush=True)
        return 2
    failures, summary = [], []
    start = time.perf_counter()
    n = len(names)
    for i, name in enumerate(names, 1):
        target = output / name
        head = f"[{i}/{n}] {name}:"
        done = (target / TASK_MARKER).exists() and not incomplete.get(name)
        if done and not args.force:
            print(f"{head} skipped, {target} exists", flush=True)
            summary.append((name, "skipped", target))
            continue
        if incomplete.get(name):
            print(f"{head} {target} is not a complete task checkpoint ({incomplete[name]}); retraining it "
                  f"(it is replaced when the new one is complete)", flush=True)
        run_dir = run_dir_of(output, name)
        ckpt = latest_checkpoint(run_dir)
        if not args.resume:
            if ckpt is not None:
                print(f"{head} training from the start; {ckpt} is not used (--resume continues from it)", flush=True)
            ckpt = None
        elif ckpt is None:
            print(f"{head} nothing to resume (no checkpoint under {run_dir}); training from the start", flush=True)
        else:
            print(f"{head} resuming from {ckpt}", flush=True)
        cmd = fit_args(args.config, name, table.get(name, {}), output, extra, ckpt, args.overwrite)
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
        print(f"{head} done in {dt:.0f}s; {format_metrics(info.metrics)}", flush=True)
        summary.append((name, f"{dt:.0f}s", target))
    if not args.dry_run:
        print(f"train_all: {len(names) - len(failures)}/{n} tasks ready in {output} "
              f"({time.perf_counter() - start:.0f}s)" + (f"; failed: {', '.join(failures)}" if failures else ""),
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
