"""Bad input raises a clear Python exception and the process lives on."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel
from pyselfextend.sampling import Sampler, SamplingParams
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
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2' \(supported: llama, qwen2, qwen3, phi3\)"):
        LocalModel(p)


def test_an_architectures_own_tensors_are_required_by_name(tmp_path):
    # A qwen2 file without its Q bias, a qwen3 one with llama's layout: each names what is missing.
    spec = TinySpec(arch="qwen2")
    p = write_tiny_model(tmp_path / "nobias.gguf", spec, override={"blk.0.attn_q.bias": None})
    with pytest.raises(ValueError, match="missing tensor 'blk.0.attn_q.bias'"):
        LocalModel(p)
    p = write_tiny_model(tmp_path / "qwen3.gguf", TinySpec(arch="qwen3"), override={})
    assert LocalModel(p, n_ctx=64, n_threads=1).info["architecture"] == "qwen3"
    p = write_tiny_model(tmp_path / "phi3-longrope.gguf", TinySpec(arch="phi3"),
                         extra_tensors={"rope_factors_long.weight": np.ones(32, dtype=np.float32)})
    with pytest.raises(ValueError, match="Phi-3 LongRoPE.*rope_factors_long.weight.*not supported"):
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
    (dict(cache_type="q4"), "cache_type"), (dict(attention_path="fast"), "attention_path"),
    (dict(n_ctx=2**40, selfextend=False), "n_ctx = 1099511627776 is out of range"),
])
def test_invalid_model_options(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalModel(tiny_model(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ctx="big"), "n_ctx must be an integer"), (dict(n_ctx=256.0), "n_ctx must be an integer"),
    (dict(n_batch=True), "n_batch must be an integer"), (dict(n_threads="2"), "n_threads must be an integer"),
    (dict(cache_type=16), "cache_type must be a string"),
])
def test_model_options_of_the_wrong_type(tiny_model, kwargs, message):
    with pytest.raises(TypeError, match=message):
        LocalModel(tiny_model(), **kwargs)


def test_a_context_beyond_this_machines_memory_is_refused_before_allocating(tiny_model):
    # 2^30 tokens of a 512-byte-per-token cache: 512 GiB. Refused at once, with the sizes.
    with pytest.raises(MemoryError, match=r"n_ctx=1073741824 .*needs 512\.\d GiB of memory, but this machine has "
                                          r"[\d.]+ GiB available"):
        LocalModel(tiny_model(), n_ctx=2**30, selfextend=False, n_threads=1)


def test_memory_is_stated_and_the_batch_never_exceeds_the_context(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=64, n_batch=10**6, n_threads=1)
    assert llm.n_batch == 64
    spec = TinySpec()
    per_token = 2 * spec.n_layer * spec.head_dim * spec.n_head_kv * 2  # K and V, f16
    assert llm.memory["kv_cache"] == 64 * per_token
    assert 0 < llm.memory["compute"] < 2**26 and llm.memory["weights"] == tiny_model().stat().st_size
    assert llm.eval(list(range(3, 67))).shape == (llm.n_vocab,)  # a whole-context batch runs


def test_windows_nobody_gave_are_never_blamed(tmp_path):
    p = write_tiny_model(tmp_path / "short.gguf", TinySpec(n_ctx_train=64))
    with pytest.raises(ValueError, match="too far past the trained context 64 .* reaches at most 784 tokens"):
        LocalModel(p, n_ctx=4096)
    with pytest.raises(ValueError, match="group_size=32 is wider than the default window W=16"):
        LocalModel(p, n_ctx=512, group_size=32)
    assert LocalModel(p, n_ctx=784, n_threads=1).plan.window == 16  # the farthest the default reaches


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"), (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(max_tokens=-1), "max_tokens"), (dict(stop=[""]), "stop"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("inf")), "top_p must be finite"), (dict(seed=-2), "seed must be in"),
])
def test_invalid_generation_options(tiny_model, kwargs, message):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match=message):
        llm.generate([5, 6, 7], **{"max_tokens": 4, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=2.5), "top_k must be an integer"), (dict(temperature="hot"), "temperature must be a number"),
    (dict(max_tokens=4.0), "max_tokens must be an integer"), (dict(seed=1.5), "seed must be an integer"),
    (dict(stop=[3]), "stop must be a string"), (dict(stop=5), "stop must be a string"),
    (dict(min_p=True), "min_p must be a number"),
])
def test_generation_options_of_the_wrong_type(tiny_model, kwargs, message):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(TypeError, match=message):
        llm.generate([5, 6, 7], **{"max_tokens": 4, **kwargs})


def test_seed_minus_one_is_a_fresh_seed_as_in_llama_cpp():
    flat = np.zeros(1000, dtype=np.float32)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        return tuple(sampler.sample(flat, []) for _ in range(8))

    assert draws(7) == draws(7)
    assert len({draws(-1) for _ in range(4)}) == 4  # 8 draws of 1000 equally likely tokens never repeat


def test_prompts_of_the_wrong_kind(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(TypeError, match="not bytes; decode it first"):
        llm.generate(b"w1 w2", max_tokens=2)
    with pytest.raises(TypeError, match="item 1 is 1.5"):
        llm.eval([5, 1.5])
    with pytest.raises(TypeError, match="item 0 is '5'"):
        llm.generate(["5"], max_tokens=2)
    with pytest.raises(TypeError, match="text must be str"):
        llm.tokenize(b"w1")
    with pytest.raises(ValueError, match=r"not valid Unicode: '\\udce9' at index 3"):
        llm.tokenize("caf\udce9")
    with pytest.raises(TypeError, match="role and content must be str"):
        llm.chat([{"role": "user", "content": 5}], chat_template="chatml")
    assert llm.n_past == 0


def test_chat_without_a_template_names_the_option(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=128, n_threads=1)
    messages = [{"role": "user", "content": "w1 w2"}]
    with pytest.raises(ValueError, match="no chat template: pass chat_template="):
        llm.chat(messages, max_tokens=2)
    reply = llm.chat(messages, chat_template="chatml", max_tokens=4, temperature=0)
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="not supported"):
        llm.chat(messages, chat_template="no-such-template", max_tokens=2)


def test_bad_token_ids(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.eval([5, llm.n_vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.eval([-1])
    with pytest.raises(ValueError, match="at least one token"):
        llm.eval([])
    assert llm.n_past == 0
