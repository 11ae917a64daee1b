"""The HTTP side of the server (edlm.serve.app, edlm.serve.protocol), over real HTTP with the official client."""

import httpx
import openai
import pytest
from openai import OpenAI
from serve_helpers import (
    KEY,
    MODEL,
    expected_text,
    health,
    start,
    stream_text,
)

from edlm.config import DecodeConfig
from edlm.model import DiffusionLM

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_requests_decode_with_the_servers_defaults_unless_they_say_otherwise(model_dir, reference):
    srv, _, settings = start(model_dir, seed=5, decode=DecodeConfig(temperature=1.0, top_p=0.95, max_new_tokens=6))
    prompt = "The quick brown fox"
    ids = reference.encode(prompt, chat=False)
    with srv:
        client = OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)
        sampled = client.completions.create(model=MODEL, prompt=prompt)
        greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert sampled.usage.completion_tokens == 6
    assert sampled.choices[0].text == expected_text(reference, ids, settings, seed=5)[0]
    assert greedy.choices[0].text == expected_text(reference, ids, settings, temperature=0.0, max_new_tokens=8)[0]
    assert sampled.choices[0].text != greedy.choices[0].text[:len(sampled.choices[0].text)]
