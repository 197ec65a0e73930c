import os

# Tests never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402

#: the vocabulary of the tiny mT5 tests' word-level tokenizer (``t5_tokenizer_dir``)
T5_WORDS = "yes no maybe not sure a b c d e f g h".split()


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer with T5's special ids: pad 0, eos 1 (appended), unk 2 (tiny mT5 tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("t5tok")
    fast.save_pretrained(path)
    return str(path)
