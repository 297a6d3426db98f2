"""Perplexity: the NLL of each token from batched logits, and its summary."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from pyselfextend import LocalModel
from pyselfextend.perplexity import summarize, token_nll


def test_nll_matches_a_direct_evaluation(tiny_model):
    ids = np.random.default_rng(4).integers(3, 320, size=150).tolist()
    llm = LocalModel(tiny_model(), n_ctx=256, n_batch=32, n_threads=1, cache_type="f32")
    nll = token_nll(llm, ids)
    llm.reset()
    logits = llm.eval(ids, all_logits=True).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    direct = -np.log(p[np.arange(len(ids) - 1), ids[1:]])
    assert np.allclose(nll, direct, rtol=1e-4, atol=1e-5)


def test_summary_is_consistent():
    nll = np.random.default_rng(0).uniform(0.5, 5.0, size=1000)
    s = summarize(nll, 300)
    assert [b["n"] for b in s["buckets"]] == [300, 300, 300, 100]
    weighted = sum(b["n"] * math.log(b["ppl"]) for b in s["buckets"]) / 1000
    assert math.isclose(math.exp(weighted), s["ppl"], rel_tol=1e-9)


def test_perplexity_command(tiny_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "perplexity", "-m", str(tiny_model()), "-f", str(doc),
                        "--ctx", "600", "--bucket", "200", "--json", "-t", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["n_predicted"] == 599 and len(s["buckets"]) == 3 and s["method"].startswith("SelfExtend")
    assert all(b["ppl"] > 1.0 for b in s["buckets"])


def test_plot_is_drawn(tiny_model, tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("matplotlib")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 100)
    png = tmp_path / "ppl.png"
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "perplexity", "-m", str(tiny_model()), "-f", str(doc),
                        "--ctx", "300", "--bucket", "100", "--plot", str(png), "-t", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
