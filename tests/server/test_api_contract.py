"""The HTTP contract over a scripted fake engine: error shapes, parameters, stops, n, SSE, metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

BASE = "fake-base"
CHAT = [{"role": "user", "content": "hi"}]


def completion(client, **fields):
    return client.post("/v1/completions", json={"model": BASE, "prompt": "Count:", **fields})


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, **fields})


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_payloads(text):
    """The data payloads of an SSE body, checking the framing."""
    events = text.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(event.removeprefix("data: "))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"stream_options": {"include_usage": True, "x": 1}, "stream": True}, "stream_options.x"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"model": None}, "model"),
    ],
)
def test_completion_invalid_parameters_are_400_naming_the_field(fake_client, fields, param):
    assert_error(completion(fake_client, **fields), 400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi", "foo": 1}]}, "messages.0.foo"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        ({"messages": []}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_chat_invalid_parameters_are_400_naming_the_field(fake_client, fields, param):
    assert_error(chat(fake_client, **fields), 400, param)


def test_neutral_values_of_unsupported_fields_are_accepted(fake_client):
    fields = {"presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1", "logit_bias": {}}
    assert completion(fake_client, echo=False, best_of=1, max_tokens=2, **fields).status_code == 200
    ok = chat(fake_client, max_tokens=2, tool_choice="none", response_format={"type": "text"})
    assert ok.status_code == 200


def test_bad_bodies_and_routes_keep_the_openai_shape(fake_client):
    bad_json = fake_client.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_error(bad_json, 400)
    assert_error(fake_client.post("/v1/completions", json=[1, 2]), 400)
    assert_error(fake_client.get("/v1/nothing"), 404)
    assert_error(fake_client.get("/v1/completions"), 405)


def test_engine_refusals_map_to_status_codes(fake_client, fake_engine):
    assert_error(completion(fake_client, model="nope"), 404, "model", "model_not_found")
    assert_error(completion(fake_client, max_tokens=1000), 400, code="context_length_exceeded")
    fake_engine.overloaded = True
    assert_error(chat(fake_client, stream=True), 429, code="overloaded")
    fake_engine.overloaded = False
    fake_engine.fail = True
    assert_error(completion(fake_client), 500, code="internal_error")


def test_an_engine_failure_before_the_first_token_is_an_http_error(fake_client, fake_engine):
    fake_engine.first_error = "adapter_unavailable"
    assert_error(chat(fake_client, stream=True), 503, code="adapter_unavailable")
    fake_engine.first_error = ""
    assert_error(completion(fake_client), 500, code="internal_error")


def test_api_key_guards_v1_only(fake_engine, fake_client_with):
    client = fake_client_with(fake_engine, api_key="s3cret")
    assert_error(client.get("/v1/models"), 401, code="invalid_api_key")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_models_lists_base_and_adapters_with_parent(fake_client):
    data = fake_client.get("/v1/models").json()
    assert data["object"] == "list"
    by_id = {m["id"]: m for m in data["data"]}
    assert by_id[BASE]["parent"] is None and by_id["ad1"]["parent"] == BASE
    assert all(m["object"] == "model" for m in data["data"])


def test_model_name_selects_the_adapter(fake_client, fake_engine):
    completion(fake_client, model="ad1", max_tokens=1)
    completion(fake_client, max_tokens=1)
    assert [call[1] for call in fake_engine.calls] == ["ad1", None]


def test_stop_string_cuts_text_and_aborts_the_engine_request(fake_client, fake_engine):
    fake_engine.delay_s = 0.02  # still generating when the stop string appears
    body = completion(fake_client, max_tokens=10, stop=["three fo", "zzz"]).json()
    choice = body["choices"][0]
    assert choice["text"] == " one two " and choice["finish_reason"] == "stop"
    assert fake_engine.aborted, "a stop string must abort the engine request"
    assert not fake_engine.active
    assert body["usage"]["completion_tokens"] == 4


def test_streamed_stop_never_leaks_stop_text(fake_client):
    with fake_client.stream(
        "POST",
        "/v1/completions",
        json={"model": BASE, "prompt": "x", "max_tokens": 10, "stop": " four", "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_payloads(response.read().decode())
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == " one two three"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_length_and_natural_stop_finish_reasons(fake_client, fake_engine):
    assert completion(fake_client, max_tokens=2).json()["choices"][0]["finish_reason"] == "length"
    full = completion(fake_client, max_tokens=100).json()["choices"][0]
    assert full == {
        "index": 0,
        "text": fake_engine.script_text,
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_n_and_prompt_lists_make_one_choice_each_with_seeds(fake_client, fake_engine):
    body = completion(fake_client, prompt=["a", "b"], n=2, seed=7, max_tokens=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    seeds = sorted(call[2].seed for call in fake_engine.calls)
    assert seeds == [7, 7, 8, 8]
    assert body["usage"]["completion_tokens"] == 12


def test_completion_logprobs_shape(fake_client):
    logprobs = completion(fake_client, max_tokens=3, logprobs=2).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" one", " two", " three"]
    assert logprobs["token_logprobs"] == [-0.5] * 3
    assert logprobs["text_offset"] == [0, 4, 8]
    assert logprobs["top_logprobs"][0] == {" one": -0.5}


def test_chat_logprobs_shape(fake_client):
    choice = chat(fake_client, max_tokens=2, logprobs=True, top_logprobs=1).json()["choices"][0]
    first = choice["logprobs"]["content"][0]
    assert first["token"] == " one" and first["bytes"] == list(b" one")
    assert first["top_logprobs"][0]["logprob"] == -0.5
    assert choice["message"] == {"role": "assistant", "content": " one two", "refusal": None}


def test_chat_stream_framing_role_then_content_then_usage(fake_client):
    with fake_client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": BASE,
            "messages": CHAT,
            "max_completion_tokens": 3,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        chunks = sse_payloads(response.read().decode())
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == " one two three"
        assert mine[-1]["finish_reason"] == "length"


def test_metrics_count_requests_tokens_and_unknown_adapters(fake_client):
    completion(fake_client, max_tokens=3)
    completion(fake_client, model="ad1", max_tokens=2)
    completion(fake_client, model="not-an-adapter")
    text = fake_client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = (("route", "/v1/completions"), ("status", "200"))
    assert samples[("loraplex_http_requests_total", route)] == 2
    assert samples[("loraplex_adapter_requests_total", (("adapter", "unknown"),))] == 1
    assert samples[("loraplex_adapter_generated_tokens_total", (("adapter", "ad1"),))] == 2
    assert samples[("loraplex_generated_tokens_total", ())] == 5
    assert samples[("loraplex_time_to_first_token_seconds_count", ())] == 2
    assert samples[("loraplex_inter_token_latency_seconds_count", ())] == 3
    assert ("loraplex_running_sequences", ()) in samples
    assert ("loraplex_kv_usage_ratio", ()) in samples
