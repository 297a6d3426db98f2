"""KV cache types: f16 (the default), f32, and q8_0 (blocks of 32 values sharing one f16 scale:
8.5 bits a value), in ordinary attention and in both SelfExtend paths."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine
from selfextend_reference import selfextend_attention
from test_parity import PARITY_TEXT, _compare

BITS = {"f32": 32, "f16": 16, "q8_0": 8.5}


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _q8_0_round_trip(x: np.ndarray) -> np.ndarray:
    """What a q8_0 cache gives back for x: per 32 values, d = max|x| / 127 (stored as f16) and
    round(x / d) in 8 bits."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    q = np.round(blocks / np.where(d == 0, 1, d))
    return (q * d.astype(np.float16).astype(np.float32)).ravel()


def test_a_quantized_cache_takes_its_bits_per_value(tiny_model):
    model = _engine.Model(str(tiny_model(n_embd=128, n_head=2, n_head_kv=1)))  # head size 64
    ordinary = {t: _engine.Engine(model, 1024, 64, 1, t).cache_bytes for t in BITS}
    for t, bits in BITS.items():
        assert ordinary[t] / ordinary["f16"] == pytest.approx(bits / 16, rel=0.01), t
    # SelfExtend's neighbor ring (window + one batch of keys) stays f16 under a quantized cache.
    extended = _engine.Engine(model, 1024, 64, 1, "q8_0", 8, 64)
    ring = model.n_layer * (64 + 64) * model.head_dim * model.n_head_kv * 2
    assert extended.cache_bytes == pytest.approx(ordinary["q8_0"] + ring, rel=0.01)


def test_cache_type_errors_name_the_problem(tiny_model):
    model = _engine.Model(str(tiny_model(n_embd=128, n_head=2, n_head_kv=1)))
    with pytest.raises(ValueError, match=r"cache_type must be 'f16', 'f32' or 'q8_0', got 'q4_0'"):
        _engine.Engine(model, 256, 64, 1, "q4_0")
    with pytest.raises(ValueError, match=r"cache_type must be"):
        LocalModel(tiny_model(n_embd=128, n_head=2, n_head_kv=1), n_ctx=256, cache_type="int8")
    # Heads are read one at a time, so a head must be whole blocks of 32.
    small_heads = _engine.Model(str(tiny_model(n_embd=64, n_head=4, n_head_kv=2)))  # head size 16
    with pytest.raises(ValueError, match=r"'q8_0' stores blocks of 32 values; this model's head size 16"):
        _engine.Engine(small_heads, 256, 64, 1, "q8_0")
    _engine.Engine(small_heads, 256, 64, 1, "f16")  # fine
    with pytest.raises(ValueError, match=r"llama.cpp runs a quantized V cache \('q8_0'\) only with flash attention"):
        _engine.Reference(str(tiny_model(n_embd=128, n_head=2, n_head_kv=1)), 256, 64, 1, False, cache_type="q8_0")


@pytest.mark.parametrize("G, path_", [(1, "fused"), (4, "fused"), (4, "portable")])
def test_one_token_reads_back_exactly_the_q8_0_rounding_of_its_value(tiny_model, G, path_):
    # With one token in the cache, attention returns its value row as the cache gives it back.
    model = _engine.Model(str(tiny_model(weight_type="f32", n_embd=256, n_head=4, n_head_kv=2)))
    eng = _engine.Engine(model, 256, 64, 1, "q8_0", G, 40 if G > 1 else 0, path_)
    v, out = (np.array(t) for t in eng._capture([5], ["v-0", "kqv_out-0"]))
    # heads 0 and 1 share key/value head 0 (head size 64)
    assert np.array_equal(out[:64], _q8_0_round_trip(v[:64]))
    assert np.array_equal(out[64:128], _q8_0_round_trip(v[:64]))
    assert not np.array_equal(out[:64], v[:64])


@pytest.mark.parametrize("G, path_", [(1, "fused"), (4, "fused"), (4, "portable")])
def test_q8_0_attention_is_the_formula_up_to_its_rounding(G, path_):
    # Random queries, keys and values (unit variance, head size 64), prefill batches and decoding.
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((300, h, 64)).astype(np.float32) for h in (4, 2, 2))
    W = 40 if G > 1 else 0
    want = selfextend_attention(q, k, v, G, W)
    err = _rel(_engine._attention_probe(q, k, v, G, W, 32, "q8_0", path_), want)
    f16_err = _rel(_engine._attention_probe(q, k, v, G, W, 32, "f16", path_), want)
    assert f16_err < err <= 3e-2, (f16_err, err)  # coarser than f16, as its bits say, and no worse


@pytest.mark.model
def test_smollm_q8_0_cache_is_no_further_from_f16_than_llama_cpps(smollm_path):
    # llama.cpp's q8_0 cache differs from f16 by its own rounding (it also rotates Q/K/V by a
    # Hadamard matrix before quantizing); ours, with ordinary attention and with SelfExtend at a
    # small window (G=4, W=128: most of ~1,000 tokens are grouped keys), by no more.
    agree = {}
    logits = {}
    for cache in ("f16", "q8_0"):
        for name, kwargs in (("ordinary", dict(selfextend=False)), ("selfextend", dict(group_size=4, window=128))):
            llm = LocalModel(smollm_path, n_ctx=2048, n_threads=2, adaptive_threads=False, cache_type=cache, **kwargs)
            ids = llm.tokenize(PARITY_TEXT)
            logits[name, cache] = llm.eval(ids, all_logits=True)
        logits["llama.cpp", cache] = _engine.Reference(str(smollm_path), 2048, 512, 2, True,
                                                       cache_type=cache).eval(ids, all_logits=True)
    for name in ("ordinary", "selfextend", "llama.cpp"):
        agree[name] = _compare(logits[name, "q8_0"], logits[name, "f16"])[1]
    assert agree["ordinary"] >= agree["llama.cpp"] - 0.01, agree
    assert agree["selfextend"] >= agree["llama.cpp"] - 0.01, agree
    assert agree["llama.cpp"] < 1.0  # the q8_0 cache is really coarser


def test_a_saved_q8_0_cache_continues_exactly(tiny_model):
    model = _engine.Model(str(tiny_model(weight_type="f32", n_embd=128, n_head=2, n_head_kv=1)))
    ids = np.random.default_rng(4).integers(3, 320, size=260).tolist()
    first = _engine.Engine(model, 512, 64, 2, "q8_0", adaptive_threads=False)
    first.eval(ids[:200])
    state = first.read_state(200)
    assert len(state) == pytest.approx(first.cache_bytes * 200 / 512, rel=0.01)  # 8.5 bits a value
    second = _engine.Engine(model, 512, 64, 2, "q8_0", adaptive_threads=False)
    second.write_state(200, state)
    assert np.array_equal(second.eval(ids[200:], True), first.eval(ids[200:], True))
