"""The asyncio-facing engine: a background thread runs EngineCore steps; callers stream tokens."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from adapters.format import AdapterWeights, base_linear_shapes, read_adapter
from loader.model import BaseModel
from server.config import Config
from server.engine.core import EngineCore
from server.engine.types import EngineError, EngineStats, SamplingParams, TokenOutput

log = logging.getLogger("loraplex.engine")


class AsyncEngine:
    """Thread-safe front of EngineCore: add/abort requests and adapters from any thread or loop."""

    def __init__(self, base: BaseModel, config: Config, lora_op: str = "grouped") -> None:
        self.base = base
        self.config = config
        self.core = EngineCore(base, config, lora_op)
        self.max_model_len = self.core.max_model_len
        self.shapes = base_linear_shapes(base.model)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = 0

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the step loop after the current step."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps and return its result (or raise its error)."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        done: Future = Future()

        def task() -> None:
            try:
                done.set_result(fn())
            except Exception as error:  # noqa: BLE001 - handed back to the caller
                done.set_exception(error)

        self._inbox.put(task)
        self._wake.set()
        return done.result()

    def _loop(self) -> None:
        core = self.core
        while not self._stop.is_set():
            while not self._inbox.empty():
                self._inbox.get()()
            if not core.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in core.step():
                self._deliver(out)

    def _deliver(self, out: TokenOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    # adapters -----------------------------------------------------------------------------
    def read(self, name: str, path: str) -> AdapterWeights:
        """Read and validate an adapter folder against the served base (no engine state touched)."""
        cfg = self.config
        return read_adapter(path, name, self.shapes, cfg.max_lora_rank, cfg.max_adapter_bytes)

    def load_adapter(self, name: str, path: str) -> None:
        """Validate an adapter off the step loop, then make it servable between steps."""
        weights = self.read(name, path)
        self._call(lambda: self.core.add_adapter(weights))

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; its running requests finish on the old weights."""
        from adapters.errors import AdapterError

        if name not in self.core.slots.host:
            raise AdapterError(f"adapter {name!r} is not loaded", "adapter_not_found")
        self._call(lambda: self.core.remove_adapter(name))

    def adapter_names(self) -> list[str]:
        """Names of every servable adapter."""
        return sorted(self.core.slots.host)

    def adapter_info(self) -> dict[str, dict]:
        """Per adapter: path, rank, bytes in host memory, and whether it holds a device slot."""
        slots = self.core.slots
        return {
            name: {
                "path": w.path,
                "rank": w.rank,
                "bytes": w.nbytes,
                "resident": name in slots.resident,
            }
            for name, w in sorted(slots.host.items())
        }

    # requests -----------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenOutput]:
        """Stream a request's tokens; the last output carries its finish_reason."""
        self.core.check_request(prompt_ids, adapter, params)
        if len(self.core.scheduler.waiting) + self._pending >= self.config.max_waiting:
            raise EngineError("The server is overloaded; retry later.", "overloaded", 429)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        self._pending += 1

        def add() -> None:
            self._pending -= 1
            try:
                self.core.add_request(request_id, prompt_ids, adapter, params)
            except EngineError as error:
                self._deliver(TokenOutput(request_id, None, "error", error=str(error)))

        self._inbox.put(add)
        self._wake.set()
        finished = False
        try:
            while True:
                out = await outputs.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its KV and slot are freed before the next step."""
        self._inbox.put(lambda: self.core.abort(request_id))
        self._wake.set()

    def abort_all(self) -> None:
        """End every request still streaming with finish_reason "abort" (used at shutdown)."""

        def run() -> None:
            for request_id in list(self._streams):
                out = self.core.abort(request_id)
                self._deliver(out or TokenOutput(request_id, None, "abort"))

        self._inbox.put(run)
        self._wake.set()

    def stats(self) -> EngineStats:
        """A snapshot of the engine's queues and memory."""
        return self.core.stats()
