"""Tool-call chats: validated, rendered as served (loader.chat), loss on the calls and answers only;
an adapter trained on them by `loraplex train` makes the demo model call get_weather for a city it
never saw in training."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from adapters.train.data import IGNORE, load_dataset
from loader.chat import render_chat
from loader.config import Config
from loader.model import load_base
from tests.adapters.train.tool_chats import (
    CITIES,
    GET_WEATHER,
    HELD_OUT_CITIES,
    question,
    tool_chat,
    write_tool_chats,
)


@pytest.fixture(scope="module")
def tok(demo_path: Path):
    return AutoTokenizer.from_pretrained(demo_path)


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def trained_text(tok, example) -> str:
    return tok.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    )


def test_tool_chat_is_rendered_as_served_with_loss_on_calls_and_answers(tmp_path, tok):
    record = tool_chat("Paris", random.Random(0), "call_0")
    data = load_dataset(write(tmp_path / "d.jsonl", [record]), tok, 1024, strict=True)
    (example,) = data.examples
    text = render_chat(tok, record["messages"], record["tools"], add_generation_prompt=False)
    assert example.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert "<tools>" in text and "<tool_response>" in text  # the Hermes fallback (SmolLM2)

    answer = record["messages"][-1]["content"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert trained_text(tok, example) == f"{call}{tok.eos_token}{answer}{tok.eos_token}"
    # Neither the tools prompt, the question nor the tool result carries loss.
    pairs = zip(example.input_ids, example.labels, strict=True)
    untrained = tok.decode([t for t, label in pairs if label == IGNORE])
    assert "<tools>" in untrained and "<tool_response>" in untrained and "Paris?" in untrained
    assert data.forms == {"messages": 1}


def call(arguments: object = '{"city": "Paris"}', **extra) -> dict:
    function = {"name": "get_weather", "arguments": arguments}
    return {"id": "c1", "type": "function", "function": function, **extra}


def chat(*messages: dict, **record) -> dict:
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}, *messages], **record}


CALL = {"role": "assistant", "tool_calls": [call()]}  # content missing is fine
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
ANSWER = {"role": "assistant", "content": "Sunny."}

BAD = [
    (chat({"role": "assistant", "tool_calls": [call("{city: Paris}")]}), "not valid JSON"),
    (chat({"role": "assistant", "tool_calls": [call('["Paris"]')]}), "JSON object"),
    (chat({"role": "assistant", "tool_calls": [call({"city": "Paris"})]}), "JSON string"),
    (chat(CALL, {"role": "tool", "content": "sunny"}, ANSWER), "needs a string 'tool_call_id'"),
    (chat(CALL, {**RESULT, "tool_call_id": "c9"}, ANSWER), "'c9' matches no earlier"),
    (chat(CALL, {**RESULT, "content": None}, ANSWER), "message 2 needs a string 'content'"),
    (chat({"role": "assistant", "tool_calls": []}), "non-empty list"),
    (chat({"role": "assistant", "tool_calls": [{**call(), "id": ""}]}), "'id'"),
    (chat({"role": "assistant", "tool_calls": [call(type="code")]}), '"type" must be'),
    (chat({"role": "assistant", "content": None}), "message 1 needs a string 'content'"),
    (chat(ANSWER, tools={"get_weather": {}}), "'tools' must be a list"),
    (chat(ANSWER, tools=[{"function": GET_WEATHER["function"]}]), '"type": "function"'),
    (chat(ANSWER, tools=[{"type": "function", "function": {}}]), "function.name"),
    (chat(ANSWER, tools=[GET_WEATHER, GET_WEATHER]), "listed twice"),
    ({"prompt": "p", "completion": "c", "tools": [GET_WEATHER]}, "only applies to"),
]


def test_malformed_tool_chats_are_invalid_with_a_clear_reason(tmp_path, tok):
    good = chat(CALL, RESULT, ANSWER, tools=[GET_WEATHER])
    data = load_dataset(write(tmp_path / "d.jsonl", [good] + [r for r, _ in BAD]), tok, 1024)
    assert len(data.examples) == 1 and data.examples[0].line == 1
    reasons = dict(data.invalid)
    assert sorted(reasons) == list(range(2, len(BAD) + 2))
    for number, (_, expected) in enumerate(BAD, start=2):
        assert expected in reasons[number], (number, reasons[number])


def test_generated_chats_are_valid_and_leave_held_out_cities_out(tmp_path, tok):
    records = write_tool_chats(tmp_path / "chats.jsonl", 30, seed=1)
    data = load_dataset(tmp_path / "chats.jsonl", tok, 512, strict=True)
    assert len(records) == len(data.examples) == 30 and data.truncated == 0
    asked = {r["messages"][0]["content"] for r in records}
    assert not any(city in q for q in asked for city in HELD_OUT_CITIES)
    assert {c for c in CITIES if any(c in q for q in asked)} == set(CITIES)
    assert records == write_tool_chats(tmp_path / "again.jsonl", 30, seed=1)


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def test_trained_adapter_calls_the_tool_for_a_held_out_city(weather_adapter, demo_path: Path):
    adapter, seconds = weather_adapter
    print(f"trained in {seconds:.1f} s")
    base = load_base(Config(model=str(demo_path)))
    tok = base.tokenizer
    model = PeftModel.from_pretrained(base.model, adapter).eval()
    for i, city in enumerate(HELD_OUT_CITIES):
        text = render_chat(tok, [question(city, seed=i)], [GET_WEATHER], add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        match = TOOL_CALL.search(reply)
        assert match, reply
        assert json.loads(match.group(1)) == {"name": "get_weather", "arguments": {"city": city}}
