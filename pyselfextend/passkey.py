"""The passkey retrieval test (Mohtashami & Jaggi, 2023; llama.cpp's passkey example uses the same
wording): a random number hidden at some depth of repetitive filler text, then asked for.

Each trial is scored twice: found or missed (greedy decoding, the first number of the answer),
and the log-probability the model gives the key's tokens right after the question (teacher
forcing: the prompt, then the key's tokens, one evaluation). Found/missed is what a user sees;
the log-probability separates settings that find the key alike, and one that misses by a digit
from one that has no idea."""
from __future__ import annotations

import math
import random
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

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


def answer_ids(llm, prompt: str, prompt_ids: List[int], answer: str) -> List[int]:
    """The tokens ``answer`` adds after ``prompt`` when the two are tokenized as one text (so that
    the scored tokens are those the model would write), or ``answer``'s own tokens where the
    join merges across the boundary."""
    full = llm.tokenize(prompt + answer)
    if len(full) > len(prompt_ids) and full[:len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return llm.tokenize(answer, add_special=False)


def answer_logprob(llm, prompt_ids: List[int], answer: List[int]) -> float:
    """The natural-log probability the model gives ``answer`` right after ``prompt_ids``,
    teacher-forced: log P(a_0 | prompt) + log P(a_1 | prompt, a_0) + ... One evaluation of the
    prompt (``prefill``: a LocalModel that holds it already evaluates nothing again) and of the
    answer's tokens but the last."""
    if not answer:
        raise ValueError("answer_logprob needs at least one answer token")
    return forced_logprob(llm, llm.prefill(prompt_ids), answer)


def forced_logprob(llm, first: np.ndarray, answer: List[int]) -> float:
    """log P(answer) teacher-forced, given ``first``, the logits after a prompt the cache holds
    and nothing after it: evaluates the answer's tokens but the last."""
    from .perplexity import target_log_probs

    rows = [first]
    if len(answer) > 1:
        rows += list(llm.eval(answer[:-1], all_logits=True))
    return float(target_log_probs(np.stack(rows), answer).sum())


def run_passkey(model_path: str, lengths: List[int], depths: List[float], trials: int = 1, seed: int = 0,
                group_size: Optional[int] = None, window: Optional[int] = None, selfextend: bool = True,
                n_threads: Optional[int] = None, n_batch: int = 512,
                log: Callable[[str], None] = lambda msg: None, rope_scaling: Optional[str] = None,
                rope_factor: Optional[float] = None, grp_attn_n: Optional[int] = None,
                show_progress: bool = False, keys: Optional[Dict[Cell, int]] = None,
                done: Sequence[Dict[str, object]] = (),
                on_trial: Callable[[List[Dict[str, object]]], None] = lambda results: None) -> List[Dict[str, object]]:
    """Runs the passkey test: for each length, depth and trial a random 5-digit key, greedy
    decoding of up to 16 tokens, and whether the answer's first number is the key.

    The keys are ``passkey_keys(seed, lengths, depths, trials)`` unless ``keys`` gives them.
    A trial of ``done`` (results of an earlier, interrupted run) with the same length, depth, trial
    and key is kept as it is, not run again; ``on_trial`` gets the results so far after every
    trial run, so that a caller can save them (a trial of a long model can take most of an hour)."""
    from .baselines import open_method
    from .methods import label_of
    from .model import LocalModel

    if keys is None:
        keys = passkey_keys(seed, lengths, depths, trials)
    results: List[Dict[str, object]] = []
    kept = {(int(t["target_length"]), float(t["depth"]), int(t["trial"]), int(t["key"])): t for t in done}
    answer_tokens = 16  # digits are single tokens in many vocabularies, and models often restate the question
    for length in lengths:
        llm = None  # opened by the first trial not kept
        for depth in depths:
            for trial in range(trials):
                key = keys[(length, depth, trial)]
                if (length, depth, trial, key) in kept:
                    results.append(kept[(length, depth, trial, key)])
                    continue
                if llm is None:
                    llm = open_method(model_path, length + answer_tokens, n_threads, n_batch, grp_attn_n=grp_attn_n,
                                      group_size=group_size, window=window, selfextend=selfextend,
                                      rope_scaling=rope_scaling, rope_factor=rope_factor)
                    log(f"passkey: length {length}: {llm.plan.describe()}")
                prompt = passkey_prompt(lambda text: len(llm.tokenize(text)), length, depth, key)
                ids = llm.tokenize(prompt)
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
                key_ids = answer_ids(llm, prompt, ids, f" {key}")
                logprob = answer_logprob(llm, ids, key_ids)
                results.append({"length": len(ids), "target_length": length, "depth": depth, "trial": trial,
                                "key": key, "answer": answer, "ok": ok, "key_logprob": round(logprob, 4),
                                "key_tokens": len(key_ids),
                                "seconds": round(time.perf_counter() - t, 2),
                                "group_size": llm.plan.group_size, "window": llm.plan.window,
                                "method": label_of(llm.plan)})
                log(f"passkey: length {length} depth {depth} trial {trial}: key {key} answer {answer!r} "
                    f"{'ok' if ok else 'MISSED'}, log P(key) {logprob:.2f} ({results[-1]['seconds']} s)")
                on_trial(list(results))
    return results


def format_table(results: List[Dict[str, object]]) -> str:
    """A length x depth table of found/total, the same for the mean log-probability of the key
    (nats, over all its tokens), and per length the found rate and that mean with their 95%
    intervals (Wilson; Student's t)."""
    from .stats import mean_interval, wilson_interval

    lengths = sorted({int(r["target_length"]) for r in results})
    depths = sorted({float(r["depth"]) for r in results})
    head = "length \\ depth " + "".join(f"{d:>9.0%}" for d in depths)
    found, logprob, summary = ["found", head], ["log P(key), mean", head], []
    for n in lengths:
        found_cells, logprob_cells = [], []
        for d in depths:
            rs = [r for r in results if r["target_length"] == n and r["depth"] == d]
            found_cells.append(f"{sum(bool(r['ok']) for r in rs)}/{len(rs)}".rjust(9))
            logprob_cells.append(f"{sum(float(r['key_logprob']) for r in rs) / len(rs):9.2f}" if rs else " " * 9)
        found.append(f"{n:>14} " + "".join(found_cells))
        logprob.append(f"{n:>14} " + "".join(logprob_cells))
        rs = [r for r in results if r["target_length"] == n]
        k = sum(bool(r["ok"]) for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        mean, mlo, mhi = mean_interval([float(r["key_logprob"]) for r in rs])
        summary.append(f"{n:>14}: found {k}/{len(rs)} (95% {lo:.0%}-{hi:.0%}); log P(key) {mean:.2f} "
                       f"(95% {mlo:.2f} to {mhi:.2f})")
    return "\n".join(found + [""] + logprob + [""] + summary)
