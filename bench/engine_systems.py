"""The systems the engine benchmark times on one request set: our engine, PEFT batched, PEFT one by one."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from bench.workload import BenchRequest, adapter_name
from server.engine.core import EngineCore
from server.engine.types import SamplingParams

PEFT_BASE_NAME = "__base__"  # PEFT's adapter_names value for "no adapter" in a mixed batch

_run_ids = itertools.count()


@dataclass
class RunResult:
    """Generated tokens and wall seconds of one timed run, plus each request's output ids."""

    tokens: int
    seconds: float
    outputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per wall-clock second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def run_engine(engine: EngineCore, requests: list[BenchRequest], new_tokens: int) -> RunResult:
    """Add every request at t=0 and step the engine until all are done (greedy, EOS ignored)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prefix = f"run{next(_run_ids)}-"
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    for r in requests:
        adapter = None if r.adapter_index is None else adapter_name(r.adapter_index)
        engine.add_request(prefix + r.request_id, r.prompt_ids, adapter, params)
    while engine.has_work():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"engine request {out.request_id} failed: {out.error}")
            if out.token_id is not None:
                outputs[out.request_id.removeprefix(prefix)].append(out.token_id)
    seconds = time.perf_counter() - start
    return RunResult(sum(len(o) for o in outputs.values()), seconds, outputs)


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, L] with prompts right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def _peft_name(request: BenchRequest) -> str:
    return PEFT_BASE_NAME if request.adapter_index is None else adapter_name(request.adapter_index)


def _generate_kwargs(new_tokens: int, pad_id: int) -> dict:
    """Greedy, exactly new_tokens tokens (EOS suppressed until then), no cache warnings."""
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_id,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


@torch.inference_mode()
def run_peft_mixed(
    model: torch.nn.Module,
    requests: list[BenchRequest],
    new_tokens: int,
    batch_size: int,
    pad_id: int,
) -> RunResult:
    """PEFT `generate(adapter_names=...)` over static batches of batch_size requests in order."""
    outputs: dict[str, list[int]] = {}
    tokens = 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first : first + batch_size]
        ids, mask = _left_padded([r.prompt_ids for r in chunk], pad_id)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[_peft_name(r) for r in chunk],
            **_generate_kwargs(new_tokens, pad_id),
        )  # [B, L + new_tokens]
        new = out[:, ids.shape[1] :]
        tokens += new.numel()
        for r, row in zip(chunk, new.tolist(), strict=True):
            outputs[r.request_id] = row
    return RunResult(tokens, time.perf_counter() - start, outputs)


@torch.inference_mode()
def run_peft_sequential(
    model: torch.nn.Module, requests: list[BenchRequest], new_tokens: int, pad_id: int
) -> RunResult:
    """PEFT `set_adapter` + `generate` one request at a time (adapter disabled for base requests)."""
    outputs: dict[str, list[int]] = {}
    tokens = 0
    start = time.perf_counter()
    for r in requests:
        ids = torch.tensor([r.prompt_ids])
        kwargs = _generate_kwargs(new_tokens, pad_id)
        if r.adapter_index is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        else:
            model.set_adapter(adapter_name(r.adapter_index))
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1] :]
        tokens += new.numel()
        outputs[r.request_id] = new.tolist()
    return RunResult(tokens, time.perf_counter() - start, outputs)


def agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Mean over requests present in both of the fraction of generated ids before the first
    difference (1.0: identical greedy outputs)."""
    common = [k for k in a if k in b and a[k]]
    if not common:
        return float("nan")
    total = 0.0
    for key in common:
        same = next(
            (i for i, (x, y) in enumerate(zip(a[key], b[key], strict=False)) if x != y), None
        )
        total += (min(len(a[key]), len(b[key])) if same is None else same) / len(a[key])
    return total / len(common)
