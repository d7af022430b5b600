"""`loraplex bench adapters`: adapters of mixed ranks held at their own rank against the padded
layout, cold-load latency per rank, throughput under a storm of cold loads.

1. Mixed ranks (4, 8, 16, 64, 128; `--quick` runs only this part, shorter): (a) memory: within one
   fixed budget (`--budget`), how many adapters of the mix are resident at once, each at its own
   rank, against the padded layout (every slot a rank-128 stack), and the share of the held bytes
   that is padding; (b) steady tokens/s of traffic over one adapter of each rank, on the own-rank
   layout against the padded one (bench/padded_slots.py), in alternating phases of one run;
   (c) cold load (disk to servable) p50/p99 per rank.
2. Storm: steady traffic (sequences on a few hot adapters, each replaced when it finishes) runs
   alone, beside a storm of cold loads (at a fixed rate, adapters nobody has used lately go from
   disk through host memory into a device slot: the read on the loader, the slot write between
   steps, as for a request), and beside a storm of cold requests (each on a cold adapter: the load
   plus a 4-token prompt and a 1-token answer). Phases alternate so machine noise hits all three;
   the figures are steady-traffic tokens/s of each storm phase over the baseline phases.
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
MIXED_RANKS = (4, 8, 16, 64, 128)
PADDED_RANK = max(MIXED_RANKS)  # the padded layout needs slots of the largest rank served


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the adapters benchmark."""
    parser.add_argument("--model", default="demo", help="base model source")
    parser.add_argument("--per-rank", type=int, default=6, help="mixed-rank adapters of each rank")
    parser.add_argument("--budget", default="1GiB", help="adapter memory of the mixed-rank run")
    parser.add_argument("--loads", type=int, default=10, help="cold loads timed per rank")
    parser.add_argument("--storm-rank", type=int, default=16)
    parser.add_argument(
        "--storm-rate", type=float, default=5.0, help="cold loads (or requests) per second"
    )
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument(
        "--phases", type=int, default=2, help="rounds of alternating phases (both parts)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="steady sequences")
    parser.add_argument(
        "--quick", action="store_true", help="the mixed-rank part only, small: a few minutes"
    )
    parser.add_argument("--cache", type=Path, default=None, help="adapter cache folder")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")


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

    def __init__(
        self, core: EngineCore, concurrency: int, rate: float, hot: list[str] | None = None
    ) -> None:
        from server.engine.types import SamplingParams

        self.core, self.concurrency, self.rate = core, concurrency, rate
        self.hot = hot or [f"hot-{i}" for i in range(STEADY_ADAPTERS)]
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
                rid, adapter = f"s{i}", self.hot[i % len(self.hot)]
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


def mixed_memory(core: EngineCore, paths: dict[int, list[Path]]) -> dict:
    """Adapters of the mix placed round-robin by rank into the budget until the next would evict
    one: how many are resident, the padding share of the bytes held, and how many rank-128 padded
    slots the same budget holds."""
    from adapters.slots import device_bytes

    slots, order = core.slots, [p for group in zip(*paths.values(), strict=True) for p in group]
    resident, weights_bytes = [], 0
    for i, path in enumerate(order):
        weights = core.read_adapter(f"mix-{i}", str(path))
        need = device_bytes(weights, slots.dtype)
        if slots.used_bytes + need > slots.budget_bytes:
            break
        slot = slots.place((weights.name, -1 - i), weights)
        slots.release(slot)
        resident.append(weights.rank)
        weights_bytes += need
    held = sum(layer.nbytes for layer in slots.layers.values())  # the tensors the layers hold
    slots.retain(lambda key: key[1] >= 0)
    per_rank_row = (
        sum(  # one rank of every layer (experts count E times)
            getattr(layer, "experts", 1) * (layer.in_features + layer.out_features)
            for layer in slots.layers.values()
        )
        * slots.dtype.itemsize
    )
    padded_slots = slots.budget_bytes // (PADDED_RANK * per_rank_row)
    return {
        "budget_mb": slots.budget_bytes / 2**20,
        "resident": len(resident),
        "resident_ranks": resident,
        "held_mb": held / 2**20,
        "weights_mb": weights_bytes / 2**20,
        "padding_share": 1 - weights_bytes / held if held else 0.0,
        "padded_resident": int(padded_slots),
        "padded_padding_share": 1 - sum(resident) / len(resident) / PADDED_RANK,  # same mix
        "resident_ratio": len(resident) / padded_slots if padded_slots else float("inf"),
    }


def mixed_throughput(cores: dict[str, EngineCore], args: argparse.Namespace) -> dict:
    """Steady tokens/s over one adapter of each rank on each layout, phases alternating."""
    traffic = {
        name: SteadyTraffic(
            core, args.concurrency, args.storm_rate, [f"mix-r{r}" for r in MIXED_RANKS]
        )
        for name, core in cores.items()
    }
    for t in traffic.values():
        t.phase(args.phase_seconds / 2)  # warm-up: every adapter placed, every sequence admitted
    tps: dict[str, list[float]] = {name: [] for name in cores}
    for _ in range(args.phases):
        for name, t in traffic.items():
            tps[name].append(t.phase(args.phase_seconds)["tokens_per_s"])
    for t in traffic.values():
        for rid in list(t.active):
            t.core.abort(rid)
        t.active.clear()
    return {"tokens_per_s": tps, "throughput_ratio": sum(tps["own-rank"]) / sum(tps["padded"])}


def mixed_ranks(args: argparse.Namespace, model_path: Path, cache: Path) -> dict:
    """The mixed-rank part: memory within the budget, throughput against the padded layout, cold
    loads per rank."""
    from bench.padded_slots import use_padded_slots
    from loader.config import Config
    from loader.model import load_base
    from server.engine.core import EngineCore

    paths = {
        r: make_adapters(model_path, cache, args.per_rank, r, seed=10 + r) for r in MIXED_RANKS
    }
    seqs = args.concurrency + 8
    config = Config(model=args.model, adapter_memory=args.budget, max_num_seqs=seqs)
    own = EngineCore(load_base(config), config)
    out: dict = {"memory": mixed_memory(own, paths)}
    padded_config = config.replace(
        adapter_memory="64GiB", max_loras=len(MIXED_RANKS), max_lora_rank=PADDED_RANK
    )
    padded = EngineCore(load_base(padded_config), padded_config)
    out["padded_slot_mb"] = use_padded_slots(padded.layers, PADDED_RANK) / 2**20
    cores = {"own-rank": own, "padded": padded}
    for core in cores.values():
        for r in MIXED_RANKS:
            core.add_adapter(core.read_adapter(f"mix-r{r}", str(paths[r][0])))
    out["throughput"] = mixed_throughput(cores, args)
    padded.close()
    del padded
    out["cold"] = {
        r: time_cold_loads(
            own, make_adapters(model_path, cache, args.loads, r, seed=1), f"cold-r{r}"
        )
        for r in MIXED_RANKS
    }
    own.close()
    return out


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
    """The mixed-rank part, then (without --quick) the storm; print markdown, write
    results/adapters.json, the plot, and --json's summary."""
    import torch

    from loader.config import Config
    from loader.demo import cache_dir
    from loader.model import load_base
    from loader.source import resolve_source
    from server.engine.core import EngineCore

    if args.quick:
        args.per_rank, args.loads, args.phases = 3, 5, 1
        args.phase_seconds = min(args.phase_seconds, 8.0)
        args.budget = "512MiB"
    model_path = resolve_source(args.model)
    cache = args.cache or cache_dir() / "bench-adapters"
    results: dict = {"threads": torch.get_num_threads(), "quick": args.quick}
    results["mixed"] = mixed_ranks(args, model_path, cache)
    if not args.quick:
        config = Config(model=args.model, max_loras=8, max_cpu_loras=8,
                        max_num_seqs=args.concurrency + 8)  # fmt: skip
        core = EngineCore(load_base(config), config)
        results["storm"] = storm_ratio(core, args, model_path, cache)
        core.close()
    results["summary"] = headline(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "adapters.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args.results / "adapters_mixed_ranks.png", results["mixed"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results["summary"], indent=2) + "\n")
    print(summary(results))
    return 0


def headline(results: dict) -> dict:
    """The figures the issue names: padding_share, resident_ratio, throughput_ratio, and more."""
    mixed = results["mixed"]
    return {
        "padding_share": mixed["memory"]["padding_share"],
        "resident_ratio": mixed["memory"]["resident_ratio"],
        "throughput_ratio": mixed["throughput"]["throughput_ratio"],
        "resident": mixed["memory"]["resident"],
        "padded_resident": mixed["memory"]["padded_resident"],
        "cold_load_p50_ms": {str(r): c["p50_ms"] for r, c in mixed["cold"].items()},
        "storm_ratio": results["storm"]["ratio"] if "storm" in results else None,
    }


def plot(path: Path, mixed: dict) -> None:
    """Adapters resident in the budget and steady tokens/s, own-rank against padded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory, tps = mixed["memory"], mixed["throughput"]["tokens_per_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    layouts = ["own rank", f"padded to {PADDED_RANK}"]
    left.bar(layouts, [memory["resident"], memory["padded_resident"]], color=["C0", "C7"])
    left.set_title(f"adapters resident in {memory['budget_mb']:.0f} MiB\n(ranks {MIXED_RANKS})")
    means = [sum(tps["own-rank"]) / len(tps["own-rank"]), sum(tps["padded"]) / len(tps["padded"])]
    right.bar(layouts, means, color=["C0", "C7"])
    right.set_title("steady tokens/s, one adapter per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict) -> str:
    """The results as markdown."""
    mixed = results["mixed"]
    memory, throughput = mixed["memory"], mixed["throughput"]
    lines = [f"torch threads: {results['threads']}", ""]
    lines += [
        f"mixed ranks {MIXED_RANKS}, budget {memory['budget_mb']:.0f} MiB: {memory['resident']} "
        f"adapters resident at their own rank ({memory['weights_mb']:.1f} MiB of weights in "
        f"{memory['held_mb']:.1f} MiB held, padding {memory['padding_share']:.1%}) against "
        f"{memory['padded_resident']} rank-{PADDED_RANK} padded slots: "
        f"resident_ratio {memory['resident_ratio']:.2f}",
        f"steady tok/s own-rank {[round(t, 1) for t in throughput['tokens_per_s']['own-rank']]}, "
        f"padded {[round(t, 1) for t in throughput['tokens_per_s']['padded']]}: "
        f"throughput_ratio {throughput['throughput_ratio']:.3f}",
        "",
        "| rank | cold load p50 ms | p99 ms | read p50 | slot write p50 |",
        "|---|---|---|---|---|",
    ]
    for rank, c in mixed["cold"].items():
        lines.append(
            f"| {rank} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['read_p50_ms']:.1f} "
            f"| {c['slot_write_p50_ms']:.1f} |"
        )
    storm = results.get("storm")
    if storm:
        lines.append("")
        for kind in ("baseline", "loads", "requests"):
            tps = [round(p["tokens_per_s"], 1) for p in storm[kind]]
            loads = [round(p["loads_per_s"], 1) for p in storm[kind]]
            ratio = storm["ratio"].get(kind)
            lines.append(
                f"storm {kind} at {storm['rate']}/s: steady tok/s {tps}, cold loads/s {loads}"
                + (f", ratio {ratio:.3f}" if ratio else "")
            )
    return "\n".join(lines)
