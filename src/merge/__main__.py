"""Command line: ``python -m src.merge --config configs/merge/ties.yaml [overrides]``.

Overrides: ``--method``, ``--base``, ``--tasks a b c``, ``--output``, ``--device``,
``--save_as``, ``--overwrite``, and any hyperparameter as ``--params.<name> value`` (validated against the
method's ``Params``). ``--list`` prints every method with its hyperparameters.
"""
from __future__ import annotations

if __name__ == "__main__":  # the CLI, not an import: torch's threads = the cores free now
    from .memory import use_free_cores

    use_free_cores()

import dataclasses
import errno
import json
import os
import re
import sys
from typing import Optional

import yaml
from jsonargparse import ArgumentParser

from ..safe_output import OutputError, sigterm_as_interrupt
from . import list_methods, merge
from .errors import MergeInputError
from .registry import describe


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit code 2."""


def _method_name(argv: list[str]) -> Optional[str]:
    """The method chosen on the command line, else in the (last) config file."""
    name = None
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            name = _config_method(value) or name
        elif arg == "--method" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--method="):
            name = arg.split("=", 1)[1]
    return name


def _config_method(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file does not exist") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a merge config must be a mapping (method, params, base, tasks, output, ...)")
    return data.get("method")


def build_parser(method: Optional[str]) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m src.merge", description=__doc__.splitlines()[0], default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_argument("--method", type=str, required=True, help="registered method name (see --list)")
    parser.add_argument("--base", type=Optional[str], default=None,
                        help="base model: safetensors, index.json, HF model dir, or a hub id in the local cache "
                             "(default: the base the task checkpoints record, when it is available offline)")
    parser.add_argument("--tasks", type=list[str], required=True, help="task models: adapter dirs, task dirs, safetensors, .ckpt")
    parser.add_argument("--output", type=Optional[str], required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace an existing --output that is not an earlier merge output (never an input)")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--save_as", type=str, default="auto", help="auto | safetensors | adapter")
    parser.add_argument("--ckpt_prefix", type=str, default="", help="prefix stripped from .ckpt state-dict keys")
    parser.add_argument("--statistics", type=Optional[str], default=None,
                        help="data statistics tag for Fisher / RegMean / MaTS (e.g. train-n256-seed0: each task "
                             "directory's statistics/<tag>/, written by python -m src.statistics)")
    parser.add_argument("--progress", type=bool, default=True)
    methods = list_methods()
    if method in methods and dataclasses.fields(methods[method].Params):
        parser.add_class_arguments(methods[method].Params, "params")
    else:  # a method without hyperparameters still accepts the configs' `params: {}`
        parser.add_argument("--params", type=dict, default={})
    return parser


def print_methods() -> None:
    """``--list``: every method, what it does and needs, and its defaults."""
    rows = [describe(cls) for cls in list_methods().values()]
    print("| method | what it computes | base needed | LoRA inputs | tasks | hyperparameters (default) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        defaults = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["defaults"].items()) or "none"
        print(f"| {r['name']} | {r['description']} | {r['needs_base']} | {r['lora']} | {r['tasks']} | {defaults} |")


def _params_dict(cfg) -> dict:
    params = getattr(cfg, "params", None)
    if params is None:
        return {}
    if hasattr(params, "as_dict"):
        return params.as_dict()
    if not isinstance(params, dict):
        raise UsageError(f"params must be a mapping of hyperparameters, got {params!r}")
    return dict(params)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print_methods()
        return 0
    output = None
    try:
        method = _method_name(argv)
        if method is not None and method not in list_methods():
            raise UsageError(f"unknown merge method '{method}'; known: {', '.join(list_methods())}")
        cfg = build_parser(method).parse_args(argv)
        if not cfg.output:
            raise UsageError("--output is required: name a new directory for the merged model")
        output = cfg.output
        with sigterm_as_interrupt():  # SIGTERM (timeout, SLURM, docker stop) ends the run like Ctrl-C
            result = merge(cfg.method, cfg.tasks, base=cfg.base, output=cfg.output, params=_params_dict(cfg),
                           device=cfg.device, save_as=cfg.save_as, progress=cfg.progress,
                           ckpt_prefix=cfg.ckpt_prefix, overwrite=cfg.overwrite, statistics=cfg.statistics)
    except (UsageError, MergeInputError, OutputError, ValueError) as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except OSError as e:  # read-only or full disk, permissions: name the path
        print(f"error: {os_error_path(e, output or cfg_output(argv))}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    info = result.info
    print(json.dumps({k: info[k] for k in ("method", "params", "save_as", "wall_time_s", "peak_rss_bytes")}, default=str))
    print(f"wrote {result.output}")
    return 0


#: A failed write: the output is to blame, not the file being copied into it.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error_path(e: OSError, output: str) -> str:
    """The path an ``OSError`` is about, as the user knows it.

    A failed write names the output: ``shutil.copyfile`` reports the source (the base's
    ``config.json``) as ``filename`` and the destination as ``filename2``, and a file inside
    the hidden temporary directory (``.NAME.PID.*.tmp``, removed by now) is named by its
    place in the output.
    """
    write = e.errno in _WRITE_ERRNOS
    path = e.filename2 if write and e.filename2 is not None else e.filename
    if path is None or isinstance(path, int):
        return output
    path = os.fsdecode(path)
    out = os.path.abspath(output)
    hidden = re.compile(rf"\.{re.escape(os.path.basename(out))}\.\d+\..*\.tmp")
    rel = os.path.relpath(os.path.abspath(path), os.path.dirname(out))
    first, _, rest = rel.partition(os.sep)
    if hidden.fullmatch(first):
        return os.path.join(output, rest) if rest else output
    return path


def cfg_output(argv: list[str]) -> str:
    for i, arg in enumerate(argv[:-1]):
        if arg == "--output":
            return argv[i + 1]
    return "the output"


if __name__ == "__main__":
    sys.exit(main())
