"""Bases with random weights: Llama-shaped ones quantized in place (GPU benchmarks without a
download) and tiny checkpoints of any family (architecture tests and benchmarks).

The weights mean nothing, but every layer has its real shape, dtype and 4-bit layout, so a decode
step reads and computes exactly what it would on the real checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from tokenizers import Tokenizer, models
from torch import nn
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from loader.config import Config
from loader.model import BaseModel

# Published shapes (config.json of meta-llama/Meta-Llama-3-8B and Llama-3.2-1B); `tiny` is for tests
SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "llama3-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
}
INIT_STD = 0.02  # Llama's initializer_range


def _tokenizer() -> PreTrainedTokenizerFast:
    """A two-token stand-in (benchmarks feed token ids directly)."""
    vocab = {"<unk>": 0, "</s>": 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        eos_token="</s>",
        pad_token="<unk>",
    )


def quantize_linear(linear: nn.Linear, config: Config, device: str) -> bnb.nn.Linear4bit:
    """A bnb Linear4bit holding linear's weight quantized as config says (nf4/fp4, double quant)."""
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=config.torch_compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant,
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        compress_statistics=config.double_quant,
        quant_type=config.quant,
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized.to(device)


def synthetic_base(
    shape: str, config: Config, seed: int = 0, init_std: float = INIT_STD
) -> BaseModel:
    """A random-weight Llama of a named shape on config's device, decoder linears quantized in place
    (embeddings, norms and lm_head stay in the compute dtype, as load_base leaves them). A larger
    init_std than Llama's gives peakier next-token distributions (tests compare greedy tokens)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    device, dtype = config.resolved_device, config.torch_compute_dtype
    hf = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf, dtype=dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # embeddings and linears: random; norms keep their ones
                param.normal_(0.0, init_std, generator=generator)
        if config.quant != "none":
            layers = model.model.layers
            for name, module in tqdm(list(layers.named_modules()), desc=f"quantize {shape}"):
                if isinstance(module, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    owner = layers.get_submodule(parent)
                    setattr(owner, child, quantize_linear(module, config, device))
    model.eval()
    model.requires_grad_(False)
    folder = Path(tempfile.mkdtemp(prefix=f"loraplex-{shape}-"))
    (folder / "config.json").write_text(json.dumps(hf.to_dict(), indent=1, default=str))
    return BaseModel(
        model=model,
        tokenizer=_tokenizer(),
        path=folder,
        config=config.replace(model=shape, served_model_name=shape),
    )


# tiny random checkpoints: dims multiples of 32 (bitsandbytes' CPU kernel), weights wide enough
# (initializer_range) that next-token distributions are peaked, so float32 has no near-ties
TINY = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=None,  # some families default to ids past a small vocabulary
)


def random_checkpoint(
    model_type: str, folder: Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **config: Any
) -> Path:
    """A seeded random float32 checkpoint of any transformers family (config overrides given),
    saved to folder with tokenizer: architectures without a download. Attention sinks, which
    start at zero, are drawn too."""
    torch.manual_seed(seed)
    hf = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **config)
    model = AutoModelForCausalLM.from_config(hf)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0, 1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
