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


# the PEFT oracle: greedy decoding of one request alone, and the margin-based comparison ----------
MAX_FLIP_MARGIN = 0.25
MAX_FLIP_RATE = 0.10


def peft_greedy(model, ids: list[int], adapter: str | None, new_tokens: int):
    """Greedy tokens and per-position top-1/top-2 logit margins of PEFT running one request alone."""
    import contextlib

    import torch

    if adapter is not None:
        model.set_adapter(adapter)
    context = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), context:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    margins = []
    for step_logits in out.logits:
        top2 = torch.topk(step_logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


def peft_forced(model, ids: list[int], adapter: str | None, tokens: list[int]):
    """PEFT's greedy choice and top-1/top-2 logit margin at each of tokens' positions, from one
    forward over the prompt plus tokens: where every choice equals the token there, PEFT's greedy
    decoding of the request alone gives exactly tokens."""
    import contextlib

    import torch

    if adapter is not None:
        model.set_adapter(adapter)
    context = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), context:
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :].float()
    top2 = torch.topk(logits, 2, dim=-1).values
    # argmax breaks exact ties by the lowest token id, as generate's greedy step and our sampler do
    return logits.argmax(-1).tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def assert_matches_peft(model, tokenizer, runs) -> list[tuple]:
    """Check (request id, prompt ids, adapter, engine tokens) runs against PEFT running each request
    alone; returns the near-tie flips.

    Tolerance: batching changes GEMM shapes, so fp32/bf16 rounding may move a logit by a few
    hundredths. A request may diverge from PEFT only where PEFT's top-1 minus top-2 logit at the first
    differing token is below MAX_FLIP_MARGIN, and at most MAX_FLIP_RATE of requests may diverge.
    """
    flips = []
    for rid, ids, adapter, got in runs:
        assert got, f"{rid} generated nothing"
        expected, margins = peft_forced(model, ids, adapter, got)
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None
        )
        if first is None:
            continue
        flips.append((rid, adapter, first, margins[first]))
        assert margins[first] < MAX_FLIP_MARGIN, (
            f"{rid} ({adapter}) diverged at token {first} where PEFT's margin is {margins[first]:.3f}"
            f": {tokenizer.decode(got)!r}, PEFT chose {tokenizer.decode(expected[first])!r}"
        )
    assert len(flips) <= MAX_FLIP_RATE * len(runs), flips
    return flips


@pytest.fixture(scope="session")
def peft_oracle():
    """The PEFT comparison helpers (greedy, forced, check), for test modules (they cannot import
    conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(greedy=peft_greedy, forced=peft_forced, check=assert_matches_peft)
