"""Bad input raises a clear Python exception and the process lives on."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel
from tiny_gguf import TinySpec, write_tiny_model


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        LocalModel(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("just some text, not a model\n" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        LocalModel(p)


def test_truncated_gguf(tmp_path, tiny_model):
    data = tiny_model().read_bytes()
    for keep in (len(data) // 2, 64, 4):
        p = tmp_path / f"cut{keep}.gguf"
        p.write_bytes(data[:keep])
        with pytest.raises(ValueError, match="truncated|corrupt|not a GGUF"):
            LocalModel(p)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_model(tmp_path / "gpt2.gguf", TinySpec(arch="gpt2"))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        LocalModel(p)


def test_unsupported_tensor_type(tmp_path):
    spec = TinySpec()
    bad = np.zeros((spec.n_embd, spec.n_embd), dtype=np.int32)
    p = write_tiny_model(tmp_path / "i32.gguf", spec, override={"blk.0.attn_q.weight": bad})
    with pytest.raises(ValueError, match="blk.0.attn_q.weight.*unsupported type"):
        LocalModel(p)


def test_wrong_tensor_shape(tmp_path):
    spec = TinySpec()
    bad = np.zeros((spec.n_embd, 96), dtype=np.float32)
    p = write_tiny_model(tmp_path / "shape.gguf", spec, override={"blk.1.attn_k.weight": bad})
    with pytest.raises(ValueError, match="blk.1.attn_k.weight.*shape"):
        LocalModel(p)


def test_prompt_longer_than_context(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=32, n_threads=1)
    with pytest.raises(ValueError, match="n_ctx=32"):
        llm.generate(list(range(3, 40)), max_tokens=1)
    with pytest.raises(ValueError, match="n_ctx=32"):
        llm.generate(list(range(3, 20)), max_tokens=20)
    with pytest.raises(ValueError, match="n_ctx=32"):
        llm.eval(list(range(3, 40)))
    # Nothing was evaluated, and the model still works.
    assert llm.n_past == 0
    assert llm.eval([5, 6, 7]).shape == (llm.n_vocab,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ctx=0), "n_ctx"), (dict(n_ctx=-5), "n_ctx"), (dict(n_batch=0), "n_batch"),
    (dict(n_threads=0), "n_threads"), (dict(n_threads=100000), "n_threads"),
    (dict(cache_type="q4"), "cache_type"), (dict(n_ctx="big"), "n_ctx"),
])
def test_invalid_model_options(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalModel(tiny_model(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"), (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(max_tokens=-1), "max_tokens"), (dict(stop=[""]), "stop"),
])
def test_invalid_generation_options(tiny_model, kwargs, message):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match=message):
        llm.generate([5, 6, 7], **{"max_tokens": 4, **kwargs})


def test_bad_token_ids(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.eval([5, llm.n_vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.eval([-1])
    with pytest.raises(ValueError, match="at least one token"):
        llm.eval([])
    assert llm.n_past == 0
