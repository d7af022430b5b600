"""The fast grouped LoRA op against the reference op and PEFT's own LoRA layer."""

from __future__ import annotations

import pytest
import torch

from adapters.format import base_linear_shapes, read_adapter
from adapters.layer import MultiLoraLinear, StepRouting
from adapters.lora_ops import GroupPlan, SlotWeights, lora_grouped, lora_reference


def random_slots(ranks: list[int], fan_in: int, fan_out: int, seed: int) -> SlotWeights:
    """Slot weights of mixed ranks (0: an empty slot)."""
    g = torch.Generator().manual_seed(seed)
    weights = SlotWeights(len(ranks), fan_in, fan_out, torch.float32, "cpu")
    for slot, rank in enumerate(ranks):
        if rank:
            A, B = torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g)
            weights.set(slot, A, B, 0.5)
    return weights


@pytest.mark.parametrize("tokens", [[0, 1, 2, -1, 1, 1, 3, -1, 0], [2, 2, 2], [-1, 3], [1], [4, 0]])
def test_grouped_matches_reference(tokens):
    weights = random_slots([8, 4, 64, 0, 256], 64, 96, seed=len(tokens))
    x = torch.randn(len(tokens), 64, dtype=torch.bfloat16)
    t = torch.tensor(tokens)
    ref = lora_reference(x, weights, t)
    fast = lora_grouped(x, weights, GroupPlan.build(t, 5))
    # fp32 GEMMs with another summation order: differences are float32 rounding, ~1e-6 relative
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)
    empty = (t < 0) | (t == 3)  # base-only tokens and the empty slot
    assert torch.all(ref[empty] == 0) and torch.all(fast[empty] == 0)


def test_slot_memory_is_proportional_to_rank():
    weights = random_slots([8, 32, 0], 64, 96, seed=0)
    per_rank = (64 + 96) * 4  # one rank row of A and of B, float32
    assert weights.nbytes == (8 + 32) * per_rank
    assert [a.shape[0] for a in weights.A if a is not None] == [8, 32]
    weights.set(1, None, None, 0.0)
    assert weights.nbytes == 8 * per_rank and weights.A[1] is None
    assert weights.ranks.tolist() == [8, 0, 0] and weights.a_ptrs[1] == 0


def test_plan_is_none_without_adapter_tokens():
    assert GroupPlan.build(torch.tensor([-1, -1]), 4) is None


@pytest.mark.parametrize(
    "layer_path", ["model.layers.3.self_attn.q_proj", "model.layers.7.mlp.down_proj"]
)
def test_multi_lora_layer_matches_peft_layer(nf4_base, peft_reference, peft_adapters, layer_path):
    peft_model = peft_reference
    shapes = base_linear_shapes(nf4_base.model)
    names = list(peft_adapters)
    routing = StepRouting(num_slots=len(names))
    base_layer = nf4_base.model.get_submodule(layer_path)
    ours = MultiLoraLinear(base_layer, routing)
    weights = {n: read_adapter(p, n, shapes, 64, 1 << 30) for n, p in peft_adapters.items()}
    for slot, name in enumerate(names):
        ours.set_slot(slot, weights[name].modules.get(layer_path))
    peft_layer = peft_model.base_model.model.get_submodule(layer_path)
    x = torch.randn(
        len(names) + 1, base_layer.in_features, generator=torch.Generator().manual_seed(0)
    )
    x = x.to(torch.bfloat16)
    tokens = torch.tensor([*range(len(names)), -1])  # one row per adapter, one base-only row
    for op in ("grouped", "reference"):
        routing.op = op
        routing.set(tokens)
        with torch.no_grad():
            mixed = ours(x)  # [5, out]
        routing.set(None)
        for slot, name in enumerate(names):
            peft_model.set_adapter(name)
            with torch.no_grad():
                expected = peft_layer(x[slot : slot + 1])
            # both add an fp32 LoRA delta to the same bf16 base output and round to bf16; the only
            # difference is fp32 summation order (and scaling folded into B), so at most one bf16 ulp
            ulp = expected.abs().float().clamp_min(1e-3) * 2**-7
            diff = (mixed[slot : slot + 1].float() - expected.float()).abs()
            assert torch.all(diff <= ulp), (name, float((diff / ulp).max()), int((diff > 0).sum()))
        with torch.no_grad():
            assert torch.equal(mixed[-1:], base_layer(x[-1:]))  # base-only token: no LoRA term
