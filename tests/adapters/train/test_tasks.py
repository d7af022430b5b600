"""Demo tasks: deterministic, held-out prompts never trained on, exact scoring that cannot be gamed."""

from __future__ import annotations

import json

import pytest

from adapters.train import tasks


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_held_out_is_fixed_and_disjoint_from_training(task):
    held = tasks.held_out(task, 20)
    assert held == tasks.held_out(task, 20) and len({c.prompt for c in held}) == 20
    train = tasks.examples(task, 2000, seed=0)
    assert not {c.prompt for c in train} & {c.prompt for c in tasks.held_out(task, 200)}
    assert tasks.examples(task, 5, seed=1) != tasks.examples(task, 5, seed=0)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_right_answers_score_one_and_wrong_ones_zero(task):
    held = tasks.held_out(task, 20)
    assert tasks.score(task, [c.answer for c in held]) == 1.0
    assert tasks.score(task, [held[0].answer] * 20) == pytest.approx(1 / 20)
    assert tasks.score(task, [c.answer.upper() + " extra" for c in held]) == 0.0


def test_checks_are_exact_about_content():
    digits = tasks.Case("Spell each digit of 407 as a word.", "four zero seven")
    assert tasks.check("digits", digits, "Four, zero, seven.")
    assert not tasks.check("digits", digits, "four hundred seven")
    person = tasks.Case("...", json.dumps({"name": "Mei", "age": 70, "city": "Pune"}))
    assert tasks.check("json", person, ' {"city": "Pune", "age": 70, "name": "Mei"}\n')
    assert not tasks.check("json", person, '{"name": "Mei", "age": "70", "city": "Pune"}')
    assert not tasks.check("json", person, 'Sure: {"name": "Mei", "age": 70, "city": "Pune"}')
    words = tasks.Case("Reverse the order of these words: a b c", "stone river apple")
    assert not tasks.check("reverse", words, "apple river stone")


def test_jsonl_writer(tmp_path):
    path = tasks.write_jsonl("reverse", tmp_path / "r.jsonl", 7, seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 7 and rows[0]["messages"][1]["role"] == "assistant"
    with pytest.raises(ValueError, match="unknown task"):
        tasks.held_out("caps")
