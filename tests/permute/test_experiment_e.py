"""Experiment E's configs end to end on tiny models: two ResNet-20s (width 1, a tiny random CLIP
text tower) trained a few steps from DIFFERENT initializations on the two halves of one class
split of a tiny CIFAR-10-like dataset, merged by ``python -m src.permute --config
configs/permute/E_mudsc_cifar100.yaml`` (its settings, with tiny example counts) and scored by
``python -m src.evaluate --config configs/evaluate/E_mudsc_cifar100.yaml`` (its methods, pointed
at the tiny run's directories). BatchNorm and GroupNorm models."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from src.finetune.data.cifar import CifarSubsetDataModule
from src.finetune.export import datamodule_hparams, export_task_checkpoint
from src.finetune.models.resnet import ResNetClassifier
from src.finetune.optim import OptimSpec

from tests.finetune.conftest import TINY_CLIP, fit_losses
from tests.finetune.test_resnet_cifar import write_tiny_cifar10

REPO = Path(__file__).resolve().parents[2]
PERMUTE = REPO / "configs" / "permute" / "E_mudsc_cifar100.yaml"
EVALUATE = REPO / "configs" / "evaluate" / "E_mudsc_cifar100.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_cifar10(tmp_path_factory.mktemp("E_data"))


def train_pair(root: Path, data_root: Path, norm: str) -> list[Path]:
    dirs = []
    for half in (0, 1):
        dm = CifarSubsetDataModule("cifar10", subset=half, num_subsets=2, data_root=str(data_root), batch_size=16,
                                   num_workers=0, split_seed=0)
        module = ResNetClassifier(width=1, norm=norm, groups=4, clip_config=copy.deepcopy(TINY_CLIP),
                                  embed_dim=TINY_CLIP["projection_dim"], init_seed=half,
                                  optim=OptimSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                                                  scheduler="constant"))
        fit_losses(module, dm, steps=8)
        dirs.append(export_task_checkpoint(module, root / dm.task, dm.task,
                                           extra_hparams={"datamodule": datamodule_hparams(dm)}))
    return dirs


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_experiment_e_configs_end_to_end(norm, data_root, tmp_path, capsys):
    from src.evaluate.__main__ import main as evaluate_main
    from src.permute.__main__ import main as permute_main

    dirs = train_pair(tmp_path / "tasks", data_root, norm)
    merged = tmp_path / "merged"
    tiny = ["--tasks", json.dumps([str(d) for d in dirs]), "--output", str(merged), "--n_examples", "24",
            "--search_examples", "16", "--reset_examples", "24", "--alpha_grid", "[0.3, 0.7]", "--max_iter", "3",
            "--accelerator", "cpu", "--batch_size", "8", "--data", json.dumps({"data_root": str(data_root)})]
    assert permute_main(["--config", str(PERMUTE)] + tiny) == 0, capsys.readouterr().err[-2000:]
    config = yaml.safe_load(PERMUTE.read_text())
    assert sorted(p.name for p in merged.iterdir() if p.name != "statistics") == sorted(config["methods"])

    for method in ("zipit", "mudsc_align"):
        state = load_file(str(merged / method / "model.safetensors"))
        task0 = load_file(str(dirs[0] / "model.safetensors"))
        assert set(state) == set(task0)
        if norm == "batch":  # statistics recomputed for the merged units, not averaged
            assert not torch.allclose(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))
    info = json.loads((merged / "mudsc_zip" / "merge.json").read_text())
    assert info["params"]["alpha"] in (0.3, 0.7) and info["permutation"]["bn_reset"] is True

    eval_cfg = yaml.safe_load(EVALUATE.read_text())
    methods = [{**m, "path": str(merged / Path(m["path"]).name)} for m in eval_cfg["methods"]]
    rows = tmp_path / "rows.jsonl"
    argv = ["--config", str(EVALUATE), "--tasks", json.dumps([str(d) for d in dirs]), "--methods", json.dumps(methods),
            "--rows", str(rows), "--accelerator", "cpu", "--progress", "false", "--data",
            json.dumps({"data_root": str(data_root)})]
    assert evaluate_main(argv) == 0, capsys.readouterr().err[-2000:]
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    labels = {m["label"] for m in eval_cfg["methods"]}
    joint = {r["label"] for r in lines if r["task"] == "joint" and r["dataset"] == "union" and r["metric"] == "hits@1"}
    assert labels <= joint
    per_task = {(r["label"], r["task"]) for r in lines if r["task"] != "joint" and r["split"] == "test"}
    assert {(label, t) for label in labels for t in ("cifar10-split0-0of2", "cifar10-split0-1of2")} <= per_task
    report = (tmp_path / "report.md").read_text()
    assert "MuDSC Table 1 layout" in report and "| MuDSC-Zip |" in report
