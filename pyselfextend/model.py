"""``LocalModel``: a GGUF llama-family model running on this machine's CPU."""
from __future__ import annotations

import codecs
import os
import threading
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


def devices() -> List[Dict[str, object]]:
    """The devices this build can run on now, for ``LocalModel(device=...)``: dicts with ``spec``
    (what to pass), ``name``, ``description``, ``type`` (cpu, gpu, igpu) and ``memory_free`` /
    ``memory_total`` in bytes. RPC servers are not listed: they are named by address."""
    return list(_engine.devices())


def model_facts(model: "_engine.Model") -> Dict[str, object]:
    """Architecture, sizes and weight types of a loaded GGUF file, as ``info`` shows them."""
    m = model
    return {
        "path": m.path, "name": m.name, "architecture": m.arch, "rope_mode": m.rope_mode, "n_ctx_train": m.n_ctx_train,
        "n_params": m.n_params, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
        "n_head_kv": m.n_head_kv, "head_dim": m.head_dim, "n_ff": m.n_ff, "n_vocab": m.n_vocab,
        "rope_freq_base": m.rope_freq_base, "weight_types": list(m.weight_types), "file_size": m.file_size,
    }


def _require_int(name: str, value: object) -> int:
    """``value`` as an int; TypeError naming ``name`` for anything else (bool, float, str)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_text(name: str, text: object) -> None:
    """TypeError for anything but str, ValueError for a str that cannot be UTF-8."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be str, got {type(text).__name__} (decode bytes first, e.g. data.decode('utf-8'))")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: {text[e.start]!r} at index {e.start} "
                         "(bytes that were not UTF-8?)") from None


def token_ids(ids: object, name: str = "token ids") -> List[int]:
    """A sequence of token ids as a list of ints; TypeError naming the first item that is not one.

    Whether each id is inside the vocabulary is the engine's check.
    """
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a sequence of integers, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):  # type: ignore[arg-type]
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{name} must be integers; item {i} is {t!r}")
        out.append(int(t))
    return out


class ContextLengthExceeded(ValueError):
    """A prompt plus the tokens asked for does not fit in the model's context (``n_ctx``)."""

    def __init__(self, message: str, *, n_prompt: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(message)
        self.n_prompt, self.max_tokens, self.n_ctx = n_prompt, max_tokens, n_ctx


class Generation(Iterator[str]):
    """The text pieces of one ``generate(..., stream=True)`` call, and what it did.

    Iterate it for the pieces. As it goes, ``prompt_tokens`` (the prompt's length),
    ``cached_tokens`` (how many of them the cache already held, so were not evaluated again;
    known after the first piece), ``completion_tokens`` (tokens generated so far) and, once it
    has ended, ``finish_reason``: ``"stop"`` (an end-of-generation token or a stop string) or
    ``"length"`` (``max_tokens`` reached). ``close()`` ends it early; ``cancel()`` asks it, from
    any thread, to end at its next token (or prompt batch) without yielding more.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self._pieces: Iterator[str] = iter(())

    def cancel(self) -> None:
        """Ends the generation at its next step; safe to call from another thread. Text held
        back (a possible stop string, an incomplete character) is dropped."""
        self.cancelled = True

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Ends the generation where it is (the cache keeps what was evaluated)."""
        close = getattr(self._pieces, "close", None)
        if close:
            close()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalModel:
    """A quantized GGUF model (Llama, Mistral, SmolLM, Qwen2/2.5, Qwen3, Phi-3, ...) loaded for local inference.

    ``LocalModel(path)`` memory-maps the file and allocates a KV cache of ``n_ctx`` tokens.
    ``path`` may be a GGUF file, a catalogue name, or ``None`` for the default model (fetched
    beforehand with ``pyselfextend pull``).

    Long contexts: when ``n_ctx`` exceeds the context the model was trained on, attention is
    SelfExtend (exact, no fine-tuning): keys within ``window`` tokens of a query keep their
    positions, farther keys share positions in groups of ``group_size``. Both are chosen for
    ``n_ctx`` unless given; ``plan`` reports the choice. ``selfextend=False`` keeps ordinary
    attention at any length (it degrades past the trained context).

    Two levels of use:

    * Text in, text out: ``generate(prompt, ...)`` and ``chat(messages, ...)`` evaluate the
      prompt and sample up to ``max_tokens`` tokens (``stream=True`` yields text pieces as they
      are produced). The cache is kept between calls: a prompt that starts like the previous one
      (the same document, a longer conversation) evaluates only what comes after the common
      prefix, with the same output as from an empty cache.
    * Tokens in, logits out: ``tokenize``, ``prefill`` (make the cache hold a prompt, reusing
      what it already holds), ``eval`` (append tokens, return float32 logits), ``truncate``,
      ``reset``, ``cached_tokens`` and ``detokenize`` give full control.
    * Saved state: ``save_state(path)`` writes the cached tokens and their KV cache;
      ``load_state(path)`` brings them back in a new process in seconds instead of the minutes a
      long document's prefill takes.

    Threads: one model, one cache. Calls from several threads are serialized (a lock): a
    ``generate`` or ``chat`` without ``stream`` runs whole before the next call starts. A stream
    owns the cache only between its own steps: any other call on the model (``generate``,
    ``chat``, ``eval``, ``reset``, another stream) ends it, and its next step raises
    ``RuntimeError``. For concurrent streams, open one ``LocalModel`` per stream (the weights are
    memory-mapped, so the file is in memory once).

    Args:
        path: GGUF file, catalogue model name, or ``None`` for the default model.
        n_ctx: KV cache capacity in tokens: the longest prompt plus generation.
        n_threads: CPU threads for compute (default: every core this process may use).
        n_batch: prompt tokens evaluated per graph run (at most ``n_ctx``; larger values are capped).
        cache_type: the KV cache's type: ``"f16"`` (default, as llama.cpp), ``"f32"`` or
            ``"q8_0"`` (8.5 bits a value: about half f16's memory, logits close to f16's; needs a
            head size that is a multiple of 32).
        group_size: SelfExtend G (default: the smallest that reaches ``n_ctx``).
        window: SelfExtend W, the neighbor window (default: a quarter of the trained context).
        selfextend: ``False`` for ordinary attention whatever ``n_ctx`` is.
        rope_scaling: instead of SelfExtend, a tuning-free RoPE baseline with ordinary attention:
            ``"linear"`` (position interpolation) or ``"yarn"``, by ``rope_factor`` (default
            ``n_ctx`` / trained context).
        rope_factor: see ``rope_scaling``.
        attention_path: how attention is computed: ``"auto"`` (this project's fused kernel on the
            CPU, standard ggml ops on any other device), ``"fused"`` or ``"portable"`` (standard
            ggml ops: for SelfExtend its score matrices, for ordinary attention ggml's flash
            attention).
        device: where the layers and the KV cache live: ``"auto"`` (the first GPU this build has,
            else the CPU), ``"cpu"``, ``"metal"``, ``"vulkan"``, ``"cuda"`` (``"vulkan:1"``: the
            second), or ``"rpc:HOST:PORT"`` for llama.cpp RPC servers (``pyselfextend rpc-server``;
            several, comma-separated, split the layers). ``pyselfextend.devices()`` lists what this
            build offers. Operations a device cannot run fall back to the CPU.
        adaptive_threads: run fewer compute threads while other processes keep cores busy (the
            results do not change; ``False`` keeps ``n_threads`` always, as for benchmarks).
        verbose: print libllama/ggml log messages to stderr.

    Raises:
        FileNotFoundError: the file (or the pulled default model) is missing.
        ValueError: the file is not a usable GGUF model, or an option is out of range.
        TypeError: an option has the wrong type (``n_ctx=2.5``).
        NotEnoughMemory: (a ``MemoryError``) the KV cache and compute buffers for ``n_ctx`` and
            ``n_batch`` do not fit in the memory this machine has available; the message gives
            the sizes.

    The GIL is released while the engine computes, so other Python threads keep running.
    """

    def __init__(
        self,
        path: Optional[PathLike] = None,
        *,
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
        adaptive_threads: bool = True,
        device: str = "auto",
        verbose: bool = False,
    ) -> None:
        # Types here; every range (n_ctx, n_batch, threads, cache type, attention path, memory) is
        # the engine's to check.
        n_ctx = _require_int("n_ctx", n_ctx)
        n_batch = _require_int("n_batch", n_batch)
        n_threads = _default_threads() if n_threads is None else _require_int("n_threads", n_threads)
        for name, value in (("cache_type", cache_type), ("attention_path", attention_path), ("device", device)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")

        self.path: Path = resolve_model(None if path is None else os.fspath(path))
        _engine.set_verbose(verbose)
        self._model = _engine.Model(str(self.path), device)
        #: Where the layers run, one spec per device (``["cpu"]``, ``["vulkan:0"]``, ...).
        self.devices: List[str] = list(self._model.devices)
        self._vocab = _engine.Vocab(str(self.path))
        #: How attention is set up for ``n_ctx``: SelfExtend's group size and window, usable length.
        self.plan: ContextPlan = plan_context(n_ctx, self._model.n_ctx_train, group_size, window, selfextend,
                                              rope_scaling, rope_factor)
        self._engine = _engine.Engine(self._model, n_ctx, n_batch, n_threads, cache_type,
                                      self.plan.group_size, self.plan.window, attention_path,
                                      self.plan.rope_scaling, self.plan.rope_factor, bool(adaptive_threads))
        self.n_threads = n_threads
        self._cache_type = cache_type
        #: Prompt tokens per graph run (``n_batch`` capped at ``n_ctx``).
        self.n_batch: int = self._engine.n_batch
        self._lock = threading.RLock()
        self._tokens: List[int] = []  # what the cache holds, token by token
        self._model_identity: Optional[Dict[str, object]] = None  # for saved states
        # Bumped by every call that changes the cache from outside a stream; a stream that finds
        # it changed since its last step was interrupted.
        self._cache_epoch = 0
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
    def cached_tokens(self) -> List[int]:
        """The token ids the KV cache holds, in order (a copy)."""
        return list(self._tokens)

    @property
    def memory(self) -> Dict[str, int]:
        """Bytes this model needs: ``weights`` (the mapped file), ``kv_cache`` (all ``n_ctx``
        tokens) and ``compute`` (the buffers of the largest batch), checked against the
        machine's available memory when the model was opened."""
        return {"weights": self._model.file_size, "kv_cache": self._engine.cache_bytes,
                "compute": self._engine.compute_bytes}

    @property
    def info(self) -> Dict[str, object]:
        """Architecture, sizes and weight types read from the file."""
        return {
            **model_facts(self._model), "n_ctx": self.n_ctx, "group_size": self.plan.group_size, "window": self.plan.window,
            "usable_length": self.plan.usable_length, **{f"memory_{k}": v for k, v in self.memory.items()},
        }

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Token ids of ``text``, exactly as llama.cpp tokenizes it.

        ``add_special`` adds the BOS/EOS tokens the model asks for; ``parse_special`` turns
        special-token text such as ``<|im_start|>`` into those tokens.

        Raises TypeError for anything but ``str`` (decode bytes first), ValueError for text
        that cannot be UTF-8 (lone surrogates, as bytes that were not UTF-8 become under
        ``surrogateescape``).
        """
        _check_text("text", text)
        return list(self._vocab.tokenize(text, add_special, parse_special))

    def detokenize(self, ids: Sequence[int], *, render_special: bool = False) -> str:
        """Text of token ids (invalid UTF-8 replaced by U+FFFD)."""
        return bytes(self._vocab.detokenize(token_ids(ids), render_special)).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of text or of a turn), as ``generate`` stops at."""
        return bool(self._vocab.is_eog(_require_int("token", token)))

    def eval(self, ids: Sequence[int], *, all_logits: bool = False,
             progress: Optional[ProgressCallback] = None) -> np.ndarray:
        """Appends ``ids`` to the KV cache and returns float32 logits.

        Returns the logits of the last token, shape ``(n_vocab,)``, or with ``all_logits`` one
        row per token, shape ``(len(ids), n_vocab)``. ``progress(done, total)`` is called after
        each batch; returning ``False`` (or raising) stops the evaluation, keeping the batches
        already done in the cache.
        """
        ids = token_ids(ids)
        with self._lock:
            self._cache_epoch += 1
            return self._eval(ids, all_logits, progress)

    def _eval(self, ids: List[int], all_logits: bool = False, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        if len(ids) == 0:
            raise ValueError("eval() needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(ids)} new tokens exceed n_ctx={self.n_ctx}")
        try:
            return self._engine.eval(ids, all_logits, progress)
        finally:  # an interrupted eval keeps the batches it finished
            self._tokens = (self._tokens + ids)[: self._engine.n_past]

    def prefill(self, ids: Sequence[int], *, progress: Optional[ProgressCallback] = None) -> np.ndarray:
        """Makes the cache hold exactly ``ids`` and returns the last token's logits.

        Keeps the longest prefix the cache already shares with ``ids`` and evaluates only the
        rest (at least the last token, for its logits). ``progress(done, total)`` counts the
        tokens evaluated. The result equals ``reset(); eval(ids)`` up to float rounding.
        """
        ids = token_ids(ids)
        if not ids:
            raise ValueError("prefill() needs at least one token")
        with self._lock:
            self._cache_epoch += 1
            return self._prefill(ids, progress)

    def _prefill(self, ids: List[int], progress: Optional[ProgressCallback],
                 generation: Optional[Generation] = None) -> np.ndarray:
        keep = 0
        for a, b in zip(self._tokens, ids[:-1]):
            if a != b:
                break
            keep += 1
        self._truncate(keep)
        if generation is not None:
            generation.cached_tokens = keep
        return self._eval(ids[keep:], progress=progress)

    def abort(self) -> None:
        """Stops the evaluation running in another thread within its current graph run (a
        prompt batch or one token); that call raises ``EvalAborted``, and the cache keeps the
        batches finished before. Safe from any thread; without a running evaluation it does
        nothing."""
        self._engine.abort()

    def truncate(self, n: int) -> None:
        """Keeps the first ``n`` cached tokens and forgets the rest."""
        n = _require_int("n", n)
        with self._lock:
            self._cache_epoch += 1
            self._truncate(n)

    def _truncate(self, n: int) -> None:
        try:
            if n != self._engine.n_past:
                self._engine.truncate(n)
        finally:  # also when Ctrl-C lands just after the engine call
            del self._tokens[self._engine.n_past:]

    def reset(self) -> None:
        """Empties the KV cache."""
        with self._lock:
            self._cache_epoch += 1
            try:
                self._engine.reset()
            finally:
                self._tokens = []

    def save_state(self, path: PathLike, *, metadata: Optional[Dict[str, object]] = None) -> None:
        """Writes the cached tokens and their KV cache to ``path``, atomically.

        The file records what must match to reuse it (the model file, ``n_ctx``, cache type,
        group size and window, RoPE scaling) and a checksum; ``metadata`` (JSON-serializable) is
        stored beside them and returned by :meth:`load_state`. A failure part-way (Ctrl-C, a
        full disk) leaves no file under ``path`` and any earlier one intact.
        """
        from .state import write_state

        with self._lock:
            write_state(path, self._state_settings(), self._tokens, self._engine.read_state(len(self._tokens)),
                        metadata or {})

    def load_state(self, path: PathLike) -> Dict[str, object]:
        """Replaces the cache with the tokens and KV cache saved in ``path``; returns its metadata.

        Raises ``StateMismatch`` (a ValueError) naming each setting that differs from this
        model's, and ``CorruptState`` (a ValueError) for a truncated or damaged file; the
        cache is then unchanged.
        """
        from .state import read_state

        tokens, kv, metadata = read_state(path, self._state_settings())
        with self._lock:
            self._cache_epoch += 1
            try:
                self._engine.write_state(len(tokens), kv)
            except BaseException:
                self._engine.reset()  # the rows may be half written: nothing of them may be reused
                self._tokens = []
                raise
            self._tokens = tokens
        return metadata

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """Raises ``ContextLengthExceeded`` (a ValueError), with the numbers, when a prompt of ``n_prompt`` tokens plus up to
        ``max_tokens`` generated ones does not fit in ``n_ctx``; nothing is ever cut to fit."""
        if n_prompt + max_tokens > self.n_ctx:
            reach = self.plan.usable_length
            limit = f"; this model reaches {reach} tokens with {self.plan.describe().split(':')[0]}" if reach else ""
            raise ContextLengthExceeded(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} tokens exceeds "
                f"the context size n_ctx={self.n_ctx}{limit}", n_prompt=n_prompt, max_tokens=max_tokens,
                n_ctx=self.n_ctx)

    def _state_settings(self) -> Dict[str, object]:
        from .state import model_identity

        if self._model_identity is None:  # hashes 16 MiB of the file: once per model
            self._model_identity = model_identity(self.path)
        return {"model": self._model_identity, "n_ctx": self.n_ctx, "cache_type": self._cache_type,
                "group_size": self.plan.group_size, "window": self.plan.window,
                "rope_scaling": self.plan.rope_scaling, "rope_factor": self.plan.rope_factor,
                "n_vocab": self.n_vocab}

    # -- text --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        *,
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
        parse_special: bool = False,
    ) -> Union[str, Generation]:
        """Continues ``prompt`` (text, or token ids) by up to ``max_tokens`` sampled tokens.

        Reuses the cached prefix the prompt shares with what was evaluated before (see
        :meth:`prefill`). Text is tokenized as text: ``</s>`` or ``<|im_end|>`` in a document stay
        those characters; ``parse_special=True`` turns them into the special tokens (for a
        prompt written in the model's own format). ``temperature=0`` is greedy decoding; otherwise top-k, top-p
        and min-p filter the candidates and ``seed`` makes the draw repeatable. Generation ends
        at an end-of-generation token, after ``max_tokens``, or just before the first ``stop``
        string (which is not returned). Returns the generated text, or with ``stream=True`` a
        :class:`Generation`: an iterator of text pieces that also counts prompt, reused and
        generated tokens and tells why it ended. ``progress(done, total)`` reports prompt
        evaluation. Every option is checked before any work starts, also with ``stream=True``.

        Raises ``ContextLengthExceeded`` (a ValueError) when the prompt plus ``max_tokens`` does
        not fit in ``n_ctx``, ValueError or TypeError naming an option that is out of range or of
        the wrong type, TypeError when ``prompt`` is neither text nor token ids (bytes: decode
        them first).
        """
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, parse_special=parse_special)
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be text (str) or token ids, not bytes; decode it first, e.g. "
                            "data.decode('utf-8')")
        else:
            ids = token_ids(prompt, "prompt token ids")
        pieces = self._generate(ids, max_tokens, SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                                                                seed=seed), stop, progress)
        if stream:
            return pieces
        with self._lock:  # the whole generation, before any other thread's call
            return "".join(pieces)

    def chat(self, messages: Sequence[Dict[str, str]], *, chat_template: Optional[str] = None,
             **kwargs) -> Union[str, Generation]:
        """Replies to a conversation, formatted with the model's own chat template.

        ``messages`` is a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
        ``chat_template`` replaces the file's template: a template text, or the name of one of
        llama.cpp's built-in templates (``"chatml"``, ``"llama3"``, ``"mistral-v7"``, ``"phi3"``,
        ``"gemma"``, ...). Other keyword arguments are those of :meth:`generate`. Message
        contents stay text (see :meth:`chat_tokens`); a conversation that continues the previous
        one evaluates only its new turns.
        """
        return self.generate(self.chat_tokens(messages, chat_template=chat_template), **kwargs)

    def chat_tokens(self, messages: Sequence[Dict[str, str]], *, chat_template: Optional[str] = None,
                    add_assistant: bool = True) -> List[int]:
        """The token ids of ``messages`` in the chat template, ready for :meth:`generate`.

        Only the template's own markers become special tokens: ``<|im_end|>`` or ``</s>``
        inside a message stay text. ``add_assistant`` ends with the opening of the reply.
        """
        pairs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise TypeError(f"message role and content must be str, got {m!r}")
            _check_text("a message's role", m["role"])
            _check_text("a message's content", m["content"])
            pairs.append((m["role"], m["content"]))
        if not pairs:
            raise ValueError("chat() needs at least one message")
        if chat_template is None and not self._vocab.chat_template:
            raise ValueError("this model file has no chat template: pass chat_template= (CLI: --chat-template) with "
                             "a template or a built-in name such as 'chatml', 'llama3' or 'mistral-v7', or use "
                             "generate() with a prompt of your own")
        template = chat_template or ""
        _check_text("chat_template", template)
        text = self._vocab.apply_chat_template(pairs, add_assistant, template)
        whole = self.tokenize(text, add_special=True, parse_special=True)
        if all(self.tokenize(c, add_special=False, parse_special=True) ==
               self.tokenize(c, add_special=False, parse_special=False) for _, c in pairs):
            return whole  # no content spells a special token: exactly llama.cpp's tokens
        # Some content does. The template rendered around placeholders shows where each content
        # sits: the pieces between are the template's (special tokens parsed), the contents text.
        marks = [f"\ue000{i}\ue001" for i in range(len(pairs))]
        skeleton = self._vocab.apply_chat_template([(r, m) for (r, _), m in zip(pairs, marks)], add_assistant,
                                                   template)
        for contents in ([c for _, c in pairs], [c.strip() for _, c in pairs]):  # some templates trim
            parts, rest = [], skeleton
            for mark, content in zip(marks, contents):
                head, found, rest = rest.partition(mark)
                if not found:
                    break
                parts += [(head, True), (content, False)]
            else:
                parts.append((rest, True))
                if "".join(t for t, _ in parts) == text:
                    # The BOS the tokenizer adds (if any) once, before the first piece.
                    ids: List[int] = [t for t in self.tokenize("", add_special=True)[:1] if t == self._vocab.bos]
                    for piece, special in parts:
                        if piece:
                            # A control token renders as nothing; after one, text starts afresh.
                            fresh = not ids or not self._vocab.token_to_piece(ids[-1], False)
                            ids += self._tokenize_piece(piece, special, fresh)
                    return ids
        raise ValueError("the chat template rewrites message contents, so special-token text in them cannot be "
                         "kept as text; remove it from the messages")

    def _tokenize_piece(self, piece: str, parse_special: bool, fresh: bool) -> List[int]:
        """Tokens of one piece of a longer text. SentencePiece vocabularies put a space before
        text that starts a tokenize call (or follows a control token), which a piece in the
        middle of running text must not get: it is tokenized behind a sentinel whose own tokens
        are then dropped."""
        ids = self.tokenize(piece, add_special=False, parse_special=parse_special)
        if fresh or not ids:
            return ids
        sentinel = "\ue000"
        head = self.tokenize(sentinel, add_special=False, parse_special=False)
        both = self.tokenize(sentinel + piece, add_special=False, parse_special=parse_special)
        return both[len(head):] if both[: len(head)] == head else ids

    def _generate(self, ids: List[int], max_tokens: int, params: SamplingParams,
                  stop: Optional[Union[str, Sequence[str]]], progress: Optional[ProgressCallback]) -> Generation:
        if _require_int("max_tokens", max_tokens) < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens!r}")
        if not ids:
            raise ValueError("the prompt is empty")
        self.check_fits(len(ids), max_tokens)
        sampler = Sampler(params)  # validates the sampling options before any work
        if stop is None or isinstance(stop, str):
            stops = [stop] if stop is not None else []
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        generation = Generation(len(ids))
        generation._pieces = self._generate_iter(ids, max_tokens, sampler, stops, progress, generation)
        return generation

    def _generate_iter(self, ids: List[int], max_tokens: int, sampler: Sampler, stops: List[str],
                       progress: Optional[ProgressCallback], generation: Generation) -> Iterator[str]:
        # The lock is held for each step, never across a yield: a stream that is not consumed
        # must not block the model's other users.
        def reading(done: int, total: int) -> Optional[bool]:
            go_on = progress(done, total) if progress else True
            return False if generation.cancelled else go_on

        if generation.cancelled:  # before it started
            return
        with self._lock:
            self._cache_epoch += 1
            epoch = self._cache_epoch
            try:
                logits = self._prefill(ids, reading, generation)
            except _engine.EvalAborted:
                if generation.cancelled:
                    return
                raise
        history = list(ids)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in stops), default=1) - 1  # chars kept back: a stop may straddle pieces
        pending = ""
        for step in range(max_tokens):
            if generation.cancelled:
                return
            token = sampler.sample(logits, history)
            if self.is_eog(token):
                generation.finish_reason = "stop"
                break
            history.append(token)
            generation.completion_tokens += 1
            pending += decoder.decode(bytes(self._vocab.token_to_piece(token, False)))
            if stops:
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    generation.finish_reason = "stop"
                    if cut:
                        yield pending[:cut]
                    return
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
            if step + 1 < max_tokens:
                with self._lock:
                    if self._cache_epoch != epoch:
                        raise RuntimeError("this generation stream was interrupted: the model was used by another "
                                           "call (generate, chat, eval or reset) since its last piece; use one "
                                           "LocalModel per concurrent stream")
                    logits = self._eval([token])
        else:
            generation.finish_reason = "length"
        pending += decoder.decode(b"", final=True)
        if pending:
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                generation.finish_reason = "stop"
            if cut != 0:
                yield pending if cut < 0 else pending[:cut]
