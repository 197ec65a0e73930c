"""Per-layer merge time of the data-dependent methods beside the element-wise ones (on demand).

    python benchmarks/bench_data_methods.py                  # CPU (MaTS K-FAC takes minutes here)
    python benchmarks/bench_data_methods.py --device cuda    # the GPU, like the paper's Table 4
    python benchmarks/bench_data_methods.py --methods regmean mats-gram --repeats 5

One mT5-xl feed-forward weight (``wi``: 5120 x 2048, i.e. ``k = 5120`` outputs, ``d = 2048``
inputs) and five task models, in memory, with random statistics of the right shapes: diagonal
Fisher (5120, 2048), Gram (2048, 2048) SPD, K-FAC ``kfac_in`` (2048, 2048) and ``kfac_out``
(5120, 5120) SPD. Each method is called through :class:`~src.merge.MergeEngine` exactly as a
merge would call it (updates formed from the base, statistics loaded and checked, prepare,
reductions, merge, ``W0`` added back); the inputs are generated and the engine opened before
the clock starts, so the time is the merge alone. Median of ``--repeats`` runs (fewer when one
run exceeds ``--budget`` seconds: MaTS K-FAC on a CPU).

The compositional paper's Table 4 ("Realistic Evaluation of Model Merging for Compositional
Generalization") measured the same layer on its GPU: Average 1.2 ms, TA 1.9, TIES 2.1,
Fisher 0.8, RegMean 49.9, MaTS 4,280 ms (CG with 50 iterations whose matrix-vector products go
through scipy on the host). Its FLOP counts per ``d x k`` layer and ``M`` models are printed
beside: MaTS' ``(M + N) d^2 k`` is the RegMean (Gram) subspace; the K-FAC subspace costs
``M d k (d + k)`` per iteration (multiply-adds, the paper's unit).
"""
from __future__ import annotations

import argparse
import json
import statistics as stats_mod
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.merge import MergeEngine  # noqa: E402

PAPER_MS = {"average": 1.2, "task_arithmetic": 1.9, "ties": 2.1, "fisher": 0.8, "regmean": 49.9, "regmean-f32": 49.9,
            "mats-gram": 4280.0, "mats-kfac": 4280.0}

# label -> (method, params, statistics kinds)
CASES = {
    "average": ("average", {}, ()),
    "task_arithmetic": ("task_arithmetic", {"lam": 0.3}, ()),
    "ties": ("ties", {"lam": 1.0, "density": 0.2}, ()),
    "fisher": ("fisher", {}, ("fisher",)),
    "regmean": ("regmean", {"a": 0.9}, ("gram",)),
    "regmean-f32": ("regmean", {"a": 0.9, "solve_dtype": "float32"}, ("gram",)),
    "mats-gram": ("mats", {"subspace": "gram", "lam_init": 0.3}, ("gram",)),
    "mats-kfac": ("mats", {"subspace": "kfac", "lam_init": 0.3}, ("kfac_in", "kfac_out")),
}
DEFAULT_CASES = ["average", "task_arithmetic", "ties", "fisher", "regmean", "regmean-f32", "mats-gram", "mats-kfac"]


def paper_gflop(label: str, M: int, d: int, k: int, N: int) -> str:
    """The compositional paper's FLOP count (Sec. costs), in GFLOP."""
    dk, d2k = d * k, d * d * k
    flops = {
        "average": M * dk, "task_arithmetic": (2 * M + 1) * dk, "ties": (4 * M + 1) * dk,
        "fisher": (3 * M - 1) * dk, "regmean": (M + 2) * d2k + (3 * M - 2) * dk,
        "mats-gram": (M + N) * d2k + (2 * M + 5 * N - 2) * dk,
        "mats-kfac": M * dk * (d + k) * (N + 1),  # K-FAC: M products G X A per iteration, and the rhs
    }
    label = "regmean" if label.startswith("regmean") else label
    return f"{flops[label] / 1e9:,.1f}" if label in flops else ""


def spd(k: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """A random SPD matrix ``M M^T / r + 0.1 I`` (a Gram-like spectrum), generated cheaply."""
    m = torch.randn(k, rank, generator=g)
    out = m @ m.T / rank
    out.diagonal().add_(0.1)
    return out


def make_inputs(M: int, out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(out_f, in_f, generator=g) * 0.02}
    tasks = [{"w": base["w"] + 1e-3 * torch.randn(out_f, in_f, generator=g)} for _ in range(M)]
    side = [{"fisher": torch.rand(out_f, in_f, generator=g) * 1e-6, "gram": spd(in_f, 256, g),
             "kfac_in": spd(in_f, 256, g), "kfac_out": spd(out_f, 256, g)} for _ in range(M)]
    return base, tasks, side


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(label: str, base, tasks, side, device: torch.device, repeats: int, budget: float, iterations: int):
    method, params, kinds = CASES[label]
    params = dict(params)
    if method == "mats":
        params["iterations"] = iterations
    statistics = [{kind: {"w": s[kind]} for kind in kinds} for s in side] if kinds else None
    engine = MergeEngine(method, tasks, base=base, device=device, progress=False, statistics=statistics)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = engine.run(params)
        sync(device)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(result.tensors["w"]).all()
        if sum(times) > budget:
            break
    return params, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--out-features", type=int, default=5120)
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--iterations", type=int, default=50, help="MaTS CG iterations (the paper's timing: 50)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="stop repeating a method after this many seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the timings here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    base, tasks, side = make_inputs(args.tasks, args.out_features, args.in_features)
    M, d, k = args.tasks, args.in_features, args.out_features
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"one {k} x {d} layer, {M} task models, {where}, torch {torch.__version__}\n", flush=True)
    rows = []
    for label in args.methods:
        params, times = time_case(label, base, tasks, side, device, args.repeats, args.budget, args.iterations)
        ms = 1e3 * stats_mod.median(times)
        rows.append({"method": label, "params": params, "median_ms": ms, "runs": len(times),
                     "times_ms": [1e3 * t for t in times], "paper_ms": PAPER_MS.get(label),
                     "paper_gflop": paper_gflop(label, M, d, k, args.iterations)})
        print(f"  {label}: {ms:,.1f} ms (median of {len(times)})", file=sys.stderr, flush=True)

    print(f"| method | hyperparameters | this run, {device.type} (ms, median) | runs | "
          "paper Table 4, GPU (ms) | GFLOP (paper's count) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        paper = "" if r["paper_ms"] is None else f"{r['paper_ms']:,.1f}"
        print(f"| {r['method']} | {hp} | {r['median_ms']:,.1f} | {r['runs']} | {paper} | {r['paper_gflop']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "shape": [k, d], "tasks": M, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
