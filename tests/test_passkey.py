"""The passkey prompt builder."""
from __future__ import annotations

import pytest

from pyselfextend.passkey import FILLER, KEY_LINE, QUESTION, passkey_prompt


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_length_and_depth(depth):
    prompt = passkey_prompt(words, 5000, depth, 12345)
    assert 5000 - words(FILLER) <= words(prompt) <= 5000
    assert prompt.endswith(QUESTION)
    key_at = prompt.index(KEY_LINE.format(key=12345))
    fillers_before = prompt[:key_at].count(FILLER)
    total = prompt.count(FILLER)
    assert abs(fillers_before - depth * total) <= 1


def test_never_longer_than_asked_when_the_estimate_overshoots():
    # A counter whose joins cost more than the parts suggest: the first estimate overshoots, and the
    # prompt must shrink its filler rather than lose the end of the question.
    def joins_cost_extra(text: str) -> int:
        return words(text) + text.count(". The") // 3

    for n in (700, 5000, 20000):
        prompt = passkey_prompt(joins_cost_extra, n, 0.9, 54321)
        assert prompt.endswith(QUESTION) and KEY_LINE.format(key=54321) in prompt
        assert n - 2 * words(FILLER) <= joins_cost_extra(prompt) <= n


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(words, 1000, 1.5, 1)


def test_passkey_command_on_a_tiny_model(tiny_model):
    import json
    import subprocess
    import sys

    # The tiny tokenizer spells text byte by byte, so the shortest passkey prompt is ~470 tokens.
    model = tiny_model(n_ctx_train=1024)
    r = subprocess.run([sys.executable, "-m", "pyselfextend", "passkey", "-m", str(model), "--lengths",
                        "700,1600", "--depths", "0.2,0.8", "--trials", "2", "--seed", "3", "--json", "-t", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trials = json.loads(r.stdout)
    assert len(trials) == 2 * 2 * 2
    assert {t["target_length"] for t in trials} == {700, 1600} and {t["depth"] for t in trials} == {0.2, 0.8}
    # as long as asked, never longer (the question is never cut off), short by less than one filler sentence
    assert all(t["target_length"] - 150 <= t["length"] <= t["target_length"] for t in trials)
    assert all(10000 <= t["key"] <= 99999 and isinstance(t["ok"], bool) for t in trials)
    assert all(t["key_logprob"] < 0 and t["key_tokens"] >= 1 for t in trials)
    assert {t["group_size"] > 1 for t in trials} == {False, True}  # 1600 exceeds the trained 1024


@pytest.mark.model
def test_smollm_finds_the_key_within_its_trained_context(smollm_path):
    from pyselfextend.passkey import format_table, run_passkey

    results = run_passkey(str(smollm_path), [1500], [0.2, 0.8], trials=1, seed=5, n_threads=2)
    assert all(r["ok"] for r in results), results
    table = format_table(results)
    cells = table.splitlines()[2]  # the found table's row: one trial per depth
    assert "1/1" in cells and "2/2" not in cells and "found 2/2" in table
    # a key the model found is one it finds likely
    assert all(r["key_logprob"] > -2.0 for r in results), results


@pytest.mark.model
def test_the_right_key_is_far_more_likely_than_a_wrong_one(smollm_path):
    # The continuous score: within the trained context SmolLM2 reads the key, so the key it was
    # shown is likelier than any other by a wide margin, token by token teacher-forced.
    from pyselfextend import LocalModel
    from pyselfextend.passkey import answer_ids, answer_logprob

    llm = LocalModel(smollm_path, n_ctx=2048, n_threads=2)
    prompt = passkey_prompt(lambda t: len(llm.tokenize(t)), 1500, 0.5, 73914)
    ids = llm.tokenize(prompt)
    right = answer_logprob(llm, ids, answer_ids(llm, prompt, ids, " 73914"))
    wrong = [answer_logprob(llm, ids, answer_ids(llm, prompt, ids, f" {k}")) for k in (73915, 37914, 51620)]
    assert right > -2.0 and max(wrong) < right - 5.0, (right, wrong)


def test_answer_logprob_is_the_log_softmax_of_one_evaluation(tiny_model):
    # Teacher forcing through prefill (reusing the cache) and a batch of the answer gives what one
    # fresh evaluation of prompt + answer says of the answer's tokens.
    import numpy as np

    from pyselfextend import LocalModel
    from pyselfextend.passkey import answer_ids, answer_logprob

    llm = LocalModel(tiny_model(), n_ctx=256, n_threads=1)
    prompt = "w1 w2 w3 w4 w5 w6 w7 w8"
    ids = llm.tokenize(prompt)
    answer = answer_ids(llm, prompt, ids, " w9 w10")
    assert len(answer) >= 2 and llm.tokenize(prompt + " w9 w10") == ids + answer
    llm.generate(ids, max_tokens=5, temperature=0)  # the cache now holds the prompt and more
    got = answer_logprob(llm, ids, answer)

    llm.reset()
    rows = llm.eval(ids + answer, all_logits=True).astype(np.float64)[len(ids) - 1:-1]
    want = sum(float(r[t] - np.log(np.exp(r - r.max()).sum()) - r.max()) for r, t in zip(rows, answer))
    assert got < 0 and abs(got - want) <= 1e-4 * abs(want), (got, want)
    with pytest.raises(ValueError, match="at least one answer token"):
        answer_logprob(llm, ids, [])


def test_a_length_too_short_for_the_question_is_a_clear_error(tiny_model):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pyselfextend", "passkey", "-m", str(tiny_model()), "--lengths", "100",
                        "-t", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "shortest passkey prompt" in r.stderr and "Traceback" not in r.stderr


def test_intervals():
    from pyselfextend.stats import mean_interval, wilson_interval

    # textbook values of the Wilson interval
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert mean_interval([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, 0.446, 4.554), abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
