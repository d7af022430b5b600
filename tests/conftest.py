"""Shared fixtures: the real demo model, converted once and loaded once per session."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import transformers

from bench.workload import ALL_LINEAR, make_adapters
from loader.config import Config
from loader.demo import prepare_demo
from loader.model import BaseModel, load_base

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted demo checkpoint folder."""
    return prepare_demo()


@pytest.fixture(scope="session")
def nf4_base(demo_path: Path) -> BaseModel:
    """The demo model in NF4 with double quantization and bf16 compute (the serving default)."""
    return load_base(Config(model=str(demo_path)))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_path: Path) -> object:
    """The demo model's tokenizer (chat template included), without the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_path)


ADAPTER_SPECS = {
    "alpha": (8, ALL_LINEAR),
    "beta": (4, ["q_proj", "v_proj"]),
    "gamma": (16, ["gate_proj", "up_proj", "down_proj"]),
    "delta": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture(scope="session")
def peft_adapters(demo_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four seeded random PEFT adapters of mixed ranks and target sets, in one folder by name."""
    made = tmp_path_factory.mktemp("made")
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: shutil.copytree(
            make_adapters(demo_path, made, 1, rank, seed, targets)[0], root / name
        )
        for seed, (name, (rank, targets)) in enumerate(ADAPTER_SPECS.items())
    }


def peft_on_own_base(demo_path: Path, peft_adapters: dict[str, Path]):
    """Plain PEFT with every test adapter on its own copy of the NF4 demo base."""
    from peft import PeftModel

    base = load_base(Config(model=str(demo_path)))
    names = list(peft_adapters)
    model = PeftModel.from_pretrained(base.model, peft_adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(peft_adapters[name], adapter_name=name)
    model.eval()
    return model


@pytest.fixture(scope="session")
def peft_reference(demo_path: Path, peft_adapters: dict[str, Path]):
    """Plain PEFT with every test adapter on its own copy of the same NF4 base: the oracle."""
    return peft_on_own_base(demo_path, peft_adapters)


@pytest.fixture(scope="session")
def peft_scratch(demo_path: Path, peft_adapters: dict[str, Path]):
    """Another PEFT oracle, for tests that load (and delete) more adapters into it.

    Kept apart from peft_reference: PEFT's load_adapter changes how bitsandbytes' CPU kernel computes
    the NF4 base layers afterwards (last bf16 bits), which the exact layer tests would notice.
    """
    return peft_on_own_base(demo_path, peft_adapters)


# the PEFT oracle: what PEFT computes for one request alone, and the tolerance of comparing to it --
MAX_FLIP_RATE = 0.08  # share of compared tokens where the engine may take PEFT's near-tied second
NOISE_FLOOR = 0.5  # nats: four bf16 ulps of the demo's top logits (magnitude 16-32, ulp 0.125)


@contextlib.contextmanager
def adapter_active(model, adapter: str | None):
    """PEFT model with adapter active (None: the bare base), gradients off."""
    import torch

    if adapter is not None:
        model.set_adapter(adapter)
    bare = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), bare:
        yield model


def peft_forced(model, ids: list[int], adapter: str | None, tokens: list[int]):
    """PEFT's logits [len(tokens), vocab] (float32) at each of tokens' positions, from one forward
    over the prompt plus tokens."""
    import torch

    device = next(model.parameters()).device
    with adapter_active(model, adapter):
        logits = model(torch.tensor([ids + tokens[:-1]], device=device)).logits
    return logits[0, len(ids) - 1 :].float().cpu()


def peft_stepwise(model, ids: list[int], adapter: str | None, tokens: list[int]):
    """The same logits [len(tokens), vocab] as peft_forced, computed the way generate decodes: the
    prompt, then one token per forward through the KV cache."""
    import torch

    device = next(model.parameters()).device
    with adapter_active(model, adapter):
        out = model(torch.tensor([ids], device=device), use_cache=True)
        rows = [out.logits[0, -1]]
        for token in tokens[:-1]:
            out = model(
                torch.tensor([[token]], device=device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            rows.append(out.logits[0, -1])
    return torch.stack(rows).float().cpu()


def peft_greedy(model, ids: list[int], adapter: str | None, new_tokens: int) -> list[int]:
    """PEFT's greedy tokens for one request alone (token by token, as generate decodes)."""
    import torch

    device = next(model.parameters()).device
    with adapter_active(model, adapter):
        out = model.generate(
            torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=False
        )
    return out[0, len(ids) :].tolist()


class PeftOracle:
    """Checks engine runs against plain PEFT running each request alone.

    Batching, chunked prefill and recompute change GEMM shapes, and bf16 GEMMs (bitsandbytes' NF4
    CPU kernel included) round one row otherwise than many, so exact logits cannot match. The
    tolerance is measured per request, not guessed: how far PEFT disagrees with itself on the same
    tokens, decoding them one per forward (as generate does) against one forward over all of them,
    at least NOISE_FLOOR. Against PEFT forced along the engine's own
    tokens, every position must hold: the engine's token logit is within the tolerance of PEFT's
    best (a near-tie may resolve either way), and its logprob within the tolerance of PEFT's. At most
    one plus MAX_FLIP_RATE of the tokens may be such near-tie flips. A wrong, missing or stale
    adapter moves logprobs by more than a nat and fails (the mixed-batch test shows it does).
    """

    forced = staticmethod(peft_forced)
    greedy = staticmethod(peft_greedy)

    def tolerance(
        self,
        model,
        ids: list[int],
        adapter: str | None,
        tokens: list[int],
        floor: float = NOISE_FLOOR,
    ) -> float:
        """How far PEFT's stepwise and forced computations of these tokens disagree on what check
        compares (the tokens' logits and logprobs, and the forced argmax's logit), at least floor."""
        import torch

        forced = peft_forced(model, ids, adapter, tokens)  # [T, vocab]
        stepwise = peft_stepwise(model, ids, adapter, tokens)  # [T, vocab]
        rows, chosen = torch.arange(len(tokens)), torch.tensor(tokens)
        best = forced.argmax(-1)
        gaps = [
            forced[rows, chosen] - stepwise[rows, chosen],
            forced[rows, best] - stepwise[rows, best],
            torch.log_softmax(forced, -1)[rows, chosen]
            - torch.log_softmax(stepwise, -1)[rows, chosen],
        ]
        return max(float(torch.cat(gaps).abs().max()), floor)

    def check(self, model, tokenizer, runs, floor: float = NOISE_FLOOR) -> list[tuple]:
        """Check (request id, prompt ids, adapter, engine tokens, engine logprobs or None) runs;
        returns the near-tie flips as (request id, adapter, position, PEFT's preference in nats)."""
        import torch

        flips, compared = [], 0
        for rid, ids, adapter, got, logprobs in runs:
            assert got, f"{rid} generated nothing"
            tolerance = self.tolerance(model, ids, adapter, got, floor)
            logits = peft_forced(model, ids, adapter, got)  # [len(got), vocab]
            rows, chosen = torch.arange(len(got)), torch.tensor(got)
            behind = logits.max(-1).values - logits[rows, chosen]  # [len(got)], 0 where PEFT agrees
            for pos in torch.nonzero(behind > 0).flatten().tolist():
                flips.append((rid, adapter, pos, round(float(behind[pos]), 3)))
                assert behind[pos] <= tolerance, (
                    f"{rid} ({adapter}) token {pos}: PEFT prefers {tokenizer.decode(logits[pos].argmax())!r}"
                    f" by {float(behind[pos]):.3f} over {tokenizer.decode(got[pos])!r}"
                    f" (tolerance {tolerance:.3f}): {tokenizer.decode(got)!r}"
                )
            if logprobs is not None:
                expected = torch.log_softmax(logits, -1)[rows, chosen]
                drift = float((torch.tensor(logprobs) - expected).abs().max())
                assert drift <= tolerance, (
                    f"{rid} ({adapter}): logprobs off by {drift:.3f} > {tolerance:.3f}"
                )
            compared += len(got)
        assert len(flips) <= 1 + MAX_FLIP_RATE * compared, flips
        return flips


def run_in_waves(engine, requests, joins: dict[int, int], params) -> dict[str, list[tuple]]:
    """Run (request id, prompt ids, adapter) requests through an EngineCore, adding them in waves
    (joins maps step number -> how many to add then); each request's (token, logprob) pairs."""
    outputs: dict[str, list] = {rid: [] for rid, _, _ in requests}
    pending, step = list(requests), 0
    while pending or engine.has_work():
        for _ in range(joins.get(step, 0)):
            rid, ids, adapter = pending.pop(0)
            engine.add_request(rid, ids, adapter, params)
        for out in engine.step():
            assert out.error is None, out.error
            if out.token_id is not None:
                outputs[out.request_id].append((out.token_id, out.logprob))
        step += 1
        assert step < 2000
    return outputs


@pytest.fixture(scope="session")
def engine_waves():
    """run_in_waves, for test modules (they cannot import conftest)."""
    return run_in_waves


@pytest.fixture(scope="session")
def peft_oracle() -> PeftOracle:
    """The PEFT comparison (test modules cannot import conftest, so they take it as a fixture)."""
    return PeftOracle()


# a tool-calling adapter: trained once, checked with PEFT (tests/adapters/train) and served
# (tests/server/test_tool_adapter.py) ------------------------------------------------------------
# 24 chats, 8 steps of batch 4 at lr 1e-3, no eval split: ~70 s on 2 busy CPU cores. The bare base
# calls the tool for none of the held-out prompts; 6 steps already got all of them.
TOOL_TRAIN_CHATS = 24
TOOL_TRAIN_ARGS = ["--max-steps", "8", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1"]
TOOL_TRAIN_ARGS += ["--eval-split", "0", "--save-every", "0"]


@pytest.fixture(scope="session")
def weather_adapter(
    tmp_path_factory: pytest.TempPathFactory, demo_path: Path
) -> tuple[Path, float]:
    """A get_weather adapter trained by `loraplex train` on tool-call chats (and its wall time in
    seconds); tests/adapters/train/tool_chats.py writes the chats."""
    import time

    from server.cli import main
    from tests.adapters.train.tool_chats import write_tool_chats

    folder = tmp_path_factory.mktemp("tools")
    data = folder / "weather.jsonl"
    write_tool_chats(data, TOOL_TRAIN_CHATS, seed=0)
    out = folder / "weather"
    argv = ["train", "--model", str(demo_path), "--data", str(data), "--out", str(out)]
    start = time.perf_counter()
    assert main(argv + TOOL_TRAIN_ARGS) == 0
    return out, time.perf_counter() - start


def make_fp32_engine(demo_path: Path, adapters: dict[str, Path], **config: object):
    """An EngineCore on the demo base unquantized in float32 (exact to ~1e-5, so greedy tokens
    compare one for one) serving the given PEFT adapters."""
    from adapters.format import base_linear_shapes, read_adapter
    from server.engine.core import EngineCore

    settings = Config(model=str(demo_path), quant="none", compute_dtype="float32", **config)
    core = EngineCore(load_base(settings), settings)
    shapes = base_linear_shapes(core.base.model)
    for name, path in adapters.items():
        core.add_adapter(read_adapter(path, name, shapes, 64, 1 << 30))
    return core


@pytest.fixture(scope="session")
def fp32_engine():
    """make_fp32_engine, for test modules (they cannot import conftest)."""
    return make_fp32_engine
