"""The cluster's Ray-free parts: the adapter log a late replica replays, the labelled /metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.adapter_log import AdapterLog
from server.cluster.asgi import ForwardedRequest
from server.cluster.metrics import cluster_metrics


def admin_call(path: str, name: str) -> ForwardedRequest:
    body = json.dumps({"lora_name": name, "lora_path": f"/adapters/{name}"}).encode()
    return ForwardedRequest("POST", f"/v1/{path}_lora_adapter", b"", [], body)


def test_adapter_log_keeps_the_net_change_per_name_in_order():
    log = AdapterLog()
    log.record(admin_call("load", "a"))
    log.record(admin_call("unload", "folder-adapter"))  # an unload of a watched adapter is kept
    log.record(admin_call("load", "b"))
    log.record(admin_call("unload", "a"))  # loaded then unloaded at runtime: nothing to replay
    log.record(admin_call("load", "b"))  # reloaded: once, at its new place in the order
    replay = [(call.path, json.loads(call.body)["lora_name"]) for call in log.replay()]
    assert replay == [
        ("/v1/unload_lora_adapter", "folder-adapter"),
        ("/v1/load_lora_adapter", "b"),
    ]


REPLICA_TEXT = """# HELP loraplex_generated_tokens_total tokens generated
# TYPE loraplex_generated_tokens_total counter
loraplex_generated_tokens_total {tokens}
# HELP loraplex_adapter_requests_total requests by model
# TYPE loraplex_adapter_requests_total counter
loraplex_adapter_requests_total{{model="a"}} {requests}
"""


@pytest.mark.parametrize("states", [{"RUNNING": 2}, {"RUNNING": 1, "STARTING": 1}])
def test_metrics_label_every_series_with_its_replica(states):
    texts = {
        "r1": REPLICA_TEXT.format(tokens=5, requests=2),
        "r2": REPLICA_TEXT.format(tokens=7, requests=3),
    }
    families = {
        f.name: f for f in text_string_to_metric_families(cluster_metrics(texts, states).decode())
    }
    tokens = {s.labels["replica"]: s.value for s in families["loraplex_generated_tokens"].samples}
    assert tokens == {"r1": 5, "r2": 7}
    requests = families["loraplex_adapter_requests"].samples
    assert {(s.labels["replica"], s.labels["model"], s.value) for s in requests} == {
        ("r1", "a", 2),
        ("r2", "a", 3),
    }
    replicas = families["loraplex_cluster_replicas"].samples
    assert {s.labels["state"]: s.value for s in replicas} == states


def test_autoscaling_options_reach_ray_serve():
    pytest.importorskip("ray.serve", reason="loraplex[cluster] is not installed")
    from loader.config import Config, ConfigError
    from server.cluster.deploy import scaling

    assert scaling(Config(replicas=3)) == {"num_replicas": 3}
    auto = Config(replicas=2, min_replicas=1, max_replicas=6, target_ongoing_requests=4)
    assert scaling(auto) == {
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 2,
            "max_replicas": 6,
            "target_ongoing_requests": 4,
        }
    }
    with pytest.raises(ConfigError, match="min_replicas <= replicas <= max_replicas"):
        Config(replicas=8, max_replicas=4)
    with pytest.raises(ConfigError, match="needs max_replicas"):
        Config(min_replicas=2)
