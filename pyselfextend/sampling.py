"""Token sampling from logits: greedy, or temperature with top-k / top-p / min-p and a repeat penalty."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional, Sequence

import numpy as np


@dataclass
class SamplingParams:
    """How the next token is picked. ``temperature == 0`` means greedy (argmax).

    ``seed`` makes sampling repeatable; ``None`` (or -1, as in llama.cpp) draws a fresh one.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: Optional[int] = None

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        for name in ("top_k", "repeat_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not -1 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64) (or -1 for a random seed), got {self.seed}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repeat_penalty > 0.0):
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    """Picks tokens from logits according to ``SamplingParams``; owns the random state."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(None if params.seed == -1 else params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and len(history) > 0:
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            # As llama.cpp does: shrink positive logits, push negative ones further down.
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(logits))

        ids = np.arange(logits.shape[0])
        if 0 < p.top_k < logits.shape[0]:
            keep = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            ids, logits = ids[keep], logits[keep]
        order = np.argsort(-logits, kind="stable")
        ids, logits = ids[order], logits[order].astype(np.float64)

        probs = np.exp(logits - logits[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, logits, probs = ids[:cut], logits[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]

        scaled = (logits - logits[0]) / p.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
