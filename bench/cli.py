"""`loraplex bench <name>`: each benchmark module adds its own options and runs itself."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

BENCHES = {
    "engine": ("bench.engine", "engine throughput: K adapters vs no adapters vs PEFT"),
    "adapters": ("bench.adapters", "cold-load latency and throughput under a load storm"),
    "train": ("bench.train", "loraplex train vs PEFT + transformers Trainer"),
    "architectures": (
        "bench.architectures",
        "every causal-LM family of transformers: exact, refused or not built, never wrong",
    ),
    "windows": (
        "bench.windows",
        "KV memory of a sliding-window base, blocks behind the window freed",
    ),
    "prefix": (
        "bench.prefix",
        "prefix caching: shared system prompts per adapter, cache on vs off",
    ),
    "structured": (
        "bench.structured",
        "structured outputs: tokens/s with half the requests JSON-schema constrained vs none; "
        "grammar compile times",
    ),
    "cluster": (
        "bench.cluster",
        "loraplex cluster on Ray Serve: adapter-affinity vs default routing on Zipf traffic, "
        "2 replicas vs 1",
    ),
    "sampler": (
        "bench.sampler",
        "sampler micro-benchmark: the batched sampler vs the per-row one it replaced",
    ),
}


def register(sub: argparse._SubParsersAction, handlers: dict[str, Callable[..., int]]) -> None:
    """Add `bench` with one sub-subcommand per benchmark module that is present."""
    bench = sub.add_parser("bench", help="run a benchmark and write its results table")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        parser = kinds.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(bench_run=module.run)
    handlers["bench"] = lambda args: args.bench_run(args)
