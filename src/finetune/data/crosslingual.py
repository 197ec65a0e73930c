"""Cross-lingual seq2seq tasks of the compositional-generalization paper (docs/protocols.md D) for mT5.

Each example becomes (source text, target text) through a prompt; ``labels`` are always the
target ids with padding set to -100 (what the seq2seq loss ignores).

* Classification tasks (XNLI, WiC / XL-WiC, TyDiQA answerability) expose ``label_names`` = the
  answer choices. Rank classification scores every choice by the log-likelihood of its target
  tokens and predicts the best, so each batch carries the choices tokenized as targets,
  ``choice_ids`` (B, C, T), -100 padded (also under ``choice_labels``, the name
  :class:`src.finetune.models.mt5.MT5Seq2Seq` reads), and ``class_index`` (B,), the gold choice.
* Generation tasks (SQuAD / XQuAD, WikiLingua) have ``label_names = None`` and carry
  ``targets`` (the target string) and ``references`` (every gold string, e.g. all SQuAD answers,
  for EM/F1 and ROUGE).

``task`` is ``"<task>-<language>"`` (one task model per pair); ``base_task`` and ``language`` keep
the parts. Sources and splits (the paper's, with seeded hold-outs instead of "the last N rows"):

===========  ==================================  ==================================================
task         hub id (config)                     splits
===========  ==================================  ==================================================
squad en     rajpurkar/squad                     train - 1000 held out (val); test = validation
squad xx     google/xquad (xquad.xx)             validation only: 200 held out = test, rest = val
xnli         facebook/xnli (xx)                  train / validation / test
wiki_lingua  esdurmus/wiki_lingua (language      train only: 1000 val + 2500 test held out
             name; parquet branch)
wic en       aps/super_glue (wic)                train - 1000 held out (val); test = validation
wic de/fr/it pasinit/xlwic (xlwic_xx_xx;         train / validation / test
             parquet branch)
wic other    pasinit/xlwic (xlwic_en_xx)         validation / test only (evaluation)
tydiqa       google-research-datasets/tydiqa     rows of that language; train - 1000 held out (val);
             (primary_task)                      test = validation
===========  ==================================  ==================================================

The paper used promptsource templates machine-translated into each language (a modified
promptsource); the English promptsource templates below are used for every language.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .nli import load_tokenizer
from .splits import SplitDataModule, get_split, holdout, load_dataset_dict, three_way

LANGUAGE_NAMES = {"ar": "arabic", "bn": "bengali", "cs": "czech", "de": "german", "en": "english", "es": "spanish",
                  "fi": "finnish", "fr": "french", "hi": "hindi", "id": "indonesian", "it": "italian",
                  "ja": "japanese", "ko": "korean", "nl": "dutch", "pt": "portuguese", "ru": "russian",
                  "sw": "swahili", "te": "telugu", "th": "thai", "tr": "turkish", "vi": "vietnamese",
                  "zh": "chinese"}
LANGUAGES = {
    "squad": ("en", "ar", "de", "el", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"),
    "xnli": ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"),
    "wiki_lingua": ("ar", "cs", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "nl", "pt", "ru", "th",
                    "tr", "vi", "zh"),
    "wic": ("en", "de", "fr", "it", "bg", "da", "et", "fa", "hr", "ja", "ko", "nl", "zh"),
    "tydiqa": ("ar", "bn", "en", "fi", "id", "ja", "ko", "ru", "sw", "te", "th"),
}
ALIASES = {"xquad": "squad", "xlwic": "wic", "xl-wic": "wic", "wikilingua": "wiki_lingua"}


@dataclass(frozen=True)
class Prompt:
    """``source.format(**fields)`` -> input text; target = ``choices[label]`` or ``target.format(**fields)``."""

    source: str
    target: Optional[str] = None
    choices: Optional[tuple[str, ...]] = None


PROMPTS = {  # English promptsource templates (names in comments)
    "squad": Prompt("{context}\n\nQ: {question}\n\nA:", "{answer}"),  # squad "answer_given_context_and_question"
    "xnli": Prompt("{premise}\nQuestion: {hypothesis} True, False, or Neither?",  # "GPT-3 style"
                   choices=("True", "Neither", "False")),
    "wiki_lingua": Prompt("{document}\n\nTL;DR:", "{summary}"),  # GEM/wiki_lingua "tldr", language-neutral
    "wic": Prompt("{sentence1}\n{sentence2}\nQuestion: Is the word '{word}' used in the same way in the two "
                  "sentences above?", choices=("No", "Yes")),  # super_glue/wic "GPT-3-prompt"
    "tydiqa": Prompt("Question: {question}\nAnswer the question with Yes or No. If it is not possible then answer "
                     "None.\nHint: {document}", choices=("Yes", "No", "None")),  # tydiqa "yes_no_none"
}

# raw row -> prompt fields (+ "label" for classification, "references" for generation)
_TYDIQA_LABELS = {"YES": 0, "NO": 1, "NONE": 2}
FIELDS: dict[str, Callable[[dict], dict]] = {
    "squad": lambda r: {"context": r["context"], "question": r["question"], "answer": r["answers"]["text"][0],
                        "references": list(r["answers"]["text"])},
    "xnli": lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": int(r["label"])},
    "wiki_lingua": lambda r: {"document": r["article"]["document"][0], "summary": r["article"]["summary"][0],
                              "references": [r["article"]["summary"][0]]},
    "wic": lambda r: {"sentence1": r.get("sentence1", r.get("context_1")),
                      "sentence2": r.get("sentence2", r.get("context_2")),
                      "word": r.get("word", r.get("target_word")), "label": int(r["label"])},
    "tydiqa": lambda r: {"question": r["question_text"], "document": r["document_plaintext"],
                         "label": _TYDIQA_LABELS[r["annotations"]["yes_no_answer"][0]]},
}


@dataclass(frozen=True)
class Source:
    hub_id: str
    config: Optional[str]
    layout: str  # how the splits are made: see CrossLingualDataModule.build_splits
    revision: Optional[str] = None


def resolve_source(task: str, language: str) -> Source:
    """Where (task, language) comes from and how it is split (the table in the module docstring)."""
    if task == "squad":
        return Source("rajpurkar/squad", None, "holdout_val") if language == "en" else \
            Source("google/xquad", f"xquad.{language}", "validation_only")
    if task == "xnli":
        return Source("facebook/xnli", language, "official")
    if task == "wiki_lingua":
        return Source("esdurmus/wiki_lingua", LANGUAGE_NAMES[language], "train_only", "refs/convert/parquet")
    if task == "wic":
        if language == "en":
            return Source("aps/super_glue", "wic", "holdout_val")
        if language in ("de", "fr", "it"):
            return Source("pasinit/xlwic", f"xlwic_{language}_{language}", "official", "refs/convert/parquet")
        return Source("pasinit/xlwic", f"xlwic_en_{language}", "eval_only", "refs/convert/parquet")
    if task == "tydiqa":
        return Source("google-research-datasets/tydiqa", "primary_task", "holdout_val")
    raise ValueError(f"unknown cross-lingual task {task!r}")


VAL_HOLDOUT, XQUAD_TEST, WIKI_VAL, WIKI_TEST = 1000, 200, 1000, 2500


class Seq2SeqCollate:
    """Raw rows -> prompt -> ``input_ids``/``attention_mask``/``labels`` (+ choices and ``class_index``,
    or ``targets`` and ``references``)."""

    def __init__(self, tokenizer, task: str, max_source_length: int, max_target_length: int):
        self.tokenizer, self.task = tokenizer, task
        self.prompt = PROMPTS[task]
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.choice_ids = self._targets(list(self.prompt.choices)) if self.prompt.choices else None

    def _targets(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(text_target=texts, max_length=self.max_target_length, truncation=True,
                             padding="longest", return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def __call__(self, rows: list[dict]) -> dict:
        fields = [FIELDS[self.task](r) for r in rows]  # looked up here: lambdas do not pickle to workers
        sources = [self.prompt.source.format(**f) for f in fields]
        enc = self.tokenizer(sources, max_length=self.max_source_length, truncation=True, padding="longest",
                             return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.prompt.choices:
            gold = torch.tensor([f["label"] for f in fields], dtype=torch.long)
            batch["labels"] = self.choice_ids[gold]  # the gold choice's target ids
            batch["choice_ids"] = batch["choice_labels"] = self.choice_ids.unsqueeze(0).repeat(len(rows), 1, 1)
            batch["class_index"] = gold
        else:
            targets = [self.prompt.target.format(**f) for f in fields]
            batch["labels"] = self._targets(targets)
            batch["targets"] = targets
            batch["references"] = [f["references"] for f in fields]
        return batch


class CrossLingualDataModule(SplitDataModule):
    """One (task, language) of squad/xquad, xnli, wiki_lingua, wic/xlwic, tydiqa as seq2seq batches."""

    def __init__(self, task: str, language: str, tokenizer, max_source_length: int = 512,
                 max_target_length: int = 128, batch_size: int = 8, num_workers: int = 4,
                 data_root: Optional[str] = None, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        base = ALIASES.get(task, task)
        if base not in LANGUAGES:
            raise ValueError(f"unknown cross-lingual task {task!r}; known tasks: {', '.join(LANGUAGES)}")
        if language not in LANGUAGES[base]:
            raise ValueError(f"task {task!r} has no language {language!r}; available: {', '.join(LANGUAGES[base])}")
        self.save_hyperparameters(ignore=["tokenizer"] if not isinstance(tokenizer, str) else None)
        self.base_task, self.language, self.task = base, language, f"{base}-{language}"
        self.source = resolve_source(base, language)
        self.prompt = PROMPTS[base]
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.data_root = data_root
        self.label_names: Optional[list[str]] = list(self.prompt.choices) if self.prompt.choices else None
        self.templates = None

    @property
    def is_generation(self) -> bool:
        return self.label_names is None

    def prepare_data(self) -> None:
        if self.data_root is None:
            load_dataset_dict(self.task, None, self.source.hub_id, self.source.config, self.source.revision)

    def _usable(self, split):
        """Rows this (task, language) can use: TyDiQA rows of the language, WikiLingua rows with a document."""
        if self.base_task == "tydiqa":
            name = LANGUAGE_NAMES[self.language]
            return split.select([i for i, lang in enumerate(split["language"]) if lang == name])
        if self.base_task == "wiki_lingua":
            return split.select([i for i, a in enumerate(split["article"]) if len(a["document"]) > 0])
        return split

    def build_splits(self) -> dict:
        dd = load_dataset_dict(self.task, self.data_root, self.source.hub_id, self.source.config,
                               self.source.revision)

        def get(name):
            return self._usable(get_split(dd, (name,), self.task, name))

        layout, seed = self.source.layout, self.seed
        if layout == "official":
            return {"train": get("train"), "val": get("validation"), "test": get("test")}
        if layout == "eval_only":
            return {"train": None, "val": get("validation"), "test": get("test")}
        if layout == "holdout_val":
            train = get("train")
            kept, held = holdout(len(train), min(VAL_HOLDOUT, len(train) // 2), seed)
            return {"train": train.select(kept), "val": train.select(held), "test": get("validation")}
        if layout == "validation_only":
            data = get("validation")
            val, test = holdout(len(data), min(XQUAD_TEST, len(data) // 2), seed)
            return {"train": None, "val": data.select(val), "test": data.select(test)}
        if layout == "train_only":
            data = get("train")
            n_val, n_test = min(WIKI_VAL, len(data) // 4), min(WIKI_TEST, len(data) // 4)
            tr, val, test = three_way(len(data), n_val, n_test, seed)
            return {"train": data.select(tr), "val": data.select(val), "test": data.select(test)}
        raise ValueError(f"task {self.task!r}: unknown split layout {layout!r}")

    def collate_fn(self) -> Seq2SeqCollate:
        return Seq2SeqCollate(self.tokenizer, self.base_task, self.max_source_length, self.max_target_length)
