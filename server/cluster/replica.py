"""One engine replica: the base, its own engine and the whole `loraplex serve` app, answering the
requests the ingress forwards to it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from loader.config import Config
from loader.model import load_base
from server.cluster.asgi import REPLICA_HEADER, ForwardedRequest, ResponseStart, call_app

log = logging.getLogger("loraplex.cluster")

ADAPTER_LOG_TIMEOUT_S = 60.0


class HeldAdapter:
    """What Ray's multiplexer holds for an adapter on this replica: its name only (the engine's own
    LRU decides what sits in device slots; Ray's view of the replica's adapters routes requests)."""

    def __init__(self, name: str) -> None:
        self.name = name


def collected(items: list[ResponseStart | bytes]) -> tuple[ResponseStart, bytes]:
    """A whole response: its start and its body joined."""
    start = items[0]
    assert isinstance(start, ResponseStart), "a response begins with its start"
    return start, b"".join(item for item in items[1:] if isinstance(item, bytes))


class EngineReplica:
    """A Ray Serve replica holding the base and its engine behind the single-process app."""

    async def __init__(self, config: Config, ingress_name: str) -> None:
        from server.app import create_app
        from server.engine.engine import AsyncEngine
        from server.serve import load_adapters_dir

        if config.resolved_device == "cpu":
            torch.set_num_threads(max(1, round(config.replica_cpus)))
        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self.config = config
        base = await asyncio.to_thread(load_base, config)
        self.engine = AsyncEngine(base, config)
        load_adapters_dir(self.engine, config.adapters_dir)
        self.engine.start()
        self.app = create_app(self.engine, config)
        self.header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]

        async def held(name: str) -> HeldAdapter:
            return HeldAdapter(name)

        self.hold = serve.multiplexed(max_num_models_per_replica=config.slot_count)(held)
        await self._replay_adapter_log(context.app_name, ingress_name)
        log.info("replica %s (pid %d) serving %s", self.replica_id, os.getpid(), base.name)

    async def _replay_adapter_log(self, app_name: str, ingress_name: str) -> None:
        """Apply the adapter loads and unloads the cluster took before this replica started."""
        ingress = serve.get_deployment_handle(ingress_name, app_name)
        try:
            requests = await asyncio.wait_for(
                ingress.adapter_log.remote(), timeout=ADAPTER_LOG_TIMEOUT_S
            )
        except Exception as error:  # the ingress is down: start with the adapter sources alone
            log.warning("replica %s: no adapter log from the ingress (%s)", self.replica_id, error)
            return
        for request in requests:
            start, body = await self.respond(request)
            if start.status >= 400:
                log.warning("replaying %s failed: %s", request.path, body.decode(errors="replace"))

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The app's response to request, streamed (start, then body chunks); an adapter named by
        the multiplexed model id is recorded as held here first, so Ray routes its next requests
        to this replica."""
        name = serve.get_multiplexed_model_id()
        if name and name in self.engine.adapter_names():
            await self.hold(name)
        async for item in call_app(self.app, request, self.header):
            yield item

    async def respond(self, request: ForwardedRequest) -> tuple[ResponseStart, bytes]:
        """The app's whole response to request (admin calls, /metrics and /health fan-outs)."""
        return collected([item async for item in call_app(self.app, request, self.header)])

    def describe(self) -> dict[str, Any]:
        """This replica's id, health (ok, or dead with the reason), process, base model name and
        adapter capacity."""
        dead = self.engine.dead
        return {
            "replica": self.replica_id,
            "status": "ok" if dead is None else "dead",
            **({"reason": dead} if dead is not None else {}),
            "pid": os.getpid(),
            "node": os.uname().nodename,
            "base": self.engine.base.name,
            "capacity": self.config.slot_count,
        }

    def check_health(self) -> None:
        """Ray Serve's health check: fails once the engine's step loop has died."""
        if self.engine.dead is not None:
            raise RuntimeError(f"engine dead: {self.engine.dead}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
