"""pyselfextend evaluate: the whole evaluation, its results page, and resuming an interrupted run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyselfextend.passkey import passkey_keys


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyselfextend", "evaluate", *args], capture_output=True, text=True,
                          timeout=600)


def test_evaluate_writes_the_results_page(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    out = tmp_path / "out"
    r = evaluate("-m", str(tiny_model()), "--out", str(out), "--lengths", "600,900", "--baseline-lengths", "600",
                 "--depths", "0.5", "--ppl-ctx", "500", "--bucket", "128", "--document", str(doc),
                 "--bench-depths", "0,256", "-t", "1")
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
    # the bench's roofline, each engine's attention GFLOP/s and cache GB/s, and the time to read 256 tokens
    bench = report["bench"]
    assert f"{bench['roofline']['fma_gflops']:.0f} GFLOP/s of f32 multiply-add" in page
    se = bench["engines"]["selfextend"]["depths"]["256"]
    assert f"{se['attention_gflops']:.1f} GFLOP/s, {se['cache_gb_per_s']:.2f} GB/s" in page
    assert f"256 tokens selfextend {se['read_seconds']:.1f} s" in page
    reads = {e: bench["engines"][e]["depths"]["256"]["read_seconds"] for e in ("llama.cpp-fa", "llama.cpp")}
    assert f"{min(reads.values()) / se['read_seconds']:.2f}x at 256 tokens" in page  # a speed-up: llama's time / ours
    assert "at depth 256" in page


def test_results_page_takes_a_bench_without_its_newer_fields():
    # A results.json of an earlier version: no roofline, GFLOP/s or read times; only our engines.
    from pyselfextend.evaluate import render_markdown

    depth = {"prefill": 100.0, "decode": 20.0}
    bench = {"n_prompt": 512, "n_gen": 128, "repetitions": 2, "date": "2026-01-01", "ratios": {},
             "engines": {e: {"peak_rss_bytes": 2**20, "depths": {"0": depth, "4096": depth}}
                         for e in ("selfextend", "ordinary")}}
    page = render_markdown(dict(_report_with(6.5, 60.0), bench=bench))
    assert "| 4096 | 100.0 / 20.0 | 100.0 / 20.0 |  |" in page
    assert "machine's limits" not in page and "from empty" not in page and "Speed against" not in page


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


def test_keys_depend_only_on_the_seed_and_the_cells_before():
    short = passkey_keys(0, [600], [0.1, 0.9], 2)
    longer = passkey_keys(0, [600, 900], [0.1, 0.9], 2)
    assert all(longer[cell] == key for cell, key in short.items()) and len(longer) == 8
    assert passkey_keys(1, [600], [0.1, 0.9], 2) != short
    assert all(10000 <= k <= 99999 for k in longer.values())


def test_resume_keeps_the_finished_steps_and_runs_the_rest(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    out = tmp_path / "out"
    args = ["-m", str(tiny_model()), "--out", str(out), "--lengths", "600,900", "--depths", "0.5", "--ppl-ctx", "400",
            "--bucket", "128", "--document", str(doc), "--methods", "SelfExtend,ordinary", "--no-bench", "-t", "1"]
    r = evaluate(*args)
    assert r.returncode == 0, r.stderr
    whole = json.loads((out / "results.json").read_text())
    assert whole["resumed"] == 0

    # As if the run had stopped after SelfExtend's first length; the mark shows what is kept, not redone.
    partial = dict(whole, passkey={"SelfExtend": [dict(whole["passkey"]["SelfExtend"][0], answer="KEPT")]},
                   perplexity={})
    (out / "results.json").write_text(json.dumps(partial))
    r = evaluate(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "kept from the earlier run" in r.stderr
    resumed = json.loads((out / "results.json").read_text())
    selfextend = resumed["passkey"]["SelfExtend"]
    assert selfextend[0]["answer"] == "KEPT"
    assert [t["key"] for t in selfextend] == [t["key"] for t in whole["passkey"]["SelfExtend"]]
    assert selfextend[1]["answer"] == whole["passkey"]["SelfExtend"][1]["answer"]  # redone: the same greedy answer
    assert resumed["passkey"]["ordinary"][0]["key"] == selfextend[0]["key"]
    for name, p in resumed["perplexity"].items():
        assert p["ppl"] == pytest.approx(whole["perplexity"][name]["ppl"], rel=1e-6) and p["seconds"] > 0
    seconds = [t["seconds"] for ts in resumed["passkey"].values() for t in ts]
    seconds += [p["seconds"] for p in resumed["perplexity"].values()]
    assert resumed["minutes"] == round(sum(seconds) / 60, 1)
    assert resumed["resumed"] == 1 and "--resume" not in resumed["command"]
    assert "continued with `--resume` once" in (out / "results.md").read_text()

    # Another thread count measures something else: it cannot be resumed into the same folder.
    r = evaluate(*args[:-1], "2", "--resume")
    assert r.returncode == 1 and "cannot resume" in r.stderr and "Traceback" not in r.stderr


def test_baseline_lengths_must_start_the_lengths(tiny_model, tmp_path):
    r = evaluate("-m", str(tiny_model()), "--out", str(tmp_path), "--lengths", "600,900", "--baseline-lengths", "900",
                 "--no-bench", "-t", "1")
    assert r.returncode == 1 and "must be the first of the lengths" in r.stderr and "Traceback" not in r.stderr


def test_results_page_says_where_each_missed_key_sat():
    from pyselfextend.evaluate import render_markdown

    def trial(depth: float, ok: bool) -> dict:
        return {"length": 12000, "target_length": 12288, "depth": depth, "trial": 0, "key": 12345, "answer": "no",
                "ok": ok, "seconds": 1.0, "group_size": 2, "window": 2048, "method": "selfextend"}

    page = render_markdown({"model": "m.gguf", "date": "d", "threads": 1, "machine": "m", "command": "c",
                            "n_ctx_train": 8192, "perplexity": {},
                            "passkey": {"SelfExtend": [trial(0.5, False), trial(0.9, False), trial(0.1, True)]}})
    assert "Goal, every trial found: not met" in page
    assert "depth 0.9 at 12000 tokens (the key about 1200 tokens before the question, within the window W=2048" in page
    assert "depth 0.5 at 12000 tokens (the key about 6000 tokens before the question, beyond the window W=2048" in page


def test_a_second_model_family_runs_selfextend_against_ordinary_and_resumes_trial_by_trial(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 200)
    out = tmp_path / "out"
    second = tiny_model(arch="qwen2", n_ctx_train=512)
    args = ["-m", str(tiny_model()), "--out", str(out), "--lengths", "600", "--depths", "0.2,0.8", "--ppl-ctx", "300",
            "--bucket", "128", "--document", str(doc), "--methods", "SelfExtend", "--no-bench", "-t", "1",
            "--second-model", str(second)]
    r = evaluate(*args)
    assert r.returncode == 0, r.stderr
    whole = json.loads((out / "results.json").read_text())
    model = whole["second_model"]
    assert model["n_ctx_train"] == 512 and set(model["passkey"]) == {"SelfExtend", "ordinary"}
    se, plain = model["passkey"]["SelfExtend"], model["passkey"]["ordinary"]
    # the default lengths, 1.25x and 1.5x its trained context, two depths each, the same prompts for both
    assert [(t["target_length"], t["depth"]) for t in se] == [(640, 0.2), (640, 0.8), (768, 0.2), (768, 0.8)]
    assert [t["key"] for t in se] == [t["key"] for t in plain]
    assert {t["method"] for t in se} == {"selfextend"} and {t["method"] for t in plain} == {"ordinary"}
    gains = [a["key_logprob"] - b["key_logprob"] for a, b in zip(se, plain)]
    page = (out / "results.md").read_text()
    assert "## A second model family: model.gguf" in page
    assert f"log P(key) SelfExtend minus ordinary {sum(gains) / 4:+.2f}" in page  # the summary line
    assert f"pyselfextend passkey -m {second} --lengths 640,768 --depths 0.2,0.8 --seed 0 --no-selfextend" in page

    # As if the run had stopped inside ordinary attention's first length: the finished trial is kept.
    partial = dict(whole, second_model=dict(model, passkey={"SelfExtend": se, "ordinary": [dict(plain[0],
                                                                                                  answer="KEPT")]}))
    (out / "results.json").write_text(json.dumps(partial))
    r = evaluate(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "ordinary at 640: 1 trials kept from the earlier run" in r.stderr
    assert "SelfExtend at 768: kept from the earlier run" in r.stderr
    resumed = json.loads((out / "results.json").read_text())["second_model"]["passkey"]
    assert resumed["SelfExtend"] == se
    assert [t["answer"] for t in resumed["ordinary"]] == ["KEPT"] + [t["answer"] for t in plain[1:]]
