"""CLIP image classifiers (tiny CLIPConfig models with random weights; no hub)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from src.finetune.export import export_task_checkpoint
from src.finetune.load import load_task_model
from src.finetune.models.clip import ByteTokenizer
from src.task_checkpoint import read_task_info


def _batch(dm, split="val"):
    return next(iter(getattr(dm, f"{split}_dataloader")()))


def test_head_equals_hand_computation(built_clip, toy_dm):
    module = built_clip("lora")
    base = module.unwrapped_model()
    tc = base.config.text_config
    tok = ByteTokenizer(tc.vocab_size, tc.bos_token_id, tc.eos_token_id, tc.pad_token_id, tc.max_position_embeddings)
    rows = []
    with torch.no_grad():
        for name in toy_dm.label_names:
            embs = []
            for template in toy_dm.templates:
                ids = torch.tensor([tok.encode(template.format(name))])
                hidden = base.text_model(input_ids=ids).last_hidden_state[0, -1]  # eos is the last token
                embs.append(F.normalize(base.text_projection(hidden), dim=-1))
            rows.append(F.normalize(torch.stack(embs).mean(0), dim=-1))
    expected = torch.stack(rows)
    torch.testing.assert_close(module.head, expected, atol=1e-5, rtol=1e-5)

    # logits = exp(logit_scale) * normalized image features @ head^T
    batch = _batch(toy_dm)
    with torch.no_grad():
        pooled = base.vision_model(pixel_values=batch["pixel_values"]).pooler_output
        feats = F.normalize(base.visual_projection(pooled), dim=-1)
        want = base.logit_scale.exp() * feats @ expected.T
        got = module.eval().logits(batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lora_targets_vision_tower_only(built_clip):
    module = built_clip("lora")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("vision_model" in n and "lora_" in n for n in trainable)
    n_layers = module.unwrapped_model().config.vision_config.num_hidden_layers
    wrapped = {n.split(".lora_")[0] for n in trainable}
    assert len(wrapped) == 4 * n_layers  # q, k, v, out projections of every vision layer
    assert not any("text_model" in n or "visual_projection" in n for n in wrapped)


def test_full_finetune_trains_vision_tower_only(built_clip):
    module = built_clip("full")
    base = module.unwrapped_model()
    assert all(p.requires_grad for p in base.vision_model.parameters())
    assert not any(p.requires_grad for p in base.text_model.parameters())
    assert not base.visual_projection.weight.requires_grad
    assert not base.text_projection.weight.requires_grad and not base.logit_scale.requires_grad


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_training_steps_lower_the_loss(finetune, make_clip, toy_dm, quiet_trainer):
    from src.finetune.base import OptimSpec

    module = make_clip(finetune, optim=OptimSpec(lr=1e-2 if finetune == "lora" else 1e-3, weight_decay=0.0,
                                                 scheduler="constant"))
    trainer = quiet_trainer(max_steps=12, limit_val_batches=0)
    batch = next(iter(toy_dm.train_dataloader()))
    trainer.fit(module, datamodule=toy_dm)  # setup builds the model
    # compare against a freshly built, untrained copy on the same batch
    fresh = make_clip(finetune)
    fresh.label_names = list(toy_dm.label_names)
    fresh.build_model(fresh.label_names, toy_dm.templates)
    with torch.no_grad():
        before = fresh.eval().loss(fresh.logits(batch), batch["labels"]).item()
        after = module.eval().loss(module.logits(batch), batch["labels"]).item()
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_reload_reproduces_logits(finetune, built_clip, toy_dm, tmp_path):
    module = built_clip(finetune)
    # move the trained weights away from their initial values (LoRA B starts at zero)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = _batch(toy_dm)
    with torch.no_grad():
        want = module.eval().logits(batch)
    out = export_task_checkpoint(module, tmp_path / "toy", "toy", {"finetuned": {"val_acc": 0.5}})
    loaded = load_task_model(out)
    with torch.no_grad():
        got = loaded.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loaded.label_names == toy_dm.label_names
    # and the untrained base gives different logits: the weights really were loaded
    base_only = built_clip(finetune)
    with torch.no_grad():
        assert not torch.allclose(base_only.eval().logits(batch), want, atol=1e-3)


def test_adapter_keys_map_to_base_names(built_clip, tmp_path):
    module = built_clip("lora")
    out = export_task_checkpoint(module, tmp_path / "toy", "toy")
    base_names = set(module.load_base().state_dict())  # a plain (unwrapped) base model
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys
    for key in keys:
        assert key.startswith("base_model.model.vision_model."), key
        module_path, part = key[len("base_model.model."):].rsplit(".lora_", 1)
        assert part in ("A.weight", "B.weight"), key
        assert f"{module_path}.weight" in base_names, key
    assert any(k.endswith("layers.0.self_attn.q_proj.lora_A.weight") for k in keys)


def test_full_keys_are_base_state_dict_names(built_clip, tmp_path):
    module = built_clip("full")
    out = export_task_checkpoint(module, tmp_path / "toy", "toy")
    state = load_file(str(out / "model.safetensors"))
    base_state = module.unwrapped_model().state_dict()
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert all(k.startswith("vision_model.") for k in state)
    assert set(state) == {k for k in base_state if k.startswith("vision_model.")}
    for k, v in state.items():
        assert v.shape == base_state[k].shape
    info = read_task_info(out)
    assert info.kind == "full" and info.family == "clip-hf"


def test_base_is_reproducible_from_config(make_clip):
    a, b = make_clip("lora").load_base(), make_clip("lora").load_base()
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    c = make_clip("lora", init_seed=1)
    assert c.base_model_id != make_clip("lora").base_model_id


# ----- open_clip (optional extra; not installed in the CPU environment) -----------------------
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}


def _open_clip_module(finetune):
    from src.finetune.base import OptimSpec
    from src.finetune.models.clip import ClipClassifier

    return ClipClassifier(pretrained="tiny-open-clip", backend="open_clip", finetune=finetune,
                          model_config=TINY_OPEN_CLIP, optim=OptimSpec(lr=1e-3, weight_decay=0.0))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is an optional extra")
def test_open_clip_full_export_reload(toy_dm, tmp_path):
    import open_clip  # noqa: F401

    module = _open_clip_module("full")
    module.label_names = list(toy_dm.label_names)
    module.build_model(module.label_names, toy_dm.templates)
    assert module.family == "clip-open_clip"
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.visual.") for n in trainable)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    batch = _batch(toy_dm)
    with torch.no_grad():
        want = module.eval().logits(batch)
    out = export_task_checkpoint(module, tmp_path / "toy", "toy")
    state = load_file(str(out / "model.safetensors"))
    assert all(k.startswith("visual.") for k in state)
    with torch.no_grad():
        got = load_task_model(out).logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_open_clip_is_imported_only_when_chosen(make_clip):
    import sys

    make_clip("lora").load_base()
    assert "open_clip" not in sys.modules or importlib.util.find_spec("open_clip") is not None
