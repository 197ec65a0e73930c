"""Multitask training (src/finetune/multitask.py): the mixing sampler, the shared-network module
(demo family, Llama NLI heads, mT5 metrics), the merged-model directory it writes and its scoring by
the evaluation stage (``method: merged``), the output-safety rules, and the held-out DomainNet tasks
file of the "Individual" models.

Tiny random models (tests/finetune/conftest.py), the demo tasks' real data, a few training steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.fabric.utilities.data import _set_sampler_epoch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from src.finetune.base import LoraSpec  # noqa: E402
from src.finetune.multitask import (MixtureBatchSampler, MultitaskDataModule, MultitaskModule,  # noqa: E402
                                    main, write_multitask_output)
from src.finetune.optim import OptimSpec  # noqa: E402

from .conftest import LossLog, REPO, _quiet_trainer  # noqa: E402

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("color_names", "world_cities")
SIZES = {"train_size": 16, "val_size": 8, "test_size": 12}
FAST = OptimSpec(lr=1e-2, weight_decay=0.0, scheduler="constant")


# ----- the sampler ------------------------------------------------------------------------
def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return [(t, list(idx)) for t, idx in sampler.schedule()], list(sampler)


def test_proportional_mixing_sees_every_example_once_in_single_task_batches():
    sizes, bs = [10, 3, 25], [4, 4, 3]
    sampler = MixtureBatchSampler(sizes, bs, "proportional", seed=7)
    schedule, flat = epoch_batches(sampler, 0)
    assert sampler.batches_per_task() == [3, 1, 9] and len(sampler) == len(flat) == 13
    for t in range(3):  # every example of every task exactly once, batches of the task's own size
        seen = sorted(i for task, idx in schedule if task == t for i in idx)
        assert seen == list(range(sizes[t]))
        assert all(len(idx) <= bs[t] for task, idx in schedule if task == t)
    for (t, idx), glob in zip(schedule, flat):  # global indices: offsets of the concatenated sets
        assert glob == [sampler.offsets[t] + i for i in idx]
        assert all(sampler.offsets[t] <= g < sampler.offsets[t + 1] for g in glob)
    order = [t for t, _ in schedule]
    assert order != sorted(order)  # tasks interleaved, not one task after the other
    # proportional to size: over many epochs the share of a task's batches in each half of the
    # epoch matches its share of all batches (no task crowds the start)
    first_half = [0, 0, 0]
    for e in range(200):
        sampler.set_epoch(e)
        for t, _ in sampler.schedule()[:6]:
            first_half[t] += 1
    shares = [n / sum(first_half) for n in first_half]
    assert shares == pytest.approx([3 / 13, 1 / 13, 9 / 13], abs=0.04)


def test_uniform_mixing_gives_every_task_the_same_number_of_batches():
    sizes = [10, 3, 25]
    sampler = MixtureBatchSampler(sizes, 4, "uniform", seed=1)
    schedule, _ = epoch_batches(sampler, 0)
    assert sampler.batches_per_task() == [7, 7, 7] and len(schedule) == 21
    for t in range(3):
        idx = [i for task, b in schedule if task == t for i in b]
        assert sum(1 for task, _ in schedule if task == t) == 7
        assert set(idx) == set(range(sizes[t]))  # every example at least once; small tasks repeat
    drop = MixtureBatchSampler([10, 9], 4, "proportional", drop_last=True)
    assert drop.batches_per_task() == [2, 2] and all(len(b) == 4 for b in drop)
    with pytest.raises(ValueError, match="make no batch"):
        MixtureBatchSampler([3], 4, drop_last=True)
    with pytest.raises(ValueError, match="mixing"):
        MixtureBatchSampler([3], 4, "temperature")


def test_mixing_order_depends_only_on_seed_and_epoch_and_ranks_split_it():
    def order(seed, epoch):
        return epoch_batches(MixtureBatchSampler([10, 7], [3, 2], seed=seed), epoch)[0]

    assert order(0, 0) == order(0, 0) and order(0, 3) == order(0, 3)  # fresh samplers: same order
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    full = order(0, 2)  # 4 + 4 batches; DDP: 3 ranks take every 3rd batch, padded to 9
    ranks = [epoch_batches(MixtureBatchSampler([10, 7], [3, 2], seed=0, num_replicas=3, rank=r), 2)[0]
             for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]
    assert [b for i in range(3) for b in (ranks[0][i], ranks[1][i], ranks[2][i])] == (full + full[:1])


class RangeData(torch.utils.data.Dataset):
    def __init__(self, start, n):
        self.start, self.n = start, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor(self.start + i), "labels": torch.tensor(i % 2)}


def tagged_collate(tag):
    def collate(items):
        batch = torch.utils.data.default_collate(items)
        batch["tag"] = tag  # this task's own collate function made the batch
        return batch
    return collate


class RangeDM(L.LightningDataModule):
    def __init__(self, start, n, batch_size, tag):
        super().__init__()
        self.start, self.n, self.batch_size, self.tag = start, n, batch_size, tag
        self.label_names, self.task = ["a", "b"], tag

    def train_dataloader(self):
        return DataLoader(RangeData(self.start, self.n), batch_size=self.batch_size, shuffle=True,
                          collate_fn=tagged_collate(self.tag))

    def val_dataloader(self):
        return DataLoader(RangeData(self.start, self.n), batch_size=self.batch_size)


def test_datamodule_batches_come_from_each_task_with_its_own_collate_and_lightning_sets_the_epoch():
    dm = MultitaskDataModule({"small": RangeDM(0, 5, 2, "small"), "big": RangeDM(1000, 9, 4, "big")}, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 3 + 3
    for b in batches:
        assert b["task"] == b["batch"]["tag"] and b["batch"]["labels"].shape == b["batch"]["x"].shape
    xs = {t: sorted(int(x) for b in batches if b["task"] == t for x in b["batch"]["x"]) for t in dm.tasks}
    assert xs == {"small": list(range(5)), "big": list(range(1000, 1009))}
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls before every epoch
    again = list(loader)
    assert dm.batch_sampler.epoch == 1
    assert [b["batch"]["x"].tolist() for b in again] != [b["batch"]["x"].tolist() for b in batches]
    assert [len(v) for v in dm.val_dataloader()] == [3, 3]


# ----- the demo family: shared network, own heads, training -----------------------------------
def demo_view(tiny_bert, **kw):
    from src.finetune.models.demo_text import DEMO_LORA_TARGETS, DemoTextClassifier

    kw.setdefault("lora", LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=list(DEMO_LORA_TARGETS)))
    return DemoTextClassifier(pretrained="tiny-bert", model_config=tiny_bert, tokenizer=TOKENIZER, optim=FAST, **kw)


def demo_dm(task, **kw):
    from src.finetune.data.demo import DemoDataModule

    return DemoDataModule(task=task, tokenizer=TOKENIZER, batch_size=8, eval_batch_size=16, seed=0, **{**SIZES, **kw})


class TaskLosses(LossLog):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((batch["task"], trainer.current_epoch, float(outputs["loss"])))


def test_multitask_demo_model_shares_one_network_keeps_each_head_and_lowers_each_loss(tiny_bert_config):
    views = [demo_view(tiny_bert_config) for _ in TASKS]
    module = MultitaskModule(views, list(TASKS))
    dm = MultitaskDataModule({t: demo_dm(t) for t in TASKS})
    log = TaskLosses()
    _quiet_trainer(max_epochs=8, limit_val_batches=0, callbacks=[log]).fit(module, datamodule=dm)
    assert module.model is views[0].model is views[1].model  # one network...
    assert sum(1 for k in module.state_dict() if "lora_A" in k) == sum(  # ...held once, one set of LoRA factors
        1 for k in views[0].model.state_dict() if "lora_A" in k)
    single = demo_view(tiny_bert_config)
    for t, view in zip(TASKS, views):  # each task's head: what its own task model builds
        single.label_names = list(demo_dm(t).label_names)
        single.build_model(single.label_names, demo_dm(t).templates)
        assert view.label_names == single.label_names
        torch.testing.assert_close(view.head, single.head)
    assert len(log.losses) == 8 * 4  # 16 + 16 examples in batches of 8, every epoch
    for t in TASKS:
        first = [loss for task, e, loss in log.losses if task == t and e == 0]
        last = [loss for task, e, loss in log.losses if task == t and e == 7]
        assert len(first) == len(last) == 2
        assert sum(last) / 2 < sum(first) / 2 - 0.1, (t, first, last)
    metrics = _quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    per_task = [metrics[f"val/acc/{t}"] for t in TASKS]
    assert metrics["val/acc"] == pytest.approx(sum(per_task) / 2)


# ----- Llama NLI: one trainable head per task inside the network -------------------------------
LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


class NLIData(torch.utils.data.Dataset):
    def __init__(self, num_labels, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, LLAMA["vocab_size"], (n, 6), generator=g)
        self.num_labels = num_labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % self.num_labels}


class NLIDM(L.LightningDataModule):
    def __init__(self, label_names, seed):
        super().__init__()
        self.label_names, self.task, self.seed = label_names, f"nli{len(label_names)}", seed

    def train_dataloader(self):
        return DataLoader(NLIData(len(self.label_names), 16, self.seed), batch_size=8)

    def val_dataloader(self):
        return DataLoader(NLIData(len(self.label_names), 8, self.seed + 1), batch_size=8)


def llama_view():
    from src.finetune.models.llama_nli import LlamaNLIClassifier

    return LlamaNLIClassifier(model_config=LLAMA, torch_dtype="float32", optim=FAST,
                              lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))


def test_llama_multitask_trains_one_head_per_task_and_exports_backbone_adapter_and_heads(tmp_path):
    from src.finetune.multitask import TaskHeads

    tasks = {"nli3": NLIDM(["entailment", "neutral", "contradiction"], 0),
             "nli2": NLIDM(["entailment", "not_entailment"], 5)}
    module = MultitaskModule([llama_view(), llama_view()], list(tasks))
    _quiet_trainer(max_steps=8, limit_val_batches=0).fit(module, datamodule=MultitaskDataModule(tasks))
    heads = module.dispatcher
    assert isinstance(heads, TaskHeads) and module.views[0].unwrapped_model().score is heads
    w3, w2 = (h.weight.detach().clone() for h in heads.heads)
    assert not torch.equal(w3, w2)  # each task trained its own head (same start, different data)
    batch = NLIData(2, 8, 9)[0]
    batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    module.eval()
    with torch.no_grad():
        two = module.select(1).logits(batch)
        three = module.select(0).logits(batch)
    assert torch.isinf(two[:, 2]).all() and torch.isfinite(three).all()  # the 2-label task's masked slot
    out = write_multitask_output(module, tmp_path / "mt", {"mixing": "proportional", "seed": 0})
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "multitask" and info["save_as"] == "adapter" and info["contents"] == "updates"
    assert [t["task"] for t in info["tasks"]] == ["nli3", "nli2"] and info["heads_source"] == "trained"
    assert info["params"] == {"mixing": "proportional", "seed": 0, "heads": "trained"}
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)  # backbone LoRA only, no head
    torch.testing.assert_close(load_file(str(out / "heads" / "nli2.safetensors"))["score.weight"], w2)
    # --heads-from-tasks: the task checkpoints' heads, frozen
    files = []
    for i, t in enumerate(tasks):
        files.append(tmp_path / f"{t}.safetensors")
        save_file({"score.weight": torch.full_like(w3, float(i + 1))}, str(files[-1]))
    module.load_task_heads(files)
    assert all(not h.weight.requires_grad for h in heads.heads)
    assert heads.heads[1].weight.eq(2.0).all() and module.heads_source == "task checkpoints"


# ----- CLIP full finetune: the trained weights under the base model's names --------------------
def test_clip_full_multitask_writes_full_finetune_weights_that_the_evaluation_reads(tmp_path, make_clip, toy_dm_cls):
    from src.evaluate.models import ModelBank
    from src.finetune.export import export_task_checkpoint

    tasks = {"toy_a": toy_dm_cls(seed=0), "toy_b": toy_dm_cls(seed=10)}
    module = MultitaskModule([make_clip("full", optim=FAST) for _ in tasks], list(tasks))
    _quiet_trainer(max_steps=4, limit_val_batches=0).fit(module, datamodule=MultitaskDataModule(tasks))
    out = write_multitask_output(module, tmp_path / "mt", {"mixing": "proportional", "seed": 0})
    info = json.loads((out / "merge.json").read_text())
    assert (info["save_as"], info["contents"], info["partial"]) == ("safetensors", "weights", True)
    weights = load_file(str(out / "model.safetensors"))
    single = make_clip("full")  # what a single-task full finetune exports: the same names
    single.label_names = list(tasks["toy_a"].label_names)
    single.build_model(single.label_names, tasks["toy_a"].templates)
    assert sorted(weights) == sorted(single.trained_state_dict())
    assert all(k.startswith("vision_model.") for k in weights)
    task_dir = export_task_checkpoint(single, tmp_path / "toy_a", "toy_a")  # heads / base for the evaluation
    state = ModelBank([task_dir]).merged_state(out, "toy_a")
    assert sorted(state) == sorted(weights)
    for name, value in module.first.trained_state_dict().items():
        torch.testing.assert_close(state[name], value)


# ----- mT5: one seq2seq network, each task's own metric ----------------------------------------
def test_mt5_multitask_views_keep_each_tasks_metric(t5_tokenizer_dir):
    from src.finetune.models.mt5 import MT5Seq2Seq

    config = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                  vocab_size=16)
    views = [MT5Seq2Seq("unused", tokenizer=t5_tokenizer_dir, model_config=config, optim=FAST) for _ in range(2)]
    module = MultitaskModule(views, ["xnli-ar", "squad-en"])
    module.build([["yes", "no"], None], [None, None], ["xnli", "squad"])
    assert module.model is views[0].model is views[1].model
    assert [v.metric for v in views] == ["accuracy", "em_f1"] and views[1].label_names == []
    tok = views[0].tokenizer
    enc = tok(["a b c", "d e"], return_tensors="pt", padding=True)
    lab = tok(["yes", "no"], return_tensors="pt", padding=True)["input_ids"]
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab}
    loss = module.training_step({"task": "xnli-ar", "batch": batch}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    module._start("val")
    module._step("val", batch, 0)
    assert module._counts["val"] == [2, 0]


# ----- the command line: output directory, evaluation, safety ------------------------------------
def demo_task_checkpoint(root: Path, task: str, tiny_bert: dict, data: dict) -> Path:
    """A (random LoRA) task checkpoint of ``task`` whose recorded datamodule is ``data``'s: the
    single-task finetune the evaluation takes heads, labels and data from."""
    from src.finetune.data.demo import DEMO_TASKS
    from src.finetune.export import export_task_checkpoint

    module = demo_view(tiny_bert)
    module.label_names = list(DEMO_TASKS[task].label_names)
    module.build_model(module.label_names, list(DEMO_TASKS[task].templates))
    spec = {"class_path": "src.finetune.data.demo.DemoDataModule", "init_args": {**data, "task": task}}
    return export_task_checkpoint(module, root / task, task, extra_hparams={"datamodule": spec})


@pytest.fixture
def demo_run(tmp_path, tiny_demo_config, tiny_bert_config):
    """A tiny demo config whose export.output_dir holds two task checkpoints, and a tasks file."""
    data = {"tokenizer": TOKENIZER, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "max_length": None,
            "num_workers": 0, **SIZES}
    cfg = tiny_demo_config(tmp_path, trainer={"max_steps": 8, "max_epochs": 4},
                           model={"optim": {"lr": 1e-2, "weight_decay": 0.0, "scheduler": "constant", "warmup": 0}},
                           data=data, export={"output_dir": str(tmp_path / "tasks" / "{task}")})
    dirs = {t: demo_task_checkpoint(tmp_path / "tasks", t, tiny_bert_config, data) for t in TASKS}
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump({"tasks": {"world_cities": {"trainer.max_epochs": 6}, "color_names": {}}},
                                         sort_keys=False))
    return {"root": tmp_path, "config": str(cfg), "tasks_file": str(tasks_file), "dirs": dirs}


def test_cli_writes_a_merged_directory_that_the_evaluation_scores_per_task(demo_run, capsys):
    from src.evaluate.run import EvalConfig, run_evaluation
    from src.merge.sources import PeftAdapterReader
    from src.merge.updates import densify
    from tests.evaluate.conftest import loop_accuracy, plain_module, split_batches

    out = demo_run["root"] / "multitask"
    before = {str(p): p.read_bytes() for p in sorted((demo_run["root"] / "tasks").rglob("*")) if p.is_file()}
    argv = ["--config", demo_run["config"], "--tasks-file", demo_run["tasks_file"], "--output", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr()
    assert "world_cities: per-task override(s) {'trainer.max_epochs': 6}" in said.out  # ignored, and said so
    assert "differs from its task checkpoint" not in said.err  # the heads trained with are the evaluation's
    after = {str(p): p.read_bytes() for p in sorted((demo_run["root"] / "tasks").rglob("*")) if p.is_file()}
    assert after == before  # the config's export.output_dir (the task checkpoints) is read, never written
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == "multitask" and info["params"] == {"mixing": "proportional", "seed": 0}
    assert info["save_as"] == "adapter" and info["contents"] == "updates"  # LoRA: the trained adapter
    assert [t["task"] for t in info["tasks"]] == ["world_cities", "color_names"]  # the tasks file's order
    for t in info["tasks"]:
        assert t["path"] == str(demo_run["dirs"][t["task"]]) and t["kind"] == "lora" and t["family"] == "demo-text"
        assert t["base_model"] == info["base_model_id"] and t["label_names"]
    mt = info["multitask"]
    assert mt["selection"]["monitor"] == "val/acc" and mt["ignored_overrides"] == {"world_cities": {"trainer.max_epochs": 6}}
    assert mt["batches_per_epoch"] == {"world_cities": 2, "color_names": 2}
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["color_names.safetensors", "world_cities.safetensors"]
    assert not list(out.parent.glob(".multitask.*.tmp"))  # written atomically

    rows = run_evaluation(EvalConfig(
        experiment="mt", tasks=[str(demo_run["dirs"][t]) for t in TASKS], rows=str(demo_run["root"] / "rows.jsonl"),
        methods=[{"method": "merged", "path": str(out), "label": "Multitask"}], ensemble=False, zeroshot=False,
        report=False, progress=False))
    merged = {r["task"]: r for r in rows if r["method"] == "merged" and r["split"] == "test"}
    assert sorted(merged) == sorted(TASKS)
    reader = PeftAdapterReader(out)
    updates = {k: densify(reader.load(k)) for k in reader.keys()}
    for t in TASKS:
        # the row is the multitask model's own test accuracy (recorded at training, same data and head)...
        assert merged[t]["value"] == pytest.approx(mt["metrics"][t]["test_acc"], abs=1e-6)
        # ...and what the model scores outside both stages: the task's head on base + the trained adapter
        expected = loop_accuracy(plain_module(demo_run["dirs"][t], updates), split_batches(demo_run["dirs"][t], "test"))
        assert merged[t]["value"] == pytest.approx(expected, abs=1e-6)

    # an earlier multitask output is replaced (here: by a uniform mixture)
    assert main(argv + ["--mixing", "uniform"]) == 0
    assert json.loads((out / "merge.json").read_text())["params"]["mixing"] == "uniform"


def test_cli_never_writes_into_or_over_a_task_checkpoint(demo_run, capsys):
    dirs, root = demo_run["dirs"], demo_run["root"]
    base = ["--config", demo_run["config"], "--tasks-file", demo_run["tasks_file"]]

    def snapshot(path):
        return {str(p): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}

    before = snapshot(root / "tasks")
    other = root / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for target, extra in [(dirs["world_cities"], []), (dirs["world_cities"], ["--overwrite"]),
                          (dirs["color_names"] / "multitask", ["--overwrite"]),  # inside a task checkpoint
                          (root / "tasks", ["--overwrite"]),                     # contains them
                          (other, [])]:                                          # someone else's directory
        assert main(base + ["--output", str(target), *extra]) == 2
        assert "refusing to start" in capsys.readouterr().err
    assert snapshot(root / "tasks") == before and (other / "keep.txt").read_text() == "mine"
    assert not (root / ".runs").exists()  # refused before anything ran
    assert main(base + ["--output", str(root / "mt"), "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out and not (root / "mt").exists()


# ----- "Individual" generalization models: the held-out DomainNet pairs ---------------------------
def test_heldout_domainnet_tasks_file_lists_the_120_generalization_pairs():
    from src.finetune.data.domainnet import held_in_pairs, held_out_pairs
    from src.finetune.train_all import read_tasks_file, task_args

    table = read_tasks_file(Path(REPO, "configs", "finetune", "tasks", "D_domainnet_heldout.yaml"))
    expected = [f"{c}-{d}" for c, d in held_out_pairs()]
    assert list(table) == expected and len(expected) == 120
    assert not set(table) & {f"{c}-{d}" for c, d in held_in_pairs()}
    for (c, d), name in zip(held_out_pairs(), table):
        assert task_args(name, table[name]) == ["--data.init_args.category", c, "--data.init_args.domain", d]
