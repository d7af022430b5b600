"""Graceful shutdown: on SIGTERM/SIGINT stop accepting work (new requests get 503), let in-flight requests
finish for up to `shutdown_grace_s`, then end the rest with finish_reason "abort", then stop uvicorn and
exit 0. A second signal forces uvicorn's immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

from server.guards import Drain

log = logging.getLogger("loraplex.serve")

POLL_S = 0.1
ABORT_WAIT_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the app instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain, engine: Any, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.engine = engine
        self.grace_s = grace_s
        self._drainer: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: start draining; a later one: uvicorn's own (forced) exit."""
        if self.drain.draining:
            super().handle_exit(sig, frame)
            return
        self.drain.draining = True
        log.info("signal %s: draining %d in-flight requests", sig, self.drain.in_flight)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drainer)

    def _start_drainer(self) -> None:
        self._drainer = asyncio.ensure_future(self.drain_then_exit())

    async def drain_then_exit(self) -> None:
        """Wait for in-flight requests up to the grace period, abort the rest, then stop serving."""
        deadline = time.monotonic() + self.grace_s
        while self.drain.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if self.drain.in_flight > 0:
            log.warning("grace period over: aborting %d requests", self.drain.in_flight)
            abort_all = getattr(self.engine, "abort_all", None)
            if abort_all is not None:
                abort_all()
            deadline = time.monotonic() + ABORT_WAIT_S
            while self.drain.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
        log.info("drained; stopping")
        self.should_exit = True
