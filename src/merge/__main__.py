"""Command line: ``python -m src.merge --config configs/merge/ties.yaml [overrides]``.

Overrides: ``--method``, ``--base``, ``--tasks a b c``, ``--output``, ``--device``,
``--save_as``, and any hyperparameter as ``--params.<name> value`` (validated against the
method's ``Params``). ``--list`` prints every method with its hyperparameters.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

import yaml
from jsonargparse import ArgumentParser

from . import list_methods, merge
from .errors import MergeInputError


def _method_name(argv: list[str]) -> Optional[str]:
    """The method chosen on the command line, else in the (last) config file."""
    name = None
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config":
            with open(argv[i + 1]) as f:
                name = (yaml.safe_load(f) or {}).get("method", name)
        elif arg == "--method":
            name = argv[i + 1]
    for arg in argv:
        if arg.startswith("--method="):
            name = arg.split("=", 1)[1]
    return name


def build_parser(method: Optional[str]) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m src.merge", description=__doc__.splitlines()[0], default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_argument("--method", type=str, required=True, help="registered method name (see --list)")
    parser.add_argument("--base", type=Optional[str], default=None, help="base model: safetensors, index.json or HF model dir")
    parser.add_argument("--tasks", type=list[str], required=True, help="task models: adapter dirs, task dirs, safetensors, .ckpt")
    parser.add_argument("--output", type=str, required=True, help="output directory (written atomically)")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--save_as", type=str, default="auto", help="auto | safetensors | adapter")
    parser.add_argument("--ckpt_prefix", type=str, default="", help="prefix stripped from .ckpt state-dict keys")
    parser.add_argument("--progress", type=bool, default=True)
    methods = list_methods()
    if method in methods:
        parser.add_class_arguments(methods[method].Params, "params")
    else:
        parser.add_argument("--params", type=dict, default={})
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        for name, cls in list_methods().items():
            fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
            print(f"{name:18s} {fields}")
        return 0
    method = _method_name(argv)
    if method is not None and method not in list_methods():
        print(f"error: unknown merge method '{method}'; known: {', '.join(list_methods())}", file=sys.stderr)
        return 2
    cfg = build_parser(method).parse_args(argv)
    params = cfg.params.as_dict() if hasattr(cfg.params, "as_dict") else dict(cfg.params)
    try:
        result = merge(cfg.method, cfg.tasks, base=cfg.base, output=cfg.output, params=params,
                       device=cfg.device, save_as=cfg.save_as, progress=cfg.progress, ckpt_prefix=cfg.ckpt_prefix)
    except (MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = result.info
    print(json.dumps({k: info[k] for k in ("method", "params", "save_as", "wall_time_s", "peak_rss_bytes")}, default=str))
    print(f"wrote {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
