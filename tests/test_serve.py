"""The OpenAI-compatible server, exercised over real HTTP (uvicorn on a loopback port) with the official client."""

import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import make_dlm
from openai import OpenAI

from edlm.decode import generate
from edlm.model import DiffusionLM
from edlm.bench.load import load_test
from edlm.serve import Engine, ServerThread, ServeSettings, create_app, load_serve_settings
from edlm.text import TextStream

KEY = "sk-edlm-test"
MODEL = "tiny-llama"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two intra-op threads plus the server's threads oversubscribe a 2-core machine; tiny models gain nothing.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dlm")
    make_dlm("llama", block_size=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dlm_chat")
    dlm = make_dlm("llama", block_size=4)
    dlm.tokenizer.chat_template = TEMPLATE
    dlm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """A second copy of the model for expected outputs (the server's copy belongs to its worker thread)."""
    return DiffusionLM.from_pretrained(model_dir).eval()


def start(model_dir, **fields) -> tuple[ServerThread, Engine, ServeSettings]:
    settings = ServeSettings(model_id=MODEL, **fields)
    engine = Engine.from_pretrained(model_dir, settings)
    return ServerThread(create_app(settings, engine)), engine, settings


@pytest.fixture(scope="module")
def server(model_dir):
    srv, engine, settings = start(model_dir, api_key=KEY, max_prompt_tokens=64)
    with srv:
        yield srv, engine, settings
    assert not engine.running  # the lifespan stopped the worker


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server[0].base_url}/v1", api_key=KEY, max_retries=0)


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


# ------------------------------------------------------------------------------------------------ basics


def test_health_and_models_list_the_served_model(server, client):
    srv, _, _ = server
    h = health(srv)  # no key needed: load balancers probe it
    assert h["status"] == "ok" and h["model"] == MODEL
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_the_library_decoder_with_usage(server, client, reference):
    _, _, settings = server
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, extra_body={"threshold": 0.5})
    ids = reference.encode(prompt, chat=False)
    text, n = expected_text(reference, ids, settings, max_new_tokens=10, threshold=0.5)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    assert n == 10 and r.object == "text_completion" and r.model == MODEL


def test_each_decoding_mode_matches_the_library_and_speculative_gives_the_ar_text(server, client, reference):
    _, _, settings = server
    prompt = "Once upon a time"
    ids = reference.encode(prompt, chat=False)
    texts = {}
    for mode in ("diffusion", "ar", "speculative"):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, extra_body={"mode": mode})
        texts[mode] = r.choices[0].text
        assert texts[mode] == expected_text(reference, ids, settings, max_new_tokens=9, mode=mode)[0]
    assert texts["speculative"] == texts["ar"]


def test_streamed_text_equals_the_non_streamed_text(client):
    prompt = "request 0001: write a line"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, seed=3)
    text, parts, finish = stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, seed=3,
                                                                stream=True))
    assert text == whole.choices[0].text and finish == "length"
    assert len(parts) >= 3  # block by block (block size 4), not one final chunk

    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text, _, finish = stream_text(chunks)
    assert text == whole.choices[0].message.content and finish == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_same_seed_same_sampled_text_streamed_or_not(server, client, reference):
    _, _, settings = server
    prompt = "The quick brown fox"
    args = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **args).choices[0].text
    streamed, _, _ = stream_text(client.completions.create(seed=7, stream=True, **args))
    other = client.completions.create(seed=8, **args).choices[0].text
    ids = reference.encode(prompt, chat=False)
    expected, _ = expected_text(reference, ids, settings, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert a == streamed == expected
    assert other != a  # the seed matters: the check above is not vacuous


def test_chat_without_template_joins_the_messages(server, client, reference):
    _, _, settings = server
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    ids = reference.tokenizer("You are terse.\nName a colour.", add_special_tokens=False)["input_ids"]
    text, _ = expected_text(reference, ids, settings, max_new_tokens=8)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_chat_uses_the_tokenizers_chat_template(chat_model_dir):
    srv, _, settings = start(chat_model_dir)
    dlm = DiffusionLM.from_pretrained(chat_model_dir).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    templated = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert dlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == templated
    with srv:
        client = OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        ids = dlm.tokenizer(templated, add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == expected_text(dlm, ids, settings, max_new_tokens=8)[0]
        single = client.chat.completions.create(model=MODEL, messages=messages[1:], max_tokens=4)
        assert single.usage.prompt_tokens == len(dlm.encode("Hi", chat=True)) == len("<|user|>Hi\n<|assistant|>")


def test_stop_string_cuts_the_text_and_stops_decoding(client):
    prompt, n = "Once upon a time", 24
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n).choices[0].text
    # A stop string taken from the free output (first seen after position 2) so that the cut is observable.
    stop = next(free[i:i + 2] for i in range(2, len(free) // 2)
                if free[i:i + 2].isprintable() and "\ufffd" not in free[i:i + 2] and free.find(free[i:i + 2]) == i)
    cut = free[: free.index(stop)]
    assert 2 <= len(cut) < len(free)
    for stops in (stop, [stop, "never-appears"]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stop=stops)
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < n  # the row was cancelled, not decoded to the end
    text, _, finish = stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stop=stop,
                                                            stream=True))
    assert text == cut and finish == "stop"


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    utf8 = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    euro = list("€".encode())  # 3 bytes
    t = TextStream(utf8, stop=[])
    assert [t.push([ord("a"), euro[0]]), t.push(euro[1:2]), t.push(euro[2:] + [ord("b")])] == \
        [("a", False), ("", False), ("€b", False)]
    t = TextStream(utf8, stop=["STOP"])
    assert t.push(list(b"go ST")) == ("go ", False)  # "ST" may start the stop string: held
    assert t.push(list(b"OP and more")) == ("", True)  # the stop string spans two blocks
    assert t.sent == "go "
    t = TextStream(utf8, stop=["STOP"])
    assert (t.push(list(b"a ST")), t.push(list(b"ART")), t.flush()) == (("a ", False), ("START", False), "")
    t = TextStream(utf8, stop=["zz"])
    assert (t.push([ord("x"), euro[0]]), t.flush()) == (("x", False), "\ufffd")  # a dangling byte is sent at the end


# ------------------------------------------------------------------------------------------------ errors


def test_bad_requests_get_openai_style_errors(server, client):
    srv, _, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x" * 100, max_tokens=4)
    assert e.value.status_code == 400 and "prompt has 100 tokens" in e.value.message and "at most 64" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=513)
    assert "above this server's limit of 512" in e.value.message and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.param == "n" and "one choice per request" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"block_size": 6})
    assert "inconsistent" in e.value.message

    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{srv.base_url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": ', timeout=10,
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{srv.base_url}/v1/completions", json={"max_tokens": 4}, headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # a 422 in plain FastAPI
    r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 0}, headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{srv.base_url}/v1/embeddings", json={"input": "hi"}, headers=auth, timeout=10)
    assert r.status_code == 404 and "unknown route" in r.json()["error"]["message"]
    ok = httpx.post(f"{srv.base_url}/v1/completions", headers=auth, timeout=10,
                    json={"prompt": "hi", "max_tokens": 2, "logit_bias": {}, "user": "u1", "echo": False})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2  # unknown fields are ignored


BAD_VALUES = [("temperature", 99), ("temperature", -1), ("temperature", 2.01), ("temperature", "hot"),
              ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("max_tokens", 0), ("max_tokens", -3),
              ("threshold", 0), ("threshold", 2), ("threshold", -0.5), ("block_size", 0), ("block_size", -4),
              ("mode", "jacobi")]
ENDPOINTS = {"completions": {"prompt": "hi"}, "chat/completions": {"messages": [{"role": "user", "content": "hi"}]}}


@pytest.mark.parametrize(("endpoint", "field", "value"), [(e, f, v) for e in ENDPOINTS for f, v in BAD_VALUES]
                         + [("chat/completions", "max_completion_tokens", 0)])
def test_out_of_range_sampling_fields_get_400_naming_the_field(server, endpoint, field, value):
    srv, _, _ = server
    r = httpx.post(f"{srv.base_url}/v1/{endpoint}", json={**ENDPOINTS[endpoint], "max_tokens": 2, field: value},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400, r.text  # OpenAI answers 400 (FastAPI's default would be 422, or a 200 decode)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_boundary_sampling_values_are_accepted(server, endpoint):
    srv, _, _ = server
    for fields in ({"temperature": 0}, {"temperature": 2, "top_p": 1, "seed": 3}, {"threshold": 1, "block_size": 1}):
        r = httpx.post(f"{srv.base_url}/v1/{endpoint}", json={**ENDPOINTS[endpoint], "max_tokens": 2, **fields},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200, (fields, r.text)
        assert r.json()["usage"]["completion_tokens"] == 2


def test_api_key_is_required_on_v1(server):
    srv, _, _ = server
    r = httpx.get(f"{srv.base_url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi"}, timeout=10,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{srv.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_settings_read_the_api_key_from_the_environment(tmp_path):
    s = load_serve_settings(tmp_path / "my-model", ["max_batch=4"], env={"EDLM_API_KEY": "k1"}, port=9001)
    assert (s.model_id, s.api_key, s.max_batch, s.port) == ("my-model", "k1", 4, 9001)
    assert load_serve_settings(tmp_path, env={"EDLM_API_KEY": "k1"}, api_key="k2").api_key == "k2"
    with pytest.raises(ValueError, match="max_batch"):
        ServeSettings(max_batch=0)


# ------------------------------------------------------------------------------------------------ scheduling


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


def test_a_long_request_does_not_block_a_short_one_and_disconnect_frees_it(server):
    srv, _, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    base = health(srv)
    with httpx.Client(base_url=srv.base_url, headers=auth, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 500,
                "stream": True}) as long:
            lines = long.iter_lines()  # keep the iterator: dropping it would close the connection
            assert next(lines).startswith("data: ")  # the role chunk: the request is in
            wait_for(srv, lambda h: h["active"] == 1)
            t0 = time.perf_counter()
            short = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            short_s = time.perf_counter() - t0
            assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
            assert health(srv)["active"] == 1  # the long one is still decoding
        # Leaving the stream closes the connection: the row is cancelled at its next block boundary.
        h = wait_for(srv, lambda h: h["active"] == 0 and h["cancelled"] == base["cancelled"] + 1)
    assert h["completed"] == base["completed"] + 1
    assert short_s < 5.0


def test_a_full_queue_answers_429_and_a_cancel_lets_the_next_one_in(model_dir):
    srv, engine, _ = start(model_dir, max_queue=1, max_active=1, max_batch=1, batch_window_ms=0)
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


def test_small_load_test_loses_nothing(server):
    srv, _, _ = server
    result = load_test(srv.base_url, n_requests=16, concurrency=4, max_tokens=16, disconnect=1, api_key=KEY)
    assert (result["succeeded"], result["failed"], result["lost"], result["duplicated"]) == (15, 0, 0, 0)
    assert result["mismatched"] == [] and result["disconnected_prefix_ok"]
    assert result["distinct_outputs"] >= 10  # responses differ by prompt, so a mix-up would show
    server_side = result["server"]
    assert (server_side["rows"], server_side["completed"], server_side["cancelled"]) == (16, 15, 1)
    assert server_side["active_after"] == server_side["waiting_after"] == 0
    assert result["completion_tokens"] == 15 * 16 and result["requests_per_s"] > 0
    with pytest.raises(Exception, match="loopback"):
        load_test("http://example.com:80", n_requests=1)
