"""The bad-input and fault matrix of the merge CLI (issue 6), re-run end to end.

    python benchmarks/fault_matrix.py            # every case (about 2-3 min on 2 cores)
    python benchmarks/fault_matrix.py --quick    # one or two cases per kind (CI: tests/merge/test_fault_matrix.py)
    python benchmarks/fault_matrix.py --only sigterm,kill   # cases whose name contains a word
    python benchmarks/fault_matrix.py --keep     # keep the temporary directory to look at

Every input is generated on the fly in a temporary directory: tiny models, a Hugging Face
style base directory, LoRA task checkpoints and PEFT adapters, full safetensors task models,
broken files (truncated, corrupt or huge headers, pickle payloads, NaN / inf, wrong shapes
or keys, malformed configs) and, for the faults, a few larger random checkpoints so that a
merge takes long enough for a signal to land while the output is being written.

Each case runs the real command line, ``python -m src.merge ...``, as a subprocess in its
own copy of the inputs, and checks:

* the exit code and the first error line (user mistakes: exit 2 with one
  ``error: <path>: <problem>`` line; I/O errors: exit 1; interrupts: exit 130);
* no ``Traceback`` on stderr;
* every input file is byte-identical afterwards (hashed before and after);
* no debris: nothing new next to the inputs or the output except the output itself, no
  hidden ``.NAME.PID.*.tmp`` / ``.NAME.old-PID`` siblings;
* a successful merge wrote a complete, loadable output (``load_file`` of every weight
  file, finite values, ``merge.json``).

Prints a Markdown table; exits 1 if any case fails. The full-disk case mounts a 2 MiB tmpfs
when run as root and ``mount`` works, else it uses a read-only directory (skipped with a
note when root can write there anyway); the table says which variant ran.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.merge.helpers import base_model, full_task_state, save_lora_adapter  # noqa: E402

PY = sys.executable
BASE_ID = "org/tiny-base"
DEBRIS = re.compile(r"^\..+\.(?:\d+\.)?.*\.tmp$|^\..+\.old-\d+$")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
class Evil:
    """A pickle payload: unpickling it would create a directory (it must never run)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class Thing:
    """An arbitrary (non-tensor) object pickled into a checkpoint."""

    def __init__(self):
        self.weights = [1.0, 2.0]


def _hf_dir(directory: Path, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 12}))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def _task_dir(directory: Path, base, seed: int, base_id: str = BASE_ID, format_version=1) -> Path:
    directory.mkdir(parents=True)
    save_lora_adapter(base, directory / "adapter", seed=seed)
    info = {"task": directory.name, "base_model": base_id, "family": "test", "kind": "lora",
            "label_names": ["a", "b"], "hparams": {}, "metrics": {}, "format_version": format_version}
    (directory / "task.json").write_text(json.dumps(info, indent=2))
    return directory


def _adapter(directory: Path, base, seed: int, targets=("q_proj", "v_proj"), base_id=BASE_ID, **edit) -> Path:
    save_lora_adapter(base, directory, seed=seed, targets=targets)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_id
    cfg.update(edit)
    (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def build_inputs(t: Path, marker: Path) -> None:
    """Every tiny input the cases use, under ``t`` (copied into each case's workspace)."""
    base = base_model(0)
    state = base.state_dict()
    _hf_dir(t / "pretrained", state)
    full = t / "full"
    full.mkdir()
    for i in range(3):
        save_file(full_task_state(base, i), str(full / f"t{i}.safetensors"))
    for i in range(3):
        _task_dir(t / "ckpt" / f"task{i}", base, seed=10 + i)
    (t / "ckpt" / "notes.txt").write_text("unrelated notes next to the task checkpoints\n")
    _task_dir(t / "ckpt_other" / "task_other", base, seed=20, base_id="org/another-base")
    _adapter(t / "adapters" / "a", base, seed=1)
    _adapter(t / "adapters" / "b", base, seed=2)
    _adapter(t / "adapters" / "qo", base, seed=3, targets=("q_proj", "out_proj"))
    _adapter(t / "adapters" / "other_base", base, seed=4, base_id="org/another-base")
    (t / "results").mkdir()
    (t / "results" / "table.md").write_text("| precious | results |\n")

    bad = t / "bad"
    bad.mkdir()
    good = (full / "t0.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[8:40] = bytes(range(200, 232))  # not UTF-8, not JSON
    (bad / "corrupt_header.safetensors").write_bytes(bytes(corrupt))
    (bad / "huge_header.safetensors").write_bytes(struct.pack("<Q", 100 * 10**9) + b'{"a":' + b" " * 59)
    header = b"[1, 2, 3]"
    header += b" " * (-len(header) % 8)
    (bad / "header_list.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    torch.save({"state_dict": {"layers.0.q_proj.weight": Evil(str(marker))}}, bad / "evil.ckpt")
    torch.save({"state_dict": Thing()}, bad / "object.pt")
    torch.save({"epoch": 3, "global_step": 120, "optimizer_states": []}, bad / "no_state_dict.ckpt")
    torch.save({"state_dict": full_task_state(base, 1)}, bad / "whole.ckpt")
    data = (bad / "whole.ckpt").read_bytes()
    (bad / "whole.ckpt").unlink()
    (bad / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": full_task_state(base, 1)}, full / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for i in range(2):
        torch.save({"state_dict": {f"model.{k}": v for k, v in full_task_state(base, i).items()}},
                   bad / f"prefixed{i}.ckpt")
    for name, value in (("nan_task", float("nan")), ("inf_task", float("inf"))):
        s = full_task_state(base, 5)
        s["layers.1.v_proj.weight"][3, 4] = value
        save_file(s, str(bad / f"{name}.safetensors"))
    s = {k: v.clone() for k, v in state.items()}
    s["layers.0.q_proj.weight"][0, 0] = float("nan")
    _hf_dir(bad / "nan_base", s)
    s = full_task_state(base, 6)
    s["layers.0.q_proj.weight"] = torch.randn(12, 10)
    save_file(s, str(bad / "shape.safetensors"))
    s = full_task_state(base, 7)
    s["layers.9.extra.weight"] = torch.randn(4, 4)
    save_file(s, str(bad / "extra_key.safetensors"))
    s = full_task_state(base, 8)
    del s["layers.1.v_proj.weight"]
    save_file(s, str(bad / "missing_key.safetensors"))
    _hf_dir(bad / "base_d16", base_model(0, d=16).state_dict())
    _adapter(bad / "r0", base, seed=5, r=0)
    _adapter(bad / "alpha_str", base, seed=6, lora_alpha="sixteen")
    _adapter(bad / "cfg_list", base, seed=7)
    (bad / "cfg_list" / "adapter_config.json").write_text("[1, 2]")
    _task_dir(bad / "version_one", base, seed=8, format_version="one")
    _adapter(bad / "no_weights", base, seed=9)
    (bad / "no_weights" / "adapter_model.safetensors").unlink()
    _task_dir(bad / "task_no_adapter", base, seed=11)
    shutil.rmtree(bad / "task_no_adapter" / "adapter")


def build_big(t: Path, n_tensors: int, d: int) -> dict:
    """A base directory and two task models large enough that writing takes a while."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(d, d, generator=g) for i in range(n_tensors)}
    _hf_dir(t / "pretrained", base)
    for j in range(2):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(t / f"t{j}.safetensors"))
    return {"base": str(t / "pretrained"), "tasks": [str(t / "t0.safetensors"), str(t / "t1.safetensors")],
            "bytes": sum(v.numel() * 4 for v in base.values())}


# ----------------------------------------------------------------------------------------
# Observation helpers
# ----------------------------------------------------------------------------------------
def _hash(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(*roots: Path) -> dict[str, Optional[str]]:
    """Every path under ``roots``: files with their hash, directories with ``None``."""
    out: dict[str, Optional[str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = None
            for f in filenames:
                p = os.path.join(dirpath, f)
                out[p] = _hash(Path(p)) if os.path.isfile(p) else "special"
    return out


def _under(path: str, root: Optional[Path]) -> bool:
    if root is None:
        return False
    root_s = str(root)
    return path == root_s or path.startswith(root_s + os.sep)


def inputs_changed(before: dict, after: dict, replaced: Optional[Path]) -> list[str]:
    """Input files that changed or vanished (``replaced``: an output the case may replace)."""
    bad = []
    for p, digest in before.items():
        if _under(p, replaced):
            continue
        if p not in after:
            bad.append(f"{p} vanished")
        elif digest != after[p]:
            bad.append(f"{p} changed")
    return bad


def debris(before: dict, after: dict, output: Optional[Path]) -> list[str]:
    """New paths that are not the case's output, and hidden temporary siblings anywhere."""
    found = []
    for p in after:
        name = os.path.basename(p)
        if DEBRIS.match(name):
            found.append(p)
        elif p not in before and not _under(p, output):
            found.append(p)
    # report the top-most new path only
    found = sorted(found)
    top = [p for i, p in enumerate(found) if not any(_under(p, Path(q)) and p != q for q in found[:i])]
    return top


def check_output_dir(out: Path, method: Optional[str] = None, complete: Optional[bool] = None) -> list[str]:
    """A merge output is complete and loadable: ``merge.json`` and every weight file."""
    problems = []
    if not out.is_dir():
        return [f"{out} was not written"]
    try:
        info = json.loads((out / "merge.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{out}/merge.json unreadable ({e})"]
    if method and info.get("method") != method:
        problems.append(f"merge.json says method {info.get('method')!r}, expected {method!r}")
    files = sorted(out.glob("*.safetensors"))
    if not files:
        problems.append(f"{out} holds no safetensors file")
    n = 0
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{f.name} does not load ({e})")
            continue
        n += len(tensors)
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                problems.append(f"{f.name}: {k} has NaN/inf")
    if info.get("save_as") == "safetensors" and n != info.get("num_tensors"):
        problems.append(f"{n} tensors written, merge.json says {info.get('num_tensors')}")
    if info.get("save_as") == "adapter" and not (out / "adapter_config.json").is_file():
        problems.append("adapter output without adapter_config.json")
    if complete and not (out / "config.json").is_file():
        problems.append("complete model without config.json")
    return problems


def first_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for prefix in ("error:", "interrupted", "Traceback"):
        for ln in lines:
            if ln.startswith(prefix):
                return ln
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------
# Running the CLI
# ----------------------------------------------------------------------------------------
def _child_signals() -> None:
    # A child of a background job may inherit SIGINT/SIGTERM as ignored: restore the defaults
    # so the CLI sees the signals a user (Ctrl-C) or a scheduler (SIGTERM) would send.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli_cmd(args: list[str]) -> list[str]:
    return [PY, "-m", "src.merge", *map(str, args), "--progress", "false"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cli_cmd(args), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_child_signals)


@dataclass
class Run:
    rc: Optional[int]
    stdout: str
    stderr: str
    seconds: float


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> Run:
    t0 = time.perf_counter()
    proc = start(args, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[fault matrix: killed after {timeout} s]"
    return Run(proc.returncode, out, err, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    group: str
    expected: str
    observed: str
    intact: list[str]
    debris: list[str]
    problems: list[str]
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return not (self.intact or self.debris or self.problems)


@dataclass
class Case:
    name: str
    group: str  # inputs | outputs | faults
    args: list  # CLI arguments, relative to the case's workspace
    rc: int  # expected exit code
    expect: list = field(default_factory=list)  # substrings of stderr (first one: of the error line)
    expected: str = ""  # the table's 'expected' column
    output: Optional[str] = None  # the output a successful case writes / may replace
    replaces: bool = False  # the case may replace what is at ``output``
    setup: Optional[Callable[[Path], None]] = None
    method: Optional[str] = None
    complete: Optional[bool] = None
    quick: bool = False
    forbid: Optional[str] = None  # an absolute path that must not exist afterwards (pickle payloads)


def input_cases(marker: Path) -> list[Case]:
    ties_full = ["--method", "ties", "--base", "pretrained"]
    ckpt = ["ckpt/task0", "ckpt/task1"]

    def tasks(*t):
        return ["--tasks", json.dumps(list(t))]

    def refused(name, args, names, *also, quick=False, forbid=None, rc=2):
        return Case(name, "inputs", [*args, "--output", "merged"], rc, [names, *also],
                    f"exit {rc}, names {names}", quick=quick, forbid=forbid)

    return [
        Case("baseline: LoRA task dirs, knots -> adapter", "inputs", ["--method", "knots", *tasks(*ckpt), "--output", "merged"],
             0, [], "exit 0, loadable adapter", output="merged", method="knots"),
        Case("baseline: full safetensors onto a base dir, ties -> complete model", "inputs",
             [*ties_full, *tasks("full/t0.safetensors", "full/t1.safetensors"), "--output", "merged"], 0, [],
             "exit 0, complete model", output="merged", method="ties", complete=True),
        refused("truncated safetensors", [*ties_full, *tasks("full/t0.safetensors", "bad/truncated.safetensors")],
                "bad/truncated.safetensors", quick=True),
        refused("corrupt header bytes", [*ties_full, *tasks("full/t0.safetensors", "bad/corrupt_header.safetensors")],
                "bad/corrupt_header.safetensors"),
        refused("huge header length (100 GB)", [*ties_full, *tasks("full/t0.safetensors", "bad/huge_header.safetensors")],
                "bad/huge_header.safetensors"),
        refused("header JSON not an object", [*ties_full, *tasks("full/t0.safetensors", "bad/header_list.safetensors")],
                "bad/header_list.safetensors"),
        refused("pickle payload (__reduce__ -> os.mkdir)", [*ties_full, *tasks("full/t0.safetensors", "bad/evil.ckpt")],
                "bad/evil.ckpt", "GLOBAL posix.mkdir", quick=True, forbid=str(marker)),
        refused("pickle of an arbitrary object", [*ties_full, *tasks("full/t0.safetensors", "bad/object.pt")],
                "bad/object.pt"),
        refused("truncated .ckpt", [*ties_full, *tasks("full/t0.safetensors", "bad/truncated.ckpt")],
                "bad/truncated.ckpt", "truncated"),
        Case("legacy (non-zip) .ckpt (control)", "inputs",
             [*ties_full, *tasks("full/t0.safetensors", "full/legacy.ckpt"), "--output", "merged"], 0, [],
             "exit 0, complete model", output="merged", method="ties", complete=True),
        refused(".ckpt without a state_dict", [*ties_full, *tasks("full/t0.safetensors", "bad/no_state_dict.ckpt")],
                "bad/no_state_dict.ckpt", "no state_dict"),
        refused("NaN in a task", [*ties_full, *tasks("full/t0.safetensors", "bad/nan_task.safetensors")],
                "bad/nan_task.safetensors", "NaN or inf"),
        refused("inf in a task", [*ties_full, *tasks("full/t0.safetensors", "bad/inf_task.safetensors")],
                "bad/inf_task.safetensors", "NaN or inf"),
        refused("NaN in the base (full tasks)", ["--method", "ties", "--base", "bad/nan_base",
                                                  *tasks("full/t0.safetensors", "full/t1.safetensors")],
                "bad/nan_base", "NaN or inf", quick=True),
        refused("NaN in the base (LoRA tasks, --save_as safetensors)",
                ["--method", "knots", "--base", "bad/nan_base", "--save_as", "safetensors", *tasks(*ckpt)],
                "bad/nan_base", "NaN or inf"),
        refused("mismatched shapes", [*ties_full, *tasks("full/t0.safetensors", "bad/shape.safetensors")],
                "bad/shape.safetensors", "shape", quick=True),
        refused("mismatched base (tasks d=12, base d=16)", ["--method", "ties", "--base", "bad/base_d16",
                                                            *tasks("full/t0.safetensors", "full/t1.safetensors")],
                "full/t0.safetensors", "shape"),
        refused("mismatched keys (extra key)", [*ties_full, *tasks("full/t0.safetensors", "bad/extra_key.safetensors")],
                "bad/extra_key.safetensors", "does not exist in the base"),
        refused("mismatched keys (missing key)", [*ties_full, *tasks("full/t0.safetensors", "bad/missing_key.safetensors")],
                "bad/missing_key.safetensors", "different parameters"),
        refused("LoRA adapters targeting different modules", ["--method", "knots", *tasks("adapters/a", "adapters/qo")],
                "adapters/qo", "targets different modules"),
        refused("task.json naming another base", ["--method", "knots", *tasks("ckpt/task0", "ckpt_other/task_other")],
                "ckpt_other/task_other", "another base model", quick=True),
        refused("adapter_config.json naming another base", ["--method", "knots", *tasks("adapters/a", "adapters/other_base")],
                "adapters/other_base", "another base model"),
        refused("adapter_config.json r: 0", ["--method", "knots", *tasks("adapters/a", "bad/r0")],
                "bad/r0/adapter_config.json", "r must be a positive integer"),
        refused("adapter_config.json lora_alpha: string", ["--method", "knots", *tasks("adapters/a", "bad/alpha_str")],
                "bad/alpha_str/adapter_config.json", "lora_alpha"),
        refused("adapter_config.json is a JSON list", ["--method", "knots", *tasks("adapters/a", "bad/cfg_list")],
                "bad/cfg_list/adapter_config.json", "JSON object"),
        refused('task.json format_version: "one"', ["--method", "knots", *tasks("ckpt/task0", "bad/version_one")],
                "bad/version_one/task.json", "format_version"),
        refused("missing task file", [*ties_full, *tasks("full/t0.safetensors", "full/nope.safetensors")],
                "full/nope.safetensors", "does not exist"),
        refused("missing --base", ["--method", "ties", "--base", "no/such/base",
                                   *tasks("full/t0.safetensors", "full/t1.safetensors")], "no/such/base"),
        refused("adapter dir without its weights", ["--method", "knots", *tasks("adapters/a", "bad/no_weights")],
                "bad/no_weights", "adapter_model.safetensors is missing"),
        refused("task dir without its adapter", ["--method", "knots", *tasks("ckpt/task0", "bad/task_no_adapter")],
                "bad/task_no_adapter", "missing"),
        refused("duplicate task paths", ["--method", "knots", *tasks("ckpt/task0", "ckpt/task1", "./ckpt/task0/")],
                "ckpt/task0", "given twice"),
        refused("wrong --ckpt_prefix", [*ties_full, "--ckpt_prefix", "net.", *tasks("bad/prefixed0.ckpt", "bad/prefixed1.ckpt")],
                "bad/prefixed0.ckpt", "--ckpt_prefix 'net.'"),
        Case("right --ckpt_prefix (control)", "inputs",
             [*ties_full, "--ckpt_prefix", "model.", *tasks("bad/prefixed0.ckpt", "bad/prefixed1.ckpt"), "--output", "merged"],
             0, [], "exit 0, complete model", output="merged", method="ties", complete=True),
        refused("--params.lam 1e400", ["--method", "task_arithmetic", "--base", "pretrained", "--params.lam", "1e400",
                                       *tasks(*ckpt)], "lam", "finite", quick=True),
        refused("slerp --params.dot_threshold 1.5", ["--method", "slerp", "--base", "pretrained",
                                                     "--params.dot_threshold", "1.5", *tasks(*ckpt)], "dot_threshold"),
        refused("invalid --device", ["--method", "knots", "--device", "gpu0", *tasks(*ckpt)], "gpu0", "device"),
        refused("missing --config file", ["--config", "no/such/config.yaml", *tasks(*ckpt)],
                "no/such/config.yaml", "does not exist"),
        refused("unknown --method", ["--method", "tie", *tasks(*ckpt)], "tie", "unknown merge method"),
    ]


def output_cases() -> list[Case]:
    lora = ["--method", "knots", "--base", "pretrained", "--tasks", json.dumps(["ckpt/task0", "ckpt/task1"])]
    full = ["--method", "ties", "--base", "pretrained", "--tasks",
            json.dumps(["full/t0.safetensors", "full/t1.safetensors"])]

    def refused(name, args, output, names, *also, quick=False):
        return Case(name, "outputs", [*args, "--output", output], 2, [names, *also],
                    f"exit 2, names {names or repr(output)}, nothing replaced", quick=quick)

    def earlier_output(ws: Path) -> None:
        (ws / "merged").mkdir()
        (ws / "merged" / "merge.json").write_text(json.dumps({"method": "ties"}))
        (ws / "merged" / "stale.safetensors").write_bytes(b"old")

    return [
        refused("--output = an input task dir", lora, "ckpt/task0", "ckpt/task0", "is the", quick=True),
        refused("--output = an input task dir (--overwrite)", [*lora, "--overwrite", "true"], "ckpt/task0", "ckpt/task0", "is the"),
        refused("--output = an adapter dir", ["--method", "knots", "--tasks", json.dumps(["adapters/a", "adapters/b"])],
                "adapters/b", "adapters/b", "is the"),
        refused("--output = the base dir", lora, "pretrained", "pretrained", "is the"),
        refused("--output = the base weights file", lora, "pretrained/model.safetensors", "pretrained/model.safetensors"),
        refused("--output = the inputs' parent", lora, "ckpt", "ckpt", "contains the", quick=True),
        refused("--output = inside a task dir", lora, "ckpt/task0/merged", "ckpt/task0/merged", "lies inside"),
        refused("--output = a results folder with unrelated files", lora, "results", "results", "--overwrite", quick=True),
        refused("--output = an input file", full, "full/t0.safetensors", "full/t0.safetensors", "is the"),
        refused("--output = .", lora, ".", "", "not a name a new output can take"),
        refused('--output = ""', lora, "", "", "output"),
        refused("--output = the cwd (absolute)", lora, "$WS", "working directory", quick=True),
        refused("--output = a parent of the cwd", lora, "..", "", "not a name a new output can take"),
        Case("--output = an earlier merge output", "outputs", [*full, "--output", "merged"], 0,
             ["replacing the earlier output"], "exit 0, replaced, with a note", output="merged", replaces=True,
             setup=earlier_output, method="ties", complete=True, quick=True),
        Case("--output = a foreign dir with --overwrite", "outputs", [*full, "--output", "results", "--overwrite", "true"], 0,
             ["replacing the existing directory"], "exit 0, replaced, with a note", output="results", replaces=True,
             method="ties", complete=True),
    ]


# ----------------------------------------------------------------------------------------
# The case runner
# ----------------------------------------------------------------------------------------
class Matrix:
    def __init__(self, root: Path, quick: bool, jobs: int):
        self.root, self.quick, self.jobs = root, quick, jobs
        self.template = root / "template"
        self.marker = root / "PWNED-by-pickle"
        self.results: list[Result] = []
        self.big: Optional[dict] = None
        self._n = 0
        self._lock = threading.Lock()

    def workspace(self, name: str) -> Path:
        with self._lock:
            self._n += 1
            n = self._n
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
        ws = self.root / "cases" / f"{n:02d}-{slug}"
        shutil.copytree(self.template, ws, symlinks=True)
        return ws

    def _short(self, text: str, ws: Path) -> str:
        text = text.replace(str(ws), "$WS").replace(str(self.root), "$TMP")
        return text if len(text) <= 150 else text[:147] + "..."

    def observed(self, run: Run, ws: Path) -> str:
        return self._short(f"exit {run.rc}: {first_line(run.stderr)}".rstrip(": "), ws)

    def run_case(self, case: Case) -> Result:
        ws = self.workspace(case.name)
        if case.setup:
            case.setup(ws)
        args = [str(a).replace("$WS", str(ws)) for a in case.args]
        before = snapshot(ws)
        run = run_cli(args, ws)
        after = snapshot(ws)
        out = (ws / case.output) if case.output else None
        problems = self.common_checks(run, case.rc, case.expect)
        if case.forbid and os.path.lexists(case.forbid):
            problems.append(f"{case.forbid} exists: the pickle payload ran")
        if case.rc == 0 and run.rc == 0 and out is not None:
            problems += check_output_dir(out, case.method, case.complete)
            if case.replaces and ((out / "stale.safetensors").exists() or (out / "table.md").exists()):
                problems.append(f"{case.output}: the replaced directory's files are still there")
        result = Result(case.name, case.group, case.expected, self.observed(run, ws),
                        inputs_changed(before, after, out if case.replaces else None),
                        debris(before, after, out if run.rc == 0 else None), problems, run.seconds)
        shutil.rmtree(ws, ignore_errors=True)
        return result

    @staticmethod
    def common_checks(run: Run, rc, expect) -> list[str]:
        problems = []
        rcs = rc if isinstance(rc, (tuple, list, set)) else (rc,)
        if run.rc not in rcs:
            problems.append(f"exit code {run.rc}, expected {rc}")
        if "Traceback" in run.stderr:
            problems.append("traceback on stderr")
        line = first_line(run.stderr)
        for i, s in enumerate(expect):
            where = line if i == 0 and rc != 0 else run.stderr
            if s and s not in where:
                problems.append(f"{s!r} not in {'the error line' if where is line else 'stderr'}")
        if rc in (1, 2) and run.rc in (1, 2):  # one line besides notes: `error: <path>: <problem>`
            lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"stderr has {len(lines)} lines besides notes, expected one 'error: ...' line")
        return problems

    # ----- faults -----------------------------------------------------------------------
    def big_args(self, method: str = "ties", extra=()) -> list[str]:
        return ["--method", method, "--base", self.big["base"], "--tasks", json.dumps(self.big["tasks"]), *extra]

    def _wait_mid_write(self, proc: subprocess.Popen, parent: Path, name: str, timeout: float = 120) -> Optional[str]:
        """Poll until the CLI's hidden temporary output holds a partly written weight file,
        then stop the process there (SIGSTOP), so that the signal lands mid-write."""
        return self._stop_mid_write([proc], parent, name, timeout)[0]

    def _stop_mid_write(self, procs: list, parent: Path, name: str, timeout: float = 120) -> list[Optional[str]]:
        """:meth:`_wait_mid_write` for several processes at once (each stopped when it gets there)."""
        notes: list[Optional[str]] = [None] * len(procs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = [i for i, p in enumerate(procs) if notes[i] is None and p.poll() is None]
            if not waiting:
                break
            for i in waiting:
                for tmp in parent.glob(f".{name}.{procs[i].pid}.*.tmp"):
                    f = tmp / "model.safetensors"
                    try:
                        size = f.stat().st_size
                    except OSError:
                        continue
                    if size > 1 << 20:
                        os.kill(procs[i].pid, signal.SIGSTOP)
                        size = f.stat().st_size
                        notes[i] = f"stopped with {size / 2**20:.0f} of {self.big['bytes'] / 2**20:.0f} MiB written"
            time.sleep(0.002)
        return notes

    def fault_signal(self, sig: int, replace_earlier: bool = False) -> Result:
        signame = "kill -9" if sig == signal.SIGKILL else signal.Signals(sig).name
        name = f"{signame} mid-write" + (" while replacing an earlier output" if replace_earlier else "")
        ws = self.workspace(name)
        out = ws / "out"
        if replace_earlier:
            out.mkdir()
            (out / "merge.json").write_text(json.dumps({"method": "ties", "earlier": True}))
            (out / "model.safetensors").write_bytes(b"earlier output")
        expected = ("exit 130, no output, no .tmp left" if sig != signal.SIGKILL else
                    "killed; debris removed by the next run, which succeeds")
        if replace_earlier:
            expected += "; earlier output intact"
        big_dir = Path(self.big["base"]).parent
        before = snapshot(ws, big_dir)
        t0 = time.perf_counter()
        proc = start(self.big_args(extra=["--output", "out"]), ws)
        problems: list[str] = []
        note = self._wait_mid_write(proc, ws, "out")
        if note is None:
            problems.append("the merge finished before the signal could land (make the inputs bigger)")
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        else:
            os.kill(proc.pid, sig)
            if sig != signal.SIGKILL:
                os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
        run = Run(proc.returncode, "", err, time.perf_counter() - t0)
        after = snapshot(ws, big_dir)
        observed = self.observed(run, ws)
        if sig == signal.SIGKILL:
            problems += self.common_checks(run, -signal.SIGKILL, [])
            left = [os.path.basename(p) for p in debris(before, after, None)]
            if replace_earlier:
                if inputs_changed({k: v for k, v in before.items() if _under(k, out)}, after, None):
                    problems.append("the earlier output changed after kill -9")
            elif out.exists():
                problems.append("a visible output exists after kill -9")
            observed += f" (left {', '.join(left) or 'nothing'})"
            rerun = run_cli(self.big_args(extra=["--output", "out"]), ws)
            problems += [f"rerun: {p}" for p in self.common_checks(rerun, 0, [])]
            if left and "removed" not in rerun.stderr:
                problems.append("rerun did not report removing the debris")
            if rerun.rc == 0:
                problems += check_output_dir(out, "ties", complete=True)
            msg = next((ln for ln in rerun.stderr.splitlines() if "removed" in ln), first_line(rerun.stderr))
            observed += "; rerun " + self._short(f"exit {rerun.rc}: {msg}", ws)
            after = snapshot(ws, big_dir)
            run.seconds += rerun.seconds
            final_out = out if rerun.rc == 0 else None
        else:
            problems += self.common_checks(run, 130, ["interrupted"])
            final_out = None
            if replace_earlier:
                if inputs_changed({k: v for k, v in before.items() if _under(k, out)}, after, None):
                    problems.append(f"the earlier output changed after {signame}")
            elif out.exists():
                problems.append(f"a visible output exists after {signame}")
        replaced = out if (sig == signal.SIGKILL and final_out is not None) else None
        result = Result(name, "faults", expected, observed, inputs_changed(before, after, replaced),
                        debris(before, after, final_out or (out if replace_earlier else None)), problems,
                        run.seconds, note or "")
        shutil.rmtree(ws, ignore_errors=True)
        return result

    def fault_concurrent(self) -> Result:
        name = "two concurrent writers to one --output"
        ws = self.workspace(name)
        big_dir = Path(self.big["base"]).parent
        before = snapshot(ws, big_dir)
        t0 = time.perf_counter()
        lams = ["0.3", "0.7"]
        procs = [start(self.big_args("ties", ["--params.lam", lam, "--output", "out"]), ws) for lam in lams]
        # Both must be writing at the same time: each is stopped mid-write until the other is too.
        notes = self._stop_mid_write(procs, ws, "out")
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        runs = []
        for p in procs:
            _, err = p.communicate(timeout=300)
            runs.append(Run(p.returncode, "", err, time.perf_counter() - t0))
        after = snapshot(ws, big_dir)
        problems = []
        if None in notes:
            problems.append("the two writers were not writing at the same time (make the inputs bigger)")
        winners = [i for i, r in enumerate(runs) if r.rc == 0]
        losers = [i for i, r in enumerate(runs) if r.rc != 0]
        for r in runs:
            if "Traceback" in r.stderr:
                problems.append("traceback on stderr")
        if len(winners) != 1:
            problems.append(f"{len(winners)} writers exited 0 (expected exactly one winner)")
        for i in losers:
            line = first_line(runs[i].stderr)
            if runs[i].rc != 2 or "another process" not in line or "out" not in line:
                problems.append(f"loser: exit {runs[i].rc}, {line!r}")
        problems += check_output_dir(ws / "out", "ties", complete=True)
        if len(winners) == 1 and not problems:
            info = json.loads((ws / "out" / "merge.json").read_text())
            if abs(info["params"]["lam"] - float(lams[winners[0]])) > 1e-9:
                problems.append("the output is not the winner's merge")
        observed = "; ".join(f"lam {lams[i]}: " + self._short(f"exit {r.rc}: {first_line(r.stderr)}".rstrip(": "), ws)
                             for i, r in enumerate(runs))
        result = Result(name, "faults", "both exit; one wins (exit 0), the other exit 2 'another process'; "
                        "output complete", observed, inputs_changed(before, after, None),
                        debris(before, after, ws / "out"), problems, max(r.seconds for r in runs),
                        "both stopped mid-write, then resumed together" if None not in notes else "")
        shutil.rmtree(ws, ignore_errors=True)
        return result

    def disk_variant(self) -> str:
        """``tmpfs`` when this process may mount one (root), else ``read-only``."""
        mount_dir = self.root / "mnt"
        mount_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0 and shutil.which("mount"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount_dir)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                subprocess.run(["umount", str(mount_dir)], check=True)
                return "tmpfs"
        return "read-only"

    def _tmpfs_case(self, name: str, options: str, fill: Optional[str]) -> Result:
        ws = self.workspace(name)
        disk = ws / "disk"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], check=True)
        note = ""
        try:
            if fill == "tight":
                # Free space just above the tensors' size: the up-front check passes, and the
                # write itself (header, config, tokenizer, model card) runs out of space.
                needed = sum(v.numel() * v.element_size() for v in load_file(str(ws / "pretrained/model.safetensors")).values())
                free = shutil.disk_usage(disk).free
                filler = free - needed - 4096
                with open(disk / "filler.bin", "wb") as f:
                    f.write(b"\0" * filler)
                note = f"free space {shutil.disk_usage(disk).free} B for {needed} B of tensors"
                args = ["--method", "ties", "--base", "pretrained", "--tasks",
                        json.dumps(["full/t0.safetensors", "full/t1.safetensors"])]
                expect_rc, expect = 1, ["disk/out", "No space left"]
                expected = "exit 1, names disk/out, 'No space left', nothing left"
            elif options.startswith("ro"):
                args = ["--method", "ties", "--base", "pretrained", "--tasks",
                        json.dumps(["full/t0.safetensors", "full/t1.safetensors"])]
                expect_rc, expect = 2, ["disk", "Read-only"]
                expected = "exit 2 (before merging), names disk, 'Read-only'"
            else:
                args = self.big_args()
                expect_rc, expect = 2, ["disk", "free"]
                expected = "exit 2 before merging, names disk, says how much is free"
            before = snapshot(ws, Path(self.big["base"]).parent)
            run = run_cli([*args, "--output", "disk/out"], ws)
            after = snapshot(ws, Path(self.big["base"]).parent)
            problems = self.common_checks(run, expect_rc, expect)
            if "pretrained" in first_line(run.stderr) or "big" in first_line(run.stderr):
                problems.append("the error line names an input, not the output")
            if (disk / "out").exists():
                problems.append("disk/out exists")
            result = Result(name, "faults", expected, self.observed(run, ws), inputs_changed(before, after, None),
                            debris(before, after, None), problems, run.seconds, note)
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        shutil.rmtree(ws, ignore_errors=True)
        return result

    def _readonly_case(self, mount_dir: Path) -> Result:
        name = "read-only output directory"
        ws = self.workspace(name)
        ro = ws / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        try:
            if os.access(ro, os.W_OK):
                return Result(name + " (skipped: root can write to a read-only directory and mount failed)",
                              "faults", "skipped", "skipped", [], [], [], 0.0, "skipped")
            before = snapshot(ws)
            run = run_cli(["--method", "ties", "--base", "pretrained", "--tasks",
                           json.dumps(["full/t0.safetensors", "full/t1.safetensors"]), "--output", "ro/out"], ws)
            after = snapshot(ws)
            problems = self.common_checks(run, 2, ["ro", "ermission"])
            return Result(name, "faults", "exit 2, names ro, 'Permission denied'", self.observed(run, ws),
                          inputs_changed(before, after, None), debris(before, after, None), problems, run.seconds)
        finally:
            os.chmod(ro, 0o755)
            shutil.rmtree(ws, ignore_errors=True)

    # ----- driver ----------------------------------------------------------------------
    def run(self, only: Optional[list[str]] = None) -> list[Result]:
        t0 = time.perf_counter()
        self.template.mkdir(parents=True)
        build_inputs(self.template, self.marker)
        n, d = (8, 1024) if self.quick else (16, 1024)
        self.big = build_big(self.root / "big", n, d)
        self.variant = self.disk_variant()
        print(f"inputs built in {time.perf_counter() - t0:.1f} s under {self.root}", file=sys.stderr)

        def wanted(name: str, quick: bool) -> bool:
            if only:
                return any(w.lower() in name.lower() for w in only)
            return quick or not self.quick

        jobs: list[tuple[str, bool, Callable[[], Result]]] = [
            (c.name, c.quick, (lambda c=c: self.run_case(c))) for c in input_cases(self.marker) + output_cases()]
        jobs += [
            ("kill -9 mid-write", True, lambda: self.fault_signal(signal.SIGKILL)),
            ("SIGTERM mid-write", True, lambda: self.fault_signal(signal.SIGTERM)),
            ("SIGINT mid-write", False, lambda: self.fault_signal(signal.SIGINT)),
            ("kill -9 mid-write while replacing an earlier output", False,
             lambda: self.fault_signal(signal.SIGKILL, replace_earlier=True)),
            ("SIGTERM mid-write while replacing an earlier output", False,
             lambda: self.fault_signal(signal.SIGTERM, replace_earlier=True)),
            ("two concurrent writers to one --output", True, self.fault_concurrent),
        ]
        if self.variant == "tmpfs":
            jobs += [
                ("full disk: tmpfs (2 MiB) smaller than the model", False,
                 lambda: self._tmpfs_case("full disk: tmpfs (2 MiB) smaller than the model", "size=2M", None)),
                ("full disk: tmpfs where the free-space check passes and the write runs out", True,
                 lambda: self._tmpfs_case("full disk: tmpfs where the free-space check passes and the write runs out",
                                          "size=2M", "tight")),
                ("read-only disk: tmpfs mounted -o ro", False,
                 lambda: self._tmpfs_case("read-only disk: tmpfs mounted -o ro", "ro,size=2M", None)),
            ]
        else:
            jobs.append(("full disk: read-only directory instead (no tmpfs)", True,
                         lambda: self._readonly_case(self.root / "mnt")))
        selected = [fn for name, quick, fn in jobs if wanted(name, quick)]
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for result in pool.map(lambda fn: fn(), selected):
                self._done(result)
        return self.results

    def _done(self, result: Result) -> None:
        self.results.append(result)
        mark = "ok  " if result.ok else "FAIL"
        print(f"[{mark}] {result.name} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(results: list[Result]) -> str:
    lines = ["| case | expected | observed (exit code, first error line) | inputs intact | no debris | verdict |",
             "|---|---|---|---|---|---|"]
    for r in results:
        intact = "yes" if not r.intact else "NO: " + "; ".join(r.intact[:3])
        clean = "yes" if not r.debris else "NO: " + "; ".join(os.path.basename(p) for p in r.debris[:3])
        verdict = "skip" if r.note == "skipped" else ("PASS" if r.ok else "FAIL: " + "; ".join(r.problems[:3]))
        name = f"{r.group}: {r.name}" + (f" ({r.note})" if r.note and r.note != "skipped" else "")
        lines.append("| " + " | ".join(_cell(c) for c in (name, r.expected, r.observed, intact, clean, verdict)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one or two cases of each kind, smaller fault inputs")
    parser.add_argument("--only", default="", help="comma-separated words: run cases whose name contains one")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="input/output cases run in parallel")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tmp", default=None, help="where to create the temporary directory")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fault-matrix-", dir=args.tmp)).resolve()
    # SIGTERM (a CI timeout) unwinds like Ctrl-C: tmpfs mounts are unmounted, the directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    t0 = time.perf_counter()
    matrix = Matrix(root, args.quick, max(1, args.jobs))
    try:
        results = matrix.run([w for w in args.only.split(",") if w] or None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    failed = [r for r in results if not r.ok]
    variant = {"tmpfs": "a 2 MiB tmpfs mounted as root (mount -t tmpfs -o size=2M)",
               "read-only": "a read-only directory (no tmpfs mount possible)"}[matrix.variant]
    print(f"\n{len(results) - len(failed)}/{len(results)} cases pass in {time.perf_counter() - t0:.0f} s; "
          f"full-disk variant: {variant}")
    for r in failed:
        print(f"FAIL {r.name}: " + "; ".join(r.problems + [f"input {x}" for x in r.intact] +
                                            [f"debris {x}" for x in r.debris]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
