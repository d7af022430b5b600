"""The one configuration object shared by the loader, engine, server and tools."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

QUANT_TYPES = ("nf4", "fp4", "none")
PREFIX_CACHE_SCOPES = ("global", "key")  # key: each API key's requests share cached blocks only
TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # the model's own tool-call output format
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


MAX_SLOTS = 1024  # adapters resident at once when max_loras sets no cap
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def parse_memory(spec: str) -> tuple[float, bool]:
    """(amount, is_fraction) of a memory size: a fraction of the device in (0, 1] such as 0.05, or
    bytes with an optional unit: 512MiB, 2GiB, 1.5GB, 800M, 1000000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", str(spec).lower())
    if match is None:
        raise ConfigError(
            f"adapter_memory must be a size (512MiB, 2GB) or a fraction (0.05), got {spec!r}"
        )
    number, unit = float(match.group(1)), match.group(2) or ""
    if not unit and number <= 1:
        if number <= 0:
            raise ConfigError(f"adapter_memory must be positive, got {spec!r}")
        return number, True
    return number * SIZE_UNITS[unit], False


@dataclass
class Config:
    """Every tunable of a loraplex process, validated at construction."""

    # base model
    model: str = "demo"
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    device: str = "auto"
    # engine limits
    max_num_seqs: int = 32
    max_batch_tokens: int = 512
    kv_capacity_tokens: int = 16384
    block_size: int = 16
    max_model_len: int | None = None
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True
    prefix_cache_scope: str = "global"
    # adapters
    adapters_dir: str | None = None
    adapter_roots: str | None = None
    adapters_poll_s: float = 1.0
    adapter_memory: str = "0.05"  # device bytes for adapter weights: a size or a fraction
    max_loras: int | None = None  # optional cap on adapters resident on the device at once
    max_cpu_loras: int = 64
    max_lora_rank: int = 256  # each adapter is held at its own rank; this only bounds them
    max_adapter_bytes: int = 4 * 1024**3  # float32 bytes: rank 256 on every linear of an 8B base
    lora_dtype: str = "auto"
    train_demo_adapters: bool = False  # train the missing demo adapters into adapters_dir
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_waiting: int = 256
    request_timeout_s: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    api_keys_file: str | None = None
    max_body_bytes: int = 1024 * 1024
    max_n: int = 8
    shutdown_grace_s: float = 30.0
    # structured outputs and tool calls
    tool_call_parser: str = "hermes"
    max_grammar_bytes: int = 64 * 1024
    grammar_compile_timeout_s: float = 10.0
    # cluster (`loraplex cluster`: engine replicas on Ray Serve)
    address: str | None = None  # Ray cluster to join; None starts a local one
    replicas: int = 1  # engine replicas (the initial count under autoscaling)
    replica_cpus: float = 1.0  # Ray CPUs per replica (also its torch threads on cpu)
    replica_gpus: float = 0.0  # Ray GPUs per replica
    min_replicas: int | None = None  # autoscaling bounds: on when max_replicas is set
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    affinity: bool = True  # route each adapter's requests to replicas holding it

    def __post_init__(self) -> None:
        if self.quant not in QUANT_TYPES:
            raise ConfigError(f"quant must be one of {QUANT_TYPES}, got {self.quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.lora_dtype != "auto" and self.lora_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"lora_dtype must be auto or one of {tuple(COMPUTE_DTYPES)}, got {self.lora_dtype!r}"
            )
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
            raise ConfigError(
                f"prefix_cache_scope must be one of {PREFIX_CACHE_SCOPES}, "
                f"got {self.prefix_cache_scope!r}"
            )
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        positive = (
            "max_num_seqs",
            "max_batch_tokens",
            "kv_capacity_tokens",
            "block_size",
            "max_cpu_loras",
            "max_lora_rank",
            "max_adapter_bytes",
            "max_waiting",
            "max_body_bytes",
            "max_n",
            "max_grammar_bytes",
            "grammar_compile_timeout_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_loras is not None and not 0 < self.max_loras <= MAX_SLOTS:
            raise ConfigError(f"max_loras must be in 1..{MAX_SLOTS}, got {self.max_loras}")
        if self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError("max_cpu_loras must be >= max_loras")
        parse_memory(self.adapter_memory)
        if self.adapters_poll_s < 0:
            raise ConfigError(f"adapters_poll_s must be >= 0, got {self.adapters_poll_s}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.kv_capacity_tokens < self.block_size:
            raise ConfigError("kv_capacity_tokens must hold at least one block")
        self._check_cluster()

    def _check_cluster(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ConfigError("replica_cpus and replica_gpus must be >= 0")
        if self.target_ongoing_requests <= 0:
            raise ConfigError("target_ongoing_requests must be positive")
        if self.max_replicas is None:
            if self.min_replicas is not None:
                raise ConfigError("min_replicas needs max_replicas (autoscaling bounds)")
            return
        low = 1 if self.min_replicas is None else self.min_replicas
        if not 0 <= low <= self.replicas <= self.max_replicas:
            raise ConfigError(
                f"autoscaling needs min_replicas <= replicas <= max_replicas, got "
                f"{low} <= {self.replicas} <= {self.max_replicas}"
            )

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def torch_lora_dtype(self) -> torch.dtype:
        """Dtype of the adapter slot stacks: auto is float32 on cpu, the compute dtype on cuda."""
        if self.lora_dtype != "auto":
            return COMPUTE_DTYPES[self.lora_dtype]
        return torch.float32 if self.resolved_device == "cpu" else self.torch_compute_dtype

    @property
    def slot_count(self) -> int:
        """How many adapters the device may hold at once: max_loras, else as many as the budget
        holds up to MAX_SLOTS."""
        return self.max_loras or MAX_SLOTS

    def adapter_memory_bytes(self, device_bytes: int) -> int:
        """The adapter budget in bytes on a device of device_bytes."""
        amount, fraction = parse_memory(self.adapter_memory)
        return int(amount * device_bytes) if fraction else int(amount)

    @property
    def adapter_root_paths(self) -> list[Path]:
        """Folders a runtime-loaded adapter may come from: the adapters folder, then adapter_roots."""
        extra = (self.adapter_roots or "").split(os.pathsep)
        return [Path(p) for p in [self.adapters_dir or "", *extra] if p]

    @property
    def resolved_device(self) -> str:
        """cuda when asked for or available under auto, else cpu."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
