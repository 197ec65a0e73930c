"""Classification metrics of the evaluation stage (src/evaluate/metrics.py), on hand-worked examples
and against independent loop implementations."""
from __future__ import annotations

import math

import pytest
import torch

from src.evaluate.metrics import (
    JointLabelSpace, accuracy, ensemble_joint, ensemble_per_task, group_averages, hits_at_k, joint_hits,
    normalized_accuracy)

KNOTS_DUPLICATES = {"forest", "river", "beach", "bridge", "golf course", "harbor", "industrial area", "mountain",
                    "palace", "parking lot", "runway"}


def ranked_logits(ranks, num_classes, targets):
    """Rows whose gold class (``targets[i]``) has rank ``ranks[i]`` (1 = highest), no ties."""
    rows = []
    for rank, gold in zip(ranks, targets):
        others = [c for c in range(num_classes) if c != gold]
        order = others[: rank - 1] + [gold] + others[rank - 1:]  # classes from highest to lowest
        row = torch.empty(num_classes)
        row[torch.tensor(order)] = torch.arange(num_classes, 0, -1, dtype=torch.float)
        rows.append(row)
    return torch.stack(rows)


def loop_hits(logits, targets, k, equivalent=None):
    """Reference: per example, best score of each distinct label, then is the gold among the top k."""
    hits = 0
    for row, gold in zip(logits.tolist(), targets.tolist()):
        labels = list(range(len(row))) if equivalent is None else equivalent.tolist()
        best = {}
        for c, score in enumerate(row):
            best[labels[c]] = max(best.get(labels[c], -math.inf), score)
        top = sorted(best, key=lambda lab: -best[lab])[:k]
        hits += labels[gold] in top
    return hits / len(targets)


# ----- accuracy / Hits@k -------------------------------------------------------------------------
def test_accuracy_from_logits_and_from_predictions():
    logits = torch.tensor([[2.0, 1, 0], [0, 3, 1], [1, 0, 0.5], [0, 0, 5]])
    assert accuracy(logits, torch.tensor([0, 1, 2, 2])) == pytest.approx(0.75)  # arg-max 0 1 0 2
    assert accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([3, 3]), torch.tensor([3, 0])) == pytest.approx(0.5)  # micro, not per class
    # sample-weighted: 9 of 10 right on a big class, 0 of 1 on a small one -> 9/11 (macro would be 0.45)
    preds, targets = torch.tensor([0] * 9 + [1] + [0]), torch.tensor([0] * 10 + [1])
    assert accuracy(preds, targets) == pytest.approx(9 / 11)
    with pytest.raises(TypeError):
        accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        accuracy(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        accuracy(logits, torch.tensor([0, 1, 2, 3]))  # class 3 of 3 classes


def test_hits_at_k_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1], [5, 4, 3, 2, 1], [1, 2, 3, 4, 5], [0, 9, 0.5, 0.2, 0.1]])
    targets = torch.tensor([0, 2, 0, 3])  # gold ranks 1, 3, 5, 3
    assert hits_at_k(logits, targets) == pytest.approx({1: 0.25, 3: 0.75, 5: 1.0})
    assert hits_at_k(logits, targets, ks=(2, 4, 10)) == pytest.approx({2: 0.25, 4: 0.75, 10: 1.0})
    assert hits_at_k(logits, targets, ks=(1,))[1] == accuracy(logits, targets)
    with pytest.raises(ValueError):
        hits_at_k(logits, targets, ks=(0,))
    with pytest.raises(ValueError):
        hits_at_k(logits, torch.tensor([0, 1, 2, 5]))


def test_hits_at_k_by_string_takes_top_k_over_distinct_labels():
    space = JointLabelSpace.from_tasks({"a": ["forest", "river"], "b": ["Forest", "lake", "river "]})
    equivalent = space.canonical("string")
    assert equivalent.tolist() == [0, 1, 0, 3, 1]
    logits = torch.tensor([
        [0.1, 0.2, 0.9, 0.8, 0.7],  # gold forest (id 0, lowest score); "Forest" (id 2) is the best class
        [0.9, 0.8, 0.85, 0.1, 0.7],  # gold lake: 5th of 5 ids, but 3rd of the 3 distinct labels
        [0.0, 0.95, 0.1, 0.2, 0.3],  # gold "river " (id 4): river (id 1) is the best class
    ])
    targets = torch.tensor([0, 3, 4])
    assert hits_at_k(logits, targets, ks=(1, 2, 3)) == pytest.approx({1: 0.0, 2: 1 / 3, 3: 1 / 3})
    by_string = hits_at_k(logits, targets, ks=(1, 2, 3), equivalent=equivalent)
    assert by_string == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})
    # top 3 *ids* would be forest, Forest, river: lake missed. Distinct labels: forest, river, lake.
    assert hits_at_k(logits, targets, ks=(1,), equivalent=torch.arange(5)) == hits_at_k(logits, targets, ks=(1,))


@pytest.mark.parametrize("chunk", [8192, 7])  # rows per torchmetrics update: one chunk, or uneven chunks
def test_hits_at_k_matches_a_loop_reference_on_random_scores(chunk, monkeypatch):
    import src.evaluate.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g)
    targets = torch.randint(0, 12, (200,), generator=g)
    equivalent = torch.tensor([0, 1, 2, 0, 4, 1, 6, 7, 7, 7, 10, 2])
    for eq in (None, equivalent):
        ours = hits_at_k(logits, targets, ks=(1, 3, 5), equivalent=eq)
        for k in (1, 3, 5):
            assert ours[k] == pytest.approx(loop_hits(logits, targets, k, eq)), (k, eq)
    assert hits_at_k(logits, targets, ks=(7,), equivalent=equivalent)[7] == 1.0  # 7 distinct labels


# ----- joint label space ---------------------------------------------------------------------------
def test_knots_joint_label_file():
    space = JointLabelSpace.from_file()
    assert space.num_labels == len(space.names) == 748
    assert space.order == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397"]
    assert space.aliases == {"svhn": "mnist"}
    assert space.offset("cars") == 0 and space.offset("sun397") == 351 and space.offset("svhn") == 296
    assert space.task_to_joint("svhn", 10).tolist() == list(range(296, 306))
    assert space.task_to_joint("mnist").tolist() == list(range(296, 306))
    assert [space.names[i] for i in space.task_to_joint("svhn")] == [str(d) for d in range(10)]
    assert space.size("sun397") == 397 and space.size("resisc45") == 45
    assert set(space.duplicates()) == KNOTS_DUPLICATES and len(space.duplicates()) == 11
    canonical = space.canonical("string")
    for name in KNOTS_DUPLICATES:
        ids = [i for i, n in enumerate(space.names) if n.lower() == name]
        assert len(ids) >= 2 and {int(canonical[i]) for i in ids} == {ids[0]}
        assert len({space.tasks[i] for i in ids}) == len(ids)  # each repeat comes from another task
    repeats = sum(n - 1 for n in [sum(1 for x in space.names if x.lower() == d) for d in KNOTS_DUPLICATES])
    assert len(torch.unique(canonical)) == 748 - repeats
    assert torch.equal(space.canonical("id"), torch.arange(748))
    with pytest.raises(ValueError):
        space.task_to_joint("svhn", 11)
    with pytest.raises(KeyError):
        space.offset("imagenet")
    with pytest.raises(ValueError):
        space.canonical("name")


def test_joint_space_from_tasks_with_an_alias_and_its_joint_head():
    labels = {"a": ["x", "y"], "b": ["Y ", "z", "w"], "c": ["x", "y"]}
    space = JointLabelSpace.from_tasks(labels, aliases={"c": "a"})
    assert space.names == ["x", "y", "Y ", "z", "w"] and space.order == ["a", "b"]
    assert space.offset("b") == 2 and space.offset("c") == 0
    assert space.task_to_joint("b", 3).tolist() == [2, 3, 4]
    assert space.canonical("string").tolist() == [0, 1, 1, 3, 4]
    assert space.duplicates() == ["y"]
    heads = {"a": torch.randn(2, 4), "b": torch.randn(3, 4), "c": torch.randn(2, 4)}
    joint = space.joint_head(heads)
    assert joint.shape == (5, 4)
    assert torch.equal(joint[:2], heads["a"]) and torch.equal(joint[2:], heads["b"])  # "c" adds nothing
    features = torch.randn(6, 4)  # joint logits = every task's logits side by side
    torch.testing.assert_close(features @ joint.T, torch.cat([features @ heads["a"].T, features @ heads["b"].T], 1))
    with pytest.raises(KeyError):
        space.joint_head({"a": heads["a"]})
    with pytest.raises(ValueError):
        space.joint_head({**heads, "b": torch.randn(2, 4)})
    with pytest.raises(ValueError):
        space.joint_head({**heads, "c": torch.randn(3, 4)})
    with pytest.raises(ValueError):
        space.joint_head({**heads, "b": torch.randn(3, 5)})
    with pytest.raises(KeyError):
        space.joint_head({**heads, "d": torch.randn(1, 4)})
    with pytest.raises(ValueError):
        JointLabelSpace.from_tasks({"a": ["x"], "c": ["x", "y"]}, aliases={"c": "a"})
    with pytest.raises(ValueError):
        JointLabelSpace.from_tasks({"a": ["x"]}, aliases={"c": "b"})


def test_joint_hits_union_and_per_dataset():
    targets = torch.tensor([0, 3, 1, 4, 2, 1])
    logits = ranked_logits([1, 2, 1, 3, 4, 1], 5, targets)
    datasets = ["a", "b", "a", "c", "b", "a"]
    out = joint_hits(logits, targets, datasets, ks=(1, 3))
    assert out["union"] == pytest.approx({1: 3 / 6, 3: 5 / 6})
    assert out["per_dataset"] == {"a": pytest.approx({1: 1.0, 3: 1.0}), "b": pytest.approx({1: 0.0, 3: 0.5}),
                                  "c": pytest.approx({1: 0.0, 3: 1.0})}
    assert list(out["per_dataset"]) == ["a", "b", "c"]
    assert out["n"] == {"union": 6, "a": 3, "b": 2, "c": 1}
    # union = the sample-weighted mean of the datasets
    for k in (1, 3):
        weighted = sum(out["n"][d] * out["per_dataset"][d][k] for d in "abc") / 6
        assert out["union"][k] == pytest.approx(weighted)
    assert joint_hits(logits, targets, datasets)["union"][5] == 1.0  # default ks (1, 3, 5)
    # class 3 named as class 0: example 1 (gold 3, 2nd behind class 0) becomes a hit
    by_string = joint_hits(logits, targets, datasets, ks=(1,), equivalent=torch.tensor([0, 1, 2, 0, 4]))
    assert by_string["union"][1] == pytest.approx(4 / 6)
    assert by_string["per_dataset"]["b"][1] == pytest.approx(0.5) and by_string["per_dataset"]["a"][1] == 1.0
    with pytest.raises(ValueError):
        joint_hits(logits, targets, datasets[:-1])


# ----- normalized accuracy, ensembles, groups --------------------------------------------------------
def test_normalized_accuracy():
    assert normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert normalized_accuracy(0.95, 0.9) == pytest.approx(0.95 / 0.9)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            normalized_accuracy(0.5, bad)


def test_ensembles_pick_the_most_confident_probability_not_the_largest_logit():
    a = torch.tensor([[2.0, 0, 0], [0, 0, 0], [10, 9.9, 0]])
    b = torch.tensor([[0.0, 1, 0], [0, 5, 0], [0, 3, 0]])
    # ex 0: a puts e^2/(e^2+2)=0.787 on 0, b e/(e+2)=0.576 on 1 -> 0
    # ex 2: a's largest logit (10, class 0) has probability 0.525; b puts e^3/(e^3+2)=0.909 on class 1 -> 1
    assert ensemble_per_task([a, b]).tolist() == [0, 1, 1]
    joint = ensemble_joint([a, b])
    expected = torch.stack([a.softmax(-1), b.softmax(-1)]).amax(0)
    torch.testing.assert_close(joint, expected)
    e = math.e
    assert joint[0].tolist() == pytest.approx([e**2 / (e**2 + 2), e / (e + 2), 1 / (e + 2)])
    assert torch.equal(ensemble_per_task([a, b]), joint.argmax(-1))
    assert torch.equal(ensemble_per_task([a]), a.argmax(-1))
    with pytest.raises(ValueError):
        ensemble_joint([a, b[:, :2]])
    with pytest.raises(ValueError):
        ensemble_joint([])


def test_group_averages():
    values = {"t1": 0.8, "t2": 0.6, "t3": 0.5}
    groups = {"t1": "held_in", "t3": "generalization", "t2": "held_in"}
    assert group_averages(values, groups) == pytest.approx({"held_in": 0.7, "generalization": 0.5})
    assert list(group_averages(values, groups)) == ["held_in", "generalization"]
    with pytest.raises(KeyError):
        group_averages({**values, "t4": 1.0}, groups)
    with pytest.raises(KeyError):
        group_averages({"t1": 0.8}, groups)
