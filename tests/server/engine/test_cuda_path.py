"""The CUDA path: decode steps replayed from CUDA graphs, Triton LoRA, bf16/fp32 slots on the GPU.

Runs on a tiny random-weight Llama quantized to NF4 on the GPU (the demo model's GGUF file does
not travel to GPU hosts without a network), against plain PEFT on its own copy of the same base.
Skipped where torch sees no CUDA device; the CPU suite covers everything else of the engine.
"""

from __future__ import annotations

import pytest
import torch

from adapters.format import base_linear_shapes
from bench.engine_cuda import build_peft, random_adapters
from bench.workload import ALL_LINEAR, adapter_name
from loader.config import Config
from loader.synthetic import synthetic_base
from server.engine.core import EngineCore
from server.engine.runner import pack
from server.engine.types import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ADAPTERS = 3
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cuda_engine():
    config = Config(
        device="cuda",
        max_loras=ADAPTERS,
        max_cpu_loras=ADAPTERS,
        max_lora_rank=8,
        max_num_seqs=8,
        max_batch_tokens=64,
        kv_capacity_tokens=1024,
        lora_dtype="float32",  # PEFT keeps LoRA weights in float32
    )
    base = synthetic_base("tiny", config, seed=0, init_std=0.2)
    shapes = base_linear_shapes(base.model)
    adapters = random_adapters(shapes, ALL_LINEAR, 8, ADAPTERS, seed=1)
    peft = build_peft(base.model, adapters, ALL_LINEAR)  # before the engine wraps the layers
    engine = EngineCore(base, config)
    for weights in adapters:
        engine.add_adapter(weights)
    yield engine, peft, base.tokenizer
    engine.close()


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 1000, (int(8 + 5 * i),), generator=g).tolist() for i in range(n)]


def test_graph_replay_equals_eager_forward(cuda_engine):
    """One padded decode step (3 sequences in the 4-row graph) from its graph and eagerly."""
    engine, _, _ = cuda_engine
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    names = [adapter_name(0), adapter_name(1), None]
    for i, (ids, name) in enumerate(zip(prompts(3, 0), names, strict=True)):
        engine.add_request(f"g{i}", ids, name, params)
    while not all(s.output_ids for s in engine.seqs.values()):
        engine.step()
    batch = engine.scheduler.schedule()
    step = pack(batch, engine.kv)
    assert step.decode_only and len(step.ids) == 3
    graphs = engine.runner.graphs
    replays = graphs.replays
    graph_logits = graphs.run(step).clone()  # [3, V]
    assert graphs.replays == replays + 1 and (4, 64, True) in graphs.graphs
    engine.runner.graphs = None
    try:
        eager = engine.runner.run(batch)[1]  # [3, V]
        seqs = [seq for seq, _ in batch.items]
        slots = [seq.slot for seq in seqs]
        for seq in seqs:
            seq.slot = -1
        bare = engine.runner.run(batch)[1]  # the same step with no adapters: the wrong answer
        for seq, slot in zip(seqs, slots, strict=True):
            seq.slot = slot
    finally:
        engine.runner.graphs = graphs
    for rid in list(engine.seqs):
        engine.abort(rid)
    error = (graph_logits - eager).norm(dim=-1) / eager.norm(dim=-1)  # [3]
    # bf16 activations, fp32 LoRA: rows agree to bf16 rounding (cuBLAS may tile 3 and 4 rows apart)
    assert float(error.max()) < 1e-2, error
    adapter_effect = (bare - eager).norm(dim=-1) / eager.norm(dim=-1)
    assert float(adapter_effect[:2].min()) > 10 * float(error.max()), adapter_effect
    assert torch.equal(bare[2], eager[2])  # the base-only row


def test_cuda_engine_matches_peft_alone(cuda_engine, peft_oracle, engine_waves):
    """A mixed batch (3 adapters + base, joins mid-flight) decoded through CUDA graphs equals
    PEFT run one request at a time, within the oracle's measured tolerance."""
    engine, peft, tokenizer = cuda_engine
    names = [*(adapter_name(i) for i in range(ADAPTERS)), None]
    requests = [(f"m{i}", ids, names[i % len(names)]) for i, ids in enumerate(prompts(8, 1))]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    replays = engine.runner.graphs.replays
    outputs = engine_waves(engine, requests, {0: 5, 3: 3}, params)
    assert engine.runner.graphs.replays - replays >= NEW_TOKENS - 4  # decode ran from graphs
    runs = [
        (rid, ids, name, [t for t, _ in outputs[rid]], [lp for _, lp in outputs[rid]])
        for rid, ids, name in requests
    ]
    peft_oracle.check(peft, tokenizer, runs)
    wrong_passes = 0
    for run in runs:
        wrong = names[(names.index(run[2]) + 1) % len(names)]
        try:
            peft_oracle.check(peft, tokenizer, [(run[0], run[1], wrong, *run[3:])])
            wrong_passes += 1
        except AssertionError:
            pass
    assert wrong_passes <= 1, f"{wrong_passes} runs pass with the wrong adapter"
