"""``LocalModel``: a GGUF llama-family model running on this machine's CPU."""
from __future__ import annotations

import codecs
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _engine
from .context import ContextPlan, plan_context
from .models import resolve_model
from .sampling import Sampler, SamplingParams

ProgressCallback = Callable[[int, int], Optional[bool]]
PathLike = Union[str, "os.PathLike[str]"]


def model_facts(model: "_engine.Model") -> Dict[str, object]:
    """Architecture, sizes and weight types of a loaded GGUF file, as ``info`` shows them."""
    m = model
    return {
        "path": m.path, "name": m.name, "architecture": m.arch, "n_ctx_train": m.n_ctx_train,
        "n_params": m.n_params, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "n_head_kv": m.n_head_kv, "head_dim": m.head_dim, "n_ff": m.n_ff, "n_vocab": m.n_vocab,
        "rope_freq_base": m.rope_freq_base, "weight_types": list(m.weight_types), "file_size": m.file_size,
    }


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalModel:
    """A quantized GGUF model (Llama, Mistral, SmolLM, ...) loaded for local inference.

    ``LocalModel(path)`` memory-maps the file and allocates a KV cache of ``n_ctx`` tokens.
    ``path`` may be a GGUF file, a catalogue name, or ``None`` for the default model (fetched
    beforehand with ``pyselfextend pull``).

    Long contexts: when ``n_ctx`` exceeds the context the model was trained on, attention is
    SelfExtend (exact, no fine-tuning): keys within ``window`` tokens of a query keep their
    positions, farther keys share positions in groups of ``group_size``. Both are chosen for
    ``n_ctx`` unless given; ``plan`` reports the choice. ``selfextend=False`` keeps ordinary
    attention at any length (it degrades past the trained context).

    Two levels of use:

    * Text in, text out: ``generate(prompt, ...)`` and ``chat(messages, ...)`` start from an
      empty cache, evaluate the prompt, and sample up to ``max_tokens`` tokens (``stream=True``
      yields text pieces as they are produced).
    * Tokens in, logits out: ``tokenize``, ``eval`` (appends tokens to the cache and returns
      float32 logits), ``reset`` and ``detokenize`` give full control.

    Args:
        path: GGUF file, catalogue model name, or ``None`` for the default model.
        n_ctx: KV cache capacity in tokens: the longest prompt plus generation.
        n_threads: CPU threads for compute (default: every core this process may use).
        n_batch: prompt tokens evaluated per graph run.
        cache_type: ``"f16"`` (default, as llama.cpp) or ``"f32"`` for the KV cache.
        group_size: SelfExtend G (default: the smallest that reaches ``n_ctx``).
        window: SelfExtend W, the neighbor window (default: a quarter of the trained context).
        selfextend: ``False`` for ordinary attention whatever ``n_ctx`` is.
        rope_scaling: instead of SelfExtend, a tuning-free RoPE baseline with ordinary attention:
            ``"linear"`` (position interpolation) or ``"yarn"``, by ``rope_factor`` (default
            ``n_ctx`` / trained context).
        rope_factor: see ``rope_scaling``.
        attention_path: how SelfExtend scores are computed: ``"auto"`` (the fused kernel on the CPU
            backend, standard ggml ops on any other), ``"fused"`` or ``"portable"``.
        verbose: print libllama/ggml log messages to stderr.

    Raises:
        FileNotFoundError: the file (or the pulled default model) is missing.
        ValueError: the file is not a usable GGUF model, or an option is out of range.

    The GIL is released while the engine computes, so other Python threads keep running.
    """

    def __init__(
        self,
        path: Optional[PathLike] = None,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        n_batch: int = 512,
        cache_type: str = "f16",
        group_size: Optional[int] = None,
        window: Optional[int] = None,
        selfextend: bool = True,
        attention_path: str = "auto",
        rope_scaling: Optional[str] = None,
        rope_factor: Optional[float] = None,
        verbose: bool = False,
    ) -> None:
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_threads is None:
            n_threads = _default_threads()
        if not isinstance(n_threads, (int, np.integer)) or isinstance(n_threads, bool) or not 1 <= n_threads <= 512:
            raise ValueError(f"n_threads must be an integer in [1, 512], got {n_threads!r}")
        if cache_type not in ("f16", "f32"):
            raise ValueError(f"cache_type must be 'f16' or 'f32', got {cache_type!r}")
        if attention_path not in ("auto", "fused", "portable"):
            raise ValueError(f"attention_path must be 'auto', 'fused' or 'portable', got {attention_path!r}")

        self.path: Path = resolve_model(None if path is None else os.fspath(path))
        _engine.set_verbose(verbose)
        self._model = _engine.Model(str(self.path))
        self._vocab = _engine.Vocab(str(self.path))
        #: How attention is set up for ``n_ctx``: SelfExtend's group size and window, usable length.
        self.plan: ContextPlan = plan_context(int(n_ctx), self._model.n_ctx_train, group_size, window, selfextend,
                                              rope_scaling, rope_factor)
        self._engine = _engine.Engine(self._model, int(n_ctx), int(n_batch), int(n_threads), cache_type,
                                      self.plan.group_size, self.plan.window, attention_path,
                                      self.plan.rope_scaling, self.plan.rope_factor)
        self.n_threads = int(n_threads)
        self.n_batch = int(n_batch)
        if not selfextend and rope_scaling in (None, "none") and n_ctx > self._model.n_ctx_train:
            warnings.warn(
                f"n_ctx={n_ctx} exceeds the model's trained context ({self._model.n_ctx_train}); "
                "ordinary attention degrades past it", stacklevel=2)

    # -- model facts -------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        """KV cache capacity in tokens."""
        return self._engine.n_ctx

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained on (GGUF ``<arch>.context_length``)."""
        return self._model.n_ctx_train

    @property
    def n_vocab(self) -> int:
        """Vocabulary size: the length of every logits row."""
        return self._model.n_vocab

    @property
    def n_past(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._engine.n_past

    @property
    def info(self) -> Dict[str, object]:
        """Architecture, sizes and weight types read from the file."""
        return {
            **model_facts(self._model), "n_ctx": self.n_ctx, "group_size": self.plan.group_size, "window": self.plan.window,
            "usable_length": self.plan.usable_length,
        }

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Token ids of ``text``, exactly as llama.cpp tokenizes it.

        ``add_special`` adds the BOS/EOS tokens the model asks for; ``parse_special`` turns
        special-token text such as ``<|im_start|>`` into those tokens.
        """
        return list(self._vocab.tokenize(text, add_special, parse_special))

    def detokenize(self, ids: Sequence[int], render_special: bool = False) -> str:
        """Text of token ids (invalid UTF-8 replaced by U+FFFD)."""
        return bytes(self._vocab.detokenize(list(ids), render_special)).decode("utf-8", errors="replace")

    def eval(self, ids: Sequence[int], all_logits: bool = False,
             progress: Optional[ProgressCallback] = None) -> np.ndarray:
        """Appends ``ids`` to the KV cache and returns float32 logits.

        Returns the logits of the last token, shape ``(n_vocab,)``, or with ``all_logits`` one
        row per token, shape ``(len(ids), n_vocab)``. ``progress(done, total)`` is called after
        each batch; returning ``False`` (or raising) stops the evaluation, keeping the batches
        already done in the cache.
        """
        if len(ids) == 0:
            raise ValueError("eval() needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(ids)} new tokens exceed n_ctx={self.n_ctx}")
        return self._engine.eval(ids, all_logits, progress)

    def reset(self) -> None:
        """Empties the KV cache."""
        self._engine.reset()

    # -- text --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        stream: bool = False,
        progress: Optional[ProgressCallback] = None,
    ) -> Union[str, Iterator[str]]:
        """Continues ``prompt`` (text, or token ids) by up to ``max_tokens`` sampled tokens.

        Starts from an empty cache. ``temperature=0`` is greedy decoding; otherwise top-k, top-p
        and min-p filter the candidates and ``seed`` makes the draw repeatable. Generation ends
        at an end-of-generation token, after ``max_tokens``, or just before the first ``stop``
        string (which is not returned). Returns the generated text, or with ``stream=True`` an
        iterator of text pieces. ``progress(done, total)`` reports prompt evaluation.

        Raises ValueError when the prompt plus ``max_tokens`` does not fit in ``n_ctx``.
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        pieces = self._generate(ids, max_tokens, SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                                                                seed=seed), stop, progress)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: Sequence[Dict[str, str]], max_tokens: int = 256, **kwargs) -> Union[str, Iterator[str]]:
        """Replies to a conversation, formatted with the model's own chat template.

        ``messages`` is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
        Keyword arguments are those of :meth:`generate`.
        """
        pairs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
            pairs.append((str(m["role"]), str(m["content"])))
        if not pairs:
            raise ValueError("chat() needs at least one message")
        text = self._vocab.apply_chat_template(pairs, True)
        return self.generate(self.tokenize(text, add_special=True, parse_special=True), max_tokens, **kwargs)

    def _generate(self, ids: List[int], max_tokens: int, params: SamplingParams,
                  stop: Optional[Union[str, Sequence[str]]], progress: Optional[ProgressCallback]) -> Iterator[str]:
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + max_tokens > self.n_ctx:
            reach = self.plan.usable_length
            limit = f"; this model reaches {reach} tokens with {self.plan.describe().split(':')[0]}" if reach else ""
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} tokens exceeds "
                f"the context size n_ctx={self.n_ctx}{limit}")
        sampler = Sampler(params)  # validates the sampling options before any work
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return self._generate_iter(ids, max_tokens, sampler, stops, progress)

    def _generate_iter(self, ids: List[int], max_tokens: int, sampler: Sampler, stops: List[str],
                       progress: Optional[ProgressCallback]) -> Iterator[str]:
        self.reset()
        logits = self.eval(ids, progress=progress)
        history = list(ids)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in stops), default=1) - 1  # chars kept back: a stop may straddle pieces
        pending = ""
        for step in range(max_tokens):
            token = sampler.sample(logits, history)
            if self._vocab.is_eog(token):
                break
            history.append(token)
            pending += decoder.decode(bytes(self._vocab.token_to_piece(token, False)))
            if stops:
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut:
                        yield pending[:cut]
                    return
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
            if step + 1 < max_tokens:
                logits = self.eval([token])
        pending += decoder.decode(b"", final=True)
        if pending:
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            yield pending if cut < 0 else pending[:cut]
