"""Command line: ``python -m src.statistics --tasks '[dir_a, dir_b]' --kinds '[gram, fisher]' --split train --n 256 --seed 0``.

Computes the missing data statistics of each task-checkpoint directory (``src/statistics/collect.py``)
into ``<task_dir>/statistics/<split>-n<N>-seed<seed>/`` and prints that directory per task.
Merges then read them with ``python -m src.merge ... --statistics <split>-n<N>-seed<seed>``.
Options: ``--layers trained`` (only the layers the task model changes), ``--batch_size``, ``--accelerator``, ``--devices``, ``--strategy``, ``--data '{data_root: ...}'``
(init-argument overrides of the tasks' DataModules), ``--progress false``.
"""
from __future__ import annotations

if __name__ == "__main__":  # the CLI, not an import: torch's threads = the cores free now
    from ..merge.memory import use_free_cores

    use_free_cores()

import sys
from typing import Any, Optional, Union

from jsonargparse import ArgumentParser

from ..safe_output import OutputError, sigterm_as_interrupt
from ..task_statistics import KINDS, StatisticsError


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit code 2."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m src.statistics", description=__doc__.splitlines()[0],
                            default_config_files=[], exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--tasks", type=list[str], required=True, help="task-checkpoint directories")
    parser.add_argument("--kinds", type=list[str], default=list(KINDS), help=f"statistics to compute: {', '.join(KINDS)}")
    parser.add_argument("--split", type=str, default="train", help="train | val | test")
    parser.add_argument("--n", type=int, default=256, help="number of examples (the first n of a seeded permutation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=str, default="all",
                        help="all: every Linear layer; trained: those whose weight the task model changes (LoRA targets)")
    parser.add_argument("--batch_size", type=Optional[int], default=None,
                        help="examples per step (default: the DataModule's batch size)")
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=Union[int, str, list[int]], default=1)
    parser.add_argument("--strategy", type=str, default="auto")
    parser.add_argument("--data", type=Optional[dict[str, Any]], default=None,
                        help="init-argument overrides of the tasks' DataModules, e.g. {data_root: /data}")
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..finetune.quiet import quiet_known_noise
    from ..task_checkpoint import TaskCheckpointError
    from .collect import collect_statistics

    try:
        try:
            cfg = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        except Exception as e:  # jsonargparse's ArgumentError and friends
            raise UsageError(_one_line(e)) from None
        if not cfg.tasks:
            raise UsageError("--tasks is empty: name at least one task-checkpoint directory")
        quiet_known_noise()
        with sigterm_as_interrupt():
            for task in cfg.tasks:
                path = collect_statistics(task, kinds=cfg.kinds, split=cfg.split, n=cfg.n, seed=cfg.seed,
                                          batch_size=cfg.batch_size, accelerator=cfg.accelerator, devices=cfg.devices,
                                          data=cfg.data, layers=cfg.layers, strategy=cfg.strategy,
                                          progress=cfg.progress)
                print(path, flush=True)
    except (UsageError, StatisticsError, TaskCheckpointError, OutputError, ValueError) as e:
        print("error: " + _one_line(e), file=sys.stderr)
        return 2
    except OSError as e:
        where = e.filename if e.filename is not None else "statistics"
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: statistics not yet written were discarded", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
