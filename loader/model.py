"""Load a base causal LM, quantized to NF4/FP4 with bitsandbytes (or unquantized), plus its tokenizer.

Quantized: every nn.Linear inside the decoder layers but MoE routers. Kept in 16-bit: embeddings, norms,
lm_head, routers, and fused 3-D expert weights (not nn.Linear: bitsandbytes does not quantize them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.quantizers.quantizers_utils import should_convert_module

from loader.config import Config
from loader.errors import ModelSourceError
from loader.source import resolve_source

# kept 16-bit: the head, and MoE routers (tiny, and their top-k choice is sensitive, as in vLLM)
SKIPPED_MODULES = ["lm_head", "mlp.gate", "shared_expert_gate", "block_sparse_moe.gate"]
CPU_OUT_FEATURES_MULTIPLE = 32
CPU_IN_FEATURES_MULTIPLE = 64  # bitsandbytes' 4-bit blocksize: its CPU kernel reshapes by it


@dataclass
class BaseModel:
    """A loaded base: model in eval mode, tokenizer, resolved folder and the config used."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    config: Config

    @property
    def name(self) -> str:
        """The id the server exposes for the bare base."""
        return self.config.served_model_name or (
            "SmolLM2-135M-Instruct" if self.config.model == "demo" else Path(self.path).name
        )


def quantization_config(config: Config) -> BitsAndBytesConfig | None:
    """The bitsandbytes settings for config.quant (None for unquantized)."""
    if config.quant == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=config.torch_compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=SKIPPED_MODULES,
    )


def read_model_config(path: Path) -> PretrainedConfig:
    """The HF config of a checkpoint folder, refusing architectures that are not causal LMs."""
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise ModelSourceError(
            f"unsupported or unreadable model config in {path}: {error}"
        ) from error
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            f"unsupported architecture {hf_config.model_type!r} in {path}: loraplex serves causal "
            "language models (AutoModelForCausalLM), e.g. llama, mistral, qwen2"
        )
    return hf_config


def check_quantizable(hf_config: PretrainedConfig, device: str) -> None:
    """Raise a clear error when a decoder linear cannot be 4-bit quantized on this device."""
    if device != "cpu":
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    for name, module in skeleton.named_modules():
        if not isinstance(module, nn.Linear) or not should_convert_module(name, SKIPPED_MODULES):
            continue
        for side, multiple in (
            ("out", CPU_OUT_FEATURES_MULTIPLE),
            ("in", CPU_IN_FEATURES_MULTIPLE),
        ):
            size = getattr(module, f"{side}_features")
            if size % multiple:
                raise ModelSourceError(
                    f"layer {name} has {side}_features={size}, which bitsandbytes' CPU 4-bit "
                    f"kernel cannot run (it needs a multiple of {multiple}); use --quant none on "
                    "CPU or serve this model on a GPU"
                )


def load_base(config: Config) -> BaseModel:
    """Resolve, quantize and load the base model and tokenizer described by config."""
    path = resolve_source(config.model)
    hf_config = read_model_config(path)
    device = config.resolved_device
    quant = quantization_config(config)
    if quant is not None:
        check_quantizable(hf_config, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=config.torch_compute_dtype,
        device_map={"": device},
    )
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=model, tokenizer=tokenizer, path=path, config=config)
