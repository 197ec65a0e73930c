"""GPU check of the finetuning stage (what CPU tests cannot show): bf16-mixed training steps.

    python benchmarks/gpu_finetune_smoke.py

A tiny CLIP (random weights from a config, no hub) trains LoRA and full finetunes on a
learnable toy image task under ``precision="bf16-mixed"`` on one GPU; the task checkpoint is
exported, reloaded and must reproduce the trained module's logits.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.finetune.base import OptimSpec  # noqa: E402
from src.finetune.export import export_task_checkpoint  # noqa: E402
from src.finetune.load import load_task_model  # noqa: E402
from tests.finetune.conftest import ToyImageDataModule, _make_clip  # noqa: E402


def run(finetune: str) -> dict:
    L.seed_everything(0)
    dm = ToyImageDataModule(n_train=256, n_eval=64, batch_size=32)
    module = _make_clip(finetune, optim=OptimSpec(lr=1e-2 if finetune == "lora" else 1e-3, weight_decay=0.0,
                                                  scheduler="constant"))
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=40, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    batch = {k: v.cuda() for k, v in next(iter(dm.train_dataloader())).items()}
    trainer.fit(module, datamodule=dm)
    module.cuda()  # Lightning moves the module back to the CPU after fit
    fresh = _make_clip(finetune)
    fresh.label_names = list(dm.label_names)
    fresh.build_model(fresh.label_names, dm.templates)
    fresh.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = fresh.eval().loss(fresh.logits(batch), batch["labels"]).item()
        after = module.eval().loss(module.logits(batch), batch["labels"]).item()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer2 = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=20, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer2.fit(module.train(), datamodule=dm)
    torch.cuda.synchronize()
    module.cuda()
    step_ms = 1000 * (time.perf_counter() - t0) / 20
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            want = module.eval().float().logits(batch)
        out = export_task_checkpoint(module, Path(tmp) / "toy", "toy", {"finetuned": {"val_acc": 0.0}})
        loaded = load_task_model(out, device="cuda")
        with torch.no_grad():
            got = loaded.logits(batch)
        max_diff = float((got - want).abs().max())
    return {"finetune": finetune, "loss_before": round(before, 3), "loss_after": round(after, 3),
            "ms_per_step_incl_fit_overhead": round(step_ms, 1), "reload_max_logit_diff": max_diff,
            "ok": after < before - 0.05 and max_diff < 1e-3}


if __name__ == "__main__":
    assert torch.cuda.is_available(), "needs a GPU"
    print(torch.cuda.get_device_name(0), torch.__version__)
    results = [run(f) for f in ("lora", "full")]
    for r in results:
        print(r)
    sys.exit(0 if all(r["ok"] for r in results) else 1)
