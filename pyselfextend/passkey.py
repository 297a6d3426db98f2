"""The passkey retrieval test (Mohtashami & Jaggi, 2023; llama.cpp's passkey example uses the same
wording): a random number hidden at some depth of repetitive filler text, then asked for."""
from __future__ import annotations

import math
import random
import re
import time
from typing import Callable, Dict, List, Optional, Tuple

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(count_tokens: Callable[[str], int], n_tokens: int, depth: float, key: int) -> str:
    """A prompt of at most ``n_tokens`` tokens (as counted by ``count_tokens``), and within one filler
    sentence of it, with ``key`` placed after a fraction ``depth`` of the filler. The prompt always
    ends with the whole question: it is never cut to fit."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def build(n_fill: int) -> str:
        before = round(n_fill * depth)
        return "".join([INTRO, FILLER * before, KEY_LINE.format(key=key), FILLER * (n_fill - before), QUESTION])

    fixed = count_tokens(INTRO + KEY_LINE.format(key=key) + QUESTION)
    per_filler = count_tokens(FILLER * 64) / 64
    n_fill = max(1, round((n_tokens - fixed) / per_filler))
    prompt = build(n_fill)
    # Tokens merge differently at the joins, so the estimate can overshoot by a few tokens: drop
    # filler until the prompt fits.
    while n_fill > 1 and (excess := count_tokens(prompt) - n_tokens) > 0:
        n_fill = max(1, n_fill - max(1, math.ceil(excess / per_filler)))
        prompt = build(n_fill)
    return prompt


Cell = Tuple[int, float, int]  # (length, depth, trial)


def passkey_keys(seed: int, lengths: List[int], depths: List[float], trials: int) -> Dict[Cell, int]:
    """The key of every (length, depth, trial), drawn in that order from one generator seeded with
    ``seed``: runs with the same seed whose lengths start alike ask for the same keys."""
    rng = random.Random(seed)
    return {(n, d, t): rng.randint(10000, 99999) for n in lengths for d in depths for t in range(trials)}


def run_passkey(model_path: str, lengths: List[int], depths: List[float], trials: int = 1, seed: int = 0,
                group_size: Optional[int] = None, window: Optional[int] = None, selfextend: bool = True,
                n_threads: Optional[int] = None, n_batch: int = 512,
                log: Callable[[str], None] = lambda msg: None, rope_scaling: Optional[str] = None,
                rope_factor: Optional[float] = None, grp_attn_n: Optional[int] = None,
                show_progress: bool = False, keys: Optional[Dict[Cell, int]] = None) -> List[Dict[str, object]]:
    """Runs the passkey test: for each length, depth and trial a random 5-digit key, greedy
    decoding of up to 16 tokens, and whether the answer's first number is the key.

    The keys are ``passkey_keys(seed, lengths, depths, trials)`` unless ``keys`` gives them."""
    from .baselines import open_method
    from .model import LocalModel

    if keys is None:
        keys = passkey_keys(seed, lengths, depths, trials)
    results: List[Dict[str, object]] = []
    answer_tokens = 16  # digits are single tokens in many vocabularies, and models often restate the question
    for length in lengths:
        llm = open_method(model_path, length + answer_tokens, n_threads, n_batch, grp_attn_n=grp_attn_n,
                          group_size=group_size, window=window, selfextend=selfextend, rope_scaling=rope_scaling,
                          rope_factor=rope_factor)
        log(f"passkey: length {length}: {llm.plan.describe()}")
        count = lambda text: len(llm.tokenize(text))
        for depth in depths:
            for trial in range(trials):
                key = keys[(length, depth, trial)]
                ids = llm.tokenize(passkey_prompt(count, length, depth, key))
                if len(ids) > length:
                    raise ValueError(f"the shortest passkey prompt is {len(ids)} tokens, longer than {length}")
                t = time.perf_counter()
                kwargs = {}
                if show_progress and isinstance(llm, LocalModel):
                    from .progress import ProgressBar

                    kwargs["progress"] = ProgressBar(f"passkey {length} @ {depth:g}")
                answer = llm.generate(ids, max_tokens=answer_tokens, temperature=0, **kwargs)
                found = re.search(r"\d+", answer)
                ok = bool(found) and found.group(0) == str(key)
                results.append({"length": len(ids), "target_length": length, "depth": depth, "trial": trial,
                                "key": key, "answer": answer, "ok": ok,
                                "seconds": round(time.perf_counter() - t, 2),
                                "group_size": llm.plan.group_size, "window": llm.plan.window,
                                "method": _method(llm.plan)})
                log(f"passkey: length {length} depth {depth} trial {trial}: key {key} answer {answer!r} "
                    f"{'ok' if ok else 'MISSED'} ({results[-1]['seconds']} s)")
    return results


def _method(plan) -> str:
    if hasattr(plan, "grp_attn_n"):
        return f"llama.cpp-grp-attn-{plan.grp_attn_n}"
    if plan.rope_scaling != "none":
        return f"rope-{plan.rope_scaling}"
    return "selfextend" if plan.group_size > 1 else "ordinary"


def format_table(results: List[Dict[str, object]]) -> str:
    """A length x depth table of correct/total."""
    lengths = sorted({int(r["target_length"]) for r in results})
    depths = sorted({float(r["depth"]) for r in results})
    lines = ["length \\ depth " + "".join(f"{d:>9.0%}" for d in depths)]
    for n in lengths:
        cells = []
        for d in depths:
            rs = [r for r in results if r["target_length"] == n and r["depth"] == d]
            cells.append(f"{sum(bool(r['ok']) for r in rs)}/{len(rs)}".rjust(9))
        lines.append(f"{n:>14} " + "".join(cells))
    return "\n".join(lines)
