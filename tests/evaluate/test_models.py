"""The models an evaluation scores (src/evaluate/models.py) through the Lightning loops (loop.py):
one shared base with weight swapping, task and merged weight states, ``load_merged``.

Every value is compared with a computation that bypasses the evaluation stage: PEFT's own adapter
loading, ``load_task_model``, a fresh base with the updates added, plain loops.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from src.evaluate import EvaluationError, ModelBank, load_merged
from src.evaluate.loop import Evaluator, split_loader
from src.evaluate.models import datamodule_of
from src.merge import merge

from .conftest import TASKS, labels_of, loop_accuracy, loop_logits, plain_module, split_batches

LAM = 0.6


@pytest.fixture(scope="module")
def bank(demo_tasks):
    return ModelBank([demo_tasks[t] for t in TASKS])


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(accelerator="cpu", progress=False)


@pytest.fixture(scope="module")
def loaders(bank):
    """(task, split) -> the DataLoader the evaluation stage builds from task.json."""
    out = {}
    for t in bank.tasks:
        dm = datamodule_of(bank.infos[t], bank.task_dirs[t])
        for split in ("val", "test"):
            out[t, split] = split_loader(dm, split)
    return out


@pytest.fixture(scope="module")
def merged(demo_tasks, bank, tmp_path_factory):
    """Task arithmetic (lam 0.6) of the three tasks, written four ways."""
    root = tmp_path_factory.mktemp("merged")
    dirs = [demo_tasks[t] for t in TASKS]
    base_dir = root / "base"
    bank.modules[TASKS[0]].load_base().save_pretrained(base_dir)  # a base model directory
    kw = dict(params={"lam": LAM}, progress=False)
    merge("task_arithmetic", dirs, output=root / "adapter", save_as="adapter", **kw)
    merge("task_arithmetic", dirs, base=bank.base_state(), output=root / "dense_sd", save_as="safetensors", **kw)
    merge("task_arithmetic", dirs, base=str(base_dir), output=root / "dense_dir", save_as="safetensors", **kw)
    merge("task_arithmetic", dirs, output=root / "updates", save_as="safetensors", **kw)  # no base: dW
    merge("task_arithmetic", dirs[:2], output=root / "two_tasks", save_as="adapter", **kw)
    return {name: root / name for name in ("adapter", "dense_sd", "dense_dir", "updates", "two_tasks")}


def base_snapshot(bank) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bank.base.state_dict().items()}


def assert_bit_identical(bank, snapshot) -> None:
    now = bank.base.state_dict()
    assert now.keys() == snapshot.keys()
    changed = [k for k, v in now.items() if not torch.equal(v, snapshot[k])]
    assert not changed, f"base tensors changed: {changed[:5]}"


def predict(bank, evaluator, loaders, task, state, split="test"):
    with bank.weights(state, "test"):
        return evaluator.predict(bank.modules[task], loaders[task, split])


# ----- 1. merged adapter == dense W0 + dW == PEFT ---------------------------------------------
def test_merged_adapter_equals_dense_weights_and_peft(bank, evaluator, loaders, merged, demo_tasks):
    from peft import PeftModel

    info = json.loads((merged["adapter"] / "merge.json").read_text())
    assert info["save_as"] == "adapter"
    for name in ("dense_sd", "dense_dir"):
        dense = json.loads((merged[name] / "merge.json").read_text())
        assert dense["save_as"] == "safetensors" and dense["complete_model"] and dense["contents"] == "weights"
    assert (merged["dense_dir"] / "config.json").is_file()  # complete model: the base's files copied

    adapter_state = bank.merged_state(merged["adapter"])
    lora_targets = {k for k in bank.base.state_dict() if k.startswith("encoder.layer.") and
                    any(m in k for m in (".query.weight", ".key.weight", ".value.weight", "attention.output.dense.weight"))}
    assert set(adapter_state) == lora_targets
    for name in ("dense_sd", "dense_dir"):
        dense_state = bank.merged_state(merged[name])
        assert set(dense_state) == lora_targets  # unmerged tensors equal the base: not swapped
        for k in lora_targets:
            torch.testing.assert_close(dense_state[k], adapter_state[k], atol=1e-6, rtol=1e-6)

    moved = 0
    for task in TASKS:
        logits_a, labels = predict(bank, evaluator, loaders, task, adapter_state)
        zeroshot, _ = predict(bank, evaluator, loaders, task, None)
        moved += not torch.allclose(logits_a, zeroshot, atol=1e-3)
        for name in ("dense_sd", "dense_dir"):
            state = bank.merged_state(merged[name], task)
            logits_d, labels_d = predict(bank, evaluator, loaders, task, state)
            torch.testing.assert_close(logits_d, logits_a, atol=1e-5, rtol=1e-5)
            assert torch.equal(labels_d, labels)
            for split in ("val", "test"):
                with bank.weights(adapter_state):
                    acc_a = evaluator.metrics(bank.modules[task], loaders[task, split], split)
                with bank.weights(state):
                    acc_d = evaluator.metrics(bank.modules[task], loaders[task, split], split)
                assert acc_a.metrics["acc"] == pytest.approx(acc_d.metrics["acc"], abs=1e-6)
                assert acc_a.n == acc_d.n == len(loaders[task, split].dataset)

        # PEFT's own loading of the merged adapter on a fresh base, the task's head, a plain loop
        batches = split_batches(demo_tasks[task], "test")
        module = plain_module(demo_tasks[task])
        module.model = PeftModel.from_pretrained(module.load_base(), str(merged["adapter"]), is_trainable=False).eval()
        peft_logits = loop_logits(module, batches)
        assert torch.equal(labels_of(batches), labels)
        torch.testing.assert_close(logits_a, peft_logits, atol=1e-4, rtol=1e-4)
        with bank.weights(adapter_state):
            acc = evaluator.metrics(bank.modules[task], loaders[task, "test"], "test").metrics["acc"]
        assert acc == pytest.approx(loop_accuracy(module, batches), abs=1e-6)
    assert moved == len(TASKS)  # the merge changes every task's logits: the comparisons above mean something


# ----- 2. swapping leaves the base bit-identical ------------------------------------------------
def test_swapping_restores_the_base_bit_for_bit(bank, evaluator, loaders, merged):
    task = TASKS[0]
    for module in bank.modules.values():
        assert module.model is bank.base  # one base for every task
    snapshot = base_snapshot(bank)
    zeroshot, _ = predict(bank, evaluator, loaders, task, None)

    state = bank.merged_state(merged["adapter"])
    with bank.weights(state):
        now = bank.base.state_dict()
        assert all(not torch.equal(now[k], snapshot[k]) for k in state)  # really swapped in
        swapped, _ = evaluator.predict(bank.modules[task], loaders[task, "test"])
    assert not torch.allclose(swapped, zeroshot, atol=1e-3)
    assert_bit_identical(bank, snapshot)

    for _ in range(2):  # one state after another: each starts from the pristine base
        with bank.weights(bank.task_state(TASKS[1])):
            pass
        assert_bit_identical(bank, snapshot)

    with pytest.raises(RuntimeError, match="boom"):
        with bank.weights(state):
            assert not torch.equal(bank.base.state_dict()[next(iter(state))], snapshot[next(iter(state))])
            raise RuntimeError("boom")
    assert_bit_identical(bank, snapshot)

    # a state that fails half-way (a valid tensor copied, then an unknown name) is undone as well
    first = next(iter(state))
    broken = {first: state[first], "encoder.no_such.weight": torch.zeros(2)}
    with pytest.raises(EvaluationError, match="no_such"):
        with bank.weights(broken, "broken"):
            pass
    assert_bit_identical(bank, snapshot)
    again, _ = predict(bank, evaluator, loaders, task, None)
    assert torch.equal(again, zeroshot)


# ----- 3. task_state reproduces load_task_model ---------------------------------------------
def test_task_state_reproduces_load_task_model(bank, evaluator, loaders, demo_tasks):
    from src.finetune.load import load_task_model

    for task in TASKS:
        state = bank.task_state(task)
        logits, labels = predict(bank, evaluator, loaders, task, state)
        zeroshot, _ = predict(bank, evaluator, loaders, task, None)
        assert not torch.allclose(logits, zeroshot, atol=1e-3)
        batches = split_batches(demo_tasks[task], "test")
        reference = load_task_model(demo_tasks[task])  # PEFT-wrapped: LoRA applied by PEFT
        assert hasattr(reference.model, "peft_config")
        torch.testing.assert_close(logits, loop_logits(reference, batches), atol=1e-4, rtol=1e-4)
        assert torch.equal(labels, labels_of(batches))
        for split in ("val", "test"):
            with bank.weights(state):
                acc = evaluator.metrics(bank.modules[task], loaders[task, split], split).metrics["acc"]
            assert acc == pytest.approx(loop_accuracy(reference, split_batches(demo_tasks[task], split)), abs=1e-6)


# ----- 6. clear errors ---------------------------------------------------------------------
def test_merged_directory_of_another_base_is_refused(bank, merged, tmp_path):
    edited = tmp_path / "other_base"
    shutil.copytree(merged["adapter"], edited)
    info = json.loads((edited / "merge.json").read_text())
    assert info["base_model_id"] == bank.base_model_id
    info["base_model_id"] = "someone/another-model"
    (edited / "merge.json").write_text(json.dumps(info))
    with pytest.raises(EvaluationError, match="merge.json") as e:
        bank.merged_state(edited)
    assert "someone/another-model" in str(e.value) and e.value.path == str(edited / "merge.json")
    with pytest.raises(EvaluationError, match="merge.json"):
        load_merged(edited, TASKS[0])


def test_task_missing_from_the_merge_is_named(bank, merged):
    bank.merged_state(merged["two_tasks"], TASKS[0])  # a merged task: fine
    with pytest.raises(EvaluationError, match="merge.json") as e:
        bank.merged_state(merged["two_tasks"], TASKS[2])
    assert repr(TASKS[2]) in str(e.value)
    for t in TASKS[:2]:
        assert t in str(e.value)  # the merged tasks are listed


def test_load_merged_unknown_task_lists_the_merged_tasks(merged):
    with pytest.raises(EvaluationError, match="nonexistent_task") as e:
        load_merged(merged["adapter"], "nonexistent_task")
    assert "merge.json" in str(e.value)
    for t in TASKS:
        assert t in str(e.value)


# ----- 7. load_merged == the ModelBank path ----------------------------------------------------
def test_load_merged_equals_the_bank(bank, evaluator, loaders, merged, demo_tasks):
    snapshot = base_snapshot(bank)
    for task in (TASKS[0], TASKS[2]):
        want, _ = predict(bank, evaluator, loaders, task, bank.merged_state(merged["adapter"], task))
        batches = split_batches(demo_tasks[task], "test")
        for how in (task, demo_tasks[task]):  # by merged-task name or by task directory
            module = load_merged(merged["adapter"], how)
            assert not module.training and module.label_names == bank.modules[task].label_names
            torch.testing.assert_close(loop_logits(module, batches), want, atol=1e-5, rtol=1e-5)
        module = load_merged(merged["dense_dir"], task)
        torch.testing.assert_close(loop_logits(module, batches), want, atol=1e-5, rtol=1e-5)
    assert_bit_identical(bank, snapshot)  # load_merged builds its own base


# ----- 9. merge.json and the no-base dense merge ------------------------------------------------
def test_merge_json_records_inputs_and_updates_layout(bank, merged, demo_tasks):
    from src.task_checkpoint import read_task_info

    for name in ("adapter", "dense_sd", "updates"):
        info = json.loads((merged[name] / "merge.json").read_text())
        assert [t["task"] for t in info["tasks"]] == list(TASKS)
        for entry, task in zip(info["tasks"], TASKS):
            assert entry["path"] == str(demo_tasks[task])  # the task directory, not .../adapter
            assert not entry["path"].rstrip("/").endswith("adapter")
            recorded = read_task_info(demo_tasks[task])
            assert entry["base_model"] == recorded.base_model == bank.base_model_id
            assert entry["family"] == "demo-text"
            assert entry["label_names"] == list(recorded.label_names)
            assert entry["kind"] == "lora"

    out = merged["updates"]
    info = json.loads((out / "merge.json").read_text())
    assert info["save_as"] == "safetensors" and info["contents"] == "updates" and info["partial"] is True
    assert info["complete_model"] is False
    assert (out / "updates.safetensors").is_file()
    assert not list(out.glob("model*.safetensors*"))  # nothing a loader could mistake for weights

    from safetensors.torch import load_file

    updates = load_file(str(out / "updates.safetensors"))
    adapter_state = bank.merged_state(merged["adapter"])
    assert set(updates) == set(adapter_state)
    dense = bank.merged_state(out)
    assert set(dense) == set(adapter_state)
    for k, v in dense.items():
        torch.testing.assert_close(v, adapter_state[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, bank.swap.original(k) + updates[k], atol=1e-6, rtol=1e-6)  # W0 + dW
        assert not torch.allclose(v, bank.swap.original(k))
