"""Shared fixtures: the real demo model, converted once and loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from loader.demo import prepare_demo
from loader.model import BaseModel, load_base
from server.config import Config

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted demo checkpoint folder."""
    return prepare_demo()


@pytest.fixture(scope="session")
def nf4_base(demo_path: Path) -> BaseModel:
    """The demo model in NF4 with double quantization and bf16 compute (the serving default)."""
    return load_base(Config(model=str(demo_path)))


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(
    demo_path: Path, out: Path, rank: int, targets: list[str], seed: int, strength: float = 0.3
) -> Path:
    """Save a real PEFT LoRA adapter for the demo model with seeded non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.normal_(0, 1 / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.normal_(0, strength / rank)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


ADAPTER_SPECS = {
    "alpha": (8, ALL_LINEAR),
    "beta": (4, ["q_proj", "v_proj"]),
    "gamma": (16, ["gate_proj", "up_proj", "down_proj"]),
    "delta": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture(scope="session")
def peft_adapters(demo_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four PEFT adapters of mixed ranks and target sets, keyed by name."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(demo_path, root / name, rank, targets, seed)
        for seed, (name, (rank, targets)) in enumerate(ADAPTER_SPECS.items())
    }


@pytest.fixture(scope="session")
def peft_reference(demo_path: Path, peft_adapters: dict[str, Path]):
    """Plain PEFT with every test adapter on its own copy of the same NF4 base: the oracle."""
    from peft import PeftModel

    base = load_base(Config(model=str(demo_path)))
    names = list(peft_adapters)
    model = PeftModel.from_pretrained(base.model, peft_adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(peft_adapters[name], adapter_name=name)
    model.eval()
    return model
