"""Metrics of generated text: SQuAD exact match / F1 (QA) and SP-ROUGE (summarization).

Every score is a fraction in [0, 1] (not a percentage) and a *mean of per-example scores*, so a
split's score is the sum of its examples' scores over their number: accumulating per-example
scores batch by batch (``*_scores`` functions, what the mT5 task module does, DDP-synced) gives
exactly the number the whole-split functions give.

Exact match / F1 follow the official SQuAD v1.1 ``evaluate-v1.1.py`` rules: answers are
normalized (lowercase, punctuation removed, the articles a/an/the removed, whitespace collapsed),
F1 is the bag-of-tokens F1 of the normalized whitespace tokens, and an example scores the maximum
over its references. ``torchmetrics.text.SQuAD`` implements the same normalization but uses the
SQuAD 2.0 rule for empty answers (F1 1 when both normalize to nothing; v1.1 gives 0), reports
percentages and sums in float32, hence this small implementation (cross-checked against
torchmetrics in ``tests/evaluate/test_text_metrics.py``).

SP-ROUGE is ROUGE-1/2/L (F-measure) over the SentencePiece pieces of the mT5 tokenizer
(``tokenizer.tokenize(text)``), which works for every script (whitespace tokenization does not
split Thai or Chinese into words). It is computed with ``torchmetrics``' ROUGE with an identity
normalizer: its default normalizer keeps only ``[a-z0-9]`` and would delete Thai/Chinese text.
Text is not lowercased or stemmed (as Google's ``rouge-score`` ``RougeScorer(tokenizer=...)``).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Callable, Sequence, Union

Refs = Union[str, Sequence[str]]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


# ----- SQuAD exact match / F1 ---------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _ref_list(refs: Refs) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("an example needs at least one reference")
    if not all(isinstance(r, str) for r in refs):
        raise TypeError("references must be strings")
    return refs


def _exact_match_one(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _f1_one(pred: str, ref: str) -> float:
    pred_tokens, ref_tokens = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # also when either side is empty (v1.1)
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, refs: Refs) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    return max(_exact_match_one(pred, r) for r in _ref_list(refs))


def f1(pred: str, refs: Refs) -> float:
    """Token F1 of the normalized answers, the maximum over the references."""
    return max(_f1_one(pred, r) for r in _ref_list(refs))


def _check_pairs(preds: Sequence[str], refs_list: Sequence[Any]) -> None:
    if isinstance(preds, str):
        raise TypeError("preds must be a sequence of strings, not one string")
    if len(preds) != len(refs_list):
        raise ValueError(f"{len(preds)} predictions but {len(refs_list)} reference lists")


def em_f1_scores(preds: Sequence[str], refs_list: Sequence[Refs]) -> dict[str, list[float]]:
    """Per-example ``{"em": [...], "f1": [...], "em_f1": [...]}`` (``em_f1`` = (em + f1) / 2)."""
    _check_pairs(preds, refs_list)
    em = [exact_match(p, r) for p, r in zip(preds, refs_list)]
    f = [f1(p, r) for p, r in zip(preds, refs_list)]
    return {"em": em, "f1": f, "em_f1": [(a + b) / 2 for a, b in zip(em, f)]}


def em_f1(preds: Sequence[str], refs_list: Sequence[Refs]) -> dict[str, float]:
    """``{"em", "f1", "em_f1"}`` over a split: means over examples; ``em_f1`` is the mean of the two."""
    scores = em_f1_scores(preds, refs_list)
    if not preds:
        raise ValueError("no predictions")
    em, f = _mean(scores["em"]), _mean(scores["f1"])
    return {"em": em, "f1": f, "em_f1": (em + f) / 2}


# ----- SP-ROUGE ----------------------------------------------------------------------------
def _keep_text(text: str) -> str:
    return text


def _tokenize_fn(tokenizer) -> Callable[[str], Sequence[str]]:
    if hasattr(tokenizer, "tokenize"):
        return tokenizer.tokenize
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must have .tokenize(str) -> list[str], got {type(tokenizer).__name__}")


def sp_rouge_scores(preds: Sequence[str], refs: Sequence[Refs], tokenizer) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measures over ``tokenizer.tokenize`` pieces and their mean
    ``sp_rouge``. Several references: per ROUGE type, the reference with the best F-measure
    (``rouge-score``'s ``score_multi``, torchmetrics' ``accumulate="best"``)."""
    from torchmetrics.functional.text import rouge_score

    _check_pairs(preds, refs)
    tokenize = _tokenize_fn(tokenizer)
    out: dict[str, list[float]] = {k: [] for k in (*ROUGE_KEYS, "sp_rouge")}
    for pred, ref in zip(preds, refs):
        ref = _ref_list(ref)
        scores = rouge_score(pred, ref, accumulate="best",  # one prediction, its list of references
                             normalizer=_keep_text, tokenizer=tokenize, rouge_keys=("rouge1", "rouge2", "rougeL"))
        values = [float(scores[f"{k}_fmeasure"]) for k in ROUGE_KEYS]
        for key, value in zip(ROUGE_KEYS, values):
            out[key].append(value)
        out["sp_rouge"].append(sum(values) / len(values))
    return out


def sp_rouge(preds: Sequence[str], refs: Sequence[Refs], tokenizer) -> dict[str, float]:
    """``{"rouge1", "rouge2", "rougeL", "sp_rouge"}`` over a split: mean F-measures over examples
    of ROUGE on the SentencePiece pieces ``tokenizer.tokenize(text)`` (any object with that
    method, e.g. the mT5 tokenizer); ``sp_rouge`` is the mean of the three."""
    if not preds:
        raise ValueError("no predictions")
    scores = sp_rouge_scores(preds, refs, tokenizer)
    out = {k: _mean(scores[k]) for k in ROUGE_KEYS}
    out["sp_rouge"] = sum(out[k] for k in ROUGE_KEYS) / len(ROUGE_KEYS)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
