"""The `loraplex` command line: prepare, serve, train and bench subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

from loader.config import Config, ConfigError
from loader.errors import ModelSourceError

log = logging.getLogger("loraplex")

HELP = {
    "model": "base model: `demo`, a local HF checkpoint folder or a hub id",
    "quant": "nf4 | fp4 | none (unquantized)",
    "double_quant": "quantize the 4-bit scales too (QLoRA double quantization)",
    "compute_dtype": "bfloat16 | float16 | float32",
    "device": "auto | cpu | cuda",
    "max_num_seqs": "max running sequences per step",
    "max_batch_tokens": "max tokens (decode + prefill chunks) per step",
    "kv_capacity_tokens": "KV pool capacity in tokens",
    "block_size": "KV block size in tokens",
    "max_model_len": "max prompt + completion tokens (default: the model's context)",
    "cuda_graphs": "replay decode steps from CUDA graphs at bucketed batch sizes (cuda only)",
    "enable_prefix_caching": "reuse the KV of prompt prefixes seen before (same adapter weights)",
    "prefix_cache_scope": "global: requests share cached prefixes | key: only within an API key",
    "adapters_dir": "watched folder whose PEFT subfolders are served as adapters",
    "adapter_roots": f"more folders (separated by {os.pathsep!r}) that load_lora_adapter may read",
    "adapters_poll_s": "seconds between polls of the adapters folder (0: no watching)",
    "adapter_memory": "device memory for adapter weights: a size (512MiB, 2GB) or a fraction (0.05)",
    "max_loras": "optional cap on adapters held on the device at once (default: what fits)",
    "max_cpu_loras": "adapters cached in host memory",
    "max_lora_rank": "largest adapter rank accepted (each adapter is held at its own rank)",
    "max_adapter_bytes": "largest adapter accepted, in float32 bytes",
    "lora_dtype": "adapter slot dtype: auto (float32 on cpu, compute dtype on cuda) or a dtype",
    "train_demo_adapters": "train the demo adapters missing from --adapters in the background "
    "(demo base only; each is served as it finishes)",
    "host": "bind address",
    "port": "bind port",
    "served_model_name": "id of the bare base in the API",
    "max_waiting": "waiting-queue bound; beyond it requests get 429",
    "request_timeout_s": "seconds before a request is aborted",
    "api_key": "if set, /v1/* requires `Authorization: Bearer <key>` (an admin key, all adapters)",
    "api_keys_file": 'JSON list of {key, role: user|admin, adapters: [names] | "*"}',
    "max_body_bytes": "largest request body accepted (413 beyond)",
    "max_n": "most choices (n) per request",
    "shutdown_grace_s": "seconds in-flight requests may run after SIGTERM before being aborted",
    "tool_call_parser": "the model's tool-call format for tool_choice auto: hermes | llama3_json",
    "max_grammar_bytes": "largest JSON schema, regex or grammar a request may carry (400 beyond)",
    "grammar_compile_timeout_s": "seconds a request's grammar may take to compile (400 beyond)",
    "address": "Ray cluster to join (ray://host:10001 or auto; default: start a local one)",
    "replicas": "engine replicas, each with the base and its own engine (initial count if autoscaling)",
    "replica_cpus": "Ray CPUs per replica (on cpu also its torch threads)",
    "replica_gpus": "Ray GPUs per replica",
    "min_replicas": "autoscaling: fewest replicas (with --max-replicas)",
    "max_replicas": "autoscaling: most replicas (turns Ray Serve autoscaling on)",
    "target_ongoing_requests": "autoscaling: requests in flight per replica to aim for",
    "affinity": "route each adapter's requests to replicas already holding it "
    "(its name is Ray Serve's multiplexed model id)",
}
FLAG_NAMES = {
    "adapters_dir": "adapters",
    "max_loras": "max-loras",
    "max_cpu_loras": "max-cpu-loras",
}


def env_name(field: str) -> str:
    """The environment variable that sets a config field."""
    return "LORAPLEX_" + field.upper()


def add_config_args(parser: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    """Add a --flag for each named Config field, defaulting to $LORAPLEX_<FIELD> or the default."""
    defaults = Config()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for name in fields:
        flag = "--" + FLAG_NAMES.get(name, name.replace("_", "-"))
        env = os.environ.get(env_name(name))
        default = getattr(defaults, name)
        kind = types[name]
        help_text = f"{HELP[name]} (env {env_name(name)})"
        if kind == "bool":
            value = default if env is None else env.lower() in ("1", "true", "yes", "on")
            parser.add_argument(
                flag,
                dest=name,
                default=value,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
            continue
        convert = int if "int" in kind else float if "float" in kind else str
        parser.add_argument(
            flag,
            dest=name,
            type=convert,
            default=convert(env) if env is not None else default,
            help=help_text,
        )


MODEL_FIELDS = ("model", "quant", "double_quant", "compute_dtype", "device")
ENGINE_FIELDS = (
    "max_num_seqs",
    "max_batch_tokens",
    "kv_capacity_tokens",
    "block_size",
    "max_model_len",
    "cuda_graphs",
    "enable_prefix_caching",
    "prefix_cache_scope",
)
ADAPTER_FIELDS = (
    "adapters_dir",
    "adapter_roots",
    "adapters_poll_s",
    "adapter_memory",
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "max_adapter_bytes",
    "lora_dtype",
    "train_demo_adapters",
)
HTTP_FIELDS = (
    "host",
    "port",
    "served_model_name",
    "max_waiting",
    "request_timeout_s",
    "api_key",
    "api_keys_file",
    "max_body_bytes",
    "max_n",
    "shutdown_grace_s",
    "tool_call_parser",
    "max_grammar_bytes",
    "grammar_compile_timeout_s",
)


CLUSTER_FIELDS = (
    "address",
    "replicas",
    "replica_cpus",
    "replica_gpus",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "affinity",
)


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config built from every config field present in args."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in names})


def cmd_prepare(args: argparse.Namespace) -> int:
    """Resolve/convert the base model and print its local folder on the last line."""
    from loader.source import resolve_source

    print(resolve_source(args.model))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the base model and serve it."""
    from server.serve import serve

    return serve(config_from_args(args))


def cmd_cluster(args: argparse.Namespace) -> int:
    """Deploy engine replicas behind one OpenAI endpoint on Ray Serve and serve until stopped."""
    try:
        from server.cluster.deploy import run_cluster
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "ray":
            raise
        raise ConfigError(
            "loraplex cluster needs Ray Serve: pip install 'loraplex[cluster]'"
        ) from error
    return run_cluster(config_from_args(args))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[..., int]]]:
    """The top-level parser and a map from subcommand to handler."""
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[..., int]] = {}

    prepare = sub.add_parser("prepare", help="prepare a base model; prints its local folder")
    add_config_args(prepare, ("model",))
    handlers["prepare"] = cmd_prepare

    serve = sub.add_parser("serve", help="serve the base and its adapters over HTTP")
    add_config_args(serve, MODEL_FIELDS + ENGINE_FIELDS + ADAPTER_FIELDS + HTTP_FIELDS)
    handlers["serve"] = cmd_serve

    cluster = sub.add_parser(
        "cluster", help="serve engine replicas on Ray Serve behind one endpoint (loraplex[cluster])"
    )
    add_config_args(
        cluster, MODEL_FIELDS + ENGINE_FIELDS + ADAPTER_FIELDS + HTTP_FIELDS + CLUSTER_FIELDS
    )
    handlers["cluster"] = cmd_cluster

    for register in _plugins():
        register(sub, handlers)
    return parser, handlers


def _plugins() -> list[Callable[..., None]]:
    """Subcommand registrars of the optional tools (train, bench), each adding its own parser."""
    registrars = []
    for module_name in ("adapters.train.cli", "bench.cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue
            raise
        registrars.append(module.register)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `loraplex` console script."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except (ModelSourceError, ConfigError) as error:
        print(f"loraplex: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
