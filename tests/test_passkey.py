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
    assert {t["group_size"] > 1 for t in trials} == {False, True}  # 1600 exceeds the trained 1024


@pytest.mark.model
def test_smollm_finds_the_key_within_its_trained_context(smollm_path):
    from pyselfextend.passkey import format_table, run_passkey

    results = run_passkey(str(smollm_path), [1500], [0.2, 0.8], trials=1, seed=5, n_threads=2)
    assert all(r["ok"] for r in results), results
    assert "2/2" not in format_table(results) and "1/1" in format_table(results)


def test_a_length_too_short_for_the_question_is_a_clear_error(tiny_model):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pyselfextend", "passkey", "-m", str(tiny_model()), "--lengths", "100",
                        "-t", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "shortest passkey prompt" in r.stderr and "Traceback" not in r.stderr
