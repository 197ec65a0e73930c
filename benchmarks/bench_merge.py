"""Merge speed and memory on model-shaped inputs (run on demand; not part of CI).

    python benchmarks/bench_merge.py                 # everything (about 10-15 min on 2 cores)
    python benchmarks/bench_merge.py --only knots    # KnOTS-TIES factored vs dense
    python benchmarks/bench_merge.py --only sweep    # 10 x 10 KnOTS-TIES grid vs single merges
    python benchmarks/bench_merge.py --only stream   # TIES over five >= 500M-parameter checkpoints
    python benchmarks/bench_merge.py --device cuda   # per-tensor math on the GPU

Inputs are random LoRA adapters / checkpoints with the shapes of the real models, written
to a temporary directory in the formats users bring (PEFT adapter directories,
safetensors), so every timing is end to end: read, align, merge, write.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.merge import Sweep, merge  # noqa: E402
from src.merge.sources import open_task  # noqa: E402

KNOTS_TIES = {"base_method": "ties", "lam": 0.6, "density": 0.2, "trim_scope": "global", "sign_fill": "global"}

# (name, tasks, modules: list of (module path, out, in), rank)
def vit_modules(layers: int, d: int):
    return [(f"vision_model.encoder.layers.{i}.self_attn.{m}", d, d) for i in range(layers)
            for m in ("q_proj", "k_proj", "v_proj", "out_proj")]


def llama_modules():
    mods = []
    for i in range(32):
        p = f"model.layers.{i}.self_attn"
        mods += [(f"{p}.q_proj", 4096, 4096), (f"{p}.k_proj", 1024, 4096), (f"{p}.v_proj", 1024, 4096), (f"{p}.o_proj", 4096, 4096)]
    return mods


SHAPES = {
    "ViT-B/32": (8, vit_modules(12, 768), 16),
    "ViT-L/14": (8, vit_modules(24, 1024), 16),
    "Llama-3-8B": (6, llama_modules(), 16),
}


def write_adapters(root: Path, tasks: int, modules, rank: int, seed: int = 0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for t in range(tasks):
        d = root / f"task{t}"
        d.mkdir(parents=True)
        tensors = {}
        for name, out, inp in modules:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "o_proj"],
            "use_rslora": False, "fan_in_fan_out": False}))
        dirs.append(d)
    return dirs


def dense_updates(dirs: list[Path]) -> list[dict]:
    """The adapters' updates as dense float64 tensors: the dense route's exact input.

    (A float32 product ``B @ A`` differs from the factors' exact product by ~1e-7, and
    TIES' discrete trim amplifies any such difference; float64 makes the comparison fair.)
    """
    readers = [open_task(d) for d in dirs]
    return [{k: r.load(k).to(dtype=torch.float64).dense() for k in r.keys()} for r in readers]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def warm_up(root: Path, device: str) -> None:
    """One small merge first, so no timing below pays for lazy imports and library init."""
    dirs = write_adapters(root / "warmup", 2, vit_modules(1, 64), 4)
    merge("knots", dirs, output=root / "warmup" / "out", params=KNOTS_TIES, device=device, progress=False)
    shutil.rmtree(root / "warmup")


def bench_knots(root: Path, device: str, rows: list, models=None) -> None:
    warm_up(root, device)
    for model, (tasks, modules, rank) in SHAPES.items():
        if models and model not in models:
            continue
        work = root / model.replace("/", "_")
        dirs = write_adapters(work, tasks, modules, rank)
        times = []
        for i in range(4):  # the first (cold) run pays first-touch page faults of its working memory
            t0 = time.perf_counter()
            res = merge("knots", dirs, output=work / f"merged{i}", params=KNOTS_TIES, device=device, progress=False)
            times.append(time.perf_counter() - t0)
        factored_s = sorted(times[1:])[1]  # median of the three warm runs
        row = {"bench": "knots_ties", "model": model, "tasks": tasks, "modules": len(modules), "rank": rank,
               "device": device, "factored_s": round(factored_s, 2), "factored_cold_s": round(times[0], 2),
               "peak_rss_gib": round(res.info["peak_rss_bytes"] / 2**30, 2)}
        if model == "ViT-B/32":  # dense route over the whole model, and agreement
            updates = dense_updates(dirs)
            zero = {k: torch.zeros_like(v) for k, v in updates[0].items()}
            t0 = time.perf_counter()
            dense = merge("knots", updates, base=zero, params=KNOTS_TIES, device=device, save_as="safetensors",
                          progress=False).tensors
            row["dense_s"] = round(time.perf_counter() - t0, 2)
            fact = merge("knots", dirs, params=KNOTS_TIES, device=device, progress=False).tensors
            row["max_rel_err"] = max(rel_err(fact[k].dense(), dense[k]) for k in dense)
            row["speedup"] = round(row["dense_s"] / factored_s, 1)
        elif model == "ViT-L/14":  # dense route of ONE module, extrapolated to the model
            name = modules[0][0] + ".weight"
            updates = [{name: open_task(d).load(name).to(dtype=torch.float64).dense()} for d in dirs]
            t0 = time.perf_counter()
            merge("knots", updates, base={name: torch.zeros_like(updates[0][name])},
                  params={**KNOTS_TIES, "trim_scope": "tensor", "sign_fill": "tensor"}, device=device,
                  save_as="safetensors", progress=False)
            one = time.perf_counter() - t0
            row["dense_s"] = f"~{one * len(modules):.0f} (1 module: {one:.1f} s, x{len(modules)})"
            row["speedup"] = f"~{one * len(modules) / factored_s:.0f}"
        else:
            row["dense_s"] = "~6 h (one 4096x4096 module: 338 s, docs/algorithms.md)"
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(work)


def bench_sweep(root: Path, device: str, rows: list) -> None:
    tasks, modules, rank = SHAPES["ViT-B/32"]
    warm_up(root, device)
    dirs = write_adapters(root / "sweep", tasks, modules, rank)
    grid = {"lam": [round(0.1 * i, 1) for i in range(1, 11)], "density": [round(0.1 * i, 1) for i in range(1, 11)]}
    t0 = time.perf_counter()
    merge("knots", dirs, params=KNOTS_TIES, device=device, progress=False)
    single = time.perf_counter() - t0
    sweep = Sweep("knots", dirs, device=device, progress=False)
    t0 = time.perf_counter()
    n = sum(1 for _ in sweep.run(grid, fixed={"base_method": "ties"}, as_updates=True))
    total = time.perf_counter() - t0
    row = {"bench": "sweep_knots_ties", "model": "ViT-B/32 LoRA", "grid": f"{n} points", "device": device,
           "sweep_s": round(total, 1), "one_merge_s": round(single, 2), "100_merges_s": round(100 * single, 1),
           "speedup": round(100 * single / total, 1)}
    print(json.dumps(row), flush=True)
    rows.append(row)
    # full-rank (dense) updates, where the per-tensor SVD dominates a merge: 3 layers of ViT-B/32
    dense = [{k: v for k, v in u.items() if ".layers.0." in k or ".layers.1." in k or ".layers.2." in k}
             for u in dense_updates(dirs)]
    dense = [{k: v + 1e-3 * torch.randn(v.shape, dtype=v.dtype) for k, v in u.items()} for u in dense]  # full rank
    zero = {k: torch.zeros_like(v) for k, v in dense[0].items()}
    t0 = time.perf_counter()
    merge("knots", dense, base=zero, params=KNOTS_TIES, device=device, save_as="safetensors", progress=False)
    single = time.perf_counter() - t0
    sweep = Sweep("knots", dense, base=zero, device=device, progress=False)
    t0 = time.perf_counter()
    n = sum(1 for _ in sweep.run(grid, fixed={"base_method": "ties"}, as_updates=True))
    total = time.perf_counter() - t0
    row = {"bench": "sweep_knots_ties", "model": "ViT-B/32 full-rank, 12 modules", "grid": f"{n} points",
           "device": device, "sweep_s": round(total, 1), "one_merge_s": round(single, 2),
           "100_merges_s": round(100 * single, 1), "speedup": round(100 * single / total, 1)}
    print(json.dumps(row), flush=True)
    rows.append(row)
    shutil.rmtree(root / "sweep")


# A ~509M-parameter transformer: 18 layers x (4 x 1536^2 attention + 2 x 1536x6144 MLP) + norms
def stream_shapes():
    d, f = 1536, 6144
    shapes = {}
    for i in range(18):
        p = f"layers.{i}"
        for m in ("q", "k", "v", "o"):
            shapes[f"{p}.attn.{m}.weight"] = (d, d)
        shapes[f"{p}.mlp.up.weight"] = (f, d)
        shapes[f"{p}.mlp.down.weight"] = (d, f)
        shapes[f"{p}.norm.weight"] = (d,)
    return shapes


def bench_stream(root: Path, device: str, rows: list) -> None:
    shapes = stream_shapes()
    params = sum(torch.Size(s).numel() for s in shapes.values())
    g = torch.Generator().manual_seed(0)
    paths = []
    for t in range(6):  # base + 5 tasks, written one tensor at a time into one file each
        state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        path = root / ("base.safetensors" if t == 0 else f"task{t}.safetensors")
        save_file(state, str(path))
        del state
        paths.append(str(path))
    ckpt = os.path.getsize(paths[1])
    cmd = [sys.executable, "-m", "src.merge", "--method", "ties", "--base", paths[0], "--tasks", json.dumps(paths[1:]),
           "--output", str(root / "out"), "--params.density", "0.2", "--params.trim_scope", "tensor",
           "--params.sign_fill", "tensor", "--device", device, "--progress", "false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    info = json.loads((root / "out" / "merge.json").read_text())
    read = 6 * ckpt
    row = {"bench": "stream_ties_tensor", "params_per_ckpt_M": round(params / 1e6), "ckpt_gib": round(ckpt / 2**30, 2),
           "tasks": 5, "device": device, "wall_s": round(wall, 1), "merge_s": round(info["wall_time_s"], 1),
           "read_gb_per_s": round(read / info["wall_time_s"] / 1e9, 2),
           "peak_rss_gib": round(info["peak_rss_bytes"] / 2**30, 2),
           "extra_rss_gib": round((info["peak_rss_bytes"] - info["rss_at_start_bytes"]) / 2**30, 2),
           "below_one_ckpt": info["peak_rss_bytes"] < ckpt}
    print(json.dumps(row), flush=True)
    rows.append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["knots", "sweep", "stream"], action="append")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", action="append", choices=list(SHAPES), help="knots: only these shapes")
    ap.add_argument("--workdir", default=None, help="where inputs are written (needs ~14 GB for 'stream')")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    rows: list = []
    try:
        if not args.only or "knots" in args.only:
            bench_knots(root, args.device, rows, args.model)
        for name, fn in (("sweep", bench_sweep), ("stream", bench_stream)):
            if not args.only or name in args.only:
                fn(root, args.device, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n| bench | model | device | result |\n|---|---|---|---|")
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("bench", "model", "device")}
        print(f"| {r['bench']} | {r.get('model', '-')} | {r['device']} | {json.dumps(rest)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
