"""``python -m runtime serve``: an OpenAI-compatible HTTP server with continuous batching.

FastAPI + uvicorn.  Requests are pydantic models (validation and the OpenAPI page at
``/docs`` come from them); every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` with its status (400 bad field or
prompt too long, 401 key, 404 route, 413 body, 503 queue full), never a traceback.

The model belongs to one ``scheduler.Scheduler`` thread; handlers tokenize (in the
thread pool), submit, and read the request's events from an asyncio queue that the
scheduler feeds through ``loop.call_soon_threadsafe``.  A client that goes away (a
stream cancelled by Starlette, or a non-streaming request found disconnected) cancels
its request, which frees its slot at the next step.

Routes: ``GET /`` (the web chat page, ``webchat.html``), ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``
(and ``/v1/models/{id}``), llama-server's ``GET /health``, ``POST /tokenize``,
``POST /detokenize``, ``GET /props`` and ``GET /metrics`` (Prometheus text).  The
``/v1`` routes are also served without the prefix, as llama-server does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .reasoning import ReasoningSplitter, starts_thinking
from .sampling import SamplerParams
from .scheduler import (Delta, Failed, Finished, GenerationRequest, PromptTooLongError,
                        QueueFullError, Scheduler, SchedulerStopped)

__all__ = ["ServerSettings", "create_app", "cli_serve", "APIError", "ReasoningSplitter"]

MAX_BODY_BYTES = 8 * 1024 * 1024   # larger bodies get 413 before any parsing
DRAIN_BYTES = 64 * 1024 * 1024     # an oversized body is read and dropped up to this, then cut off
# the web chat page holds no data (its requests carry the key the user types)
PUBLIC_PATHS = {"/", "/health", "/v1/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
WEBCHAT_PAGE = Path(__file__).with_name("webchat.html")


# ---------------------------------------------------------------- settings

@dataclass
class ServerSettings:
    model_alias: str                        # the id /v1/models reports
    n_slots: int
    n_ctx_slot: int
    api_key: str | None = None
    max_queue: int = 64
    max_body: int = MAX_BODY_BYTES
    system: str | None = None               # system prompt for chats that bring none
    defaults: SamplerParams = field(default_factory=SamplerParams)  # for absent fields
    reasoning_format: str = "deepseek"      # "none": <think> blocks stay in the content
    created: int = 0


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(status: int, message: str, type: str = "invalid_request_error",
                    param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(_error_body(message, type, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming each bad field (without pydantic's 'body' prefix or doc URLs)."""
    parts, first = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        first = first or where or None
        msg = e.get("msg", "invalid value")
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx", {}).get("error", "")
            parts.append(f"the body is not valid JSON ({ctx})" if ctx else "the body is not valid JSON")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        elif where:
            parts.append(f"{where}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts) or "invalid request", first


# ---------------------------------------------------------------- request models

class _Strict(BaseModel):
    # Unknown fields are refused (a typo must not be silently ignored) and NaN or
    # infinity are refused in every float (json.loads accepts the literal NaN).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the usage (choices empty)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported (text only)")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


StopField = Union[str, Annotated[list[str], Field(max_length=16)], None]


class _Sampling(_Strict):
    """Fields shared by both completion routes.  Absent sampling fields take the
    server's defaults (llama.cpp's chain: temperature 0.8, top_k 40, top_p 0.95,
    min_p 0.05, no penalties, unless the serve command set others)."""
    model: str | None = Field(None, description="ignored: the server serves one model")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="llama.cpp extra; <= 0 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="llama.cpp extra")
    repeat_penalty: float | None = Field(None, gt=0, le=1e6, description="llama.cpp extra; 1 = off")
    repeat_last_n: int | None = Field(None, ge=-1, description="llama.cpp extra; -1 = whole context")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64, description="negative = random")
    stop: StopField = Field(None, description="up to 16 strings; generation ends before any of them")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    cache_prompt: bool = Field(True, description="llama-server's: reuse this slot's cached prompt")
    ignore_eos: bool = Field(False, description="llama-server's: generate past end-of-generation tokens")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="takes precedence over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"name": ..., "schema": {...}}}')
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra template variables, e.g. {\"enable_thinking\": false}")
    reasoning_format: Literal["deepseek", "none", "auto"] | None = Field(
        None, description="llama-server's: deepseek/auto = <think> text in reasoning_content; none = in content")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate at most (OpenAI's default 16)")
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (with the chosen one)")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


class TokenizeRequest(_Strict):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


# ---------------------------------------------------------------- the app

def create_app(model, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    """The HTTP layer over a started scheduler."""
    from .chat_template import MAX_CHARS_PER_TOKEN

    tok = model.tokenizer
    template = model.gguf.get("tokenizer.chat_template")
    max_prompt_chars = MAX_CHARS_PER_TOKEN * settings.n_ctx_slot
    started = time.time()
    counters = {"http_requests": 0, "http_errors": 0}

    app = FastAPI(title="gguf-runtime", version=_version(),
                  description="OpenAI-compatible server over a GGUF model, with continuous batching "
                              f"({settings.n_slots} slots of {settings.n_ctx_slot} tokens).")

    # -------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        counters["http_errors"] += 1
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        counters["http_errors"] += 1
        msg, param = _validation_message(exc)
        return _error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        counters["http_errors"] += 1
        if exc.status_code == 404:
            return _error_response(404, f"unknown route: {request.method} {request.url.path}",
                                   "not_found_error", code="not_found")
        if exc.status_code == 405:
            return _error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed")
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        counters["http_errors"] += 1
        traceback.print_exc()   # for the operator; the client gets one line
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # -------------------------------------------------------- helpers
    def sampler_params(body: _Sampling) -> SamplerParams:
        d = settings.defaults
        pick = {"temp": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
                "repeat_penalty": body.repeat_penalty, "repeat_last_n": body.repeat_last_n,
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "seed": body.seed}
        try:
            return replace(d, **{k: v for k, v in pick.items() if v is not None})
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def logit_bias(body: _Sampling) -> dict[int, float]:
        out = {}
        for k, v in (body.logit_bias or {}).items():
            try:
                t = int(k)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            if not 0 <= t < model.n_vocab:
                raise APIError(400, f"logit_bias: token id {t} out of range (vocabulary has "
                               f"{model.n_vocab} tokens)", param="logit_bias")
            out[t] = float(v)
        return out

    def chat_prompt(body: ChatCompletionRequest) -> tuple[list[int], str]:
        from .chat import render_prompt
        from .chat_template import PromptTooLongError as TemplateTooLong

        msgs = []
        for m in body.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content  # Qwen3's template reads it
            msgs.append(msg)
        if settings.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": settings.system})
        extra = dict(body.chat_template_kwargs or {})
        for reserved in ("messages", "add_generation_prompt", "bos_token", "eos_token", "max_chars"):
            if reserved in extra:
                raise APIError(400, f"chat_template_kwargs may not set {reserved!r}", param="chat_template_kwargs")
        try:
            return render_prompt(tok, template, msgs, max_chars=max_prompt_chars, **extra)
        except TemplateTooLong as e:
            raise APIError(400, f"{e}: a slot's context holds {settings.n_ctx_slot} tokens",
                           param="messages", code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def completion_prompt(body: CompletionRequest) -> tuple[list[int], str]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"only one prompt per request is supported, got {len(p)}", param="prompt")
            p = p[0]
        if isinstance(p, str):
            if len(p) > max_prompt_chars:
                raise APIError(400, f"the prompt has {len(p)} characters; a slot's context holds "
                               f"{settings.n_ctx_slot} tokens (at most {max_prompt_chars} characters)",
                               param="prompt", code="context_length_exceeded")
            return tok.tokenize(p, add_special=True, parse_special=True), p
        ids = [int(t) for t in p]
        bad = [t for t in ids if not 0 <= t < model.n_vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} out of range (vocabulary has "
                           f"{model.n_vocab} tokens)", param="prompt")
        return ids, tok.detokenize(ids)

    def constraint_for(fmt: dict | None):
        """The one place response_format becomes a sampling constraint (issue #19)."""
        if not fmt or fmt.get("type") in (None, "text"):
            return None
        kind = fmt.get("type")
        if kind not in ("json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                           f"json_schema)", param="response_format")
        try:
            from .constraint import Constraint, ConstraintError
        except ImportError as e:
            raise APIError(400, f"response_format is not supported by this install: {e}",
                           param="response_format") from None
        try:
            if kind == "json_object":
                return _cached_constraint(("json_object",), lambda: Constraint.json_object(tok))
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise APIError(400, 'response_format json_schema needs {"json_schema": {"name": ..., '
                               '"schema": {...}}}', param="response_format")
            schema = spec.get("schema", {})
            key = ("json_schema", json.dumps(schema, sort_keys=True))
            return _cached_constraint(key, lambda: Constraint.json_schema(tok, schema))
        except ConstraintError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None

    constraints: dict = {}

    def _cached_constraint(key, build):
        c = constraints.get(key)
        if c is None:
            c = build()
            if len(constraints) >= 32:
                constraints.pop(next(iter(constraints)))
            constraints[key] = c
        return c

    def submit(gen: GenerationRequest):
        """Queue a request; returns (handle, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(event):  # on the scheduler thread
            loop.call_soon_threadsafe(q.put_nowait, event)

        try:
            return scheduler.submit(gen, sink), q
        except QueueFullError as e:
            raise APIError(503, f"the server is busy: {e}; retry later", "unavailable_error",
                           code="queue_full") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e), "unavailable_error", code="unavailable") from None
        except PromptTooLongError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def collect(request: Request, handle, q) -> tuple[list[Delta], Finished]:
        """All events of a non-streaming request; cancels it if the client goes away."""
        deltas = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        raise APIError(499, "client closed the request")
                    continue
                if isinstance(ev, Delta):
                    deltas.append(ev)
                elif isinstance(ev, Finished):
                    return deltas, ev
                elif isinstance(ev, Failed):
                    raise APIError(500, ev.message, "server_error")
        finally:
            handle.cancel()  # a no-op once finished; frees the slot if we leave early

    def piece_text(t: int) -> tuple[str, list[int]]:
        b = tok.token_to_piece(t)
        return b.decode("utf-8", "replace"), list(b)

    def chat_logprobs(entries) -> dict:
        content = []
        for e in entries:
            s, b = piece_text(e.token_id)
            top = []
            for t, lp in e.top:
                ts, tb = piece_text(t)
                top.append({"token": ts, "logprob": lp, "bytes": tb})
            content.append({"token": s, "logprob": e.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def usage(fin: Finished) -> dict:
        return {"prompt_tokens": fin.n_prompt, "completion_tokens": fin.n_gen,
                "total_tokens": fin.n_prompt + fin.n_gen,
                "prompt_tokens_details": {"cached_tokens": fin.n_cached}}

    def timings(fin: Finished) -> dict:
        n_new = fin.n_prompt - fin.n_cached
        return {"cache_n": fin.n_cached, "prompt_n": n_new, "prompt_ms": 1e3 * fin.t_prompt,
                "prompt_per_second": n_new / fin.t_prompt if fin.t_prompt > 0 else None,
                "predicted_n": fin.n_gen, "predicted_ms": 1e3 * fin.t_gen,
                "predicted_per_second": fin.n_gen / fin.t_gen if fin.t_gen > 0 else None,
                "queue_ms": 1e3 * fin.t_queue, "slot": fin.slot}

    def finish_reason(fin: Finished) -> str:
        # a reply cut by the server's shutdown is an unfinished reply, as "length" says
        return "length" if fin.reason == "shutdown" else fin.reason

    def sse(obj) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def stream(handle, q, first: list[dict], chunk, final, include_usage, usage_chunk):
        """SSE body: first chunks, one per delta, the final one, usage, [DONE].  Leaving
        early (the client disconnected: Starlette cancels us) cancels the request."""
        try:
            for c in first:
                yield sse(c)
            while True:
                ev = await q.get()
                if isinstance(ev, Delta):
                    c = chunk(ev)
                    if c is not None:
                        yield sse(c)
                elif isinstance(ev, Finished):
                    f = final(ev)
                    for c in (f if isinstance(f, list) else [f]):
                        yield sse(c)
                    if include_usage:
                        yield sse(usage_chunk(ev))
                    break
                elif isinstance(ev, Failed):
                    yield sse(_error_body(ev.message, "server_error"))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            handle.cancel()

    def sse_response(body_iter) -> StreamingResponse:
        return StreamingResponse(body_iter, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------- routes
    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.tools or body.tool_choice not in (None, "none"):
            raise APIError(400, "tools are not supported by this server", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampler_params(body)
        bias = logit_bias(body)
        constraint = await run_in_threadpool(constraint_for, body.response_format)
        ids, prompt_text = await run_in_threadpool(chat_prompt, body)
        split = (body.reasoning_format or settings.reasoning_format) != "none"
        # a template whose generation prompt opens <think> leaves the model inside it
        reasoning = ReasoningSplitter(starts_thinking(prompt_text)) if split else None
        gen = GenerationRequest(
            prompt=ids, params=params, max_tokens=body.max_completion_tokens or body.max_tokens,
            stop=body.stop, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            logit_bias=bias, cache_prompt=body.cache_prompt, ignore_eos=body.ignore_eos,
            constraint=constraint)
        handle, q = submit(gen)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        alias = settings.model_alias
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": alias,
                "system_fingerprint": _fingerprint()}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def delta_fields(think: str, text: str) -> dict:
                out = {}
                if think:
                    out["reasoning_content"] = think
                if text or not think:
                    out["content"] = text
                return out

            def chunk(d: Delta):
                think, text = reasoning.feed(d.text) if reasoning else ("", d.text)
                if not think and not text and not d.logprobs:
                    return None  # all of it held back (a tag may be starting)
                choice = {"index": 0, "delta": delta_fields(think, text), "logprobs": None,
                          "finish_reason": None}
                if gen.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(d.logprobs)
                return {**base, "choices": [choice], **extra}

            def final(fin: Finished):
                out = []
                think, text = reasoning.flush() if reasoning else ("", "")
                if think or text:
                    out.append({**base, "choices": [{"index": 0, "delta": delta_fields(think, text),
                                                     "logprobs": None, "finish_reason": None}], **extra})
                out.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": finish_reason(fin)}], **extra})
                return out

            def usage_chunk(fin: Finished):
                return {**base, "choices": [], "usage": usage(fin), "timings": timings(fin)}

            first = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], **extra}]
            return sse_response(stream(handle, q, first, chunk, final, include_usage, usage_chunk))
        deltas, fin = await collect(request, handle, q)
        text = "".join(d.text for d in deltas)
        message = {"role": "assistant", "content": text}
        if reasoning:
            think, content = reasoning.feed(text)
            t2, c2 = reasoning.flush()
            think, content = think + t2, content + c2
            message["content"] = content
            if think:
                message["reasoning_content"] = think
        choice = {"index": 0, "message": message,
                  "logprobs": chat_logprobs([e for d in deltas for e in d.logprobs])
                  if gen.logprobs is not None else None,
                  "finish_reason": finish_reason(fin)}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(fin),
                "timings": timings(fin)}

    @app.post("/v1/completions", summary="Text completion (OpenAI, legacy)")
    async def completions(body: CompletionRequest, request: Request):
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)",
                           param="echo")
        params = sampler_params(body)
        bias = logit_bias(body)
        ids, prompt_text = await run_in_threadpool(completion_prompt, body)
        gen = GenerationRequest(prompt=ids, params=params, max_tokens=body.max_tokens, stop=body.stop,
                                logprobs=body.logprobs, logit_bias=bias, cache_prompt=body.cache_prompt,
                                ignore_eos=body.ignore_eos)
        handle, q = submit(gen)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": settings.model_alias, "system_fingerprint": _fingerprint()}
        echo = prompt_text if body.echo else ""

        def legacy_logprobs(entries, offset: int) -> dict:
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for e in entries:
                s, _ = piece_text(e.token_id)
                out["tokens"].append(s)
                out["token_logprobs"].append(e.logprob)
                out["top_logprobs"].append({piece_text(t)[0]: lp for t, lp in e.top})
                out["text_offset"].append(offset)
                offset += len(s)
            return out

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}
            offset = [len(echo)]

            def chunk(d: Delta):
                lp = None
                if gen.logprobs is not None:
                    lp = legacy_logprobs(d.logprobs, offset[0])
                offset[0] += len(d.text)
                return {**base, "choices": [{"index": 0, "text": d.text, "logprobs": lp,
                                             "finish_reason": None}], **extra}

            def final(fin):
                return {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": finish_reason(fin)}], **extra}

            def usage_chunk(fin):
                return {**base, "choices": [], "usage": usage(fin), "timings": timings(fin)}

            first = ([{**base, "choices": [{"index": 0, "text": echo, "logprobs": None,
                                            "finish_reason": None}], **extra}] if echo else [])
            return sse_response(stream(handle, q, first, chunk, final, include_usage, usage_chunk))
        deltas, fin = await collect(request, handle, q)
        text = echo + "".join(d.text for d in deltas)
        lp = (legacy_logprobs([e for d in deltas for e in d.logprobs], len(echo))
              if gen.logprobs is not None else None)
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                     "finish_reason": finish_reason(fin)}],
                "usage": usage(fin), "timings": timings(fin)}

    def model_card() -> dict:
        a = model.args
        return {"id": settings.model_alias, "object": "model", "created": settings.created,
                "owned_by": "gguf-runtime",
                "meta": {"n_vocab": model.n_vocab, "n_ctx_train": a.n_ctx_train, "n_ctx_slot": settings.n_ctx_slot,
                         "n_slots": settings.n_slots, "n_params": None, "path": str(model.gguf.path)}}

    webchat = WEBCHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", summary="The web chat page", response_class=HTMLResponse)
    async def web_chat():
        return HTMLResponse(webchat, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", summary="The served model (OpenAI)")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="One model (OpenAI)")
    async def model_info(model_id: str):
        if model_id != settings.model_alias:
            raise APIError(404, f"the model {model_id!r} does not exist (this server serves "
                           f"{settings.model_alias!r})", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", summary="Readiness (llama-server)")
    async def health():
        st = scheduler.stats()
        if not scheduler.alive:
            return _error_response(503, "the engine is not running", "unavailable_error", code="unavailable")
        return {"status": "ok", "slots_idle": st["slots_total"] - st["slots_busy"],
                "slots_processing": st["slots_busy"], "requests_waiting": st["requests_waiting"]}

    @app.post("/tokenize", summary="Text to token ids (llama-server)")
    async def tokenize(body: TokenizeRequest):
        if len(body.content) > settings.max_body:
            raise APIError(400, "content too long")
        ids = await run_in_threadpool(tok.tokenize, body.content, body.add_special, body.parse_special)
        if not body.with_pieces:
            return {"tokens": ids}
        out = []
        for t in ids:
            b = tok.token_to_piece(t, True)
            try:
                piece: Any = b.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(b)  # llama-server gives the bytes when a piece is not valid UTF-8
            out.append({"id": t, "piece": piece})
        return {"tokens": out}

    @app.post("/detokenize", summary="Token ids to text (llama-server)")
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < model.n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} out of range (vocabulary has {model.n_vocab} tokens)",
                           param="tokens")
        return {"content": tok.detokenize(body.tokens)}

    @app.get("/props", summary="Server settings (llama-server)")
    async def props():
        d = settings.defaults
        return {"total_slots": settings.n_slots, "n_ctx": settings.n_ctx_slot,
                "model_alias": settings.model_alias, "model_path": str(model.gguf.path),
                "chat_template": template or "", "max_queue": settings.max_queue,
                "cache_reuse": scheduler.cache_reuse,
                "default_generation_settings": {
                    "temperature": d.temp, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
                    "repeat_penalty": d.repeat_penalty, "repeat_last_n": d.repeat_last_n,
                    "presence_penalty": d.presence_penalty, "frequency_penalty": d.frequency_penalty,
                    "seed": d.seed, "n_ctx": settings.n_ctx_slot}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        st = scheduler.stats()
        up = time.time() - started
        rows = [
            ("requests_total", "counter", "generation requests accepted", st["requests_total"]),
            ("requests_finished_total", "counter", "generation requests finished", st["requests_finished"]),
            ("requests_active", "gauge", "requests holding a slot", st["requests_active"]),
            ("requests_waiting", "gauge", "requests waiting for a slot", st["requests_waiting"]),
            ("http_requests_total", "counter", "HTTP requests received", counters["http_requests"]),
            ("http_errors_total", "counter", "HTTP requests answered with an error", counters["http_errors"]),
            ("prompt_tokens_total", "counter", "prompt tokens evaluated (cache hits excluded)",
             st["prompt_tokens_total"]),
            ("prompt_tokens_cached_total", "counter", "prompt tokens reused from a slot's cache",
             st["prompt_tokens_cached_total"]),
            ("generated_tokens_total", "counter", "tokens generated", st["generated_tokens_total"]),
            ("prompt_seconds_total", "counter", "seconds spent in prefill", st["prompt_seconds_total"]),
            ("decode_seconds_total", "counter", "seconds spent in decode steps", st["decode_seconds_total"]),
            ("prompt_tokens_per_second", "gauge", "prefill throughput over the server's life",
             st["prompt_tokens_total"] / st["prompt_seconds_total"] if st["prompt_seconds_total"] else 0.0),
            ("generated_tokens_per_second", "gauge", "decode throughput (all slots) over the server's life",
             st["generated_tokens_total"] / st["decode_seconds_total"] if st["decode_seconds_total"] else 0.0),
            ("decode_steps_total", "counter", "batched decode steps", st["decode_steps_total"]),
            ("decode_rows_total", "counter", "sequences evaluated by decode steps (one token each)",
             st["decode_rows_total"]),
            ("decode_rows_per_step", "gauge", "mean sequences per decode step",
             st["decode_rows_total"] / st["decode_steps_total"] if st["decode_steps_total"] else 0.0),
            ("kv_cells_used", "gauge", "KV cache cells holding tokens (idle slots' caches included)",
             st["kv_cells_used"]),
            ("kv_cells_total", "gauge", "KV cache cells in all slots", st["kv_cells_total"]),
            ("kv_cache_usage_ratio", "gauge", "kv_cells_used / kv_cells_total",
             st["kv_cells_used"] / st["kv_cells_total"]),
            ("slots_total", "gauge", "parallel sequences (-np)", st["slots_total"]),
            ("uptime_seconds", "gauge", "seconds since the server started", up),
        ]
        lines = []
        for name, kind, help_, value in rows:
            full = f"gguf_runtime_{name}"
            lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}", f"{full} {_num(value)}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # llama-server also answers these routes without the /v1 prefix
    app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/completions", completions, methods=["POST"], include_in_schema=False)
    app.add_api_route("/models", models, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/health", health, methods=["GET"], include_in_schema=False)

    return _Guard(app, settings, counters)


def _num(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "NaN"
    return str(int(v))


class _Guard:
    """Pure ASGI middleware in front of the app (a BaseHTTPMiddleware would break
    streaming disconnects): counts requests, checks the API key, and reads each body
    whole up to the size limit (413 beyond it, before anything parses it)."""

    def __init__(self, app: FastAPI, settings: ServerSettings, counters: dict):
        self.app = app
        self.fastapi = app
        self.settings = settings
        self.counters = counters
        self._key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.counters["http_requests"] += 1
        headers = dict(scope.get("headers") or [])
        if self._key is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                self.counters["http_errors"] += 1
                msg = ("missing API key: send Authorization: Bearer KEY" if not given
                       else "invalid API key")
                return await _error_response(401, msg, "authentication_error", code="invalid_api_key",
                                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = self.settings.max_body
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await self._too_large(scope, receive, send, declared)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._too_large(scope, receive, send, size)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: disconnects reach the app

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size):
        self.counters["http_errors"] += 1
        # read (and drop) what the client is still sending before answering: closing a
        # socket with unread data makes the kernel send a reset, which can destroy the
        # 413 before the client reads it; past DRAIN_BYTES the connection is just closed
        drained = 0
        while drained <= DRAIN_BYTES:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            drained += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        resp = _error_response(413, f"the request body has {'more than ' if size else ''}{size} bytes; "
                               f"the limit is {self.settings.max_body}", code="request_too_large",
                               headers={"Connection": "close"})
        await resp(scope, receive, send)


def _version() -> str:
    from . import __version__
    return __version__


def _fingerprint() -> str:
    return f"gguf-runtime-{_version()}"


# ---------------------------------------------------------------- the command

def cli_serve(args) -> int:
    import signal

    import uvicorn

    from .chat import DEFAULT_MODEL
    from .chat_template import prestart_worker
    from .cli import CLIError
    from .generate import load_model

    if args.parallel < 1:
        raise CLIError(f"-np/--parallel must be >= 1, got {args.parallel}")
    if args.max_queue < 0:
        raise CLIError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    name = args.model or DEFAULT_MODEL
    defaults = SamplerParams.from_args(args)
    prestart_worker()
    model = load_model(name, n_ctx=args.ctx_size, precision=getattr(args, "precision", "fast"))
    n_total = model.n_ctx
    n_slot = n_total // args.parallel
    if n_slot < 2:
        raise CLIError(f"-c {n_total} split over {args.parallel} slots leaves {n_slot} tokens per slot")
    scheduler = Scheduler(model, args.parallel, n_slot, max_queue=args.max_queue,
                          cache_reuse=args.cache_reuse).start()
    alias = args.alias or os.path.basename(str(model.gguf.path))
    try:
        created = int(os.path.getmtime(model.gguf.path))
    except OSError:
        created = int(time.time())
    settings = ServerSettings(model_alias=alias, n_slots=args.parallel, n_ctx_slot=n_slot,
                              api_key=args.api_key or os.environ.get("RUNTIME_API_KEY") or None,
                              max_queue=args.max_queue, system=args.system, defaults=defaults,
                              reasoning_format=args.reasoning_format,
                              created=created)
    app = create_app(model, scheduler, settings)

    try:
        sock = socket.create_server((args.host, args.port), family=_family(args.host), backlog=2048)
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serve: {alias}: {args.parallel} slot{'s' if args.parallel > 1 else ''} of {n_slot} tokens "
          f"(-c {n_total} / -np {args.parallel}), queue {args.max_queue}, "
          f"API key {'required' if settings.api_key else 'off'}", file=sys.stderr, flush=True)
    print(f"listening on http://{shown}:{port}", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # finish open streams first (each gets its final chunk and [DONE]), so
            # that uvicorn's wait for connections to close ends at once
            scheduler.shutdown(timeout=0)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                            access_log=bool(args.verbose), timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, lifespan="off")
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; a SIGTERM that
    # ended a clean shutdown must leave exit status 0, so it meets a handler that
    # does nothing instead of the default one that kills the process
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.shutdown()
    # Every stream has had its final chunk and every slot is free: what is left is
    # the interpreter's teardown (freeing the model, numba's and LLVM's modules, the
    # template worker's pipes), 0.4 s of CPU here when quiet but seconds of wall
    # time on a loaded machine, past the 5 s that a SIGTERM'd server may take.  So
    # end the template worker, flush, and leave without it.
    from .chat_template import stop_worker

    stop_worker()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
