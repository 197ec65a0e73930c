"""Command line: ``python -m src.permute --tasks '[A, B]' --output DIR [--methods '[zipit, mudsc_zip]']``.

Every field of :class:`src.permute.run.PermuteConfig` is an option (``--config FILE`` reads them
from YAML). Writes ``DIR/<method>/`` per method (merged model, and aligned task models for
alignment methods); a method finished earlier with the same settings is skipped.
"""
from __future__ import annotations

if __name__ == "__main__":
    from ..merge.memory import use_free_cores

    use_free_cores()

import sys

from jsonargparse import ArgumentParser

from ..finetune.quiet import quiet_known_noise
from ..safe_output import OutputError
from ..task_checkpoint import TaskCheckpointError
from .run import PermuteConfig


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m src.permute", description=__doc__.splitlines()[0], default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(PermuteConfig, as_group=False)
    return parser


def main(argv=None) -> int:
    quiet_known_noise()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    config = PermuteConfig(**{k: v for k, v in vars(cfg).items() if k in PermuteConfig.__dataclass_fields__})
    from .run import run_permutation

    try:
        paths = run_permutation(config)
    except (TaskCheckpointError, OutputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished methods are kept; run again to continue", file=sys.stderr)
        return 130
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
