"""Generation, sampling, batching and progress."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import EvalAborted, LocalModel
from pyselfextend.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def smol(smollm_path):
    return LocalModel(smollm_path, n_ctx=1024, n_threads=2)


@pytest.mark.model
def test_greedy_is_deterministic_and_streaming_matches(smol):
    prompt = "Here is a list of fruits:"
    a = smol.generate(prompt, max_tokens=40, temperature=0)
    b = "".join(smol.generate(prompt, max_tokens=40, temperature=0, stream=True))
    assert a == b and len(a) > 0


@pytest.mark.model
def test_seeded_sampling_is_repeatable(smol):
    prompt = "Once upon a time"
    runs = [smol.generate(prompt, max_tokens=24, temperature=1.0, seed=s) for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1  # different seeds give different text


@pytest.mark.model
def test_stop_string_ends_generation_before_it(smol):
    prompt = "Count: one, two, three,"
    full = smol.generate(prompt, max_tokens=40, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = smol.generate(prompt, max_tokens=40, temperature=0, stop=[stop, "@@never@@"])
    assert cut == full[: full.find(stop)]
    streamed = "".join(smol.generate(prompt, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == cut


@pytest.mark.model
def test_a_stream_counts_its_tokens_and_says_why_it_ended(smol):
    prompt = "Count: one, two, three,"
    ids = smol.tokenize(prompt)
    gen = smol.generate(prompt, max_tokens=12, temperature=0, stream=True)
    assert gen.finish_reason is None and gen.completion_tokens == 0  # nothing runs before the first piece
    text = "".join(gen)
    assert gen.finish_reason == "length" and gen.completion_tokens == 12 and gen.prompt_tokens == len(ids)
    assert len(smol.cached_tokens) == len(ids) + 11  # the last token generated is never evaluated
    again = smol.generate(prompt + text, max_tokens=12, temperature=0, stream=True)
    "".join(again)
    assert again.cached_tokens >= len(ids)  # the first prompt and what followed were still cached
    stop = text.split()[1]
    cut = smol.generate(prompt, max_tokens=12, temperature=0, stream=True, stop=stop)
    assert "".join(cut) == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens <= 12
    # An end-of-generation token: "stop", and the token itself is not counted.
    chat = smol.generate(smol.chat_tokens([{"role": "user", "content": "Say hi."}]), max_tokens=200, temperature=0,
                         stream=True)
    "".join(chat)
    assert chat.finish_reason == "stop" and 0 < chat.completion_tokens < 200


def test_a_cancelled_stream_ends_at_its_next_step(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=256, n_threads=1)
    gen = llm.generate([5, 6, 7], max_tokens=100, temperature=0, stream=True)
    gen.cancel()
    assert list(gen) == [] and llm.cached_tokens == [] and gen.finish_reason is None  # nothing was read
    gen = llm.generate([5, 6, 7], max_tokens=100, temperature=0, stream=True)
    next(gen)
    gen.cancel()  # as from another thread: no more pieces, not even text held back
    assert list(gen) == [] and gen.completion_tokens == 1 and gen.finish_reason is None


@pytest.mark.model
def test_chat_uses_the_models_template(smol):
    text = smol._vocab.apply_chat_template([("user", "Hi")], True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    reply = smol.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
    assert "Paris" in reply


def test_batch_size_does_not_change_logits(tiny_model):
    path = tiny_model(weight_type="f16", n_embd=256, n_head=4, n_head_kv=2)
    ids = np.random.default_rng(0).integers(3, 320, size=100).tolist()
    results = []
    for n_batch in (100, 64, 7, 1):
        llm = LocalModel(path, n_ctx=128, n_batch=n_batch, n_threads=2)
        results.append(llm.eval(ids, all_logits=True))
    for r in results[1:]:
        assert np.abs(r - results[0]).max() / np.abs(results[0]).max() < 1e-3


def test_progress_is_reported_and_can_stop(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=256, n_batch=32, n_threads=1)
    seen = []
    llm.eval(list(range(3, 103)), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(32, 100), (64, 100), (96, 100), (100, 100)]

    llm.reset()
    with pytest.raises(EvalAborted):
        llm.eval(list(range(3, 103)), progress=lambda done, total: done < 64)
    assert llm.n_past == 64  # completed batches stay in the cache

    llm.reset()
    def interrupt(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        llm.eval(list(range(3, 103)), progress=interrupt)
    assert llm.n_past == 32
    llm.reset()
    assert llm.eval([5]).shape == (llm.n_vocab,)


def test_sampler_filters():
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == 1
    assert {Sampler(SamplingParams(temperature=5.0, top_k=1, seed=s)).sample(logits, []) for s in range(20)} == {1}
    # min_p=0.5 keeps only tokens at least half as likely as the best: ids 1 and 2.
    picks = {Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=s)).sample(logits, [])
             for s in range(50)}
    assert picks == {1, 2}
    # repeat penalty turns the greedy choice away from a recent token
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=2.0)).sample(logits, [1]) == 2


def test_sampler_follows_the_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float64)).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3))
    counts = np.bincount([s.sample(logits, []) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)
