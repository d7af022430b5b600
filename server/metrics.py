"""Prometheus metrics of one app: HTTP requests, token latencies, engine gauges, per-adapter counters.

Each app owns its CollectorRegistry. Engine figures (running/waiting sequences, KV blocks, resident
adapters, step counters) are read from `engine.stats()` at scrape time. Adapter labels are bounded by
the engine's registry: a name it does not know is labelled "unknown".
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNKNOWN = "unknown"


class EngineCollector(Collector):
    """Gauges and counters read from the engine's stats at each scrape."""

    def __init__(self, engine: Any, base_name: str) -> None:
        self.engine = engine
        self.base_name = base_name

    def collect(self) -> Iterable[Metric]:
        """The engine's current figures."""
        s = self.engine.stats()
        gauges = {
            "loraplex_running_sequences": ("sequences in the running batch", s.running),
            "loraplex_waiting_sequences": ("sequences waiting to be scheduled", s.waiting),
            "loraplex_kv_used_blocks": ("KV cache blocks in use", s.kv_used_blocks),
            "loraplex_kv_total_blocks": ("KV cache blocks in the pool", s.kv_total_blocks),
            "loraplex_kv_usage_ratio": (
                "fraction of KV cache blocks in use",
                s.kv_used_blocks / s.kv_total_blocks if s.kv_total_blocks else 0.0,
            ),
            "loraplex_resident_adapters": ("adapters holding a device slot", s.resident_adapters),
            "loraplex_adapter_pins": (
                "running or waiting sequences holding an adapter slot",
                s.adapter_pins,
            ),
            "loraplex_open_streams": (
                "requests whose engine output stream has not ended",
                s.open_streams,
            ),
            "loraplex_host_adapters": ("adapters in the host-memory cache", s.host_adapters),
            "loraplex_adapter_host_bytes": (
                "float32 weight bytes of the adapters in host memory",
                s.adapter_host_bytes,
            ),
            "loraplex_adapter_device_bytes": (
                "device bytes of the adapters held, each at its own rank",
                s.adapter_device_bytes,
            ),
            "loraplex_adapter_memory_budget_bytes": (
                "device bytes adapters may take (--adapter-memory)",
                s.adapter_memory_budget,
            ),
            "loraplex_adapter_memory_free_bytes": (
                "device bytes of the adapter budget not in use",
                s.adapter_memory_budget - s.adapter_device_bytes,
            ),
            "loraplex_registered_adapters": (
                "adapters the server can serve",
                len(self.engine.adapter_names()),
            ),
            "loraplex_prefix_cache_blocks": (
                "KV blocks in the prefix cache (held by requests or kept for reuse)",
                s.prefix_cached_blocks,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "loraplex_engine_steps": ("engine steps run", s.steps),
            "loraplex_engine_preemptions": ("sequences preempted for KV space", s.preemptions),
            "loraplex_engine_generated_tokens": (
                "tokens sampled by the engine",
                s.generated_tokens,
            ),
            "loraplex_adapter_loads": (
                "adapters read from disk in the background",
                s.adapter_loads,
            ),
            "loraplex_adapter_slot_loads": (
                "adapters copied into a device slot (a cold start of that adapter on the device)",
                s.adapter_slot_loads,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        per_adapter = {
            "loraplex_prefix_cache_queried_tokens": (
                "prompt tokens looked up in the prefix cache, by model",
                s.prefix_queried_tokens,
            ),
            "loraplex_prefix_cache_hit_tokens": (
                "prompt tokens whose KV was found in the prefix cache, by model",
                s.prefix_hit_tokens,
            ),
        }
        for name, (doc, values) in per_adapter.items():
            family = CounterMetricFamily(name, doc, labels=["adapter"])
            for adapter, value in sorted(values.items(), key=lambda kv: kv[0] or ""):
                family.add_metric([adapter or self.base_name], value)
            yield family


@dataclass
class ModelUsage:
    """Generation requests and generated tokens per model label (the base, an adapter or "unknown"),
    since the server started: the per-adapter counters of /metrics and of GET /v1/adapters."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    generated_tokens: collections.Counter[str] = field(default_factory=collections.Counter)


class UsageCollector(Collector):
    """The per-model counters of a ModelUsage, read at each scrape."""

    def __init__(self, usage: ModelUsage) -> None:
        self.usage = usage

    def collect(self) -> Iterable[Metric]:
        """loraplex_adapter_requests_total and loraplex_adapter_generated_tokens_total by model."""
        families = {
            "loraplex_adapter_requests": ("generation requests by model", self.usage.requests),
            "loraplex_adapter_generated_tokens": (
                "generated tokens by model",
                self.usage.generated_tokens,
            ),
        }
        for name, (doc, values) in families.items():
            family = CounterMetricFamily(name, doc, labels=["adapter"])
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
            yield family


class Metrics:
    """The app's registry and the instruments the HTTP layer updates."""

    def __init__(self, engine: Any, base_name: str) -> None:
        self.engine = engine
        self.base_name = base_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "time from request arrival to a choice's first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "time between consecutive tokens of a choice",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "loraplex_generated_tokens", "tokens generated for HTTP requests", registry=r
        )
        self.usage = ModelUsage()
        r.register(EngineCollector(engine, base_name))
        r.register(UsageCollector(self.usage))

    def adapter_label(self, model: str) -> str:
        """model itself if it is the base or a known adapter, else "unknown"."""
        if model == self.base_name or model in self.engine.adapter_names():
            return model
        return UNKNOWN

    def count_request(self, model: str) -> None:
        """Count a generation request naming model (an unknown one as "unknown")."""
        self.usage.requests[self.adapter_label(model)] += 1

    def token_observer(self, model: str) -> Callable[[float | None, float | None], None]:
        """The per-token observer of a generation for model."""
        label, tokens = self.adapter_label(model), self.usage.generated_tokens

        def on_token(ttft: float | None, gap: float | None) -> None:
            self.tokens.inc()
            tokens[label] += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if gap is not None:
                self.itl.observe(gap)

        return on_token

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template (unmatched paths as "other") and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, recording the status of its response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
