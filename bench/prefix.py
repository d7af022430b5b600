"""`loraplex bench prefix`: prefix caching on shared system prompts per adapter, cache on vs off.

K random adapters on the NF4 demo base (the serving defaults but the caching flag, with room for
every request at once). Each adapter has its own system prompt; each of its requests appends a
distinct user turn. All requests are submitted at t=0, adapters alternating, and served greedily to
a fixed length by one engine with prefix caching and one without. Reported: TTFT p50/p90
(submission to first token), tokens/s (generated tokens / wall time of the run), the prefix hit
rate, and the share of requests with the same greedy tokens in both engines (not all: the engines
batch differently, and bf16 logits of random prompts often tie, so a tie may resolve either way).
A control workload of the same shape with every prompt distinct checks that caching costs nothing
when nothing is shared. Modes alternate over rounds (each figure is the median over rounds); every
round draws new prompts, so the cache-on engine, reused across rounds, never starts a round warm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.engine_systems import run_engine
from bench.workload import (
    BenchRequest,
    adapter_name,
    add_output_arguments,
    make_adapters,
    make_prompts,
)
from loader.config import Config
from server.engine.core import EngineCore

QUICK = {"adapters": 4, "requests_per_adapter": 4, "system_tokens": 256, "rounds": 1}
RANK = 16  # the trainer's default rank
WARM_TOKENS = 8  # warm-up prompts: shorter than a block, so they leave nothing cached
WORKLOADS = ("shared", "distinct")  # per-adapter system prompts; every prompt distinct
GOALS = {
    "ttft_p50_ratio": ("<=", 0.3),
    "throughput_ratio": (">=", 2.0),
    "no_sharing_ratio": (">=", 0.97),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the prefix benchmark."""
    parser.add_argument("--adapters", type=int, default=8, help="adapters, one system prompt each")
    parser.add_argument("--requests-per-adapter", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=512, help="shared system prompt")
    parser.add_argument("--user-tokens", type=int, default=32, help="distinct user turn")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each mode")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=Config.max_batch_tokens,
        help="tokens per engine step (default: the serving default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 adapters x 4 requests, 256-token system prompts"
    )
    add_output_arguments(parser, "prefix")


@dataclass
class Run:
    """One request set through one engine: per-request TTFT (s) and tokens, rate, hit rate."""

    ttft: dict[str, float]
    tokens: dict[str, list[int]]
    tokens_per_s: float
    hit_rate: float  # prompt tokens found cached / prompt tokens looked up (0 with caching off)


def _workloads(
    args: argparse.Namespace, vocab: int, round_index: int
) -> dict[str, list[BenchRequest]]:
    """The round's request sets of WORKLOADS, adapters alternating (request j of every adapter
    before request j + 1 of any); every round and kind of prompt draws from its own seed."""
    k, per = args.adapters, args.requests_per_adapter
    seed = 10 * round_index
    systems = make_prompts(k, args.system_tokens, vocab, seed)
    users = make_prompts(k * per, args.user_tokens, vocab, seed + 1)
    distinct = make_prompts(k * per, args.system_tokens + args.user_tokens, vocab, seed + 2)
    order = [(j, a) for j in range(per) for a in range(k)]
    return {
        "shared": [
            BenchRequest(f"{round_index}-a{a}-q{j}", systems[a] + users[a * per + j], a)
            for j, a in order
        ],
        "distinct": [
            BenchRequest(f"{round_index}-a{a}-q{j}-d", distinct[a * per + j], a) for j, a in order
        ],
    }


def _engine(args: argparse.Namespace, caching: bool, adapter_paths: list[Path]) -> EngineCore:
    """A fresh engine on its own NF4 demo base holding every adapter, warmed up untimed."""
    from loader.model import load_base

    requests = args.adapters * args.requests_per_adapter
    per_request = args.system_tokens + args.user_tokens + args.new_tokens
    config = Config(
        enable_prefix_caching=caching,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=requests,
        kv_capacity_tokens=requests * (per_request + Config.block_size),
        max_cpu_loras=max(Config.max_cpu_loras, args.adapters),
    )
    engine = EngineCore(load_base(config), config)
    for i, path in enumerate(adapter_paths):
        engine.add_adapter(engine.read_adapter(adapter_name(i), str(path)))
    vocab = engine.base.model.config.vocab_size
    warm = make_prompts(args.adapters, WARM_TOKENS, vocab, seed=-1)
    run_engine(engine, [BenchRequest(f"warm{i}", p, i) for i, p in enumerate(warm)], 2)
    return engine


def _prefix_tokens(engine: EngineCore) -> tuple[int, int]:
    """Prompt tokens found in, and looked up in, the prefix cache so far."""
    stats = engine.stats()
    return sum(stats.prefix_hit_tokens.values()), sum(stats.prefix_queried_tokens.values())


def _serve(engine: EngineCore, requests: list[BenchRequest], new_tokens: int, label: str) -> Run:
    """Submit every request at t=0 and step the engine until all are done (greedy, EOS ignored)."""
    from server.engine.types import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    hits, queried = _prefix_tokens(engine)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    ttft: dict[str, float] = {}
    started = time.perf_counter()
    for r in requests:
        engine.add_request(r.request_id, r.prompt_ids, adapter_name(r.adapter_index), params)
    with tqdm(total=len(requests) * new_tokens, desc=label, leave=False) as bar:
        while engine.has_work():
            outputs = engine.step()
            now = time.perf_counter() - started
            for out in outputs:
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                if out.token_id is not None:
                    ttft.setdefault(out.request_id, now)
                    tokens[out.request_id].append(out.token_id)
                    bar.update()
    elapsed = time.perf_counter() - started
    new_hits, new_queried = _prefix_tokens(engine)
    looked_up = new_queried - queried
    return Run(
        ttft=ttft,
        tokens=tokens,
        tokens_per_s=sum(map(len, tokens.values())) / elapsed,
        hit_rate=(new_hits - hits) / looked_up if looked_up else 0.0,
    )


def _same_share(on: list[Run], off: list[Run]) -> float:
    """Share of requests, over all rounds, whose tokens are identical with caching on and off."""
    pairs = [
        (a.tokens[rid], b.tokens[rid]) for a, b in zip(on, off, strict=True) for rid in a.tokens
    ]
    return sum(x == y for x, y in pairs) / len(pairs)


def _figures(runs: list[Run]) -> dict:
    """Median over rounds of each round's TTFT p50 and p90, tokens/s and hit rate."""
    p50, p90 = zip(
        *(np.percentile(list(r.ttft.values()), [50, 90]).tolist() for r in runs), strict=True
    )
    return {
        "ttft_p50_s": round(statistics.median(p50), 4),
        "ttft_p90_s": round(statistics.median(p90), 4),
        "tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 2),
        "hit_rate": round(statistics.median(r.hit_rate for r in runs), 4),
        "rounds_tokens_per_s": [round(r.tokens_per_s, 2) for r in runs],
        "rounds_ttft_p50_s": [round(p, 4) for p in p50],
    }


def _summary(args: argparse.Namespace, runs: dict[tuple[str, bool], list[Run]]) -> dict:
    """Settings, the three ratios (cache on / cache off) with their goals, and every figure."""
    fig = {(w, on): _figures(rs) for (w, on), rs in runs.items()}
    shared_on, shared_off = fig["shared", True], fig["shared", False]
    ratios = {
        "ttft_p50_ratio": shared_on["ttft_p50_s"] / shared_off["ttft_p50_s"],
        "throughput_ratio": shared_on["tokens_per_s"] / shared_off["tokens_per_s"],
        "no_sharing_ratio": fig["distinct", True]["tokens_per_s"]
        / fig["distinct", False]["tokens_per_s"],
    }
    return {
        **{name: round(value, 3) for name, value in ratios.items()},
        "goals_met": {
            name: ratios[name] <= goal if sign == "<=" else ratios[name] >= goal
            for name, (sign, goal) in GOALS.items()
        },
        "settings": {
            "model": "demo (SmolLM2-135M-Instruct, NF4)",
            "adapters": args.adapters,
            "requests_per_adapter": args.requests_per_adapter,
            "system_tokens": args.system_tokens,
            "user_tokens": args.user_tokens,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "rank": RANK,
            "max_batch_tokens": args.max_batch_tokens,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "quick": args.quick,
        },
        **{f"{w}_cache_{'on' if on else 'off'}": f for (w, on), f in fig.items()},
        "same_tokens_share": {w: _same_share(runs[w, True], runs[w, False]) for w in WORKLOADS},
    }


def _plot(path: Path, runs: dict[tuple[str, bool], list[Run]], summary: dict) -> None:
    """TTFT distribution of the shared workload and tokens/s of both workloads, cache on and off."""
    import matplotlib  # imported here: serving never needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_ax, rate_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for on in (False, True):
        ttfts = sorted(t for r in runs["shared", on] for t in r.ttft.values())
        shares = np.arange(1, len(ttfts) + 1) / len(ttfts)
        ttft_ax.step(ttfts, shares, where="post", label=f"cache {'on' if on else 'off'}")
    ttft_ax.set_xlabel("time to first token (s)")
    ttft_ax.set_ylabel("share of requests")
    ttft_ax.set_title("TTFT, shared system prompts (all rounds)")
    ttft_ax.legend()
    x = np.arange(len(WORKLOADS))
    for offset, on in ((-0.2, False), (0.2, True)):
        rates = [summary[f"{w}_cache_{'on' if on else 'off'}"]["tokens_per_s"] for w in WORKLOADS]
        rate_ax.bar(x + offset, rates, width=0.4, label=f"cache {'on' if on else 'off'}")
    rate_ax.set_xticks(x, ["shared system prompts", "every prompt distinct"])
    rate_ax.set_ylabel("generated tokens/s (median of rounds)")
    rate_ax.set_title("Throughput")
    rate_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(summary: dict) -> str:
    """The markdown table of every (workload, mode) and the ratios against their goals."""
    lines = [
        "| workload | prefix cache | TTFT p50 (s) | TTFT p90 (s) | tokens/s | hit rate |",
        "|---|---|---|---|---|---|",
    ]
    for w, label in zip(WORKLOADS, ("shared system prompts", "every prompt distinct"), strict=True):
        for mode in ("off", "on"):
            f = summary[f"{w}_cache_{mode}"]
            lines.append(
                f"| {label} | {mode} | {f['ttft_p50_s']:.2f} | {f['ttft_p90_s']:.2f} | "
                f"{f['tokens_per_s']:.1f} | {f['hit_rate']:.0%} |"
            )
    verdict = {True: "met", False: "missed"}
    ratios = ", ".join(
        f"{name} {summary[name]} (goal {sign} {goal}: {verdict[summary['goals_met'][name]]})"
        for name, (sign, goal) in GOALS.items()
    )
    return "\n".join(lines) + f"\n\n{ratios}"


def run(args: argparse.Namespace) -> int:
    """Serve both workloads with caching on and off in alternated rounds; print the table, write
    the JSON and the plot."""
    from loader.demo import prepare_demo

    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    paths = make_adapters(prepare_demo(), args.adapters_dir, args.adapters, RANK)
    engines = {on: _engine(args, on, paths) for on in (False, True)}
    vocab = engines[True].base.model.config.vocab_size
    runs: dict[tuple[str, bool], list[Run]] = {
        (w, on): [] for w in WORKLOADS for on in (False, True)
    }
    for round_index in range(args.rounds):  # alternated, so machine noise hits both modes alike
        sets = _workloads(args, vocab, round_index)
        for w in WORKLOADS:
            for on in (False, True):
                label = f"round {round_index + 1} {w} cache {'on' if on else 'off'}"
                runs[w, on].append(_serve(engines[on], sets[w], args.new_tokens, label))
    for engine in engines.values():
        engine.close()
    summary = {**_summary(args, runs), "wall_s": round(time.perf_counter() - started, 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.results / "prefix.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    _plot(args.results / "prefix.png", runs, summary)
    print(_table(summary))
    same = summary["same_tokens_share"]
    print(f"share of requests with the same greedy tokens, cache on and off: {same}")
    print(f"wrote {json_path}, {args.results / 'prefix.png'} ({summary['wall_s']} s)")
    return 0
