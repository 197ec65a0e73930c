"""SQuAD EM/F1 and SP-ROUGE (src/evaluate/text_metrics.py): hand-worked values, and agreement with
torchmetrics' SQuAD and Google's rouge-score (same SentencePiece-style tokenizer, two scripts)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from src.evaluate.text_metrics import (  # noqa: E402
    em_f1, em_f1_scores, exact_match, f1, normalize_answer, sp_rouge, sp_rouge_scores)

CORPUS = [
    "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "The dog sleeps on the mat all day.",
    "The brown cat jumps over the dog.", "Summaries are short texts about long articles.",
    "แมวนั่งบนเสื่อ", "สุนัขนอนหลับบนเสื่อทั้งวัน", "สุนัขสีน้ำตาลกระโดดข้ามแมว", "แมวสีน้ำตาลนอนหลับ",
    "猫坐在垫子上。", "狗整天睡在垫子上。", "棕色的狐狸跳过了懒狗。",
]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A real SentencePiece-style Unigram tokenizer (Metaspace pieces), trained here on English, Thai and
    Chinese, wrapped as the transformers T5 tokenizer class that ``MT5TokenizerFast`` is."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 20, trainer)
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


class Whitespace:
    """Any object with ``tokenize(str) -> list[str]`` is a tokenizer."""

    def tokenize(self, text):
        return text.split()


# ----- SQuAD --------------------------------------------------------------------------------
def test_normalize_answer_follows_squad_v11():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater anthem") == "theater anthem"  # articles only as words
    assert normalize_answer("A-B") == "ab"  # punctuation is removed before the articles
    assert normalize_answer("  \t\n") == ""


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Cat.", ["a dog", "cat"]) == 1.0
    assert exact_match("cat", "dog") == 0.0
    # "the cat sat" -> [cat, sat]; "cat sat down" -> 3 tokens: P = 1, R = 2/3, F = 0.8
    assert f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert f1("cat sat", ["dog", "cat sat down"]) == pytest.approx(0.8)  # max over references
    # bags of tokens: x x y vs x y y share one x and one y -> P = R = 2/3
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1("cat", "dog") == 0.0
    # v1.1: both empty after normalization -> EM 1, F1 0
    assert exact_match("The", "a") == 1.0 and f1("The", "a") == 0.0


def test_em_f1_split_means():
    preds = ["cat sat", "dog", "bird"]
    refs = [["cat sat down"], ["the dog", "cat"], "fish"]
    per = em_f1_scores(preds, refs)
    assert per["em"] == [0.0, 1.0, 0.0]
    assert per["f1"] == pytest.approx([0.8, 1.0, 0.0])
    out = em_f1(preds, refs)
    assert out["em"] == pytest.approx(1 / 3) and out["f1"] == pytest.approx(0.6)
    assert out["em_f1"] == pytest.approx((1 / 3 + 0.6) / 2)
    assert sum(per["em_f1"]) / 3 == pytest.approx(out["em_f1"])  # per-example scores average to it
    with pytest.raises(ValueError):
        em_f1(["a"], [])
    with pytest.raises(ValueError):
        em_f1(["a"], [[]])
    with pytest.raises(ValueError):
        em_f1([], [])


def test_em_f1_agrees_with_torchmetrics_squad():
    from torchmetrics.text import SQuAD

    preds = ["Denver Broncos", "the 1976 season", "in Paris, France", "Santa Clara", "gold", "seven (7) days",
             "x x y", "nothing at all"]
    refs = [["Denver Broncos", "The Denver Broncos"], ["1976"], ["Paris"], ["Levi's Stadium", "Santa Clara, CA"],
            ["golden anniversary"], ["7 days", "a week"], ["x y y"], ["something"]]
    metric = SQuAD()
    metric.update([{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
                  [{"answers": {"text": r, "answer_start": [0] * len(r)}, "id": str(i)} for i, r in enumerate(refs)])
    theirs = metric.compute()
    ours = em_f1(preds, refs)
    assert ours["em"] * 100 == pytest.approx(float(theirs["exact_match"]), abs=1e-4)
    assert ours["f1"] * 100 == pytest.approx(float(theirs["f1"]), abs=1e-4)
    assert 0 < ours["em"] < ours["f1"] < 1


def test_empty_answers_differ_from_torchmetrics_as_documented():
    from torchmetrics.functional.text import squad

    theirs = squad([{"prediction_text": "", "id": "0"}], [{"answers": {"text": [""], "answer_start": [0]}, "id": "0"}])
    assert float(theirs["f1"]) == 100.0  # SQuAD 2.0 no-answer rule
    assert f1("", "") == 0.0 and exact_match("", "") == 1.0  # SQuAD v1.1


# ----- SP-ROUGE ----------------------------------------------------------------------------
def test_sp_rouge_by_hand_with_any_tokenize_object():
    # a b c d vs a b d e: unigrams 3/4 and 3/4; bigrams {ab} of 3 and 3; LCS a b d = 3
    out = sp_rouge(["a b c d"], ["a b d e"], Whitespace())
    assert out["rouge1"] == pytest.approx(0.75) and out["rouge2"] == pytest.approx(1 / 3)
    assert out["rougeL"] == pytest.approx(0.75)
    assert out["sp_rouge"] == pytest.approx((0.75 + 1 / 3 + 0.75) / 3)
    # the order matters for rouge2 / rougeL only: d c b a vs a b c d
    out = sp_rouge(["d c b a"], ["a b c d"], Whitespace())
    assert (out["rouge1"], out["rouge2"], out["rougeL"]) == pytest.approx((1.0, 0.0, 0.25))
    # several references: per type the best F-measure; an empty prediction scores 0
    per = sp_rouge_scores(["a b", ""], [["c d", "a b x"], ["a"]], Whitespace())
    assert per["rouge1"] == pytest.approx([0.8, 0.0]) and per["rougeL"] == pytest.approx([0.8, 0.0])
    assert per["rouge2"] == pytest.approx([2 * (1 * 0.5) / 1.5, 0.0])


PAIRS = [  # (prediction, references): English, Thai, Chinese, mixed; one with two references
    ("The cat sat on the mat.", ["The cat sleeps on the mat all day."]),
    ("A brown dog jumps over the lazy cat.", ["A quick brown fox jumps over the lazy dog."]),
    ("แมวนอนหลับบนเสื่อ", ["แมวนั่งบนเสื่อ"]),
    ("สุนัขสีน้ำตาลนอนหลับทั้งวัน", ["สุนัขนอนหลับบนเสื่อทั้งวัน", "แมวสีน้ำตาลนอนหลับ"]),
    ("狗睡在垫子上。", ["狗整天睡在垫子上。"]),
    ("棕色的猫跳过了狗。", ["棕色的狐狸跳过了懒狗。"]),
    ("The cat แมว 猫", ["แมว the cat", "猫"]),
]


def test_sp_rouge_equals_google_rouge_score_on_sentencepiece_pieces(sp_tokenizer):
    from rouge_score import rouge_scorer

    pieces = sp_tokenizer.tokenize("สุนัขนอนหลับบนเสื่อ 猫坐在垫子上")
    assert len(pieces) > 4 and pieces[0].startswith("▁")  # real subword pieces, not whitespace words
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=sp_tokenizer)
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    google = [scorer.score_multi(r, p) for p, r in PAIRS]
    per = sp_rouge_scores(preds, refs, sp_tokenizer)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [s[key].fmeasure for s in google]
        assert per[key] == pytest.approx(expected, abs=1e-6), key
    out = sp_rouge(preds, refs, sp_tokenizer)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert out[key] == pytest.approx(sum(s[key].fmeasure for s in google) / len(PAIRS), abs=1e-6)
    assert out["sp_rouge"] == pytest.approx((out["rouge1"] + out["rouge2"] + out["rougeL"]) / 3, abs=1e-12)
    assert all(0 < per["rouge1"][i] < 1 for i in range(len(PAIRS)))  # informative pairs
    # per script: Thai and Chinese pairs score, and differently from one another
    assert per["sp_rouge"][2] > 0 and per["sp_rouge"][4] > 0 and per["sp_rouge"][2] != per["sp_rouge"][4]


def test_torchmetrics_default_normalizer_would_erase_thai(sp_tokenizer):
    from torchmetrics.functional.text import rouge_score

    pred, ref, other = PAIRS[2][0], PAIRS[2][1][0], "猫坐在垫子上。"
    default = [float(rouge_score(pred, r, tokenizer=sp_tokenizer.tokenize, rouge_keys="rouge1")["rouge1_fmeasure"])
               for r in (ref, other)]
    # only [a-z0-9] survives the default normalizer: every Thai / Chinese text becomes the same blank
    assert default == [1.0, 1.0]
    ours = [sp_rouge([pred], [r], sp_tokenizer)["rouge1"] for r in (ref, other)]
    assert 0.3 < ours[0] < 1.0 and ours[1] < ours[0]


def test_sp_rouge_checks_its_inputs(sp_tokenizer):
    with pytest.raises(ValueError):
        sp_rouge(["a", "b"], ["a"], sp_tokenizer)
    with pytest.raises(ValueError):
        sp_rouge([], [], sp_tokenizer)
    with pytest.raises(TypeError):
        sp_rouge(["a"], ["a"], object())
    assert sp_rouge(["same text"], ["same text"], sp_tokenizer)["sp_rouge"] == pytest.approx(1.0)
    assert isinstance(sp_rouge(["a"], ["a"], Whitespace())["sp_rouge"], float)
    assert torch.is_tensor(torch.tensor(sp_rouge_scores(["a"], ["a"], sp_tokenizer)["sp_rouge"]))
