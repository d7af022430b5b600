"""The engine benchmark's inputs: seeded random PEFT adapters cached on disk, and one request set."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
READY_MARKER = "adapter_model.safetensors"
STRENGTH = 0.5  # random adapters' delta / input rms: a wrong adapter's logprobs are off by nats


@dataclass(frozen=True)
class BenchRequest:
    """One request of the set: id, prompt token ids and its adapter index in [0, K) (or None)."""

    request_id: str
    prompt_ids: list[int]
    adapter_index: int | None


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--threads, --results, --json and --adapters-dir, shared by the single-engine benchmarks."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("--json", type=Path, default=None, help=f"default: RESULTS/{name}.json")
    parser.add_argument(
        "--adapters-dir", type=Path, default=Path("results/bench-adapters"), help="adapter cache"
    )


def adapter_name(index: int) -> str:
    """The served name of the benchmark's index-th adapter."""
    return f"bench-{index:03d}"


def parse_ints(text: str) -> list[int]:
    """The integers of a comma-separated option value ("1,8,32")."""
    return [int(part) for part in text.split(",") if part.strip()]


def lora_stds(fan_in: int, rank: int, strength: float) -> tuple[float, float]:
    """Standard deviations of random A and B: A ~ N(0, 1/fan_in), B ~ N(0, (strength / (2
    sqrt(rank)))^2), so that with lora_alpha = 2 * rank (scaling 2) a layer adds a delta of about
    `strength` times its input's rms, whatever the rank."""
    return 1 / fan_in**0.5, strength / (2 * rank**0.5)


def randomize_lora(
    peft_model: torch.nn.Module, generator: torch.Generator, rank: int, strength: float
) -> None:
    """Fill every LoRA weight of peft_model with seeded noise of lora_stds (lora_alpha = 2 * rank)."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                a_std, b_std = lora_stds(param.shape[1], rank, strength)
                std = a_std if "lora_A" in name else b_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_adapters(
    model_path: Path,
    folder: Path,
    count: int,
    rank: int,
    seed: int = 0,
    targets: list[str] = ALL_LINEAR,
    strength: float = STRENGTH,
    parameters: list[str] | None = None,
) -> list[Path]:
    """Folders of `count` seeded random PEFT LoRA adapters (bf16), created once and reused.

    The cache key is (rank, seed, strength, targets, parameters, count index): a folder already
    holding adapter i is not rewritten. targets defaults to every linear layer of a Llama block;
    parameters are PEFT target_parameters (fused MoE expert weights).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    named = sorted(targets) + [p.rpartition(".")[2] for p in sorted(parameters or [])]
    root = folder / f"r{rank}-s{seed}-x{strength:g}-{'.'.join(named)}"
    paths = [root / adapter_name(i) for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not (p / READY_MARKER).exists()]
    if not missing:
        return paths
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        target_parameters=parameters,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)  # halves the cache on disk; read as float32
    for i in missing:
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        randomize_lora(peft_model, generator, rank, strength)
        peft_model.save_pretrained(paths[i], safe_serialization=True)
    meta = {"rank": rank, "seed": seed, "count": count, "strength": strength, "targets": targets}
    meta["parameters"] = parameters or []
    (root / "bench.json").write_text(json.dumps(meta))
    return paths


def zipf_weights(k: int, exponent: float = 1.0) -> list[float]:
    """Zipf popularity over k adapters: weight of the i-th most popular is 1 / (i + 1) ** exponent."""
    return [1.0 / (i + 1) ** exponent for i in range(k)]


def assign_adapters(n: int, k: int, popularity: str, seed: int = 0) -> list[int]:
    """Adapter index of each of n requests: 'uniform' cycles through all k (every one used when
    n >= k), 'zipf' draws from a seeded Zipf(1) distribution."""
    if popularity == "uniform":
        order = list(range(k))
        random.Random(seed).shuffle(order)
        return [order[i % k] for i in range(n)]
    if popularity == "zipf":
        return random.Random(seed).choices(range(k), weights=zipf_weights(k), k=n)
    raise ValueError(f"unknown popularity {popularity!r}; choose uniform or zipf")


def make_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n seeded prompts of `length` ordinary token ids (the first and last 256 ids avoided)."""
    rng = random.Random(seed)
    return [[rng.randrange(256, vocab_size - 256) for _ in range(length)] for _ in range(n)]


def make_requests(
    prompts: list[list[int]], k: int, popularity: str, seed: int = 0
) -> list[BenchRequest]:
    """The request set with adapters assigned (k == 0: every request on the bare base)."""
    indices: list[int | None]
    indices = (
        [None] * len(prompts) if k == 0 else assign_adapters(len(prompts), k, popularity, seed)
    )
    return [
        BenchRequest(f"r{i:04d}", prompt, index)
        for i, (prompt, index) in enumerate(zip(prompts, indices, strict=True))
    ]
