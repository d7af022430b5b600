"""The Ray Serve application (ingress + engine replicas) built from a Config, and `loraplex cluster`
that runs it on a local or joined Ray cluster."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from loader.config import Config
from server.cluster.ingress import INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT, Ingress
from server.cluster.replica import EngineReplica
from server.serve import url_of

log = logging.getLogger("loraplex.cluster")

APP_NAME = "loraplex"
INGRESS_MAX_ONGOING = (
    4096  # the ingress only forwards: the replicas and their queues bound the load
)
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def scaling(config: Config) -> dict[str, Any]:
    """A fixed replica count, or Ray Serve's autoscaling when max_replicas is set."""
    if config.max_replicas is None:
        return {"num_replicas": config.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": 1 if config.min_replicas is None else config.min_replicas,
            "initial_replicas": config.replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    }


def build(config: Config) -> Application:
    """The ingress bound to the engine replica deployment, both configured from config."""
    replica = serve.deployment(
        EngineReplica,
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        max_ongoing_requests=config.max_num_seqs,  # more wait at the router, free to pick a replica
        max_queued_requests=config.max_waiting,  # beyond it the ingress answers 429
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=config.shutdown_grace_s,
        **scaling(config),
    )
    ingress = serve.deployment(
        Ingress,
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    )
    return ingress.bind(replica.bind(config, INGRESS_DEPLOYMENT), config)


def app_builder(args: dict[str, Any]) -> Application:
    """The application for `serve run` / `serve deploy` configs: args are Config fields."""
    return build(Config(**args))


def run_cluster(config: Config) -> int:
    """Start or join a Ray cluster, deploy the application on config.host:port and serve until
    SIGINT or SIGTERM."""
    import ray

    started = time.perf_counter()
    ray.init(address=config.address, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        url = url_of(config.host, config.port)
        scale = (
            f"{config.replicas} replicas"
            if config.max_replicas is None
            else f"{config.replicas} replicas, autoscaling {config.min_replicas or 1}.."
            f"{config.max_replicas}"
        )
        log.info(
            "ready: %s (cluster: %s of %s, affinity %s, deployed in %.1fs); console: %s/ui",
            url,
            scale,
            config.model,
            "on" if config.affinity else "off",
            time.perf_counter() - started,
            url,
        )
        stop.wait()
        return 0
    finally:
        serve.delete(APP_NAME)
        if config.address is None:
            serve.shutdown()
        ray.shutdown()
