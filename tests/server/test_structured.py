"""Structured outputs and forced tool calls through the official client, on one real server (the
demo model unquantized in float32, so batch mixing is exact) with the test PEFT adapters: outputs
parse and validate (the `jsonschema` library) across seeds at temperature 1, streamed and not, for
the base and adapters in one batch with unconstrained requests that stay equal to running alone."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import openai
import pytest

MAX_GRAMMAR_BYTES = 8192
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_PERSON = [{"role": "user", "content": "Describe a made-up person as JSON."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, adapters_dir: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "server.log"
    args = ["--model", str(demo_path), "--adapters", str(adapters_dir), "--quant", "none"]
    args += ["--compute-dtype", "float32", "--max-num-seqs", "64", "--max-waiting", "128"]
    args += ["--max-grammar-bytes", str(MAX_GRAMMAR_BYTES)]
    with launch_server(args, log) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        base = client.models.list().data[0].id
        yield SimpleNamespace(client=client, base=base, log=log)


def chat(srv, model: str, stream: bool = False, **kwargs) -> tuple[str | None, str, list]:
    """(content, finish_reason, tool calls as dicts) of a one-choice chat completion."""
    kwargs.setdefault("messages", ASK_PERSON)
    if not stream:
        choice = srv.client.chat.completions.create(model=model, **kwargs).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return choice.message.content, choice.finish_reason, calls
    content, reason, calls = "", None, {}
    for chunk in srv.client.chat.completions.create(model=model, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "type": "function"})
            entry.setdefault("function", {"name": "", "arguments": ""})
            entry["function"]["name"] += call.function.name or ""
            entry["function"]["arguments"] += call.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content or None, reason, [calls[i] for i in sorted(calls)]


def person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def test_json_schema_in_a_mixed_batch(srv):
    """20 seeds at temperature 1, base and adapters, streamed and not, batched with greedy
    unconstrained requests; those equal their runs alone."""
    constrained = [
        dict(
            model=(srv.base, "alpha", "gamma")[seed % 3],
            stream=seed % 2 == 1,
            response_format=person_format(),
            temperature=1.0,
            seed=seed,
            max_tokens=80,
        )
        for seed in range(20)
    ]
    free = [
        dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0)
        for model, prompt in [
            (srv.base, "Name three colors."),
            ("alpha", "Write a haiku about rain."),
            ("beta", "Count to five."),
            (srv.base, "What is 2 + 2?"),
        ]
    ]
    for request in free:
        request["max_tokens"] = 24
    with ThreadPoolExecutor(len(constrained) + len(free)) as pool:
        futures = [pool.submit(lambda r=r: chat(srv, **r)) for r in constrained + free]
        results = [f.result() for f in futures]
    for request, (content, reason, _) in zip(constrained, results, strict=False):
        assert reason == "stop", (request, content)
        jsonschema.validate(json.loads(content), PERSON)
    alone = [chat(srv, **r) for r in free]
    assert results[len(constrained) :] == alone


def test_json_object_outputs_are_objects(srv):
    fmt = {"type": "json_object"}
    outcomes = []
    with ThreadPoolExecutor(10) as pool:
        for seed in range(20):
            request = dict(response_format=fmt, temperature=1.0, seed=seed, max_tokens=120)
            model = srv.base if seed % 2 else "delta"
            outcomes.append(pool.submit(chat, srv, model, seed % 4 == 0, **request))
        outcomes = [f.result() for f in outcomes]
    finished = [content for content, reason, _ in outcomes if reason == "stop"]
    assert len(finished) >= 10, outcomes  # the rest ran out of max_tokens mid-object
    for content in finished:
        assert isinstance(json.loads(content), dict), content


def test_n_choices_with_logprobs_all_validate(srv):
    response = srv.client.chat.completions.create(
        model="alpha",
        messages=ASK_PERSON,
        response_format=person_format(),
        n=3,
        seed=7,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
        max_tokens=80,
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        entries = choice.logprobs.content
        text = "".join(e.token for e in entries)  # the end-of-turn token has an entry too
        assert text.removesuffix("<|im_end|>") == choice.message.content
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)


def test_stop_strings_cut_constrained_output(srv):
    full, reason, _ = chat(
        srv, srv.base, response_format=person_format(), temperature=0, max_tokens=80
    )
    assert reason == "stop" and '"age"' in full
    cut, reason, _ = chat(
        srv,
        srv.base,
        True,
        response_format=person_format(),
        temperature=0,
        max_tokens=80,
        stop=['"age"'],
    )
    assert reason == "stop" and cut == full[: full.index('"age"')]


def test_regex_and_choice_on_completions_and_chat(srv):
    pattern = r"[A-Z][a-z]{2,8} \d{1,3}"
    choices = ["positive", "negative", "neutral"]
    for seed in range(6):
        text = srv.client.completions.create(
            model=("beta", srv.base)[seed % 2],
            prompt="Name and number:",
            max_tokens=20,
            temperature=1.0,
            seed=seed,
            extra_body={"structured_outputs": {"regex": pattern}},
        ).choices[0]
        assert text.finish_reason == "stop" and re.fullmatch(pattern, text.text), text
        content, reason, _ = chat(
            srv,
            ("gamma", srv.base)[seed % 2],
            stream=seed % 2 == 0,
            messages=[{"role": "user", "content": "Sentiment of: I love it"}],
            temperature=1.0,
            seed=seed,
            max_tokens=10,
            extra_body={"structured_outputs": {"choice": choices}},
        )
        assert reason == "stop" and content in choices
    ebnf = 'root ::= "yes" | "no" | "maybe"'
    text = srv.client.completions.create(
        model=srv.base,
        prompt="Answer:",
        max_tokens=5,
        extra_body={"structured_outputs": {"grammar": ebnf}},
    )
    assert text.choices[0].text in ("yes", "no", "maybe")


def assert_calls(calls: list, tools: list, count: int | None = None) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls and (count is None or len(calls) == count), calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]]
        )


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls(srv, stream: bool):
    tools = [WEATHER, CLOCK]
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed, model in enumerate((srv.base, "alpha", "beta")):
        common = dict(messages=ASK_WEATHER, tools=tools, temperature=1.0, seed=seed, max_tokens=60)
        content, reason, calls = chat(
            srv, model, stream, tool_choice="required", parallel_tool_calls=False, **common
        )
        assert reason == "tool_calls" and content is None, (content, calls)
        assert_calls(calls, tools, count=1)
        content, reason, calls = chat(srv, model, stream, tool_choice=named, **common)
        assert reason == "tool_calls" and content is None
        assert_calls(calls, tools, count=1)
        assert calls[0]["function"]["name"] == "get_time"


def test_a_name_defined_twice_takes_either_definition(srv):
    zone = {**CLOCK, "function": {**CLOCK["function"], "description": "time in a zone"}}
    offset = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 12}},
                "required": ["offset"],
                "additionalProperties": False,
            },
        },
    }
    either = {"anyOf": [CLOCK["function"]["parameters"], offset["function"]["parameters"]]}
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(6):
        _, reason, calls = chat(
            srv,
            srv.base,
            messages=ASK_WEATHER,
            tools=[zone, offset],
            tool_choice=named,
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        assert reason == "tool_calls" and len(calls) == 1
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), either)


def test_tool_history_is_accepted(srv):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    history = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    content, reason, calls = chat(
        srv, "alpha", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert reason in ("stop", "length") and content and not calls


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs"),
        (
            {"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}},
            "structured_outputs",
        ),
        (
            {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
            "structured_outputs",
        ),
        (
            {
                "extra_body": {
                    "structured_outputs": {"choice": ["x" * 40] * (MAX_GRAMMAR_BYTES // 40)}
                }
            },
            "structured_outputs",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"if": {}}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_parameter(srv, request_fields: dict, param: str):
    with pytest.raises(openai.BadRequestError) as refused:
        srv.client.chat.completions.create(
            model=srv.base, messages=ASK_PERSON, max_tokens=4, **request_fields
        )
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param, refused.value.body
    content, reason, _ = chat(srv, srv.base, max_tokens=2)  # the server still answers
    assert reason == "length"
