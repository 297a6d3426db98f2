"""llama.cpp's group attention (``--grp-attn-n``) as a long-context baseline, run by libllama itself.

It is the scheme of llama.cpp's passkey example: the prompt goes in batches, and before each new
batch the cached positions of the previous one are divided by n, so that only the current batch
keeps exact positions. Unlike SelfExtend it has no fixed neighbor window. (The positions are moved
with libllama's seq_add rather than the example's seq_div, whose key rotation has the wrong sign in
the pinned llama.cpp: see csrc/reference.cpp.) This class offers the
subset of ``LocalModel`` that the evaluation commands use; ``open_method`` opens whichever method
an evaluation asks for.
"""
from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from . import _engine
from .model import LocalModel, _default_threads
from .models import resolve_model


@dataclass(frozen=True)
class GroupAttentionPlan:
    n_ctx: int
    n_ctx_train: int
    grp_attn_n: int
    group_size: int = 1
    window: int = 0
    rope_scaling: str = "none"

    def describe(self) -> str:
        return f"llama.cpp group attention (grp-attn-n {self.grp_attn_n}), n_ctx={self.n_ctx}"


class LlamaCppGroupAttention:
    """llama.cpp (flash attention on) with its group attention, behind a LocalModel-like interface."""

    def __init__(self, path: Path, n_ctx: int, grp_attn_n: int, n_threads: Optional[int] = None,
                 n_batch: int = 512, cache_type: str = "f16") -> None:
        if grp_attn_n < 1 or n_batch % grp_attn_n:
            raise ValueError(f"grp_attn_n must be >= 1 and divide n_batch ({n_batch}), got {grp_attn_n}")
        self.n_batch = n_batch
        self._ref = _engine.Reference(str(path), n_ctx, n_batch, n_threads or _default_threads(), True, grp_attn_n,
                                      cache_type=cache_type)
        self._vocab = _engine.Vocab(str(path))
        self.plan = GroupAttentionPlan(n_ctx, _engine.Model(str(path)).n_ctx_train, grp_attn_n)

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained on."""
        return self.plan.n_ctx_train

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> List[int]:
        return list(self._vocab.tokenize(text, add_special, parse_special))

    @property
    def n_past(self) -> int:
        return self._ref.n_past

    def reset(self) -> None:
        self._ref.reset()

    def truncate(self, n: int) -> None:
        """Forgets the tokens from ``n`` on. Group attention moves cached positions, so this goes
        back only to where they were last divided, or later (ValueError otherwise): to the end of a
        text read in whole batches, after a question, the text reads on as if never asked."""
        self._ref.truncate(n)

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self._vocab.detokenize([int(t) for t in ids], False)).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of text or of a turn)."""
        return bool(self._vocab.is_eog(token))

    def eval(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self._ref.eval(list(ids), all_logits)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Evaluates ``ids`` from an empty cache and returns the last token's logits. Nothing cached
        is reused: group attention has moved the cached positions."""
        self.reset()
        return self.eval(ids)

    def generate(self, ids: Sequence[int], max_tokens: int, temperature: float = 0.0) -> str:
        """Greedy continuation of ``ids`` (the only decoding the evaluations use)."""
        if temperature != 0:
            raise ValueError("the group-attention baseline decodes greedily only")
        logits = self.prefill(ids)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            if self.is_eog(token):
                break
            text += decoder.decode(bytes(self._vocab.token_to_piece(token, False)))
            logits = self.eval([token])
        return text + decoder.decode(b"", final=True)


def open_method(path: Optional[Union[str, Path]], n_ctx: int, n_threads: Optional[int] = None, n_batch: int = 512, *,
                grp_attn_n: Optional[int] = None, cache_type: str = "f16", device: str = "auto",
                verbose: bool = False, **attention) -> Union[LocalModel, LlamaCppGroupAttention]:
    """The model for one long-context method: llama.cpp's group attention when ``grp_attn_n`` is
    given, otherwise ``LocalModel`` with ``attention`` (its group_size, window, selfextend,
    rope_scaling and rope_factor arguments).

    ``plan.describe()`` says when ordinary attention runs past the trained context, so
    LocalModel's warning about that is not repeated here.
    """
    if grp_attn_n is not None:
        if attention.get("selfextend") is False or any(attention.get(k) is not None for k in
                                                       ("group_size", "window", "rope_scaling", "rope_factor")):
            raise ValueError("llama.cpp's group attention (grp_attn_n) cannot be combined with group_size, window, "
                             "selfextend=False or rope_scaling: it is a method of its own")
        if device not in ("auto", "cpu"):
            raise ValueError("llama.cpp's group attention (grp_attn_n) runs on the CPU only, not on device "
                             f"{device!r}")
        return LlamaCppGroupAttention(resolve_model(None if path is None else str(path)), n_ctx, grp_attn_n, n_threads,
                                      n_batch, cache_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LocalModel(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, cache_type=cache_type,
                          device=device, verbose=verbose, **attention)
