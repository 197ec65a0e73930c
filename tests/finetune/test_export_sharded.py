"""The task-checkpoint export under sharded strategies (src/finetune/export.py, ``rebuild``).

FSDP and DeepSpeed need GPUs here, so their own gathering (``summon_full_params``, DeepSpeed's
``zero_to_fp32``) is not exercised. What runs on the CPU: the whole rebuild path of the callback
in a real fit on one device (consolidate -> rebuild on rank 0 -> evaluate -> export) against the
in-place (DDP) export; the DeepSpeed path in a real fit with only DeepSpeed's library function
replaced by a reader of the checkpoint the callback saved; the FSDP consolidation with
``summon_full_params`` replaced by a recording no-op; and which strategies select which path."""
from __future__ import annotations

import contextlib
import json
import sys
import types

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from src.finetune import export as export_mod
from src.finetune.export import TaskCheckpointExport, clean_name, fsdp_trained_state, sharding_of

from .conftest import ToyImageDataModule


class Wreck(L.Callback):
    """Ruins the trainable weights after the last validation: only the best snapshot may be exported."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            for p in pl_module.parameters():
                if p.requires_grad:
                    p.add_(10.0)


def fit_and_export(make_clip, quiet_trainer, out, finetune="lora", **export_kw):
    L.seed_everything(0, verbose=False)  # the same LoRA init and data order in every run
    module = make_clip(finetune)
    export = TaskCheckpointExport(output_dir=str(out / "{task}"), verbose=False, **export_kw)
    quiet_trainer(max_epochs=2, limit_train_batches=3, callbacks=[Wreck(), export]).fit(
        module, datamodule=ToyImageDataModule())
    return export, out / "toy"


def weights(task_dir) -> dict[str, torch.Tensor]:
    files = [task_dir / "head.safetensors"] + sorted(task_dir.glob("adapter/*.safetensors")) + \
        sorted(task_dir.glob("model.safetensors"))
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def same_checkpoint(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 2
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ia, ib = json.loads((a / "task.json").read_text()), json.loads((b / "task.json").read_text())
    assert ia["metrics"] == ib["metrics"] and ia["hparams"] == ib["hparams"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_rebuilt_export_equals_the_in_place_export(make_clip, quiet_trainer, tmp_path, finetune):
    """One device, ``rebuild=True``: the path FSDP / DeepSpeed take, minus their gathering."""
    _, in_place = fit_and_export(make_clip, quiet_trainer, tmp_path / "ddp", finetune)
    export, rebuilt = fit_and_export(make_clip, quiet_trainer, tmp_path / "rebuilt", finetune, rebuild=True)
    same_checkpoint(in_place, rebuilt)
    info = json.loads((rebuilt / "task.json").read_text())
    assert info["metrics"]["finetuned"]["val_acc"] == pytest.approx(export.best_score)  # best, not wrecked


def test_deepspeed_path_exports_the_best_checkpoints_weights(make_clip, quiet_trainer, tmp_path, monkeypatch):
    """The DeepSpeed path in a real fit: a checkpoint saved at every improvement, converted on rank 0
    at the end (DeepSpeed's converter replaced by a reader of that checkpoint, with the prefix an old
    Lightning wrapper adds), exported from the rebuilt copy; the checkpoints are removed afterwards."""
    _, in_place = fit_and_export(make_clip, quiet_trainer, tmp_path / "ddp")
    converted = []

    def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, exclude_frozen_parameters=False):
        converted.append(checkpoint_dir)
        state = torch.load(checkpoint_dir, map_location="cpu", weights_only=False)["state_dict"]
        return {f"_forward_module.{k}": v.float() for k, v in state.items()}

    fake = types.ModuleType("deepspeed.utils.zero_to_fp32")
    fake.get_fp32_state_dict_from_zero_checkpoint = get_fp32_state_dict_from_zero_checkpoint
    for name in ("deepspeed", "deepspeed.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", fake)
    monkeypatch.setattr(export_mod, "sharding_of", lambda trainer: "deepspeed")
    saved = []
    real_save = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", lambda self, path, *a, **k: (saved.append(path),
                                                                                   real_save(self, path, *a, **k)))
    export, out = fit_and_export(make_clip, quiet_trainer, tmp_path / "ds")
    assert saved and all(p.endswith("export-deepspeed/best") for p in saved)
    assert converted == [export.best_checkpoint]
    same_checkpoint(in_place, out)
    assert not (tmp_path / "ds").joinpath("export-deepspeed").exists()
    assert not list(tmp_path.rglob("export-deepspeed"))


class Wrapped(torch.nn.Module):
    """A stand-in for an FSDP unit: the wrapped module under FSDP's attribute name."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner


def test_fsdp_consolidation_gathers_to_rank0_with_clean_names(monkeypatch):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    calls = []
    monkeypatch.setattr(FSDP, "summon_full_params",
                        staticmethod(lambda module, **kw: (calls.append((module, kw)), contextlib.nullcontext())[1]))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), Wrapped(torch.nn.Linear(4, 2)))
    net[0].requires_grad_(False)
    root = object()
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=root, kwargs={"use_orig_params": True}),
                                    is_global_zero=True)
    state = fsdp_trained_state(trainer, net)
    assert calls == [(root, {"writeback": False, "rank0_only": True, "offload_to_cpu": True})]
    assert sorted(state) == ["1.bias", "1.weight"]  # trainable only, wrapper names removed
    assert torch.equal(state["1.weight"], net[1]._fsdp_wrapped_module.weight)
    trainer.is_global_zero = False
    assert fsdp_trained_state(trainer, net) is None and len(calls) == 2  # every rank joins the gather
    trainer.strategy.kwargs["use_orig_params"] = False
    with pytest.raises(RuntimeError, match="use_orig_params"):
        fsdp_trained_state(trainer, net)
    assert clean_name("model._fsdp_wrapped_module.layer._checkpoint_wrapped_module.w") == "model.layer.w"


def test_which_strategies_rebuild():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    def trainer(strategy):
        return types.SimpleNamespace(strategy=strategy)

    deepspeed = object.__new__(DeepSpeedStrategy)  # its constructor needs the deepspeed package
    cases = {"fsdp": FSDPStrategy(), "deepspeed": deepspeed, None: DDPStrategy()}
    for expected, strategy in cases.items():
        assert sharding_of(trainer(strategy)) == expected
        assert TaskCheckpointExport().rebuilds(trainer(strategy)) == (expected is not None)
    single = trainer(SingleDeviceStrategy(device="cpu"))
    assert not TaskCheckpointExport().rebuilds(single) and TaskCheckpointExport(rebuild=True).rebuilds(single)
    assert not TaskCheckpointExport(rebuild=False).rebuilds(trainer(FSDPStrategy()))
