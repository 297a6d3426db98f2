"""The passkey retrieval test (Mohtashami & Jaggi, 2023; llama.cpp's passkey example uses the same
wording): a random number hidden at some depth of repetitive filler text, then asked for."""
from __future__ import annotations

from typing import Callable, List

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(count_tokens: Callable[[str], int], n_tokens: int, depth: float, key: int) -> str:
    """A prompt of about ``n_tokens`` tokens (as counted by ``count_tokens``) with ``key`` placed
    after a fraction ``depth`` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    fixed = count_tokens(INTRO + KEY_LINE.format(key=key) + QUESTION)
    per_filler = count_tokens(FILLER * 64) / 64
    n_fill = max(1, round((n_tokens - fixed) / per_filler))
    before = round(n_fill * depth)
    parts: List[str] = [INTRO, FILLER * before, KEY_LINE.format(key=key), FILLER * (n_fill - before), QUESTION]
    return "".join(parts)
