"""The HTTP API (FastAPI): OpenAI-compatible completions, classification, adapters at run time.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with a 4xx
status for anything a client can cause; a full queue is 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftlab.errors import PeftlabError
from peftlab.inference import decoding_options
from peftlab.serving.batcher import Batcher, Job, QueueFull
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import AdapterConflict, AdapterForbidden, AdapterNotFound, Registry, ServedAdapter

log = logging.getLogger("peftlab.serve")
_TYPE_NAME = re.compile(r"(str|int|float|bool|none|(list|dict|tuple)\[.*\]|(function|constrained)-.*)")
Number = Union[StrictFloat, StrictInt]


@dataclass
class Limits:
    max_tokens: int = 256  # new tokens one request may ask for
    max_input_chars: int = 20_000  # per text, checked before tokenizing
    max_inputs: int = 64  # texts per request (classification inputs, completion prompts)
    max_body_bytes: int = 4 * 1024 * 1024  # a request body beyond this is refused (413) before it is read
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _peftlab_error(error: PeftlabError) -> APIError:
    message = error.message + (f" ({error.hint})" if error.hint else "")
    if isinstance(error, AdapterNotFound):
        return APIError(404, message, "not_found_error", code="adapter_not_found")
    if isinstance(error, AdapterForbidden):
        return APIError(403, message, "permission_error", param="path")
    if isinstance(error, AdapterConflict):
        return APIError(409, message, "conflict_error", param="name")
    return APIError(400, message)


# --- requests ----------------------------------------------------------------------------

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields this server has no use for


class _Generation(_Request):
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    logprobs: StrictBool | StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: StrictStr | list[StrictStr]


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(_Request):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    input_pair: StrictStr | list[StrictStr] | None = None


class AdapterRequest(_Request):
    name: StrictStr
    path: StrictStr


# --- the server -----------------------------------------------------------------------------

class Server:
    """The registry, the batcher and the counters behind one app."""

    def __init__(self, registry: Registry, *, limits: Limits | None = None, max_batch: int = 16,
                 max_wait_ms: float = 5.0, queue_size: int = 64):
        self.registry = registry
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.batcher = Batcher(registry, self.metrics, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               queue_size=queue_size)

    # validation shared by the endpoints

    def adapter(self, name: str, family: str) -> ServedAdapter:
        adapter = self.registry.get(name)
        if adapter is None:
            known = ", ".join(self.registry.names())
            raise APIError(404, f'the model "{name}" does not exist; served: {known}', param="model",
                           code="model_not_found")
        task = adapter.task  # what it answers is declared by its family (tasks.base.ServingTask)
        if family == "classify" and not task.classifies:
            raise APIError(400, f'"{name}" is a {task.name} model: use /v1/completions', param="model")
        if family != "classify" and not task.generates:
            raise APIError(400, f'"{name}" is a classification model: use /v1/classify', param="model")
        if family == "chat" and not task.chat:
            raise APIError(400, f'"{name}" is a {task.name} model: chat completions need a causal LM; use '
                                "/v1/completions", param="model")
        if family == "classify" and adapter.group is None:
            raise APIError(400, "the bare base has no trained classification head; name an adapter", param="model")
        return adapter

    def texts(self, value: str | list[str], param: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise APIError(400, f"{param} is an empty list", param=param)
        if len(texts) > self.limits.max_inputs:
            raise APIError(400, f"{param} has {len(texts)} texts; at most {self.limits.max_inputs} per request",
                           param=param)
        for i, text in enumerate(texts):
            where = param if isinstance(value, str) else f"{param}[{i}]"
            if not text.strip():
                raise APIError(400, f"{where} is empty", param=param)
            if len(text) > self.limits.max_input_chars:
                raise APIError(400, f"{where} has {len(text)} characters; at most {self.limits.max_input_chars}",
                               param=param)
        return texts

    def check_lengths(self, adapter: ServedAdapter, lengths: list[int], param: str, single: bool) -> None:
        for i, n in enumerate(lengths):
            if n > adapter.max_length:
                where = param if single else f"{param}[{i}]"
                raise APIError(400, f'{where} is {n} tokens; "{adapter.name}" takes at most {adapter.max_length}',
                               param=param, code="context_length_exceeded")

    def decoding(self, adapter: ServedAdapter, body: _Generation, prompt_lengths: list[int]):
        if (body.n or 1) != 1:
            raise APIError(400, "n must be 1 (one completion per prompt)", param="n")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if body.logprobs not in (None, False, 0) or body.echo:
            param = "logprobs" if body.logprobs not in (None, False, 0) else "echo"
            raise APIError(400, f"{param} is not supported", param=param)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0):
                raise APIError(400, f"{name} is not supported", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        overrides: dict[str, Any] = {}
        if asked is not None:
            if asked > self.limits.max_tokens:
                raise APIError(400, f"{param} is {asked}; this server generates at most {self.limits.max_tokens} "
                                    "tokens per request", param=param)
            overrides["max_new_tokens"] = asked
        if stop:
            overrides["stop"] = stop
        if body.temperature is not None:
            overrides["do_sample"] = body.temperature > 0
            if body.temperature > 0:
                overrides["temperature"] = float(body.temperature)
        if body.top_p is not None and body.temperature != 0:
            overrides.update(do_sample=True, top_p=float(body.top_p))
        config = adapter.source.config
        decoding = decoding_options(config, overrides)
        limit = min(decoding.max_new_tokens or adapter.data.target_max_length, self.limits.max_tokens)
        if not self.registry.encoder_decoder:
            positions = getattr(self.registry.base_model.config, "max_position_embeddings", None)
            if positions and max(prompt_lengths) + limit > positions:
                raise APIError(400, f"the prompt ({max(prompt_lengths)} tokens) and {param} ({limit}) exceed the "
                                    f"model's {positions} positions", param=param, code="context_length_exceeded")
        return decoding, limit

    def prompt_ids(self, adapter: ServedAdapter, texts: list[str]) -> list[list[int]]:
        """Completion prompts as ``peftlab predict --text`` reads them: through the adapter's prompt template."""
        task, tok = adapter.task, adapter.tokenizer
        if adapter.group is None:
            return task.prompt_ids(texts, tok, None)
        _, ids = task.prompts([{adapter.data.text_column: t} for t in texts], tok, adapter.data, None)
        return ids

    async def run(self, job: Job) -> list[Any]:
        try:
            future = self.batcher.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry shortly", "server_overloaded",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        return await future


def _now() -> int:
    return int(time.time())


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over a :class:`Server` (the batcher starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.stop()

    app = FastAPI(title="peftlab serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server
    registry, metrics = server.registry, server.metrics

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > server.limits.max_body_bytes):
            return _error(413, f"the request body is larger than {server.limits.max_body_bytes} bytes",
                          code="request_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        metrics.error(getattr(request.state, "adapter", None))
        return _error(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(PeftlabError)
    async def peftlab_error(request: Request, error: PeftlabError):
        return await api_error(request, _peftlab_error(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # a union's branch names ("str", "list[str]") say nothing to a client
        loc = [p for p in loc if not _TYPE_NAME.fullmatch(p)]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        elif first.get("type") == "missing":
            message = f"missing required field: {param}"
        elif first.get("type") == "model_attributes_type" or (not loc and first.get("type", "").endswith("_type")):
            message = "the body must be a JSON object"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
            if "input" in first and first.get("type", "").endswith("_type"):
                message += f" (got {type(first['input']).__name__})"
        return await api_error(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(error.status_code, "invalid_request_error")
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(error.status_code,
                                                                                       str(error.detail))
        return _error(error.status_code, message, kind, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error")
        metrics.error(getattr(request.state, "adapter", None))
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    # --- pages and status ---------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((resources.files("peftlab.serving") / "page.html").read_text())

    @app.get("/health")
    async def health():
        alive = server.batcher.alive
        body = {"status": "ok" if alive else "worker stopped", "base": registry.model_config.name,
                "task": registry.task.name, "adapters": list(registry.adapters),
                "queue_depth": server.batcher.depth()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.prometheus(server.batcher.depth()))

    @app.get("/v1/metrics")
    async def metrics_json():
        return metrics.snapshot(server.batcher.depth())

    @app.get("/v1/models")
    async def models():
        created = int(metrics.started)
        entries = [{"id": "base", "object": "model", "created": created, "owned_by": "peftlab",
                    "root": registry.model_config.name, "parent": None, **registry.base.describe()}]
        for name, adapter in list(registry.adapters.items()):
            entries.append({"id": name, "object": "model", "created": created, "owned_by": "peftlab",
                            "root": registry.model_config.name, "parent": "base", **adapter.describe()})
        return {"object": "list", "data": entries}

    # --- adapters at run time -----------------------------------------------------------------

    @app.post("/v1/adapters")
    async def load(body: AdapterRequest):
        path = registry.resolve_path(body.path)
        job = Job(kind="control", call=lambda: registry.add(body.name, path))
        adapter = await server.run(job)
        return JSONResponse({"id": adapter.name, "object": "model", "root": registry.model_config.name,
                             "parent": "base", **adapter.describe()}, status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        if name not in registry.adapters:
            raise APIError(404, f'no adapter named "{name}"', "not_found_error", param="name",
                           code="adapter_not_found")
        await server.run(Job(kind="control", call=lambda: registry.remove(name)))
        return {"id": name, "object": "model", "deleted": True}

    # --- classification ----------------------------------------------------------------------

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        start = time.perf_counter()
        adapter = server.adapter(body.model, "classify")
        request.state.adapter = adapter.name
        texts = server.texts(body.input, "input")
        pairs = server.texts(body.input_pair, "input_pair") if body.input_pair is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise APIError(400, f"{len(texts)} inputs but {len(pairs)} input_pair texts", param="input_pair")
        if adapter.data.text_pair_column and pairs is None:
            raise APIError(400, f'"{adapter.name}" classifies text pairs: give input_pair', param="input_pair")
        if pairs is not None and not adapter.data.text_pair_column:
            raise APIError(400, f'"{adapter.name}" classifies single texts: drop input_pair', param="input_pair")
        features = adapter.task.encode_rows(adapter.tokenizer, texts, pairs, None)
        lengths = [len(f["input_ids"]) for f in features]
        server.check_lengths(adapter, lengths, "input", isinstance(body.input, str))
        records = await server.run(Job(kind="classify", adapter=adapter, items=features, texts=texts, pairs=pairs))
        data = []
        for i, record in enumerate(records):
            entry = {"index": i, **{k: v for k, v in record.items() if k not in ("text", "text_pair")}}
            data.append(entry)
        metrics.request(adapter.name, time.perf_counter() - start, sum(lengths))
        return {"object": "list", "model": adapter.name, "data": data,
                "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}}

    # --- completions ------------------------------------------------------------------------

    async def complete(body: _Generation, request: Request, chat: bool):
        start = time.perf_counter()
        adapter = server.adapter(body.model, "chat" if chat else "completion")
        request.state.adapter = adapter.name
        if chat:
            history = [m.model_dump() for m in body.messages]
            if history[-1]["role"] == "assistant":
                raise APIError(400, "the last message is the assistant's; end with a user message", param="messages")
            for i, message in enumerate(history):
                if len(message["content"]) > server.limits.max_input_chars:
                    raise APIError(400, f"messages[{i}].content has {len(message['content'])} characters; at most "
                                        f"{server.limits.max_input_chars}", param="messages")
            if not any(m["content"].strip() for m in history):
                raise APIError(400, "the messages are empty", param="messages")
            texts = [adapter.task.chat_text(history, adapter.tokenizer)]
            ids = adapter.task.prompt_ids(texts, adapter.tokenizer, None)
            single = True
        else:
            texts = server.texts(body.prompt, "prompt")
            ids = server.prompt_ids(adapter, texts)
            single = isinstance(body.prompt, str)
        server.check_lengths(adapter, [len(i) for i in ids], "messages" if chat else "prompt", single)
        decoding, limit = server.decoding(adapter, body, [len(i) for i in ids])
        prompt_tokens = sum(len(i) for i in ids)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            if len(ids) != 1:
                raise APIError(400, "stream takes a single prompt", param="stream")
            return await stream(adapter, ids, texts, decoding, limit, chat, ident, prompt_tokens, start,
                                bool((body.stream_options or {}).get("include_usage")))
        results = await server.run(Job(kind="generate", adapter=adapter, items=ids, texts=texts, decoding=decoding,
                                       limits=[limit] * len(ids)))
        completion_tokens = sum(r["tokens"] for r in results)
        metrics.request(adapter.name, time.perf_counter() - start, prompt_tokens, completion_tokens)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                        "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
        else:
            choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                       for i, r in enumerate(results)]
        return {"id": ident, "object": kind, "created": _now(), "model": adapter.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def stream(adapter, ids, texts, decoding, limit, chat, ident, prompt_tokens, start, include_usage):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        done = object()
        job = Job(kind="generate", adapter=adapter, items=ids, texts=texts, decoding=decoding, limits=[limit],
                  stream=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        try:
            future = server.batcher.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry shortly", "server_overloaded",
                           headers={"Retry-After": str(server.limits.retry_after_s)}) from None
        future.add_done_callback(lambda _: pieces.put_nowait(done))
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = _now()

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = {"id": ident, "object": kind, "created": created, "model": adapter.name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            if chat:
                yield chunk("", role=True)
            while True:
                piece = await pieces.get()
                if piece is done:
                    break
                yield chunk(piece)
            try:
                result = future.result()[0]
            except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
                message = error.message if isinstance(error, PeftlabError) else f"{type(error).__name__}: {error}"
                metrics.error(adapter.name)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk(None if chat else "", result["finish_reason"])
            metrics.request(adapter.name, time.perf_counter() - start, prompt_tokens, result["tokens"])
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": result["tokens"],
                         "total_tokens": prompt_tokens + result["tokens"]}
                body = {"id": ident, "object": kind, "created": created, "model": adapter.name, "choices": [],
                        "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await complete(body, request, chat=True)

    return app
