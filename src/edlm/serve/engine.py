"""The cohort scheduler of ``edlm serve``: jobs of token ids in, blocks of token ids out.

A background worker thread owns the model. At every block boundary it admits waiting jobs as cohorts (same
DecodeConfig, at most ``max_batch`` rows, one ``iter_steps`` call each) and advances the active cohorts
round-robin, one block at a time. Results go back to each job's asyncio loop as events; a job cancelled by its
handler (stop string, client gone) is dropped by ``should_stop`` at its cohort's next block boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from edlm.api import DraftedLM
from edlm.config import DecodeConfig
from edlm.decode import DecodeStats, iter_steps, validate
from edlm.drafter import Drafter, drafter_source
from edlm.engine import compile_model
from edlm.errors import ConfigError, EdlmError
from edlm.loading import load, load_ar
from edlm.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


class QueueFullError(EdlmError):
    """The engine's waiting queue is full (HTTP 429)."""


class EngineStoppedError(EdlmError):
    """The engine is not running (HTTP 503)."""


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
    """How to decode it; jobs with the same cohort key share one ``iter_steps`` call."""
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
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(eq=False)
class _Cohort:
    jobs: list[Job]
    """Its rows, in ``iter_steps`` row order."""
    steps: Generator[tuple[list[list[int]], DecodeStats], None, None]
    """The cohort's ``iter_steps`` call; each ``next`` decodes one block for all rows."""


class Engine:
    """Owns the model; a background worker thread decodes cohorts of jobs block by block, round-robin.

    Args:
        dlm: a loaded :class:`edlm.model.DiffusionLM` in eval mode.
        settings: queue and batching limits (``max_queue``, ``max_batch``, ``max_active``, ``batch_window_ms``,
            ``batch_gap_ms``).
    """

    def __init__(self, dlm: Any, settings: ServeSettings):
        try:  # the server-wide decoding defaults must suit this model (policy, block size, context)
            validate(dlm, [[0]], settings.decode)
        except EdlmError as e:
            raise ConfigError(f"serve settings: decode: {e}") from None
        self.dlm = dlm
        self.settings = settings
        # A source with a block drafter (edlm.api.DraftedLM) brings its own decoder.
        self._iter_steps = getattr(dlm, "iter_steps", None) or functools.partial(iter_steps, dlm)
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
        return cls(load(model_dir, settings.dtype, device=device, compile=settings.compile), settings)

    @classmethod
    def from_drafter(cls, drafter_dir: str | Path, settings: ServeSettings, source: str | None = None) -> Engine:
        """An unmodified AR source (default: the one the drafter folder names) with its block drafter, the source
        in ``settings.dtype`` (on the compiled engine when ``settings.compile`` or the dtype is not fp32)."""
        source_model, tokenizer = load_ar(source or drafter_source(drafter_dir), "fp32")
        drafter = Drafter.load(drafter_dir, source_model)
        model = compile_model(source_model, settings.dtype, compile=settings.compile,
                              exact_widths=drafter.cfg.block_size) \
            if settings.compile or settings.dtype != "fp32" else source_model
        return cls(DraftedLM(model, drafter, tokenizer), settings)

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
                while (admitted := self._admit()) is not None:
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
                steps = self._iter_steps([j.prompt for j in rows], rows[0].cfg,
                                         should_stop=lambda r, jobs=rows: self._row_stopped(jobs[r]),
                                         seeds=[j.cfg.seed for j in rows])
                cohorts.append(_Cohort(rows, steps))
                self._counts["cohorts"] += 1
                self._counts["rows"] += len(rows)
                self._counts["largest_cohort"] = max(self._counts["largest_cohort"], len(rows))
                logger.debug("cohort of %d row(s) admitted (%d active rows)", len(rows), self._busy)
        return cohorts

    def _row_stopped(self, job: Job) -> bool:
        """``should_stop`` of iter_steps: the row is done, or the handler cancelled it."""
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
