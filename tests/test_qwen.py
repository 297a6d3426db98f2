"""The second real model: Qwen2.5-Coder-0.5B-Instruct (architecture qwen2: Q/K/V biases, NEOX RoPE,
trained context 32768; Q4_K_M, so Q5_0, Q8_0, Q4_K and Q6_K weights), against libllama and the
float64 SelfExtend formula."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine
from selfextend_reference import rope
from test_parity import _compare, assert_within_llama_cpps_spread

pytestmark = pytest.mark.model
TEXT = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return LocalModel(qwen_path, n_ctx=2048, n_threads=2)


@pytest.fixture(scope="module")
def qwen_portable(qwen_path):
    # libllama's arithmetic: ordinary attention by ggml's flash attention
    return LocalModel(qwen_path, n_ctx=2048, n_threads=2, attention_path="portable")


def test_qwen_is_read_as_qwen2(qwen):
    info = qwen.info
    assert info["architecture"] == "qwen2" and info["rope_mode"] == "neox" and info["n_ctx_train"] == 32768
    assert {"q5_0", "q8_0", "q4_K", "q6_K"} <= set(info["weight_types"])


def test_qwen_logits_match_libllama_over_500_tokens(qwen, qwen_portable, qwen_path):
    ids = qwen.tokenize(TEXT)[:520]
    qwen_portable.reset()
    ours = qwen_portable.eval(ids, all_logits=True)
    same = _engine.Reference(str(qwen_path), 2048, 512, 2, True, repack=False).eval(ids, all_logits=True)
    assert np.array_equal(ours, same)  # the same arithmetic: the same bits
    # llama.cpp as users run it repacks Q4_K weights for kernels that sum in another order.
    default = _engine.Reference(str(qwen_path), 2048, 512, 2, True).eval(ids, all_logits=True)
    rel, agree = _compare(ours, default)
    assert rel < 0.1 and agree > 0.95
    qwen.reset()  # the default: the fused kernel
    off = _engine.Reference(str(qwen_path), 2048, 512, 2, False, repack=False).eval(ids, all_logits=True)
    assert_within_llama_cpps_spread(qwen.eval(ids, all_logits=True), same, off)


def test_qwen_greedy_tokens_match_libllama(qwen_portable, qwen_path):
    prompt = qwen_portable.tokenize("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    ref = _engine.Reference(str(qwen_path), 2048, 512, 2, True, repack=False)

    def greedy(eval_fn):
        logits, out = eval_fn(prompt), []
        for _ in range(64):
            out.append(int(np.argmax(logits)))
            logits = eval_fn([out[-1]])
        return out

    qwen_portable.reset()
    assert greedy(qwen_portable.eval) == greedy(ref.eval)


def test_qwen_chat_answers_a_coding_question(qwen):
    answer = qwen.chat([{"role": "user", "content": "Write a Python function is_even(n) that returns True when n "
                                                       "is even."}], max_tokens=120, temperature=0)
    assert "def is_even(n)" in answer and "return" in answer and "% 2" in answer, answer


def _selfextend_rows(q, k, v, G, W, rows, base):
    """The float64 formula (shared/SELFEXTEND.md), NEOX RoPE, for the given query rows only."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    n, H, D = q.shape
    rep = H // k.shape[1]
    i = np.arange(n)
    k_nb = np.repeat(rope(k, i, base, neox=True), rep, axis=1)
    k_grp = np.repeat(rope(k, i // G, base, neox=True), rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    out = []
    for r in rows:
        q_nb = rope(q[r:r + 1], np.array([r]), base, neox=True)[0]
        q_grp = rope(q[r:r + 1], np.array([r // G + W - W // G]), base, neox=True)[0]
        s_nb = np.einsum("hd,jhd->hj", q_nb, k_nb[: r + 1])
        s_grp = np.einsum("hd,jhd->hj", q_grp, k_grp[: r + 1])
        s = np.where((r - np.arange(r + 1)) < W, s_nb, s_grp) / np.sqrt(D)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(np.einsum("hj,jhd->hd", p, vv[: r + 1]))
    return np.stack(out)


@pytest.mark.parametrize("path_", ["fused", "portable"])
def test_qwen_selfextend_matches_the_formula_on_real_activations(qwen_path, path_):
    # A small window, so that most of 1,100 tokens are attended to through grouped positions. An
    # f32 cache: Qwen's first layers have keys up to ~150 and queries up to ~80, so an f16 cache
    # alone moves their attention output by ~3% of its range, ordinary attention just as much.
    G, W, n = 4, 256, 1100
    model = _engine.Model(str(qwen_path))
    eng = _engine.Engine(model, 2048, 2048, 2, "f32", G, W, path_)
    ids = LocalModel(qwen_path, n_ctx=64, n_threads=1).tokenize(TEXT)[:n]
    H, Hkv, D = model.n_head, model.n_head_kv, model.head_dim
    rows = list(range(n - 48, n)) + [W + 10, 700]
    for layer in (0, model.n_layer // 2):
        q, k, v, out = eng._capture(ids, [f"q-{layer}", f"k-{layer}", f"v-{layer}", f"kqv_out-{layer}"])
        eng.reset()
        q, k, v = q.reshape(n, H, D), k.reshape(n, Hkv, D), v.reshape(n, Hkv, D)
        want = _selfextend_rows(q, k, v, G, W, rows, model.rope_freq_base)
        got = out.reshape(n, H, D)[rows]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, (layer, err)
        ordinary = _selfextend_rows(q, k, v, 1, n + 1, rows, model.rope_freq_base)
        assert np.abs(got - ordinary).max() / np.abs(ordinary).max() > 20 * err  # the grouping is real
