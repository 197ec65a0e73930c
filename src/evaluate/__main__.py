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


def main(argv=None) -> int:
    quiet_known_noise()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg = (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(cfg)
    config = EvalConfig(**{k: v for k, v in vars(cfg).items() if k in EvalConfig.__dataclass_fields__})
    from .run import EvaluationRun, write_reports

    try:
        run = EvaluationRun(config)
        run.run()
        paths = write_reports(run) if config.report else []
    except (EvaluationError, TaskCheckpointError, MergedOutputError, MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; run again to continue", file=sys.stderr)
        return 130
    print(f"rows: {run.rows_path} ({len(run.store)})")
    for path in paths:
        print(f"wrote {path}")
    if cfg.print_report and paths:
        print("\n" + paths[0].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
