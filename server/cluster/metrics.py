"""The cluster's /metrics: each replica's series labelled with the replica, and replica counts."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"


class ReplicaSeries:
    """A collector of every replica's parsed families, merged by name, each sample labelled."""

    def __init__(self, texts: dict[str, str], states: dict[str, int]) -> None:
        self.texts = texts
        self.states = states

    def collect(self) -> Iterable[Metric]:
        """The merged families, then loraplex_cluster_replicas by state."""
        merged: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    labels = {**sample.labels, REPLICA_LABEL: replica}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()
        replicas = GaugeMetricFamily(
            "loraplex_cluster_replicas", "engine replicas by Ray Serve state", labels=["state"]
        )
        for state, count in sorted(self.states.items()):
            replicas.add_metric([state], count)
        yield replicas


def cluster_metrics(texts: dict[str, str], states: dict[str, int]) -> bytes:
    """Prometheus text of the replicas' series (texts by replica id) and the replica states."""
    registry = CollectorRegistry()
    registry.register(ReplicaSeries(texts, states))
    return generate_latest(registry)
