"""``pyselfextend serve``: a real server process on a loopback port, driven by the real ``openai`` client."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import free_port  # noqa: E402
from pyselfextend import LocalModel, default_model_name  # noqa: E402

MODEL = default_model_name()
KEY = "key-for-tests"
ATTENTION = ["--ctx", "6k", "-G", "4", "-W", "512", "--threads", "2"]  # SelfExtend: grouping from 512 back
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}

pytestmark = pytest.mark.model



class ServerProcess:
    """``python -m pyselfextend serve`` on a free loopback port, its log in a file."""

    def __init__(self, args: List[str], log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pyselfextend", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for_log(self, needle: str, timeout: float = 60, nth: int = 1) -> str:
        """The ``nth`` log line containing ``needle`` (waits for it to appear)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.log().splitlines() if needle in line]
            if len(lines) >= nth:
                return lines[nth - 1]
            time.sleep(0.1)
        raise AssertionError(f"no log line {nth} with {needle!r}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    s = ServerProcess(ATTENTION + ["--api-key", KEY, "--queue", "8", "--max-request-size", "256k"],
                      tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(smollm_path):
    """The same model and attention in this process: what the server must answer."""
    return LocalModel(smollm_path, n_ctx=6144, group_size=4, window=512, n_threads=2)


def _expected(reference: LocalModel, ids, **options):
    gen = reference.generate(ids, stream=True, **options)
    return "".join(gen), gen


def _post(server, path: str, body=None, *, content: Optional[bytes] = None, key: Optional[str] = KEY,
          method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.request(method, server.url + path, json=body, content=content, headers=headers, timeout=120)


def test_models_lists_the_one_model_served(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_answers_as_the_library_does_streamed_or_not(client, reference):
    messages = [SYSTEM, {"role": "user", "content": "Name three colours of the rainbow."}]
    ids = reference.chat_tokens(messages)
    text, gen = _expected(reference, ids, max_tokens=24, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and text.strip()
    assert r.choices[0].finish_reason == gen.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == gen.completion_tokens
    assert r.usage.total_tokens == len(ids) + gen.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [gen.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == gen.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_completion_counts_tokens_as_the_tokenizer_does(client, reference):
    prompt = "The three primary colours are"
    ids = reference.tokenize(prompt, parse_special=True)
    text, gen = _expected(reference, ids, max_tokens=12, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(ids)
    # Token ids as the prompt: the same answer.
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text == text
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length"
    # Sampling options reach the sampler: a seed repeats, top_k=1 is greedy.
    sampled = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.5, seed=7)
    assert client.completions.create(**sampled).choices[0].text == client.completions.create(**sampled).choices[0].text
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.5,
                                     extra_body={"top_k": 1}).choices[0].text == text


def test_stop_strings_end_the_text_before_them(client, reference):
    prompt = "Here is a list of fruits: apple, banana,"
    text, _ = _expected(reference, reference.tokenize(prompt), max_tokens=24, temperature=0)
    words = text.split()
    assert len(words) > 4
    stop = words[3]
    want = text[: text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def _document(n_entries: int, seed: int) -> str:
    cities = ["Lyon", "Porto", "Gdansk", "Tampere", "Bergen", "Cork", "Brno", "Graz"]
    goods = ["copper wire", "olive oil", "wool", "glass beads", "tin plates", "paper", "rope", "salt"]
    return "\n".join(f"Ledger entry {i}: the depot in {cities[(i * 3 + seed) % 8]} shipped {17 + (i * 7 + seed) % 90} "
                     f"crates of {goods[(i * 5 + seed) % 8]} on day {1 + (i * 11) % 28}." for i in range(n_entries))


def test_a_second_question_about_a_long_document_reuses_its_cache(client, reference, server):
    document = _document(150, seed=1)
    first = [SYSTEM, {"role": "user", "content": document + "\n\nWhich depot shipped wool in entry 2?"}]
    second = [SYSTEM, {"role": "user", "content": document + "\n\nHow many crates did entry 5 ship?"}]
    n_doc = len(reference.chat_tokens(second))
    assert 3500 < n_doc < 4500

    started = time.monotonic()
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=16, temperature=0)
    t1 = time.monotonic() - started
    started = time.monotonic()
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=16, temperature=0)
    t2 = time.monotonic() - started
    print(f"~4k-token document: first question {t1:.2f} s, second {t2:.2f} s")

    assert r1.usage.prompt_tokens_details.cached_tokens < 20  # at most the template's opening
    shared = len(os.path.commonprefix([reference.chat_tokens(first), reference.chat_tokens(second)]))
    assert r2.usage.prompt_tokens_details.cached_tokens == shared > 3500
    assert r2.usage.prompt_tokens == n_doc
    reference.reset()
    text, _ = _expected(reference, reference.chat_tokens(second), max_tokens=16, temperature=0)
    assert r2.choices[0].message.content == text


def test_every_error_has_its_status_and_openai_shape(server, client):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({**chat, "temperature": "hot"}, 400, "temperature"),
        ({**chat, "max_tokens": -1}, 400, "max_tokens"),
        ({**chat, "top_p": 2}, 400, "top_p"),
        ({**chat, "seed": "x"}, 400, "seed"),
        ({**chat, "stop": 5}, 400, "stop"),
        ({**chat, "stop": [""]}, 400, "stop"),
        ({**chat, "n": 2}, 400, "n"),
        ({**chat, "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "max_tokens": 4}, 400, "messages"),
        ({**chat, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages"),
        ({**chat, "model": "gpt-4o"}, 404, "model"),
        ({**chat, "messages": [{"role": ["user"], "content": "hi"}]}, 400, "messages"),
        ({**chat, "n": True}, 400, "n"),
        ({**chat, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({**chat, "tool_choice": "required"}, 400, "tool_choice"),
        ({**chat, "stop": ["x"] * 17}, 400, "stop"),
        ({**chat, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
        ({**chat, "max_tokens": None, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ]
    for body, status, param in cases:
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
        assert error["message"]

    completion = {"model": MODEL, "max_tokens": 4}
    for prompt in [{"text": "x"}, [1, 2, 10**9], [["a"], ["b"]], ""]:
        r = _post(server, "/v1/completions", {**completion, "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (prompt, r.text)

    for raw in [b"{not json", b"[1, 2]", b"\xff\xfe{}", b'{"prompt": "\\ud800", "max_tokens": 4}']:
        r = _post(server, "/v1/completions", content=raw)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (raw, r.text)

    # Too long for the context: OpenAI's code, the limit and the prompt's length in the message.
    long_prompt = "word " * 7000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and "n_ctx=6144" in e.value.message
    for body in [{**chat, "max_tokens": 10**12}, {**chat, "messages": [{"role": "user", "content": long_prompt}]}]:
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text

    r = _post(server, "/v1/chat/completions", chat, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key

    for method, path, status in [("POST", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)]:
        r = _post(server, path, {}, method=method)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _post(server, "/v1/completions", {}, method="GET").headers["allow"] == "POST"

    # Null means absent: the other limit, or the default.
    r = _post(server, "/v1/chat/completions", {**chat, "max_tokens": 3, "max_completion_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = _post(server, "/v1/completions", {**completion, "prompt": "Once upon a time", "max_tokens": None,
                                          "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16

    r = _post(server, "/v1/completions", {**completion, "prompt": "x" * 300_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    # None of it hurt the server.
    assert server.proc.poll() is None and server.health()["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=4).choices[0].message


def test_the_context_length_error_names_the_prompt_length(server, reference):
    prompt = "word " * 7000
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8})
    n = len(reference.tokenize(prompt, parse_special=True))
    assert r.status_code == 400 and f"prompt ({n} tokens)" in r.json()["error"]["message"]


def test_a_client_that_disconnects_stops_its_generation(server, client):
    before = server.health()["completed"]
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3000, temperature=0,
                                       stream=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].text is not None
    request_id = chunk.id
    stream.close()
    line = server.wait_for_log(f"request {request_id}: cancelled by the client after")
    assert int(line.split(" after ")[1].split()[0]) < 300  # far from the 3000 asked for

    # Not streamed: a client that times out and goes away.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5,
                   json={"model": MODEL, "prompt": "Twice upon a time", "max_tokens": 3000, "temperature": 0})
    server.wait_for_log("cancelled by the client after", timeout=30, nth=2)

    # Stop strings hold text back (here all of it): the request still ends within a token.
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=1.5, json={"model": MODEL, "prompt": "Thrice upon a time", "max_tokens": 3000,
                                             "temperature": 0, "stop": ["@" * 900], "stream": True}) as r:
            for _ in r.iter_lines():
                pass
    line = server.wait_for_log("cancelled by the client after", timeout=30, nth=3)
    assert int(line.split(" after ")[1].split()[0]) < 1000, line  # not the 3000 asked for

    # While the prompt is read: a ~5k-token document is left within a batch or two.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0,
                   json={"model": MODEL, "prompt": _document(200, seed=5), "max_tokens": 8, "stream": True})
    line = server.wait_for_log("cancelled by the client while reading the prompt", timeout=60)
    done, total = map(int, line.split("(")[1].split()[0].split("/"))
    assert done < total
    deadline = time.monotonic() + 30
    while server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.health()["busy"] and server.health()["completed"] == before


def test_eight_concurrent_clients_get_complete_correct_answers(server, reference):
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(8)]
    expected = {}
    for p in prompts:
        expected["completion", p] = _expected(reference, reference.tokenize(p), max_tokens=10, temperature=0)[0]
        msgs = [{"role": "user", "content": p}]
        expected["chat", p] = _expected(reference, reference.chat_tokens(msgs), max_tokens=10, temperature=0)[0]
    before = server.health()["completed"]
    failures: List[str] = []

    def one_client(c: int) -> None:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        for r in range(5):
            p, stream, kind = prompts[(c + r) % 8], (c + r) % 2 == 0, "chat" if (c * 5 + r) % 3 else "completion"
            try:
                if kind == "chat":
                    out = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                      max_tokens=10, temperature=0, stream=stream)
                    text = ("".join(ch.choices[0].delta.content or "" for ch in out if ch.choices) if stream
                            else out.choices[0].message.content)
                else:
                    out = api.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0, stream=stream)
                    text = "".join(ch.choices[0].text for ch in out) if stream else out.choices[0].text
                if text != expected[kind, p]:
                    failures.append(f"client {c} request {r}: {text!r} != {expected[kind, p]!r}")
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(f"client {c} request {r}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    health = server.health()
    assert health["completed"] == before + 40 and health["waiting"] == 0 and not health["busy"]


def _stream_until_first_piece(base_url: str, prompt: str):
    api = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=300)
    stream = api.completions.create(model=MODEL, prompt=prompt, max_tokens=5000, temperature=0, stream=True)
    first = next(iter(stream))
    return stream, first


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_full_queue_answers_503_and_a_signal_shuts_down_cleanly(smollm_path, reference, tmp_path, sig):
    server = ServerProcess(ATTENTION + ["--queue", "1"], tmp_path)
    try:
        stream, _ = _stream_until_first_piece(server.url, "Once upon a time")  # computing

        def wait_for_waiting(n: int) -> None:
            deadline = time.monotonic() + 30
            while server.health()["waiting"] != n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.health()["waiting"] == n

        # A client that gives up while waiting frees its place at once.
        def impatient() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=2)

        gives_up = threading.Thread(target=impatient)
        gives_up.start()
        wait_for_waiting(1)
        busy = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            busy.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "server_busy"
        assert int(e.value.response.headers["retry-after"]) > 0
        gives_up.join(30)
        wait_for_waiting(0)

        waiting: dict = {}
        prompt = "The opposite of hot is"
        waiter = threading.Thread(target=lambda: waiting.update(
            r=_post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0}, key=None)))
        waiter.start()
        wait_for_waiting(1)
        stream.close()  # the running request goes; the waiting one runs and answers in full
        waiter.join(120)
        assert waiting["r"].status_code == 200
        want, _ = _expected(reference, reference.tokenize(prompt), max_tokens=4, temperature=0)
        assert waiting["r"].json()["choices"][0]["text"] == want

        # A signal while a request streams: the stream ends with an error event, the server exits 0.
        stream, _ = _stream_until_first_piece(server.url, "In a land far away")
        server.proc.send_signal(sig)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert server.proc.wait(30) == 0
        log = server.log()
        assert "ended by the server's shutdown" in log and log.rstrip().endswith("pyselfextend: stopped")
    finally:
        server.stop(signal.SIGKILL)
