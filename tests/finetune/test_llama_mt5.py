"""Llama NLI classifier (LoRA, label masking, adapter export, 4-bit) and mT5 seq2seq task models.

Tiny random models built from configs; a WordLevel tokenizer built in-test for mT5.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from src.finetune.base import LoraSpec  # noqa: E402
from src.finetune.models.llama_nli import LlamaNLIClassifier, build_llama_classifier  # noqa: E402
from src.finetune.models.mt5 import MT5Seq2Seq  # noqa: E402
from src.finetune.optim import OptimSpec  # noqa: E402

from .conftest import fit_losses  # noqa: E402

NLI3 = ["entailment", "neutral", "contradiction"]
NLI2 = ["entailment", "not_entailment"]
LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
FAST = OptimSpec(lr=1e-2, weight_decay=0.0, scheduler="constant")


class BatchesDM(L.LightningDataModule):
    """Pre-collated batches, one per step, plus the label names the task module reads."""

    def __init__(self, batches, label_names, templates=None):
        super().__init__()
        self.batches, self.label_names, self.templates = batches, label_names, templates

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)

    val_dataloader = train_dataloader




# ----- Llama ----------------------------------------------------------------------------
def nli_batch(num_labels, n=8, seed=0):
    """The label is a function of the first token, so a few steps can learn it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, LLAMA["vocab_size"], (n, 6), generator=g)  # 0..2: bos/eos(=pad)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % num_labels}


def llama(**kw):
    kw.setdefault("model_config", LLAMA)
    kw.setdefault("optim", FAST)
    kw.setdefault("lora", LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    kw.setdefault("torch_dtype", "float32")
    return LlamaNLIClassifier(**kw)


@torch.no_grad()
def eval_loss(module, batch):
    module.eval()
    loss = module.loss(module.logits(batch), batch["labels"]).item()
    module.train()
    return loss


@pytest.fixture(scope="module")
def llama_base_dir(tmp_path_factory):
    """A saved tiny base model, so that two modules load the same base weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_base")
    build_llama_classifier("unused", 3, "float32", model_config=LLAMA).save_pretrained(path)
    return str(path)


def test_llama_lora_training_lowers_loss_and_trains_only_lora_and_head():
    batch = nli_batch(3)
    module = llama()  # built by Lightning's setup from the datamodule's label names
    losses = fit_losses(module, BatchesDM([batch] * 12, NLI3), steps=12)
    assert module.label_names == NLI3 and len(losses) == 12
    assert eval_loss(module, batch) < losses[0] - 0.05  # same batch: the first step saw the untrained model
    base = module.load_base().state_dict()
    trained = [k for k, p in module.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in k or "score.modules_to_save" in k for k in trained)
    for name, p in module.model.named_parameters():
        if not p.requires_grad:  # frozen backbone (and the original head) untouched
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(p, base[base_name.replace(".original_module", "")])
    assert not torch.equal(module._head().weight, base["score.weight"])  # the head is trained
    assert all(p.abs().sum() > 0 for k, p in module.model.named_parameters() if "lora_B" in k)
    assert module.model.config.pad_token_id is not None


def test_two_class_masking_never_predicts_missing_label_and_matches_two_class_loss():
    torch.manual_seed(0)
    module = llama()
    module.build_model(NLI2, None)
    head = module.model.get_base_model().score.modules_to_save["default"]
    with torch.no_grad():
        head.weight[2] = head.weight[:2].abs().sum(0) * 100  # the missing slot would win unmasked
    batch = nli_batch(2)
    module.eval()
    logits = module.logits(batch)
    assert logits.shape == (8, 3) and torch.isneginf(logits[:, 2]).all()
    assert (logits.argmax(-1) < 2).all()
    raw = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert (raw.argmax(-1) == 2).any()  # so the mask is what prevents it
    expected = F.cross_entropy(raw[:, :2], batch["labels"])
    torch.testing.assert_close(module.loss(logits, batch["labels"]), expected)
    correct, total = module.evaluate_batch(batch)
    assert correct == (raw[:, :2].argmax(-1) == batch["labels"]).sum() and total == 8
    module.train()
    module.loss(module.logits(batch), batch["labels"]).backward()
    assert head.weight.grad[2].abs().max() == 0 and head.weight.grad[:2].abs().max() > 0


def test_adapter_has_only_backbone_lora_and_reloads_with_head(tmp_path):
    from peft import PeftModel

    module = llama()
    module.build_model(NLI3, None)
    with torch.no_grad():  # a nonzero update and a head that differs from the base's
        for p in module.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    module.save_adapter(tmp_path / "adapter")
    module.save_head(tmp_path / "head.safetensors")

    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    base_names = set(module.load_base().state_dict())
    assert len(adapter) == 2 * 4 * LLAMA["num_hidden_layers"]
    for key in adapter:
        assert key.startswith("base_model.model.model.layers.") and (".lora_A." in key or ".lora_B." in key)
        target = key.removeprefix("base_model.model.").replace(".lora_A", "").replace(".lora_B", "")
        assert target in base_names, key
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["r"] == 4
    head = load_file(str(tmp_path / "head.safetensors"))
    assert set(head) == {"score.weight"} and head["score.weight"].shape == (3, LLAMA["hidden_size"])

    fresh = LlamaNLIClassifier(**module.init_args())  # same config and init_seed: same base weights
    assert fresh.base_model_id == module.base_model_id and "#config-" in fresh.base_model_id
    fresh.model = PeftModel.from_pretrained(fresh.load_base(), str(tmp_path / "adapter"))
    fresh.label_names = list(NLI3)
    fresh.load_head_state_dict(head)
    batch = nli_batch(3)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        expected = module.logits(batch)
        torch.testing.assert_close(fresh.logits(batch), expected)
        with fresh.model.disable_adapter():
            assert not torch.allclose(fresh.logits(batch), expected, atol=1e-3)  # the adapter matters


def test_bf16_base_keeps_a_float32_trainable_head():
    module = llama(torch_dtype="bfloat16")
    module.build_model(NLI3, None)
    assert module._head().weight.dtype == torch.float32 and module._head().weight.requires_grad
    assert module.model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    batch = nli_batch(3)
    logits = module.logits(batch)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    module.loss(logits, batch["labels"]).backward()
    assert module._head().weight.grad is not None


def lora_grads(module, batch):
    module.train()
    module.zero_grad()
    module.loss(module.logits(batch), batch["labels"]).backward()
    return {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_llama_4bit_lora_trains_on_cpu(llama_base_dir):
    import bitsandbytes as bnb

    batch = nli_batch(3)

    def quantized():
        torch.manual_seed(0)
        module = llama(pretrained=llama_base_dir, model_config=None, quantization="4bit")
        module.build_model(NLI3, None)
        assert not isinstance(module._head(), bnb.nn.Linear4bit)
        with torch.no_grad():  # nonzero B, so that gradients reach the lower layers' A
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        return module

    module = quantized()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    expected = lora_grads(module, batch)
    module = quantized()
    before_loss = eval_loss(module, batch)  # an eval pass first, as Lightning's sanity check does
    got = lora_grads(module, batch)
    assert set(got) == set(expected) and any("layers.0." in k for k in got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)
    fit_losses(module, BatchesDM([batch] * 12, NLI3), steps=12)
    after = eval_loss(module, batch)
    assert after == after and after < before_loss - 0.05


# ----- mT5 --------------------------------------------------------------------------------
from tests.conftest import T5_WORDS as WORDS  # noqa: E402 (the tokenizer fixture's vocabulary)




def mt5(tokenizer, label_names, **kw):
    module = MT5Seq2Seq("unused", tokenizer=tokenizer, model_config={**MT5, "vocab_size": len(WORDS) + 3},
                        optim=FAST, max_new_tokens=5, **kw)
    module.build_model(label_names, None)
    return module


def seq2seq_batch(tok, sources, targets):
    enc = tok(sources, padding=True, return_tensors="pt")
    lab = tok(targets, padding=True, return_tensors="pt")
    labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


SOURCES = ["a b c", "d e", "f g h", "a d", "b e f", "c"]


def test_mt5_training_lowers_seq2seq_loss(t5_tokenizer_dir):
    labels = ["yes", "no maybe"]
    module = MT5Seq2Seq("unused", tokenizer=t5_tokenizer_dir, model_config={**MT5, "vocab_size": len(WORDS) + 3},
                        optim=FAST)
    batch = seq2seq_batch(module.tokenizer, SOURCES, [labels[i % 2] for i in range(len(SOURCES))])
    losses = fit_losses(module, BatchesDM([batch] * 10, labels), steps=10)
    assert module.label_names == labels and len(losses) == 10
    module.eval()
    with torch.no_grad():
        loss = module.seq2seq_loss(batch)
        hf_loss = module.model(**batch).loss  # the same objective as transformers' own loss
    torch.testing.assert_close(loss, hf_loss)
    assert loss.item() < losses[0] - 0.1
    assert all(p.requires_grad for p in module.model.parameters())
    again = MT5Seq2Seq(**module.init_args())  # the saved init args rebuild the module
    assert again.base_model_id == module.base_model_id and again.tokenizer_name == t5_tokenizer_dir


def test_mt5_rank_classification_matches_per_choice_log_probs(t5_tokenizer_dir):
    labels = ["yes", "no maybe", "not sure a b"]  # different lengths: padding must not count
    module = mt5(t5_tokenizer_dir, labels).eval()
    tok = module.tokenizer
    golds = [0, 1, 2, 1, 0, 2]
    batch = seq2seq_batch(tok, SOURCES, [labels[i] for i in golds])
    with torch.no_grad():
        scores = module.choice_scores(batch["input_ids"], batch["attention_mask"], module.choice_labels)
        direct = torch.zeros(len(SOURCES), len(labels))
        for c, text in enumerate(labels):  # one example, one choice at a time
            target = tok(text, return_tensors="pt")["input_ids"]
            for b in range(len(SOURCES)):
                ids = batch["input_ids"][b : b + 1][:, batch["attention_mask"][b].bool()]
                logits = module.model(input_ids=ids, labels=target).logits
                direct[b, c] = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).sum()
    torch.testing.assert_close(scores, direct, atol=1e-4, rtol=1e-4)
    assert torch.equal(module.gold_choice(batch, module.choice_labels), torch.tensor(golds))
    correct, total = module.evaluate_batch(batch)
    assert total == 6 and correct == (direct.argmax(-1) == torch.tensor(golds)).sum()
    # class_index overrides the match against labels
    correct2, _ = module.evaluate_batch({**batch, "class_index": direct.argmax(-1)})
    assert correct2 == 6


# a seed whose random tiny model generates words for SOURCES (most stop at once: empty strings)
GEN_SEED = 15


def test_mt5_greedy_generation_scored_with_em_f1(t5_tokenizer_dir):
    from src.evaluate.text_metrics import em_f1

    module = mt5(t5_tokenizer_dir, [], metric="em_f1", init_seed=GEN_SEED)
    assert not module.is_classification
    tok = module.tokenizer
    batch = seq2seq_batch(tok, SOURCES[:3], ["a b", "c", "d e f"])
    module.eval()
    predictions = module.generate(batch)
    with torch.no_grad():  # greedy decoding by hand: argmax token by token
        enc = module.model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        dec = torch.zeros(3, 1, dtype=torch.long)
        for _ in range(module.max_new_tokens):
            logits = module.model(encoder_outputs=enc, attention_mask=batch["attention_mask"],
                                  decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    manual = []
    for row in dec[:, 1:].tolist():
        row = row[: row.index(1)] if 1 in row else row
        manual.append(tok.decode(row, skip_special_tokens=True))
    assert predictions == manual
    # references chosen so that the first two match exactly and the third partly (F1 only)
    targets = [manual[0], manual[1], manual[2] + " zzz"]
    references = [[targets[0]], ["g h", targets[1]], [targets[2]]]  # several golds: the best one counts
    expected = em_f1(manual, references)
    assert expected["em"] == pytest.approx(2 / 3) and expected["f1"] > expected["em"]
    score_sum, total = module.evaluate_batch({**batch, "targets": targets, "references": references})
    assert total == 3 and float(score_sum) == pytest.approx(3 * expected["em_f1"], abs=1e-6)
    assert [g["prediction"] for g in module.generations] == manual
    assert [g["references"] for g in module.generations] == references
    # without `references` the target string is the reference
    score_sum, _ = module.evaluate_batch({**batch, "targets": targets})
    assert float(score_sum) == pytest.approx(3 * em_f1(manual, targets)["em_f1"], abs=1e-6)
    # through Lightning: val/acc is the EM/F1 mean and the strings are kept
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(module, datamodule=BatchesDM([{**batch, "references": references}], []))
    assert result["val/acc"] == pytest.approx(expected["em_f1"], abs=1e-6)
    assert len(module.generations) == 3


class GenerationDM(L.LightningDataModule):
    """A generation task as the cross-lingual datamodule presents it: ``label_names`` None, ``task`` and
    ``base_task`` names, batches with ``targets`` and ``references``."""

    def __init__(self, task, train, val):
        super().__init__()
        self.task, self.base_task = task, task.split("-")[0]
        self.label_names, self.templates = None, None
        self.train, self.val = train, val

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=None, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=None, shuffle=False)

    test_dataloader = val_dataloader


def test_mt5_metric_follows_the_task():
    module = MT5Seq2Seq("unused", model_config=MT5)
    module.label_names = []
    assert module.resolve_metric("wiki_lingua") == "sp_rouge"
    assert module.resolve_metric("squad") == module.resolve_metric("xquad") == "em_f1"
    with pytest.raises(ValueError, match="pass metric"):
        module.resolve_metric("new_generation_task")
    module.label_names = ["yes", "no"]
    assert module.resolve_metric("xnli") == module.resolve_metric(None) == "accuracy"
    with pytest.raises(ValueError, match="does not fit"):
        _resolved(MT5Seq2Seq("unused", model_config=MT5, metric="sp_rouge"), ["a"])
    with pytest.raises(ValueError, match="does not fit"):
        _resolved(MT5Seq2Seq("unused", model_config=MT5, metric="accuracy"), [])
    assert _resolved(MT5Seq2Seq("unused", model_config=MT5, metric="em_f1"), []) == "em_f1"
    with pytest.raises(ValueError, match="metric must be"):
        MT5Seq2Seq("unused", model_config=MT5, metric="rouge")


def _resolved(module, label_names):
    module.label_names = label_names
    return module.resolve_metric("wiki_lingua")


def test_mt5_summarization_selects_and_exports_on_sp_rouge_over_the_whole_split(t5_tokenizer_dir, tmp_path):
    """A WikiLingua-like task: val/acc (what the export and early stopping monitor) is SP-ROUGE of all
    validation examples, the exported metrics are SP-ROUGE, and exact match would have been 0."""
    from src.evaluate.text_metrics import em_f1, sp_rouge
    from src.finetune.export import TaskCheckpointExport
    from src.task_checkpoint import read_task_info

    frozen = OptimSpec(lr=0.0, weight_decay=0.0, scheduler="constant")  # weights stay: predictions known
    twin = mt5(t5_tokenizer_dir, [], metric="sp_rouge", init_seed=GEN_SEED).eval()  # same config, seed: weights
    tok = twin.tokenizer
    sources = [SOURCES[:3], SOURCES[3:5]]  # uneven batches: the split mean is not the mean of batch means
    val, preds, refs = [], [], []
    for part in sources:
        batch = seq2seq_batch(tok, part, ["a b"] * len(part))
        p = twin.generate(batch)
        # the prediction plus some words: ROUGE in (0, 1), exact match 0
        r = [[f"{x} b c" + " d e f" * ((len(preds) + i) % 2)] for i, x in enumerate(p)]
        val.append({**batch, "targets": [x[0] for x in r], "references": r})
        preds += p
        refs += r
    assert all(p.strip() for p in preds)
    expected = sp_rouge(preds, refs, tok)["sp_rouge"]
    assert 0 < expected < 1 and em_f1(preds, refs)["em"] == 0.0
    batch_means = [sp_rouge(preds[:3], refs[:3], tok)["sp_rouge"], sp_rouge(preds[3:], refs[3:], tok)["sp_rouge"]]
    assert abs(sum(batch_means) / 2 - expected) > 1e-4

    module = MT5Seq2Seq("unused", tokenizer=t5_tokenizer_dir, model_config={**MT5, "vocab_size": len(WORDS) + 3},
                        optim=frozen, max_new_tokens=5, init_seed=GEN_SEED)
    export = TaskCheckpointExport(output_dir=str(tmp_path / "{task}"), verbose=False)
    dm = GenerationDM("wiki_lingua-th", [val[0]], val)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        max_epochs=1, callbacks=[export])
    trainer.fit(module, datamodule=dm)
    assert module.label_names == [] and module.eval_metric == "sp_rouge"
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(expected, abs=1e-6)
    assert export.best_score == pytest.approx(expected, abs=1e-6)
    # kept since the last validation epoch started: that epoch, then the export's val and test passes
    assert [g["prediction"] for g in module.generations] == preds * 3
    assert [g["sp_rouge"] for g in module.generations[:5]] == pytest.approx(sp_rouge_per_example(preds, refs, tok))

    info = read_task_info(tmp_path / "wiki_lingua-th")
    assert info.hparams["metric"] == "sp_rouge" and info.hparams["selection"]["monitor"] == "val/acc"
    init_args = info.hparams["module"]["init_args"]
    assert init_args["metric"] == "sp_rouge"  # resolved from the task: a reloaded module scores the same
    again = MT5Seq2Seq(**init_args)
    again.label_names = list(info.label_names)
    assert again.eval_metric == "sp_rouge"
    for stage in ("zeroshot", "finetuned"):
        for split in ("val_acc", "test_acc"):  # the test loader is the validation data here
            assert info.metrics[stage][split] == pytest.approx(expected, abs=1e-6), (stage, split)
    assert info.metrics["last"]["val_acc"] == pytest.approx(expected, abs=1e-6)


def sp_rouge_per_example(preds, refs, tok):
    from src.evaluate.text_metrics import sp_rouge_scores

    return sp_rouge_scores(preds, refs, tok)["sp_rouge"]


def test_mt5_export_full_weights_without_tied_duplicates(t5_tokenizer_dir):
    module = mt5(t5_tokenizer_dir, ["yes", "no"])
    model = module.model
    # transformers 5 ties lm_head to shared for configs; real mT5 checkpoints load it untied
    assert model.lm_head.weight is model.shared.weight
    state = module.trained_state_dict()
    duplicates = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert set(state) == set(model.state_dict()) - duplicates and "shared.weight" in state
    assert all(not k.startswith("choice_labels") for k in state)
    assert module.head_state_dict() == {}
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())  # as mt5-xl-lm-adapt
    state = module.trained_state_dict()
    assert "lm_head.weight" in state and "shared.weight" in state
    assert "encoder.embed_tokens.weight" not in state and "decoder.embed_tokens.weight" not in state
