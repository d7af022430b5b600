"""Many adapters, few slots, on the real demo model: disk -> host -> device tiers under random
traffic against PEFT, cold loads off the step loop, replacement, unload and corrupt files."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from bench.workload import make_adapters
from loader.config import Config
from loader.model import load_base
from server.engine.core import EngineCore
from server.engine.types import EngineError, SamplingParams

NEW_TOKENS = 8
RANKS = {4: 14, 8: 13, 16: 13}  # rank -> adapter count: 40 adapters of mixed ranks
# every request runs NEW_TOKENS steps, and reports its logprobs for the PEFT comparison
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 plus 7?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def adapter_paths(demo_path, tmp_path_factory) -> dict[str, Path]:
    """40 seeded all-linear PEFT adapters: ranks 4, 8 and 16."""
    root = tmp_path_factory.mktemp("many")
    paths = {}
    for rank, count in RANKS.items():
        for i, path in enumerate(make_adapters(demo_path, root, count, rank, seed=rank)):
            paths[f"r{rank}-{i}"] = path
    return paths


@pytest.fixture(scope="module")
def engine(demo_path, adapter_paths) -> EngineCore:
    """8 device slots, 12 host copies; every adapter registered from disk (cold)."""
    config = Config(
        model=str(demo_path), max_loras=8, max_cpu_loras=12, max_lora_rank=16, max_num_seqs=16
    )
    core = EngineCore(load_base(config), config)
    for name, path in adapter_paths.items():
        core.registry.register(name, str(path))
    yield core
    core.close()


def prompt(engine: EngineCore, i: int) -> list[int]:
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    return engine.base.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]


def run(engine: EngineCore, joins: dict[int, list[tuple]], until_idle: bool = True) -> dict:
    """Step the engine, adding (id, ids, adapter) requests at the given steps; outputs by id."""
    outputs: dict[str, list] = {}
    step = 0
    while joins or (until_idle and engine.has_work()):
        for rid, ids, adapter in joins.pop(step, []):
            engine.add_request(rid, ids, adapter, GREEDY)
        ran = engine.steps
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if engine.steps == ran:
            time.sleep(0.002)  # waiting for a background load
        step += 1
        assert step < 20_000
    return outputs


def tokens(outs: list) -> list[int]:
    assert outs[-1].finish_reason in ("stop", "length"), outs[-1]
    return [o.token_id for o in outs if o.token_id is not None]


def logprobs(outs: list) -> list[float]:
    return [o.logprob for o in outs if o.token_id is not None]


@pytest.fixture
def peft_with(peft_scratch, adapter_paths):
    """Load some of the 40 adapters into the PEFT oracle for one test, removed afterwards."""
    loaded: list[str] = []

    def load(names) -> None:
        for name in sorted(set(names) - set(loaded) - {None}):
            peft_scratch.load_adapter(adapter_paths[name], adapter_name=name)
            loaded.append(name)

    yield load
    for name in loaded:
        peft_scratch.delete_adapter(name)


def test_40_adapters_on_8_slots_match_peft(engine, peft_scratch, peft_with, peft_oracle):
    rng = random.Random(0)
    names = sorted(engine.registry.names())
    requests = [(f"q{i}", prompt(engine, i), rng.choice([*names, None])) for i in range(24)]
    waves = {0: requests[:10], 2: requests[10:16], 5: requests[16:]}
    loads = engine.registry.loads
    outputs = run(engine, dict(waves))
    used = {a for _, _, a in requests if a is not None}
    assert len(used) > engine.config.max_loras  # slots had to be reused
    assert engine.registry.loads - loads >= len(used)  # every adapter came from disk
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.kv_used_blocks == 0
    assert sum(engine.slots.pins) == 0 and stats.host_adapters <= engine.config.max_cpu_loras
    # each resident adapter at its own rank, within the budget
    resident = engine.slots.resident_bytes
    assert 0 < stats.adapter_device_bytes == sum(resident.values()) <= stats.adapter_memory_budget

    peft_with(used)
    runs = [(rid, ids, a, tokens(outputs[rid]), logprobs(outputs[rid])) for rid, ids, a in requests]
    peft_oracle.check(peft_scratch, engine.base.tokenizer, runs)


def test_cold_load_runs_off_the_step_loop_once(engine, adapter_paths, monkeypatch):
    gate = threading.Event()
    read = engine.registry._read

    def gated(name: str, path: str, header_only: bool):
        if not header_only:
            assert gate.wait(60)
        return read(name, path, header_only)

    monkeypatch.setattr(engine.registry, "_read", gated)
    engine.registry.register("cold", str(adapter_paths["r16-12"]))
    loads = engine.registry.loads
    for i in range(3):
        engine.add_request(f"c{i}", prompt(engine, i), "cold", GREEDY)
    engine.add_request("warm", prompt(engine, 3), None, GREEDY)
    outputs: dict[str, list] = {}
    deadline = time.monotonic() + 120
    while "warm" not in outputs or outputs["warm"][-1].finish_reason is None:
        assert time.monotonic() < deadline
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    # the base request finished while the cold adapter's read was still blocked
    assert len(tokens(outputs["warm"])) == NEW_TOKENS
    assert all(f"c{i}" not in outputs for i in range(3)) and engine.registry.loads == loads
    gate.set()
    outputs = run(engine, {})
    assert engine.registry.loads == loads + 1  # three requests, one load
    assert all(len(tokens(outputs[f"c{i}"])) == NEW_TOKENS for i in range(3))


def test_replacement_keeps_running_requests_on_old_weights(
    engine, adapter_paths, peft_scratch, peft_with, peft_oracle
):
    old, new = "r8-3", "r8-4"
    engine.registry.register("swap", str(adapter_paths[old]))
    ids = prompt(engine, 5)
    outputs = run(engine, {0: [("before", ids, "swap")]}, until_idle=False)
    while not outputs.get("before"):  # running: its first token is out
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    engine.registry.register("swap", str(adapter_paths[new]))
    for out in engine.step():
        outputs.setdefault(out.request_id, []).append(out)
    outputs2 = run(engine, {0: [("after", ids, "swap")]})
    for rid, outs in outputs2.items():
        outputs.setdefault(rid, []).extend(outs)
    before, after = tokens(outputs["before"]), tokens(outputs["after"])
    assert before != after
    peft_with([old, new])
    runs = [
        ("before", ids, old, before, logprobs(outputs["before"])),
        ("after", ids, new, after, logprobs(outputs["after"])),
    ]
    peft_oracle.check(peft_scratch, engine.base.tokenizer, runs)
    assert sum(engine.slots.pins) == 0 and not engine.slots.detached


def test_unload_spares_running_requests(engine, adapter_paths):
    engine.registry.register("gone", str(adapter_paths["r4-5"]))
    ids = prompt(engine, 2)
    alone = tokens(run(engine, {0: [("alone", ids, "gone")]})["alone"])
    outputs = run(engine, {0: [("running", ids, "gone")]}, until_idle=False)
    while not outputs.get("running"):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    engine.add_request("queued", ids, "gone", GREEDY)
    engine.remove_adapter("gone")
    for rid, outs in run(engine, {}).items():
        outputs.setdefault(rid, []).extend(outs)
    assert tokens(outputs["running"]) == alone
    (queued,) = outputs["queued"]
    assert queued.finish_reason == "error" and queued.error_code == "model_not_found"
    with pytest.raises(EngineError) as unknown:
        engine.add_request("late", ids, "gone", GREEDY)
    assert unknown.value.status == 404
    assert sum(engine.slots.pins) == 0 and not engine.slots.detached


def test_corrupt_file_fails_only_its_requests(engine, adapter_paths, tmp_path):
    folder = tmp_path / "fragile"
    shutil.copytree(adapter_paths["r4-6"], folder)
    engine.registry.register("fragile", str(folder))  # valid when registered ...
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # ... then truncated
    ids = prompt(engine, 1)
    outputs = run(
        engine, {0: [("f1", ids, "fragile"), ("f2", ids, "fragile"), ("ok", ids, "r4-0")]}
    )
    for rid in ("f1", "f2"):
        (out,) = outputs[rid]
        assert out.finish_reason == "error" and out.error_code == "adapter_unavailable"
        assert "could not be loaded" in out.error
        assert "corrupt or truncated" in out.error
    assert len(tokens(outputs["ok"])) == NEW_TOKENS
