"""Fixtures for adapter tests: real PEFT adapters built once on the float32 demo model, private
copies to corrupt, and callables to edit them and to assert a refusal."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.errors import AdapterError
from adapters.format import AdapterWeights, base_linear_shapes, read_adapter

PEFT_PREFIX = "base_model.model."
MAX_RANK = 64
MAX_BYTES = 64 << 20
LORA_CONFIGS = {
    "r8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    "r4": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.3.self_attn.q_proj": 5},
    ),
}


@dataclass
class DemoLora:
    """The demo base's decoder linear shapes and the saved adapters: name -> (folder, expected),
    expected being {module path: (A, B, PEFT's scaling)}."""

    shapes: dict[str, tuple[int, int]]
    adapters: dict[str, tuple[Path, dict]]


def build_adapter(model: torch.nn.Module, folder: Path, config: LoraConfig) -> dict:
    """Save a PEFT adapter (on a copy of model) with random non-zero B; returns what PEFT holds."""
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    expected = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
            expected[name] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                module.scaling["default"],
            )
    peft_model.save_pretrained(folder)
    return expected


@pytest.fixture(scope="session")
def demo_lora(demo_path: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoLora:
    """Real PEFT adapters: r=8 all-linear, r=4 q/v, r=4 q/v with rsLoRA and rank/alpha patterns."""
    model = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    root = tmp_path_factory.mktemp("lora")
    adapters = {k: (root / k, build_adapter(model, root / k, c())) for k, c in LORA_CONFIGS.items()}
    return DemoLora(base_linear_shapes(model), adapters)


@pytest.fixture
def demo_shapes(demo_lora: DemoLora) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder linear of the demo base, by module path."""
    return demo_lora.shapes


@pytest.fixture
def spoilt(demo_lora: DemoLora, tmp_path: Path) -> Path:
    """A private copy of the r=4 q/v adapter folder, to corrupt."""
    return Path(shutil.copytree(demo_lora.adapters["r4"][0], tmp_path / "adapter"))


@pytest.fixture
def read_lora(demo_shapes: dict) -> Callable[..., AdapterWeights]:
    """read_adapter against the demo base, with generous limits unless overridden."""

    def read(folder: Path, **kwargs: object) -> AdapterWeights:
        options = {"max_rank": MAX_RANK, "max_bytes": MAX_BYTES} | kwargs
        return read_adapter(folder, "test", demo_shapes, **options)

    return read


@pytest.fixture
def refused(read_lora: Callable[..., AdapterWeights]) -> Callable[..., None]:
    """Assert that reading a folder fails with an AdapterError of this code naming this fragment."""

    def check(folder: Path, code: str, fragment: str, **kwargs: object) -> None:
        with pytest.raises(AdapterError) as error:
            read_lora(folder, **kwargs)
        assert error.value.code == code, str(error.value)
        assert fragment in str(error.value)

    return check


@pytest.fixture
def edit_config() -> Callable[..., None]:
    """Change adapter_config.json keys (a None value deletes the key)."""

    def edit(folder: Path, **changes: object) -> None:
        file = folder / "adapter_config.json"
        config = json.loads(file.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        file.write_text(json.dumps(config))

    return edit


@pytest.fixture
def edit_tensors() -> Callable[..., None]:
    """Set tensors by key without the PEFT prefix (a None value deletes the tensor)."""

    def edit(folder: Path, **changes: torch.Tensor | None) -> None:
        file = folder / "adapter_model.safetensors"
        tensors = load_file(file)
        for key, value in changes.items():
            if value is None:
                tensors.pop(PEFT_PREFIX + key)
            else:
                tensors[PEFT_PREFIX + key] = value
        save_file(tensors, file)

    return edit
