"""Mixed-adapter continuous batching equals plain PEFT run one request at a time.

The engine packs tokens from many requests into one forward, pads decode attention, chunks
prefills and recomputes preempted sequences, so GEMMs see other shapes than PEFT's lone run: the
comparison allows near-ties within the tolerance measured on this machine (PeftOracle in
tests/conftest.py says how).
"""

from __future__ import annotations

from adapters.format import read_adapter
from loader.config import Config
from loader.model import load_base
from server.engine.core import EngineCore
from server.engine.types import SamplingParams

NEW_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn leaves falling slowly to the ground in the evening light.",
    "What is 12 plus 7?",
    "Explain in one sentence what a computer program is.",
    "Give me a synonym for happy.",
    "Which planet is known as the red planet, and why does it have that color?",
    "Translate 'good morning' into Spanish.",
    "What do bees make?",
    "Describe the ocean in five words.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius at sea level, and does it change on mountains?",
    "List two fruits that are yellow.",
    "How many legs does a spider have?",
    "Suggest a name for a friendly robot who helps children learn to read and write.",
    "What is the opposite of cold?",
    "Why is the sky blue?",
    "Count from one to five.",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about elephants.",
]


def chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


def test_mixed_batch_equals_peft_alone(
    demo_path, peft_adapters, peft_reference, peft_oracle, engine_waves
):
    config = Config(
        model=str(demo_path),
        max_batch_tokens=48,  # prompts of 30-60 tokens are prefilled in chunks
        max_num_seqs=12,
        kv_capacity_tokens=16 * 18,  # too small for 12 running sequences: forces preemption
        max_loras=3,  # four adapters compete for three slots
        max_lora_rank=16,
    )
    base = load_base(config)
    engine = EngineCore(base, config)
    from adapters.format import base_linear_shapes

    shapes = base_linear_shapes(base.model)
    for name, path in peft_adapters.items():
        engine.add_adapter(read_adapter(path, name, shapes, 64, 1 << 30))
    adapters = [*peft_adapters, None]
    tok = base.tokenizer
    requests = [
        (f"r{i}", chat_ids(tok, q), adapters[i % len(adapters)])
        for i, q in enumerate(QUESTIONS[:16])
    ]
    assert max(len(ids) for _, ids, _ in requests) > config.max_batch_tokens
    # every request runs NEW_TOKENS steps (the KV pressure does not depend on where EOS falls)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outputs = engine_waves(engine, requests, {0: 8, 3: 4, 9: 4}, params)
    stats = engine.stats()
    assert stats.preemptions > 0, "the test must exercise preemption"
    assert stats.kv_used_blocks == 0 and stats.running == 0 and stats.waiting == 0
    assert sum(engine.slots.pins) == 0

    runs = [
        (rid, ids, adapter, [t for t, _ in outputs[rid]], [lp for _, lp in outputs[rid]])
        for rid, ids, adapter in requests
    ]
    peft_oracle.check(peft_reference, tok, runs)
    # the same outputs credited to the wrong adapters (each request's neighbour's) fail: all but at
    # most one (a factual answer that two adapters hardly change may pass)
    wrong_passes = []
    for run in runs:
        wrong = adapters[(adapters.index(run[2]) + 1) % len(adapters)]
        try:
            peft_oracle.check(peft_reference, tok, [(run[0], run[1], wrong, *run[3:])])
            wrong_passes.append((run[0], run[2], wrong))
        except AssertionError:
            pass
    assert len(wrong_passes) <= 1, wrong_passes
