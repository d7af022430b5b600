"""Constrained decoding in the engine on the real demo model (unquantized float32, exact): grammar
rows and free rows share a batch, preemption and recompute keep each matcher's place, seeded
sampling reproduces, a request ends when its grammar completes, and logprobs are the model's."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from server.engine.core import EngineCore
from server.engine.types import SamplingParams
from server.structured import Grammars, GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        "open": {"type": "boolean"},
    },
    "required": ["city", "rank", "open"],
    "additionalProperties": False,
}


def two_adapter_engine(fp32_engine, demo_path, peft_adapters, **limits) -> EngineCore:
    adapters = {name: peft_adapters[name] for name in ("alpha", "beta")}
    return fp32_engine(demo_path, adapters, max_loras=2, **limits)


@pytest.fixture(scope="module")
def roomy(fp32_engine, demo_path, peft_adapters) -> EngineCore:
    return two_adapter_engine(fp32_engine, demo_path, peft_adapters, kv_capacity_tokens=4096)


@pytest.fixture(scope="module")
def grammar(roomy):
    grammars = Grammars(roomy.base.tokenizer, 49152, roomy.eos_ids, roomy.config)
    return grammars.compile_now(GrammarSpec("json_schema", json.dumps(SCHEMA), "test"))


def prompt(core: EngineCore, text: str) -> list[int]:
    tok = core.base.tokenizer
    messages = [{"role": "user", "content": text}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(rendered, add_special_tokens=False).input_ids


def run(core: EngineCore, requests: list[tuple[str, list[int], str | None, SamplingParams]]):
    for rid, ids, adapter, params in requests:
        core.add_request(rid, ids, adapter, params)
    got: dict[str, list] = {rid: [] for rid, *_ in requests}
    while core.has_work():
        for out in core.step():
            got[out.request_id].append(out)
    return got


def wave(core: EngineCore, grammar, seeds: range) -> list:
    requests = []
    for seed in seeds:
        adapter = ("alpha", "beta", None)[seed % 3]
        text = f"Describe city number {seed} as JSON."
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=grammar)
        requests.append((f"g{seed}", prompt(core, text), adapter, params))
        free = SamplingParams(max_tokens=30, temperature=0, logprobs=0, ignore_eos=True)
        requests.append((f"f{seed}", prompt(core, f"Tell me about {seed}"), adapter, free))
    return requests


def tokens(outputs: list) -> list[int]:
    return [o.token_id for o in outputs if o.token_id is not None]


def test_constrained_rows_beside_free_rows_and_through_preemption(
    fp32_engine, demo_path, peft_adapters, roomy, grammar
):
    requests = wave(roomy, grammar, range(4))
    together = run(roomy, requests)
    tok = roomy.base.tokenizer
    for rid, *_ in requests:
        outs = together[rid]
        assert outs[-1].error is None
        if rid.startswith("g"):  # the grammar completed and the request stopped on its own
            assert outs[-1].finish_reason == "stop" and outs[-1].token_id in roomy.eos_ids
            jsonschema.validate(json.loads(tok.decode(tokens(outs)[:-1])), SCHEMA)
    for rid, ids, adapter, params in requests:  # each alone: the same tokens
        alone = run(roomy, [(rid, ids, adapter, params)])[rid]
        assert tokens(alone) == tokens(together[rid]), rid
    # 10 blocks of 16 tokens for 8 requests of ~40 prompt tokens: they preempt each other
    small = two_adapter_engine(fp32_engine, demo_path, peft_adapters, kv_capacity_tokens=16 * 10)
    squeezed = run(small, requests)
    assert small.scheduler.preemptions > 0
    for rid, *_ in requests:
        assert tokens(squeezed[rid]) == tokens(together[rid]), rid


def test_logprobs_are_the_models_before_the_mask(roomy, grammar):
    ids = prompt(roomy, "Say hello.")
    constrained = SamplingParams(max_tokens=2, temperature=0, logprobs=3, grammar=grammar)
    free = SamplingParams(max_tokens=2, temperature=0, logprobs=3)
    got = run(roomy, [("masked", ids, None, constrained), ("free", ids, None, free)])
    masked, unmasked = got["masked"][0], got["free"][0]
    assert roomy.base.tokenizer.decode([masked.token_id]).startswith("{")
    assert masked.token_id != unmasked.token_id  # the mask changed the choice ...
    assert dict(masked.top_logprobs) == pytest.approx(dict(unmasked.top_logprobs))  # ... not the
    # distribution: the same model logprobs
    assert masked.logprob < unmasked.logprob


def test_compile_time_limit_is_a_400(roomy):
    from server.errors import APIError

    config = roomy.config.replace(grammar_compile_timeout_s=1e-4)
    grammars = Grammars(roomy.base.tokenizer, 49152, roomy.eos_ids, config)
    grammars.compile_now(
        GrammarSpec("regex", "warm", "x")
    )  # tokenizer info built outside the limit
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}
    spec = GrammarSpec("json_schema", json.dumps(wide), "response_format")
    with pytest.raises(APIError) as slow:
        asyncio.run(grammars.compile(spec))
    assert slow.value.status == 400 and slow.value.code == "grammar_too_complex"
    assert slow.value.param == "response_format"
