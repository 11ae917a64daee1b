"""Helpers of the server tests (their fixtures are in conftest.py): start a server on a loopback port, ask it for
/health, and the library decoder's output to compare against."""

import threading
import time
from collections.abc import Callable

import httpx

from edlm.decode import generate
from edlm.serve import Engine, ServerThread, ServeSettings, create_app

KEY = "sk-edlm-test"
MODEL = "tiny-llama"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def start(model_dir, **fields) -> tuple[ServerThread, Engine, ServeSettings]:
    settings = ServeSettings(model_id=MODEL, **fields)
    engine = Engine.from_pretrained(model_dir, settings)
    return ServerThread(create_app(settings, engine)), engine, settings


def expected_text(dlm, ids, settings, **fields) -> tuple[str, int]:
    out = generate(dlm, [ids], settings.decode_config(**fields))
    return dlm.tokenizer.decode(out.sequences[0], skip_special_tokens=True), len(out.sequences[0])


def health(srv) -> dict:
    r = httpx.get(f"{srv.base_url}/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_for(srv, predicate, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(srv)
        if predicate(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"server never reached the expected state; last /health: {h}")


def hold_first_request(engine, until: Callable[[list], bool]) -> list[int]:
    """Test-only hook that takes the machine's speed out of a scheduling test: before each block of the first
    request submitted, the worker waits (60 s at most) until ``until(jobs)`` holds, ``jobs`` being the engine's jobs
    in submission order. Otherwise a fast machine can finish a "long" request before the test's next request is
    even sent. Returns the trace: the index in ``jobs`` of the first row of each cohort advanced, in order."""
    jobs, trace = [], []
    changed = threading.Condition()
    submit, cancel, advance = engine.submit, engine.cancel, engine._advance

    def submit_(job) -> None:
        with changed:
            jobs.append(job)  # before the worker can see it
        try:
            submit(job)
        except Exception:  # refused (queue full): never a job of the engine's
            with changed:
                jobs.remove(job)
            raise
        with changed:
            changed.notify_all()

    def cancel_(job, reason: str) -> None:
        cancel(job, reason)
        with changed:
            changed.notify_all()

    def advance_(cohort) -> bool:
        if cohort.jobs[0] is jobs[0]:
            with changed:
                changed.wait_for(lambda: until(jobs), timeout=60)
        trace.append(next(i for i, job in enumerate(jobs) if job is cohort.jobs[0]))
        return advance(cohort)

    engine.submit, engine.cancel, engine._advance = submit_, cancel_, advance_
    return trace


def stream_text(chunks) -> tuple[str, list[str], str | None]:
    parts, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            if piece:
                parts.append(piece)
            finish = choice.finish_reason or finish
    return "".join(parts), parts, finish
