"""Where one engine run's time goes: labelled phases, torch ops and Python functions.

The engine is instrumented from outside for the duration of the profile only (its functions are
wrapped in `record_function` labels and restored afterwards), so the engine code stays untouched.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AttentionInterface

import adapters.layer as layer_module
import server.engine.core as core_module
import server.engine.runner as runner_module
from bench.engine_systems import RunResult, run_engine
from bench.workload import BenchRequest
from server.engine.attention import ATTN_NAME, paged_attention
from server.engine.core import EngineCore

LABELS = {
    "loraplex::nf4_base_linear": "NF4 base linears (bnb)",
    "loraplex::lora_delta": "LoRA delta (lora op)",
    "loraplex::attention": "paged attention (KV write + SDPA)",
    "loraplex::lm_head": "lm_head",
    "loraplex::build_inputs": "runner pack + eager_inputs (Python packing)",
    "loraplex::schedule": "scheduler.schedule",
    "loraplex::sample": "sampler",
}


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def instrumented(engine: EngineCore) -> Iterator[None]:
    """Label the engine's phases for torch.profiler while inside the block."""
    saved_ops = {name: getattr(layer_module, name) for name in ("lora_grouped", "lora_reference")}
    saved_sample, saved_pack = core_module.sample, runner_module.pack
    runner_module.pack = _labelled("loraplex::build_inputs", saved_pack)
    for name, fn in saved_ops.items():
        setattr(layer_module, name, _labelled("loraplex::lora_delta", fn))
    core_module.sample = _labelled("loraplex::sample", saved_sample)
    AttentionInterface.register(ATTN_NAME, _labelled("loraplex::attention", paged_attention))
    patched: list[tuple[Any, str]] = []
    for layer in engine.layers.values():
        patched.append((layer.base, "forward"))
    patched += [
        (engine.base.model.lm_head, "forward"),
        (engine.runner, "eager_inputs"),
        (engine.scheduler, "schedule"),
    ]
    labels = ["loraplex::nf4_base_linear"] * len(engine.layers) + [
        "loraplex::lm_head",
        "loraplex::build_inputs",
        "loraplex::schedule",
    ]
    for (obj, attr), label in zip(patched, labels, strict=True):
        setattr(obj, attr, _labelled(label, getattr(obj, attr)))
    try:
        yield
    finally:
        for obj, attr in patched:
            delattr(obj, attr)  # drop the instance attribute: the class method shows again
        for name, fn in saved_ops.items():
            setattr(layer_module, name, fn)
        core_module.sample, runner_module.pack = saved_sample, saved_pack
        AttentionInterface.register(ATTN_NAME, paged_attention)


def phase_table(prof: profile, wall_s: float, steps: int) -> str:
    """Inclusive CPU time of each labelled phase, as ms, % of wall and ms per engine step."""
    totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in LABELS}
    lines = ["| phase | ms | % of wall | ms / step |", "|---|---|---|---|"]
    for key, label in LABELS.items():
        ms = totals.get(key, 0.0)
        lines.append(f"| {label} | {ms:.0f} | {100 * ms / (wall_s * 1e3):.1f} | {ms / steps:.2f} |")
    rest = wall_s * 1e3 - sum(totals.values())
    lines.append(
        f"| everything else (HF modules, norms, rotary, MLP act, Python glue) | {rest:.0f} | "
        f"{100 * rest / (wall_s * 1e3):.1f} | {rest / steps:.2f} |"
    )
    return "\n".join(lines)


def profile_engine(
    engine: EngineCore, requests: list[BenchRequest], new_tokens: int, top: int = 15
) -> str:
    """Profile one engine run of the request set; returns a markdown/text summary."""
    steps_before = engine.steps
    with instrumented(engine):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            result: RunResult = run_engine(engine, requests, new_tokens)
            wall = time.perf_counter() - start
    steps = engine.steps - steps_before
    ops = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40
    )
    python = cProfile.Profile()
    python.enable()
    plain = run_engine(engine, requests, new_tokens)
    python.disable()
    stream = io.StringIO()
    pstats.Stats(python, stream=stream).sort_stats("tottime").print_stats(top)
    lora_rows = sum(r.adapter_index is not None for r in requests)
    return "\n\n".join(
        [
            f"Engine run under torch.profiler: {len(requests)} requests ({lora_rows} with adapters), "
            f"{result.tokens} tokens, {steps} steps, {wall:.2f} s wall "
            f"(unprofiled rerun: {plain.tokens_per_s:.0f} tokens/s, {torch.get_num_threads()} threads)",
            phase_table(prof, wall, max(steps, 1)),
            "torch ops by self CPU time:\n" + ops,
            "Python functions by own time (cProfile, unlabelled rerun):\n"
            + _trim_pstats(stream.getvalue()),
        ]
    )


def _trim_pstats(text: str) -> str:
    """pstats output from its column header on (drops the preamble)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:]).rstrip()
