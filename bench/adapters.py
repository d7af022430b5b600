"""`loraplex bench adapters`: cold-load latency, throughput under a storm of cold loads, slot waste.

1. Cold load (disk to servable) per rank: a registered adapter that is neither in host memory nor in
   a slot is read and validated by the registry's loader thread, then written into a device slot;
   p50/p99 over distinct adapters (files written just before, so the OS page cache is warm).
2. Storm: steady traffic (sequences on a few hot adapters, each replaced when it finishes) runs
   alone, beside a storm of cold loads (at a fixed rate, adapters nobody has used lately go from
   disk through host memory into a device slot: the read on the loader, the slot write between
   steps, as for a request), and beside a storm of cold requests (each on a cold adapter: the load
   plus a 4-token prompt and a 1-token answer). Phases alternate so machine noise hits all three;
   the figures are steady-traffic tokens/s of each storm phase over the baseline phases.
3. Slot memory: adapters of ranks 4, 8, 16 and 64 resident together in slots padded to the max rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.workload import make_adapters, make_prompts

if TYPE_CHECKING:
    from server.engine.core import EngineCore

STEADY_ADAPTERS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the adapters benchmark."""
    parser.add_argument("--model", default="demo", help="base model source")
    parser.add_argument("--ranks", default="8,16,64", help="ranks timed for cold loads")
    parser.add_argument("--loads", type=int, default=30, help="cold loads timed per rank")
    parser.add_argument("--storm-rank", type=int, default=16)
    parser.add_argument(
        "--storm-rate", type=float, default=5.0, help="cold loads (or requests) per second"
    )
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument(
        "--phases", type=int, default=2, help="rounds of baseline, loads and requests phases"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="steady sequences")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-ranks", default="64,16", help="slot capacities to compare")
    parser.add_argument("--cache", type=Path, default=None, help="adapter cache folder")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest-rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def time_cold_loads(core: EngineCore, paths: list[Path], tag: str) -> dict[str, float]:
    """Disk-to-slot latency of each adapter in paths (each one cold), in ms: p50, p99, parts."""
    loaded = threading.Event()
    core.registry.on_loaded = loaded.set
    totals, reads = [], []
    for i, path in enumerate(paths):
        name = f"{tag}-{i}"
        entry = core.registry.register(name, str(path))
        loaded.clear()
        start = time.perf_counter()
        core.registry.prefetch([name])
        loaded.wait(60)
        weights = core.registry.weights(name, entry.version)
        read_done = time.perf_counter()
        slot = core.slots.place((name, entry.version), weights)
        totals.append((time.perf_counter() - start) * 1e3)
        reads.append((read_done - start) * 1e3)
        core.slots.release(slot)
        core.registry.unregister(name)
        core.slots.retain(core.registry.is_current)
    return {
        "p50_ms": statistics.median(totals),
        "p99_ms": percentile(totals, 0.99),
        "read_p50_ms": statistics.median(reads),
        "slot_write_p50_ms": statistics.median(t - r for t, r in zip(totals, reads, strict=True)),
        "loads": len(totals),
    }


class SteadyTraffic:
    """A fixed number of sequences on the hot adapters, each replaced as soon as it finishes, driven
    by stepping the engine here (this thread is the engine thread); storms run beside it."""

    def __init__(self, core: EngineCore, concurrency: int, rate: float) -> None:
        from server.engine.types import SamplingParams

        self.core, self.concurrency, self.rate = core, concurrency, rate
        self.steady = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        self.cold = SamplingParams(max_tokens=1, temperature=0)
        vocab = len(core.base.tokenizer)
        self.prompts, self.short = make_prompts(64, 32, vocab), make_prompts(16, 4, vocab, seed=1)
        self.counter = iter(range(10**9))
        self.active: set[str] = set()

    def phase(self, seconds: float, storm: str | None = None, names: list[str] = ()) -> dict:
        """Steady tokens/s over `seconds`; storm "loads" brings cold adapters from disk into device
        slots at `rate`/s, storm "requests" sends a 4-token, 1-token-answer request on each."""
        core = self.core
        tokens, loads, pending = 0, core.registry.loads, []
        start = next_storm = time.perf_counter()
        while (now := time.perf_counter()) < start + seconds:
            while len(self.active) < self.concurrency:
                i = next(self.counter)
                rid, adapter = f"s{i}", f"hot-{i % STEADY_ADAPTERS}"
                core.add_request(rid, self.prompts[i % 64], adapter, self.steady)
                self.active.add(rid)
            while storm and now >= next_storm:
                i = next(self.counter)
                name = names[i % len(names)]
                if storm == "requests":
                    core.add_request(f"c{i}", self.short[i % 16], name, self.cold)
                else:
                    pending.append(name)
                next_storm += 1 / self.rate
            ran = core.steps
            for out in core.step():
                if out.request_id in self.active:
                    tokens += out.token_id is not None
                    if out.finish_reason is not None:
                        self.active.discard(out.request_id)
            pending = self._place_loaded(pending)
            if core.steps == ran:
                time.sleep(0.001)
        elapsed = time.perf_counter() - start
        for rid in [r for r in core.seqs if r.startswith("c")]:
            core.abort(rid)
        return {
            "tokens_per_s": tokens / elapsed,
            "loads_per_s": (core.registry.loads - loads) / elapsed,
        }

    def _place_loaded(self, pending: list[str]) -> list[str]:
        """Write each loaded pending adapter into a slot (as admission would); the rest, prefetched."""
        core, waiting = self.core, []
        for name in pending:
            entry = core.registry.get(name)
            weights = core.registry.weights(name, entry.version)
            slot = None if weights is None else core.slots.place((name, entry.version), weights)
            if slot is None:
                waiting.append(name)
            else:
                core.slots.release(slot)
        if waiting:
            core.registry.prefetch(waiting)
        return waiting


def slot_waste(core: EngineCore, paths_by_rank: dict[int, Path]) -> dict[str, float]:
    """Bytes of adapters of several ranks resident together vs the padded slot bytes they occupy."""
    per_slot = core.slots.capacity_bytes / core.slots.num_slots
    slots, used = [], 0
    for rank, path in sorted(paths_by_rank.items()):
        weights = core.read_adapter(f"waste-r{rank}", str(path))
        slots.append(core.slots.place((weights.name, -rank), weights))
        used += weights.nbytes
    for slot in slots:
        core.slots.release(slot)
    core.slots.retain(lambda key: key[1] >= 0)
    occupied = per_slot * len(slots)
    return {
        "ranks": sorted(paths_by_rank),
        "used_mb": used / 2**20,
        "occupied_mb": occupied / 2**20,
        "waste": 1 - used / occupied,
    }


def storm_ratio(core: EngineCore, args: argparse.Namespace, model_path: Path, cache: Path) -> dict:
    """Steady traffic alone, beside a storm of cold loads, and beside a storm of cold requests, in
    alternating phases; tokens/s of each storm phase over the baseline phases."""
    hot = make_adapters(model_path, cache, STEADY_ADAPTERS, args.storm_rank, seed=2)
    for i, path in enumerate(hot):
        core.add_adapter(core.read_adapter(f"hot-{i}", str(path)))
    storm_paths = make_adapters(model_path, cache, 64, args.storm_rank, seed=3)
    names = [f"storm-{i}" for i in range(len(storm_paths))]
    for name, path in zip(names, storm_paths, strict=True):
        core.registry.register(name, str(path))
    core.registry.on_loaded = None
    traffic = SteadyTraffic(core, args.concurrency, args.storm_rate)
    traffic.phase(args.phase_seconds)  # warm-up: every steady sequence admitted once
    phases: dict[str, list] = {"baseline": [], "loads": [], "requests": []}
    for _ in range(args.phases):
        for kind in phases:
            storm = None if kind == "baseline" else kind
            phases[kind].append(traffic.phase(args.phase_seconds, storm, names))
    base = sum(p["tokens_per_s"] for p in phases["baseline"])
    ratios = {k: sum(p["tokens_per_s"] for p in phases[k]) / base for k in ("loads", "requests")}
    return {**phases, "ratio": ratios, "rate": args.storm_rate}


def run(args: argparse.Namespace) -> int:
    """Per --max-lora-rank: cold loads per rank, slot memory, the storm; print markdown and write
    results/adapters.json."""
    import torch

    from loader.config import Config
    from loader.demo import cache_dir
    from loader.model import load_base
    from loader.source import resolve_source
    from server.engine.core import EngineCore

    ranks = [int(r) for r in args.ranks.split(",")]
    model_path = resolve_source(args.model)
    cache = args.cache or cache_dir() / "bench-adapters"
    results: dict = {"threads": torch.get_num_threads(), "configs": {}}
    for max_rank in [int(r) for r in args.max_lora_ranks.split(",")]:
        config = Config(model=args.model, max_lora_rank=max_rank, max_loras=args.max_loras,
                        max_cpu_loras=args.max_loras, max_num_seqs=args.concurrency + 8)  # fmt: skip
        core = EngineCore(load_base(config), config)
        results["device"] = str(next(core.base.model.parameters()).device)
        out: dict = {"cold": {}}
        for rank in [r for r in ranks if r <= max_rank]:
            paths = make_adapters(model_path, cache, args.loads, rank, seed=1)
            out["cold"][rank] = time_cold_loads(core, paths, f"cold-r{rank}")
        waste = {r: make_adapters(model_path, cache, 1, r, seed=1)[0] for r in (4, 8, 16, 64)}
        out["slot_memory"] = slot_waste(core, {r: p for r, p in waste.items() if r <= max_rank})
        if args.storm_rank <= max_rank:
            out["storm"] = storm_ratio(core, args, model_path, cache)
        core.close()
        results["configs"][max_rank] = out
        del core

    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "adapters.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    return 0


def summary(results: dict) -> str:
    """The results as markdown."""
    lines = [f"device: {results['device']}, torch threads: {results['threads']}", ""]
    lines += [
        "| max rank | rank | p50 ms | p99 ms | read p50 | slot write p50 |",
        "|---|---|---|---|---|---|",
    ]
    for max_rank, out in results["configs"].items():
        for rank, c in out["cold"].items():
            lines.append(
                f"| {max_rank} | {rank} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} "
                f"| {c['read_p50_ms']:.1f} | {c['slot_write_p50_ms']:.1f} |"
            )
    lines.append("")
    for max_rank, out in results["configs"].items():
        mem = out["slot_memory"]
        lines.append(
            f"max rank {max_rank}: ranks {mem['ranks']} in {len(mem['ranks'])} slots hold "
            f"{mem['used_mb']:.1f} MB of weights in {mem['occupied_mb']:.1f} MB (waste {mem['waste']:.1%})"
        )
        storm = out.get("storm")
        if storm:
            for kind in ("baseline", "loads", "requests"):
                tps = [round(p["tokens_per_s"], 1) for p in storm[kind]]
                loads = [round(p["loads_per_s"], 1) for p in storm[kind]]
                ratio = storm["ratio"].get(kind)
                lines.append(
                    f"max rank {max_rank}, storm {kind} at {storm['rate']}/s: steady tok/s {tps}, "
                    f"cold loads/s {loads}" + (f", ratio {ratio:.3f}" if ratio else "")
                )
    return "\n".join(lines)
