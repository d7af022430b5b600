"""Every popular base family is served exactly or refused at start-up (the README's supported-models
table is this matrix).

For each family a tiny random checkpoint is built here (no download; the demo's tokenizer), served by
the engine unquantized in float32 in one mixed batch (the base plus two PEFT adapters with different
target sets, prompts longer than the sliding window, prefills chunked across a window edge, and
sequences preempted and recomputed), then checked against transformers + PEFT with eager attention
running each request alone: the same greedy tokens, logprobs within 1e-3. One NF4 run per family is
held to the PEFT oracle's measured tolerance on the same NF4 base (tests/conftest.py, PeftOracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adapters.errors import AdapterError
from adapters.experts import expert_param_dims
from adapters.format import base_linear_shapes, read_adapter
from adapters.layer import decoder_linear_names
from bench.workload import make_adapters
from loader.architecture import UnsupportedArchitecture
from loader.config import Config
from loader.memory import memory_report
from loader.model import load_base
from loader.synthetic import TINY, random_checkpoint
from server.engine.core import EngineCore
from server.engine.types import SamplingParams

WINDOW = 8  # sliding window of the tiny checkpoints: every prompt is longer
CHUNK = 12  # prefill chunk (max_batch_tokens): chunks start past the window edge
NEW_TOKENS = 6
LOGPROB_TOLERANCE = 1e-3
MIXED = ["sliding_attention", "full_attention"]  # one windowed layer, one global
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
# model_type -> config overrides: the families of the README's table, then some refused ones
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "ministral": dict(sliding_window=WINDOW, layer_types=MIXED),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=64, **MOE),
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, **MOE),
    # beyond the list: OLMoE passes sliding_window to attention but masks plain causal, so
    # eager attention (the reference) has no window; PhiMoE windows through the mask alone
    "olmoe": dict(sliding_window=WINDOW, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_5_text": dict(num_hidden_layers=4),  # refused: three Gated DeltaNet layers, one global
    "falcon_mamba": {},
    "doge": {},
    "bloom": {},
    "bert": {},  # an encoder unless is_decoder
    "gemma2": dict(sliding_window=WINDOW, layer_types=MIXED),  # + logit softcaps
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=MIXED),
    "gemma4_text": dict(sliding_window=WINDOW, layer_types=MIXED, global_head_dim=64),
    "phi3": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=WINDOW, layer_types=MIXED),
    "granite": dict(logits_scaling=4.0, attention_multiplier=0.25, residual_multiplier=0.5),
    "cohere2": dict(sliding_window=WINDOW, layer_types=MIXED),  # + logit_scale
    "gpt_oss": dict(
        sliding_window=WINDOW, layer_types=MIXED, num_local_experts=4, num_experts_per_tok=2
    ),  # + sinks
    "exaone4": dict(sliding_window=WINDOW, layer_types=MIXED),
    "smollm3": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "glm4": {},
    "deepseek_v3": dict(
        num_key_value_heads=2,  # MLA: K and V have every head
        kv_lora_rank=64,  # in_features of kv_b_proj / q_b_proj: a multiple of bnb's blocksize
        q_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,  # K is 64 wide, V 32
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        **MOE,
    ),
}
# refused families and what the start-up message names
ALL_SLIDING = {
    "mistral",
    "mixtral",
    "starcoder2",
}  # every layer windowed: blocks behind the window are freed
REFUSED = {
    "qwen3_5_text": "layers \\[0, 1, 2\\] are of type linear_attention",  # Gated DeltaNet
    "falcon_mamba": "type linear_attention",  # Mamba
    "doge": "adds its own attention mask",  # dynamic-mask attention
    "bloom": "takes no position_ids",  # ALiBi from the padding mask
    "bert": "bidirectional",
    "phimoe": "restricts attention through a mask alone",
}
QUESTIONS = [
    "What is the capital of France, and which river runs through it?",
    "Name three primary colors and one color you get by mixing two of them.",
    "Write a haiku about autumn leaves falling slowly to the ground.",
    "Explain in one sentence what a computer program is and does.",
    "Which planet is known as the red planet, and why does it have that color?",
    "Suggest a name for a friendly robot who helps children learn to read.",
]


def adapter_targets(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Two target sets, (target_modules, target_parameters): every decoder linear plus every fused
    MoE expert weight, and the attention projections only."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    names = decoder_linear_names(model)
    every = sorted({n.rpartition(".")[2] for n in names})
    experts = sorted({".".join(p.split(".")[-2:]) for p in expert_param_dims(model)})
    attention = sorted({n.rpartition(".")[2] for n in names if "attn" in n.split(".")[-2]})
    return {"all": (every, experts), "attn": (attention, [])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo_tokenizer) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Per family: its checkpoint folder and its two adapters by name (built on first use)."""
    cache: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(family: str) -> tuple[Path, dict[str, Path]]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            config = {**TINY, **FAMILIES[family]}
            path = random_checkpoint(family, root / "base", demo_tokenizer, **config)
            adapters = {}
            if family not in REFUSED:
                targets = adapter_targets(path)
                for seed, (name, (rank, which)) in enumerate(
                    {"lora-all": (8, "all"), "lora-attn": (4, "attn")}.items()
                ):
                    modules, parameters = targets[which]
                    made = make_adapters(
                        path, root / "adapters", 1, rank, seed, modules, parameters=parameters
                    )
                    adapters[name] = made[0]
            cache[family] = (path, adapters)
        return cache[family]

    return get


def requests_of(tokenizer) -> list[tuple[str, list[int], str | None]]:
    """Six chat prompts, all longer than the window and than a prefill chunk, over three models."""
    models = ["lora-all", "lora-attn", None]
    requests = []
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        requests.append((f"r{i}", ids["input_ids"], models[i % 3]))
    assert min(len(ids) for _, ids, _ in requests) > CHUNK > WINDOW
    return requests


def serve(path: Path, adapters: dict[str, Path], engine_waves, **config: object):
    """Run the requests through an engine on path in waves; (engine, requests, outputs)."""
    cfg = Config(model=str(path), max_loras=2, max_lora_rank=16, **config)
    base = load_base(cfg)
    engine = EngineCore(base, cfg)
    shapes = base_linear_shapes(base.model)
    for name, folder in adapters.items():
        engine.add_adapter(read_adapter(folder, name, shapes, 16, 1 << 30))
    requests = requests_of(base.tokenizer)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outputs = engine_waves(engine, requests, {0: 4, 2: 2}, params)
    return engine, requests, outputs


def peft_reference(path: Path, adapters: dict[str, Path], **config: object):
    """transformers + PEFT (eager attention) with both adapters, on its own copy of the base."""
    from peft import PeftModel

    base = load_base(Config(model=str(path), **config))
    base.model.set_attn_implementation("eager")
    names = list(adapters)
    model = PeftModel.from_pretrained(base.model, adapters[names[0]], adapter_name=names[0])
    model.load_adapter(adapters[names[1]], adapter_name=names[1])
    return model.eval(), base.tokenizer


SERVED = [f for f in FAMILIES if f not in REFUSED]


@pytest.mark.parametrize("family", SERVED)
def test_float32_mixed_batch_is_exact(family, checkpoints, engine_waves, peft_oracle):
    path, adapters = checkpoints(family)
    exact = dict(quant="none", compute_dtype="float32")
    engine, requests, outputs = serve(
        path,
        adapters,
        engine_waves,
        max_batch_tokens=CHUNK,
        max_num_seqs=6,
        # too small for six sequences: preemption (windowed-everywhere bases free blocks behind the
        # window, so they get less)
        kv_capacity_tokens=16 * (3 if family in ALL_SLIDING else 6),
        **exact,
    )
    assert engine.stats().preemptions > 0, "the test must exercise preemption"
    if family in ALL_SLIDING:  # blocks behind the window are freed: no chain to cache
        assert engine.kv.prefix is None
    else:  # later waves and resumed sequences reuse the chat template's system-prompt blocks
        assert sum(engine.stats().prefix_hit_tokens.values()) > 0, "no prefix-cache hit"
    model, _ = peft_reference(path, adapters, **exact)
    for rid, ids, adapter in requests:
        tokens = [t for t, _ in outputs[rid]]
        logprobs = torch.tensor([lp for _, lp in outputs[rid]])
        logits = peft_oracle.forced(model, ids, adapter, tokens)  # [NEW_TOKENS, vocab]
        assert logits.argmax(-1).tolist() == tokens, f"{family} {rid} ({adapter})"
        expected = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), tokens]
        drift = float((logprobs - expected).abs().max())
        assert drift < LOGPROB_TOLERANCE, f"{family} {rid} ({adapter}): logprobs off by {drift}"


# PEFT folds scaling * B A into the bf16 expert weights (one bf16 rounding of W + dW per element);
# the engine adds the LoRA term, computed in float32, to the bf16 product. Both approximate the
# float32 result (equal to 2e-6 above); on these tiny random MoE models they differ by up to 1.19
# nats at a token (qwen3_moe, two requests with one near-tie flip each), past the dense oracle's 0.5
# floor. So requests with expert LoRA get this floor and are checked one by one (at most one flip
# each); the same outputs credited to the bare base must still fail it.
EXPERT_MERGE_FLOOR = 1.5


@pytest.mark.parametrize("family", SERVED)
def test_nf4_within_the_oracle_tolerance(family, checkpoints, engine_waves, peft_oracle):
    path, adapters = checkpoints(family)
    engine, requests, outputs = serve(path, adapters, engine_waves, max_batch_tokens=CHUNK)
    model, tokenizer = peft_reference(path, adapters)
    runs = [
        (rid, ids, adapter, [t for t, _ in outputs[rid]], [lp for _, lp in outputs[rid]])
        for rid, ids, adapter in requests
    ]
    merged = {"lora-all"} if expert_param_dims(engine.base.model) else set()
    peft_oracle.check(model, tokenizer, [r for r in runs if r[2] not in merged])
    if merged:
        expert_runs = [r for r in runs if r[2] in merged]
        for run in expert_runs:
            peft_oracle.check(model, tokenizer, [run], floor=EXPERT_MERGE_FLOOR)
        as_base = [(rid, ids, None, *rest) for rid, ids, _, *rest in expert_runs]
        with pytest.raises(AssertionError):
            peft_oracle.check(model, tokenizer, as_base, floor=EXPERT_MERGE_FLOOR)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_at_start_up_by_name(family, checkpoints):
    path, _ = checkpoints(family)
    cfg = Config(model=str(path), quant="none", compute_dtype="float32")
    base = load_base(cfg)
    with pytest.raises(UnsupportedArchitecture, match=REFUSED[family]) as refused:
        EngineCore(base, cfg)
    assert family in str(refused.value)


def test_lora_on_a_missing_expert_weight_is_refused_with_what_is_served(checkpoints, tmp_path):
    path, adapters = checkpoints("qwen3_moe")
    folder = tmp_path / "experts"
    folder.mkdir()
    for file in adapters["lora-attn"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.w4"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    base = load_base(Config(model=str(path), quant="none", compute_dtype="float32"))
    with pytest.raises(AdapterError, match="'mlp.experts.w4' is not a fused MoE expert") as refused:
        read_adapter(folder, "experts", base_linear_shapes(base.model), 16, 1 << 30)
    assert "mlp.experts.gate_up_proj" in str(refused.value)


def test_expert_lora_reaches_the_experts(checkpoints):
    path, adapters = checkpoints("qwen3_moe")
    base = load_base(Config(model=str(path), quant="none", compute_dtype="float32"))
    shapes = base_linear_shapes(base.model)
    weights = read_adapter(adapters["lora-all"], "all", shapes, 16, 1 << 30)
    experts = [m for m in weights.modules if m.endswith(("experts.gate_up_proj", "down_proj"))]
    assert len(experts) == 2 * 2  # two layers, both fused weights
    module = weights.modules["model.layers.0.mlp.experts.gate_up_proj"]
    assert module.A.shape == (4, 8, 64) and module.B.shape == (4, 128, 8)  # [E, r, in], [E, out, r]


def test_blocks_outside_every_window_are_freed(checkpoints, peft_oracle):
    path, adapters = checkpoints("mistral")  # every layer slides: blocks behind the window are dead
    cfg = Config(model=str(path), quant="none", compute_dtype="float32", max_batch_tokens=CHUNK)
    engine = EngineCore(load_base(cfg), cfg)
    assert engine.kv.horizon == WINDOW
    (rid, ids, _), new = requests_of(engine.base.tokenizer)[0], 40
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.add_request(rid, ids, None, params)
    peak, tokens = 0, []
    while engine.has_work():
        tokens += [out.token_id for out in engine.step() if out.token_id is not None]
        peak = max(peak, engine.kv.used_blocks)
    block = cfg.block_size
    assert -(-(len(ids) + new) // block) == 6  # what the sequence would hold without freeing
    assert peak <= -(-(WINDOW + CHUNK) // block) + 1  # the window, one chunk, one partial block
    model, _ = peft_reference(path, adapters, quant="none", compute_dtype="float32")
    assert peft_oracle.forced(model, ids, None, tokens).argmax(-1).tolist() == tokens


def test_nf4_memory_report_names_what_stays_16_bit(checkpoints):
    path, _ = checkpoints("qwen2_moe")
    report = memory_report(load_base(Config(model=str(path))).model)
    # per layer: fused gate_up and down expert tensors, and the shared-expert gate (an nn.Linear
    # with one output; the router itself is a plain weight, never quantized)
    assert (report.expert_tensors, report.unquantized_linears) == (2 * 2, 2)
    assert report.quantized_layers == 2 * (4 + 3)  # attention + shared expert MLP
    line = report.format()
    assert "kept 16-bit in the decoder: 4 fused MoE expert tensors" in line
    assert "2 router linears" in line
