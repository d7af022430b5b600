"""Training data: the three JSONL forms, their loss masks, and the reporting of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapters.train.data import IGNORE, DataError, collate, load_dataset, split


@pytest.fixture(scope="module")
def tok(demo_path: Path):
    return AutoTokenizer.from_pretrained(demo_path)


def write(path: Path, lines: list[object | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def trained_text(tok, example) -> str:
    return tok.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    )


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": "Green."},
    ]
}


def test_chat_loss_only_on_assistant_turns_and_end_of_turn(tmp_path, tok):
    data = load_dataset(write(tmp_path / "d.jsonl", [CHAT]), tok, 512)
    (example,) = data.examples
    assert trained_text(tok, example) == f"Blue.{tok.eos_token}Green.{tok.eos_token}"
    assert (
        example.input_ids
        == tok.apply_chat_template(CHAT["messages"], return_dict=True)["input_ids"]
    )


def test_prompt_completion_and_text_forms(tmp_path, tok):
    lines = [{"prompt": "2 + 2 =", "completion": " 4"}, {"text": "plain words"}]
    data = load_dataset(write(tmp_path / "d.jsonl", lines), tok, 512)
    completion, text = data.examples
    assert trained_text(tok, completion) == f" 4{tok.eos_token}"
    assert tok.decode(completion.input_ids) == f"2 + 2 = 4{tok.eos_token}"
    assert text.labels == text.input_ids and tok.decode(text.input_ids).startswith("plain words")
    assert dict(data.forms) == {"prompt": 1, "text": 1}


def test_bad_lines_are_reported_with_line_numbers(tmp_path, tok, caplog):
    lines = [
        {"text": "fine"},
        "{not json",
        "",
        {"foo": 1},
        [1, 2],
        {"prompt": "p"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"prompt": "p", "completion": "c", "text": "t"},
        {"messages": [{"role": "robot", "content": "x"}]},
    ]
    with caplog.at_level(logging.WARNING, logger="loraplex.train"):
        data = load_dataset(write(tmp_path / "d.jsonl", lines), tok, 512)
    assert len(data.examples) == 1
    assert [n for n, _ in data.invalid] == [2, 4, 5, 6, 7, 8, 9]
    reasons = dict(data.invalid)
    assert "invalid JSON" in reasons[2] and "assistant" in reasons[7] and "role" in reasons[9]
    assert "line 2:" in caplog.text and "line 9:" in caplog.text
    with pytest.raises(DataError, match="7 invalid lines"):
        load_dataset(tmp_path / "d.jsonl", tok, 512, strict=True)


@pytest.mark.parametrize("content", ["", "\n\n", "nope\n[]\n"])
def test_empty_or_all_invalid_file_is_a_clear_error(tmp_path, tok, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty file|no usable example"):
        load_dataset(path, tok, 512)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl", tok, 512)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tok, caplog):
    long_text = {"text": "word " * 100}
    long_answer = {"prompt": "x " * 50, "completion": "y"}
    path = write(tmp_path / "d.jsonl", [long_text, long_answer, {"text": "short"}])
    with caplog.at_level(logging.INFO, logger="loraplex.train"):
        kept = load_dataset(path, tok, 16)
    assert (kept.truncated, kept.dropped, len(kept.examples)) == (2, 1, 2)
    assert all(len(e.input_ids) <= 16 for e in kept.examples)
    assert "2 examples truncated to max_len=16, 1 dropped" in caplog.text
    dropped = load_dataset(path, tok, 16, overlong="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped.examples)) == (0, 2, 1)


def test_split_and_collate(tmp_path, tok):
    data = load_dataset(
        write(tmp_path / "d.jsonl", [{"text": f"n {i}" * (i + 1)} for i in range(20)]), tok, 64
    )
    train, held = split(data.examples, 0.1, seed=3)
    assert (len(train), len(held)) == (18, 2)
    assert split(data.examples, 0.1, seed=3)[1] == held and split(data.examples, 5, 0)[1] != held
    batch = collate(train[:3], tok.pad_token_id)
    width = max(len(e.input_ids) for e in train[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(len(e.input_ids) for e in train[:3])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
