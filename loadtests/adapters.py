"""Random PEFT LoRA adapters for load tests: one real PEFT save on the demo base, then cheap copies
with fresh random weights (same config and tensor shapes) up to the requested count."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
TARGETS = ["q_proj", "v_proj"]


def make_template(base_path: Path, out: Path, rank: int = 4) -> Path:
    """Save one rank-`rank` PEFT adapter for the base at out (skipped if already there)."""
    if (out / WEIGHTS).is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def random_copy(template: Path, out: Path, seed: int, strength: float = 0.2) -> Path:
    """A copy of template with seeded random A and B of the same shapes."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, value in load_file(template / WEIGHTS).items():
        scale = 1 / value.shape[1] ** 0.5 if "lora_A" in name else strength / value.shape[1]
        tensors[name] = (torch.randn(value.shape, generator=generator) * scale).to(value.dtype)
    save_file(tensors, out / WEIGHTS)
    return out


def populate(
    folder: Path, base_path: Path, count: int, demo_adapters: Path | None = None
) -> list[str]:
    """Fill folder with the demo adapters (if any) plus random ones named lt-NNN up to count; names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    if demo_adapters is not None and demo_adapters.is_dir():
        for sub in sorted(demo_adapters.iterdir()):
            if (sub / WEIGHTS).is_file() and not sub.name.startswith("."):
                target = folder / sub.name
                if not target.exists():
                    shutil.copytree(sub, target, ignore=shutil.ignore_patterns("checkpoint*"))
                names.append(sub.name)
    template = make_template(base_path, folder.parent / "template")
    for i in range(max(0, count - len(names))):
        name = f"lt-{i:03d}"
        if not (folder / name / WEIGHTS).is_file():
            random_copy(template, folder / name, seed=i)
        names.append(name)
    return names
