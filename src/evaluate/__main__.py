"""Command line: ``python -m src.evaluate --config configs/evaluate/<experiment>.yaml [overrides]``.

Every field of :class:`src.evaluate.run.EvalConfig` is an option (``--tasks '[a, b]'``,
``--protocol knots``, ``--grid '{lam: [0.3, 0.5]}'``, ``--only '[ties]'``, ``--rows FILE``,
``--joint.enabled true``, ``--devices 2``...). Rows go to ``--rows`` (finished measurements are
skipped on a re-run); the tables and the sensitivity plot are rendered next to it.
"""
from __future__ import annotations

if __name__ == "__main__":
    from ..merge.memory import use_free_cores

    use_free_cores()

import sys

from jsonargparse import ArgumentParser

from ..finetune.quiet import quiet_known_noise
from ..merge.errors import MergeInputError
from ..merged_output import MergedOutputError
from ..task_checkpoint import TaskCheckpointError
from .models import EvaluationError
from .run import EvalConfig


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m src.evaluate", description=__doc__.splitlines()[0], default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(EvalConfig, as_group=False)
    parser.add_argument("--print_report", type=bool, default=False, help="print report.md when done")
    return parser


#: what the evaluation commands report as one ``error:`` line (exit 2) instead of a traceback
EVALUATION_ERRORS = (EvaluationError, TaskCheckpointError, MergedOutputError, MergeInputError, ValueError)


def parse_config(parser, argv=None):
    """``(parsed namespace, EvalConfig)`` of an evaluation command line (also the analyses')."""
    quiet_known_noise()
    cfg = parser.parse_args(argv)
    cfg = (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(cfg)
    return cfg, EvalConfig(**{k: v for k, v in vars(cfg).items() if k in EvalConfig.__dataclass_fields__})


def guarded(action):
    """``(exit code, action())``: evaluation errors become one ``error:`` line (2), Ctrl-C a note (130)."""
    try:
        return 0, action()
    except EVALUATION_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; run again to continue", file=sys.stderr)
        return 130, None


def main(argv=None) -> int:
    code, parsed = guarded(lambda: parse_config(build_parser(), argv))
    if code:
        return code
    cfg, config = parsed
    from .run import EvaluationRun, write_reports

    def evaluate():
        run = EvaluationRun(config)
        run.run()
        return run, (write_reports(run) if config.report else [])

    code, result = guarded(evaluate)
    if code:
        return code
    run, paths = result
    print(f"rows: {run.rows_path} ({len(run.store)})")
    for path in paths:
        print(f"wrote {path}")
    if cfg.print_report and paths:
        print("\n" + paths[0].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
