"""The HTTP side of `deltatune serve`: OpenAI's routes on FastAPI, answered by the engine (engine.py).

    GET  /v1/models                 the base model ("base") and every served adapter
    POST /v1/completions            raw text prompts (one row each), as `generate --plain` sends them
    POST /v1/chat/completions       messages, rendered in each adapter's recorded prompt format
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: checked, then loaded (vLLM's route and body)
    POST /v1/unload_lora_adapter    {"lora_name"}
    GET  /stats                     the engine's counters (batches, rows per batch, mixed batches)
    GET  /health                    200 while the server runs

Every refusal is a JSON error in OpenAI's shape naming the field at fault (schemas.ApiError); the body is
read by hand so a malformed or oversized one is refused the same way, before any work. Streaming answers
are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError

from ..errors import DeltaError
from .adapters import BASE_MODEL
from .engine import AdapterNotFound, Engine, QueueFull
from .engine import Request as EngineRequest
from .rows import RowResult, RowSpec
from .schemas import (
    COMPLETION_MAX_TOKENS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    validation_error,
)

MAX_BODY_BYTES = 1 << 20


async def read_body(request: Request, schema, limit: int):
    """The request's JSON body as `schema`. Raises ApiError: 413 over `limit` bytes (read no further), 400
    for malformed JSON or a bad field (named)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes", "body")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", "body")
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON body: {err}", "body") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(parsed).__name__}", "body")
    try:
        return schema.model_validate(parsed)
    except ValidationError as err:
        raise validation_error(err) from None


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               chat_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving `engine` (its worker runs while the app does).

    Args:
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>` (else 401).
        max_body_bytes: larger bodies are refused with 413.
        chat_max_tokens: a chat request's max_tokens when it gives none (cut to the context left).
    """
    tokenizer = copy.deepcopy(engine.tokenizer)  # the worker's own is busy decoding on another thread

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers={"Retry-After": "1"} if err.status == 503
                            else None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # a bug answers 500; the server keeps serving
        return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}").body(), status_code=500)

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/stats")
    async def stats():
        return {"stats": dict(engine.stats), "batch_sizes": {str(k): v for k, v in sorted(engine.batch_sizes.items())},
                "queued": engine.queued, "adapters": sorted(engine.adapters)}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": a.name, "object": "model", "created": created, "owned_by": "deltatune", "root": a.path,
             "parent": None if a.name == BASE_MODEL else BASE_MODEL, "method": a.method}
            for a in engine.adapters.values()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest, max_body_bytes)
        adapter = _served(engine, body.model)
        return await _answer(engine, tokenizer, body, adapter.name, body.prompt, "prompt", COMPLETION_MAX_TOKENS,
                             chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest, max_body_bytes)
        adapter = _served(engine, body.model)
        try:
            prompt = adapter.render(tokenizer, [m.as_dict() for m in body.messages])
        except TemplateError as err:  # the chat template refuses these messages (e.g. roles out of order)
            raise ApiError(400, f"messages: the chat template refuses them: {err}", "messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _answer(engine, tokenizer, body, adapter.name, [prompt], "messages", chat_max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await read_body(request, LoadLoraRequest, max_body_bytes)
        try:
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        except DeltaError as err:
            raise ApiError(400, str(err), "lora_name" if str(err).startswith("lora_name") else "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await read_body(request, UnloadLoraRequest, max_body_bytes)
        try:
            await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except AdapterNotFound as err:
            raise ApiError(404, str(err), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _served(engine: Engine, name: str):
    try:
        return engine.adapter(name)
    except AdapterNotFound as err:
        raise ApiError(404, f"The model `{name}` does not exist: {err}", "model", "model_not_found") from None


async def _answer(engine: Engine, tokenizer, body, adapter: str, prompts: list[str], prompt_field: str,
                  default_max_tokens: int, chat: bool):
    """Check the rows against the context, queue them, and answer (streamed or whole)."""
    if len(prompts) > engine.max_batch:
        raise ApiError(400, f"{prompt_field}: {len(prompts)} prompts; at most {engine.max_batch} per request",
                       prompt_field)
    counts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    room = engine.room(adapter)
    max_tokens = body.max_tokens or default_max_tokens
    if room is not None:
        left = room - max(counts)
        if left < 1:
            raise ApiError(400, f"{prompt_field}: {max(counts)} tokens leave no room in the context of {room}",
                           prompt_field)
        if body.max_tokens is not None and body.max_tokens > left:
            raise ApiError(400, f"max_tokens={body.max_tokens} with a prompt of {max(counts)} tokens is over the "
                           f"context of {room} tokens (at most {left})", "max_tokens")
        max_tokens = min(max_tokens, left)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    gone = [False]  # the client went away: its rows stop early
    temperature, top_p = body.sampling()

    def emitter(index: int):
        return lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

    specs = [RowSpec(max_tokens, tuple(body.stop or ()), temperature, top_p, body.seed, emitter(i), lambda: gone[0])
             for i in range(len(prompts))]
    key = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        engine.submit(EngineRequest(key, adapter, prompts, specs))
    except QueueFull as err:
        raise ApiError(503, f"the server is busy: {err}") from None
    shape = _Shape(key, body.model, chat, sum(counts))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(shape, events, len(prompts), gone, usage), media_type="text/event-stream")
    results: dict[int, RowResult] = {}
    while len(results) < len(prompts):
        index, kind, value = await events.get()
        if kind == "error":
            raise ApiError(*value)
        if kind == "done":
            results[index] = value
    return shape.whole([results[i] for i in range(len(prompts))])


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, key: str, model: str, chat: bool, prompt_tokens: int) -> None:
        self.key, self.model, self.chat, self.prompt_tokens = key, model, chat, prompt_tokens
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.key, "object": kind, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, results: list[RowResult]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(results)]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage(sum(r.completion_tokens for r in results))}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return _event({**head, "choices": [choice]})


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(shape: _Shape, events: asyncio.Queue, rows: int, gone: list[bool], usage: bool):
    open_rows, completion_tokens = set(range(rows)), 0
    try:
        if shape.chat:
            for index in range(rows):
                yield shape.chunk(index, "", role=True)
        while open_rows:
            index, kind, value = await events.get()
            if kind == "delta":
                yield shape.chunk(index, value)
            elif kind == "done":
                open_rows.discard(index)
                completion_tokens += value.completion_tokens
                yield shape.chunk(index, None if shape.chat else "", value.finish_reason)
            else:  # an error after the 200 went out: OpenAI's error object as an event
                yield _event(ApiError(*value).body())
                return
        if usage:
            yield _event({**shape._head("chat.completion.chunk" if shape.chat else "text_completion"),
                          "choices": [], "usage": shape.usage(completion_tokens)})
        yield _event("[DONE]")
    finally:
        gone[0] = bool(open_rows)  # closed before the end: stop decoding its rows
