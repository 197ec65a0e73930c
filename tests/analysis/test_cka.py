"""src/analysis/cka.py: linear CKA against hand-worked cases and its invariances; the streamed
form; the task-update analysis end to end on tiny demo-family task models (the evaluation
tests' builder), each kind checked at a layer against a direct NumPy computation on the inputs
of one forward pass of the pretrained model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from src.analysis.cka import (CenteredMoments, StreamingLinearCKA, _make_plan, _plan_cka, cka_analysis, linear_cka,
                              main, pair_name)
from src.merge.updates import LowRank
from tests.evaluate.conftest import TOKENIZER, build_task_checkpoint, datamodule_spec, plain_module, tiny_bert

TASKS = ("bbc_news", "color_names")
LAYER = "encoder.layer.1.attention.self.value"  # its input is layer 0's output: a real forward pass
N = 6


# ----------------------------------------------------------------------------- linear CKA
def hand_cka(X, Y) -> float:
    """The definition written out: H = I - 11^T/n, K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H), CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    X, Y = np.asarray(X, float), np.asarray(Y, float)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


X_SMALL = [[1, 0, 2], [0, 1, 1], [3, 1, 0], [1, 2, 2], [2, 0, 1]]
Y_SMALL = [[1, 1], [0, 2], [2, 0], [1, 3], [2, 2]]


def test_linear_cka_matches_the_definition_on_a_small_example():
    expected = hand_cka(X_SMALL, Y_SMALL)
    assert 0.05 < expected < 0.95  # a case that is neither trivial end
    for method in ("auto", "features", "gram"):
        assert linear_cka(np.array(X_SMALL), np.array(Y_SMALL), method=method) == pytest.approx(expected, abs=1e-12)


def test_linear_cka_known_values():
    # one feature each: CKA is the squared Pearson correlation. Centered x = (-1.5, -.5, .5, 1.5),
    # y = (-1.5, .5, -.5, 1.5): x.y = 4, |x|^2 = |y|^2 = 5, so corr = 0.8 and CKA = 0.64.
    assert linear_cka([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.64, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    A, B = torch.randn(2000, 5, generator=g), torch.randn(2000, 5, generator=g)
    assert linear_cka(A, B) < 0.02  # independent: E[CKA] ~ d/n here
    assert math.isnan(linear_cka(torch.ones(5, 2), X[:5]))  # a constant matrix has no CKA


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64)
    base = linear_cka(X, Y)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-12)  # orthogonal transform of the features
    assert linear_cka(3.7 * X, Y) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert linear_cka(X + 10.0, Y - 3.0) == pytest.approx(base, abs=1e-12)  # offsets (centering)
    D = torch.diag(torch.tensor([1.0, 6.0, 0.2, 1.0], dtype=torch.float64))
    assert abs(linear_cka(X @ D, Y) - base) > 1e-2  # NOT invariant to a non-isotropic scaling


def test_gram_form_when_features_outnumber_samples():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(10, 300, generator=g), torch.randn(10, 200, generator=g)
    expected = hand_cka(X.double().numpy(), Y.double().numpy())
    assert linear_cka(X, Y, method="gram") == pytest.approx(expected, abs=1e-12)
    assert linear_cka(X, Y, method="features") == pytest.approx(expected, abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(expected, abs=1e-12)


def test_streamed_cka_equals_the_batch_formula_with_large_offsets_and_weights():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 5, generator=g, dtype=torch.float64) + 1e6  # means that would cancel raw sums away
    Y = X[:, :3] * 2 + torch.randn(300, 3, generator=g, dtype=torch.float64)
    acc = StreamingLinearCKA()
    for i in range(0, 300, 37):
        acc.update(X[i:i + 37], Y[i:i + 37])
    assert acc.value() == pytest.approx(linear_cka(X, Y), abs=1e-9)
    keep = torch.rand(300, generator=g) < 0.6  # zero weights leave samples out (padded tokens)
    acc = StreamingLinearCKA()
    for i in range(0, 300, 50):
        acc.update(X[i:i + 50], Y[i:i + 50], weights=keep[i:i + 50].double())
    assert acc.value() == pytest.approx(linear_cka(X[keep], Y[keep]), abs=1e-9)


@pytest.mark.parametrize("in_features", [8, 32])  # 10-12 stacked rows: >= 8 (identity P) or < 32 (stacked P)
def test_layer_plans_match_direct_outputs(in_features):
    g = torch.Generator().manual_seed(4)
    ups = [LowRank(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(6, in_features, generator=g,
                   dtype=torch.float64), 0.5 + i) for i in range(2)]
    X = torch.randn(90, in_features, generator=g, dtype=torch.float64) + 3.0
    for kind in ("full", "lora", "knots"):
        plan = _make_plan(kind, "layer", ups, in_features, 1e-5, False)
        assert (plan.P is None) == (in_features == 8)  # full: 2 x 5 rows of dW, LoRA: 2 x 6 of A, KnOTS: 2 x 5 of V^T
        for i in range(0, 90, 40):
            plan.moments.update(X[i:i + 40] if plan.P is None else X[i:i + 40] @ plan.P.T)
        got = _plan_cka(plan, ["a", "b"])[pair_name("a", "b")]
        if kind == "knots":
            _, S, Vh = np.linalg.svd(np.concatenate([u.dense().numpy() for u in ups], axis=1), full_matrices=False)
            k = int((S > 1e-5).sum())
            outs = [X.numpy() @ Vh[:k, i * in_features:(i + 1) * in_features].T for i in range(2)]
        else:
            outs = [X.numpy() @ u.dense().numpy().T for u in ups]
        assert got == pytest.approx(hand_cka(*outs), abs=1e-9)


# ----------------------------------------------------------------------------- tiny task models
@pytest.fixture(scope="module")
def lora_tasks(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [build_task_checkpoint(root, task, seed=300 + i) for i, task in enumerate(TASKS)]


def build_full_checkpoint(root: Path, task: str, seed: int) -> Path:
    """A full-finetune task checkpoint: the tiny BERT with every encoder weight perturbed."""
    from src.finetune.data.demo import DEMO_TASKS
    from src.finetune.export import export_task_checkpoint
    from src.finetune.models.demo_text import DemoTextClassifier

    module = DemoTextClassifier(pretrained="tiny-bert", finetune="full", model_config=tiny_bert(), tokenizer=TOKENIZER)
    spec = DEMO_TASKS[task]
    module.label_names = list(spec.label_names)
    module.build_model(module.label_names, list(spec.templates))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if name.startswith("encoder."):  # biases too: the analysis' dW x must not see them
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return export_task_checkpoint(module, root / task, task, extra_hparams={"datamodule": datamodule_spec(task)})


@pytest.fixture(scope="module")
def full_tasks(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("full")
    return [build_full_checkpoint(root, task, seed=400 + i) for i, task in enumerate(TASKS)]


def layer_inputs(result, layer: str, pool: str = "tokens") -> np.ndarray:
    """The input of ``layer`` in a forward pass of the pretrained model (a fresh one, built here)
    over the examples the analysis recorded, batched as it batches them; unpadded tokens only
    (``pool="mean"``: each example's mean over them)."""
    from src.finetune.data.demo import DemoDataModule

    rows = []
    for entry in result.document["tasks"]:
        module = plain_module(entry["path"])  # base weights only: no update added
        spec = json.loads((Path(entry["path"]) / "task.json").read_text())["hparams"]["datamodule"]["init_args"]
        dm = DemoDataModule(**spec)
        split = result.document["data"]["split"]
        dm.setup("validate" if split == "val" else "test")
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        batch = loader.collate_fn([loader.dataset[i] for i in entry["indices"]])  # n <= eval batch: one batch
        seen = []
        linear = dict(module.model.named_modules())[layer]
        handle = linear.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            module.logits(batch)
        handle.remove()
        x, mask = seen[0].double(), batch["attention_mask"].bool()
        if pool == "mean":
            m = mask[..., None].double()
            rows.append(((x * m).sum(1) / m.sum(1)).numpy())
        else:
            rows.append(x[mask].numpy())
    return np.concatenate(rows)


def adapter_update(task_dir: Path, layer: str) -> np.ndarray:
    """``scale B A`` read from the adapter files directly."""
    from safetensors.torch import load_file

    cfg = json.loads((task_dir / "adapter" / "adapter_config.json").read_text())
    w = load_file(str(task_dir / "adapter" / "adapter_model.safetensors"))
    A = w[f"base_model.model.{layer}.lora_A.weight"].double().numpy()
    B = w[f"base_model.model.{layer}.lora_B.weight"].double().numpy()
    return (cfg["lora_alpha"] / cfg["r"]) * B @ A


def knots_outputs(X: np.ndarray, updates: list[np.ndarray]) -> list[np.ndarray]:
    """``V_i^T x`` from NumPy's SVD of ``[dW_1 dW_2]`` (components with s > 1e-5)."""
    _, S, Vh = np.linalg.svd(np.concatenate(updates, axis=1), full_matrices=False)
    k, width = int((S > 1e-5).sum()), updates[0].shape[1]
    return [X @ Vh[:k, i * width:(i + 1) * width].T for i in range(len(updates))]


# ----------------------------------------------------------------------------- the analysis
def test_lora_analysis_end_to_end(lora_tasks):
    result = cka_analysis(lora_tasks, ["lora", "knots", "full"], n=N, split="val", seed=0)
    pair = pair_name(*TASKS)
    doc = result.document
    assert doc["pairs"] == [pair]
    assert [t["examples"] for t in doc["tasks"]] == [N, N]
    expected_layers = [f"encoder.layer.{i}.attention.{m}" for i in range(2)
                       for m in ("self.query", "self.key", "self.value", "output.dense")]
    for kind in ("lora", "knots", "full"):
        per_layer = result.per_layer(kind)
        assert list(per_layer) == expected_layers  # every attention projection, nothing else
        values = [v[pair] for v in per_layer.values()]
        assert all(v is not None and -1e-12 <= v <= 1 + 1e-12 for v in values)
        assert result.per_pair(kind)[pair] == pytest.approx(np.mean(values), abs=1e-12)
        assert result.average(kind) == pytest.approx(np.mean(values), abs=1e-12)
        assert len([r for r in result.rows if r["kind"] == kind]) == len(expected_layers)
    # LoRA branch = the update dW x: the factored and the dense routes agree at every layer
    for layer, v in result.per_layer("lora").items():
        assert result.per_layer("full")[layer][pair] == pytest.approx(v[pair], abs=1e-9)

    X = layer_inputs(result, LAYER)
    assert doc["data"]["samples_per_layer"][LAYER] == X.shape[0]  # unpadded tokens of the 2 x 6 examples
    updates = [adapter_update(d, LAYER) for d in lora_tasks]
    lora = hand_cka(*[X @ dw.T for dw in updates])
    knots = hand_cka(*knots_outputs(X, updates))
    assert result.per_layer("lora")[LAYER][pair] == pytest.approx(lora, abs=1e-8)
    assert result.per_layer("knots")[LAYER][pair] == pytest.approx(knots, abs=1e-8)
    assert abs(knots - lora) > 1e-3  # the two kinds measure different things here


def test_mean_pooled_samples(lora_tasks):
    result = cka_analysis(lora_tasks, "knots", n=N, split="val", seed=1, samples="mean",
                          layers=r"layer\.1\.attention\.self\.value$")
    assert list(result.per_layer("knots")) == [LAYER]
    X = layer_inputs(result, LAYER, pool="mean")
    assert X.shape[0] == 2 * N
    expected = hand_cka(*knots_outputs(X, [adapter_update(d, LAYER) for d in lora_tasks]))
    assert result.per_layer("knots")[LAYER][pair_name(*TASKS)] == pytest.approx(expected, abs=1e-8)


def test_full_finetunes_layer_output_minus_pretrained_output(full_tasks):
    from src.finetune.load import load_task_model

    result = cka_analysis(full_tasks, ["full", "knots"], n=N, split="test", seed=0)
    pair = pair_name(*TASKS)
    X = layer_inputs(result, LAYER)
    base_layer = dict(plain_module(full_tasks[0]).model.named_modules())[LAYER]
    diffs, updates = [], []
    with torch.no_grad():
        for d in full_tasks:
            task_layer = dict(load_task_model(d).unwrapped_model().named_modules())[LAYER]
            x = torch.from_numpy(X).float()
            # what the layer outputs minus what the pretrained layer outputs, biases included
            diffs.append((task_layer(x) - base_layer(x)).double().numpy())
            updates.append((task_layer.weight - base_layer.weight).double().numpy())
            assert not torch.equal(task_layer.bias, base_layer.bias)
    assert result.per_layer("full")[LAYER][pair] == pytest.approx(hand_cka(*diffs), abs=1e-6)  # float32 layers
    assert result.per_layer("knots")[LAYER][pair] == pytest.approx(hand_cka(*knots_outputs(X, updates)), abs=1e-8)
    for kind in ("full", "knots"):
        assert all(0 <= v[pair] <= 1 + 1e-12 for v in result.per_layer(kind).values())
    with pytest.raises(ValueError, match="full finetune"):
        cka_analysis(full_tasks, "lora", n=2)


def test_command_line_writes_json_markdown_and_png(lora_tasks, tmp_path, capsys):
    out = tmp_path / "cka"
    args = ["--tasks", json.dumps([str(d) for d in lora_tasks]), "--kind", "[lora, knots]", "--n", "4",
            "--output", str(out), "--progress", "false"]
    assert main(args) == 0
    doc = json.loads((out / "cka.json").read_text())
    assert list(doc["results"]) == ["lora", "knots"]
    assert doc["data"]["n"] == 4 and [t["examples"] for t in doc["tasks"]] == [4, 4]
    pair = pair_name(*TASKS)
    direct = cka_analysis(lora_tasks, ["lora", "knots"], n=4)
    for kind in ("lora", "knots"):
        assert doc["results"][kind]["average"] == pytest.approx(direct.average(kind), abs=1e-12)
        assert doc["results"][kind]["pairs"][pair] == pytest.approx(direct.per_pair(kind)[pair], abs=1e-12)
    md = (out / "cka.md").read_text()
    assert f"| {LAYER} |" in md and "| kind | " + pair + " | average |" in md
    assert (out / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 0  # an earlier CKA output is replaced
    inside = ["--tasks", json.dumps([str(d) for d in lora_tasks]), "--output", str(lora_tasks[0] / "cka")]
    assert main(inside) == 2  # never written into an input
    assert not (lora_tasks[0] / "cka").exists()
    assert "error:" in capsys.readouterr().err
