"""AdaMerging / AdaMerging++ / CART++ (src/evaluate/adamerging.py) on the tiny demo task models.

Checked against computations that bypass the optimiser: the merged model it evaluates is the one
a plain merge with its table gives (bit for bit, in memory and written to disk); its entropies
are those of the evaluation's in-place weight swap and the task modules' own ``logits``; at the
initial coefficients it is the plain merge with ``weights = [0.3, 0.3, 0.3]``.
"""
from __future__ import annotations

import json

import pytest
import torch

from src.evaluate import ModelBank
from src.evaluate.adamerging import KINDS, learn_coefficients
from src.evaluate.loop import split_loader
from src.evaluate.models import datamodule_of
from src.merge import Sweep, merge
from src.merge.coefficients import CoefficientTable

from .conftest import TASKS, loop_logits, split_batches

STEPS, LR, BATCH = 20, 1e-2, 8
# CART low-ranks query / value only: key and output.dense are the plain average, without coefficients
MERGE_PARAMS = {"ta": {}, "ties": {"density": 0.5}, "cart": {"rank": 2, "low_rank_params": "query|value"}}


@pytest.fixture(scope="module")
def bank(demo_tasks):
    return ModelBank([demo_tasks[t] for t in TASKS])


@pytest.fixture(scope="module")
def loaders(bank):
    return {t: split_loader(datamodule_of(bank.infos[t], bank.task_dirs[t]), "test") for t in TASKS}


def plain_merge(bank, method, params):
    """The merged weights of a plain merge of the three task models, applied as the evaluation applies it."""
    sweep = Sweep(method, [bank.task_dirs[t] for t in TASKS], base=bank.base_state(), progress=False)
    return bank.with_updates(sweep.merge(params, as_updates=True))


def swapped_entropy(bank, demo_tasks, state) -> float:
    """Summed mean entropy of the task modules' own logits with ``state`` swapped into the base."""
    total = 0.0
    with bank.weights(state):
        for t in TASKS:
            logits = loop_logits(bank.modules[t], split_batches(demo_tasks[t], "test"))
            total += float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())
    return total


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def results(bank, loaders, tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging")
    out = {}
    for kind in KINDS:
        for layer_wise in (True, False):
            out[kind, layer_wise] = learn_coefficients(
                bank, kind, TASKS, loaders, merge_params=MERGE_PARAMS[kind], output=root / f"{kind}-{layer_wise}.json",
                layer_wise=layer_wise, steps=STEPS, lr=LR, batch_size=BATCH, eval_batches=None)
    return out


@pytest.mark.parametrize("layer_wise", [True, False], ids=["layer-wise", "task-wise"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_entropy_goes_down_and_coefficients_stay_clamped(results, bank, kind, layer_wise):
    r = results[kind, layer_wise]
    assert r.final_entropy < r.initial_entropy
    assert [h["step"] for h in r.history] == list(range(STEPS))
    assert all(set(h["per_task"]) == set(TASKS) for h in r.history)
    table = r.table
    assert table.tasks == list(TASKS)
    values = [v for vs in [table.default, *table.params.values()] for v in vs]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert any(abs(v - 0.3) > 1e-3 for v in values)  # the optimiser moved them
    if kind == "cart":
        assert all(("query" in n or "value" in n) for n in r.learner.names) and len(r.learner.fixed) == 4
    if layer_wise:
        assert set(table.params) == set(r.learner.names) and len(table.params) > 1
        assert len({tuple(v) for v in table.params.values()}) > 1  # tensors learn different coefficients
    else:
        assert table.params == {}
    assert r.learner.coefficients.shape == ((3, len(r.learner.names)) if layer_wise else (3,))


@pytest.mark.parametrize("layer_wise", [True, False], ids=["layer-wise", "task-wise"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_table_reapplied_by_a_plain_merge_is_the_optimised_model(results, bank, demo_tasks, kind, layer_wise):
    r = results[kind, layer_wise]
    assert r.method == KINDS[kind][0] and r.merge_params["coefficients"] == str(r.path)
    assert CoefficientTable.load(r.path).to_dict() == r.table.to_dict()
    optimised = r.learner.merged_state()
    assert_same_weights(plain_merge(bank, r.method, r.merge_params), optimised)
    # its entropy through the evaluation's weight swap and the modules' own logits: functional_call agrees
    assert swapped_entropy(bank, demo_tasks, optimised) == pytest.approx(r.final_entropy, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_initial_model_is_the_plain_merge_at_the_initial_coefficients(results, bank, demo_tasks, kind):
    r = results[kind, True]
    params = {k: v for k, v in r.merge_params.items() if k != "coefficients"}
    initial = plain_merge(bank, r.method, {**params, "weights": [0.3, 0.3, 0.3]})
    assert swapped_entropy(bank, demo_tasks, initial) == pytest.approx(r.initial_entropy, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_written_merges_reproduce_the_optimised_model(results, bank, tmp_path, kind):
    """A merged directory (complete safetensors model) holds the optimised weights. CART computes in
    float64 and a written merge adds ``W0`` before rounding to float32 (MergeEngine.finalize), while
    the evaluation rounds ``dW`` first (ModelBank.with_updates, what the optimiser mirrors): there the
    two differ by at most one float32 rounding; TA and TIES compute in float32 and agree exactly."""
    r = results[kind, True]
    out = tmp_path / kind
    merge(r.method, [bank.task_dirs[t] for t in TASKS], base=bank.base_state(), output=out, params=r.merge_params,
          save_as="safetensors", progress=False)
    assert json.loads((out / "merge.json").read_text())["params"]["coefficients"] == str(r.path)
    written, optimised = bank.merged_state(out), r.learner.merged_state()
    if kind != "cart":
        assert_same_weights(written, optimised)
        return
    assert written.keys() == optimised.keys()
    eps = torch.finfo(torch.float32).eps
    for k in written:
        w0 = bank.swap.original(k)
        bound = eps * (optimised[k].abs() + (optimised[k] - w0).abs())  # the two roundings' worst case
        assert ((written[k] - optimised[k]).abs() <= bound).all(), k
        assert not torch.equal(written[k], w0)


def test_bad_arguments(bank, loaders):
    with pytest.raises(ValueError, match="unknown kind"):
        learn_coefficients(bank, "fisher", TASKS, loaders, steps=0)
    with pytest.raises(ValueError, match="fixed by the algorithm"):
        learn_coefficients(bank, "ties", TASKS, loaders, merge_params={"lam": 0.5}, steps=0)
    with pytest.raises(ValueError, match="clamp"):
        learn_coefficients(bank, "ta", TASKS, loaders, init=1.5, steps=0)
    with pytest.raises(ValueError, match="not in the model bank"):
        learn_coefficients(bank, "ta", ["nope"], loaders, steps=0)
