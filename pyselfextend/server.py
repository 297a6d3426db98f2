"""``pyselfextend serve``: one model behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /health``, in the shapes the ``openai`` client and the tools built on it expect
(streaming as server-sent events ending with ``data: [DONE]``; errors as
``{"error": {"message", "type", "param", "code"}}``).

One model, one cache: a single worker thread computes one request at a time, in arrival
order. Requests waiting beyond ``max_waiting`` are turned away with 503 and a Retry-After
header. Because the cache is kept between requests, a request whose prompt starts like the
previous one (the same document, a longer conversation) evaluates only what is new, as
:meth:`LocalModel.prefill` does; ``usage.prompt_tokens_details.cached_tokens`` says how much
was reused. A client that disconnects ends its request at once (within one prompt batch while
the prompt is read), and so does shutting the server down (Ctrl-C, SIGTERM).

Built on Starlette and uvicorn (the ``server`` extra): the ASGI toolkit and server FastAPI itself
runs on, without FastAPI's request models, whose validation errors (422, in a shape of their
own) would have to be translated into OpenAI's 400s anyway; every value is checked by
``LocalModel``, which owns those rules, and streaming needs nothing beyond Starlette's
``StreamingResponse``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, TextIO, Tuple

from ._engine import EvalAborted
from .model import ContextLengthExceeded, Generation, LocalModel
from .progress import ProgressBar

DEFAULT_MAX_WAITING = 16
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
RETRY_AFTER_SECONDS = 5
BODY_TIMEOUT_SECONDS = 60  # to receive a whole request body
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 1000  # each is searched for after every token

# Request fields taken as they are, by the name LocalModel.generate gives them. Absent or null
# fields keep LocalModel's defaults, so that the server and the library behave alike.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")
# OpenAI fields this server does not implement, with the values that mean "not used".
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,),
               "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
               "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
               "response_format": ({"type": "text"},)}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request that gets an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(error: Exception, fields: Dict[str, Any]) -> APIError:
    """A 400 for LocalModel's ValueError/TypeError; its message starts with the option it names."""
    if isinstance(error, ContextLengthExceeded):
        return APIError(400, str(error), param="messages" if "messages" in fields else "prompt",
                        code="context_length_exceeded")
    message = str(error)
    first = message.split(" ", 1)[0]
    param = first if first in fields else "stop" if message.startswith("stop strings") else None
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class Job:
    """One request's generation, and the channel its pieces travel back to the event loop."""

    id: str
    kind: str
    generation: Generation
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event
    events: "asyncio.Queue[Tuple[str, Any]]" = field(default_factory=asyncio.Queue)
    cancel_reason: str = ""
    read: Tuple[int, int] = (0, 0)  # prompt tokens evaluated / to evaluate, for the log
    created: int = field(default_factory=lambda: int(time.time()))

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()
            self.generation.cancel()  # ends it at its next token or prompt batch


class Worker:
    """The model's only user: runs jobs one at a time, in arrival order, on its own thread."""

    def __init__(self, llm: LocalModel, *, max_waiting: int, log: Callable[[str], None]) -> None:
        self.llm, self.max_waiting, self.log = llm, max_waiting, log
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: List[Job] = []
        self.current: Optional[Job] = None
        self.stopping = False
        self.completed = 0
        self._thread = threading.Thread(target=self._run, name="pyselfextend-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests waiting whose clients still want an answer."""
        with self._lock:
            return self._live_waiting()

    def _live_waiting(self) -> int:  # under self._lock
        return sum(1 for job in self._waiting if not job.cancelled.is_set())

    def submit(self, job: Job) -> None:
        """Queues ``job``; 503 when the server is shutting down or the queue is full."""
        with self._lock:
            if self.stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            waiting = self._live_waiting()
            if waiting >= self.max_waiting:
                raise APIError(503, f"the server is busy: {waiting} requests are already waiting (at most "
                                    f"{self.max_waiting}); retry in a few seconds", type="server_error",
                               code="server_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self._waiting.append(job)
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Turns new requests away and ends the running and waiting ones; each gets an error now."""
        with self._lock:
            self.stopping = True
            jobs = self._waiting + ([self.current] if self.current else [])
        for job in jobs:
            job.cancel("shutdown")
            job.emit("error", _SHUTTING_DOWN)
        if jobs:
            self.llm.abort()  # the running graph stops now rather than at its end
        self._jobs.put(None)

    def join(self) -> None:
        """Waits for the worker to leave the engine (after shutdown(): within a graph run)."""
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                self.current = job
            try:
                self._compute(job)
            except BaseException as e:  # noqa: BLE001 - the worker must outlive any one request
                job.emit("error", APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            finally:
                with self._lock:
                    self.current = None

    def _compute(self, job: Job) -> None:
        gen = job.generation
        started = time.monotonic()
        ran = False
        try:
            if not job.cancelled.is_set():
                ran = True
                for piece in gen:
                    job.emit("piece", piece)
                    if job.cancelled.is_set():
                        break
        except EvalAborted:  # abort() at shutdown, while the prompt was read
            pass
        except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
            self.log(f"request {job.id}: failed: {type(e).__name__}: {e}")
            job.emit("error", APIError(500, f"generation failed: {e}", type="server_error"))
            return
        finally:
            gen.close()
        seconds = time.monotonic() - started
        if job.cancelled.is_set():
            done, total = job.read
            where = ("while waiting in the queue" if not ran else
                     f"after {gen.completion_tokens} generated tokens" if gen.finish_reason or gen.completion_tokens
                     else f"while reading the prompt ({done}/{total} tokens read)")
            if job.cancel_reason == "client":
                self.log(f"request {job.id}: cancelled by the client {where}, {seconds:.1f} s")
                job.emit("error", APIError(499, "the client went away", code="client_closed_request"))
            else:  # shutdown() has answered it
                self.log(f"request {job.id}: ended by the server's shutdown {where}")
            return
        self.completed += 1
        self.log(f"request {job.id}: {job.kind}, {gen.prompt_tokens} prompt tokens ({gen.cached_tokens} cached), "
                 f"{gen.completion_tokens} generated in {seconds:.2f} s, finish_reason {gen.finish_reason}")
        job.emit("end", None)


_SHUTTING_DOWN = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


class Server:
    """The HTTP application for one ``LocalModel``: see the module's description."""

    def __init__(self, llm: LocalModel, *, model_id: str, api_key: Optional[str] = None,
                 chat_template: Optional[str] = None, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, log_stream: TextIO = sys.stderr) -> None:
        if max_waiting < 0:
            raise ValueError(f"the queue size must be >= 0, got {max_waiting}")
        if max_request_bytes < 1:
            raise ValueError(f"the request size limit must be >= 1 byte, got {max_request_bytes}")
        self.llm, self.model_id, self.api_key, self.chat_template = llm, model_id, api_key, chat_template
        self.max_request_bytes = max_request_bytes
        self.log_stream = log_stream
        self.created = int(time.time())
        self.worker = Worker(llm, max_waiting=max_waiting, log=self.log)
        self.app = self._build_app()

    def log(self, message: str) -> None:
        try:
            print(f"pyselfextend: {message}", file=self.log_stream, flush=True)
        except (OSError, ValueError):  # a closed or broken log stream must not stop the server
            pass

    # -- the application -----------------------------------------------------------------
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            text = (f"no such endpoint: {request.method} {request.url.path}" if exc.status_code in (404, 405)
                    else str(exc.detail))
            return self._error(APIError(exc.status_code, text, code=code, headers=dict(exc.headers or {})))

        routes = [
            Route("/health", self._endpoint(self.health, auth=False), methods=["GET"]),
            Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.get_model), methods=["GET"]),
            Route("/v1/chat/completions", self._endpoint(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    def _endpoint(self, handler, *, auth: bool = True):
        from starlette.requests import ClientDisconnect

        async def endpoint(request):
            try:
                if auth:
                    self._authorize(request)
                return await handler(request)
            except APIError as e:
                return self._error(e)
            except ClientDisconnect:  # gone before its request was read: nobody to answer
                from starlette.responses import Response

                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - bad input never takes the server down
                self.log(f"{request.method} {request.url.path}: internal error: {type(e).__name__}: {e}")
                return self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
        return endpoint

    @staticmethod
    def _error(e: APIError):
        from starlette.responses import JSONResponse

        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key "
                                "the server was started with (--api-key)", code="invalid_api_key")

    async def _read_json(self, request) -> Dict[str, Any]:
        limit = self.max_request_bytes
        too_large = APIError(413, f"the request body exceeds the server's limit of {limit:,} bytes "
                                  "(--max-request-size)", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise APIError(400, f"invalid Content-Length header: {length!r}")
            if int(length) > limit:
                raise too_large
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_large

        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_SECONDS} s",
                           code="request_timeout") from None
        try:
            data = json.loads(bytes(body))
        except ValueError as e:  # also bytes that are not UTF-8
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        model = data.get("model")
        if model is not None and model != self.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server has {self.model_id!r}",
                           param="model", code="model_not_found")
        for name, unused in UNSUPPORTED.items():
            value = data.get(name)
            if value is not None and not any(type(value) is type(u) and value == u for u in unused):
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name,
                               code="unsupported_value")
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > MAX_STOP_STRINGS or any(isinstance(x, str) and len(x) > MAX_STOP_LENGTH for x in stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters",
                           param="stop")
        return data

    # -- endpoints -----------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model_id, "busy": self.worker.current is not None,
                             "waiting": self.worker.waiting, "completed": self.worker.completed})

    def _model_card(self) -> Dict[str, Any]:
        llm = self.llm
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "pyselfextend",
                "n_ctx": llm.n_ctx, "n_ctx_train": llm.n_ctx_train, "attention": llm.plan.describe()}

    async def list_models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request):
        from starlette.responses import JSONResponse

        name = request.path_params["model"]
        if name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_id!r}",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request):
        from starlette.concurrency import run_in_threadpool

        data = await self._read_json(request)
        messages = _messages(data.get("messages"))
        try:
            ids = await run_in_threadpool(self.llm.chat_tokens, messages, chat_template=self.chat_template)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages") from None
        name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        return await self._run(request, data, ids, "chat", data.get(name), name)

    async def completions(self, request):
        from starlette.concurrency import run_in_threadpool

        data = await self._read_json(request)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            try:  # raw prompts may spell the model's special tokens, as llama.cpp's server allows
                ids = await run_in_threadpool(self.llm.tokenize, prompt, parse_special=True)
            except (ValueError, TypeError) as e:
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.llm.n_vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {self.llm.n_vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise APIError(400, "prompt must be a string, a list of token ids, or a list holding one of these "
                                "(batches of several prompts are not supported)", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = data.get("max_tokens")
        return await self._run(request, data, ids, "completion", 16 if max_tokens is None else max_tokens)

    # -- running a request ---------------------------------------------------------------
    async def _run(self, request, data: Dict[str, Any], ids: List[int], kind: str, max_tokens: Optional[int],
                   max_tokens_name: str = "max_tokens"):
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
        options = data.get("stream_options") or {}
        include_usage = options.get("include_usage", False) if isinstance(options, dict) else None
        if not isinstance(include_usage, bool):
            raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}",
                           param="stream_options")
        if max_tokens is None:  # chat without a limit: as much as the context holds
            max_tokens = max(self.llm.n_ctx - len(ids), 0)
        sampling = {k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None}
        job_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        cancelled = threading.Event()
        bar = ProgressBar(f"request {job_id}", stream=self.log_stream)
        job_ref: List[Job] = []

        def progress(done: int, total: int) -> bool:
            job_ref[0].read = (done, total)
            bar(done, total)
            return not cancelled.is_set()

        try:
            generation = self.llm.generate(ids, max_tokens=max_tokens, stream=True, progress=progress, **sampling)
        except (ValueError, TypeError) as e:
            error = _invalid(e, data)
            if error.param == "max_tokens":  # by the name the client used
                error.param = max_tokens_name
                error.message = error.message.replace("max_tokens", max_tokens_name, 1)
            raise error from None
        job = Job(job_id, kind, generation, asyncio.get_running_loop(), cancelled)
        job_ref.append(job)
        self.worker.submit(job)
        if stream is True:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._events(job, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job)

    def _usage(self, gen: Generation) -> Dict[str, Any]:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}

    def _envelope(self, job: Job, chunk: bool) -> Dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.kind == "chat" else "text_completion"
        return {"id": job.id, "object": kind, "created": job.created, "model": self.model_id}

    async def _whole(self, request, job: Job):
        """A non-streamed response; a client that goes away cancels the job."""
        from starlette.responses import JSONResponse

        async def watch_disconnect() -> None:
            while True:  # the body has been read: what comes next is the client going away
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancel("client")
                    return

        watcher = asyncio.ensure_future(watch_disconnect())
        pieces = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    return self._error(value)
                else:
                    break
        finally:
            watcher.cancel()
            job.cancel("client")  # no-op once the job has ended
        gen = job.generation
        text = "".join(pieces)
        if job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": gen.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
        return JSONResponse({**self._envelope(job, False), "choices": [choice], "usage": self._usage(gen)})

    async def _events(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. Starlette cancels this generator when the
        client disconnects; ``finally`` then cancels the job."""
        def event(choice: Optional[Dict[str, Any]], **extra: Any) -> str:
            payload = {**self._envelope(job, True), "choices": [choice] if choice else [], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def choice(text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> Dict[str, Any]:
            if job.kind == "chat":
                delta: Dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        try:
            if job.kind == "chat":
                yield event(choice("", role=True))
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    yield event(choice(value))
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    return
                else:
                    break
            gen = job.generation
            yield event(choice(None if job.kind == "chat" else "", gen.finish_reason))
            if include_usage:
                yield event(None, usage=self._usage(gen))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel("client")  # no-op once the job has ended


def _messages(value: Any) -> List[Dict[str, str]]:
    """OpenAI chat messages as LocalModel.chat_tokens takes them: text parts joined, roles checked."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           param="messages")
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                   param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": ROLES[role], "content": content})
    return out


def serve(llm: LocalModel, *, model_id: str, host: str = "127.0.0.1", port: int = 8080,
          api_key: Optional[str] = None, chat_template: Optional[str] = None,
          max_waiting: int = DEFAULT_MAX_WAITING, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> int:
    """Serves ``llm`` until Ctrl-C or SIGTERM, which end the running and waiting requests first."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("pyselfextend serve needs the server extra: pip install 'pyselfextend[server]' "
                           "(starlette and uvicorn)") from None
    server = Server(llm, model_id=model_id, api_key=api_key, chat_template=chat_template, max_waiting=max_waiting,
                    max_request_bytes=max_request_bytes)

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound: say where (uvicorn's own line says it too, without the /v1)
                server.log(f"serving {model_id!r} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")

        def handle_exit(self, sig: int, frame: Any) -> None:
            server.worker.shutdown()  # the running request stops within a token (or a prompt batch)
            # Not uvicorn's own handler, which re-raises the signal once it has shut down, so that
            # the process dies of it: a server asked to stop that stops cleanly exits with 0.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: do not wait for open connections
            self.should_exit = True

    config = uvicorn.Config(server.app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10,
                            lifespan="off")
    uv = _Uvicorn(config)
    try:
        uv.run()
    except SystemExit:  # uvicorn's way to say it could not start (a port in use): said below
        pass
    finally:
        server.worker.shutdown()
        server.worker.join()  # never exit while the worker is inside the engine
    if not uv.started:
        raise RuntimeError(f"could not serve on {host}:{port} (see the message above)")
    server.log("stopped")
    return 0
