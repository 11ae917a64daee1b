"""An OpenAI-compatible HTTP server for a converted model: ``edlm serve``.

One process, two sides::

    HTTP handlers (asyncio event loop)          Engine worker thread (owns the model, torch.no_grad)
    ----------------------------------          -----------------------------------------------------
    tokenize, check limits, build the job  -->  waiting deque (bounded by max_queue; full -> HTTP 429)
                                                  | at every block boundary, waiting jobs are admitted as
                                                  | cohorts: same DecodeConfig, <= max_batch rows each
                                                  v
                                                active cohorts, one ``iter_blocks`` generator each,
                                                advanced round-robin one block at a time
    asyncio.Queue per job                  <--  token ids of each finished block, then "done"
    (loop.call_soon_threadsafe)
    detokenize, stop strings, SSE chunks
    or one JSON body

The worker knows only token ids; text lives in the handlers. A stop string or a client that goes away cancels the
row through ``should_stop``, so its slot is free at the next block boundary. Rows batch freely: padding never
changes a row's result in this decoder, and each row samples from its own generator seeded with its request's seed,
so a seed gives the same text whoever else is being served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import socket
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from edlm.config import DecodeConfig, apply_overrides, from_dict
from edlm.decode import POLICIES, DecodeStats, iter_blocks, validate
from edlm.errors import ConfigError, EdlmError
from edlm.quant import DTYPES
from edlm.text import TextStream

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks whether its client is still there


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class ServeSettings:
    """Everything ``edlm serve`` can be told; ``--set key=value`` reaches any field."""

    model_id: str = "edlm"
    """Name listed by ``/v1/models`` and expected in a request's ``model`` field (the CLI uses the folder name)."""
    host: str = "127.0.0.1"
    """Interface to listen on; the default serves this machine only."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """Bearer token required on ``/v1/*`` (``Authorization: Bearer KEY``); None serves without authentication. The
    CLI also reads ``$EDLM_API_KEY``."""
    max_queue: int = 64
    """Requests that may wait for a decoding slot; one more is refused with HTTP 429."""
    max_batch: int = 16
    """Most rows in one cohort (one batched ``iter_blocks`` call); 1 decodes every request on its own."""
    max_active: int = 64
    """Most requests decoding at once over all cohorts; further requests wait in the queue."""
    batch_window_ms: float = 100.0
    """Longest a request waits for others to join its cohort; 0 admits every request at the next block boundary.
    Waiting ends early once max_batch requests wait or no request arrived for ``batch_gap_ms``."""
    batch_gap_ms: float = 20.0
    """A burst of arrivals is over when no request came for this long; its requests are admitted together."""
    max_prompt_tokens: int = 1024
    """Longest prompt accepted, in tokens (longer: HTTP 400)."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` a request may ask for (larger: HTTP 400)."""
    max_tokens: int = 128
    """``max_tokens`` of a request that gives none."""
    temperature: float = 0.0
    """Default temperature; 0 is greedy."""
    top_p: float = 1.0
    """Default nucleus mass (with temperature > 0)."""
    mode: str = "diffusion"
    """Default decoding mode (``diffusion``, ``ar`` or ``speculative``, see ``DecodeConfig.mode``); requests may set
    ``mode``."""
    threshold: float = 0.9
    """Default confidence a token needs to be committed (``threshold`` policy); requests may set ``threshold``."""
    block_size: int | None = None
    """Default decoding block size; None uses the model's training block. Requests may set ``block_size``."""
    policy: str = "threshold"
    """Commit policy from ``edlm.decode.POLICIES`` (server-wide)."""
    tokens_per_step: int = 1
    """``fixed`` policy: tokens committed per step (server-wide)."""
    seed: int | None = None
    """Seed of a sampled request that gives none; None draws a fresh one per request (as OpenAI does)."""
    dtype: str = "fp32"
    """Weights of the served model: ``fp32``, ``bf16`` or ``int8`` (see :mod:`edlm.quant`; measure which is fastest
    here with ``edlm bench``)."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(bool(self.model_id), "model_id must be a non-empty name")
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        for name in ("max_queue", "max_batch", "max_active", "max_prompt_tokens", "max_tokens_limit", "max_tokens"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check(self.max_batch <= self.max_active, f"max_batch ({self.max_batch}) cannot exceed max_active "
                                                 f"({self.max_active})")
        check(self.max_tokens <= self.max_tokens_limit,
              f"the default max_tokens ({self.max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})")
        check(self.batch_window_ms >= 0 and self.batch_gap_ms >= 0,
              f"batch_window_ms and batch_gap_ms must be >= 0, got {self.batch_window_ms}, {self.batch_gap_ms}")
        check(self.policy in POLICIES, f"unknown decoding policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        check(self.dtype in DTYPES, f"unknown weight dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        self.decode_config(max_new_tokens=self.max_tokens)  # the decoding defaults must make a valid DecodeConfig

    def decode_config(self, **fields: Any) -> DecodeConfig:
        """A DecodeConfig from these defaults, with ``fields`` (None values ignored) replacing them."""
        base = dict(max_new_tokens=self.max_tokens, mode=self.mode, block_size=self.block_size, policy=self.policy,
                    threshold=self.threshold, tokens_per_step=self.tokens_per_step, temperature=self.temperature,
                    top_p=self.top_p, seed=self.seed or 0)
        base.update({k: v for k, v in fields.items() if v is not None})
        return DecodeConfig(**base)


def load_serve_settings(model_dir: str | Path | None = None, overrides: list[str] | None = None,
                        env: dict[str, str] | None = None, **fields: Any) -> ServeSettings:
    """Build :class:`ServeSettings` from ``key=value`` overrides, then explicit fields (None ignored).

    ``model_id`` defaults to the model folder's name and ``api_key`` to ``$EDLM_API_KEY`` (read from ``env``,
    default ``os.environ``).
    """
    env = os.environ if env is None else env
    data = apply_overrides({}, overrides or [])
    data.update({k: v for k, v in fields.items() if v is not None})
    if "model_id" not in data and model_dir is not None:
        data["model_id"] = Path(model_dir).resolve().name
    if "api_key" not in data and env.get("EDLM_API_KEY"):
        data["api_key"] = env["EDLM_API_KEY"]
    return from_dict(ServeSettings, data, where="serve settings: ")


# ----------------------------------------------------------------------------------------------- schemas


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class StreamOptions(_Lenient):
    include_usage: bool = False
    """Send a last chunk with ``usage`` (and no choices) before ``[DONE]``."""


class _Sampling(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """OpenAI's range [0, 2] (the library would take any t >= 0); 0 is greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    """edlm extension: confidence a token needs to be committed."""
    block_size: int | None = Field(None, ge=1)
    """edlm extension: decoding block size (a multiple or divisor of the training block)."""
    mode: Literal["diffusion", "ar", "speculative"] | None = None
    """edlm extension: decoding mode; ``speculative`` gives the ``ar`` output (greedy) in fewer forwards."""


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Lenient):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens delivered, including an EOS; with a stop string, up to the block that held it."""
    total_tokens: int


class _Choice(BaseModel):
    index: int = 0
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class _Envelope(BaseModel):
    """Fields every completion response and chunk carries."""

    id: str
    created: int
    model: str


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- errors


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 429: "rate_limit_error", 503: "server_unavailable"}


class ApiError(Exception):
    """An error answered in the OpenAI format ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


class QueueFullError(EdlmError):
    """The engine's waiting queue is full (HTTP 429)."""


class EngineStoppedError(EdlmError):
    """The engine is not running (HTTP 503)."""


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class _ClientGone(Exception):
    """The client of a non-streamed request disconnected while it was decoding."""


# ----------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class TokensEvent:
    ids: list[int]
    """Token ids finalised for the job in one block (the last may be EOS)."""


@dataclass(frozen=True)
class DoneEvent:
    reason: Literal["stop", "length"]
    """``stop``: the model wrote EOS; ``length``: max_tokens reached."""


@dataclass(frozen=True)
class ErrorEvent:
    status: int
    message: str


Event = TokensEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Job:
    """One request as the engine sees it: token ids in, token ids out through ``events``."""

    prompt: list[int]
    """Prompt token ids."""
    cfg: DecodeConfig
    """How to decode it; jobs with the same cohort key share one ``iter_blocks`` call."""
    loop: asyncio.AbstractEventLoop
    """Event loop of the handler waiting on ``events``."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """Filled by the worker through ``loop.call_soon_threadsafe``."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.monotonic)
    state: Literal["new", "waiting", "active", "done"] = "new"
    """Changed under the engine's lock (waiting -> active) or by the worker (active -> done)."""
    cancel_reason: str | None = None
    """Set by the handler side: ``stop`` (a stop string) or ``disconnect``; read by the worker."""
    produced: int = 0

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one batched call: every setting but the per-row seed (and top_p, which
        greedy decoding ignores) must match."""
        skip = {"stop", "seed"} if self.cfg.temperature > 0 else {"stop", "seed", "top_p"}
        return tuple((f.name, getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg) if f.name not in skip)

    def push(self, event: Event) -> None:
        """Hand an event to the handler's loop (thread-safe); a closed loop means nobody is listening."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


@dataclass(eq=False)
class _Cohort:
    jobs: list[Job]
    """Its rows, in ``iter_blocks`` row order."""
    steps: Generator[tuple[list[list[int]], DecodeStats], None, None]
    """The cohort's ``iter_blocks`` call; each ``next`` decodes one block for all rows."""


class Engine:
    """Owns the model; a background worker thread decodes cohorts of jobs block by block, round-robin.

    Args:
        dlm: a loaded :class:`edlm.model.DiffusionLM` in eval mode.
        settings: queue and batching limits (``max_queue``, ``max_batch``, ``max_active``, ``batch_window_ms``,
            ``batch_gap_ms``).
    """

    def __init__(self, dlm: Any, settings: ServeSettings):
        self.dlm = dlm
        self.settings = settings
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: deque[_Cohort] = deque()  # worker thread only
        self._busy = 0  # rows decoding and not cancelled; written under the lock
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = dict(completed=0, cancelled=0, stopped=0, failed=0, cohorts=0, rows=0, largest_cohort=0,
                            blocks=0)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, settings: ServeSettings, device: str = "cpu") -> Engine:
        """Load a converted model folder, weights in ``settings.dtype``, and wrap it."""
        from edlm.quant import load

        return cls(load(model_dir, settings.dtype, device=device), settings)

    # ------------------------------------------------------------------------------------ handler side

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self.running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="edlm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker after its current block; every unfinished job gets a 503 error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine worker did not stop within %.0f s", timeout)

    def submit(self, job: Job) -> None:
        """Queue a job. Raises QueueFullError when ``max_queue`` jobs already wait, EngineStoppedError when the
        worker is not running."""
        with self._cond:
            if not self.running:
                raise EngineStoppedError("the model server is not running (starting up or shutting down); retry")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                     f"(max_queue={self.settings.max_queue}); retry later")
            job.state = "waiting"
            job.enqueued = time.monotonic()
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop decoding a job (no-op once it is done). A waiting job leaves the queue at once; a decoding row is
        dropped by ``should_stop`` at its cohort's next block boundary."""
        with self._cond:
            if job.state == "done" or job.cancel_reason is not None:
                return
            job.cancel_reason = reason
            if job.state == "waiting":
                self._waiting.remove(job)
                job.state = "done"
                self._count_cancel(job)
            elif job.state == "active":
                self._busy -= 1
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Queue and batching counters (also served by ``/health``)."""
        with self._cond:
            return dict(waiting=len(self._waiting), active=self._busy, active_cohorts=len(self._active),
                        **self._counts)

    # ------------------------------------------------------------------------------------ worker side

    def _count_cancel(self, job: Job) -> None:
        self._counts["stopped" if job.cancel_reason == "stop" else "cancelled"] += 1

    def _run(self) -> None:
        logger.info("engine worker started (max_batch=%d, max_active=%d, max_queue=%d)", self.settings.max_batch,
                    self.settings.max_active, self.settings.max_queue)
        try:
            with torch.no_grad():  # grad mode is per thread: this is the thread that runs the model
                while True:
                    admitted = self._admit()
                    if admitted is None:
                        break
                    self._active.extend(admitted)
                    if self._active:
                        cohort = self._active.popleft()
                        if self._advance(cohort):
                            self._active.append(cohort)
        except Exception:  # the worker must never die silently: fail everyone still waiting
            logger.exception("engine worker crashed")
            with self._cond:
                self._stopping = True
            self._shutdown_jobs(500, "the decoding worker crashed; see the server log")
            raise
        self._shutdown_jobs(503, "the server is shutting down")
        logger.info("engine worker stopped")

    def _shutdown_jobs(self, status: int, message: str) -> None:
        with self._cond:
            jobs = [j for c in self._active for j in c.jobs if j.state != "done"] + list(self._waiting)
            for cohort in self._active:
                cohort.steps.close()
            self._waiting.clear()
            self._active.clear()
            self._busy = 0
            for job in jobs:
                job.state = "done"
                job.push(ErrorEvent(status, message))

    def _admit(self) -> list[_Cohort] | None:
        """New cohorts to start at this block boundary ([] for none); None when the engine stops. Blocks while
        there is nothing to decode."""
        s = self.settings
        window, gap = s.batch_window_ms / 1000, s.batch_gap_ms / 1000
        with self._cond:
            while True:
                if self._stopping:
                    return None
                room = s.max_active - self._busy
                if self._waiting and room > 0:
                    now = time.monotonic()
                    oldest, newest = now - self._waiting[0].enqueued, now - self._waiting[-1].enqueued
                    if len(self._waiting) >= min(room, s.max_batch) or oldest >= window or newest >= gap:
                        taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                        return self._form_cohorts(taken)
                    if not self._active:  # idle: let the rest of a burst join its first request
                        self._cond.wait(timeout=min(window - oldest, gap - newest))
                        continue
                if self._active:
                    return []
                self._cond.wait()

    def _form_cohorts(self, jobs: list[Job]) -> list[_Cohort]:
        """Group jobs by key (arrival order kept) into cohorts of at most max_batch rows. Lock held."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        cohorts = []
        for group in groups.values():
            for i in range(0, len(group), self.settings.max_batch):
                rows = group[i:i + self.settings.max_batch]
                for job in rows:
                    job.state = "active"
                self._busy += len(rows)
                steps = iter_blocks(self.dlm, [j.prompt for j in rows], rows[0].cfg,
                                    should_stop=lambda r, jobs=rows: self._row_stopped(jobs[r]),
                                    seeds=[j.cfg.seed for j in rows])
                cohorts.append(_Cohort(rows, steps))
                self._counts["cohorts"] += 1
                self._counts["rows"] += len(rows)
                self._counts["largest_cohort"] = max(self._counts["largest_cohort"], len(rows))
                logger.debug("cohort of %d row(s) admitted (%d active rows)", len(rows), self._busy)
        return cohorts

    def _row_stopped(self, job: Job) -> bool:
        """``should_stop`` of iter_blocks: the row is done, or the handler cancelled it."""
        if job.state == "done":
            return True
        if job.cancel_reason is not None:
            with self._cond:
                job.state = "done"
                self._count_cancel(job)
            return True
        return False

    def _advance(self, cohort: _Cohort) -> bool:
        """Decode one block of a cohort and deliver it; False once the cohort is finished."""
        try:
            new, _ = next(cohort.steps)
        except StopIteration:
            return False
        except Exception as e:  # a bad cohort fails its own requests, not the server
            logger.exception("decoding failed for a cohort of %d row(s)", len(cohort.jobs))
            with self._cond:
                for job in cohort.jobs:
                    if job.state != "done":
                        if job.cancel_reason is None:  # a cancelled row already gave its slot back
                            self._busy -= 1
                        job.state = "done"
                        self._counts["failed"] += 1
                        job.push(ErrorEvent(500, f"decoding failed: {e}"))
            return False
        eos = self.dlm.tokenizer.eos_token_id
        with self._cond:
            self._counts["blocks"] += 1
            for job, ids in zip(cohort.jobs, new):
                if job.state == "done" or job.cancel_reason is not None or not ids:
                    continue
                job.produced += len(ids)
                job.push(TokensEvent(ids))
                reason = "stop" if eos is not None and ids[-1] == eos else (
                    "length" if job.produced >= job.cfg.max_new_tokens else None)
                if reason is not None:
                    job.state = "done"
                    self._busy -= 1
                    self._counts["completed"] += 1
                    job.push(DoneEvent(reason))
        if all(job.state == "done" or job.cancel_reason is not None for job in cohort.jobs):
            cohort.steps.close()
            for job in cohort.jobs:
                self._row_stopped(job)
            return False
        return True


@dataclass
class _Piece:
    text: str
    finish_reason: Literal["stop", "length"] | None
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


async def _pieces(engine: Engine, job: Job, stop: list[str], request: Request | None) -> AsyncIterator[_Piece]:
    """Text pieces of a job as its blocks arrive; the last piece has a finish_reason. Raises ApiError."""
    tokenizer = engine.dlm.tokenizer
    text = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
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


@dataclass
class _Plan:
    job: Job
    stop: list[str]
    stream: bool
    include_usage: bool


def _plan(request: Request, body: _Sampling, prompt: list[int], max_tokens: int | None, param: str) -> _Plan:
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
    try:
        cfg = settings.decode_config(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                     seed=seed, threshold=body.threshold, block_size=body.block_size,
                                     mode=body.mode)
        validate(engine.dlm, [prompt], cfg)
    except EdlmError as e:
        raise ApiError(400, str(e)) from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    job = Job(prompt=prompt, cfg=cfg, loop=asyncio.get_running_loop())
    return _Plan(job, stop, body.stream, bool(body.stream_options and body.stream_options.include_usage))


def _submit(engine: Engine, job: Job) -> None:
    try:
        engine.submit(job)
    except QueueFullError as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except EngineStoppedError as e:
        raise ApiError(503, str(e)) from None


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _run_to_end(engine: Engine, plan: _Plan, request: Request) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a non-streamed request."""
    parts, reason, produced = [], "length", 0
    try:
        async for piece in _pieces(engine, plan.job, plan.stop, request):
            parts.append(piece.text)
            reason, produced = piece.finish_reason or reason, piece.completion_tokens
    finally:
        engine.cancel(plan.job, "disconnect")  # no-op when finished
    return "".join(parts), reason, produced


async def _stream(engine: Engine, plan: _Plan, chunk: Callable[[str | None, str | None], BaseModel],
                  first: BaseModel | None, usage_chunk: Callable[[Usage], BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: ``data: {chunk}`` per text piece, a finishing chunk, optional usage, ``data: [DONE]``.
    A client that goes away cancels this generator, which cancels the job."""
    prompt_tokens, produced = len(plan.job.prompt), 0
    try:
        if first is not None:
            yield _sse(first)
        try:
            async for piece in _pieces(engine, plan.job, plan.stop, None):
                produced = piece.completion_tokens
                if piece.text:
                    yield _sse(chunk(piece.text, None))
                if piece.finish_reason:
                    yield _sse(chunk(None, piece.finish_reason))
            if plan.include_usage:
                yield _sse(usage_chunk(Usage(prompt_tokens=prompt_tokens, completion_tokens=produced,
                                             total_tokens=prompt_tokens + produced)))
        except ApiError as e:
            yield _sse(ErrorResponse(error=ErrorDetail(message=e.message, type="server_error", code=e.code)))
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(plan.job, "disconnect")


async def _complete(request: Request, body: CompletionRequest) -> Response:
    engine: Engine = request.app.state.engine
    model_id = request.app.state.settings.model_id
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, f"got {len(prompt)} prompts; this server takes one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    ids = engine.dlm.encode(prompt, chat=False) if isinstance(prompt, str) else list(prompt)
    plan = _plan(request, body, ids, body.max_tokens, "prompt")
    _submit(engine, plan.job)
    cid, created = f"cmpl-{plan.job.id}", int(time.time())

    def chunk(text: str | None, finish: str | None) -> CompletionResponse:
        return CompletionResponse(id=cid, created=created, model=model_id,
                                  choices=[CompletionChoice(text=text or "", finish_reason=finish)])

    if plan.stream:
        return StreamingResponse(
            _stream(engine, plan, chunk, None, lambda u: CompletionResponse(id=cid, created=created, model=model_id,
                                                                             choices=[], usage=u)),
            media_type="text/event-stream")
    try:
        text, reason, produced = await _run_to_end(engine, plan, request)
    except _ClientGone:
        return Response(status_code=499)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=produced, total_tokens=len(ids) + produced)
    return JSONResponse(CompletionResponse(id=cid, created=created, model=model_id, usage=usage,
                                           choices=[CompletionChoice(text=text, finish_reason=reason)]).model_dump())


def _message_text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


async def _chat(request: Request, body: ChatCompletionRequest) -> Response:
    engine: Engine = request.app.state.engine
    model_id = request.app.state.settings.model_id
    messages = [{"role": m.role, "content": _message_text(m.content)} for m in body.messages]
    ids = engine.dlm.encode(messages, chat=True)  # chat template, else contents joined by newlines
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    plan = _plan(request, body, ids, max_tokens, "messages")
    _submit(engine, plan.job)
    cid, created = f"chatcmpl-{plan.job.id}", int(time.time())

    def chunk(text: str | None, finish: str | None, role: Literal["assistant"] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=cid, created=created, model=model_id,
                                   choices=[ChatChunkChoice(delta=ChatDelta(role=role, content=text),
                                                            finish_reason=finish)])

    if plan.stream:
        return StreamingResponse(
            _stream(engine, plan, chunk, chunk("", None, role="assistant"),
                    lambda u: ChatCompletionChunk(id=cid, created=created, model=model_id, choices=[], usage=u)),
            media_type="text/event-stream")
    try:
        text, reason, produced = await _run_to_end(engine, plan, request)
    except _ClientGone:
        return Response(status_code=499)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=produced, total_tokens=len(ids) + produced)
    return JSONResponse(ChatCompletionResponse(
        id=cid, created=created, model=model_id, usage=usage,
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)]).model_dump())


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
        return exc.response()

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

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_id, created=request.app.state.created)])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(request, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(request, body)

    return app


# ----------------------------------------------------------------------------------------------- running


def serve(model_dir: str | Path, settings: ServeSettings) -> None:
    """Load a converted model and serve it until interrupted (``edlm serve``)."""
    import uvicorn

    engine = Engine.from_pretrained(model_dir, settings)
    app = create_app(settings, engine)
    logger.info("serving %s as %r on http://%s:%d/v1%s", model_dir, settings.model_id, settings.host,
                settings.port, " (API key required)" if settings.api_key else "")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


class ServerThread:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, ``serve-bench``).

    Use as a context manager; entering waits until ``/health`` answers 200.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", startup_timeout: float = 60.0):
        import uvicorn

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
        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise EdlmError("the server thread exited during startup; see the log")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise EdlmError(f"the server did not answer /health within {self.startup_timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


# ----------------------------------------------------------------------------------------------- load test


def _require_loopback(base_url: str) -> None:
    import ipaddress
    from urllib.parse import urlparse

    host = urlparse(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise EdlmError(f"load_test only targets loopback servers (127.0.0.1, ::1, localhost), not {host!r}")


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "max": values[-1], "mean": statistics.fmean(values)}


@dataclass
class _Outcome:
    index: int
    stream: bool
    disconnect: bool
    max_tokens: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    response_ids: list[str] = field(default_factory=list)
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None


async def _one_request(client: Any, model: str, prompt: str, out: _Outcome) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": out.max_tokens, "stream": out.stream}
    t0 = time.perf_counter()
    if not out.stream:
        r = await client.post("/v1/completions", json=body)
        out.latency_s = time.perf_counter() - t0
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        data = r.json()
        out.response_ids.append(data["id"])
        out.text, out.finish_reason = data["choices"][0]["text"], data["choices"][0]["finish_reason"]
        out.completion_tokens = data["usage"]["completion_tokens"]
        return
    body["stream_options"] = {"include_usage": True}
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                out.error = chunk["error"]["message"]
                return
            if chunk["id"] not in out.response_ids:
                out.response_ids.append(chunk["id"])
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                out.text += choice["text"]
                out.finish_reason = choice["finish_reason"] or out.finish_reason
            if out.text and out.ttft_s is None:
                out.ttft_s = time.perf_counter() - t0
            if out.disconnect and out.text:
                return  # leaving the stream closes the connection mid-response
    out.latency_s = time.perf_counter() - t0
    if not done:
        out.error = "the stream ended without data: [DONE]"


async def _load_test(base_url: str, n_requests: int, concurrency: int, max_tokens: int, disconnect: int,
                     api_key: str | None, model: str | None, prompt: str, timeout: float,
                     verify: bool) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        before = (await client.get("/health")).json()
        streamed = list(range(0, n_requests, 2))  # even requests stream, odd ones wait for one JSON body
        drop = set(streamed[:: max(1, len(streamed) // disconnect)][:disconnect]) if disconnect else set()
        long = max(4 * max_tokens, 64)  # leavers ask for more so that they are surely still decoding when they go
        outs = [_Outcome(i, i % 2 == 0, i in drop, long if i in drop else max_tokens) for i in range(n_requests)]
        prompts = [f"{prompt} #{i}" for i in range(n_requests)]  # the id last: it steers the output most
        gate = asyncio.Semaphore(concurrency)

        async def run(out: _Outcome) -> None:
            async with gate:
                try:
                    await _one_request(client, model, prompts[out.index], out)
                except httpx.HTTPError as e:
                    out.error = f"{type(e).__name__}: {e}"

        t0 = time.perf_counter()
        await asyncio.gather(*(run(o) for o in outs))
        wall = time.perf_counter() - t0

        # Slots must drain: the leavers' rows are cancelled at their next block boundary.
        deadline, after = time.monotonic() + 30, before
        while time.monotonic() < deadline:
            after = (await client.get("/health")).json()
            if after["active"] == 0 and after["waiting"] == 0:
                break
            await asyncio.sleep(0.05)

        references: dict[int, str] = {}
        if verify:  # one at a time, non-streamed: what each prompt gives when decoded alone
            for out in outs:
                r = await client.post("/v1/completions", json={"model": model, "prompt": prompts[out.index],
                                                               "max_tokens": out.max_tokens})
                references[out.index] = r.json()["choices"][0]["text"] if r.status_code == 200 else None

    kept = [o for o in outs if not o.disconnect]
    left = [o for o in outs if o.disconnect]
    failed = [o for o in kept if o.error or o.finish_reason not in ("stop", "length")]
    all_ids = [rid for o in kept for rid in o.response_ids]
    tokens = sum(o.completion_tokens for o in kept if not o.error)
    ok = len(kept) - len(failed)
    counters = ("completed", "cancelled", "stopped", "failed", "cohorts", "rows", "blocks")
    server = {k: after[k] - before[k] for k in counters}
    server.update(largest_cohort=after["largest_cohort"], active_after=after["active"],
                  waiting_after=after["waiting"])
    server["mean_rows_per_cohort"] = server["rows"] / max(server["cohorts"], 1)
    result: dict[str, Any] = {
        "n_requests": n_requests, "concurrency": concurrency, "max_tokens": max_tokens, "disconnect": len(left),
        "succeeded": ok, "failed": len(failed), "errors": [f"#{o.index}: {o.error or o.finish_reason}"
                                                           for o in failed[:5]],
        "lost": sum(1 for o in kept if not o.response_ids),
        "duplicated": (len(all_ids) - len(set(all_ids))) + sum(1 for o in kept if len(o.response_ids) > 1),
        "wall_s": wall, "requests_per_s": ok / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_s": _quantiles([o.latency_s for o in kept if not o.error]),
        "ttft_s": _quantiles([o.ttft_s for o in kept if o.ttft_s is not None]),
        "server": server,
    }
    if verify:
        result["mismatched"] = [o.index for o in kept if o.text != references[o.index]]
        result["disconnected_prefix_ok"] = all(references[o.index] is not None and o.error is None
                                               and references[o.index].startswith(o.text) for o in left)
        result["distinct_outputs"] = len({references[o.index] for o in kept})
    return result


def load_test(base_url: str, n_requests: int = 64, concurrency: int = 16, max_tokens: int = 32,
              disconnect: int = 3, *, api_key: str | None = None, model: str | None = None,
              prompt: str = "Once upon a time", timeout: float = 300.0, verify: bool = True) -> dict[str, Any]:
    """A bounded load test against a loopback server: a fixed number of completions, then it stops.

    Request ``i`` carries its id in its prompt; even ones stream, odd ones do not. ``disconnect`` streamed requests
    ask for more tokens and hang up after their first text. With ``verify``, every prompt is then sent again alone
    (non-streamed, not timed) and each response must equal its own prompt's reference: a response given to the
    wrong request, lost, or duplicated shows up as a mismatch.

    Args:
        base_url: ``http://127.0.0.1:PORT`` (loopback only).
        n_requests: completions to send.
        concurrency: requests in flight at once.
        max_tokens: tokens per request (greedy decoding, so results are deterministic).
        disconnect: streamed requests that leave mid-stream.

    Returns:
        A dict: ``succeeded``, ``failed``, ``lost``, ``duplicated``, ``mismatched``, ``requests_per_s``,
        ``tokens_per_s``, latency quantiles, and ``server`` counters over the run (cohorts, cancelled rows, ...).
    """
    _require_loopback(base_url)
    if disconnect > (n_requests + 1) // 2:
        raise EdlmError(f"disconnect ({disconnect}) must be at most the number of streamed requests "
                        f"({(n_requests + 1) // 2})")
    return asyncio.run(_load_test(base_url, n_requests, concurrency, max_tokens, disconnect, api_key, model, prompt,
                                  timeout, verify))


def serve_bench(model_dir: str | Path, n_requests: int = 64, concurrency: int = 16, max_tokens: int = 32,
                disconnect: int = 3, max_batch: int = 16, settings: ServeSettings | None = None) -> dict[str, Any]:
    """Throughput of the real server under :func:`load_test`, batched (``max_batch``) vs one request at a time
    (``max_batch=1``), same model and process (``edlm serve-bench``)."""
    from edlm.model import DiffusionLM
    from edlm.results import machine_info

    base = settings or load_serve_settings(model_dir)
    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    runs: dict[str, Any] = {}
    for name, batch in (("batched", max_batch), ("one_at_a_time", 1)):
        cfg = dataclasses.replace(base, max_batch=batch, max_active=max(base.max_active, batch),
                                  max_queue=max(base.max_queue, n_requests), api_key=None)
        with ServerThread(create_app(cfg, Engine(dlm, cfg))) as server:
            logger.info("serve-bench: %s (max_batch=%d), %d requests, %d concurrent", name, batch, n_requests,
                        concurrency)
            runs[name] = {"max_batch": batch, **load_test(server.base_url, n_requests, concurrency, max_tokens,
                                                          disconnect)}
    b, one = runs["batched"], runs["one_at_a_time"]
    return {
        "command": f"edlm serve-bench --model {model_dir}",
        "model": str(model_dir), "machine": machine_info(),
        "settings": {**dataclasses.asdict(base), "api_key": None, "n_requests": n_requests,
                     "concurrency": concurrency, "max_tokens": max_tokens, "disconnect": disconnect},
        "runs": runs,
        "speedup": {"requests_per_s": b["requests_per_s"] / max(one["requests_per_s"], 1e-9),
                    "tokens_per_s": b["tokens_per_s"] / max(one["tokens_per_s"], 1e-9)},
    }
