"""The evaluation stage's one-base path (``ModelBank`` + ``Evaluator``) for every model family besides
the demo one: CLIP LoRA, Llama NLI LoRA (a 3-class and a masked 2-class task), mT5 full finetune
(rank classification) and ResNet-20 full (from scratch, both task models of one initialization).

Tiny models built from configs (random weights, no hub), as the finetune tests build them. Per
family two task checkpoints with perturbed weights (nothing is trained), then:

1. ``ModelBank`` serves both tasks from one base; with ``bank.task_state(t)`` swapped in, the task
   module's logits equal ``load_task_model(t)``'s (PEFT's own adapter loading for LoRA);
2. after the ``with`` block every base tensor is bit-identical to before;
3. a task-arithmetic merge (lam 0.5; ResNet also weight averaging without a base) swapped in with
   ``bank.merged_state`` gives the logits of ``load_task_model(a)`` whose base weights are set to
   ``W0 + 0.5 * (dW_a + dW_b)``, ``dW`` computed here from the checkpoint files (``B @ A * alpha / r``
   from the adapter, ``W_task - W0`` from ``model.safetensors``);
4. ``Evaluator.metrics`` over uneven synthetic batches gives the accuracy a plain loop over
   ``load_task_model``'s logits gives (mT5: its own ``evaluate_batch``, rank classification);
   ``Evaluator.predict`` gives the same logits and the class labels;
5. the run's selection sweeps (``Sweep(base=bank.base_state())`` + ``bank.with_updates``) give the
   same merged weights.

Only the Hugging Face CLIP backend is covered (open_clip is an optional extra, see test_clip.py).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from src.evaluate import ModelBank  # noqa: E402
from src.evaluate.loop import Evaluator  # noqa: E402
from src.finetune.base import LoraSpec  # noqa: E402
from src.finetune.export import export_task_checkpoint  # noqa: E402
from src.finetune.load import build_module, load_task_model  # noqa: E402
from src.merge import merge  # noqa: E402
from src.task_checkpoint import read_task_info  # noqa: E402

from tests.finetune.conftest import TINY_CLIP  # noqa: E402

LAM = 0.5
ATOL = 1e-5
BATCH_SIZES = (5, 3, 4)  # uneven: the split accuracy is sample-weighted, not a mean of batch means

LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
from tests.conftest import T5_WORDS as WORDS  # noqa: E402 (the tokenizer fixture's vocabulary)
TEMPLATES = ["a photo of a {}.", "a blurry picture of a {}."]


# ----- perturbation and synthetic data --------------------------------------------------------
@torch.no_grad()
def perturb(module, seed: int, select: Callable[[str], bool], std: float, replace: bool = False) -> None:
    """Move the selected trainable tensors away from their initial values (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.requires_grad and select(name):
            noise = std * torch.randn(p.shape, generator=g)
            p.copy_(noise) if replace else p.add_(noise)


def image_batches(num_classes: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
             "labels": torch.randint(0, num_classes, (n,), generator=g)} for n in BATCH_SIZES]


def nli_batches(num_classes: int, seed: int) -> list[dict]:
    """Token ids 3..63, some rows right-padded with the pad id (= eos, 2): the head reads the last
    non-pad token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in BATCH_SIZES:
        ids = torch.randint(3, LLAMA["vocab_size"], (n, 7), generator=g)
        mask = torch.ones_like(ids)
        for i in range(0, n, 2):
            cut = int(torch.randint(3, 7, (1,), generator=g))
            ids[i, cut:], mask[i, cut:] = 2, 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_classes, (n,), generator=g)})
    return out


def seq2seq_batches(tok, label_names: list[str], seed: int) -> list[dict]:
    """Random word sources; the target of each is one of the label names (rank classification)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in BATCH_SIZES:
        sources = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(1, 5, (1,), generator=g)),),
                                                                  generator=g)) for _ in range(n)]
        gold = torch.randint(0, len(label_names), (n,), generator=g)
        enc = tok(sources, padding=True, return_tensors="pt")
        lab = tok([label_names[int(i)] for i in gold], padding=True, return_tensors="pt")
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out




# ----- the task checkpoints of each family ------------------------------------------------------
def build_clip(root: Path, task: str, labels: list[str], seed: int) -> Path:
    from src.finetune.models.clip import ClipClassifier

    module = ClipClassifier(pretrained="tiny-clip", finetune="lora", model_config=copy.deepcopy(TINY_CLIP),
                            lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module.label_names = list(labels)
    module.build_model(module.label_names, TEMPLATES)
    perturb(module, seed, lambda n: "lora_" in n, 0.2, replace=True)
    return export_task_checkpoint(module, root / task, task)


def build_llama(root: Path, task: str, labels: list[str], seed: int) -> Path:
    from src.finetune.models.llama_nli import LlamaNLIClassifier

    module = LlamaNLIClassifier(pretrained="tiny-llama", model_config=dict(LLAMA), torch_dtype="float32",
                                lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    module.build_model(list(labels), None)
    # the LoRA factors and the task's own head (PEFT modules_to_save copy): different per task
    perturb(module, seed, lambda n: "lora_" in n, 0.1, replace=True)
    perturb(module, seed + 1, lambda n: "lora_" not in n, 0.3, replace=True)
    return export_task_checkpoint(module, root / task, task)


def build_mt5(tokenizer: str):
    def build(root: Path, task: str, labels: list[str], seed: int) -> Path:
        from src.finetune.models.mt5 import MT5Seq2Seq

        module = MT5Seq2Seq("tiny-mt5", tokenizer=tokenizer, model_config={**MT5, "vocab_size": len(WORDS) + 3})
        module.build_model(list(labels), None)
        perturb(module, seed, lambda n: True, 0.05)
        return export_task_checkpoint(module, root / task, task)

    return build


def build_resnet(root: Path, task: str, labels: list[str], seed: int) -> Path:
    from src.finetune.models.resnet import ResNetClassifier

    module = ResNetClassifier(width=1, clip_config=copy.deepcopy(TINY_CLIP), embed_dim=TINY_CLIP["projection_dim"],
                              init_seed=0)  # one initialization
    module.label_names = list(labels)
    module.build_model(module.label_names, TEMPLATES)
    perturb(module, seed, lambda n: True, 0.05)  # the whole network, its projection `proj` included
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # BatchNorm statistics move too (they are exported and merged)
        for name, buf in module.model.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.mul_(1 + 0.2 * torch.rand(buf.shape, generator=g))
    return export_task_checkpoint(module, root / task, task)


@dataclass
class Family:
    name: str
    kind: str  # lora | full
    tasks: dict  # task -> label names (the first is "a")
    build: Callable
    batches: Callable  # (task_dir, label_names, seed) -> batches
    merges: dict  # merged-dir name -> merge() keyword arguments ("base": "state" | "dir" | None)
    accuracy: Optional[Callable] = None  # (reference module, batches) -> accuracy; default argmax


def argmax_accuracy(module, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            correct += int((module.logits(b).argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return correct / total


def mt5_accuracy(module, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            c, n = module.evaluate_batch(b)
            correct, total = correct + int(c), total + int(n)
    return correct / total


def family_spec(name: str, tokenizer: str) -> Family:
    ta = {"method": "task_arithmetic", "params": {"lam": LAM}}
    if name == "clip":
        return Family(name, "lora", {"pets": ["cat", "dog", "car"], "scenes": ["forest", "beach"]}, build_clip,
                      lambda d, labels, seed: image_batches(len(labels), seed),
                      {"dense": {**ta, "base": "state", "save_as": "safetensors"}, "adapter": {**ta, "base": None}})
    if name == "llama":
        return Family(name, "lora", {"mnli": ["entailment", "neutral", "contradiction"], "rte": ["entailment", "not_entailment"]},
                      build_llama, lambda d, labels, seed: nli_batches(len(labels), seed),
                      {"adapter": {**ta, "base": None}, "dense": {**ta, "base": "state", "save_as": "safetensors"}})
    if name == "mt5":
        def batches(d, labels, seed):
            from transformers import AutoTokenizer

            return seq2seq_batches(AutoTokenizer.from_pretrained(tokenizer), labels, seed)

        return Family(name, "full", {"xnli": ["yes", "no maybe", "not sure"], "wic": ["a b", "c"]}, build_mt5(tokenizer),
                      batches, {"dense": {**ta, "base": "state"}}, mt5_accuracy)
    if name == "resnet":
        return Family(name, "full", {"cifar-0of2": ["cat", "dog", "ship"], "cifar-1of2": ["truck", "frog", "horse"]},
                      build_resnet, lambda d, labels, seed: image_batches(len(labels), seed),
                      {"dense": {**ta, "base": "dir"}, "average": {"method": "average", "params": {}, "base": None}})
    raise ValueError(name)


FAMILIES = ("clip", "llama", "mt5", "resnet")


@dataclass
class Setup:
    family: Family
    dirs: dict  # task -> task dir
    bank: ModelBank
    batches: dict  # task -> synthetic batches
    merged: dict  # name -> merged dir
    w0: dict  # a fresh base's state dict (independent of the bank)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory, t5_tokenizer_dir) -> Setup:
    family = family_spec(request.param, t5_tokenizer_dir)
    root = tmp_path_factory.mktemp(family.name)
    dirs = {task: family.build(root / "tasks", task, labels, seed=10 + i)
            for i, (task, labels) in enumerate(family.tasks.items())}
    bank = ModelBank(list(dirs.values()))
    batches = {task: family.batches(dirs[task], labels, 100 + i) for i, (task, labels) in enumerate(family.tasks.items())}
    first = next(iter(dirs.values()))
    w0 = {k: v.detach().clone() for k, v in build_module(read_task_info(first), first).load_base().state_dict().items()}
    merged = {}
    for name, spec in family.merges.items():
        spec = dict(spec)
        base = spec.pop("base")
        if base == "state":
            base = bank.base_state()
        elif base == "dir":  # a directory holding the base's model.safetensors (every tensor, buffers too)
            base = root / "base"
            base.mkdir()
            save_file({k: v.contiguous() for k, v in w0.items()}, str(base / "model.safetensors"))
            base = str(base)
        merge(spec.pop("method"), list(dirs.values()), base=base, output=root / "merged" / name, progress=False, **spec)
        merged[name] = root / "merged" / name
    return Setup(family, dirs, bank, batches, merged, w0)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator(accelerator="cpu", progress=False)


# ----- independent computations -------------------------------------------------------------
def task_update(task_dir: Path, w0: dict) -> dict[str, torch.Tensor]:
    """``dW`` of a task checkpoint, read from its files: ``alpha / r * B @ A`` per adapter module, or
    ``W_task - W0`` per floating-point tensor of ``model.safetensors``."""
    task_dir = Path(task_dir)
    if read_task_info(task_dir).kind == "lora":
        config = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
        assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
        scale = config["lora_alpha"] / config["r"]
        factors = load_file(str(task_dir / "adapter" / "adapter_model.safetensors"))
        out = {}
        for key, a in factors.items():
            if ".lora_A." in key:
                b = factors[key.replace(".lora_A.", ".lora_B.")]
                out[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = scale * b.double() @ a.double()
        return out
    weights = load_file(str(task_dir / "model.safetensors"))
    return {k: v.double() - w0[k].double() for k, v in weights.items() if v.is_floating_point()}


def expected_merge(setup: Setup) -> dict[str, torch.Tensor]:
    """``W0 + lam * (dW_a + dW_b)`` by parameter name."""
    a, b = (task_update(d, setup.w0) for d in setup.dirs.values())
    assert a.keys() == b.keys() and a
    return {k: (setup.w0[k].double() + LAM * (a[k] + b[k])).to(setup.w0[k].dtype) for k in a}


def reference_with_weights(task_dir: Path, weights: dict[str, torch.Tensor]):
    """``load_task_model(task_dir)`` (its head; PEFT's adapter removed) with its base weights set to ``weights``."""
    module = load_task_model(task_dir)
    if hasattr(module.model, "peft_config"):
        module.model = module.model.unload()  # the plain base with the task's head, adapter layers removed
    params = module.unwrapped_model().state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return module.eval()


def logits_of(module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module.logits(b).float() for b in batches])


def snapshot(bank) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bank.base.state_dict().items()}


def assert_bit_identical(bank, before) -> None:
    now = bank.base.state_dict()
    assert now.keys() == before.keys()
    changed = [k for k, v in now.items() if not torch.equal(v, before[k])]
    assert not changed, f"base tensors changed: {changed[:5]}"


def bank_logits(bank, task, state, batches) -> torch.Tensor:
    with bank.weights(state, "test"):
        return logits_of(bank.modules[task], batches)


# ----- the tests -------------------------------------------------------------------------------------
def test_one_base_serves_every_task(setup):
    bank, family = setup.bank, setup.family
    infos = [read_task_info(d) for d in setup.dirs.values()]
    assert len({i.base_model for i in infos}) == 1 and bank.base_model_id == infos[0].base_model
    assert {i.kind for i in infos} == {family.kind}
    if family.name == "resnet":  # from scratch: the "base" is the random initialization init_seed=0 names
        assert "#init-" in bank.base_model_id and all(i.hparams["module"]["init_args"]["init_seed"] == 0 for i in infos)
    for task, module in bank.modules.items():
        assert module.label_names == family.tasks[task]
        assert not any(p.requires_grad for p in module.parameters())
        own = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
        not_shared = [n for n, t in bank.base.state_dict(keep_vars=True).items() if id(t) not in own]
        # every base tensor is the module's, except a head stored inside the base (Llama's score):
        # each task has its own copy of it, and the base keeps its own value
        assert not_shared == (["score.weight"] if family.name == "llama" else []), task
        head = load_file(str(Path(setup.dirs[task]) / "head.safetensors"))
        for key, value in module.head_state_dict().items():
            torch.testing.assert_close(value, head[key], atol=0, rtol=0)
    for name, value in bank.base.state_dict().items():  # loading the heads changed no base tensor
        assert torch.equal(value, setup.w0[name]), name


def test_task_state_reproduces_load_task_model_and_restores_the_base(setup):
    bank = setup.bank
    before = snapshot(bank)
    for task, task_dir in setup.dirs.items():
        batches = setup.batches[task]
        reference = load_task_model(task_dir)
        want = logits_of(reference, batches)
        width = 3 if setup.family.name == "llama" else len(setup.family.tasks[task])  # Llama: 3 head slots
        assert want.shape == (sum(BATCH_SIZES), width)
        state = bank.task_state(task)
        got = bank_logits(bank, task, state, batches)
        assert_bit_identical(bank, before)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
        zeroshot = bank_logits(bank, task, None, batches)
        assert not torch.allclose(zeroshot, want, atol=1e-3)  # the swapped-in weights matter
        if setup.family.name == "llama" and len(setup.family.tasks[task]) == 2:
            assert torch.isneginf(got[:, 2]).all()  # the 2-class task's unused slot is masked
    assert_bit_identical(bank, before)


def test_merged_state_gives_the_independent_merged_model(setup):
    bank = setup.bank
    expected = expected_merge(setup)
    task_a, dir_a = next(iter(setup.dirs.items()))
    reference = reference_with_weights(dir_a, expected)
    before = snapshot(bank)
    for name, merged_dir in setup.merged.items():
        state = bank.merged_state(merged_dir, task_a)
        assert set(state) == set(expected), name
        for k, v in expected.items():
            torch.testing.assert_close(state[k].double(), v.double(), atol=1e-6, rtol=1e-6, msg=f"{name}: {k}")
        for task, batches in setup.batches.items():
            got = bank_logits(bank, task, state, batches)
            assert_bit_identical(bank, before)
            if task == task_a:
                want = logits_of(reference, batches)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL, msg=name)
                assert not torch.allclose(got, logits_of(load_task_model(dir_a), batches), atol=1e-3)
            else:  # the other task's head on the same merged weights
                other = reference_with_weights(setup.dirs[task], expected)
                torch.testing.assert_close(got, logits_of(other, batches), atol=ATOL, rtol=ATOL, msg=name)


def test_evaluator_accuracy_equals_a_plain_loop(setup, evaluator):
    bank = setup.bank
    accuracy = setup.family.accuracy or argmax_accuracy
    before = snapshot(bank)
    for task, task_dir in setup.dirs.items():
        batches = setup.batches[task]
        want = accuracy(load_task_model(task_dir), batches)
        with bank.weights(bank.task_state(task)):
            result = evaluator.metrics(bank.modules[task], DataLoader(batches, batch_size=None), "val")
        assert set(result.metrics) == {"acc"}
        assert result.metrics["acc"] == pytest.approx(want, abs=1e-6)
        assert_bit_identical(bank, before)
        with bank.weights(bank.task_state(task)):  # the test loop: the same steps
            test = evaluator.metrics(bank.modules[task], DataLoader(batches, batch_size=None), "test")
        assert test.metrics["acc"] == pytest.approx(want, abs=1e-6)
        assert_bit_identical(bank, before)


def test_evaluator_predict_gives_logits_and_class_labels(request, setup, evaluator):
    """The Ensemble's input: ``(logits (N, C), class ids (N,))`` from the module's ``predict_step``."""
    bank = setup.bank
    before = snapshot(bank)
    for task, task_dir in setup.dirs.items():
        batches = setup.batches[task]
        with bank.weights(bank.task_state(task)):
            logits, labels = evaluator.predict(bank.modules[task], DataLoader(batches, batch_size=None))
        assert_bit_identical(bank, before)
        torch.testing.assert_close(logits, logits_of(load_task_model(task_dir), batches), atol=ATOL, rtol=ATOL)
        assert labels.shape == (sum(BATCH_SIZES),)
        if setup.family.name == "mt5":  # labels hold the gold answer's tokens: its index among the label names
            module = bank.modules[task]
            names = [n.strip() for n in module.label_names]
            texts = [t for b in batches for t in module.tokenizer.batch_decode(
                b["labels"].masked_fill(b["labels"] == -100, module.tokenizer.pad_token_id), skip_special_tokens=True)]
            want = torch.tensor([names.index(t.strip()) for t in texts])
        else:
            want = torch.cat([b["labels"] for b in batches])
        assert torch.equal(labels, want)


def test_sweep_on_the_bank_base_state(setup):
    """The run's selection sweeps: ``Sweep(base=bank.base_state())`` merged updates, ``bank.with_updates``."""
    from src.merge import Sweep

    bank = setup.bank
    expected = expected_merge(setup)
    sweep = Sweep("task_arithmetic", list(setup.dirs.values()), base=bank.base_state(), progress=False)
    state = bank.with_updates(sweep.merge({"lam": LAM}, as_updates=True))
    assert set(state) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(state[k].double(), v.double(), atol=1e-6, rtol=1e-6, msg=k)
    task_a, dir_a = next(iter(setup.dirs.items()))
    before = snapshot(bank)
    got = bank_logits(bank, task_a, state, setup.batches[task_a])
    assert_bit_identical(bank, before)
    torch.testing.assert_close(got, logits_of(reference_with_weights(dir_a, expected), setup.batches[task_a]),
                               atol=ATOL, rtol=ATOL)
