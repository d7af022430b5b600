"""Adapter memory proportional to rank, on the real demo model: each adapter held at its own rank
(ranks up to 256 with no configuration, exact against transformers + PEFT), admission by bytes
within --adapter-memory, and the watched folder listing an adapter only after the full checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.errors import AdapterError
from adapters.format import WEIGHTS_FILE
from adapters.slots import SlotTable, device_bytes
from adapters.watch import AdapterDirWatcher
from bench.workload import make_adapters
from loader.config import Config
from loader.model import load_base
from server.engine.core import EngineCore
from server.engine.types import SamplingParams

RANKS = (4, 64, 256)
TARGETS = ["q_proj", "v_proj"]  # rank 256 on every linear would be 300 MB of float32
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ranked(demo_path, tmp_path_factory) -> dict[str, Path]:
    """One PEFT adapter on q_proj and v_proj per rank in RANKS, plus two of ranks 8 and 32."""
    root = tmp_path_factory.mktemp("ranked")
    ranks = (*RANKS, 8, 32)
    return {f"r{r}": make_adapters(demo_path, root, 1, r, r, TARGETS)[0] for r in ranks}


@pytest.fixture(scope="module")
def engine(demo_path, ranked) -> EngineCore:
    """The demo base unquantized in float32 (exact to ~1e-5) with default adapter settings."""
    config = Config(model=str(demo_path), quant="none", compute_dtype="float32")
    core = EngineCore(load_base(config), config)
    for name, path in ranked.items():
        core.registry.register(name, str(path), core.read_adapter(name, str(path)))
    yield core
    core.close()


def chat(engine: EngineCore, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return engine.base.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]


def test_mixed_ranks_up_to_256_equal_peft_in_one_batch(engine, demo_path, ranked):
    prompts = {
        "base": (chat(engine, "Name a planet."), None),
        **{f"q{r}": (chat(engine, f"Count to {r}."), f"r{r}") for r in RANKS},
    }
    for rid, (ids, adapter) in prompts.items():
        engine.add_request(rid, ids, adapter, GREEDY)
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, ranked["r4"], adapter_name="r4").eval()
    for r in RANKS[1:]:
        peft.load_adapter(ranked[f"r{r}"], adapter_name=f"r{r}")
    for rid, (ids, adapter) in prompts.items():
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(
                        torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False
                    )
            else:
                peft.set_adapter(adapter)
                out = peft.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert got[rid] == out[0, len(ids) :].tolist(), (rid, adapter)
    # each adapter took device memory at its own rank: exactly its weights, nothing padded
    resident = engine.slots.resident_bytes
    for r in RANKS:
        weights = engine.registry.weights(f"r{r}", engine.registry.get(f"r{r}").version)
        assert resident[f"r{r}"] == device_bytes(weights, torch.float32)
    assert resident["r256"] == 64 * resident["r4"]


def place_all(slots, engine: EngineCore, names: list[str]) -> list[str]:
    """Place each adapter in turn (released at once); the names resident afterwards."""
    for name in names:
        entry = engine.registry.get(name)
        slot = slots.place((name, entry.version), engine.registry.weights(name, entry.version))
        assert slot is not None
        slots.release(slot)
    return sorted(slots.resident_names)


def test_admission_counts_bytes(engine, ranked):
    weights = {n: engine.registry.weights(n, engine.registry.get(n).version) for n in ranked}
    r8, r32 = (
        device_bytes(weights["r8"], torch.float32),
        device_bytes(weights["r32"], torch.float32),
    )
    assert r32 == 4 * r8  # a quarter of the memory at a quarter of the rank
    # a budget of one rank-32 adapter holds four rank-8 ones (copies under other names)
    copies = []
    for i in range(5):
        name = f"r8-copy{i}"
        engine.registry.register(name, str(ranked["r8"]), weights["r8"])
        copies.append(name)
    engine.slots.retain(lambda key: False)  # the engine's own table lets go of the layers
    slots = SlotTable(engine.slots.layers, 16, r32, 256, torch.float32)
    try:
        assert place_all(slots, engine, copies[:4]) == copies[:4]
        assert slots.used_bytes == r32 and slots.budget_bytes - slots.used_bytes == 0
        assert place_all(slots, engine, copies[4:]) == sorted(copies[1:])  # the LRU one left
        assert place_all(slots, engine, ["r32"]) == ["r32"]  # all four make room for it
        # a pinned adapter is never evicted: the next one waits
        pinned = slots.pin(("r32", engine.registry.get("r32").version))
        entry = engine.registry.get(copies[0])
        assert slots.place((copies[0], entry.version), weights["r8"]) is None
        slots.release(pinned)
        with pytest.raises(AdapterError, match="more than the whole adapter budget") as refused:
            slots.check(weights["r64"])
        assert refused.value.code == "adapter_too_large"
    finally:
        for name in copies:
            engine.registry.unregister(name)
        slots.retain(lambda key: False)
    assert all(not layer.active for layer in slots.layers.values())  # emptied slots hold nothing


def test_budget_from_flag_and_metrics(demo_path):
    config = Config(model=str(demo_path), adapter_memory="3MiB")
    assert config.adapter_memory_bytes(10**12) == 3 * 2**20
    assert Config(adapter_memory="0.5").adapter_memory_bytes(1000) == 500
    with pytest.raises(ValueError, match="adapter_memory"):
        Config(adapter_memory="lots")


def test_watched_folder_lists_only_fully_checked_adapters(engine, ranked, tmp_path):
    root = tmp_path / "watched"
    shutil.copytree(ranked["r4"], root / "good")
    shutil.copytree(ranked["r4"], root / "poisoned")
    tensors = load_file(root / "poisoned" / WEIGHTS_FILE)
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")  # the header stays valid: only a full read sees it
    save_file(tensors, root / "poisoned" / WEIGHTS_FILE, metadata={"format": "pt"})
    watcher = AdapterDirWatcher(root, engine.registry, engine.base.name)
    result = watcher.scan(settle=False)
    try:
        assert result.added == ["good"]
        assert "NaN or Inf" in result.skipped["poisoned"]
        assert "poisoned" not in engine.registry.names()
    finally:
        engine.registry.unregister("good")
