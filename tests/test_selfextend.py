"""SelfExtend attention: against the float64 formula, identity, chunk invariance, both paths,
configuration, and limits."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine
from pyselfextend.context import plan_context, usable_length
from selfextend_reference import selfextend_attention


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(rng, n, H, Hkv, D):
    return (rng.standard_normal((n, H, D)).astype(np.float32), rng.standard_normal((n, Hkv, D)).astype(np.float32),
            rng.standard_normal((n, Hkv, D)).astype(np.float32))


def _combos():
    """60 deterministic combinations covering every G, both head sizes, GQA ratios 1/3/4, both
    cache types, W not a multiple of the batch, n not a multiple of G, one-token batches."""
    rng = np.random.default_rng(2024)
    grid = list(itertools.product([1, 2, 3, 4, 8], [64, 128], [(4, 4), (3, 1), (4, 1)], ["f32", "f16"]))
    rng.shuffle(grid)
    out = []
    for idx, (G, D, (H, Hkv), cache) in enumerate(grid):
        W = int(rng.integers(1, 12)) * G + int(rng.integers(0, 2)) * int(rng.integers(1, 7))  # sometimes not a multiple of G
        n = int(rng.integers(W + 20, 300)) | 1                                                 # odd: rarely a multiple of G
        batch = [1, 7, 16, 33, 64, n][idx % 6]
        out.append((G, W, n, batch, H, Hkv, D, cache))
    return out


COMBOS = _combos()


@pytest.mark.parametrize("G,W,n,batch,H,Hkv,D,cache", COMBOS)
def test_fused_kernel_matches_float64_formula(G, W, n, batch, H, Hkv, D, cache):
    q, k, v = _qkv(np.random.default_rng(n * 31 + G), n, H, Hkv, D)
    out = _engine._attention_probe(q, k, v, G, W, batch, cache, "fused")
    err = _rel(out, selfextend_attention(q, k, v, G, W))
    assert err <= (1e-5 if cache == "f32" else 2e-3), err


@pytest.mark.parametrize("G,W,n,batch,H,Hkv,D,cache", COMBOS[1::6])
@pytest.mark.parametrize("path_", ["fused", "portable"])
def test_neox_rope_matches_float64_formula(G, W, n, batch, H, Hkv, D, cache, path_):
    # qwen2, qwen3 and phi3 rotate the two halves of each head instead of adjacent pairs.
    q, k, v = _qkv(np.random.default_rng(n * 7 + G), n, H, Hkv, D)
    out = _engine._attention_probe(q, k, v, G, W, batch, cache, path_, rope_mode="neox")
    want = selfextend_attention(q, k, v, G, W, neox=True)
    assert _rel(out, want) <= (1e-5 if cache == "f32" else 2e-3)
    if G > 1:  # the mode matters: the normal-mode formula is far off
        assert _rel(out, selfextend_attention(q, k, v, G, W)) > 1e-2


@pytest.mark.parametrize("G,W,n,batch,H,Hkv,D,cache", COMBOS[::5])
def test_portable_path_equals_fused_kernel(G, W, n, batch, H, Hkv, D, cache):
    q, k, v = _qkv(np.random.default_rng(n), n, H, Hkv, D)
    fused = _engine._attention_probe(q, k, v, G, W, batch, cache, "fused")
    portable = _engine._attention_probe(q, k, v, G, W, batch, cache, "portable")
    assert _rel(portable, fused) <= (1e-5 if cache == "f32" else 2e-3)
    assert _rel(portable, selfextend_attention(q, k, v, G, W)) <= (1e-5 if cache == "f32" else 2e-3)


@pytest.mark.parametrize("G", [2, 4, 8])
def test_identity_while_every_distance_is_below_the_window(G):
    q, k, v = _qkv(np.random.default_rng(G), 96, 4, 2, 64)
    ordinary = _engine._attention_probe(q, k, v, 1, 0, 32, "f32", "fused")
    assert _rel(_engine._attention_probe(q, k, v, G, 96, 32, "f32", "fused"), ordinary) <= 1e-5
    # and past the window it is a different attention
    assert _rel(_engine._attention_probe(q, k, v, G, 16, 32, "f32", "fused"), ordinary) > 1e-2


@pytest.mark.parametrize("G,W", [(4, 100), (1, 0)], ids=["selfextend", "ordinary"])
def test_decode_split_across_threads_is_exact(G, W):
    # One query over many keys takes the split-K route (several chunks merged). Ordinary attention
    # rotates by positions up to 1500 in f32 (SelfExtend's grouped ones are a quarter of that): the
    # float64 formula is 2e-5 away on ggml's flash attention too, so it is held to that path as well.
    q, k, v = _qkv(np.random.default_rng(5), 1500, 3, 1, 64)
    ref = selfextend_attention(q, k, v, G, W)
    portable = _engine._attention_probe(q, k, v, G, W, 1, "f32", "portable", n_threads=2)
    for threads in (1, 2, 4):
        out = _engine._attention_probe(q, k, v, G, W, 1, "f32", "fused", n_threads=threads)
        assert _rel(out[-50:], ref[-50:]) <= (1e-5 if G > 1 else 3e-5)
        assert _rel(out[-50:], portable[-50:]) <= 1e-5


@pytest.mark.parametrize("H,Hkv,W,batch,n", [(9, 3, 40, 65, 130), (14, 2, 40, 65, 130), (4, 2, 40, 65, 130),
                                             (9, 3, 5, 80, 113)])
@pytest.mark.parametrize("cache", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("G", [4, 1], ids=["selfextend", "ordinary"])
def test_a_query_gets_the_same_bits_in_any_tile(H, Hkv, W, batch, n, cache, G):
    # The kernel takes a batch in tiles of 32 tokens. Batches of 65 end in a one-token tile (fewer
    # than 8 query rows: the kernel puts keys in vector lanes); the whole 130 puts those tokens in
    # full tiles (rows in lanes). Prefix reuse (the server) relies on a query's output not
    # depending on which it was: the same bits. Both splits keep every key in one chunk, so only
    # the tiles differ. With W=5 and batches of 80 of 113 tokens, token 112 is a tile of its own
    # and its last block of keys, 96-112, is partly grouped: 17 keys, transposed 8 at a time and
    # then a tail of one. Ordinary attention (G=1) runs the same kernel with no neighbor keys.
    W = W if G > 1 else 0
    q, k, v = _qkv(np.random.default_rng(H), n, H, Hkv, 64)
    apart = _engine._attention_probe(q, k, v, G, W, batch, cache, "fused", n_threads=2)
    whole = _engine._attention_probe(q, k, v, G, W, n, cache, "fused", n_threads=2)
    assert np.array_equal(apart, whole)
    assert _rel(whole, selfextend_attention(q, k, v, G, W)) <= {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}[cache]


def test_cache_is_an_ordinary_cache_plus_o_of_w(tiny_model):
    m = _engine.Model(str(tiny_model()))
    ordinary = _engine.Engine(m, 800, 64, 1, "f16")
    extended = _engine.Engine(m, 800, 64, 1, "f16", 4, 64)
    # the only extra: a ring of W + n_batch neighbor keys per layer
    ring = m.n_layer * (64 + 64) * m.head_dim * m.n_head_kv * 2
    assert ordinary.cache_bytes < extended.cache_bytes <= ordinary.cache_bytes + ring + 4096
    portable = _engine.Engine(m, 800, 64, 1, "f16", 4, 64, "portable")
    assert portable.cache_bytes == ordinary.cache_bytes


def test_truncate_keeps_selfextend_exact(tiny_model):
    # Truncating and re-evaluating gives the same logits as evaluating once: the neighbor ring is
    # rebuilt for the truncated length.
    path = tiny_model(weight_type="f32")
    ids = np.random.default_rng(9).integers(3, 320, size=400).tolist()
    eng = _engine.Engine(_engine.Model(str(path)), 512, 32, 2, "f32", 4, 40)
    want = eng.eval(ids)
    eng.truncate(300)
    eng.eval(np.random.default_rng(1).integers(3, 320, size=90).tolist())  # overwrite ring slots
    eng.truncate(300)
    assert _rel(eng.eval(ids[300:]), want) <= 1e-5


@pytest.mark.parametrize("path_", ["fused", "portable"])
def test_a_reused_prefix_gives_exactly_the_fresh_logits(tiny_model, path_):
    # What prefix reuse relies on (a second question about a document, the server): truncating
    # to a prefix and evaluating something else gives bit for bit what a fresh cache gives, as
    # long as the ring still holds the window's keys (here 40 + one batch of 32 rows) and the
    # batches fall alike (the portable path rounds differently for other splits). With an f16
    # cache, a ring row rebuilt from the grouped keys differs in rounding.
    path = tiny_model(weight_type="f32")
    rng = np.random.default_rng(5)
    doc, other, question = (rng.integers(3, 320, size=k).tolist() for k in (64, 20, 30))
    model = _engine.Model(str(path))

    def engine():
        return _engine.Engine(model, 512, 32, 2, "f16", 4, 40, path_)

    fresh = engine().eval(doc + question, True)
    reused = engine()
    reused.eval(doc + other, True)
    reused.truncate(len(doc))
    assert np.array_equal(reused.eval(question, True), fresh[len(doc):])


@pytest.mark.parametrize("group_size, path_", [(1, "auto"), (4, "fused"), (4, "portable")])
def test_decoding_on_a_reused_graph_changes_nothing(tiny_model, group_size, path_):
    # One graph serves every decoding step within a stretch of 256 cache rows (positions, cache
    # rows and the kernel's bounds are inputs). Across stretch boundaries, after a truncation and
    # after a longer batch, each step's logits are those of a graph built for that step alone.
    path = tiny_model(weight_type="f32")
    model = _engine.Model(str(path))
    ids = np.random.default_rng(8).integers(3, 320, size=700).tolist()
    window = 40 if group_size > 1 else 0
    reused, rebuilt = (_engine.Engine(model, 768, 32, 2, "f16", group_size, window, path_,
                                              adaptive_threads=False, reuse_graphs=r)
                       for r in (True, False))
    for eng in (reused, rebuilt):
        eng.eval(ids[:200])
    steps = [[t] for t in ids[200:560]] + [None] + [ids[450:455]] + [[t] for t in ids[455:480]]
    for step in steps:
        if step is None:  # back to 450 tokens
            reused.truncate(450)
            rebuilt.truncate(450)
            continue
        assert np.array_equal(reused.eval(step), rebuilt.eval(step)), reused.n_past


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_model_level_portable_equals_fused(tiny_model, arch):
    path = tiny_model(weight_type="f32", n_embd=128, n_head=2, n_head_kv=1, arch=arch)
    ids = np.random.default_rng(3).integers(3, 320, size=300).tolist()
    out = {}
    for p in ("fused", "portable"):
        llm = LocalModel(path, n_ctx=512, n_batch=64, n_threads=2, group_size=4, window=48, attention_path=p,
                         cache_type="f32")
        out[p] = llm.eval(ids, all_logits=True)
    assert _rel(out["portable"], out["fused"]) <= 1e-4


def test_chunk_invariance_at_model_level(tiny_model):
    # A float32 model, so that only the attention could make batching matter.
    path = tiny_model(weight_type="f32", n_embd=256, n_head=4, n_head_kv=2, n_ctx_train=1024)
    ids = np.random.default_rng(11).integers(3, 320, size=2000).tolist()
    results = {}
    for n_batch in (2000, 64, 1):
        llm = LocalModel(path, n_ctx=2048, n_batch=n_batch, n_threads=2, group_size=4, window=256, cache_type="f32")
        results[n_batch] = llm.eval(ids)
    for n_batch in (64, 1):
        assert _rel(results[n_batch], results[2000]) <= 1e-3, n_batch


@pytest.mark.model
def test_chunk_invariance_on_smollm_is_within_llama_cpps_own(smollm_path):
    # On a Q4_1 model llama.cpp's own last-token logits move by about 2% between batch sizes
    # (batch-dependent matmul kernels, 8-bit activations); SelfExtend must add nothing beyond that.
    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * 200
    se, ordinary = {}, {}
    for n_batch in (2048, 64, 1):
        llm = LocalModel(smollm_path, n_ctx=2048, n_batch=n_batch, n_threads=2, group_size=4, window=256)
        ids = llm.tokenize(text)[:2000]
        se[n_batch] = llm.eval(ids)
    for n_batch in (2048, 64, 1):
        ordinary[n_batch] = _engine.Reference(str(smollm_path), 2048, n_batch, 2, True).eval(ids)
    assert len(ids) == 2000
    for n_batch in (64, 1):
        noise = _rel(ordinary[n_batch], ordinary[2048])
        assert _rel(se[n_batch], se[2048]) <= max(1e-3, 1.5 * noise), (n_batch, noise)
        assert se[n_batch].argmax() == se[2048].argmax()


def test_plan_defaults_and_checks():
    p = plan_context(16384, 8192)
    assert p.group_size == 3 and p.window % p.group_size == 0 and 2048 - 3 < p.window <= 2048
    assert usable_length(8192, p.group_size, p.window) >= 16384
    assert plan_context(4096, 8192).group_size == 1  # nothing to extend
    assert plan_context(16384, 8192, 4, 1024).usable_length == 29696
    assert plan_context(16384, 8192, window=1024).group_size == 3
    # each plan says in one line why (info --ctx shows it)
    assert "smallest G" in p.reason and "L/4" in p.reason
    assert plan_context(4096, 8192).reason.startswith("within the trained context")
    assert plan_context(16384, 8192, window=1024).reason == "window given, and the smallest G that reaches n_ctx"
    assert plan_context(16384, 8192, group_size=4).reason.startswith("group_size given")
    with pytest.raises(ValueError, match="reaches .* 29696 tokens"):
        plan_context(40000, 8192, 4, 1024)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        plan_context(16384, 8192, 0, 1024)
    with pytest.raises(ValueError, match="window must be in"):
        plan_context(16384, 8192, 4, 8192)
    with pytest.raises(ValueError, match="selfextend=False"):
        plan_context(16384, 8192, 4, None, selfextend=False)
    with pytest.raises(ValueError, match="cannot reach"):
        plan_context(9000, 8192, 1)


def test_local_model_reports_and_enforces_the_plan(tiny_model):
    path = tiny_model()  # trained context 256
    llm = LocalModel(path, n_ctx=1000, n_threads=1)
    assert llm.plan.group_size > 1 and llm.plan.usable_length >= 1000
    assert llm.info["usable_length"] == llm.plan.usable_length
    with pytest.raises(ValueError, match="exceeds the context size n_ctx=1000; this model reaches"):
        llm.generate(list(range(3, 300)) * 3, max_tokens=200)
    with pytest.raises(ValueError, match="reaches"):
        LocalModel(path, n_ctx=5000, group_size=2, window=64)
    with pytest.warns(UserWarning, match="degrades"):
        LocalModel(path, n_ctx=1000, selfextend=False)
    # the engine owns the limits: callers of the extension module itself meet the same rule
    with pytest.raises(ValueError, match="reaches .* 448 tokens .* less than n_ctx=5000"):
        _engine.Engine(_engine.Model(str(path)), 5000, 64, 1, "f16", 2, 64)
    with pytest.raises(ValueError, match="window must be in"):
        _engine.Engine(_engine.Model(str(path)), 500, 64, 1, "f16", 2, 256)
