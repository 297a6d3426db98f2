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


def test_evaluate_writes_the_results_page(tiny_model, tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("matplotlib")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "evaluate", "-m", str(tiny_model()), "--out", str(out),
                        "--lengths", "600,900", "--baseline-lengths", "600", "--depths", "0.5", "--ppl-ctx", "500", "--bucket", "128",
                        "--document", str(doc), "--bench-depths", "0", "-t", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "results.json").read_text())
    assert set(report["passkey"]) == {"SelfExtend", "ordinary", "llama.cpp grp-attn 4", "YaRN"}
    assert len(report["passkey"]["SelfExtend"]) == 2
    for name, trials in report["passkey"].items():  # the baselines see the same prompts at the shorter length
        assert trials[0]["key"] == report["passkey"]["SelfExtend"][0]["key"]
        assert len(trials) == (2 if name == "SelfExtend" else 1)
    assert all(p["n_predicted"] == 499 for p in report["perplexity"].values())
    assert set(report["bench"]["engines"]) == {"selfextend", "ordinary", "llama.cpp-fa", "llama.cpp"}
    page = (out / "results.md").read_text()
    for name in report["passkey"]:  # a passkey row, a perplexity column and a summary line for each method
        assert f"| {name} | " in page and f"Passkey, {name}" in page
    assert "pyselfextend passkey --lengths 600 --depths 0.5 --seed 0 --no-selfextend --threads 1" in page
    assert "Intel" in page or "AMD" in page or "cores" in page  # the machine is named
    assert "perplexity.png" in page and (out / "perplexity.png").exists() and "Peak resident memory" in page


def _report_with(selfextend_past: float, ordinary_past: float) -> dict:
    def curve(past: float) -> dict:
        # positions 1-8 within a trained context of 8, buckets of 2; 5-8 pool to sqrt(4 * 9) = 6
        ppl = [3.0, 3.0, 4.0, 9.0, past, past]
        return {"n_predicted": 12, "ppl": 5.0,
                "buckets": [{"start": 2 * i + 1, "end": 2 * i + 2, "n": 2, "ppl": p} for i, p in enumerate(ppl)]}

    return {"model": "m.gguf", "date": "2026-01-01", "threads": 1, "machine": "m", "command": "c", "n_ctx_train": 8,
            "passkey": {}, "perplexity": {"SelfExtend": curve(selfextend_past), "ordinary": curve(ordinary_past)}}


def test_results_page_judges_the_perplexity_goal_against_positions_half_to_full_trained_context():
    from pyselfextend.evaluate import render_markdown

    met = render_markdown(_report_with(6.5, 60.0))  # 6.5 / 6 = 1.08x
    assert "1.08x the perplexity of positions 5-8 (6.00): meets the within-10% goal" in met
    assert "ordinary: worst bucket past 8 tokens (9-10) 10.00x" in met
    assert "0.11x, 0.11x" in met  # SelfExtend over ordinary on the same tokens past 8
    missed = render_markdown(_report_with(6.9, 6.9))  # 1.15x
    assert "1.15x the perplexity of positions 5-8 (6.00): misses the within-10% goal" in missed
