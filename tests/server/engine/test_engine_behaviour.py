"""Engine behaviour on the real demo model: abort, KV exhaustion, sampling parameters, async API."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapters.format import base_linear_shapes, read_adapter
from loader.config import Config
from loader.model import load_base
from server.engine.core import EngineCore
from server.engine.engine import AsyncEngine
from server.engine.types import EngineError, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def engine(demo_path, peft_adapters) -> EngineCore:
    config = Config(model=str(demo_path), kv_capacity_tokens=16 * 12, max_loras=2, max_num_seqs=8)
    base = load_base(config)
    core = EngineCore(base, config)
    shapes = base_linear_shapes(base.model)
    for name, path in peft_adapters.items():
        core.add_adapter(read_adapter(path, name, shapes, 64, 1 << 30))
    return core


def ids(engine: EngineCore, text: str) -> list[int]:
    return engine.base.tokenizer(text).input_ids


def drain(engine: EngineCore) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for _ in range(500):
        if not engine.has_work():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_work()
    return outputs


def test_abort_frees_kv_and_slot(engine):
    engine.add_request("keep", ids(engine, "Hello there, how"), "alpha", GREEDY)
    engine.add_request("drop", ids(engine, "The weather today is"), "beta", GREEDY)
    engine.step()
    engine.step()
    used_before = engine.kv.used_blocks
    drop = engine.seqs["drop"]
    blocks, slot = len(drop.blocks), drop.slot
    assert blocks > 0 and slot >= 0 and engine.slots.pins[slot] == 1
    out = engine.abort("drop")
    assert out.finish_reason == "abort"
    assert engine.kv.used_blocks == used_before - blocks
    assert engine.slots.pins[slot] == 0
    assert "drop" not in drain(engine)
    assert engine.kv.used_blocks == 0 and sum(engine.slots.pins) == 0


def test_kv_exhaustion_queues_instead_of_failing(engine):
    # 12 blocks of 16 tokens; 8 requests of ~25 prompt + 24 new tokens need ~32 blocks at once
    params = SamplingParams(max_tokens=24, temperature=0)
    prompt = "Tell me a long story about a dragon who lived in a castle by the sea and"
    for i in range(8):
        engine.add_request(f"kv{i}", ids(engine, prompt), ("alpha", "beta", None)[i % 3], params)
    outputs = drain(engine)
    for i in range(8):
        finals = [o for o in outputs[f"kv{i}"] if o.finish_reason]
        assert len(finals) == 1 and finals[0].finish_reason in ("stop", "length")
        assert all(o.error is None for o in outputs[f"kv{i}"])
    assert engine.kv.used_blocks == 0


def test_rejections(engine):
    with pytest.raises(EngineError) as unknown:
        engine.add_request("u", [1, 2, 3], "nope", GREEDY)
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(EngineError) as long:  # no room left for a completion
        engine.add_request("l", [1] * engine.max_model_len, None, GREEDY)
    assert long.value.code == "context_length_exceeded"
    capped = SamplingParams(max_tokens=10 * engine.max_model_len)  # max_tokens only caps
    engine.add_request("c", [1, 2, 3], None, capped)
    assert engine.abort("c") is not None
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def tokens_of(outputs: list) -> list[int]:
    return [o.token_id for o in outputs if o.token_id is not None]


def test_seeded_sampling_ignores_neighbours(engine):
    prompt = ids(engine, "My favourite animal is")
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    engine.add_request("alone", prompt, None, seeded)
    alone = tokens_of(drain(engine)["alone"])
    engine.add_request(
        "n1", ids(engine, "Bananas are"), None, SamplingParams(max_tokens=12, seed=5)
    )
    engine.add_request("again", prompt, None, seeded)
    engine.add_request("n2", ids(engine, "The ocean"), "alpha", SamplingParams(max_tokens=12))
    assert tokens_of(drain(engine)["again"]) == alone


def test_stop_tokens_top_k_and_logprobs(engine):
    prompt = ids(engine, "One, two, three, four,")
    engine.add_request("g", prompt, None, SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    engine.add_request("k1", prompt, None, SamplingParams(max_tokens=6, temperature=1.5, top_k=1))
    out = drain(engine)
    greedy = tokens_of(out["g"])
    assert tokens_of(out["k1"]) == greedy  # top_k=1 leaves only the argmax
    for o in out["g"]:
        assert o.logprob is not None and o.logprob <= 0
        assert len(o.top_logprobs) == 3 and o.top_logprobs[0][1] == o.logprob  # greedy: the best
    stop_at = greedy[2]
    engine.add_request(
        "s", prompt, None, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop_at,))
    )
    stopped = drain(engine)["s"]
    assert tokens_of(stopped)[-1] == stop_at and stopped[-1].finish_reason == "stop"
    assert len(tokens_of(stopped)) == greedy.index(stop_at) + 1


def test_async_engine_streams_and_aborts(demo_path, peft_adapters):
    config = Config(model=str(demo_path), kv_capacity_tokens=1024)
    engine = AsyncEngine(load_base(config), config)
    shapes = base_linear_shapes(engine.base.model)
    engine.core.add_adapter(read_adapter(peft_adapters["alpha"], "alpha", shapes, 64, 1 << 30))
    engine.start()
    prompt = engine.base.tokenizer("Count: one, two,").input_ids

    async def scenario() -> tuple[list, list]:
        full = [o async for o in engine.generate(prompt, None, GREEDY, "a1")]
        partial = []
        async for out in engine.generate(
            prompt, None, SamplingParams(max_tokens=50, temperature=0), "a2"
        ):
            partial.append(out)
            if len(partial) == 2:
                break  # the consumer walks away: the engine must abort the request
        return full, partial

    try:
        full, partial = asyncio.run(scenario())
        assert len(full) == 8 and full[-1].finish_reason == "length"
        assert [o.token_id for o in partial] == [o.token_id for o in full[:2]]
        for _ in range(100):
            stats = engine.stats()
            if stats.running == 0 and stats.kv_used_blocks == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert stats.running == 0 and stats.kv_used_blocks == 0
        unloaded = asyncio.run(unloaded_between_check_and_add(engine, prompt))
        assert unloaded.finish_reason == "error" and unloaded.error_code == "model_not_found"
    finally:
        engine.shutdown()


async def unloaded_between_check_and_add(engine: AsyncEngine, prompt: list[int]):
    """The adapter passes generate()'s check, then is unloaded before the engine thread adds the
    request (the adapters-folder watcher can do this at any time): the request ends with
    model_not_found, which the API answers 404, never an internal error."""
    gate = threading.Event()
    engine._inbox.put(gate.wait)  # hold the engine thread before it takes the request
    stream = engine.generate(prompt, "alpha", GREEDY, "gone")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)  # generate() has checked and queued its add
    engine.unload_adapter("alpha")
    gate.set()
    return await first
