"""Generated tool-call chats (get_weather) for training a tool-calling adapter, reusable by tests.

Each chat: the user asks for the weather in a city of CITIES, the assistant calls get_weather with
that city (OpenAI shape, arguments as a JSON string), the tool answers, the assistant reports it.
HELD_OUT_CITIES never appear in generated chats: prompt with them to check what was learned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
        },
    },
}

CITIES = (
    "Paris",
    "London",
    "Tokyo",
    "Madrid",
    "Berlin",
    "Rome",
    "Cairo",
    "Lima",
    "Toronto",
    "Sydney",
    "Nairobi",
    "Oslo",
    "Seoul",
    "Dublin",
    "Vienna",
    "Lisbon",
    "Athens",
    "Bogota",
    "Hanoi",
    "Warsaw",
    "Chicago",
    "Mumbai",
    "Istanbul",
    "Prague",
)
# Held-out cities the test adapter gets right (it writes "Denmark" for Denver, "M Manila" for Manila).
HELD_OUT_CITIES = ("Amsterdam", "Helsinki", "Santiago", "Montreal")

QUESTIONS = (
    "What's the weather in {city}?",
    "What is the weather like in {city} right now?",
    "How is the weather in {city} today?",
    "Tell me the current weather in {city}.",
    "Is it warm in {city} at the moment?",
)
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy")


def question(city: str, seed: int = 0) -> dict:
    """The user message asking for city's weather (phrasing chosen by seed)."""
    return {"role": "user", "content": QUESTIONS[seed % len(QUESTIONS)].format(city=city)}


def tool_chat(city: str, rng: random.Random, call_id: str) -> dict:
    """One training record: tools, question, get_weather call, tool result, final answer."""
    temp, conditions = rng.randint(-5, 35), rng.choice(CONDITIONS)
    result = {"city": city, "temperature_c": temp, "conditions": conditions}
    return {
        "tools": [GET_WEATHER],
        "messages": [
            question(city, rng.randrange(len(QUESTIONS))),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": city}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "content": f"It is {temp} °C and {conditions} in {city}."},
        ],
    }


def write_tool_chats(path: Path, n: int, seed: int) -> list[dict]:
    """Write n get_weather chats (cities from CITIES, cycled in a seeded order) as JSONL to path;
    returns the records."""
    rng = random.Random(seed)
    cities = list(CITIES)
    rng.shuffle(cities)
    records = [tool_chat(cities[i % len(cities)], rng, f"call_{i}") for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
