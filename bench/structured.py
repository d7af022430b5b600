"""`loraplex bench structured`: constrained decoding (structured outputs, xgrammar) against none.

1. Throughput. One engine on the NF4 demo base (the serving defaults, with room for every request
   at once, prefix caching off so every run computes its prompts alike), the base and K random
   adapters mixed. Every request is a chat prompt asking to extract a person as JSON, served
   greedily, all submitted at t=0. Two modes of the same request set alternate over rounds
   (none half, half none, none half, ...: neither always runs first):
   "none", no request constrained, and "half", every other request constrained by a typical
   extraction schema (bounded strings, an enum, a short array: its outputs finish) and the other
   half free. Free requests ignore EOS and generate max_tokens; a constrained request stops when
   its grammar completes (it cannot ignore EOS), usually well before max_tokens. So that both modes
   do the same work, in "none" each request of the constrained half generates exactly as many
   tokens as it did constrained (measured by an untimed warm-up run of "half"): both modes then
   run the same batches, and their ratio isolates the grammar's cost (matcher, bitmask, masked
   copy of the logits). --same-max-tokens gives every request of "none" max_tokens instead (the
   batch then stays full longer in "none"). Reported: generated tokens / wall time of each run
   (median over rounds), the ratio half / none, each half's mean output length, and every
   constrained output checked: finished with stop, parsed as JSON and valid against its schema.
   The engine's own grammar calls (server/engine/grammar.py: bitmasks filled and applied, tokens
   fed to matchers) are timed apart, per step and as a share of the half runs' wall time: what the
   ratio should show on a quiet machine, where run-to-run noise does not swamp it.
2. Grammar compile time of ~10 typical request grammars (JSON schemas from a flat classifier to
   nested orders with $defs and recursion, a regex, a choice list, a forced tool call), through the
   server's own path (server/structured.py): cold (xgrammar's cache cleared) and cached (the same
   spec again), p50 and p99 over every schema and round. The one-time TokenizerInfo and compiler
   construction is timed apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
from tqdm import tqdm

from bench.workload import adapter_name, add_output_arguments, make_adapters
from loader.config import Config
from server.engine import core
from server.engine.core import EngineCore
from server.engine.types import SamplingParams
from server.structured import Grammars, GrammarSpec

QUICK = {"requests": 8, "adapters": 2, "rounds": 1, "compile_rounds": 5}
RANK = 16  # the trainer's default rank
MODES = ("none", "half")  # no request constrained; every other request constrained
GOALS = {"structured_throughput_ratio": (">=", 0.9)}

# the throughput workload's schema: a typical extraction, every string and array bounded
EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "occupation": {"enum": ["engineer", "doctor", "teacher", "artist", "farmer", "other"]},
        "languages": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 10},
            "minItems": 1,
            "maxItems": 2,
        },
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "occupation", "languages", "employed"],
    "additionalProperties": False,
}

FIRST = ["Maria", "Tom", "Aiko", "John", "Fatima", "Lars", "Priya", "Diego", "Chen", "Olga"]
LAST = ["Lopez", "Becker", "Tanaka", "Smith", "Haddad", "Nilsson", "Rao", "Alves", "Wei", "Ivanova"]
CITIES = ["Madrid", "Munich", "Osaka", "Leeds", "Cairo", "Oslo", "Pune", "Lima", "Xi'an", "Kazan"]
JOBS = ["doctor", "farmer", "engineer", "retired teacher", "painter", "nurse", "baker", "pilot"]
LANGUAGES = ["Spanish", "German", "Japanese", "English", "Arabic", "Norwegian", "Hindi", "Russian"]
SENTENCES = [
    "{first} {last} is a {age}-year-old {job} from {city} who speaks {lang1} and {lang2}.",
    "{first} {last}, {age}, {job} in {city}, speaks {lang1}.",
    "Meet {first} {last} ({age}): works as a {job} in {city}; languages: {lang1}, {lang2}.",
    "{job} {first} {last}, aged {age}, lives in {city} and is fluent in {lang1}.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the structured-outputs benchmark."""
    parser.add_argument("--requests", type=int, default=32, help="requests per run (half: even)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="max_tokens of every request (free ones fill it)",
    )
    parser.add_argument("--adapters", type=int, default=4, help="random adapters beside the base")
    parser.add_argument("--rounds", type=int, default=4, help="alternated runs of each mode")
    parser.add_argument(
        "--compile-rounds", type=int, default=20, help="cold + cached compiles of every grammar"
    )
    parser.add_argument(
        "--same-max-tokens",
        action="store_true",
        help="mode none: every request generates max_tokens (default: the constrained half's "
        "requests generate as many tokens as they do constrained)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="8 requests, 2 adapters, 1 round, 5 compile rounds"
    )
    add_output_arguments(parser, "structured")
    parser.add_argument("--plot", type=Path, default=None, help="default: RESULTS/structured.png")


# grammar compile times ---------------------------------------------------------------------------
def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A strict object schema requiring every property but the optional ones."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


STRING = {"type": "string", "maxLength": 64}
ADDRESS = _object(
    {
        "street": STRING,
        "apartment": {"type": "string", "maxLength": 16},
        "city": STRING,
        "postal_code": {"type": "string", "pattern": "^[0-9]{4,5}(-[0-9]{4})?$"},
        "country": {"enum": ["US", "CA", "GB", "DE", "FR", "ES", "IT", "JP", "IN", "BR"]},
    },
    optional=("apartment",),
)
SCHEMAS: dict[str, dict[str, Any]] = {
    "classifier": _object(
        {
            "label": {"enum": ["billing", "bug", "feature_request", "account", "other"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        }
    ),
    "person": _object(
        {
            "name": STRING,
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "format": "email"},
            "phone": {"type": "string", "pattern": "^\\+?[0-9 ()-]{7,20}$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 5},
        },
        optional=("phone", "tags"),
    ),
    "address": ADDRESS,
    "order": _object(
        {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "customer": _object({"name": STRING, "email": {"type": "string", "format": "email"}}),
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 20,
                "items": _object(
                    {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "description": {"type": "string", "maxLength": 80},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                        "unit_price": {"type": "number", "minimum": 0},
                    },
                    optional=("description",),
                ),
            },
            "shipping": ADDRESS,
            "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
            "total": {"type": "number", "minimum": 0},
            "gift": {"type": "boolean"},
        },
        optional=("gift",),
    ),
    "tool_arguments": _object(
        {
            "location": {"type": "string", "description": "city and country", "maxLength": 64},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "include_hourly": {"type": "boolean"},
        },
        optional=("unit", "days", "include_hourly"),
    ),
    "defs_refs": {
        "$defs": {
            "phone": _object(
                {"kind": {"enum": ["home", "work", "mobile"]}, "number": STRING},
            ),
            "contact": _object(
                {
                    "name": STRING,
                    "phones": {"type": "array", "items": {"$ref": "#/$defs/phone"}, "maxItems": 4},
                    "address": {"$ref": "#/$defs/address"},
                },
                optional=("address",),
            ),
            "address": ADDRESS,
            "group": _object(  # recursive: groups of groups
                {
                    "title": STRING,
                    "members": {"type": "array", "items": {"$ref": "#/$defs/contact"}},
                    "subgroups": {"type": "array", "items": {"$ref": "#/$defs/group"}},
                },
                optional=("subgroups",),
            ),
        },
        **_object({"owner": {"$ref": "#/$defs/contact"}, "root": {"$ref": "#/$defs/group"}}),
    },
    "union": _object(
        {
            "amount": {"type": "number", "minimum": 0},
            "method": {
                "anyOf": [
                    _object({"type": {"const": "card"}, "last4": {"type": "string"}}),
                    _object({"type": {"const": "bank"}, "iban": STRING, "bic": STRING}),
                    _object(
                        {"type": {"const": "wallet"}, "provider": {"enum": ["paypal", "apple"]}}
                    ),
                ]
            },
            "note": {"type": ["string", "null"], "maxLength": 140},
        }
    ),
}
REGEX = r"[a-z0-9._%+-]{1,32}@[a-z0-9-]{1,32}(\.[a-z0-9-]{1,32}){0,3}\.[a-z]{2,6}"  # an email
CHOICES = ["positive", "negative", "neutral", "mixed"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a place.",
            "parameters": SCHEMAS["tool_arguments"],
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Find a customer's orders.",
            "parameters": _object(
                {
                    "customer_email": {"type": "string", "format": "email"},
                    "status": {"enum": ["open", "shipped", "delivered", "cancelled"]},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                },
                optional=("status", "limit"),
            ),
        },
    },
]


def grammar_specs() -> dict[str, GrammarSpec]:
    """The compiled grammars, by name, built as the API builds them from request fields."""
    from server.schemas import ChatCompletionRequest, StructuredOutputs
    from server.structured import output_spec, structured_outputs_spec
    from server.tool_calls import tool_use

    specs = {
        name: structured_outputs_spec(StructuredOutputs.model_validate({"json": schema}))
        for name, schema in SCHEMAS.items()
    }
    json_object = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    json_object["response_format"] = {"type": "json_object"}
    specs["json_object"] = output_spec(ChatCompletionRequest.model_validate(json_object))
    specs["regex"] = structured_outputs_spec(StructuredOutputs(regex=REGEX))
    specs["choice"] = structured_outputs_spec(StructuredOutputs(choice=CHOICES))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    chat["tool_choice"] = "required"
    specs["tool_call"] = tool_use(ChatCompletionRequest.model_validate(chat), "hermes").grammar
    return specs


@dataclass
class CompileTimes:
    """Seconds to construct the compiler (TokenizerInfo) and each grammar's compile times."""

    tokenizer_info_s: float
    cold: dict[str, list[float]] = field(default_factory=dict)  # name -> seconds per round
    cached: dict[str, list[float]] = field(default_factory=dict)


def measure_compiles(
    grammars: Grammars, specs: dict[str, GrammarSpec], rounds: int
) -> CompileTimes:
    """Time the fresh compiler's construction, then per round: clear xgrammar's cache and compile
    every spec twice (cold, then cached). One untimed round first (first-call effects)."""
    started = time.perf_counter()
    compiler = grammars.compiler  # TokenizerInfo over the vocabulary + the GrammarCompiler
    times = CompileTimes(time.perf_counter() - started)
    for spec in specs.values():
        grammars.compile_now(spec)
    for _ in tqdm(range(rounds), desc="grammar compiles", leave=False):
        compiler.clear_cache()
        for name, spec in specs.items():
            for bucket in (times.cold, times.cached):
                started = time.perf_counter()
                grammars.compile_now(spec)
                bucket.setdefault(name, []).append(time.perf_counter() - started)
    return times


# throughput --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One request of the set; `constrained`: whether mode half constrains it."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    constrained: bool


@dataclass
class Run:
    """One mode's pass over the request set: wall seconds, tokens and finish reason per request."""

    mode: str
    seconds: float
    tokens: dict[str, list[int]]
    finish: dict[str, str]
    steps: int  # engine steps
    grammar_seconds: float  # of which in the engine's grammar calls (mask and accept)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / wall time of the run."""
        return sum(map(len, self.tokens.values())) / self.seconds


def person_texts(n: int, seed: int = 0) -> list[str]:
    """n seeded one-sentence descriptions of people."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        lang1, lang2 = rng.sample(LANGUAGES, 2)
        texts.append(
            rng.choice(SENTENCES).format(
                first=rng.choice(FIRST),
                last=rng.choice(LAST),
                age=rng.randrange(18, 90),
                job=rng.choice(JOBS),
                city=rng.choice(CITIES),
                lang1=lang1,
                lang2=lang2,
            )
        )
    return texts


def make_requests(tokenizer: Any, n: int, adapters: int) -> list[Request]:
    """n chat requests asking for a person as JSON; pairs of requests share an adapter (the base,
    then each adapter in turn) and the second of each pair is the one mode half constrains."""
    requests = []
    for i, text in enumerate(person_texts(n)):
        messages = [{"role": "user", "content": f"Extract the person as JSON: {text}"}]
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        index = (i // 2) % (adapters + 1)
        adapter = None if index == 0 else adapter_name(index - 1)
        requests.append(Request(f"q{i:03d}", ids, adapter, constrained=i % 2 == 1))
    return requests


_runs = itertools.count()


class GrammarClock:
    """Within a with block, the seconds the engine spends in server.engine.grammar's constrain
    (bitmasks filled, applied to a copy of the logits) and advance (tokens fed to matchers), by
    wrapping the names the engine core calls."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: tuple[Any, Any] | None = None

    def _timed(self, function: Any) -> Any:
        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def __enter__(self) -> GrammarClock:
        self._saved = core.constrain, core.advance
        core.constrain, core.advance = self._timed(core.constrain), self._timed(core.advance)
        return self

    def __exit__(self, *exc: object) -> None:
        core.constrain, core.advance = self._saved


def _serve(
    engine: EngineCore,
    requests: list[Request],
    params: dict[str, SamplingParams],
    mode: str,
    label: str,
) -> Run:
    """Submit every request at t=0 (ids made unique per run) and step the engine until all are
    done; any failed request aborts the benchmark."""
    prefix = f"run{next(_runs)}-"
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finish: dict[str, str] = {}
    total = sum(p.max_tokens for p in params.values())
    steps = engine.steps
    started = time.perf_counter()
    for r in requests:
        engine.add_request(prefix + r.request_id, r.prompt_ids, r.adapter, params[r.request_id])
    with tqdm(total=total, desc=label, leave=False) as bar, GrammarClock() as clock:
        while engine.has_work():
            for out in engine.step():
                rid = out.request_id.removeprefix(prefix)
                if out.error is not None:
                    raise RuntimeError(f"request {rid} failed: {out.error}")
                if out.token_id is not None:
                    tokens[rid].append(out.token_id)
                    bar.update()
                if out.finish_reason is not None:
                    finish[rid] = out.finish_reason
    seconds = time.perf_counter() - started
    return Run(mode, seconds, tokens, finish, engine.steps - steps, clock.seconds)


def mode_params(
    requests: list[Request],
    mode: str,
    max_tokens: int,
    grammar: Any,
    lengths: dict[str, int] | None = None,
) -> dict[str, SamplingParams]:
    """Greedy parameters per request: half constrains the constrained half (EOS ends it when the
    grammar completes); every other request ignores EOS and generates max_tokens, or, in none,
    lengths[id] tokens for the requests lengths names."""
    free = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    params = {}
    for r in requests:
        if mode == "half" and r.constrained:
            params[r.request_id] = SamplingParams(
                max_tokens=max_tokens, temperature=0, grammar=grammar
            )
        elif lengths is not None and r.request_id in lengths:
            n = lengths[r.request_id]
            params[r.request_id] = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        else:
            params[r.request_id] = free
    return params


def check_outputs(run: Run, requests: list[Request], tokenizer: Any, eos_ids: set[int]) -> int:
    """How many constrained outputs of a half run finished with stop (the grammar complete) and
    are JSON valid against the extraction schema."""
    valid = 0
    for r in requests:
        if not r.constrained:
            continue
        ids = run.tokens[r.request_id]
        if run.finish.get(r.request_id) != "stop" or not ids or ids[-1] not in eos_ids:
            continue
        try:
            jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), EXTRACTION_SCHEMA)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            continue
        valid += 1
    return valid


def _engine(
    args: argparse.Namespace, adapter_paths: list[Path]
) -> tuple[EngineCore, list[Request]]:
    """The engine on the NF4 demo base holding every adapter, with room for every request, and
    the request set."""
    from loader.model import load_base

    base = load_base(Config())
    requests = make_requests(base.tokenizer, args.requests, args.adapters)
    longest_prompt = max(len(r.prompt_ids) for r in requests)
    config = dataclasses.replace(
        base.config,
        enable_prefix_caching=False,
        max_num_seqs=args.requests,
        kv_capacity_tokens=args.requests * (longest_prompt + args.max_tokens + Config.block_size),
        max_cpu_loras=max(Config.max_cpu_loras, args.adapters),
    )
    engine = EngineCore(base, config)
    for i, path in enumerate(adapter_paths):
        engine.add_adapter(engine.read_adapter(adapter_name(i), str(path)))
    return engine, requests


def _grammars(engine: EngineCore) -> Grammars:
    """A compiler as the server builds it: the base tokenizer over the logits' columns."""
    head = engine.base.model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    return Grammars(engine.base.tokenizer, vocab, engine.eos_ids, engine.config)


def _mean(values: list[int]) -> float:
    return round(statistics.fmean(values), 2) if values else 0.0


def _half_lengths(runs: list[Run], requests: list[Request]) -> dict[str, float]:
    """Mean output tokens per request of the free and the constrained half, over runs."""
    return {
        half: _mean([len(run.tokens[r.request_id]) for run in runs for r in requests if pick(r)])
        for half, pick in (
            ("free_half", lambda r: not r.constrained),
            ("constrained_half", lambda r: r.constrained),
        )
    }


def _ms(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.array(values) * 1e3, [50, 99]).tolist()
    return {"p50": round(p50, 3), "p99": round(p99, 3)}


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[Run]],
    requests: list[Request],
    compiles: CompileTimes,
    specs: dict[str, GrammarSpec],
    valid: int,
    checked: int,
    lengths_stable: bool,
) -> dict:
    """The JSON summary: the ratio against its goal, tokens/s, output lengths, compile times."""
    rates = {mode: statistics.median(r.tokens_per_s for r in runs[mode]) for mode in MODES}
    ratio = rates["half"] / rates["none"]
    every_cold = [t for ts in compiles.cold.values() for t in ts]
    every_cached = [t for ts in compiles.cached.values() for t in ts]
    return {
        "structured_throughput_ratio": round(ratio, 3),
        "goals_met": {
            name: (ratio >= goal if sign == ">=" else ratio <= goal)
            for name, (sign, goal) in GOALS.items()
        },
        "tokens_per_s": {
            "none": round(rates["none"], 2),
            "half": round(rates["half"], 2),
        },
        "rounds_tokens_per_s": {
            mode: [round(r.tokens_per_s, 2) for r in runs[mode]] for mode in MODES
        },
        "rounds_ratio": [
            round(half.tokens_per_s / none.tokens_per_s, 3)
            for none, half in zip(runs["none"], runs["half"], strict=True)
        ],
        "mean_output_tokens": {mode: _half_lengths(runs[mode], requests) for mode in MODES},
        "generated_tokens": {
            mode: [sum(map(len, r.tokens.values())) for r in runs[mode]] for mode in MODES
        },
        "steps": {mode: [r.steps for r in runs[mode]] for mode in MODES},
        "step_ms": {
            mode: round(statistics.median(r.seconds / r.steps for r in runs[mode]) * 1e3, 2)
            for mode in MODES
        },
        # the engine's own grammar work (masks, matchers) per step and as a share of the run
        "grammar_ms_per_step": round(
            statistics.median(r.grammar_seconds / r.steps for r in runs["half"]) * 1e3, 3
        ),
        "grammar_share": round(
            statistics.median(r.grammar_seconds / r.seconds for r in runs["half"]), 4
        ),
        "constrained_valid": valid,
        "constrained_total": checked,
        "constrained_lengths_stable": lengths_stable,
        "compile_ms": {"cold": _ms(every_cold), "cached": _ms(every_cached)},
        "compile_ms_by_grammar": {
            name: {
                "kind": specs[name].kind,
                "source_bytes": len(specs[name].source.encode()),
                "cold": _ms(compiles.cold[name]),
                "cached": _ms(compiles.cached[name]),
            }
            for name in specs
        },
        "tokenizer_info_s": round(compiles.tokenizer_info_s, 4),
        "settings": {
            "model": "demo (SmolLM2-135M-Instruct, NF4)",
            "requests": args.requests,
            "constrained_requests": sum(r.constrained for r in requests),
            "adapters": args.adapters,
            "rank": RANK,
            "max_tokens": args.max_tokens,
            "none_lengths": "max_tokens" if args.same_max_tokens else "matched",
            "rounds": args.rounds,
            "compile_rounds": args.compile_rounds,
            "grammars": len(specs),
            "prompt_tokens_mean": _mean([len(r.prompt_ids) for r in requests]),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "quick": args.quick,
        },
    }


def table(summary: dict) -> str:
    """Markdown tables: throughput of both modes, then compile times per grammar."""
    total = summary["settings"]["requests"]
    constrained = summary["settings"]["constrained_requests"]
    lines = [
        "| requests constrained | tokens/s | mean output tokens, free half | constrained half |",
        "|---|---|---|---|",
    ]
    for mode, count in (("none", 0), ("half", constrained)):
        lengths = summary["mean_output_tokens"][mode]
        lines.append(
            f"| {count} of {total} | {summary['tokens_per_s'][mode]:.1f} | "
            f"{lengths['free_half']:.1f} | {lengths['constrained_half']:.1f} |"
        )
    verdict = "met" if summary["goals_met"]["structured_throughput_ratio"] else "missed"
    sign, goal = GOALS["structured_throughput_ratio"]
    lines += [
        "",
        f"structured_throughput_ratio {summary['structured_throughput_ratio']} "
        f"(goal {sign} {goal}: {verdict}); constrained outputs valid: "
        f"{summary['constrained_valid']} of {summary['constrained_total']}; per round: "
        f"{summary['rounds_ratio']}",
        f"engine step {summary['step_ms']['none']:.1f} ms unconstrained, "
        f"{summary['step_ms']['half']:.1f} ms half constrained, of which grammar work (masks, "
        f"matchers) {summary['grammar_ms_per_step']:.2f} ms ({summary['grammar_share']:.1%})",
        "",
        "| grammar | kind | bytes | cold p50 (ms) | cold p99 (ms) | cached p50 (ms) | "
        "cached p99 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["compile_ms_by_grammar"].items():
        lines.append(
            f"| {name} | {row['kind']} | {row['source_bytes']} | {row['cold']['p50']:.2f} | "
            f"{row['cold']['p99']:.2f} | {row['cached']['p50']:.3f} | {row['cached']['p99']:.3f} |"
        )
    cold, cached = summary["compile_ms"]["cold"], summary["compile_ms"]["cached"]
    lines.append(
        f"| **all** | | | {cold['p50']:.2f} | {cold['p99']:.2f} | {cached['p50']:.3f} | "
        f"{cached['p99']:.3f} |"
    )
    lines += [
        "",
        f"TokenizerInfo + compiler construction (once per server): "
        f"{summary['tokenizer_info_s'] * 1e3:.0f} ms",
    ]
    return "\n".join(lines)


def plot(path: Path, summary: dict) -> None:
    """tokens/s of both modes (each round a dot) and compile p50 per grammar, cold and cached."""
    import matplotlib  # imported here: serving never needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, compile_ax) = plt.subplots(
        1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]}
    )
    labels = {"none": "none constrained", "half": "half constrained"}
    for x, mode in enumerate(MODES):
        rate_ax.bar(x, summary["tokens_per_s"][mode], width=0.6, color=f"C{x}")
        rounds = summary["rounds_tokens_per_s"][mode]
        rate_ax.plot([x] * len(rounds), rounds, "k.", alpha=0.6)
    rate_ax.set_xticks(range(len(MODES)), [labels[m] for m in MODES])
    rate_ax.set_ylabel("generated tokens/s (median of rounds; dots: rounds)")
    rate_ax.set_title(f"Throughput (ratio {summary['structured_throughput_ratio']})")
    rows = summary["compile_ms_by_grammar"]
    names = list(rows)
    y = np.arange(len(names))
    for offset, kind in ((-0.2, "cold"), (0.2, "cached")):
        compile_ax.barh(y + offset, [rows[n][kind]["p50"] for n in names], height=0.4, label=kind)
    compile_ax.set_yticks(y, names)
    compile_ax.invert_yaxis()
    compile_ax.set_xscale("log")
    compile_ax.set_xlabel("compile time p50 (ms, log scale)")
    compile_ax.set_title("Grammar compile time")
    compile_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Time grammar compiles, then serve both modes in alternated rounds; print the tables, write
    the JSON and the plot."""
    from loader.demo import prepare_demo

    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.requests < 2 or args.requests % 2:
        raise SystemExit("--requests must be even and at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    paths = make_adapters(prepare_demo(), args.adapters_dir, args.adapters, RANK)
    engine, requests = _engine(args, paths)
    tokenizer = engine.base.tokenizer

    specs = grammar_specs()
    fresh = _grammars(engine)  # its compiler is built (and timed) by measure_compiles
    compiles = measure_compiles(fresh, specs, args.compile_rounds)
    fresh.close()

    grammars = _grammars(engine)
    grammar = grammars.compile_now(
        GrammarSpec("json_schema", json.dumps(EXTRACTION_SCHEMA), "bench")
    )
    half = mode_params(requests, "half", args.max_tokens, grammar)
    warm = _serve(engine, requests, half, "half", "warm-up (half constrained)")
    lengths = {r.request_id: len(warm.tokens[r.request_id]) for r in requests if r.constrained}
    none = mode_params(
        requests, "none", args.max_tokens, grammar, None if args.same_max_tokens else lengths
    )
    valid, checked = check_outputs(warm, requests, tokenizer, engine.eos_ids), len(lengths)
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    lengths_stable = True
    for round_index in range(args.rounds):  # none half, half none, ...: drift hits both alike
        order = [("none", none), ("half", half)]
        for mode, params in order if round_index % 2 == 0 else order[::-1]:
            label = f"round {round_index + 1}/{args.rounds} {mode} constrained"
            result = _serve(engine, requests, params, mode, label)
            runs[mode].append(result)
            if mode == "half":
                valid += check_outputs(result, requests, tokenizer, engine.eos_ids)
                checked += len(lengths)
                now = {rid: len(result.tokens[rid]) for rid in lengths}
                lengths_stable &= now == lengths
    engine.close()
    grammars.close()

    summary = summarize(args, runs, requests, compiles, specs, valid, checked, lengths_stable)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.results / "structured.json"
    plot_path = args.plot or args.results / "structured.png"
    for path in (json_path, plot_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    plot(plot_path, summary)
    print(table(summary))
    print(f"wrote {json_path}, {plot_path} ({summary['wall_s']} s)")
    return 0
