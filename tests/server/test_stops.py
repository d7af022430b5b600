"""Incremental detokenizer and stop-string matcher, without the model (the demo tokenizer only)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from server.stops import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(demo_path):
    return AutoTokenizer.from_pretrained(demo_path)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 42 degrees.",
        "naïve café — 東京 🚀 done",
        "  leading spaces\n\nand lines",
    ],
)
def test_detokenizer_pieces_join_to_the_decoded_text(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_skips_special_tokens(tokenizer):
    ids = tokenizer("fine", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "fine"


def feed_all(stops, pieces):
    matcher = StopMatcher(stops)
    out = [matcher.feed(p) for p in pieces]
    return out, matcher


def test_stop_cuts_before_the_stop_text():
    out, matcher = feed_all(["END"], ["abc", "dEN", "Dxyz"])
    assert "".join(out) == "abcd" and matcher.stopped
    assert matcher.flush() == ""


def test_stop_prefix_is_held_back_then_released():
    out, matcher = feed_all(["END"], ["abc E", "N", "o more"])
    assert out == ["abc ", "", "ENo more"]
    assert not matcher.stopped


def test_held_tail_is_flushed_at_the_end():
    out, matcher = feed_all(["stop here"], ["go sto"])
    assert out == ["go "] and matcher.flush() == "sto"


def test_the_stop_completing_first_wins():
    out, matcher = feed_all(["world", "lo"], ["hello world"])
    assert out == ["hel"] and matcher.stopped
    out, matcher = feed_all(["abcd", "bc"], ["xabcd"])
    assert out == ["xa"]


def test_no_stops_passes_text_through():
    out, matcher = feed_all([], ["a", "b"])
    assert out == ["a", "b"] and matcher.flush() == ""


def first_stop_cut(text, stops):
    """The oracle: text cut before the stop string that completes first, character by character."""
    for end in range(len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)]
    return text


def test_random_splits_match_a_one_shot_cut():
    rng = random.Random(0)
    alphabet = "ab \n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(4, len(text) + 1)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, matcher = feed_all(stops, pieces)
        streamed = "".join(out) + matcher.flush()
        assert streamed == first_stop_cut(text, stops), (text, stops, pieces)
        for k in range(1, len(out) + 1):  # no emitted prefix ever contains a stop
            assert not any(s in "".join(out[:k]) for s in stops)
