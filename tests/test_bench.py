"""`pyselfextend bench` on a tiny model: every engine, every depth, ratios that follow from the speeds."""
from __future__ import annotations

import json
import math
import subprocess
import sys


def _bench(model, *extra):
    return subprocess.run([sys.executable, "-m", "pyselfextend", "bench", "-m", str(model), "--depths", "0,300",
                           "--n-prompt", "32", "--n-gen", "8", "-r", "1", "-t", "1", *extra],
                          capture_output=True, text=True, timeout=600)


def test_bench_reports_every_engine_and_consistent_ratios(tiny_model):
    r = _bench(tiny_model(), "--json")  # trained context 256: depth 300 needs SelfExtend
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    engines = report["engines"]
    assert set(engines) == {"selfextend", "ordinary", "llama.cpp-fa", "llama.cpp"}
    for e in engines.values():
        assert e["peak_rss_bytes"] > 10 * 2**20
        assert set(e["depths"]) == {"0", "300"}
        assert all(v["prefill"] > 0 and v["decode"] > 0 for v in e["depths"].values())
    assert engines["selfextend"]["group_size"] > 1  # 300 + 32 tokens exceed the trained 256
    for d in ("0", "300"):
        for k in ("prefill", "decode"):
            best = max(engines[e]["depths"][d][k] for e in ("llama.cpp-fa", "llama.cpp"))
            assert math.isclose(report["ratios"][d][f"{k}_vs_best_llama.cpp"],
                                engines["selfextend"]["depths"][d][k] / best, rel_tol=1e-12)
    assert math.isclose(report["ratios"]["peak_rss_vs_llama.cpp-fa"],
                        engines["selfextend"]["peak_rss_bytes"] / engines["llama.cpp-fa"]["peak_rss_bytes"])


def test_bench_table_and_bad_engine(tiny_model):
    r = _bench(tiny_model(), "--engines", "selfextend,llama.cpp")
    assert r.returncode == 0, r.stderr
    assert "/ best llama" in r.stdout and "peak RSS" in r.stdout and "llama.cpp-fa" not in r.stdout
    r = _bench(tiny_model(), "--engines", "selfextend,vllm")
    assert r.returncode != 0 and "unknown engine 'vllm'" in r.stderr and "Traceback" not in r.stderr
