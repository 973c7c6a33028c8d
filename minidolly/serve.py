"""An OpenAI-compatible HTTP API and a chat page over the batching engine.

    python generate.py --serve --model runs/dolly-14m/final          # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Explain gravity."}], "temperature": 0}'

    POST /v1/chat/completions   messages -> Dolly's prompt (`dolly_prompt`), stream or not
    POST /v1/completions        a raw prompt, no template
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", slots, running, waiting, steps}
    GET  /                      the chat page (minidolly/static/chat.html)

This module only translates: a JSON body becomes a tokenized prompt and SamplingParams for
minidolly/engine.py, and the engine's outputs become OpenAI's response object or its
server-sent events. Every request a user can get wrong is answered with OpenAI's error body,
{"error": {"message", "type", "param", "code"}}, and a 4xx status naming the field; a full
queue is a 503 with Retry-After. Starlette on uvicorn: `pip install -e ".[serve]"`.
See docs/serving.md for the API in full.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, EngineClosedError, Output, QueueFullError, SamplingParams
from .generate import SamplingError, encode_prompt
from .tokenizer import Tokenizer

CHAT_MAX_TOKENS = 256  # Dolly's pipeline's max_new_tokens (capped at half the window)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4  # as OpenAI
RETRY_AFTER_S = 1
# Fields of OpenAI's API that this server does not implement, with the values that mean "off".
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logit_bias": ({},), "best_of": (1,), "echo": (False,), "suffix": ("",), "tools": ([],),
               "functions": ([],), "tool_choice": ("none",), "function_call": ("none",)}


class APIError(Exception):
    """A request that cannot be served: OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- request body

_KINDS = {  # JSON type names as a message says them -> the Python test (bool is not a number here)
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a boolean": lambda v: isinstance(v, bool),
    "an array": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
}
_REQUIRED = object()


def _json_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def field(body: dict, name: str, kind: str, default=_REQUIRED):
    """body[name], checked to be `kind` (a key of _KINDS); null counts as absent, as in
    OpenAI's API. Raises APIError 400 naming the field."""
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            raise APIError(400, f"'{name}' is required.", name)
        return default
    if not _KINDS[kind](value):
        raise APIError(400, f"'{name}' must be {kind}, got {_json_type(value)}.", name)
    return value


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request) -> dict:
    """The request's JSON object (strict JSON: NaN and Infinity are refused). Raises APIError 400."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {_json_type(body)}.")
    return body


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    """OpenAI's sampling fields -> SamplingParams (OpenAI's defaults: temperature 1, top_p 1).
    top_k (0 = off) and ignore_eos (vLLM's) are extensions. Raises APIError 400 naming the field."""
    for name, off in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in off:
            raise APIError(400, f"'{name}' is not supported by this server.", name)
    n = field(body, "n", "an integer", 1)
    if n != 1:
        raise APIError(400, f"Only n=1 is supported, got n={n}.", "n")
    max_tokens = field(body, "max_tokens", "an integer", None)
    newer = field(body, "max_completion_tokens", "an integer", None)  # the chat API's newer name
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise APIError(400, "Give 'max_tokens' or 'max_completion_tokens', not both.", "max_completion_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or an array of strings, got {_json_type(body['stop'])}.", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' holds at most {MAX_STOP} strings, got {len(stop)}.", "stop")
    params = SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else (newer if newer is not None else default_max_tokens),
        temperature=float(field(body, "temperature", "a number", 1.0)),
        top_k=field(body, "top_k", "an integer", 0),
        top_p=float(field(body, "top_p", "a number", 1.0)),
        seed=field(body, "seed", "an integer", None),
        stop=tuple(stop),
        ignore_eos=field(body, "ignore_eos", "a boolean", False))
    try:
        params.check()
    except SamplingError as e:
        name = {"max_new_tokens": "max_completion_tokens" if max_tokens is None and newer is not None
                else "max_tokens"}.get(e.param, e.param)
        raise APIError(400, e.message(name), name) from None
    return params


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise APIError(400, f"{where} may only hold text parts; Dolly reads text.", where)
    raise APIError(400, f"{where} must be a string or an array of text parts, got {_json_type(content)}.", where)


def dolly_prompt(messages, context: str | None = None) -> tuple[str, str | None]:
    """OpenAI chat messages -> Dolly's (instruction, context).

    The last message must be the user's: its text is the instruction. Everything before it
    becomes the prompt's `Input:` section, in this order, paragraphs apart: the `context`
    field, the system (or developer) messages, then every earlier turn as "User: ..." or
    "Assistant: ...". So a follow-up question reads the conversation it follows, and a prompt
    too long for the window loses its oldest part first (encode_prompt cuts context from the
    left). Raises APIError 400 naming the message at fault.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content', got {_json_type(m)}.", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}.", f"{where}.role")
        text = _text(m.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "The last message must have role 'user': it is the instruction Dolly answers.", "messages")
    instruction = turns.pop()[1]
    if not instruction.strip():
        raise APIError(400, f"messages[{len(messages) - 1}].content is empty; give the model something to answer.",
                       f"messages[{len(messages) - 1}].content")
    parts = ([context] if context else []) + system + [f"{role.capitalize()}: {text}" for role, text in turns]
    return instruction, "\n\n".join(p for p in parts if p.strip()) or None


def completion_prompt(tokenizer: Tokenizer, prompt, budget: int, vocab_size: int) -> tuple[list[int], bool]:
    """/v1/completions' `prompt` (a string, a list of one string, or a list of token ids) ->
    (token ids, truncated). A prompt longer than `budget` keeps its last `budget` tokens."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"'prompt' token ids must be in [0, {vocab_size}).", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, f"Only one prompt per request is supported, got {len(prompt)}.", "prompt")
    else:
        raise APIError(400, f"'prompt' must be a string or an array of token ids, got {_json_type(prompt)}.", "prompt")
    if not ids:
        raise APIError(400, "'prompt' is empty; give the model some text to continue.", "prompt")
    return (ids[-budget:], True) if len(ids) > budget else (ids, False)


# ------------------------------------------------------------------- the app


class Server:
    """The routes over one engine; `app` is the ASGI application."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.window = engine.max_length
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={APIError: self._api_error, HTTPException: self._http_error, Exception: self._bug})

    # -- small routes

    async def page(self, request: Request) -> Response:
        return HTMLResponse(resources.files("minidolly").joinpath("static/chat.html").read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, **self.engine.stats()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minidolly",
             "max_model_len": self.window}]})

    # -- completions

    async def chat_completions(self, request: Request) -> Response:
        body, params, stream, usage = await self._read(request, CHAT_MAX_TOKENS)
        instruction, context = dolly_prompt(field(body, "messages", "an array"), field(body, "context", "a string", None))
        ids, truncated = await run_in_threadpool(self._encode_chat, instruction, context, params.max_new_tokens)
        return await self._answer(request, "chat", ids, truncated, params, stream, usage, strip=True)

    async def completions(self, request: Request) -> Response:
        body, params, stream, usage = await self._read(request, COMPLETION_MAX_TOKENS)
        if body.get("prompt") is None:
            raise APIError(400, "'prompt' is required.", "prompt")
        ids, truncated = await run_in_threadpool(completion_prompt, self.engine.tokenizer, body["prompt"],
                                                 self.window - params.max_new_tokens, self.engine.model.config.vocab_size)
        return await self._answer(request, "text", ids, truncated, params, stream, usage, strip=False)

    async def _read(self, request: Request, default_max_tokens: int) -> tuple[dict, SamplingParams, bool, bool]:
        """What both completion routes read first: the body, its model, its sampling fields
        (max_tokens by default `default_max_tokens`, at most half the window), `stream` and
        `stream_options.include_usage`. Raises APIError."""
        body = await read_body(request)
        model = field(body, "model", "a string", None)
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           "model", code="model_not_found")
        params = sampling_params(body, min(default_max_tokens, self.window // 2))
        if params.max_new_tokens >= self.window:
            raise APIError(400, f"max_tokens={params.max_new_tokens} fills the model's whole {self.window}-token "
                                f"window; lower it.", "max_tokens")
        stream = field(body, "stream", "a boolean", False)
        include_usage = field(body, "stream_options", "an object", {}).get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise APIError(400, "'stream_options.include_usage' must be a boolean.", "stream_options.include_usage")
        return body, params, stream, include_usage

    def _encode_chat(self, instruction: str, context: str | None, max_tokens: int) -> tuple[list[int], bool]:
        try:
            return encode_prompt(self.engine.tokenizer, instruction, context, self.window - max_tokens)
        except ValueError:  # not even the template fits beside max_tokens
            raise APIError(400, f"max_tokens={max_tokens} leaves too little of the model's {self.window}-token "
                                f"window for Dolly's prompt template; lower it.", "max_tokens") from None

    async def _answer(self, request: Request, kind: str, ids: list[int], truncated: bool, params: SamplingParams,
                      stream: bool, include_usage: bool, strip: bool) -> Response:
        """Submit to the engine, then answer with one JSON object or an event stream."""
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()

        def on_output(output: Output):  # on the engine thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the event loop is gone (the server stopped): nobody is listening
                pass

        try:
            handle = self.engine.submit(ids, params, on_output, strip=strip)
        except QueueFullError as e:
            raise APIError(503, f"The server is busy: {e} Retry later.", type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        reply = _Reply(kind, self.model_name, len(ids), truncated)
        if stream:
            return _EventStream(reply.events(outputs, include_usage), on_close=lambda: self.engine.cancel(handle))
        collect = asyncio.ensure_future(reply.collect(outputs))
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([collect, disconnect], return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collect.done():  # the client left (or this task was cancelled): free the slot
                collect.cancel()
                self.engine.cancel(handle)
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody reads it
        return collect.result()

    # -- errors

    async def _api_error(self, request: Request, exc: APIError) -> Response:
        return exc.response()

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"No route {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, exc.detail)
        return APIError(exc.status_code, message).response()

    async def _bug(self, request: Request, exc: Exception) -> Response:
        return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error").response()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read by then, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends: finished, the client
    gone (Starlette cancels the stream), or the server stopping, even before the first event."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Reply:
    """OpenAI's response objects for one request: a chat completion or a text completion,
    whole or as chunks. `prompt_truncated` (an extension) says the prompt was cut to fit."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, truncated: bool):
        self.kind, self.model, self.prompt_tokens, self.truncated = kind, model, prompt_tokens, truncated
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra, "prompt_truncated": self.truncated}

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice])
        return self._object("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                  "finish_reason": finish_reason}])

    async def collect(self, outputs: asyncio.Queue) -> Response:
        """Wait for the whole answer; one response object (or the error)."""
        pieces = []
        while True:
            out: Output = await outputs.get()
            pieces.append(out.text)
            if out.finish_reason is not None:
                break
        if out.finish_reason not in ("stop", "length"):
            raise _engine_error(out)
        text = "".join(pieces)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": out.finish_reason}
            obj = self._object("chat.completion", [choice], usage=self._usage(out.completion_tokens))
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason}
            obj = self._object("text_completion", [choice], usage=self._usage(out.completion_tokens))
        return JSONResponse(obj)

    async def events(self, outputs: asyncio.Queue, include_usage: bool):
        """The answer as server-sent events: OpenAI's chunks, then `data: [DONE]`. An engine
        error (the server stopping, broken logits) ends the stream with an error event."""
        if self.kind == "chat":
            yield _sse(self._chunk("", role=True))
        while True:
            out: Output = await outputs.get()
            if out.finish_reason in (None, "stop", "length") and out.text:
                yield _sse(self._chunk(out.text))
            if out.finish_reason is not None:
                break
        if out.finish_reason in ("stop", "length"):
            yield _sse(self._chunk(None, out.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
                yield _sse(self._object(obj, [], usage=self._usage(out.completion_tokens)))
        else:
            yield _sse(_engine_error(out).body())
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _engine_error(out: Output) -> APIError:
    if out.finish_reason == "shutdown":
        return APIError(503, out.error, type="server_error", code="shutting_down")
    return APIError(500, out.error or f"The request ended: {out.finish_reason}.", type="server_error")


# ------------------------------------------------------------------ running it


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port). Raises OSError in one sentence."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise OSError(f"Cannot listen on {host}:{port}: {e.strerror or e}.") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """http://host:port of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(engine: Engine, model_name: str, sock: socket.socket, *, on_ready=None, access_log: bool = False) -> None:
    """Serve the API and the chat page on `sock` until SIGINT (Ctrl-C) or SIGTERM.

    `engine` must be started; `on_ready(url)` is called once the server accepts connections.
    On the signal the engine closes first, so every request in flight ends at once with an
    error (a final error event on a stream, 503 otherwise) and its connection closes; then
    uvicorn finishes. Uvicorn re-raises the signal when it is done (SIGINT: KeyboardInterrupt).
    """
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(url_of(sock))

        async def shutdown(self, sockets=None):
            engine.close(wait=False)  # in-flight requests end now, so their connections can close
            await super().shutdown(sockets)

    config = uvicorn.Config(Server(engine, model_name).app, log_level="info" if access_log else "warning",
                            access_log=access_log, lifespan="off", timeout_graceful_shutdown=10)
    _Uvicorn(config).run(sockets=[sock])
