"""llama.cpp's group attention baseline, run through libllama."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pyselfextend import _engine
from pyselfextend.baselines import LlamaCppGroupAttention


def test_group_attention_divides_only_past_batches(tiny_model):
    path = str(tiny_model())
    ids = np.random.default_rng(2).integers(3, 320, size=200).tolist()
    plain = _engine.Reference(path, 256, 64, 1, True)
    grouped = _engine.Reference(path, 256, 64, 1, True, 4)
    # within the first batch nothing is divided: identical
    assert np.array_equal(grouped.eval(ids[:64], all_logits=True), plain.eval(ids[:64], all_logits=True))
    # later batches see the earlier ones at divided positions: different
    assert np.abs(grouped.eval(ids[64:]) - plain.eval(ids[64:])).max() > 1e-3
    with pytest.raises(ValueError, match="divide n_batch"):
        _engine.Reference(path, 256, 64, 1, True, 5)


def _read_through(tiny_model, seed: int):
    """A tiny model, random tokens, and group attention's logits for tokens 192-320 (batches of 64)
    of one reading that never went back."""
    path = str(tiny_model())
    ids = np.random.default_rng(seed).integers(3, 320, size=400).tolist()
    fresh = _engine.Reference(path, 512, 64, 1, True, 4)
    fresh.eval(ids[:192], False)
    return path, ids, fresh.eval(ids[192:320], True)


def test_group_attention_goes_back_to_before_a_question(tiny_model):
    # A text read in whole batches, then its rest and a question in one short batch, which makes
    # group attention divide the positions of the text's last whole batch: going back to the end of
    # that batch and reading on gives the logits of a reading that never asked, bit for bit (the
    # division only came early).
    path, ids, want = _read_through(tiny_model, seed=3)
    asked = _engine.Reference(path, 512, 64, 1, True, 4)
    asked.eval(ids[:192], False)
    asked.eval(ids[192:220] + ids[350:370], False)  # the rest of the text and a question: a short batch
    asked.eval([5], False)
    asked.truncate(240)  # back over tokens read since positions were divided
    asked.truncate(220)
    with pytest.raises(ValueError, match=r"goes back only to where positions were last divided \(192\) or later"):
        asked.truncate(100)
    asked.truncate(192)
    assert asked.n_past == 192
    assert np.array_equal(asked.eval(ids[192:320], True), want)


def test_group_attention_goes_back_to_the_end_of_a_batch_still_to_be_divided(tiny_model):
    # A single token after a full batch divides nothing (only prompt batches do); going back to the
    # end of that batch leaves it due to be divided by the next one, as if never left.
    path, ids, want = _read_through(tiny_model, seed=4)
    asked = _engine.Reference(path, 512, 64, 1, True, 4)
    asked.eval(ids[:192], False)
    asked.eval([7], False)
    asked.eval([8], False)
    with pytest.raises(ValueError, match="goes back only"):
        asked.truncate(150)  # into the full batch still to be divided
    asked.truncate(192)
    assert np.array_equal(asked.eval(ids[192:320], True), want)


def test_group_attention_in_the_evaluation_commands(tiny_model, tmp_path):
    llm = LlamaCppGroupAttention(tiny_model(), 512, 4, 1, 64)
    assert "grp-attn-n 4" in llm.plan.describe()
    ids = llm.tokenize("w1 w2 w3 " * 20)
    assert len(ids) + 5 <= 512
    text = llm.generate(ids, max_tokens=5)
    assert isinstance(text, str)
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "perplexity", "-m", str(tiny_model()), "-f", str(doc),
                        "--ctx", "500", "--batch", "64", "--grp-attn-n", "4", "--json", "-t", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "group attention" in json.loads(r.stdout)["method"]
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "passkey", "-m", str(tiny_model()), "--lengths", "600",
                        "--depths", "0.5", "--grp-attn-n", "4", "--json", "-t", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["method"] == "llama.cpp-grp-attn-4"


@pytest.mark.model
def test_group_attention_keeps_the_text_readable_within_the_trained_context(smollm_path):
    # Past batches sit at divided positions, and their cached keys must be rotated to those positions.
    # (The pinned libllama's seq_div rotates them away instead: perplexity then grows a hundredfold.)
    from test_parity import PARITY_TEXT

    from pyselfextend import LocalModel
    from pyselfextend.perplexity import token_nll

    grouped = LlamaCppGroupAttention(smollm_path, 2048, 4, 2, n_batch=128)
    ids = grouped.tokenize(PARITY_TEXT)
    nll_grouped = token_nll(grouped, ids)
    # libllama's arithmetic (flash attention) for ordinary attention too
    nll_plain = token_nll(LocalModel(smollm_path, n_ctx=2048, n_threads=2, n_batch=128, attention_path="portable"), ids)
    # the first batch is never divided; every later one reads the earlier ones at divided positions
    assert np.allclose(nll_grouped[:127], nll_plain[:127], rtol=0.05, atol=0.05)
    ratio = float(np.exp(nll_grouped[127:].mean() - nll_plain[127:].mean()))
    assert 1.0 < ratio < 1.5, ratio
