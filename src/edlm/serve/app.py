"""The HTTP side of ``edlm serve``: the FastAPI app, its handlers and SSE streams, and how it is run.

Handlers turn text into token ids, check the server's limits, hand a :class:`~edlm.serve.engine.Job` to the engine
and turn the blocks that come back into text (stop strings, partial characters: :class:`edlm.text.TextStream`),
then into one JSON body or a stream of server-sent events (``sse-starlette``, which also notices a client that
goes away and so cancels its job).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edlm.decode import validate
from edlm.errors import EdlmError
from edlm.serve.engine import DoneEvent, Engine, EngineStoppedError, ErrorEvent, Event, Job, QueueFullError
from edlm.serve.protocol import (
    ApiError,
    ChatBodies,
    ChatCompletionRequest,
    CompletionBodies,
    CompletionRequest,
    ContentPart,
    FinishReason,
    SamplingRequest,
    error_body,
    error_response,
    model_list,
    to_json,
    usage,
)
from edlm.serve.settings import ServeSettings
from edlm.text import TextStream

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


class _ClientGone(Exception):
    """The client of a non-streamed request disconnected while it was decoding."""


@dataclass
class _Piece:
    text: str
    finish_reason: FinishReason | None
    completion_tokens: int


async def _next_event(job: Job, request: Request | None) -> Event:
    if request is None:
        return await job.events.get()
    while True:  # non-streamed: nobody else notices a client that left, so look now and then
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _ClientGone() from None


async def _pieces(engine: Engine, job: Job, request: Request | None) -> AsyncIterator[_Piece]:
    """Text pieces of a job as its blocks arrive, cut at ``job.cfg.stop``; the last piece has a finish_reason.
    Raises ApiError."""
    tokenizer = engine.dlm.tokenizer
    text = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), job.cfg.stop)
    produced = 0
    while True:
        event = await _next_event(job, request)
        if isinstance(event, ErrorEvent):
            raise ApiError(event.status, event.message)
        if isinstance(event, DoneEvent):
            yield _Piece(text.flush(), event.reason, produced)
            return
        produced += len(event.ids)
        delta, hit = text.push(event.ids)
        if hit:
            engine.cancel(job, "stop")
            yield _Piece(delta, "stop", produced)
            return
        if delta:
            yield _Piece(delta, None, produced)


# ----------------------------------------------------------------------------------------------- handlers


def _job(request: Request, body: SamplingRequest, prompt: list[int], max_tokens: int | None, param: str) -> Job:
    """Check a request against the server's limits and build its job (ApiError 400 on bad input)."""
    settings: ServeSettings = request.app.state.settings
    engine: Engine = request.app.state.engine
    if body.model is not None and body.model != settings.model_id:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {settings.model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: this server returns one choice per request; send "
                            "separate requests (with different seeds) instead", param="n")
    if len(prompt) > settings.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                            f"{settings.max_prompt_tokens} (max_prompt_tokens)", param=param,
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {settings.max_tokens_limit} "
                            "(max_tokens_limit)", param="max_tokens")
    vocab = engine.dlm.model.get_input_embeddings().weight.shape[0]
    if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param=param)
    seed = body.seed if body.seed is not None else settings.seed
    if seed is None:
        seed = secrets.randbelow(2**31)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or None  # None (or []): the server's
    try:
        cfg = settings.decode_config(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                     seed=seed, threshold=body.threshold, block_size=body.block_size,
                                     mode=body.mode, stop=stop)
        validate(engine.dlm, [prompt], cfg)
    except EdlmError as e:
        raise ApiError(400, str(e)) from None
    return Job(prompt=prompt, cfg=cfg, loop=asyncio.get_running_loop())


def _data(payload: BaseModel) -> str:
    """One event's data: the body's JSON, with the fields that were set (see ``protocol.to_json``)."""
    return payload.model_dump_json(exclude_unset=True)


async def _events(engine: Engine, job: Job, bodies: CompletionBodies, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent event data: a chunk per text piece, a finishing chunk, optional usage, ``[DONE]``. A client that
    goes away cancels this generator (sse-starlette watches the connection), which cancels the job."""
    produced = 0
    try:
        if (head := bodies.head()) is not None:
            yield _data(head)
        try:
            async for piece in _pieces(engine, job, None):
                produced = piece.completion_tokens
                if piece.text:
                    yield _data(bodies.chunk(piece.text, None))
                if piece.finish_reason:
                    yield _data(bodies.chunk(None, piece.finish_reason))
            if include_usage:
                yield _data(bodies.usage_chunk(usage(len(job.prompt), produced)))
        except ApiError as e:
            yield json.dumps(error_body(e.message, "server_error", code=e.code))
        yield "[DONE]"
    finally:
        engine.cancel(job, "disconnect")


async def _respond(request: Request, body: SamplingRequest, prompt: list[int], max_tokens: int | None, param: str,
                   kind: type[CompletionBodies]) -> Response:
    """Decode one request and answer it whole or as a stream; ``kind`` shapes the bodies (completion or chat)."""
    engine: Engine = request.app.state.engine
    job = _job(request, body, prompt, max_tokens, param)
    try:
        engine.submit(job)
    except QueueFullError as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except EngineStoppedError as e:
        raise ApiError(503, str(e)) from None
    bodies = kind(id=f"{kind.prefix}-{job.id}", created=int(time.time()), model=request.app.state.settings.model_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_events(engine, job, bodies, include_usage), sep="\n")
    try:
        pieces = [piece async for piece in _pieces(engine, job, request)]
    except _ClientGone:
        return Response(status_code=499)
    finally:
        engine.cancel(job, "disconnect")  # no-op when finished
    text, last = "".join(piece.text for piece in pieces), pieces[-1]
    return JSONResponse(to_json(bodies.whole(text, last.finish_reason, usage(len(prompt), last.completion_tokens))))


def _message_text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


class _ApiKeyMiddleware:
    """Pure ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                message = ("missing API key: send 'Authorization: Bearer KEY'" if not header
                           else "invalid API key")
                await error_response(401, message, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    """The FastAPI app; the engine's worker starts and stops with the app's lifespan.

    Args:
        settings: limits, defaults and the served model id.
        engine: the engine that owns the model (not started yet, or started: both work).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="edlm", description="OpenAI-compatible server for a block-diffusion LM", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.created = int(time.time())
    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""))
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}{more}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"unknown route {request.method} {request.url.path}; see /v1/models, /v1/completions, " \
                      "/v1/chat/completions, /health"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if not engine.running:
            return error_response(503, "the model is not ready (starting up or shutting down)")
        return JSONResponse({"status": "ok", "model": settings.model_id, **engine.stats()})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(model_list(settings.model_id, request.app.state.created))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, f"got {len(prompt)} prompts; this server takes one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        ids = engine.dlm.encode(prompt, chat=False) if isinstance(prompt, str) else list(prompt)
        return await _respond(request, body, ids, body.max_tokens, "prompt", CompletionBodies)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
        ids = engine.dlm.encode(messages, chat=True)  # chat template, else contents joined by newlines
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _respond(request, body, ids, max_tokens, "messages", ChatBodies)

    return app


# ----------------------------------------------------------------------------------------------- running


def serve(model_dir: str | Path | None, settings: ServeSettings, drafter: str | Path | None = None) -> None:
    """Load a converted model, or an AR source with its block ``drafter`` folder (``model_dir`` then names the
    source; None: the one the drafter names), and serve it until interrupted (``edlm serve``)."""
    if drafter is not None:
        engine = Engine.from_drafter(drafter, settings, None if model_dir is None else str(model_dir))
    else:
        engine = Engine.from_pretrained(model_dir, settings)
    app = create_app(settings, engine)
    logger.info("serving %s as %r on http://%s:%d/v1%s", drafter or model_dir, settings.model_id, settings.host,
                settings.port, " (API key required)" if settings.api_key else "")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


class ServerThread:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, ``edlm bench load``).

    Use as a context manager; entering waits until the server has started (and the engine with it).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", startup_timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.startup_timeout = startup_timeout

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.server.started:  # set once the lifespan has started the engine
                return self
            if not self.thread.is_alive():
                raise EdlmError("the server thread exited during startup; see the log")
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise EdlmError(f"the server did not start within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
