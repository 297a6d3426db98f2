"""One LocalModel shared by several threads: calls serialize, streams end cleanly when interrupted."""
from __future__ import annotations

import threading

import pytest

from pyselfextend import LocalModel


def test_threads_sharing_a_model_get_the_answers_they_would_get_alone(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=128, n_batch=8, n_threads=1)
    prompts = [[5 + i, 40 + 3 * i, 7, 90 + i] * (3 + i) for i in range(4)]
    alone = [llm.generate(p, max_tokens=24, temperature=0) for p in prompts]
    assert len(set(alone)) > 1  # the prompts lead to different texts, so a mix-up would show
    results, errors = {}, []

    def worker(i):
        try:
            for r in range(6):
                results[(i, r)] = llm.generate(prompts[i], max_tokens=24, temperature=0)
                if r % 2:  # eval and reset interleave with generate
                    assert llm.eval(prompts[i][:3]).shape == (llm.n_vocab,)
                else:
                    llm.reset()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(results[(i, r)] == alone[i] for i in range(4) for r in range(6))


def test_a_stream_interrupted_by_another_call_raises_instead_of_continuing_the_other_prompt(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=128, n_threads=1)
    first, other = [5, 6, 7, 8], [90, 91, 92]
    expected = llm.generate(first, max_tokens=16, temperature=0, stream=False)

    stream = llm.generate(first, max_tokens=16, temperature=0, stream=True)
    head = next(stream)
    assert expected.startswith(head)
    llm.generate(other, max_tokens=4, temperature=0)  # takes the cache
    with pytest.raises(RuntimeError, match="stream was interrupted"):
        list(stream)

    # A second stream interrupts the first; each stream alone is unaffected by one that ended.
    s1 = llm.generate(first, max_tokens=16, temperature=0, stream=True)
    next(s1)
    s2 = llm.generate(other, max_tokens=16, temperature=0, stream=True)
    next(s2)
    with pytest.raises(RuntimeError, match="interrupted"):
        list(s1)
    s3 = llm.generate(first, max_tokens=16, temperature=0, stream=True)
    assert "".join(s3) == expected
    llm.reset()
    with pytest.raises(RuntimeError, match="interrupted"):
        list(s2)


def test_a_stream_from_another_thread_does_not_block_the_model(tiny_model):
    llm = LocalModel(tiny_model(), n_ctx=128, n_threads=1)
    stream = llm.generate([5, 6, 7], max_tokens=32, temperature=0, stream=True)
    next(stream)  # suspended mid-stream, holding no lock
    done = []
    t = threading.Thread(target=lambda: done.append(llm.generate([9, 9, 9], max_tokens=4, temperature=0)))
    t.start()
    t.join(timeout=60)
    assert done, "a suspended stream blocked another thread"
