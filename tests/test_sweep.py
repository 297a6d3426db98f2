"""pyselfextend sweep: the planted-facts task, reading with questions on the way, the grid, the page."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pyselfextend.baselines import LlamaCppGroupAttention
from pyselfextend.sweep import build_layout, question_ids, read_and_ask, references_named, sweep_settings


def _prose(n_sentences: int, seed: int = 0) -> str:
    """Sentences of words for the tiny model, one per line: its tokenizer spells a space as three
    bytes, a newline as one, so a sentence ends where a statement can go."""
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(f"w{int(w)}" for w in rng.integers(0, 60, size=3)) + "." for _ in range(n_sentences))


def test_a_layout_plants_each_fact_between_sentences(tiny_model):
    from pyselfextend import LocalModel

    llm = LocalModel(tiny_model(), n_ctx=1024, n_threads=1)
    layout = build_layout(llm, _prose(300), [512, 768], seed=1, spacing=150)
    assert len(layout.ids) == 768 and layout.ids[0] == llm.tokenize("")[0]
    assert len({f.index for f in layout.facts}) == len(layout.facts) >= 4  # each fact about something else
    assert len({f.key for f in layout.facts}) == len(layout.facts)
    starts = [f.start for f in layout.facts]
    assert starts == sorted(starts) and all(a.end <= b.start for a, b in zip(layout.facts, layout.facts[1:]))
    for f in layout.facts:
        statement = llm.detokenize(layout.ids[f.start:f.end]).replace("\u2581", " ")  # the tiny vocabulary's space
        assert statement.lstrip().startswith("(Added to this copy: ") and statement.endswith(f" {f.key}.)")
        assert llm.detokenize(layout.ids[f.start - 1:f.start]).endswith(".")  # after a sentence
    # each length asks about the facts that end before its question, and those are earlier ones
    early, late = layout.asked_at(512), layout.asked_at(768)
    assert 1 <= len(early) < len(late) and late[:len(early)] == early
    assert all(f.end <= 512 - layout.allowance for f in early)
    # the same seed, the same layout; another seed, other facts
    assert build_layout(llm, _prose(300), [512, 768], seed=1, spacing=150).fingerprint() == layout.fingerprint()
    assert build_layout(llm, _prose(300), [512, 768], seed=2, spacing=150).fingerprint() != layout.fingerprint()
    with pytest.raises(ValueError, match="too few for length"):
        build_layout(llm, _prose(5), [512, 768], spacing=150)


@pytest.mark.parametrize("method", ["selfextend", "group attention"])
def test_each_question_scores_what_a_fresh_prompt_does(tiny_model, method):
    # The sweep's answers come from questions appended to a document read batch by batch and
    # dropped again; each must score what the same prompt scores evaluated on its own, and the
    # document's likelihood must be that of one plain reading. The lengths leave 96, 0 and 1
    # tokens of text after the last whole batch.
    from pyselfextend import LocalModel
    from pyselfextend.perplexity import target_log_probs

    path = tiny_model()
    tokenizer = LocalModel(path, n_ctx=2048, n_threads=1)
    allowance = build_layout(tokenizer, _prose(300), [1000], spacing=150).allowance
    lengths = [allowance + 352, allowance + 512, allowance + 769]
    layout = build_layout(tokenizer, _prose(300), lengths, seed=0, spacing=150)
    B = 256

    def opened():
        if method == "selfextend":
            return LocalModel(path, n_ctx=lengths[-1], n_threads=1, n_batch=B, group_size=8, window=32)
        return LlamaCppGroupAttention(path, lengths[-1], 4, 1, n_batch=B)

    llm = opened()
    got = read_and_ask(llm, layout, lengths)
    assert [t["length"] for t in got["trials"]] == [n for n in lengths for _ in layout.asked_at(n)]
    assert len(got["trials"]) >= 6
    fresh = opened()
    for t in got["trials"]:
        fact = next(f for f in layout.facts if f.start == t["position"])
        q, answer = question_ids(tokenizer, fact)
        end = layout.text_end(t["length"])
        # Group attention divides positions batch by batch: a fresh prompt of text + question
        # goes in the same batches as the sweep's reading when the rest of the text after the last
        # whole batch and the question fit in one (with 512-token batches and a real model's
        # questions of a few dozen tokens, always).
        assert end % B + len(q) + len(answer) <= B
        fresh.reset()
        rows = fresh.eval(layout.ids[:end] + q + answer[:-1], all_logits=True)[end + len(q) - 1:]
        want = float(target_log_probs(rows, answer).sum())
        assert abs(t["key_logprob"] - want) <= 1e-4 * abs(want) + 1e-4, (t, want)
        assert t["distance"] == end - fact.start
    stop = layout.text_end(lengths[-1])
    fresh.reset()
    plain = -target_log_probs(fresh.eval(layout.ids[:stop], all_logits=True), layout.ids[1:stop + 1])
    assert got["nll"].shape == (stop,) and np.isfinite(got["nll"]).all()
    # The text's last tokens went in with a question, in a bigger batch than the plain reading's
    # last: the same up to rounding (llama.cpp's attention for a single query rounds otherwise).
    whole = stop - stop % B
    assert np.allclose(got["nll"][:whole], plain[:whole], rtol=1e-5, atol=1e-5)
    assert method == "selfextend" or np.array_equal(got["nll"][:whole], plain[:whole])
    assert np.allclose(got["nll"][whole:], plain[whole:], rtol=1e-3)


def test_paired_differences_average_each_fact_first():
    from pyselfextend.sweep import paired_difference

    def reading(label, seed, scores):  # scores: {(length, fact): log P}
        return {"label": label, "seed": seed, "trials": [{"length": n, "fact": f, "key_logprob": v}
                                                         for (n, f), v in scores.items()]}

    # Fact 1 is asked at two lengths: its two differences (1 and 3) count as one unit, 2.
    report = {"readings": [
        reading("A", 0, {(100, 1): -1.0, (200, 1): -1.0, (200, 2): -2.0}),
        reading("B", 0, {(100, 1): -2.0, (200, 1): -4.0, (200, 2): -2.5}),
        reading("A", 1, {(100, 1): -3.0}), reading("B", 1, {(100, 1): -3.0})]}
    mean, lo, hi, units = paired_difference(report, {100: "A", 200: "A"}, {100: "B", 200: "B"})
    assert units == 3 and mean == pytest.approx((2.0 + 0.5 + 0.0) / 3)
    sd = np.std([2.0, 0.5, 0.0], ddof=1)
    assert hi - mean == pytest.approx(4.303 * sd / np.sqrt(3), rel=1e-3)  # t with 2 degrees of freedom
    assert paired_difference(report, {100: "A"}, {200: "B"}) is None  # no length in common


def test_the_grid_keeps_the_settings_that_reach_each_length():
    settings = sweep_settings(8192, [12288, 16384, 24576], [2, 3, 4, 6, 8], [1024, 2048, 4096])
    se = [s for s in settings if s.family == "SelfExtend"]
    cells = {n: [s for s in se if n in s.lengths] for n in (12288, 16384, 24576)}
    # (L - W) * G + W >= n: every G at 12k, G >= 3 at 16k, and at 24k G >= 4 (G >= 6 with W = 4k)
    assert [len(cells[n]) for n in (12288, 16384, 24576)] == [15, 12, 8]
    assert all(s.window % s.group_size == 0 and s.window > {1024: 1016, 2048: 2040, 4096: 4088}[
        min((1024, 2048, 4096), key=lambda w: abs(w - s.window))] for s in se)  # W rounded down to a multiple of G
    assert {s.label for s in cells[24576] if s.window >= 4090} == {"G=6 W=4092", "G=8 W=4096"}
    refs = {s.label: s.lengths for s in settings if s.family != "SelfExtend"}
    assert refs["ordinary"] == (12288, 16384, 24576)
    assert refs["YaRN 12k"] == (12288,) and refs["YaRN 24k"] == (24576,)
    # all but the last batch divided by n: 2 * (8192 - 512) + 512 = 15872 tokens, short of 16k
    assert refs["llama.cpp grp-attn-n 2"] == (12288,) and refs["llama.cpp grp-attn-n 8"] == (12288, 16384, 24576)
    assert not any(s.family != "SelfExtend" for s in sweep_settings(8192, [12288], [4], [2048], references=()))
    only = sweep_settings(8192, [12288, 16384], [4], [2048], references=references_named("ordinary"))
    assert [s.label for s in only] == ["G=4 W=2048", "ordinary"]
    with pytest.raises(ValueError, match="unknown reference 'yarn'"):
        references_named("ordinary,yarn")


def test_the_sweep_command_writes_its_page_and_resumes(tiny_model, tmp_path):
    model = tiny_model(n_ctx_train=512)
    doc = tmp_path / "doc.txt"
    doc.write_text(_prose(300))
    out = tmp_path / "sweep"
    from pyselfextend.sweep import run_sweep

    logs = []
    grid = dict(lengths=[768, 1024], groups=[2, 3, 4], windows=[64, 128], replicates=2, threads=1, document=doc,
                spacing=150, n_batch=256)
    report = run_sweep(str(model), out, log=logs.append, **grid)
    labels = {(r["label"], r["seed"]) for r in report["readings"]}
    assert {lab for lab, _ in labels if lab.startswith("G=")} == {"G=2 W=64", "G=2 W=128", "G=3 W=63", "G=3 W=126",
                                                                  "G=4 W=64", "G=4 W=128"}
    assert {seed for _, seed in labels} == {0, 1}
    reach = {r["label"]: r["lengths"] for r in report["readings"]}
    # (L - W) * G + W: G=2 reaches 768 only; group attention n * (L - n_batch) + n_batch: n=2 768 only
    assert reach["G=2 W=128"] == [768] and reach["G=3 W=126"] == [768, 1024]
    assert reach["llama.cpp grp-attn-n 2"] == [768] and reach["llama.cpp grp-attn-n 4"] == [768, 1024]
    assert {"ordinary", "YaRN 768", "YaRN 1k"} <= set(reach)
    for r in report["readings"]:
        assert r["trials"] and all(-1e3 < t["key_logprob"] < 0 for t in r["trials"])
        assert set(r["ppl_past_L"]) == {str(n) for n in r["lengths"]} and all(p > 1 for p in r["ppl_past_L"].values())
    page = (out / "sweep.md").read_text()
    assert json.loads((out / "sweep.json").read_text())["readings"] == report["readings"]
    assert "| G \\ W | 64 | 128 |" in page and "## 1k tokens" in page and "llama.cpp grp-attn-n 4" in page

    # Rules compared with the default question by question: the default against itself is 0; any
    # other rule's paired difference is the difference of the two cells' means on the same questions.
    from pyselfextend.sweep import cells, default_rule, paired_difference

    assert default_rule(report) == {768: "G=2 W=128", 1024: "G=3 W=126"}
    assert "| W = 128 (L/4), smallest G that reaches | G=2 W=128 | G=3 W=126 |" in page
    assert "SelfExtend's default (G=3 W=126) minus each, question by question" in page
    assert paired_difference(report, default_rule(report), default_rule(report))[:3] == (0.0, 0.0, 0.0)
    by = cells(report)
    mean, lo, hi, facts = paired_difference(report, {1024: "G=4 W=64"}, {1024: "G=4 W=128"})
    assert facts == len(by[("G=4 W=64", 1024)].trials) >= 8  # one length: each fact asked once per layout
    assert mean == pytest.approx(by[("G=4 W=64", 1024)].logprob()[0] - by[("G=4 W=128", 1024)].logprob()[0])
    assert lo < mean < hi
    # The page lists every question only for a few settings; each row has every setting's score.
    from pyselfextend.sweep import _questions_section

    assert "## Question by question" not in page
    rows = [line for line in _questions_section(report, most=99) if line.startswith(("| 768 |", "| 1k |"))]
    asked = {(t["length"], r["seed"], t["position"]) for r in report["readings"] for t in r["trials"]}
    assert len(rows) == len(asked) and all(row.count(" found") + row.count(" missed") == len(
        [r for r in report["readings"] if r["seed"] == int(row.split(" | ")[1]) and
         (768 if row.startswith("| 768") else 1024) in r["lengths"]]) for row in rows)

    # Interrupted and resumed: what was finished is kept, not read again.
    saved = json.loads((out / "sweep.json").read_text())
    saved["readings"] = saved["readings"][:3]
    (out / "sweep.json").write_text(json.dumps(saved))
    logs.clear()
    again = run_sweep(str(model), out, log=logs.append, resume=True, **grid)
    assert sum("kept from the earlier run" in m for m in logs) == 3
    assert again["readings"][:3] == saved["readings"]
    assert [(r["label"], r["seed"]) for r in again["readings"]] == [(r["label"], r["seed"]) for r in report["readings"]]
    # the same trials again: reading is deterministic
    assert again["readings"][5]["trials"] == report["readings"][5]["trials"]
    # another batch size is another reading for group attention: not resumed
    with pytest.raises(ValueError, match="another n_batch"):
        run_sweep(str(model), out, resume=True, **{**grid, "n_batch": 512})


def test_the_sweep_command_line(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "sweep", "--groups", "1,2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "must be >= 2" in r.stderr
    doc = tmp_path / "doc.txt"
    doc.write_text(_prose(3))
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "sweep", "-m", str(tiny_model(n_ctx_train=256)),
                        "--lengths", "400", "--groups", "2", "--windows", "32", "--document", str(doc),
                        "--out", str(tmp_path / "o"), "-t", "1"], capture_output=True, text=True, timeout=60)
    # G=2, W=32 reaches (256 - 32) * 2 + 32 = 480 tokens: 400 is fine, but the text is too short
    assert r.returncode != 0 and "too few for length 400" in r.stderr and "Traceback" not in r.stderr
    # 16 facts, one per 10 tokens of 400: too many
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "sweep", "-m", str(tiny_model(n_ctx_train=256)),
                        "--lengths", "400", "--groups", "2", "--windows", "32", "--document", str(doc),
                        "--spacing", "10", "--references", "none", "--out", str(tmp_path / "o"), "-t", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "one per 10 tokens" in r.stderr and "Traceback" not in r.stderr
    # One SelfExtend setting against ordinary attention: a page of the two, question by question
    doc.write_text(_prose(300))
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "sweep", "-m", str(tiny_model(n_ctx_train=256)),
                        "--lengths", "400", "--groups", "2", "--windows", "32", "--document", str(doc),
                        "--spacing", "100", "--references", "ordinary", "--out", str(tmp_path / "one"), "-t", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "one" / "sweep.md").read_text()
    assert page.startswith("# SelfExtend (G=2 W=32) against ordinary: a sweep on model.gguf")
    assert "## Rules" not in page and not (tmp_path / "one" / "sweep.png").exists()
    questions = page.split("## Question by question")[1]
    assert "| length | layout | depth | right answer | G=2 W=32 | ordinary |" in questions
    assert questions.count("\n| 400 | 0 | ") == len(json.loads((tmp_path / "one" / "sweep.json").read_text())[
        "readings"][0]["trials"]) > 0
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "sweep", "--references", "ordinary,yarn"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown reference 'yarn'" in r.stderr


@pytest.mark.model
def test_smollm_answers_the_planted_facts_within_its_trained_context(smollm_path):
    # The task must be one the model can do where nothing is extended; otherwise no setting could
    # be told from another past it.
    from pathlib import Path

    from pyselfextend import LocalModel
    from pyselfextend.evaluate import fetch_gnu_standards

    doc = fetch_gnu_standards(Path.home() / ".cache" / "pyselfextend" / "documents" / "gnu-standards.txt")
    llm = LocalModel(smollm_path, n_ctx=3072, n_threads=2)
    layout = build_layout(llm, doc.read_text(encoding="utf-8")[:40000], [3072], seed=0, spacing=700)
    assert layout.allowance <= 64 and len(layout.facts) == 4
    got = read_and_ask(llm, layout, [3072])
    trials = got["trials"]
    assert len(trials) == 4 and sum(t["ok"] for t in trials) >= 3, trials
    assert np.mean([t["key_logprob"] for t in trials]) > -3.0, trials
