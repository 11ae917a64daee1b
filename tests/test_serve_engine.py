"""The cohort scheduler (edlm.serve.engine): cohorts, fairness, cancellation and the bounded queue, seen over HTTP."""

import threading

import httpx
import pytest
from serve_helpers import KEY, expected_text, health, hold_first_request, start, wait_for

from edlm.config import DecodeConfig
from edlm.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_waiting_requests_form_one_cohort_and_each_row_is_exact(model_dir, reference):
    srv, engine, settings = start(model_dir, max_batch=4, batch_window_ms=60_000, batch_gap_ms=60_000)
    prompts = [f"[{i}] Tell me about block diffusion" for i in range(4)]
    results: dict[int, str] = {}
    with srv:
        def ask(i: int) -> None:
            r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": prompts[i], "max_tokens": 9}, timeout=60)
            results[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        h = health(srv)
    assert (h["cohorts"], h["rows"], h["largest_cohort"], h["completed"]) == (1, 4, 4, 4)
    alone = [expected_text(reference, reference.encode(p, chat=False), settings, max_new_tokens=9)[0]
             for p in prompts]
    assert [results[i] for i in range(4)] == alone
    assert len(set(alone)) > 1


def test_a_long_request_does_not_block_a_short_one_and_disconnect_frees_it(model_dir):
    # Requests are admitted at the next block boundary (no batching window), and the long request decodes only
    # while the short one is in flight, then waits for the client to hang up: the verdict counts blocks, not seconds.
    srv, engine, _ = start(model_dir, api_key=KEY, max_prompt_tokens=64, batch_window_ms=0, batch_gap_ms=0)
    trace = hold_first_request(engine, lambda jobs: jobs[0].cancel_reason is not None
                               or (len(jobs) > 1 and jobs[1].state in ("waiting", "active")))
    auth = {"Authorization": f"Bearer {KEY}"}
    with srv, httpx.Client(base_url=srv.base_url, headers=auth, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 500,
                "stream": True}) as long:
            lines = long.iter_lines()  # keep the iterator: dropping it would close the connection
            assert next(lines).startswith("data: ")  # the role chunk: the request is in
            wait_for(srv, lambda h: h["active"] == 1)
            short = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
            h = health(srv)
            assert (h["active"], h["completed"]) == (1, 1)  # the short one is done, the long one still decoding
        # Leaving the stream closes the connection: the row is cancelled at its next block boundary.
        h = wait_for(srv, lambda h: h["active"] == 0 and h["cancelled"] == 1)
        assert h["completed"] == 1
    # Round-robin, one block at a time: from its admission on, the short request waited for at most one block of
    # the long one per block of its own (trace: 0 = the long request's cohort, 1 = the short one's).
    shorts = [i for i, row in enumerate(trace) if row == 1]
    assert shorts and trace[0] == 0
    assert trace[shorts[0]:shorts[-1] + 1].count(0) <= len(shorts) - 1
    assert trace[:shorts[0]].count(0) <= 2  # admitted at the first block boundary after it arrived


def test_a_full_queue_answers_429_and_a_cancel_lets_the_next_one_in(model_dir):
    srv, engine, _ = start(model_dir, max_queue=1, max_active=1, max_batch=1, batch_window_ms=0)
    hold_first_request(engine, lambda jobs: jobs[0].cancel_reason is not None)  # the long one never finishes
    with srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        statuses: list[int] = []
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 500,
                "stream": True}) as long:
            lines = long.iter_lines()
            next(lines)
            wait_for(srv, lambda h: h["active"] == 1)
            waiter = threading.Thread(target=lambda: statuses.append(
                httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                           timeout=60).status_code))
            waiter.start()
            wait_for(srv, lambda h: h["waiting"] == 1)
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 429 and "1 requests are already waiting" in r.json()["error"]["message"]
            assert r.json()["error"]["type"] == "rate_limit_error"
        waiter.join(60)
        assert statuses == [200]  # the waiting request got the slot the disconnected stream gave back
        assert health(srv)["cancelled"] == 1
    assert not engine.running and not engine._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.base_url}/health", timeout=2)


def test_the_engine_checks_the_servers_decoding_defaults_against_the_model(model_dir):
    with pytest.raises(ConfigError, match="serve settings: decode: .*inconsistent"):
        start(model_dir, decode=DecodeConfig(block_size=6))  # the model was trained with blocks of 4
    with pytest.raises(ConfigError, match="unknown decoding policy"):
        start(model_dir, decode=DecodeConfig(policy="nope"))
