"""A bounded load test of a running ``edlm serve`` (through the official async OpenAI client), and ``serve_bench``:
the real server's throughput batched vs one request at a time."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai

from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.results import machine_info
from edlm.serve import Engine, ServerThread, ServeSettings, create_app, load_serve_settings
from edlm.table import Table

logger = logging.getLogger(__name__)


def _require_loopback(base_url: str) -> None:
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


async def _one_request(client: openai.AsyncOpenAI, model: str, prompt: str, out: _Outcome) -> None:
    """Send one completion, streamed or not, and record what came back in ``out``."""
    t0 = time.perf_counter()
    try:
        if not out.stream:
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=out.max_tokens)
            out.latency_s = time.perf_counter() - t0
            out.response_ids.append(r.id)
            out.text, out.finish_reason = r.choices[0].text, r.choices[0].finish_reason
            out.completion_tokens = r.usage.completion_tokens
            return
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out.max_tokens, stream=True,
                                                 stream_options={"include_usage": True})
        async with stream:  # leaving it early closes the connection mid-response
            async for chunk in stream:
                if chunk.id not in out.response_ids:
                    out.response_ids.append(chunk.id)
                if chunk.usage:
                    out.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    out.text += choice.text
                    out.finish_reason = choice.finish_reason or out.finish_reason
                if out.text and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                if out.disconnect and out.text:
                    return
        out.latency_s = time.perf_counter() - t0
    except openai.APIStatusError as e:
        out.error = f"HTTP {e.status_code}: {e.message[:200]}"
    except openai.APIError as e:  # a connection error, or an error event inside the stream
        out.error = f"{type(e).__name__}: {e.message}"


async def _load_test(base_url: str, n_requests: int, concurrency: int, max_tokens: int, disconnect: int,
                     api_key: str | None, model: str | None, prompt: str, timeout: float,
                     verify: bool) -> dict[str, Any]:
    # No retries: a retried request would hide a lost one, or count twice.
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key or "unused", timeout=timeout,
                                  max_retries=0) as client:
        health = lambda: client.get(f"{base_url}/health", cast_to=dict)  # outside /v1: an absolute URL
        if model is None:
            model = (await client.models.list()).data[0].id
        before = await health()
        streamed = list(range(0, n_requests, 2))  # even requests stream, odd ones wait for one JSON body
        drop = set(streamed[:: max(1, len(streamed) // disconnect)][:disconnect]) if disconnect else set()
        long = max(4 * max_tokens, 64)  # leavers ask for more so that they are surely still decoding when they go
        outs = [_Outcome(i, i % 2 == 0, i in drop, long if i in drop else max_tokens) for i in range(n_requests)]
        prompts = [f"{prompt} #{i}" for i in range(n_requests)]  # the id last: it steers the output most
        gate = asyncio.Semaphore(concurrency)

        async def run(out: _Outcome) -> None:
            async with gate:
                await _one_request(client, model, prompts[out.index], out)

        t0 = time.perf_counter()
        await asyncio.gather(*(run(o) for o in outs))
        wall = time.perf_counter() - t0

        # Slots must drain: the leavers' rows are cancelled at their next block boundary.
        deadline, after = time.monotonic() + 30, before
        while time.monotonic() < deadline:
            after = await health()
            if after["active"] == 0 and after["waiting"] == 0:
                break
            await asyncio.sleep(0.05)

        references: dict[int, str | None] = {}
        if verify:  # one at a time, non-streamed: what each prompt gives when decoded alone
            for out in outs:
                alone = _Outcome(out.index, False, False, out.max_tokens)
                await _one_request(client, model, prompts[out.index], alone)
                references[out.index] = None if alone.error else alone.text

    kept = [o for o in outs if not o.disconnect]
    left = [o for o in outs if o.disconnect]
    failed = [o for o in kept if o.error or o.finish_reason not in ("stop", "length")]
    all_ids = [rid for o in kept for rid in o.response_ids]
    tokens = sum(o.completion_tokens for o in kept if not o.error)
    ok = len(kept) - len(failed)
    counters = ("completed", "cancelled", "stopped", "failed", "cohorts", "rows", "blocks")
    server = {k: after[k] - before[k] for k in counters}
    server.update(largest_cohort=after["largest_cohort"], active_after=after["active"], waiting_after=after["waiting"],
                  mean_rows_per_cohort=server["rows"] / max(server["cohorts"], 1))
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
    (``max_batch=1``), same model and process (``edlm bench load``)."""
    base = settings or load_serve_settings(model_dir)
    dlm = DiffusionLM.from_pretrained(model_dir).eval()
    runs: dict[str, Any] = {}
    for name, batch in (("batched", max_batch), ("one_at_a_time", 1)):
        cfg = dataclasses.replace(base, max_batch=batch, max_active=max(base.max_active, batch),
                                  max_queue=max(base.max_queue, n_requests), api_key=None)
        with ServerThread(create_app(cfg, Engine(dlm, cfg))) as server:
            logger.info("bench load: %s (max_batch=%d), %d requests, %d concurrent", name, batch, n_requests,
                        concurrency)
            runs[name] = {"max_batch": batch, **load_test(server.base_url, n_requests, concurrency, max_tokens,
                                                          disconnect)}
    b, one = runs["batched"], runs["one_at_a_time"]
    return {
        "command": f"edlm bench load --model {model_dir}",
        "model": str(model_dir), "machine": machine_info(),
        "settings": {**dataclasses.asdict(base), "api_key": None, "n_requests": n_requests,
                     "concurrency": concurrency, "max_tokens": max_tokens, "disconnect": disconnect},
        "runs": runs,
        "speedup": {"requests_per_s": b["requests_per_s"] / max(one["requests_per_s"], 1e-9),
                    "tokens_per_s": b["tokens_per_s"] / max(one["tokens_per_s"], 1e-9)},
    }


def serve_bench_report(result: dict[str, Any]) -> str:
    """What ``edlm bench load`` prints: a row per run, then the batched server's speed-up."""
    t = Table("<run", "max_batch", "ok", "req/s", "tok/s", "p50 s", "rows/cohort", "left", "cancelled", "mismatched")
    for name, run in result["runs"].items():
        server = run["server"]
        t.add(name, run["max_batch"], run["succeeded"], f"{run['requests_per_s']:.2f}", f"{run['tokens_per_s']:.1f}",
              f"{run['latency_s'].get('p50', 0):.2f}", f"{server['mean_rows_per_cohort']:.1f}", run["disconnect"],
              server["cancelled"], len(run.get("mismatched", [])))
    s = result["speedup"]
    return t.text() + (f"\nbatched / one at a time: {s['requests_per_s']:.2f}x requests/s, {s['tokens_per_s']:.2f}x "
                       "tokens/s")
