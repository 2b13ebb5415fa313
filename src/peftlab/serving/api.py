"""The HTTP API (FastAPI): OpenAI-compatible completions, classification, adapters at run time.

Errors are ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with a 4xx
status for anything a client can cause; a full queue is 503 with ``Retry-After``. With an API
key, every ``/v1/*`` route needs ``Authorization: Bearer KEY`` (401 ``invalid_api_key``); bodies
are read against the byte limit as they arrive, then parsed, validated and tokenized off the
event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import struct
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftlab.errors import ConfigError, PeftlabError
from peftlab.inference import decoding_options
from peftlab.serving.batcher import Batcher, Job, QueueFull, ShuttingDown
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import (AdapterCapacity, AdapterConflict, AdapterForbidden, AdapterNotFound, Registry,
                                      ServedAdapter)

log = logging.getLogger("peftlab.serve")
_TYPE_NAME = re.compile(r"(str|int|float|bool|none|(list|dict|tuple)\[.*\]|(function|constrained)-.*)")
Number = Union[StrictFloat, StrictInt]


COMPLETION_TOKENS = 16  # /v1/completions without max_tokens on the bare base or a plain-peft adapter (OpenAI)


@dataclass
class Limits:
    max_tokens: int = 256  # new tokens one request may ask for
    max_input_chars: int = 20_000  # per text, and across a chat's messages, checked before tokenizing
    max_inputs: int = 64  # texts per request (classification inputs, completion prompts)
    max_input_tokens: int | None = None  # caps every model's input; None: what the model takes (its positions)
    max_messages: int = 256  # chat messages per request
    max_body_bytes: int = 4 * 1024 * 1024  # 413 as soon as a body passes this (declared or as it arrives)
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
    if isinstance(error, AdapterCapacity):
        return APIError(503, message, "server_overloaded", code="adapter_capacity", headers={"Retry-After": "1"})
    return APIError(400, message)


def _invalid(problems: list[dict[str, Any]]) -> APIError:
    """pydantic's (or FastAPI's) validation errors as one 400 that names the field."""
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union's branch names ("str", "list[str]") say nothing to a client
    loc = [p for p in loc if not _TYPE_NAME.fullmatch(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None
    elif first.get("type") == "missing" and param is None:
        message = "the request body is empty; send a JSON object"
    elif first.get("type") == "missing":
        message = f"missing required field: {param}"
    elif first.get("type") in ("model_attributes_type", "model_type") or (
            not loc and first.get("type", "").endswith("_type")):
        message = "the body must be a JSON object"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if "input" in first and first.get("type", "").endswith("_type"):
            message += f" (got {type(first['input']).__name__})"
    return APIError(400, message, param=param)


def _lone_surrogate(data: Any) -> tuple[str, str] | None:
    """Where a parsed JSON body holds a string with a lone UTF-16 surrogate (JSON's "\\ud800"): (field, top-level
    key), or None. Such a string is no text: UTF-8 cannot encode it and the tokenizers fail on it."""
    stack: list[tuple[Any, str, str]] = [(data, "", "")]
    while stack:
        value, where, top = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the body", top or where
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _lone_surrogate(key) is not None:
                    return f"a field name in {where or 'the body'}", top or where
                path = f"{where}.{key}" if where else str(key)
                stack.append((item, path, top or str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", top) for i, item in enumerate(value))
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def public_name(name: str) -> str:
    """The base model's name as clients see it: a Hub id (or an ``offline:`` alias) as given, a local folder by its
    last component only (no file-system paths in answers)."""
    if name.startswith("offline:"):
        return name
    local = Path(name).expanduser()
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if local.exists() or looks_like_path or not _HUB_ID.fullmatch(name):
        return local.resolve().name or name
    return name


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A request model's JSON schema with its ``$defs`` inlined (for the OpenAPI page, when it is on)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _body_of(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (off the event loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(model)}}}}


class _BodyTooLarge(Exception):
    """Raised from ``receive`` when the bytes that arrived pass the body limit (the guard answers 413)."""


class _Guard:
    """ASGI middleware in front of the app: the API key on ``/v1/*`` and the body limit.

    The limit holds for a declared ``Content-Length`` and for the bytes that actually arrive (a
    chunked body has no length): past it, reading stops and the answer is 413 at once; the rest
    of the body is never buffered (the HTTP server drops what still comes).
    """

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, headers = self.server, Headers(scope=scope)
        path = scope.get("path", "")
        if path == "/v1" or path.startswith("/v1/"):
            problem = server.key_problem(headers.get("authorization"))
            if problem:
                response = _error(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        limit = server.limits.max_body_bytes
        too_large = _error(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large(scope, receive, send)
        received, refused, started = 0, False, False

        async def counted():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _BodyTooLarge
            return message

        async def sending(message):
            nonlocal started
            if refused:
                return  # the app's own answer to a cut body: the 413 goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge:
            pass
        if refused and not started:
            await too_large(scope, receive, send)


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


class EmbeddingRequest(_Request):
    model: StrictStr
    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # OpenAI's option: refused (the model's width is fixed)
    user: StrictStr | None = None


class AdapterRequest(_Request):
    name: StrictStr
    path: StrictStr


# --- the server -----------------------------------------------------------------------------

def check_api_key(api_key: str | None) -> None:
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ConfigError("the API key is empty", "give --api-key (or PEFTLAB_API_KEY) a value, or leave it out")


class Server:
    """The registry, the batcher and the counters behind one app."""

    def __init__(self, registry: Registry, *, limits: Limits | None = None, max_batch: int = 16,
                 max_wait_ms: float = 5.0, queue_size: int = 64, api_key: str | None = None,
                 enable_docs: bool = False):
        check_api_key(api_key)
        self.registry = registry
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.batcher = Batcher(registry, self.metrics, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               queue_size=queue_size)
        self._key = api_key.encode() if api_key is not None else None  # never logged nor answered
        self.enable_docs = enable_docs
        self._tokenizing = threading.Lock()  # one request thread at a time in the (shared) tokenizers, as before
        self._reloading: dict[str, asyncio.Future] = {}  # evicted adapters being loaded again, by name

    def key_problem(self, authorization: str | None) -> str | None:
        """Why a request's ``Authorization`` header does not open ``/v1/*`` (None: it does, or no key is set)."""
        if self._key is None:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ("missing API key: send it in the header Authorization: Bearer YOUR_KEY (the key this server "
                    "was started with)")
        # header values arrive as latin-1 text: back to the client's bytes (a UTF-8 key compares as UTF-8)
        if not hmac.compare_digest(token.strip().encode("latin-1", "replace"), self._key):
            return "invalid API key"
        return None

    # the body, read and checked off the event loop

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's JSON body as ``model``: read here, parsed and validated in a worker thread."""
        raw = await request.body()  # counted against the body limit as it arrives (_Guard)
        return await run_in_threadpool(self.validate, raw, model)

    def validate(self, raw: bytes, model: type[BaseModel]) -> Any:
        if not raw.strip():
            raise APIError(400, "the request body is empty; send a JSON object")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, bytes that are not UTF-8, nesting too deep
            raise APIError(400, "the body is not valid JSON") from None
        bad = _lone_surrogate(data)
        if bad is not None:
            raise APIError(400, f"{bad[0]} is not valid text: it holds a lone UTF-16 surrogate (such as \\ud800)",
                           param=bad[1] or None)
        messages = data.get("messages") if isinstance(data, dict) and model is ChatRequest else None
        if isinstance(messages, list) and len(messages) > self.limits.max_messages:
            raise APIError(400, f"messages has {len(messages)} messages; at most {self.limits.max_messages} per "
                                "request", param="messages")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise _invalid(error.errors(include_url=False)) from None

    # validation shared by the endpoints

    def adapter(self, name: str, family: str) -> ServedAdapter:
        adapter = self.registry.get(name)
        if adapter is None:
            known = ", ".join(self.registry.names())
            raise APIError(404, f'the model "{name}" does not exist; served: {known}', param="model",
                           code="model_not_found")
        task = adapter.task  # what it answers is declared by its family (tasks.base.ServingTask)
        own = ("/v1/classify" if task.classifies else "/v1/embeddings" if task.embeds else "/v1/completions")
        answers = {"classify": task.classifies, "embed": task.embeds}.get(family, task.generates)
        if not answers:
            raise APIError(400, f'"{name}" is a {task.name} model: use {own}', param="model")
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

    def input_limit(self, adapter: ServedAdapter) -> int:
        """Longest input in tokens: what the model takes (less any virtual tokens), capped by --max-input-tokens."""
        cap = self.limits.max_input_tokens
        return adapter.max_length if cap is None else min(adapter.max_length, cap)

    def check_lengths(self, adapter: ServedAdapter, lengths: list[int], param: str, single: bool) -> None:
        limit = self.input_limit(adapter)
        for i, n in enumerate(lengths):
            if n > limit:
                where = param if single else f"{param}[{i}]"
                raise APIError(400, f'{where} is {n} tokens; "{adapter.name}" takes at most {limit}',
                               param=param, code="context_length_exceeded")

    def decoding(self, adapter: ServedAdapter, body: _Generation, prompt_lengths: list[int], chat: bool = False):
        """The decoding options and the new-token limit of a request.

        Without ``max_tokens``: an adapter trained by peftlab generates what ``peftlab predict`` generates (its
        recipe's ``generation.max_new_tokens``, else ``data.target_max_length``); the bare base and plain-peft
        adapters follow OpenAI: 16 tokens for /v1/completions (the legacy default), the rest of the context for
        /v1/chat/completions. Always at most ``--max-tokens``.
        """
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
        positions = None
        if not self.registry.encoder_decoder:
            positions = getattr(self.registry.base_model.config, "max_position_embeddings", None)
        room = positions - adapter.virtual_tokens if positions else None  # virtual tokens take positions too
        longest = max(prompt_lengths)
        if asked is not None:
            limit = asked
        elif config is not None:  # a peftlab run: what `peftlab predict` generates (the recipe's budget)
            limit = min(decoding.max_new_tokens or adapter.data.target_max_length, self.limits.max_tokens)
        else:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            limit = self.limits.max_tokens if chat else min(COMPLETION_TOKENS, self.limits.max_tokens)
        if asked is None and room:  # a default never overflows the context: it takes what is left
            limit = min(limit, room - longest)
            if limit < 1:
                what = "messages" if chat else "prompt"
                raise APIError(400, f"the {what} ({longest} tokens) leave no room for new tokens in the model's "
                                    f"{positions} positions", param=what, code="context_length_exceeded")
        if room and longest + limit > room:
            taken = f" ({adapter.virtual_tokens} taken by the adapter's virtual tokens)" if adapter.virtual_tokens else ""
            raise APIError(400, f"the prompt ({longest} tokens) and {param} ({limit}) exceed the "
                                f"model's {positions} positions{taken}", param=param, code="context_length_exceeded")
        return decoding, limit

    def tokenized(self, call, *args):
        """``call(*args)`` under the tokenizing lock (request threads; see ``_tokenizing``)."""
        with self._tokenizing:
            return call(*args)

    def chat_ids(self, adapter: ServedAdapter, history: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
        """A conversation rendered by the chat template, and its token ids."""
        texts = [adapter.task.chat_text(history, adapter.tokenizer)]
        return texts, adapter.task.prompt_ids(texts, adapter.tokenizer, None)

    def prompt_ids(self, adapter: ServedAdapter, texts: list[str]) -> list[list[int]]:
        """Completion prompts as ``peftlab predict --text`` reads them: through the adapter's prompt template."""
        task, tok = adapter.task, adapter.tokenizer
        if adapter.group is None:
            return task.prompt_ids(texts, tok, None)
        _, ids = task.prompts([{adapter.data.text_column: t} for t in texts], tok, adapter.data, None)
        return ids

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job (503 when the queue is full or the server is shutting down)."""
        try:
            return self.batcher.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry shortly", "server_overloaded",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", "server_overloaded") from None

    async def run(self, job: Job, request: Request | None = None) -> list[Any]:
        """Run a job and wait for its result; a client that disconnects meanwhile cancels it."""
        return await self.wait(job, self.submit(job), request)

    async def wait(self, job: Job, future: asyncio.Future, request: Request | None, until=None) -> Any:
        """Wait for ``until`` (default: the job's future), cancelling the job if the client goes away."""
        until = until or future
        try:
            while True:
                done, _ = await asyncio.wait({until}, timeout=0.25 if request is not None else None)
                if done:
                    break
                if await request.is_disconnected():
                    self.batcher.cancel(job)
                    raise APIError(499, "the client disconnected", "client_closed_request")
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        if until is future:
            return self.result(future)
        return until.result()

    @staticmethod
    def result(future: asyncio.Future) -> Any:
        try:
            return future.result()
        except ShuttingDown as error:
            raise APIError(503, f"{error}", "server_overloaded") from None

    async def load(self, name: str, path: Path) -> ServedAdapter:
        """Load an adapter at run time: files read and a new group built off the worker, installed on it."""
        prepared = await run_in_threadpool(self.registry.prepare, name, path, runtime=True)
        return await self.run(Job(kind="control", call=lambda: self.registry.install(prepared)))

    async def served(self, name: str, family: str) -> ServedAdapter:
        """The adapter a request names, loaded again first when the adapter cap evicted it."""
        path = self.registry.registered(name)
        if path is not None and self.registry.get(name) is None:
            reload = self._reloading.get(name)
            if reload is None:
                reload = self._reloading[name] = asyncio.ensure_future(self.load(name, path))
                reload.add_done_callback(lambda _: self._reloading.pop(name, None))
            try:
                await asyncio.shield(reload)
            except AdapterConflict:  # loaded meanwhile by someone else's request
                pass
        self.registry.touch(name)
        return self.adapter(name, family)


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
            await run_in_threadpool(server.batcher.stop)  # joins the worker: not on the event loop

    docs = server.enable_docs  # /docs and /openapi.json only when asked for (--enable-docs)
    app = FastAPI(title="peftlab serve", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.server = server
    app.add_middleware(_Guard, server=server)  # the API key on /v1/*, the body limit on the bytes that arrive
    registry, metrics = server.registry, server.metrics
    base_name = public_name(registry.model_config.name)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        metrics.error(getattr(request.state, "adapter", None))
        return _error(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(PeftlabError)
    async def peftlab_error(request: Request, error: PeftlabError):
        return await api_error(request, _peftlab_error(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return await api_error(request, _invalid(list(error.errors())))

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
        state = "ok" if alive else "shutting down" if server.batcher.draining else "worker stopped"
        body = {"status": state, "base": base_name,
                "task": registry.task.name, "adapters": list(registry.adapters),
                "queue_depth": server.batcher.depth()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.prometheus(server.batcher.depth(), server.batcher.running()))

    @app.get("/v1/metrics")
    async def metrics_json():
        return metrics.snapshot(server.batcher.depth(), server.batcher.running())

    @app.get("/v1/models")
    async def models():
        created = int(metrics.started)
        entries = [{"id": "base", "object": "model", "created": created, "owned_by": "peftlab",
                    "root": base_name, "parent": None, **registry.base.describe(), "loaded": True}]
        for name, adapter in list(registry.adapters.items()):
            entries.append({"id": name, "object": "model", "created": created, "owned_by": "peftlab",
                            "root": base_name, "parent": "base", **adapter.describe(), "loaded": True})
        for name in list(registry.evicted):  # evicted by --max-adapters: loaded again on their next request
            entries.append({"id": name, "object": "model", "created": created, "owned_by": "peftlab",
                            "root": base_name, "parent": "base", "loaded": False})
        return {"object": "list", "data": entries}

    # --- adapters at run time -----------------------------------------------------------------

    @app.post("/v1/adapters", openapi_extra=_body_of(AdapterRequest))
    async def load(request: Request):
        body = await server.parse(request, AdapterRequest)
        path = registry.resolve_path(body.path)
        adapter = await server.load(body.name, path)
        return JSONResponse({"id": adapter.name, "object": "model", "root": base_name,
                             "parent": "base", **adapter.describe()}, status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        if name not in registry.adapters and registry.registered(name) is None:
            raise APIError(404, f'no adapter named "{name}"', "not_found_error", param="name",
                           code="adapter_not_found")
        await server.run(Job(kind="control", call=lambda: registry.remove(name)))
        return {"id": name, "object": "model", "deleted": True}

    # --- one forward pass per row: classification (labels, tags, answers) and embeddings ---------------------

    async def one_pass(request: Request, adapter, texts: list[str], pairs: list[str] | None, single: bool):
        """Encode the rows as the adapter's family does, check their lengths, and run them through the batcher
        (rows of other requests and adapters may share the pass); the records and the rows' token counts."""
        features = await run_in_threadpool(server.tokenized, adapter.task.encode_rows, adapter.tokenizer, texts, pairs,
                                           None)
        lengths = [len(f["input_ids"]) for f in features]
        server.check_lengths(adapter, lengths, "input", single)
        records = await server.run(Job(kind="classify", adapter=adapter, items=features, texts=texts, pairs=pairs),
                                   request)
        return records, lengths

    @app.post("/v1/classify", openapi_extra=_body_of(ClassifyRequest))
    async def classify(request: Request):
        start = time.perf_counter()
        body = await server.parse(request, ClassifyRequest)
        adapter = await server.served(body.model, "classify")
        request.state.adapter = adapter.name
        texts = server.texts(body.input, "input")
        pairs = server.texts(body.input_pair, "input_pair") if body.input_pair is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise APIError(400, f"{len(texts)} inputs but {len(pairs)} input_pair texts", param="input_pair")
        wants_pairs = adapter.task.needs_pairs(adapter.data)
        if wants_pairs and pairs is None:
            raise APIError(400, f'"{adapter.name}" classifies text pairs: give input_pair', param="input_pair")
        if pairs is not None and not adapter.task.accepts_pairs(adapter.data):
            raise APIError(400, f'"{adapter.name}" classifies single texts: drop input_pair', param="input_pair")
        records, lengths = await one_pass(request, adapter, texts, pairs, isinstance(body.input, str))
        data = []
        for i, record in enumerate(records):
            entry = {"index": i, **{k: v for k, v in record.items() if k not in ("text", "text_pair")}}
            data.append(entry)
        metrics.request(adapter.name, time.perf_counter() - start, sum(lengths))
        return {"object": "list", "model": adapter.name, "data": data,
                "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}}

    # --- embeddings (OpenAI's /v1/embeddings) --------------------------------------------------

    @app.post("/v1/embeddings", openapi_extra=_body_of(EmbeddingRequest))
    async def embeddings(request: Request):
        start = time.perf_counter()
        body = await server.parse(request, EmbeddingRequest)
        adapter = await server.served(body.model, "embed")
        request.state.adapter = adapter.name
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported: the vectors have the model's own width",
                           param="dimensions")
        texts = server.texts(body.input, "input")
        records, lengths = await one_pass(request, adapter, texts, None, isinstance(body.input, str))
        data = []
        for i, record in enumerate(records):
            vector = record["embedding"]
            if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        metrics.request(adapter.name, time.perf_counter() - start, sum(lengths))
        return {"object": "list", "model": adapter.name, "data": data,
                "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}}

    # --- completions ------------------------------------------------------------------------

    async def complete(request: Request, chat: bool):
        start = time.perf_counter()
        body = await server.parse(request, ChatRequest if chat else CompletionRequest)
        adapter = await server.served(body.model, "chat" if chat else "completion")
        request.state.adapter = adapter.name
        if chat:
            history = [m.model_dump() for m in body.messages]
            if history[-1]["role"] == "assistant":
                raise APIError(400, "the last message is the assistant's; end with a user message", param="messages")
            most = server.limits.max_input_chars
            for i, message in enumerate(history):
                if len(message["content"]) > most:
                    raise APIError(400, f"messages[{i}].content has {len(message['content'])} characters; at most "
                                        f"{most}", param="messages")
            total = sum(len(m["content"]) for m in history)
            if total > most:
                raise APIError(400, f"the messages have {total} characters in all; at most {most}", param="messages")
            if not any(m["content"].strip() for m in history):
                raise APIError(400, "the messages are empty", param="messages")
            texts, ids = await run_in_threadpool(server.tokenized, server.chat_ids, adapter, history)
            single = True
        else:
            texts = server.texts(body.prompt, "prompt")
            ids = await run_in_threadpool(server.tokenized, server.prompt_ids, adapter, texts)
            single = isinstance(body.prompt, str)
        server.check_lengths(adapter, [len(i) for i in ids], "messages" if chat else "prompt", single)
        decoding, limit = server.decoding(adapter, body, [len(i) for i in ids], chat)
        prompt_tokens = sum(len(i) for i in ids)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            if len(ids) != 1:
                raise APIError(400, "stream takes a single prompt", param="stream")
            return await stream(request, adapter, ids, texts, decoding, limit, chat, ident, prompt_tokens, start,
                                bool((body.stream_options or {}).get("include_usage")))
        results = await server.run(Job(kind="generate", adapter=adapter, items=ids, texts=texts, decoding=decoding,
                                       limits=[limit] * len(ids)), request)
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

    async def stream(request, adapter, ids, texts, decoding, limit, chat, ident, prompt_tokens, start,
                     include_usage):
        """Server-Sent Events. The response starts once the request's row is generating: until then a
        failure (adapter deleted meanwhile, shutdown, full queue) is an HTTP error like any request's."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        done = object()
        begun = loop.create_future()

        def on_start() -> None:
            loop.call_soon_threadsafe(lambda: begun.done() or begun.set_result(True))

        job = Job(kind="generate", adapter=adapter, items=ids, texts=texts, decoding=decoding, limits=[limit],
                  stream=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece), on_start=on_start)
        future = server.submit(job)
        future.add_done_callback(lambda _: pieces.put_nowait(done))
        future.add_done_callback(lambda _: begun.done() or begun.set_result(False))
        if not await server.wait(job, future, request, until=begun):
            server.result(future)  # failed before it began: raised as that request's error
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
            try:
                if chat:
                    yield chunk("", role=True)
                while True:
                    piece = await pieces.get()
                    if piece is done:
                        break
                    yield chunk(piece)
            finally:  # the client went away (the generator is closed): drop its row at the next step
                if not future.done():
                    server.batcher.cancel(job)
            try:
                result = future.result()[0]
            except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
                message = error.message if isinstance(error, PeftlabError) else f"{error}" or type(error).__name__
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

    @app.post("/v1/completions", openapi_extra=_body_of(CompletionRequest))
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_of(ChatRequest))
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app
