"""An adapter that `loraplex train` taught on tool-call chats, served by a real `loraplex serve`
(NF4, the serving default) beside the bare base: with tool_choice auto its Hermes calls come back
as OpenAI tool_calls, whole and streamed, for cities it never saw; the base in the same batch
answers in plain text."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from tests.adapters.train.tool_chats import GET_WEATHER, HELD_OUT_CITIES, question


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, weather_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-adapter")
    shutil.copytree(weather_adapter[0], root / "adapters" / "weather")
    args = ["--model", str(demo_path), "--adapters", str(root / "adapters")]
    with launch_server(args, root / "server.log") as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        yield SimpleNamespace(client=client, base=client.models.list().data[0].id)


def ask(srv, model: str, city: str, seed: int, stream: bool) -> tuple[str | None, str, list]:
    """(content, finish_reason, [(name, arguments dict)]) of a chat with tools and tool_choice auto."""
    request = dict(
        model=model,
        messages=[question(city, seed)],
        tools=[GET_WEATHER],
        max_tokens=40,
        temperature=0,
    )
    if not stream:
        choice = srv.client.chat.completions.create(**request).choices[0]
        calls = choice.message.tool_calls or []
        pairs = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        return choice.message.content, choice.finish_reason, pairs
    content, reason, calls = "", None, []
    for chunk in srv.client.chat.completions.create(stream=True, **request):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:  # each call arrives whole, with its index
            assert call.index == len(calls) and call.id.startswith("call_")
            calls.append((call.function.name, json.loads(call.function.arguments)))
        reason = chunk.choices[0].finish_reason or reason
    return content or None, reason, calls


def test_trained_adapter_calls_the_tool_and_the_base_does_not(srv):
    jobs = [
        (model, city, seed, stream)
        for seed, city in enumerate(HELD_OUT_CITIES)
        for model in ("weather", srv.base)
        for stream in (False, True)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: ask(srv, *job), jobs))
    for (model, city, _, stream), (content, reason, calls) in zip(jobs, results, strict=True):
        if model == "weather":
            assert reason == "tool_calls" and content is None, (city, stream, content)
            assert calls == [("get_weather", {"city": city})], (city, stream)
        else:
            assert reason in ("stop", "length") and content and not calls
