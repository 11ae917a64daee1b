"""Helpers of the server tests (their fixtures are in conftest.py): start a server on a loopback port, ask it for
/health, and the library decoder's output to compare against."""

import time

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


def stream_text(chunks) -> tuple[str, list[str], str | None]:
    parts, finish = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            if piece:
                parts.append(piece)
            finish = choice.finish_reason or finish
    return "".join(parts), parts, finish
