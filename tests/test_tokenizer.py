"""Tokenizer: llama.cpp's ids, and text that survives a round trip."""
from __future__ import annotations

import pytest
from gguf import GGUFReader

from pyselfextend import LocalModel, _engine

EDGE_CASES = [
    "Hello world",
    "emoji: 🦙🔥👩‍👩‍👧 done",
    "accents: café naïve façade über Ångström",
    "CJK: 日本語のテキスト、中文文本、한국어",
    "runs of spaces:    four,        eight",
    "newlines\n\n\nand\ttabs\t\tmixed \n \n",
    "digits 1234567890 3.14159 1,000,000 2026-11-25",
    "code: def f(x):\n    return [i**2 for i in range(x) if i % 2 == 0]  # squares\n",
    "   leading and trailing spaces   ",
    "",
]


@pytest.fixture(scope="module")
def llm(smollm_path):
    return LocalModel(smollm_path, n_ctx=256, n_threads=2)


@pytest.mark.model
@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_and_llama_cpp_ids(llm, smollm_path, text):
    ids = llm.tokenize(text, add_special=False)
    assert llm.detokenize(ids) == text
    # The full llama.cpp model (weights and vocabulary loaded by libllama's own loader) tokenizes
    # the same way as our vocabulary-only load.
    assert ids == list(_engine.Vocab(str(smollm_path)).tokenize(text, False, True))
    assert all(0 <= t < llm.n_vocab for t in ids)


@pytest.mark.model
def test_ids_are_the_files_tokens(llm, smollm_path):
    tokens = GGUFReader(str(smollm_path)).fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    # GPT-2 style byte-level BPE marks a leading space with U+0120.
    assert [vocab[i] for i in llm.tokenize("Hello world", add_special=False)] == ["Hello", "\u0120world"]
    assert len(vocab) == llm.n_vocab


@pytest.mark.model
def test_special_tokens_parse_only_when_asked(llm):
    text = "<|im_start|>user"
    with_special = llm.tokenize(text, add_special=False, parse_special=True)
    as_text = llm.tokenize(text, add_special=False, parse_special=False)
    assert len(with_special) < len(as_text)
    assert llm.detokenize(as_text) == text


def test_detokenize_rejects_unknown_ids(tiny_model):
    v = _engine.Vocab(str(tiny_model()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.detokenize([10**6])
