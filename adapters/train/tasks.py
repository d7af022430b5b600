"""Demo tasks whose effect is objectively checkable: generators of chat examples and exact scorers.

Each task makes (prompt, answer) cases from a seeded RNG. `held_out(task)` is a fixed set that the
training generator never emits, so a score on it measures generalisation, not recall. Scoring is an
exact check of the answer's content (not a surface style such as capitals, which is easy to game), and
is shared by the trainer, the tests and the engine's adapter-equality tests.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SEED = 20_240_601
HELD_OUT_MAX = 200

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAMES = (
    "Maria", "Ahmed", "Lena", "Kofi", "Yuki", "Pedro", "Ingrid", "Ravi", "Chloe", "Tomasz",
    "Amara", "Lucas", "Mei", "Omar", "Sofia", "Jonas", "Priya", "Diego", "Hana", "Felix",
    "Zara", "Mateo", "Elif", "Noah", "Aisha", "Ivan", "Nora", "Kenji", "Lucia", "Samuel",
)  # fmt: skip
CITIES = (
    "Lisbon", "Cairo", "Oslo", "Accra", "Kyoto", "Lima", "Bergen", "Pune", "Lyon", "Gdansk",
    "Lagos", "Porto", "Chengdu", "Tunis", "Seville", "Munich", "Mysore", "Quito", "Busan", "Graz",
)  # fmt: skip
WORDS = (
    "apple", "river", "stone", "cloud", "garden", "pencil", "window", "tiger", "candle", "bridge",
    "forest", "mirror", "rocket", "violin", "basket", "planet", "ladder", "orange", "castle", "meadow",
    "hammer", "island", "jacket", "kettle", "lemon", "marble", "needle", "pillow", "saddle", "tunnel",
    "wallet", "anchor", "button", "carpet", "dragon", "engine", "feather", "guitar", "helmet", "lantern",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One task instance: the user's prompt and the exact expected assistant answer."""

    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The case as chat messages (user turn, plus the assistant turn when with_answer)."""
        turns = [{"role": "user", "content": self.prompt}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


def _digits(rng: random.Random) -> Case:
    length = rng.randint(3, 7)
    number = str(rng.randint(10 ** (length - 1), 10**length - 1))
    answer = " ".join(DIGIT_WORDS[int(d)] for d in number)
    return Case(f"Spell each digit of {number} as a word.", answer)


def _json(rng: random.Random) -> Case:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
    answer = json.dumps({"name": name, "age": age, "city": city})
    prompt = (
        f"{name} is {age} years old and lives in {city}. "
        'Reply only with JSON of the form {"name": str, "age": int, "city": str}.'
    )
    return Case(prompt, answer)


def _reverse(rng: random.Random) -> Case:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return Case(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


def _words(text: str) -> list[str]:
    """Lowercase words of text, ignoring punctuation between them."""
    return re.findall(r"[a-z]+", text.lower())


def _check_words(case: Case, output: str) -> bool:
    return _words(output) == _words(case.answer)


def _check_json(case: Case, output: str) -> bool:
    try:
        got = json.loads(output.strip())
    except json.JSONDecodeError:
        return False
    want = json.loads(case.answer)
    return got == want and all(type(got[k]) is type(want[k]) for k in want)


TASKS: dict[str, tuple[Callable[[random.Random], Case], Callable[[Case, str], bool]]] = {
    "digits": (_digits, _check_words),
    "json": (_json, _check_json),
    "reverse": (_reverse, _check_words),
}


def _task(task: str) -> tuple[Callable[[random.Random], Case], Callable[[Case, str], bool]]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task]


def held_out(task: str, n: int = 20) -> list[Case]:
    """The first n of the task's fixed held-out cases (distinct prompts, never used for training)."""
    if not 0 < n <= HELD_OUT_MAX:
        raise ValueError(f"held-out size must be in 1..{HELD_OUT_MAX}, got {n}")
    make, _ = _task(task)
    rng = random.Random(f"{task}:{HELD_OUT_SEED}")
    cases: dict[str, Case] = {}
    while len(cases) < HELD_OUT_MAX:
        case = make(rng)
        cases.setdefault(case.prompt, case)
    return list(cases.values())[:n]


def examples(task: str, n: int, seed: int = 0) -> list[Case]:
    """n training cases from seed, none of whose prompts is in the held-out set."""
    make, _ = _task(task)
    reserved = {case.prompt for case in held_out(task, HELD_OUT_MAX)}
    rng = random.Random(f"{task}:{seed}")
    out: list[Case] = []
    while len(out) < n:
        case = make(rng)
        if case.prompt not in reserved:
            out.append(case)
    return out


def check(task: str, case: Case, output: str) -> bool:
    """Whether output is an exactly right answer to case."""
    return _task(task)[1](case, output)


def score(task: str, outputs: Sequence[str], cases: Sequence[Case] | None = None) -> float:
    """Fraction of outputs that exactly answer their case (default cases: held_out(task, len))."""
    if cases is None:
        cases = held_out(task, len(outputs))
    if len(cases) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(cases)} cases")
    if not outputs:
        raise ValueError("no outputs to score")
    return sum(check(task, c, o) for c, o in zip(cases, outputs, strict=True)) / len(outputs)


def write_jsonl(task: str, path: Path, n: int, seed: int = 0) -> Path:
    """Write n training cases of task to path as chat-form JSONL ({"messages": [...]})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": c.messages()}) for c in examples(task, n, seed)]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m adapters.train.tasks TASK OUT.jsonl [--n N] [--seed S]`: write training data."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=400, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_jsonl(args.task, args.out, args.n, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
