"""The passkey prompt builder."""
from __future__ import annotations

import pytest

from pyselfextend.passkey import FILLER, KEY_LINE, QUESTION, passkey_prompt


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_length_and_depth(depth):
    prompt = passkey_prompt(words, 5000, depth, 12345)
    assert abs(words(prompt) - 5000) <= words(FILLER)
    assert prompt.endswith(QUESTION)
    key_at = prompt.index(KEY_LINE.format(key=12345))
    fillers_before = prompt[:key_at].count(FILLER)
    total = prompt.count(FILLER)
    assert abs(fillers_before - depth * total) <= 1


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(words, 1000, 1.5, 1)
