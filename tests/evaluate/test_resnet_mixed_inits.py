"""Experiment E in the evaluation stage: two tiny ResNet-20 task models trained (a few steps) from
DIFFERENT initializations (init_seed 0 and 1) on the two halves of one CIFAR-10 class split
(``split_seed``), on a tiny CIFAR-10-like dataset written here (tests/finetune/test_resnet_cifar.py).

``ModelBank(mixed_inits=True)`` loads one base network (the first task's initialization) and swaps
in each task model's WHOLE network, its projection ``proj`` into the text-embedding width included;
heads are the frozen text embeddings only. Checked against ``load_task_model`` (each model on its
own initialization) and, for the run's Ensemble and joint rows, against the joint head computed
here from the two heads' text embeddings (no per-task projection anywhere).
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from src.evaluate import EvalConfig, EvaluationError, EvaluationRun, JointSpec, ModelBank  # noqa: E402
from src.finetune.data.cifar import CifarSubsetDataModule  # noqa: E402
from src.finetune.export import datamodule_hparams, export_task_checkpoint  # noqa: E402
from src.finetune.load import load_task_model  # noqa: E402
from src.finetune.models.resnet import ResNetClassifier  # noqa: E402
from src.finetune.optim import OptimSpec  # noqa: E402
from src.task_checkpoint import read_task_info  # noqa: E402

from tests.finetune.conftest import TINY_CLIP, fit_losses  # noqa: E402
from tests.finetune.test_resnet_cifar import write_tiny_cifar10  # noqa: E402

SPLIT_SEED = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """``{task: task-checkpoint directory}``: half h of class split SPLIT_SEED, init_seed h."""
    root = tmp_path_factory.mktemp("E")
    data_root = write_tiny_cifar10(root / "data")
    dirs = {}
    for half in (0, 1):
        dm = CifarSubsetDataModule("cifar10", subset=half, num_subsets=2, data_root=str(data_root), batch_size=16,
                                   num_workers=0, split_seed=SPLIT_SEED)
        module = ResNetClassifier(width=1, clip_config=copy.deepcopy(TINY_CLIP), embed_dim=TINY_CLIP["projection_dim"],
                                  init_seed=half, optim=OptimSpec(optimizer="sgd", lr=0.05, momentum=0.9,
                                                                  weight_decay=0.0, scheduler="constant"))
        fit_losses(module, dm, steps=12)  # the whole network learns, BatchNorm statistics included
        dirs[dm.task] = export_task_checkpoint(module, root / "tasks" / dm.task, dm.task,
                                               extra_hparams={"datamodule": datamodule_hparams(dm)})
    return dirs


def half_test_batches(task_dir) -> list[dict]:
    """The test split of the datamodule that ``task.json`` records, built directly."""
    spec = read_task_info(task_dir).hparams["datamodule"]
    dm = CifarSubsetDataModule(**spec["init_args"])
    dm.setup("test")
    return list(dm.test_dataloader())


def logits_of(module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module.logits(b) for b in batches])


def test_bank_serves_each_model_with_its_own_network_and_projection(pair):
    tasks = list(pair)
    assert tasks == [f"cifar10-split{SPLIT_SEED}-0of2", f"cifar10-split{SPLIT_SEED}-1of2"]
    infos = {t: read_task_info(d) for t, d in pair.items()}
    assert infos[tasks[0]].base_model != infos[tasks[1]].base_model  # two initializations
    with pytest.raises(EvaluationError, match="one base per evaluation"):
        ModelBank(list(pair.values()))
    bank = ModelBank(list(pair.values()), mixed_inits=True)
    assert bank.tasks == tasks
    base_proj = bank.base.proj.weight.detach().clone()
    for t in tasks:
        module = bank.modules[t]
        assert set(module.head_state_dict()) == {"weight", "logit_scale"}  # the text head only
        assert set(load_file(str(pair[t] / "head.safetensors"))) == {"weight", "logit_scale"}
        state = bank.task_state(t)
        assert {"proj.weight", "proj.bias"} <= set(state)  # the projection comes with the network
        assert not torch.equal(state["proj.weight"], base_proj)
        batches = half_test_batches(pair[t])
        want = logits_of(load_task_model(pair[t]), batches)  # its own initialization, loaded alone
        with bank.weights(state, "test"):
            got = logits_of(module, batches)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(bank.base.proj.weight, base_proj)  # restored
        with bank.weights(None):
            assert not torch.allclose(logits_of(module, batches), want, atol=1e-3)  # the swapped weights matter
    # the second model's network differs from the first model's init everywhere, not only in proj
    second = bank.task_state(tasks[1])
    assert not torch.allclose(second["conv1.weight"], bank.base.conv1.weight, atol=1e-3)


def test_run_scores_references_ensemble_and_joint_head_without_a_projection(pair, tmp_path):
    tasks = list(pair)
    config = EvalConfig(experiment="E_tiny", tasks=[str(pair[t]) for t in tasks], protocol=None, methods=[],
                        rows=str(tmp_path / "rows.jsonl"), ensemble=True, zeroshot=False,
                        joint=JointSpec(enabled=True, ks=[1]), progress=False, report=False)
    run = EvaluationRun(config)
    rows = run.run()

    models = {t: load_task_model(pair[t]) for t in tasks}
    heads = {t: load_file(str(pair[t] / "head.safetensors")) for t in tasks}
    batches = {t: half_test_batches(pair[t]) for t in tasks}
    labels = {t: torch.cat([b["labels"] for b in batches[t]]) for t in tasks}
    # each model's network output (its own proj included) on every test set
    feats = {(m, t): torch.cat([models[m].features(b["pixel_values"]).detach() for b in batches[t]])
             for m in tasks for t in tasks}

    for m in tasks:  # every model through every half's text head (what the Ensemble compares), logit by logit
        for t in tasks:
            logits, got_labels = run._logits(m, t, t)
            want = heads[t]["logit_scale"].exp() * F.normalize(feats[m, t].float(), dim=-1) @ heads[t]["weight"].T
            torch.testing.assert_close(logits.float(), want, atol=1e-4, rtol=1e-4)
            assert torch.equal(got_labels, labels[t])
    for t in tasks:  # references: each model on its own half
        (row,) = [r for r in rows if r["method"] == "finetuned" and r["task"] == t and r["split"] == "test"]
        want = (logits_of(models[t], batches[t]).argmax(-1) == labels[t]).float().mean().item()
        assert row["value"] == pytest.approx(want, abs=1e-6) and row["n"] == len(labels[t])

    # the joint head: both halves' text embeddings stacked (5 + 5 rows), each model with its own scale
    (joint_row,) = [r for r in rows if r["task"] == "joint" and r["dataset"] == "union"]
    joint_module = run.joint_module(tasks[0])
    assert set(joint_module.head_state_dict()) == {"weight", "logit_scale"}
    weight = torch.cat([heads[t]["weight"] for t in tasks])
    torch.testing.assert_close(joint_module.head_state_dict()["weight"], weight, atol=0, rtol=0)
    targets = torch.cat([labels[tasks[0]], labels[tasks[1]] + len(heads[tasks[0]]["weight"])])
    probs = []
    for m in tasks:
        f = F.normalize(torch.cat([feats[m, t] for t in tasks]).float(), dim=-1)
        probs.append((heads[m]["logit_scale"].exp() * f @ weight.T).softmax(-1))
    pooled = torch.stack(probs).amax(0)  # the Ensemble's per-class max over the two models
    want = (pooled.argmax(-1) == targets).float().mean().item()
    assert joint_row["method"] == "ensemble" and joint_row["metric"] == "hits@1"
    assert joint_row["value"] == pytest.approx(want, abs=1e-6) and joint_row["n"] == len(targets)
    # not a trivial number: the two models disagree somewhere on the pooled test images
    assert not torch.equal(probs[0].argmax(-1), probs[1].argmax(-1))
