"""Reading real PEFT adapters built on the demo model, and refusals of broken or exotic weights."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.format import AdapterWeights, base_linear_shapes

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"


def assert_matches(weights: AdapterWeights, expected: dict) -> None:
    assert set(weights.modules) == set(expected)
    for module, (a, b, scaling) in expected.items():
        got = weights.modules[module]
        assert got.A.dtype == torch.float32 and got.B.dtype == torch.float32
        assert torch.equal(got.A, a) and torch.equal(got.B, b)
        assert got.scaling == pytest.approx(scaling)


def test_r8_all_linear_reads_back_equal(demo_lora, read_lora, demo_shapes):
    folder, expected = demo_lora.adapters["r8"]
    weights = read_lora(folder)
    assert len(expected) == 30 * 7 and set(weights.modules) == set(demo_shapes)
    assert_matches(weights, expected)
    assert weights.rank == 8 and weights.modules[Q0].scaling == 2.0
    assert weights.name == "test" and weights.config["r"] == 8 and weights.manifest == {}


def test_r4_q_v_reads_back_equal(demo_lora, read_lora, demo_shapes):
    folder, expected = demo_lora.adapters["r4"]
    weights = read_lora(folder)
    assert {m.rpartition(".")[2] for m in weights.modules} == {"q_proj", "v_proj"}
    assert_matches(weights, expected)
    assert weights.modules[V0].B.shape == (demo_shapes[V0][1], 4)


def test_rslora_and_patterns_match_peft_scaling(demo_lora, read_lora):
    folder, expected = demo_lora.adapters["patterns"]
    weights = read_lora(folder)
    assert_matches(weights, expected)
    assert weights.modules[V0].rank == 2 and weights.modules[Q0].rank == 4
    assert weights.modules["model.layers.3.self_attn.q_proj"].scaling == pytest.approx(5 / 2)
    assert weights.modules[V0].scaling == pytest.approx(8 / 2**0.5)


def test_base_linear_shapes_reads_quantized_linear4bit():
    """A quantized Linear4bit packs its weight, yet its (in, out) are reported; lm_head is not."""
    attn = torch.nn.Module()
    attn.q_proj = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    attn.o_proj = torch.nn.Linear(32, 64)
    layer = torch.nn.Module()
    layer.self_attn = attn
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([layer])
    model.lm_head = torch.nn.Linear(64, 100)
    assert attn.q_proj.weight.shape != (32, 64)
    assert base_linear_shapes(model) == {
        "model.layers.0.self_attn.q_proj": (64, 32),
        "model.layers.0.self_attn.o_proj": (32, 64),
    }


def test_base_linear_shapes_of_demo(demo_shapes):
    assert len(demo_shapes) == 30 * 7
    assert demo_shapes[Q0] == (576, 576) and demo_shapes[V0] == (576, 192)
    assert demo_shapes["model.layers.0.mlp.down_proj"] == (1536, 576)


def test_adapter_name_infix_is_mapped(demo_lora, spoilt, read_lora, refused):
    file = spoilt / "adapter_model.safetensors"
    tensors = load_file(file)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, file)
    assert_matches(read_lora(spoilt), demo_lora.adapters["r4"][1])
    renamed |= {k.replace(".weight", ".other.weight"): v.clone() for k, v in tensors.items()}
    save_file(renamed, file)
    refused(spoilt, "unexpected_tensor", "two lora_A tensors")


def test_layers_to_transform_is_honoured(spoilt, read_lora, refused, edit_config):
    edit_config(spoilt, layers_to_transform=[0])
    refused(spoilt, "unexpected_tensor", "outside layers_to_transform [0]")
    file = spoilt / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if ".layers.0." in k}, file)
    assert set(read_lora(spoilt).modules) == {Q0, V0}


# ---- refusals of the weights file: each corrupts a copy of the r=4 adapter ----


def test_missing_folder(tmp_path: Path, refused):
    refused(tmp_path / "nope", "adapter_not_found", "does not exist")


def test_pickle_weights_refused_never_unpickled(spoilt, refused, monkeypatch: pytest.MonkeyPatch):
    (spoilt / "adapter_model.safetensors").rename(spoilt / "adapter_model.bin")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(spoilt, "pickle_weights_refused", "refusing pickle weights adapter_model.bin")


def test_missing_weights(spoilt, refused):
    (spoilt / "adapter_model.safetensors").unlink()
    refused(spoilt, "missing_adapter_weights", "adapter_model.safetensors is missing")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(spoilt, refused, damage: str):
    file = spoilt / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x07" * 4096, "empty": b""}[damage]
    )
    refused(spoilt, "corrupt_adapter_weights", "corrupt or truncated")


def test_tensor_for_module_absent_from_base(spoilt, refused, edit_tensors):
    q30 = "model.layers.30.self_attn.q_proj"
    edit_tensors(
        spoilt,
        **{
            f"{q30}.lora_A.weight": torch.zeros(4, 576),
            f"{q30}.lora_B.weight": torch.zeros(576, 4),
        },
    )
    refused(spoilt, "unknown_target_module", f"{q30!r} (tensor")


@pytest.mark.parametrize(
    ("key", "tensor", "fragment"),
    [
        (f"{Q0}.lora_A.weight", torch.zeros(4, 512), "has shape [4, 512], expected [4, 576]"),
        (f"{V0}.lora_B.weight", torch.zeros(576, 4), "has shape [576, 4], expected [192, 4]"),
        (f"{Q0}.lora_A.weight", torch.zeros(576, 4), "expected [4, 576]"),
        (f"{Q0}.lora_A.weight", torch.zeros(4, 576, 1), "expected [4, 576]"),
    ],
)
def test_wrong_shapes(spoilt, refused, edit_tensors, key: str, tensor: torch.Tensor, fragment: str):
    edit_tensors(spoilt, **{key: tensor})
    refused(spoilt, "shape_mismatch", fragment)


def test_rank_disagreeing_with_config(spoilt, refused, edit_config):
    edit_config(spoilt, r=8)
    refused(spoilt, "shape_mismatch", "rank 8 from the config")


@pytest.mark.parametrize(("drop", "lacks"), [("lora_B", "no lora_B"), ("lora_A", "no lora_A")])
def test_unpaired_tensor(spoilt, refused, edit_tensors, drop: str, lacks: str):
    edit_tensors(spoilt, **{f"{Q0}.{drop}.weight": None})
    refused(spoilt, "incomplete_lora_pair", lacks)


def test_rank_above_limit(spoilt, refused):
    refused(spoilt, "rank_too_large", "rank 4, above this server's max_rank 2", max_rank=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(spoilt, refused, edit_tensors, value: float):
    tensor = load_file(spoilt / "adapter_model.safetensors")[f"{PREFIX}{V0}.lora_B.weight"]
    tensor[3, 1] = value
    edit_tensors(spoilt, **{f"{V0}.lora_B.weight": tensor})
    refused(spoilt, "non_finite_weights", "NaN or Inf")


def test_integer_weights(spoilt, refused, edit_tensors):
    edit_tensors(spoilt, **{f"{Q0}.lora_A.weight": torch.zeros(4, 576, dtype=torch.int32)})
    refused(spoilt, "invalid_dtype", "dtype I32")


def test_file_above_size_limit(spoilt, refused):
    size = (spoilt / "adapter_model.safetensors").stat().st_size
    refused(spoilt, "adapter_too_large", f"is {size} bytes", max_bytes=size - 1)


def test_bf16_weights_read_as_float32_within_limit(spoilt, read_lora, refused):
    file = spoilt / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
    weights = read_lora(spoilt)
    assert all(m.A.dtype == torch.float32 for m in weights.modules.values())
    assert weights.nbytes > file.stat().st_size
    refused(spoilt, "adapter_too_large", "as float32", max_bytes=weights.nbytes - 1)


@pytest.mark.parametrize(
    ("key", "tensor", "fragment"),
    [
        (f"{Q0}.lora_magnitude_vector", torch.ones(576), "lora_magnitude"),
        ("model.embed_tokens.lora_embedding_A", torch.zeros(4, 49152), "embedding"),
        ("model.embed_tokens.lora_A.weight", torch.zeros(4, 49152), "LoRA on 'model.embed_tokens'"),
        ("lm_head.lora_B.weight", torch.zeros(49152, 4), "LoRA on 'lm_head'"),
        ("lm_head.modules_to_save.default.weight", torch.zeros(8, 576), "fully trained"),
        (f"{Q0}.lora_B.bias", torch.zeros(576), "lora_bias"),
    ],
)
def test_unsupported_tensors(spoilt, refused, edit_tensors, key: str, tensor, fragment: str):
    edit_tensors(spoilt, **{key: tensor})
    refused(spoilt, "unsupported_adapter", fragment)


def test_unexpected_tensor_key(spoilt, refused, edit_tensors):
    edit_tensors(spoilt, something_else=torch.zeros(2))
    refused(spoilt, "unexpected_tensor", "'base_model.model.something_else'")


def test_empty_weights(spoilt, refused):
    save_file({}, spoilt / "adapter_model.safetensors")
    refused(spoilt, "empty_adapter", "no LoRA tensors")
