"""`loraplex bench cluster`: `loraplex cluster` on a local Ray cluster, in one run.

1. Routing: Zipf traffic over many adapters (64) with a per-replica capacity (8 device slots, and
   Ray's `max_num_models_per_replica`), once with adapter affinity (the adapter's name as the
   multiplexed model id) and once with Ray's default routing (the same deployment, no model id):
   cold loads (adapters copied into a device slot, summed over replicas; a replica's host cache
   holds as many as its slots, so most are read from disk), TTFT p50/p99, tokens/s (streamed).
2. Scale-out: tokens/s of base-model traffic on 2 replicas against 1, one torch thread each, the
   load per replica the same, not streamed: efficiency = tok/s(2) / (2 * tok/s(1)).

Each arm is a fresh deployment (cold replicas); the request sequences are seeded, so both routing
arms send the same requests in the same order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.adapters import percentile
from bench.workload import make_adapters, zipf_weights

KV_TOKENS = 4096  # per replica: enough for the load here, and 8 replicas fit in 24 GiB
ROUTING_ARMS = {"affinity": True, "default": False}
SLOT_LOADS = "loraplex_adapter_slot_loads_total"
PROMPTS = ["Name a colour:", "Count to five:", "Say hello to Ada.", "Reverse 'lamp':"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the cluster benchmark."""
    parser.add_argument("--model", default="demo", help="base model source")
    parser.add_argument(
        "--adapters", type=int, default=64, help="adapters the traffic spreads over"
    )
    parser.add_argument("--capacity", type=int, default=8, help="adapters each replica holds")
    parser.add_argument("--replicas", type=int, default=8, help="replicas of the routing arms")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of popularity")
    parser.add_argument("--requests", type=int, default=800, help="requests per routing arm")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the routing arms")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per routing request")
    parser.add_argument(
        "--scale-requests", type=int, default=48, help="requests per replica, scale-out arms"
    )
    parser.add_argument(
        "--scale-concurrency", type=int, default=8, help="clients per replica, scale-out arms"
    )
    parser.add_argument("--scale-max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="alternated scale-out rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: 4 replicas over 32 adapters (the same total capacity per adapter)",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def zipf_models(names: list[str], count: int, s: float, seed: int) -> list[str]:
    """count draws from names, name i weighted 1 / (i + 1) ** s."""
    return random.Random(seed).choices(names, zipf_weights(len(names), s), k=count)


async def one_request(
    client: Any, url: str, model: str, prompt: str, max_tokens: int, stream: bool
) -> dict:
    """A completion: its latency and (streamed) TTFT in s, and its completion tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    sent = time.perf_counter()
    if not stream:
        response = await client.post(url + "/v1/completions", json=body)
        tokens = (await checked(response, model)).json()["usage"]["completion_tokens"]
        return {"latency": time.perf_counter() - sent, "ttft": None, "tokens": tokens}
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in (await checked(response, model)).aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - sent
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - sent, "ttft": ttft, "tokens": tokens}


async def checked(response: Any, model: str) -> Any:
    """response, unless it is an error (raised with its body)."""
    if response.status_code != 200:
        raise RuntimeError(f"{model}: {response.status_code} {await response.aread()!r}")
    return response


async def drive(
    url: str, models: list[str], concurrency: int, max_tokens: int, label: str, stream: bool = True
) -> dict:
    """Send one request per entry of models with `concurrency` clients: tok/s, and TTFT p50/p99 in
    ms (streamed) or latency p50/p99 (not streamed)."""
    queue = list(enumerate(models))
    results: list[dict] = []
    bar = tqdm(total=len(models), desc=label, leave=False)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            index, model = queue.pop(0)
            prompt = PROMPTS[index % len(PROMPTS)]
            results.append(await one_request(client, url, model, prompt, max_tokens, stream))
            bar.update()

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    bar.close()
    kind = "ttft" if stream else "latency"
    times = [r[kind] * 1000 for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        f"{kind}_p50_ms": percentile(times, 0.5),
        f"{kind}_p99_ms": percentile(times, 0.99),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
    }


def slot_loads(url: str) -> float:
    """Adapters copied into device slots, summed over the cluster's replicas."""
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == SLOT_LOADS
    )


def deployed(config: Any, name: str, port: int) -> str:
    """Deploy the cluster application for config under /name; its URL."""
    from ray import serve

    from server.cluster.deploy import build

    started = time.perf_counter()
    serve.run(build(config), name=name, route_prefix=f"/{name}")
    print(f"{name}: {config.replicas} replicas ready in {time.perf_counter() - started:.0f}s")
    return f"http://127.0.0.1:{port}/{name}"


def adapters_folder(model_path: Path, count: int, root: Path) -> tuple[Path, list[str]]:
    """A folder of count seeded rank-8 adapters named a00, a01, ...; their names."""
    folder = root / f"cluster-{count}"
    names = [f"a{i:02d}" for i in range(count)]
    if not all((folder / name).is_dir() for name in names):
        shutil.rmtree(folder, ignore_errors=True)
        for name, path in zip(
            names, make_adapters(model_path, root / "made", count, 8), strict=True
        ):
            shutil.copytree(path, folder / name)
    return folder, names


def routing(args: argparse.Namespace, base: Any, port: int, folder: Path, names: list[str]) -> dict:
    """Each routing arm on a fresh deployment of args.replicas: cold loads, TTFT, tok/s."""
    from ray import serve

    models = zipf_models(names, args.requests, args.zipf, args.seed)
    arms = {}
    for arm, affinity in ROUTING_ARMS.items():
        config = base.replace(adapters_dir=str(folder), replicas=args.replicas, affinity=affinity)
        url = deployed(config, arm, port)
        before = slot_loads(url)
        stats = asyncio.run(drive(url, models, args.concurrency, args.max_tokens, arm))
        arms[arm] = {**stats, "cold_loads": slot_loads(url) - before}
        serve.delete(arm)
    return arms


def scale_out(args: argparse.Namespace, base: Any, port: int) -> dict:
    """Base-model tok/s on 1 and 2 replicas, the same load per replica: both deployed at once
    (idle replicas take no CPU), measured in alternation for args.rounds rounds so that drift in
    the machine's load falls on both."""
    from ray import serve

    urls, totals = {}, {}
    for replicas in (1, 2):
        name = f"scale{replicas}"
        urls[name] = deployed(base.replace(replicas=replicas), name, port)
        model = json.loads(httpx.get(urls[name] + "/v1/models", timeout=60).text)["data"][0]["id"]
        asyncio.run(drive(urls[name], [model] * 2 * replicas, 2 * replicas, 4, f"{name} warm-up"))
    for round_index in range(args.rounds):
        for replicas in (1, 2):
            name = f"scale{replicas}"
            models = [model] * args.scale_requests * replicas
            concurrency = args.scale_concurrency * replicas
            label = f"{name} round {round_index + 1}"
            stats = asyncio.run(
                drive(urls[name], models, concurrency, args.scale_max_tokens, label, stream=False)
            )
            totals.setdefault(name, []).append(stats)
    for name in urls:
        serve.delete(name)
    return {name: merged(rounds) for name, rounds in totals.items()}


def merged(rounds: list[dict]) -> dict:
    """Rounds of one arm as one: requests, tokens and seconds summed, tok/s of the sums, the
    median round's latency percentiles."""
    requests = sum(r["requests"] for r in rounds)
    tokens, seconds = sum(r["tokens"] for r in rounds), sum(r["seconds"] for r in rounds)
    middle = sorted(rounds, key=lambda r: r["latency_p50_ms"])[len(rounds) // 2]
    return {
        **middle,
        "requests": requests,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds],
    }


def headline(results: dict) -> dict:
    """cold_load_ratio (default / affinity), p99_ttft_ratio (affinity / default),
    scale_out_efficiency (tok/s of 2 replicas / twice that of 1), and the ratios beside them."""
    affinity, default = results["routing"]["affinity"], results["routing"]["default"]
    one, two = results["scale_out"]["scale1"], results["scale_out"]["scale2"]
    return {
        "cold_load_ratio": default["cold_loads"] / max(affinity["cold_loads"], 1),
        "p99_ttft_ratio": affinity["ttft_p99_ms"] / default["ttft_p99_ms"],
        "p50_ttft_ratio": affinity["ttft_p50_ms"] / default["ttft_p50_ms"],
        "routing_throughput_ratio": affinity["tokens_per_s"] / default["tokens_per_s"],
        "scale_out_efficiency": two["tokens_per_s"] / (2 * one["tokens_per_s"]),
    }


def table(results: dict) -> str:
    """The results as markdown tables."""
    lines = [
        "| routing | requests | cold loads | TTFT p50 ms | TTFT p99 ms | tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in results["routing"].items():
        lines.append(
            f"| {arm} | {row['requests']} | {row['cold_loads']:.0f} | {row['ttft_p50_ms']:.0f} "
            f"| {row['ttft_p99_ms']:.0f} | {row['tokens_per_s']:.1f} |"
        )
    lines += ["", "| replicas | requests | tok/s | latency p50 ms |", "|---|---|---|---|"]
    for arm, row in results["scale_out"].items():
        lines.append(
            f"| {arm[-1]} | {row['requests']} | {row['tokens_per_s']:.1f} "
            f"| {row['latency_p50_ms']:.0f} |"
        )
    lines += ["", "```json", json.dumps(results["summary"], indent=2), "```"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Cold loads and TTFT p99 per routing arm; tok/s of 1 and 2 replicas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing_arms = list(results["routing"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [
        (axes[0], routing_arms, [results["routing"][a]["cold_loads"] for a in routing_arms],
         "cold loads (adapters into slots)"),
        (axes[1], routing_arms, [results["routing"][a]["ttft_p99_ms"] for a in routing_arms],
         "TTFT p99 (ms)"),
        (axes[2], ["1 replica", "2 replicas"],
         [results["scale_out"][a]["tokens_per_s"] for a in ("scale1", "scale2")],
         "tokens/s, base traffic"),
    ]  # fmt: skip
    for ax, labels, values, title in panels:
        ax.bar(labels, values, color=["#3b7dd8", "#d8823b"])
        ax.set_title(title)
    fig.suptitle("loraplex cluster: adapter-affinity routing and scale-out")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    """Both parts on one local Ray cluster; print the tables, write results/cluster.json, the plot
    and --json's summary."""
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError:
        print("loraplex bench cluster needs Ray Serve: pip install 'loraplex[cluster]'")
        return 2
    from loader.config import Config
    from loader.demo import cache_dir
    from loader.source import resolve_source

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.quick:
        args.replicas, args.adapters = min(args.replicas, 4), min(args.adapters, 32)
        args.requests, args.rounds = min(args.requests, 400), min(args.rounds, 2)
        args.scale_requests = min(args.scale_requests, 24)
    model_path = resolve_source(args.model)
    folder, names = adapters_folder(model_path, args.adapters, cache_dir() / "bench-adapters")
    base = Config(
        model=str(model_path),
        max_loras=args.capacity,
        max_cpu_loras=args.capacity,  # the rest on disk: a cold load reads the adapter
        adapters_poll_s=0,
        kv_capacity_tokens=KV_TOKENS,
        replica_cpus=1,
    )
    port = free_port()
    ray.init(num_cpus=max(args.replicas, 2), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results: dict = {"settings": {k: str(v) for k, v in vars(args).items() if k != "func"}}
        results["scale_out"] = scale_out(args, base, port)
        results["routing"] = routing(args, base, port, folder, names)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["summary"] = headline(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cluster.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.results / "cluster.png")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results["summary"], indent=2) + "\n")
    print(table(results))
    return 0
