"""Demo, last step: merge the demo task models and measure what each merge keeps.

    python scripts/demo_merge.py --tasks-dir checkpoints/demo --output checkpoints/demo-merged

Every method merges the four LoRA task adapters into ONE adapter (``src.merge``); that
adapter then serves every task, each with its own frozen label head, and is scored on
the task's test split. Normalized accuracy = merged / finetuned accuracy (PROTOCOLS A).
Writes ``results.jsonl`` and ``results.md`` under ``--output`` and prints the table.
(The evaluation stage, ``src/evaluate``, will take this over with Lightning loops.)
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.finetune.quiet import quiet_known_noise  # noqa: E402

quiet_known_noise()  # before transformers / peft / bitsandbytes are imported

from safetensors.torch import load_file, save_file  # noqa: E402

from src.finetune.export import evaluate_splits  # noqa: E402
from src.finetune.load import build_module, load_task_model  # noqa: E402
from src.merge import merge  # noqa: E402
from src.pretrained import resolve_pretrained  # noqa: E402
from src.task_checkpoint import ADAPTER_DIR, FULL_WEIGHTS, HEAD_WEIGHTS, TASK_JSON, read_task_info  # noqa: E402

# (label, method, hyperparameters): not tuned (no validation search in the demo)
METHODS = [
    ("Average", "average", {}),
    ("Task Arithmetic", "task_arithmetic", {"lam": 0.5}),
    ("TIES", "ties", {"lam": 1.0, "density": 0.2}),
    ("DARE-TIES", "dare", {"mode": "ties", "p": 0.2, "lam": 1.0, "seed": 420}),
    ("KnOTS-TIES", "knots", {"base_method": "ties", "lam": 1.0, "density": 0.2}),
    # LoRA inputs: the centered updates have rank <= 4 tasks x r8 = 32, and at full rank CART
    # is plain averaging (its identity), so the demo keeps an absolute rank below that
    ("CART", "cart", {"lam": 1.0, "rank": 8}),
]


def datamodule_of(task_dir: Path):
    spec = read_task_info(task_dir).hparams["datamodule"]
    module, _, name = spec["class_path"].rpartition(".")
    dm = getattr(importlib.import_module(module), name)(**spec["init_args"])
    dm.setup("test")
    return dm


def merged_weights(merged: Path, keep: set[str]) -> dict:
    """The tensors of a dense merged model (one file or shards with an index) that are in ``keep``
    (a complete merged model also holds what the base file has beyond its parameters, such as
    BERT's ``position_ids``)."""
    index = merged / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [FULL_WEIGHTS]
    state = {}
    for name in files:
        state.update(load_file(str(merged / name)))
    return {k: v for k, v in state.items() if k in keep}


def test_accuracy(task_dir: Path, merged: Path | None, dm, base_keys: set[str], progress: str) -> float:
    """Test accuracy of the task's head on the merged model (None: the task's own model).

    A merged LoRA adapter stands in for the task's adapter; merged full weights (methods
    that densify) load as a full checkpoint: the task's task.json and head either way.
    """
    if merged is None:
        return evaluate_splits(load_task_model(task_dir), dm, splits=("test",), progress=progress)["test_acc"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = json.loads((task_dir / TASK_JSON).read_text())
        shutil.copy(task_dir / HEAD_WEIGHTS, tmp / HEAD_WEIGHTS)
        if (merged / "adapter_config.json").is_file():
            shutil.copytree(merged, tmp / ADAPTER_DIR)
        else:
            save_file(merged_weights(merged, base_keys), str(tmp / FULL_WEIGHTS), metadata={"format": "pt"})
            info["kind"] = "full"
            info["hparams"]["module"]["init_args"]["finetune"] = "full"
        (tmp / TASK_JSON).write_text(json.dumps(info))
        return evaluate_splits(load_task_model(tmp), dm, splits=("test",), progress=progress)["test_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks-dir", default="checkpoints/demo")
    ap.add_argument("--output", default="checkpoints/demo-merged")
    args = ap.parse_args()
    task_dirs = sorted(p.parent for p in Path(args.tasks_dir).glob(f"*/{TASK_JSON}"))
    if len(task_dirs) < 2:
        sys.exit(f"error: {args.tasks_dir}: needs at least two task checkpoints (run the demo finetuning first)")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = [d.name for d in task_dirs]
    dms = {d.name: datamodule_of(d) for d in task_dirs}
    base_keys = set(build_module(read_task_info(task_dirs[0]), task_dirs[0]).load_base().state_dict())
    finetuned = {d.name: test_accuracy(d, None, dms[d.name], base_keys, f"finetuned {d.name}") for d in task_dirs}
    rows = [{"method": "Finetuned (one model per task)", "params": {}, "acc": finetuned,
             "norm": {n: 1.0 for n in names}}]
    # the real pretrained encoder the tasks share: adapters stay adapters (save_as="auto"),
    # methods that densify write merged weights W0 + dW for the adapted layers
    base = Path(resolve_pretrained(read_task_info(task_dirs[0]).base_model))
    for label, method, params in METHODS:
        res = merge(method, task_dirs, base=base, output=out / method, params=params, progress=False)
        acc = {d.name: test_accuracy(d, out / method, dms[d.name], base_keys, f"{label} on {d.name}")
               for d in task_dirs}
        rows.append({"method": label, "params": res.info["params"], "merge_s": round(res.info["wall_time_s"], 2),
                     "acc": acc, "norm": {n: acc[n] / finetuned[n] for n in names}})
        print(f"{label:16s} merged in {res.info['wall_time_s']:.2f} s; mean test acc {sum(acc.values()) / len(acc):.3f}",
              flush=True)
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    head = "| method | " + " | ".join(names) + " | mean acc | mean normalized |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    for r in rows:
        cells = [f"{100 * r['acc'][n]:.1f}" for n in names]
        mean = 100 * sum(r["acc"].values()) / len(names)
        norm = 100 * sum(r["norm"].values()) / len(names)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {mean:.1f} | {norm:.1f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print("\nTest accuracy (%) of one merged model per method, each task with its own head:\n")
    print(table)


if __name__ == "__main__":
    main()
