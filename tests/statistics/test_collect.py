"""Data statistics (src/statistics): the Lightning loop against per-example autograd, masks, files, cache.

Task models: the three tiny LoRA demo checkpoints of ``tests/evaluate/conftest.py`` (random LoRA
factors), a tiny FULL demo finetune (all encoder weights perturbed), a tiny mT5 (encoder-decoder
masks) and a toy module whose Linear is called twice per forward. References are computed
without the collector: one example at a time (no padding at all), the effective weights
(``W0 + scale * B @ A`` for LoRA) as leaves of a plain model, ``torch.autograd.grad`` of the
example's loss, layer inputs / outputs captured by plain forward hooks.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from src.statistics import collect as collect_mod
from src.statistics import StatisticsCollector, collect_statistics, compute_statistics, linear_layers
from src.task_statistics import KINDS, available_kinds, kind_path, read_statistics_info, statistics_tag
from tests.evaluate.conftest import TOKENIZER, datamodule_spec, plain_module, tiny_bert
from tests.evaluate.conftest import demo_tasks  # noqa: F401  (the fixture)

torch.set_num_threads(1)


# ----- helpers --------------------------------------------------------------------------------
def assert_close(actual: dict, expected: dict, what: str, rtol: float = 2e-4) -> None:
    assert set(actual) == set(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    overall = max(float(ref.abs().max()) for ref in expected.values())
    for key, ref in expected.items():
        # a tensor that is zero in exact arithmetic (the key bias' gradient: softmax ignores a
        # constant shift) holds rounding noise on both sides: compare it on the kind's scale
        scale = max(float(ref.abs().max()), 1e-4 * overall) or 1.0
        torch.testing.assert_close(actual[key].double(), ref.double(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"{what}[{key}]: {m}")


def demo_split(task_dir, split: str):
    """(dataset, collate) of ``split`` of the DataModule ``task.json`` records, built directly."""
    from src.finetune.data.demo import DemoDataModule
    from src.task_checkpoint import read_task_info

    dm = DemoDataModule(**read_task_info(task_dir).hparams["datamodule"]["init_args"])
    dm.setup("fit")
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return loader.dataset, loader.collate_fn


def seeded_subset(dataset, n: int, seed: int) -> list:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [dataset[i] for i in order]


def lora_deltas(task_dir) -> dict[str, torch.Tensor]:
    """``scale * B @ A`` per LoRA-adapted weight (base-model names), from the PEFT model."""
    from src.finetune.load import load_task_model

    module = load_task_model(task_dir)
    if module.finetune != "lora":
        return {}
    out = {}
    for name, layer in module.unwrapped_model().named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out[f"{name}.weight"] = (b @ a * layer.scaling["default"]).detach()
    return out


def reference_statistics(module, examples, collate) -> dict[str, dict[str, torch.Tensor]]:
    """Per example (batch of one, no padding): autograd Fisher of every Linear weight and bias,
    inputs' Gram matrix, K-FAC factors; ``module``'s Linear weights are the effective weights."""
    root = module.unwrapped_model()
    linears = {name: m for name, m in root.named_modules() if isinstance(m, nn.Linear)}
    for m in linears.values():
        m.weight.requires_grad_(True)
        if m.bias is not None:
            m.bias.requires_grad_(True)
    seen: dict[str, list] = {}

    def capture(name):
        def hook(mod, args, output):
            seen.setdefault(name, []).append((args[0], output))
        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in linears.items()]
    fisher, gram, gout, tokens = {}, {}, {}, {}
    try:
        for example in examples:
            seen.clear()
            batch = collate([example])
            loss = module.example_losses(batch)
            assert loss.shape == (1,)
            names = list(seen)
            params = [p for n in names for p in ((linears[n].weight,) + ((linears[n].bias,) if linears[n].bias is not None else ()))]
            outs = [y for n in names for _, y in seen[n]]
            grads = torch.autograd.grad(loss[0], params + outs, allow_unused=True)
            pgrads, ograds = grads[:len(params)], grads[len(params):]
            i = 0
            for n in names:
                for key in (f"{n}.weight",) + ((f"{n}.bias",) if linears[n].bias is not None else ()):
                    gsq = torch.zeros_like(params[i]) if pgrads[i] is None else pgrads[i].double().square()
                    fisher[key] = fisher.get(key, 0) + gsq
                    i += 1
            j = 0
            for n in names:
                for x, y in seen[n]:
                    x2 = x.detach().reshape(-1, x.shape[-1]).double()
                    g = ograds[j]
                    g2 = torch.zeros(x2.shape[0], y.shape[-1], dtype=torch.float64) if g is None \
                        else g.reshape(-1, y.shape[-1]).double()
                    key = f"{n}.weight"
                    gram[key] = gram.get(key, 0) + x2.T @ x2
                    gout[key] = gout.get(key, 0) + g2.T @ g2
                    tokens[key] = tokens.get(key, 0) + x2.shape[0]
                    j += 1
    finally:
        for h in handles:
            h.remove()
    n = len(examples)
    return {"fisher": {k: v / n for k, v in fisher.items()},
            "gram": {k: v / n for k, v in gram.items()},
            "kfac_in": {k: v / tokens[k] for k, v in gram.items()},
            "kfac_out": {k: v / tokens[k] for k, v in gout.items()}}


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file of a task directory outside statistics/."""
    out = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and "statistics" not in path.relative_to(directory).parts:
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def read_kind(task_dir, tag: str, kind: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(kind_path(task_dir, tag, kind)))


def base_linear_weights(task_dir) -> set[str]:
    from src.finetune.load import build_module
    from src.task_checkpoint import read_task_info

    base = build_module(read_task_info(task_dir), Path(task_dir)).load_base()
    return {f"{name}.weight" for name, m in base.named_modules() if isinstance(m, nn.Linear)}


# ----- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_task(tmp_path_factory) -> Path:
    """A FULL demo finetune (tiny BERT): every encoder weight moved from its initial value."""
    from src.finetune.data.demo import DEMO_TASKS
    from src.finetune.export import export_task_checkpoint
    from src.finetune.models.demo_text import DemoTextClassifier

    module = DemoTextClassifier(pretrained="tiny-bert", finetune="full", model_config=tiny_bert(), tokenizer=TOKENIZER)
    spec = DEMO_TASKS["color_names"]
    module.label_names = list(spec.label_names)
    module.build_model(module.label_names, list(spec.templates))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("full")
    return export_task_checkpoint(module, root / "color_names", "color_names",
                                  extra_hparams={"datamodule": datamodule_spec("color_names")})


# ----- the loop equals per-example autograd -----------------------------------------------------
@pytest.mark.parametrize("which", ["lora", "full"])
def test_statistics_equal_per_example_autograd(which, demo_tasks, full_task):
    task_dir = demo_tasks["world_cities"] if which == "lora" else full_task
    before = tree_digest(task_dir)
    n, seed = 11, 1
    tag_dir = collect_statistics(task_dir, split="val", n=n, seed=seed, batch_size=4, accelerator="cpu", progress=False)
    assert tag_dir == task_dir / "statistics" / statistics_tag("val", n, seed)
    assert tree_digest(task_dir) == before  # the task model's own files are untouched
    dataset, collate = demo_split(task_dir, "val")
    examples = seeded_subset(dataset, n, seed)
    assert any(len(e[0]) != len(examples[0][0]) for e in examples[:4])  # padded batches: the mask matters
    if which == "lora":  # a plain base whose weights are the effective W0 + scale * B @ A
        effective = plain_module(task_dir, lora_deltas(task_dir))
    else:  # the full finetune's own weights
        from src.finetune.load import load_task_model

        effective = load_task_model(task_dir)
        assert not hasattr(effective.model, "peft_config")
    reference = reference_statistics(effective, examples, collate)
    info = read_statistics_info(task_dir, tag_dir.name)
    assert info["examples"] == n and info["split"] == "val" and info["n"] == n and info["seed"] == seed
    for kind in KINDS:
        assert info["kinds"][kind]["examples"] == n
        assert_close(read_kind(task_dir, tag_dir.name, kind), reference[kind], f"{which} {kind}")
    # keys: the base model's parameter names (every Linear weight; the Fisher also has the biases)
    weights = base_linear_weights(task_dir)
    assert set(read_kind(task_dir, tag_dir.name, "gram")) == weights
    assert set(read_kind(task_dir, tag_dir.name, "fisher")) == weights | {w[:-len("weight")] + "bias" for w in weights}
    tokens = info["kinds"]["kfac_in"]["tokens"]
    assert set(tokens.values()) == {sum(len(e[0]) for e in examples)}  # unpadded tokens only


def test_batching_does_not_change_statistics(demo_tasks):
    """With the attention mask, batch 1 (never padded) and batch 4 (padded) give the same statistics."""
    from src.finetune.load import load_task_model

    task_dir = demo_tasks["color_names"]
    dataset, collate = demo_split(task_dir, "test")
    examples = seeded_subset(dataset, 9, 0)
    module = load_task_model(task_dir)
    one = compute_statistics(module, examples, collate, KINDS, batch_size=1, accelerator="cpu", progress=False)
    four = compute_statistics(module, examples, collate, KINDS, batch_size=4, accelerator="cpu", progress=False)
    assert one.examples == four.examples == 9 and one.tokens == four.tokens
    for kind in KINDS:
        assert_close(four.tensors[kind], one.tensors[kind], f"batch 4 vs 1: {kind}", rtol=1e-4)
    # the mask is what makes them agree: padded positions have activations of their own
    padded = collate(examples[:4])
    assert (padded["attention_mask"] == 0).any()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())  # hooks removed


def test_mt5_encoder_decoder_masks_and_example_losses():
    """Seq2seq: encoder layers and cross-attention keys / values use the input mask, decoder layers
    the target mask (equal encoder and decoder lengths included); losses are summed target NLLs."""
    from src.finetune.models.mt5 import MT5Seq2Seq

    config = dict(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, dropout_rate=0.1,
                  vocab_size=24)
    module = MT5Seq2Seq("tiny-mt5", tokenizer="unused", model_config=config)
    module.build_model(["a", "b"], None)
    module.requires_grad_(False).eval()
    # a tied LM head gets the statistics of its Linear use only: statistics.json names it
    assert StatisticsCollector(module, KINDS, [], None, 1).tied == ["lm_head.weight"]
    module.model.lm_head.weight = nn.Parameter(module.model.shared.weight.detach().clone(), requires_grad=False)
    assert StatisticsCollector(module, KINDS, [], None, 1).tied == []  # untied, as the mT5 checkpoints
    g = torch.Generator().manual_seed(0)
    # (source, target) lengths; batches of 3: the second pads both to 4 with different masks
    lengths = [(3, 2), (5, 4), (4, 4), (4, 2), (2, 4), (3, 3), (5, 1)]
    examples = [(torch.randint(3, 24, (s,), generator=g), torch.randint(3, 24, (t,), generator=g)) for s, t in lengths]

    def collate(items):
        s, t = max(len(a) for a, _ in items), max(len(b) for _, b in items)
        ids = torch.zeros(len(items), s, dtype=torch.long)
        mask = torch.zeros(len(items), s, dtype=torch.long)
        labels = torch.full((len(items), t), -100, dtype=torch.long)
        for i, (a, b) in enumerate(items):
            ids[i, :len(a)], mask[i, :len(a)], labels[i, :len(b)] = a, 1, b
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    with torch.no_grad():
        batch = collate(examples[:1])
        assert torch.allclose(module.example_losses(batch)[0], module.seq2seq_loss(batch) * len(examples[0][1]))
    got = compute_statistics(module, examples, collate, KINDS, batch_size=3, accelerator="cpu", progress=False)
    reference = reference_statistics(module, examples, collate)
    module.requires_grad_(False)
    for kind in KINDS:
        assert_close(got.tensors[kind], reference[kind], f"mt5 {kind}")
    n_in, n_out = sum(s for s, _ in lengths), sum(t for _, t in lengths)
    assert got.tokens["encoder.block.0.layer.0.SelfAttention.q.weight"] == n_in
    assert got.tokens["decoder.block.0.layer.1.EncDecAttention.k.weight"] == n_in
    assert got.tokens["decoder.block.0.layer.1.EncDecAttention.q.weight"] == n_out
    assert got.tokens["lm_head.weight"] == n_out


class SharedLinear(nn.Module):
    """A Linear used twice per forward, and a head on 2-D features (no token dimension)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_sums_its_per_example_gradient_before_squaring():
    from src.finetune.base import TaskModule

    class Toy(TaskModule):
        def logits(self, batch):
            return self.model(batch["x"])

    torch.manual_seed(0)
    module = Toy("toy")
    module.model = SharedLinear().requires_grad_(False).eval()
    examples = [{"x": torch.randn(5), "labels": torch.tensor(i % 3)} for i in range(7)]

    def collate(items):
        return {"x": torch.stack([e["x"] for e in items]), "labels": torch.stack([e["labels"] for e in items])}

    module.train()
    got = compute_statistics(module, examples, collate, ["fisher", "gram"], batch_size=3, accelerator="cpu",
                             progress=False)
    assert module.training and module.model.shared.training  # the pass ran in eval mode; modes restored
    module.eval()
    # reference: autograd through both uses of the shared weight, one example at a time
    fisher = {"shared.weight": 0, "shared.bias": 0, "head.weight": 0}
    params = {k: p for k, p in module.model.named_parameters()}
    for e in examples:
        batch = collate([e])
        for p in params.values():
            p.requires_grad_(True)
        grads = torch.autograd.grad(module.example_losses(batch)[0], list(params.values()))
        for (k, _), gr in zip(params.items(), grads):
            fisher[k] = fisher[k] + gr.double().square()
    module.model.requires_grad_(False)
    assert_close(got.tensors["fisher"], {k: v / len(examples) for k, v in fisher.items()}, "shared fisher")
    x = torch.stack([e["x"] for e in examples]).double()
    h = torch.tanh(x @ params["shared.weight"].double().T + params["shared.bias"].double())
    gram_shared = (x.T @ x + h.T @ h) / len(examples)
    torch.testing.assert_close(got.tensors["gram"]["shared.weight"].double(), gram_shared, rtol=1e-4, atol=1e-5)
    assert got.tokens["shared.weight"] == 2 * len(examples) and got.tokens["head.weight"] == len(examples)


# ----- files, merge engine, caching, CLI ---------------------------------------------------------
class StubMethod:
    requires = ("gram", "fisher")


def test_files_open_through_the_merge_engine(demo_tasks):
    from src.merge.engine import open_statistics
    from src.merge.sources import open_task

    dirs = [demo_tasks[t] for t in sorted(demo_tasks)]
    for d in dirs:
        collect_statistics(d, kinds=["gram", "fisher"], split="test", n=6, seed=5, accelerator="cpu", progress=False)
    tag = statistics_tag("test", 6, 5)
    tasks = [open_task(d) for d in dirs]
    side = open_statistics(StubMethod(), tasks, [None] * len(tasks), tag)
    weights = base_linear_weights(dirs[0])
    assert len(side) == 3
    for readers in side:
        assert set(readers) == {"gram", "fisher"}
        assert set(readers["gram"].keys()) == weights
        assert weights < set(readers["fisher"].keys())
        name = "encoder.layer.0.attention.self.query.weight"
        assert readers["gram"].load(name).shape == (32, 32) and readers["fisher"].load(name).shape == (32, 32)
    # the LoRA task models differ: so do their Fisher matrices
    f = [r["fisher"].load("encoder.layer.1.attention.self.value.weight") for r in side]
    assert not torch.allclose(f[0], f[1])


def test_cache_computes_only_missing_kinds(demo_tasks, monkeypatch):
    task_dir = demo_tasks["world_cities"]
    calls = []
    original = collect_mod.compute_statistics

    def recording(module, dataset, collate, kinds, **kwargs):
        calls.append(tuple(kinds))
        return original(module, dataset, collate, kinds, **kwargs)

    monkeypatch.setattr(collect_mod, "compute_statistics", recording)
    path = collect_statistics(task_dir, kinds=["gram"], split="train", n=4, seed=0, accelerator="cpu", progress=False)
    assert calls == [("gram",)] and available_kinds(task_dir, path.name) == ["gram"]
    gram_bytes = kind_path(task_dir, path.name, "gram").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("statistics that exist were computed again")

    monkeypatch.setattr(collect_mod, "compute_statistics", refuse)
    monkeypatch.setattr("src.finetune.load.load_task_model", refuse)
    assert collect_statistics(task_dir, kinds=["gram"], split="train", n=4, seed=0) == path

    monkeypatch.undo()  # the model loads again; only the missing kind is computed
    monkeypatch.setattr(collect_mod, "compute_statistics", recording)
    calls.clear()
    collect_statistics(task_dir, kinds=["gram", "kfac_out"], split="train", n=4, seed=0, accelerator="cpu",
                       progress=False)
    assert calls == [("kfac_out",)]
    assert sorted(available_kinds(task_dir, path.name)) == ["gram", "kfac_out"]
    assert kind_path(task_dir, path.name, "gram").read_bytes() == gram_bytes  # kept as it was
    info = read_statistics_info(task_dir, path.name)
    assert list(info["kinds"]) == ["gram", "kfac_out"] and info["kinds"]["kfac_out"]["examples"] == 4
    leftovers = [p.name for p in (task_dir / "statistics").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # written atomically: no temporary directories left


def test_errors_name_the_problem(demo_tasks, tmp_path):
    task_dir = demo_tasks["bbc_news"]
    with pytest.raises(ValueError, match="fewer than n=1000"):
        collect_statistics(task_dir, kinds=["gram"], split="train", n=1000, progress=False)
    with pytest.raises(ValueError, match="unknown statistics kind"):
        collect_statistics(task_dir, kinds=["hessian"], split="train", n=2)
    with pytest.raises(ValueError, match="split must be"):
        collect_statistics(task_dir, kinds=["gram"], split="dev", n=2)
    assert not (task_dir / "statistics" / "train-n1000-seed0").exists()


def test_cli(demo_tasks, capsys):
    from src.statistics.__main__ import main

    dirs = [str(demo_tasks[t]) for t in ("bbc_news", "color_names")]
    rc = main(["--tasks", json.dumps(dirs), "--kinds", "[gram, kfac_in]", "--split", "val", "--n", "5", "--seed", "9",
               "--accelerator", "cpu", "--progress", "false"])
    out = capsys.readouterr().out.split()
    assert rc == 0 and out == [os.path.join(d, "statistics", "val-n5-seed9") for d in dirs]
    for d in dirs:
        assert available_kinds(d, "val-n5-seed9") == ["gram", "kfac_in"]
    for argv, message in ((["--tasks", json.dumps(dirs), "--kinds", "[gram, hessian]"], "unknown statistics kind"),
                          (["--tasks", json.dumps(dirs), "--n", "0"], "positive number"),
                          (["--tasks", "[/nonexistent/task]"], "task.json"),
                          (["--tasks", json.dumps(dirs), "--bogus", "1"], "bogus")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_linear_layers_use_base_model_names(demo_tasks):
    from src.finetune.load import load_task_model

    module = load_task_model(demo_tasks["bbc_news"])
    layers = linear_layers(module)
    assert {f"{k}.weight" for k in layers} == base_linear_weights(demo_tasks["bbc_news"])
    query = layers["encoder.layer.0.attention.self.query"]
    assert query is module.unwrapped_model().encoder.layer[0].attention.self.query.base_layer


def test_trained_layers_only(demo_tasks, full_task, monkeypatch):
    """``layers="trained"``: the LoRA-adapted layers of a LoRA model (same values as with all
    layers); a request for all layers computes again, a later "trained" request reuses them."""
    from src.finetune.load import load_task_model
    from src.statistics import trained_weights

    task_dir = demo_tasks["color_names"]
    module = load_task_model(task_dir)
    targets = {f"encoder.layer.{i}.{m}.weight" for i in range(2)
               for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")}
    assert trained_weights(module, task_dir) == targets
    from safetensors import safe_open

    with safe_open(str(full_task / "model.safetensors"), framework="pt") as f:
        full_names = set(f.keys())
    assert trained_weights(load_task_model(full_task), full_task) == full_names  # a full finetune: its weights
    assert base_linear_weights(full_task) < full_names
    dataset, collate = demo_split(task_dir, "val")
    examples = seeded_subset(dataset, 6, 0)
    everything = compute_statistics(module, examples, collate, KINDS, batch_size=4, accelerator="cpu", progress=False)
    trained = compute_statistics(module, examples, collate, KINDS, batch_size=4, accelerator="cpu", progress=False,
                                 layers="trained")
    for kind in KINDS:
        expected = {k: v for k, v in everything.tensors[kind].items() if k.rsplit(".", 1)[0] + ".weight" in targets}
        assert_close(trained.tensors[kind], expected, f"trained {kind}", rtol=1e-5)

    calls = []
    original = collect_mod.compute_statistics

    def recording(module, dataset, collate, kinds, **kwargs):
        calls.append((tuple(kinds), kwargs["layers"] if isinstance(kwargs["layers"], str) else "trained"))
        return original(module, dataset, collate, kinds, **kwargs)

    monkeypatch.setattr(collect_mod, "compute_statistics", recording)
    args = dict(kinds=["gram"], split="test", n=4, seed=2, accelerator="cpu", progress=False)
    path = collect_statistics(task_dir, layers="trained", **args)
    assert set(read_kind(task_dir, path.name, "gram")) == targets
    assert read_statistics_info(task_dir, path.name)["kinds"]["gram"]["layers"] == "trained"
    collect_statistics(task_dir, **args)  # all layers: not there yet
    assert set(read_kind(task_dir, path.name, "gram")) == base_linear_weights(task_dir)
    collect_statistics(task_dir, layers="trained", **args)  # all layers cover the trained ones
    assert calls == [(("gram",), "trained"), (("gram",), "all")]
    with pytest.raises(ValueError, match="layers must be"):
        collect_statistics(task_dir, layers="some", **args)


@pytest.mark.parametrize("one_by_one", [True, False])
def test_squared_example_gradients_both_ways(one_by_one, monkeypatch):
    """The CPU route (one example at a time, up to its last unmasked position) and the
    accelerator route (batched chunks) equal sum_n (g_n^T x_n)^2."""
    monkeypatch.setattr(collect_mod, "CHUNK_ELEMENTS", 2 * 7 * 5)  # chunks of two examples
    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(5, 4, 7, generator=g), torch.randn(5, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.float32)
    gm = grad * mask[..., None]
    expected = torch.einsum("nto,nti->noi", gm.double(), x.double()).square().sum(0)
    got = collect_mod.squared_example_gradients(gm, x, mask, one_by_one=one_by_one)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    empty = collect_mod.squared_example_gradients(gm[2:3], x[2:3], mask[2:3], one_by_one=one_by_one)
    assert empty.shape == (7, 5) and not empty.any()


def test_linear_layers_that_never_run_are_reported_not_silently_dropped(capsys):
    """nn.MultiheadAttention never calls its out_proj's forward: no statistics can be hooked there, so
    the layer is listed as skipped and said on stderr (a merge then averages it)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from src.statistics.collect import compute_statistics

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=False)
            return self.fc(h.mean(1))

    class Task(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Net()

        def unwrapped_model(self):
            return self.model

        def example_losses(self, batch):
            return F.cross_entropy(self.model(batch["x"]), batch["labels"], reduction="none")

    torch.manual_seed(0)
    data = [{"x": torch.randn(4, 8), "labels": torch.tensor(i % 3)} for i in range(6)]
    collate = lambda items: {k: torch.stack([d[k] for d in items]) for k in ("x", "labels")}  # noqa: E731
    stats = compute_statistics(Task(), data, collate, kinds=("fisher", "gram"), batch_size=3, accelerator="cpu",
                               progress=False)
    assert set(stats.tensors["gram"]) == {"fc.weight"} and set(stats.tensors["fisher"]) == {"fc.weight", "fc.bias"}
    assert stats.skipped["gram"] == ["attn.out_proj.weight"] and stats.skipped["fisher"] == ["attn.out_proj.weight"]
    assert "never ran their forward" in capsys.readouterr().err
