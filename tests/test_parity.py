"""The engine against llama.cpp's own forward pass (libllama, same pinned source, same file)."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine

PARITY_TEXT = """\
The history of the lighthouse is a history of coastlines, trade and the stubborn problem of seeing in the
dark. Long before electric lamps, sailors relied on fires lit on hilltops and towers, and the most famous
of these, the Pharos of Alexandria, stood for more than a thousand years. Its keepers burned wood and oil,
and a polished bronze mirror is said to have thrown the light far out to sea. When the tower finally fell
to earthquakes, its name survived in the word for lighthouse in several languages.
In the eighteenth and nineteenth centuries the problem became one of engineering. Towers had to stand on
wave-swept rocks, where the sea could move blocks of stone weighing several tons. John Smeaton, rebuilding
the Eddystone light off Plymouth, dovetailed granite blocks together and used a hydraulic lime that set
under water; his method shaped lighthouse building for a century. The lamps improved as well. Argand
burners gave a steadier flame, parabolic reflectors concentrated it, and in 1822 Augustin Fresnel showed
how a lens built of concentric prisms could gather nearly all of the light into a single beam.
Each light was given its own character, a pattern of flashes and eclipses, so that a navigator who saw it
could tell which light it was and therefore where the ship was. Keepers wound the clockwork that turned
the lens, trimmed the wicks, polished the glass and logged the weather. Their lives were often lonely,
and on the most exposed stations relief boats could be delayed for weeks by storms.
Automation changed everything. Electric lamps, then sensors and remote monitoring, made resident keepers
unnecessary, and by the end of the twentieth century most lighthouses in Europe and North America had been
automated. Satellite navigation has since reduced their importance further, yet many lights still shine,
because a simple, independent light is a reliable backup when electronic systems fail. Some towers have
become museums, guest houses or artists' studios; others stand empty, kept only as landmarks. The
lighthouse remains a powerful symbol of guidance and safety, and the engineering that made it possible is
still admired by those who build structures against the sea.
Today, enthusiasts travel along coasts to visit lights, photograph their towers and learn their
characters. Associations restore lenses and lamps, and volunteers open towers to visitors on summer
weekends. The stories of keepers and their families, of rescues and shipwrecks, have been collected in
books and archives, and they remind us how much depended on a small flame kept burning through the night.
Modern aids such as radar beacons and buoys with solar-powered lamps continue the same work with new
tools. The principle has not changed: a fixed point that can be recognised, day or night, in calm or storm,
so that those at sea know where they are and where the danger lies. A chart shows the lights with their
colours, periods and ranges, and a careful navigator still checks them against the plotted position.
The economics of lights were argued over from the start. Ship owners paid light dues at each port, and
the money was meant to keep the lamps burning, but the collection was uneven and often corrupt. Reformers
in the nineteenth century pressed for public bodies to take over the lights, set common standards and
publish lists that every navigator could buy. The lists gave each light's position, height, colour and
character, and notices to mariners announced every change, so that an old chart could be corrected by
hand. A captain who ignored them did so at his own risk.
Building a tower on a bare rock was slow, dangerous work. Masons could land only at low water in calm
weather, and a season might allow a few dozen working days. Stones were cut and fitted on shore, numbered,
and shipped out in order, so that each course could be laid quickly when the sea allowed. Workers lived
in barracks on nearby islands or on ships anchored close by, and accidents were common. When the lantern
was finally lit, the builders often moved on at once to the next rock on the list.
Life at a station followed a strict routine. The light was lit at sunset and put out at sunrise, and
between those hours someone was always on watch. Fog brought extra work: keepers sounded bells, guns or,
later, compressed-air horns at set intervals for as long as visibility stayed poor, sometimes for days.
Supplies of oil, food and water arrived by boat, and on remote rocks a keeper might not set foot on the
mainland for a month or more. Many kept gardens in sheltered corners, raised chickens or goats, and taught
their children at home."""


def _compare(ours: np.ndarray, ref: np.ndarray):
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    agree = float((ours.argmax(axis=1) == ref.argmax(axis=1)).mean())
    return float(rel.max()), agree


def assert_within_llama_cpps_spread(fused, fa_on, fa_off):
    """The fused kernel (the CPU's default) keeps queries and sums in f32 where flash attention
    rounds to f16: its logits may be as far from llama.cpp's (flash attention on) as llama.cpp's
    with flash attention off are, and no farther."""
    noise_rel, noise_agree = _compare(fa_off, fa_on)
    rel, agree = _compare(fused, fa_on)
    assert rel <= 1.25 * noise_rel, (rel, noise_rel)
    assert agree >= noise_agree - 0.01, (agree, noise_agree)


def _greedy(eval_fn, prompt, n):
    logits = eval_fn(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = eval_fn([tok])
    return out


TINY_CONFIGS = [
    dict(weight_type="f32", n_embd=128, n_head=2, n_head_kv=1),                          # GQA, D=64
    dict(weight_type="f16", n_embd=256, n_head=2, n_head_kv=2, tied_embeddings=False),   # MHA, D=128
    dict(weight_type="q8_0", n_embd=256, n_head=4, n_head_kv=2),                         # GQA, D=64
    dict(weight_type="q4_0", n_embd=256, n_head=2, n_head_kv=1),                         # GQA, D=128
    # The other architectures (NEOX RoPE): Q/K/V biases, per-head Q/K norms, fused projections.
    dict(arch="qwen2", weight_type="q8_0", n_embd=256, n_head=4, n_head_kv=2),
    dict(arch="qwen3", weight_type="f16", n_embd=256, n_head=2, n_head_kv=1, tied_embeddings=False),
    dict(arch="phi3", weight_type="q4_0", n_embd=256, n_head=4, n_head_kv=4),
    dict(arch="phi3", weight_type="f32", n_embd=128, n_head=2, n_head_kv=1),
]


def _config_id(c):
    return f"{c.get('arch', 'llama')}-{c['weight_type']}-h{c['n_head']}kv{c['n_head_kv']}-d{c['n_embd'] // c['n_head']}"


@pytest.mark.parametrize("cfg", TINY_CONFIGS, ids=_config_id)
def test_tiny_model_matches_llama_cpp(tiny_model, cfg):
    path = str(tiny_model(**cfg))
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 320, size=150).tolist()
    eng = _engine.Engine(_engine.Model(path), 256, 64, 2)
    ref = _engine.Reference(path, 256, 64, 2, True)
    rel, agree = _compare(eng.eval(prompt, all_logits=True), ref.eval(prompt, all_logits=True))
    assert rel <= 1e-2, rel
    assert agree >= 0.995, agree
    eng.reset()
    ref.reset()
    assert _greedy(eng.eval, prompt[:20], 64) == _greedy(ref.eval, prompt[:20], 64)


@pytest.mark.model
def test_smollm_logits_match_llama_cpp_at_every_position(smollm_path):
    # On the portable path ordinary attention is ggml's flash attention, as in llama.cpp: the same
    # arithmetic throughout.
    llm = LocalModel(smollm_path, n_ctx=2048, n_threads=2, attention_path="portable")
    ids = llm.tokenize(PARITY_TEXT)
    assert 900 <= len(ids) <= 1200, len(ids)
    ours = llm.eval(ids, all_logits=True)
    ref = _engine.Reference(str(smollm_path), 2048, 512, 2, True).eval(ids, all_logits=True)
    assert ours.shape == ref.shape == (len(ids), llm.n_vocab)
    rel, agree = _compare(ours, ref)
    assert rel <= 1e-2, rel
    assert agree >= 0.995, agree
    # Through a Q4_1 model's 8-bit activations the fused kernel's f32 rounding moves the logits by
    # 6.6% of a row's largest logit (argmax agreement 96.3%); llama.cpp's flash attention off, 7.1% (95.9%).
    fused = LocalModel(smollm_path, n_ctx=2048, n_threads=2, attention_path="fused").eval(ids, all_logits=True)
    off = _engine.Reference(str(smollm_path), 2048, 512, 2, False).eval(ids, all_logits=True)
    assert_within_llama_cpps_spread(fused, ref, off)


@pytest.mark.model
def test_smollm_greedy_continuation_matches_llama_cpp(smollm_path):
    llm = LocalModel(smollm_path, n_ctx=2048, n_threads=2, attention_path="portable")  # llama.cpp's arithmetic
    prompt = "The lighthouse keeper opened his logbook and wrote:"
    text = llm.generate(prompt, max_tokens=64, temperature=0)
    ref = _engine.Reference(str(smollm_path), 2048, 512, 2, True)
    ref_ids = _greedy(ref.eval, llm.tokenize(prompt), 64)
    eog = [i for i, t in enumerate(ref_ids) if llm._vocab.is_eog(t)]
    ref_text = llm.detokenize(ref_ids[: eog[0]] if eog else ref_ids)
    assert len(text) > 0
    assert text == ref_text
