"""Prefix caching on the real demo model: outputs with cache hits equal outputs without, blocks are
shared only by the same adapter weights in the same namespace, and reloads, eviction and
preemption never let a request read K/V it would not have computed itself.

Unquantized float32 engines (exact to ~1e-5, so greedy tokens compare one for one): one with the
cache on and a reference with it off, over the same requests. The NF4 check compares cache hits
with plain PEFT under the engine's documented tolerance (tests/conftest.py PeftOracle).
"""

from __future__ import annotations

import pytest
import torch

from adapters.format import base_linear_shapes, read_adapter
from loader.config import Config
from loader.model import load_base
from server.engine.core import EngineCore
from server.engine.types import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, logprobs=0)
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short sentence, name the "
    "product, its price in euros and whether it contains nuts, gluten or dairy. Opening hours "
    "are eight to six on weekdays and nine to one on Saturdays; we are closed on Sundays."
)
QUESTIONS = ("What does the rye loaf cost?", "Is the almond tart gluten free?", "When do you open?")
Run = dict[str, tuple[list[int], list[float], int]]  # request id -> (tokens, logprobs, cached)


def cache_engine(fp32_engine, demo_path, peft_adapters, prefix: bool, **limits) -> EngineCore:
    limits = {"kv_capacity_tokens": 2048, "max_batch_tokens": 48, "max_loras": 4, **limits}
    return fp32_engine(demo_path, peft_adapters, enable_prefix_caching=prefix, **limits)


def add(core: EngineCore, name: str, path) -> None:
    core.add_adapter(read_adapter(path, name, base_linear_shapes(core.base.model), 64, 1 << 30))


@pytest.fixture(scope="module")
def cached(fp32_engine, demo_path, peft_adapters) -> EngineCore:
    return cache_engine(fp32_engine, demo_path, peft_adapters, prefix=True)


@pytest.fixture(scope="module")
def cold(fp32_engine, demo_path, peft_adapters) -> EngineCore:
    return cache_engine(fp32_engine, demo_path, peft_adapters, prefix=False)


def chat_ids(core: EngineCore, question: str, system: str = SYSTEM) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    tokenizer = core.base.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text).input_ids


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b have in common."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def run(
    core: EngineCore,
    requests: list[tuple[str, list[int], str | None]],
    namespace: str = "",
    params: SamplingParams = GREEDY,
) -> Run:
    """Every request added at once, run to the end."""
    for rid, ids, adapter in requests:
        core.add_request(rid, ids, adapter, params, cache_namespace=namespace)
    got: Run = {rid: ([], [], 0) for rid, _, _ in requests}
    for _ in range(2000):
        if not core.has_work():
            break
        for out in core.step():
            assert out.error is None, out.error
            if out.token_id is not None:
                got[out.request_id][0].append(out.token_id)
                got[out.request_id][1].append(out.logprob)
            if out.finish_reason is not None:
                tokens, logprobs, _ = got[out.request_id]
                got[out.request_id] = (tokens, logprobs, out.cached_tokens)
    assert not core.has_work()
    assert core.kv.used_blocks == 0
    return got


def assert_same(hit: Run, reference: Run) -> None:
    """Same greedy tokens, logprobs within float32 noise."""
    for rid, (tokens, logprobs, _) in hit.items():
        ref_tokens, ref_logprobs, _ = reference[rid]
        assert tokens == ref_tokens, rid
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4), rid


def hit_counts(core: EngineCore) -> tuple[int, int]:
    stats = core.stats()
    return sum(stats.prefix_queried_tokens.values()), sum(stats.prefix_hit_tokens.values())


def test_hits_equal_cold_prefill_across_adapters(cached, cold):
    warm = [(f"warm-{a}", chat_ids(cached, QUESTIONS[0]), a) for a in (None, "alpha", "beta")]
    wave = [
        (f"q{i}-{a}", chat_ids(cached, q), a)
        for i, q in enumerate(QUESTIONS)
        for a in (None, "alpha", "beta")
    ]
    first = run(cached, warm)
    assert all(c == 0 for _, _, c in first.values())  # nothing cached yet
    _, hits_before = hit_counts(cached)
    second = run(cached, wave)
    block = cached.kv.block_size
    warm_ids = chat_ids(cached, QUESTIONS[0])
    for i, question in enumerate(QUESTIONS):
        ids = chat_ids(cached, question)
        # the full blocks shared with the warm-up prompt (the system prompt and the chat
        # template's tokens), and never the block holding the prompt's last token
        expected = min(shared_length(ids, warm_ids), len(ids) - 1) // block * block
        assert expected >= 48
        for adapter in (None, "alpha", "beta"):
            assert second[f"q{i}-{adapter}"][2] == expected, (i, adapter)
    assert hit_counts(cached)[1] > hits_before
    assert_same(first, run(cold, warm))
    assert_same(second, run(cold, wave))


def test_identical_prompts_on_different_adapters_never_share(cached, cold):
    ids = chat_ids(cached, "Which cakes have no dairy?", system="You answer for a flower shop.")
    requests = [(f"same-{a}", ids, a) for a in (None, "alpha", "beta", "gamma")]
    first = run(cached, requests[:1])
    first.update(run(cached, requests[1:]))  # the base's blocks of the same tokens are cached now
    assert all(c == 0 for _, _, c in first.values())  # another model's blocks never hit
    keys = [cached.kv.prefix.chain(cached_seq_for(cached, ids, a))[0] for a in (None, "alpha")]
    assert keys[0] != keys[1]
    assert_same(first, run(cold, requests))


def cached_seq_for(core: EngineCore, ids: list[int], adapter: str | None):
    """A sequence rooted like a request of adapter would be (not queued)."""
    from server.engine.prefix_cache import BASE_IDENTITY, chain_root
    from server.engine.sequence import Sequence

    seq = Sequence("probe", ids, adapter, GREEDY)
    entry = core.registry.get(adapter) if adapter else None
    identity = core.registry.weights(adapter, entry.version).digest if entry else BASE_IDENTITY
    seq.cache_root = chain_root(identity, "")
    return seq


def test_same_weights_under_two_names_share_and_namespaces_isolate(cached, cold, peft_adapters):
    add(cached, "alpha-copy", peft_adapters["alpha"])
    add(cold, "alpha-copy", peft_adapters["alpha"])
    ids = chat_ids(cached, "Do you sell sourdough on Sundays?")
    run(cached, [("named-alpha", ids, "alpha")])
    copy = run(cached, [("named-copy", ids, "alpha-copy")])
    assert copy["named-copy"][2] > 0  # keyed by the weights, not the name
    salted = run(cached, [("salted", ids, "alpha")], namespace="tenant-b")
    assert salted["salted"][2] == 0  # another namespace never sees those blocks
    again = run(cached, [("salted-again", ids, "alpha")], namespace="tenant-b")
    assert again["salted-again"][2] > 0
    assert_same(copy, run(cold, [("named-copy", ids, "alpha-copy")]))
    assert_same(again, run(cold, [("salted-again", ids, "alpha")]))


def test_reload_and_unload_drop_the_old_versions_blocks(cached, cold, peft_adapters):
    add(cached, "swap", peft_adapters["alpha"])
    ids = chat_ids(cached, "How much is a croissant?")
    run(cached, [("before", ids, "swap")])
    old = cached.registry.get("swap").version
    assert any(o == ("swap", old) for o in cached.kv.prefix.owners.values())
    add(cached, "swap", peft_adapters["delta"])  # same name, new weights
    after = run(cached, [("after", ids, "swap")])
    assert after["after"][2] == 0  # the old version's K/V is never used
    assert not any(o == ("swap", old) for o in cached.kv.prefix.owners.values())
    assert_same(after, run(cold, [("after", ids, "delta")]))
    current = cached.registry.get("swap").version
    cached.remove_adapter("swap")
    run(cached, [("flush", ids, None)])  # a step applies the unload
    assert not any(o == ("swap", current) for o in cached.kv.prefix.owners.values())


def test_eviction_and_preemption_with_shared_blocks(fp32_engine, demo_path, peft_adapters, cold):
    # 12 blocks of 16 tokens: each ~75-token prompt growing by 40 tokens needs 8 blocks, so the
    # running requests preempt each other, and cached blocks of earlier prompts are evicted
    small = cache_engine(
        fp32_engine, demo_path, peft_adapters, prefix=True, kv_capacity_tokens=16 * 12
    )
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=0, ignore_eos=True)
    waves = [
        [
            (f"w{w}-{i}", chat_ids(small, QUESTIONS[i % 3] + f" ({w})"), ("alpha", None)[i % 2])
            for i in range(4)
        ]
        for w in range(2)
    ]
    results = [run(small, wave, params=params) for wave in waves]
    assert small.scheduler.preemptions > 0
    assert small.kv.cached_blocks <= small.kv.num_blocks
    queried, hits = hit_counts(small)
    assert 0 < hits < queried
    for wave, got in zip(waves, results, strict=True):
        assert_same(got, run(cold, wave, params=params))
    assert small.kv.available == small.kv.num_blocks  # nothing leaked: all free or cached


def test_nf4_cache_hits_within_tolerance(demo_path, peft_adapters, peft_reference, peft_oracle):
    config = Config(model=str(demo_path), kv_capacity_tokens=2048, max_batch_tokens=48)
    core = EngineCore(load_base(config), config)
    for name, path in peft_adapters.items():
        add(core, name, path)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    warm = [("nf4-warm", chat_ids(core, QUESTIONS[2]), "gamma")]
    run(core, warm, params=params)
    wave = [
        (f"nf4-{i}-{a}", chat_ids(core, q), a)
        for i, q in enumerate(QUESTIONS)
        for a in ("gamma", None)
    ]
    got = run(core, wave, params=params)
    assert all(got[f"nf4-{i}-gamma"][2] >= 48 for i in range(len(QUESTIONS)))
    runs = [(rid, ids, a, got[rid][0], got[rid][1]) for rid, ids, a in wave]
    peft_oracle.check(peft_reference, core.base.tokenizer, runs)


def test_abort_of_one_sharer_leaves_the_other_intact(cached, cold):
    ids = chat_ids(cached, "What bread do you bake on Fridays?")
    run(cached, [("seed", ids, "beta")])  # caches the prompt's full blocks
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    for rid in ("keep", "drop"):
        cached.add_request(rid, ids, "beta", params)
    first = {out.request_id: out for out in cached.step()}  # both admitted, both sample
    tokens, logprobs = [first["keep"].token_id], [first["keep"].logprob]
    keep, drop = cached.seqs["keep"], cached.seqs["drop"]
    shared = (len(ids) - 1) // cached.kv.block_size
    assert keep.blocks[:shared] == drop.blocks[:shared]
    assert all(cached.kv.refs[b] == 2 for b in keep.blocks[:shared])
    cached.abort("drop")
    assert all(cached.kv.refs[b] == 1 for b in keep.blocks[:shared])
    while cached.has_work():
        for out in cached.step():
            assert out.error is None and out.request_id == "keep"
            if out.token_id is not None:
                tokens.append(out.token_id)
                logprobs.append(out.logprob)
    reference = run(cold, [("keep", ids, "beta")], params=params)
    assert_same({"keep": (tokens, logprobs, 0)}, reference)
    assert cached.kv.used_blocks == 0
