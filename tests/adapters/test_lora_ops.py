"""The fast grouped LoRA op against the reference op and PEFT's own LoRA layer."""

from __future__ import annotations

import pytest
import torch

from adapters.format import base_linear_shapes, read_adapter
from adapters.layer import MultiLoraLinear, StepRouting
from adapters.lora_ops import GroupPlan, lora_grouped, lora_reference


def random_stacks(slots: int, rank: int, fan_in: int, fan_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, rank, fan_in, generator=g)
    B = torch.randn(slots, fan_out, rank, generator=g)
    A[1, rank // 2 :] = 0  # slot 1 has half the rank: mixed ranks in one stack
    B[1, :, rank // 2 :] = 0
    return A, B


@pytest.mark.parametrize("tokens", [[0, 1, 2, -1, 1, 1, 3, -1, 0], [2, 2, 2], [-1, 3], [1]])
def test_grouped_matches_reference(tokens):
    A, B = random_stacks(4, 8, 64, 96, seed=len(tokens))
    x = torch.randn(len(tokens), 64, dtype=torch.bfloat16)
    t = torch.tensor(tokens)
    ref = lora_reference(x, A, B, t)
    fast = lora_grouped(x, A, B, GroupPlan.build(t, 4))
    # fp32 GEMMs with another summation order: differences are float32 rounding, ~1e-6 relative
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(ref[t < 0] == 0) and torch.all(fast[t < 0] == 0)


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
    ours = MultiLoraLinear(base_layer, routing, max_rank=16)
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
