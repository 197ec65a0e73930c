"""The six KnOTS NLI tasks (docs/protocols.md B) as LightningDataModules of tokenized sentence pairs.

Every task model has a 3-way head (entailment, neutral, contradiction); the two-class tasks QNLI,
RTE and SciTail have ``label_names = ["entailment", "not_entailment"]`` and labels 0/1, and the
model masks its third logit. Where the test labels are hidden (GLUE's MNLI, QNLI, RTE) the official
validation split is the test set and validation is a seeded hold-out of train, as large as the
validation part KnOTS cut from those validation sets (20% / 20% / 50% of them). SNLI, SICK and
SciTail use their own validation and test splits. Rows without a gold label (SNLI's -1) are dropped.

=========  ==============================  ===================  ==================  =========================
task       hub id (config)                 columns              test split          validation
=========  ==============================  ===================  ==================  =========================
snli       stanfordnlp/snli                premise, hypothesis  test                validation
mnli       nyu-mll/glue (mnli)             premise, hypothesis  validation_matched  train hold-out, 0.2 x test
sick       RobZamp/sick (parquet branch)   sentence_A/B         test                validation
qnli       nyu-mll/glue (qnli)             question, sentence   validation          train hold-out, 0.2 x test
rte        nyu-mll/glue (rte)              sentence1/2          validation          train hold-out, 0.5 x test
scitail    allenai/scitail (tsv_format)    premise, hypothesis  test                validation
=========  ==============================  ===================  ==================  =========================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .splits import SplitDataModule, get_split, holdout, load_dataset_dict

THREE_WAY = ["entailment", "neutral", "contradiction"]
TWO_WAY = ["entailment", "not_entailment"]


@dataclass(frozen=True)
class NLISource:
    hub_id: str
    config: Optional[str]
    keys: tuple[str, str]
    label_map: dict = field(hash=False)  # raw label (int or str) -> our label id; other rows are dropped
    label_names: tuple[str, ...] = tuple(THREE_WAY)
    val_split: Optional[str] = "validation"  # None: hold out of train
    test_split: str = "test"
    val_holdout: float = 0.0  # held-out validation size, as a fraction of len(test)
    revision: Optional[str] = None


_GLUE2 = {0: 0, 1: 1}  # GLUE qnli/rte: 0 entailment, 1 not_entailment
NLI_SOURCES: dict[str, NLISource] = {
    "snli": NLISource("stanfordnlp/snli", None, ("premise", "hypothesis"), {0: 0, 1: 1, 2: 2}),
    "mnli": NLISource("nyu-mll/glue", "mnli", ("premise", "hypothesis"), {0: 0, 1: 1, 2: 2},
                      val_split=None, test_split="validation_matched", val_holdout=0.2),
    "sick": NLISource("RobZamp/sick", None, ("sentence_A", "sentence_B"), {0: 0, 1: 1, 2: 2},
                      revision="refs/convert/parquet"),
    "qnli": NLISource("nyu-mll/glue", "qnli", ("question", "sentence"), _GLUE2, tuple(TWO_WAY),
                      val_split=None, test_split="validation", val_holdout=0.2),
    "rte": NLISource("nyu-mll/glue", "rte", ("sentence1", "sentence2"), _GLUE2, tuple(TWO_WAY),
                     val_split=None, test_split="validation", val_holdout=0.5),
    "scitail": NLISource("allenai/scitail", "tsv_format", ("premise", "hypothesis"),
                         {"entails": 0, "neutral": 1}, tuple(TWO_WAY)),
}


def load_tokenizer(tokenizer):
    """A tokenizer object, or one loaded from a hub id / folder; decoders without a pad token pad with EOS."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PairCollate:
    """Rows with two text columns and a raw label -> ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, tokenizer, keys: tuple[str, str], label_map: dict, max_length: int):
        self.tokenizer, self.keys, self.label_map, self.max_length = tokenizer, keys, label_map, max_length

    def __call__(self, rows: list[dict]) -> dict:
        first, second = self.keys
        enc = self.tokenizer([r[first] for r in rows], [r[second] for r in rows], truncation=True,
                             max_length=self.max_length, padding="longest", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([self.label_map[r["label"]] for r in rows], dtype=torch.long)}


class NLIDataModule(SplitDataModule):
    """snli, mnli, sick (3 classes) or qnli, rte, scitail (2 classes) sentence-pair classification."""

    def __init__(self, task: str, tokenizer: Union[str, object], max_length: int = 256, batch_size: int = 32,
                 num_workers: int = 4, data_root: Optional[str] = None, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        if task not in NLI_SOURCES:
            raise ValueError(f"unknown NLI task {task!r}; known tasks: {', '.join(NLI_SOURCES)}")
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)
        self.task = task
        self.source = NLI_SOURCES[task]
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length = max_length
        self.data_root = data_root
        self.label_names: list[str] = list(self.source.label_names)
        self.templates = None

    def prepare_data(self) -> None:
        if self.data_root is None:
            load_dataset_dict(self.task, None, self.source.hub_id, self.source.config, self.source.revision)

    def _labelled(self, split):
        """Rows whose label is one of this task's labels (drops SNLI's -1 and hidden test labels)."""
        keep = [i for i, y in enumerate(split["label"]) if y in self.source.label_map]
        return split if len(keep) == len(split) else split.select(keep)

    def build_splits(self) -> dict:
        src = self.source
        dd = load_dataset_dict(self.task, self.data_root, src.hub_id, src.config, src.revision)
        missing = [k for k in (*src.keys, "label") if k not in dd[next(iter(dd))].column_names]
        if missing:
            raise ValueError(f"task {self.task!r}: data lacks columns {missing}")
        train = self._labelled(get_split(dd, ("train",), self.task, "train"))
        test = self._labelled(get_split(dd, (src.test_split,), self.task, "test"))
        if src.val_split is not None:
            val = self._labelled(get_split(dd, (src.val_split,), self.task, "validation"))
        else:
            kept, held = holdout(len(train), int(src.val_holdout * len(test)), self.seed)
            train, val = train.select(kept), train.select(held)
        return {"train": train, "val": val, "test": test}

    def collate_fn(self) -> PairCollate:
        return PairCollate(self.tokenizer, self.source.keys, self.source.label_map, self.max_length)
