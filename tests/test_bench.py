"""`pyselfextend bench` on a tiny model: every engine, every depth, ratios that follow from the speeds."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


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
        # A tiny model's process: more than Python and the module, far less than the roofline's
        # 512 MiB buffer (which must not reach the engines' figures).
        assert 10 * 2**20 < e["peak_rss_bytes"] < 400 * 2**20
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

    # Attention GFLOP/s and cache GB/s beside tokens/s, from the model's shape (tiny_gguf's defaults:
    # 2 layers, 2 query heads, 1 KV head of 64) and the f16 cache; and the machine's limits.
    roof = report["roofline"]
    assert roof["fma_gflops"] > 0 and roof["read_gb_per_s"] > 0 and roof["n_threads"] == 1
    m = engines["llama.cpp"]["depths"]["300"]
    keys = sum(300 + t + 1 for t in range(32))
    assert math.isclose(m["attention_gflops"], 4 * 64 * 2 * 2 * keys * m["prefill"] / 32 / 1e9, rel_tol=1e-9)
    assert math.isclose(m["cache_gb_per_s"], 2 * 2 * 1 * 64 * 2 * (300 + 4.5) * m["decode"] / 1e9, rel_tol=1e-9)


def test_bench_compares_cache_types_in_one_run(tiny_model):
    r = _bench(tiny_model(), "--engines", "selfextend,llama.cpp-fa", "--cache-type", "f16,q8_0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["cache_types"] == ["f16", "q8_0"]
    by = report["by_cache_type"]
    assert [by[ct]["cache_type"] for ct in ("f16", "q8_0")] == ["f16", "q8_0"]
    for ct in ("f16", "q8_0"):
        assert set(by[ct]["engines"]) == {"selfextend", "llama.cpp-fa"}
        assert math.isclose(by[ct]["ratios"]["300"]["decode_vs_best_llama.cpp"],
                            by[ct]["engines"]["selfextend"]["depths"]["300"]["decode"]
                            / by[ct]["engines"]["llama.cpp-fa"]["depths"]["300"]["decode"], rel_tol=1e-12)
    # cache GB/s from each type's own bytes per value: q8_0 reads 34 bytes per 32 values
    m = by["q8_0"]["engines"]["selfextend"]["depths"]["300"]
    assert math.isclose(m["cache_gb_per_s"], 2 * 2 * 1 * 64 * 34 / 32 * (300 + 4.5) * m["decode"] / 1e9, rel_tol=1e-9)
    against = report["against_first"]["q8_0"]
    for e in ("selfextend", "llama.cpp-fa"):
        assert math.isclose(against[e]["depths"]["300"]["decode"], by["q8_0"]["engines"][e]["depths"]["300"]["decode"]
                            / by["f16"]["engines"][e]["depths"]["300"]["decode"], rel_tol=1e-12)
        assert math.isclose(against[e]["peak_rss"], by["q8_0"]["engines"][e]["peak_rss_bytes"]
                            / by["f16"]["engines"][e]["peak_rss_bytes"], rel_tol=1e-12)
    r = _bench(tiny_model(), "--engines", "selfextend", "--cache-type", "f16,q8_0")
    assert r.returncode == 0 and "q8_0 cache / f16 cache, same run" in r.stdout and "  selfextend " in r.stdout
    r = _bench(tiny_model(), "--engines", "llama.cpp", "--cache-type", "q8_0")
    assert r.returncode != 0 and "no engine of llama.cpp runs a q8_0 cache" in r.stderr and "Traceback" not in r.stderr
    r = _bench(tiny_model(), "--engines", "selfextend", "--cache-type", "f16,q5_1")
    assert r.returncode != 0 and "q5_1" in r.stderr and "Traceback" not in r.stderr


def test_roofline_measures_this_machine():
    from pyselfextend import _engine

    one, two = _engine.roofline(1), _engine.roofline(2)
    # Any CPU that runs this multiplies-adds faster than 1 GFLOP/s and reads memory faster than 0.5 GB/s.
    assert one["fma_gflops"] > 1 and one["read_gb_per_s"] > 0.5
    assert two["n_threads"] == 2 and two["fma_gflops"] > 1
    assert _engine.cache_bytes_per_value("f16") == 2 and _engine.cache_bytes_per_value("q8_0") == 34 / 32
    with pytest.raises(ValueError):
        _engine.roofline(0)


def test_bench_table_and_bad_engine(tiny_model):
    r = _bench(tiny_model(), "--engines", "selfextend,llama.cpp")
    assert r.returncode == 0, r.stderr
    assert "/ best llama" in r.stdout and "peak RSS" in r.stdout and "llama.cpp-fa" not in r.stdout
    r = _bench(tiny_model(), "--engines", "selfextend,vllm")
    assert r.returncode != 0 and "unknown engine 'vllm'" in r.stderr and "Traceback" not in r.stderr


def test_bench_names_a_missing_llama_bench(tiny_model, tmp_path):
    r = _bench(tiny_model(), "--engines", "selfextend", "--llama-bench", str(tmp_path / "no-such-llama-bench"))
    assert r.returncode != 0 and "cannot run llama-bench" in r.stderr and "Traceback" not in r.stderr


# llama.cpp's own llama-bench takes about 6 minutes to build on two cores (scripts/build-llama-bench.sh),
# too long for CI's budget: this runs where it has been built.
_LLAMA_BENCH = next(iter(sorted(Path(__file__).resolve().parents[1].glob("build/llama-bench/**/llama-bench-build/llama-bench"))), None)


@pytest.mark.skipif(_LLAMA_BENCH is None, reason="llama-bench not built (bash scripts/build-llama-bench.sh)")
def test_bench_runs_llama_bench_beside_the_engines(tiny_model):
    r = _bench(tiny_model(), "--engines", "selfextend,llama.cpp-fa", "--llama-bench", str(_LLAMA_BENCH), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    engines = report["engines"]
    assert set(engines) == {"selfextend", "llama.cpp-fa", "llama-bench-fa", "llama-bench"}
    for e in ("llama-bench-fa", "llama-bench"):
        assert set(engines[e]["depths"]) == {"0", "300"} and engines[e]["peak_rss_bytes"] is None
        assert all(v["prefill"] > 0 and v["decode"] > 0 for v in engines[e]["depths"].values())
    for d in ("0", "300"):
        best = max(engines[e]["depths"][d]["decode"] for e in ("llama-bench-fa", "llama-bench"))
        assert math.isclose(report["ratios"][d]["decode_vs_best_llama-bench"],
                            engines["selfextend"]["depths"][d]["decode"] / best, rel_tol=1e-12)
        assert math.isclose(report["ratios"][d]["decode_vs_best_llama.cpp"],
                            engines["selfextend"]["depths"][d]["decode"] / engines["llama.cpp-fa"]["depths"][d]["decode"],
                            rel_tol=1e-12)
