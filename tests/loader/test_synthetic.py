"""Random-weight Llama bases quantized in place (the GPU benchmark's models), and its floor bytes."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from adapters.format import base_linear_shapes
from bench.engine_cuda_floor import adapter_bytes, weight_bytes_per_step
from loader.architecture import inspect_architecture
from loader.config import Config
from loader.memory import memory_report
from loader.synthetic import SHAPES, synthetic_base


@pytest.fixture(scope="module")
def tiny():
    return synthetic_base("tiny", Config(device="cpu"), seed=3)


def test_decoder_linears_are_nf4_and_the_rest_is_bf16(tiny):
    model = tiny.model
    shape = SHAPES["tiny"]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * shape["num_hidden_layers"]
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    report = memory_report(model)
    assert report.ratio < 0.27  # NF4 with double quantization, as load_base gives
    assert tiny.name == "tiny" and tiny.tokenizer.eos_token_id == 1


def test_same_seed_same_model_and_finite_logits(tiny):
    again = synthetic_base("tiny", Config(device="cpu"), seed=3)
    other = synthetic_base("tiny", Config(device="cpu"), seed=4)
    ids = torch.tensor([[5, 17, 300, 901]])
    with torch.inference_mode():
        logits = [m.model(ids).logits for m in (tiny, again, other)]
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[2])


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic_base("llama3-70b", Config(device="cpu"))


def test_floor_bytes(tiny):
    model = tiny.model
    shape = SHAPES["tiny"]
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    # tied embeddings: lm_head is the embedding table and is read whole every step
    assert weight_bytes_per_step(model) == memory_report(model).total_resident_bytes
    shapes = base_linear_shapes(model)
    inter, kv_out = shape["intermediate_size"], hidden // 4 * 2  # 2 of 4 heads are KV heads
    per_layer_qv = (hidden + hidden) + (hidden + kv_out)  # q_proj and v_proj: (in + out)
    assert adapter_bytes(shapes, ["q_proj", "v_proj"], 8) == layers * per_layer_qv * 8 * 2
    assert adapter_bytes(shapes, ["down_proj"], 4) == layers * (inter + hidden) * 4 * 2
    head_dim = hidden // shape["num_attention_heads"]
    expected_kv = 2 * layers * shape["num_key_value_heads"] * head_dim * 2
    assert inspect_architecture(model).kv_bytes_per_token(torch.bfloat16) == expected_kv


def test_bench_engine_cuda_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from server.cli import main

    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["bench", "engine", "--device", "cuda"])
