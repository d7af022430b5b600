"""`loraplex bench engine`: one request set through the engine (K adapters, none) and through PEFT.

Every system runs in this one process on the same NF4 base and the same requests; measurements are
taken in interleaved rounds so that machine noise hits every system alike, and each figure is the
best (highest tokens/s) of the rounds; every sample goes to the JSON. Writes results/bench-engine/{engine.md, engine.png, engine.json, profile.txt}.
With --device cuda (or auto on a GPU host) it runs bench.engine_cuda instead.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import engine_cuda
from bench.engine_report import EngineResults, markdown_table, ratios_table, write_json, write_plot
from bench.engine_systems import (
    agreement,
    run_engine,
    run_peft_mixed,
    run_peft_sequential,
)
from bench.workload import (
    BenchRequest,
    adapter_name,
    make_adapters,
    make_prompts,
    make_requests,
    parse_ints,
)
from loader.config import Config
from server.engine.core import EngineCore

log = logging.getLogger("loraplex.bench")

QUICK = {
    "requests": 16,
    "prompt_tokens": 32,
    "new_tokens": 16,
    "ks": "1,4,16",
    "repeats": 1,
    "seq_requests": 2,
}
MAX_SLOTS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `loraplex bench engine`."""
    parser.add_argument("--model", default="demo", help="base model (default: the bundled demo)")
    parser.add_argument("--requests", type=int, default=64, help="requests in the set")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--ks", default="1,8,32,128", help="comma-separated adapter counts K")
    parser.add_argument("--popularity", default="uniform,zipf", help="uniform and/or zipf")
    parser.add_argument("--ref-k", type=int, default=32, help="K of the ratios against baselines")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters")
    parser.add_argument("--batch", type=int, default=64, help="engine max_num_seqs = PEFT batch")
    parser.add_argument("--repeats", type=int, default=3, help="measurement rounds (best kept)")
    parser.add_argument(
        "--seq-requests", type=int, default=8, help="requests timed for PEFT one-by-one (rate)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small run (about a minute)")
    parser.add_argument("--profile", action="store_true", help="also profile one engine run")
    parser.add_argument("--out", default="results/bench-engine", help="folder for table and plot")
    parser.add_argument("--adapters-dir", default="results/bench-adapters", help="adapter cache")
    parser.add_argument("--json", default=None, help="also write the JSON results here")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cpu: the demo model against PEFT; cuda: Llama-shaped random NF4 bases against the "
        "memory-bandwidth floor (auto: cuda when available)",
    )
    engine_cuda.add_arguments(parser)


def _apply_quick(args: argparse.Namespace) -> None:
    for name, value in QUICK.items():
        setattr(args, name, value)
    args.ref_k = min(args.ref_k, max(parse_ints(args.ks)))


def _settings(args: argparse.Namespace, ks: list[int], pops: list[str], ref_k: int) -> dict:
    return {
        "model": args.model,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "ks": ks,
        "popularity": pops,
        "ref_k": ref_k,
        "rank": args.rank,
        "batch": args.batch,
        "repeats": args.repeats,
        "seq_requests": args.seq_requests,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
    }


@dataclass
class Setup:
    """What every system runs on: the engine, PEFT on its own copy of the base, the request sets."""

    engine: EngineCore
    peft: torch.nn.Module
    pad_id: int
    sets: dict[tuple[str, int], list[BenchRequest]]
    no_adapters: list[BenchRequest]
    ref_set: list[BenchRequest]


def build_setup(args: argparse.Namespace, ks: list[int], pops: list[str], ref_k: int) -> Setup:
    """Load the base once, copy it for PEFT, make the adapters and load them into both."""
    from peft import PeftModel

    from adapters.format import base_linear_shapes, read_adapter
    from loader.model import load_base

    config = Config(
        model=args.model,
        max_loras=min(max(ks), MAX_SLOTS),
        max_cpu_loras=max(max(ks), MAX_SLOTS),
        max_lora_rank=args.rank,
        max_num_seqs=args.batch,
        kv_capacity_tokens=args.batch * (args.prompt_tokens + args.new_tokens + 32),
    )
    base = load_base(config)
    paths = make_adapters(base.path, Path(args.adapters_dir), max(ks), args.rank, args.seed)
    peft_base = copy.deepcopy(base.model)  # PEFT's own copy: the engine wraps its layers in place
    shapes = base_linear_shapes(base.model)
    engine = EngineCore(base, config)
    for i, path in enumerate(paths):
        engine.add_adapter(read_adapter(path, adapter_name(i), shapes, args.rank, 1 << 30))
    peft = PeftModel.from_pretrained(peft_base, paths[0], adapter_name=adapter_name(0))
    for i in range(1, ref_k):
        peft.load_adapter(paths[i], adapter_name=adapter_name(i))
    peft.eval()

    prompts = make_prompts(args.requests, args.prompt_tokens, base.model.config.vocab_size)
    sets = {(pop, k): make_requests(prompts, k, pop, args.seed) for pop in pops for k in ks}
    ref_set = sets.get(("uniform", ref_k)) or make_requests(prompts, ref_k, "uniform", args.seed)
    no_adapters = make_requests(prompts, 0, "uniform")
    return Setup(engine, peft, base.tokenizer.pad_token_id, sets, no_adapters, ref_set)


def warm_up(setup: Setup, batch: int) -> None:
    """One short untimed pass of every system (first-forward weight repacking, allocations)."""
    run_engine(setup.engine, setup.ref_set, 2)
    run_engine(setup.engine, setup.no_adapters, 2)
    run_peft_mixed(setup.peft, setup.ref_set[:batch], 2, batch, setup.pad_id)
    run_peft_sequential(setup.peft, setup.ref_set[:1], 2, setup.pad_id)


def measure(setup: Setup, args: argparse.Namespace, ref_k: int) -> EngineResults:
    """Interleaved rounds: per round, the engine bare, at every (popularity, K), then PEFT twice."""
    engine, peft, pad, new = setup.engine, setup.peft, setup.pad_id, args.new_tokens
    results = EngineResults(ref_k, {pop: {} for pop, _ in setup.sets})
    outputs: dict[str, dict[str, list[int]]] = {}
    for round_index in range(args.repeats):
        started = time.perf_counter()
        results.engine_base.append(run_engine(engine, setup.no_adapters, new).tokens_per_s)
        for (pop, k), requests in setup.sets.items():
            result = run_engine(engine, requests, new)
            results.engine[pop].setdefault(k, []).append(result.tokens_per_s)
            if requests is setup.ref_set:
                outputs["engine"] = result.outputs
        mixed = run_peft_mixed(peft, setup.ref_set, new, args.batch, pad)
        sequential = run_peft_sequential(peft, setup.ref_set[: args.seq_requests], new, pad)
        results.peft_mixed.append(mixed.tokens_per_s)
        results.peft_sequential.append(sequential.tokens_per_s)
        outputs["peft_mixed"], outputs["peft_sequential"] = mixed.outputs, sequential.outputs
        print(f"round {round_index + 1}/{args.repeats}: {time.perf_counter() - started:.1f} s")
    if "engine" not in outputs:
        outputs["engine"] = run_engine(engine, setup.ref_set, new).outputs
    results.agreement = {
        "peft_mixed": agreement(outputs["engine"], outputs["peft_mixed"]),
        "peft_sequential": agreement(outputs["engine"], outputs["peft_sequential"]),
    }
    return results


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print and write the table, plot and JSON (and the profile if asked)."""
    if Config(device=args.device).resolved_device == "cuda":
        return engine_cuda.run(args)
    if args.quick:
        _apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks, pops = parse_ints(args.ks), [p.strip() for p in args.popularity.split(",") if p.strip()]
    ref_k = args.ref_k if args.ref_k in ks else max(k for k in ks if k <= max(args.ref_k, min(ks)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    setup = build_setup(args, ks, pops, ref_k)
    warm_up(setup, args.batch)
    print(f"setup {time.perf_counter() - started:.1f} s ({torch.get_num_threads()} torch threads)")
    results = measure(setup, args, ref_k)

    settings = _settings(args, ks, pops, ref_k)
    payload = write_json(results, settings, out / "engine.json")
    if args.json:
        write_json(results, settings, Path(args.json))
    table, ratios = markdown_table(results), ratios_table(payload)
    write_plot(results, out / "engine.png")
    (out / "engine.md").write_text(f"{table}\n\n{ratios}\n")
    print(f"\n{table}\n\n{ratios}\n")
    print(f"greedy-output agreement with the engine: {results.agreement}")
    print(f"wrote {out / 'engine.md'}, {out / 'engine.png'}, {out / 'engine.json'}")

    if args.profile:
        from bench.engine_profile import profile_engine

        summary = profile_engine(setup.engine, setup.ref_set, args.new_tokens)
        (out / "profile.txt").write_text(summary + "\n")
        print(f"\n{summary}\nwrote {out / 'profile.txt'}")
    return 0
