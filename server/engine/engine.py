"""The asyncio-facing engine: a background thread runs EngineCore steps; callers stream tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from adapters.errors import AdapterError
from adapters.format import FLOAT32_BYTES
from adapters.names import validate_name
from adapters.registry import AdapterEntry, resolve_adapter_folder
from adapters.watch import AdapterDirWatcher, ScanResult
from loader.config import Config
from loader.model import BaseModel
from server.engine.core import EngineCore
from server.engine.faults import Faults
from server.engine.types import EngineError, EngineStats, SamplingParams, TokenOutput

log = logging.getLogger("loraplex.engine")

CANARY_ID = "loraplex-canary"  # the known-good request run after a failed step
CANARY_STEPS = 4  # steps it may take (one prompt token, one output token)


class AsyncEngine:
    """Thread-safe front of EngineCore: add/abort requests and adapters from any thread or loop."""

    def __init__(self, base: BaseModel, config: Config, lora_op: str | None = None) -> None:
        self.base = base
        self.config = config
        self.core = EngineCore(base, config, lora_op)
        self.max_model_len = self.core.max_model_len
        self.registry = self.core.registry
        self.watcher: AdapterDirWatcher | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self.registry.on_loaded = self._wake.set
        self.faults = Faults.from_env()  # test-only fault injection (server/engine/faults.py)
        self.dead: str | None = None  # why the step loop died, once it has

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop in a daemon thread, and the adapters-folder watcher if configured."""
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()
        if self.watcher is not None and self.config.adapters_poll_s > 0:
            self.watcher.start()

    def shutdown(self) -> None:
        """Stop the watcher, the adapter loader and the step loop (after the current step)."""
        if self.watcher is not None:
            self.watcher.stop()
        self.core.close()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 - the loop is lost: say so, fail everyone
            log.critical("engine loop died", exc_info=error)
            self._die(f"{type(error).__name__}: {error}")

    def _run(self) -> None:
        core = self.core
        while not self._stop.is_set():
            while not self._inbox.empty():
                self._call(self._inbox.get())
            if not core.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            steps = core.steps
            try:
                self.faults.before_step(steps + 1)
                outputs = core.step()
            except Exception as error:  # noqa: BLE001 - fail the requests in the engine, go on
                log.exception(
                    "a step failed; failing the %d requests in the engine", len(core.seqs)
                )
                outputs = core.fail_all(f"internal error: {error}")
                self._check_alive()
            for out in outputs:
                self._deliver(out)
            if core.steps == steps:  # nothing runnable: waiting on adapter loads or slots
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _check_alive(self) -> None:
        """After a failed step (the engine emptied): run a known-good request, one greedy token
        of the bare base. If it fails too, the device or the engine is lost and the error escapes
        the loop; otherwise the failure was the failed requests' own and serving goes on."""
        core = self.core
        core.add_request(CANARY_ID, [0], None, SamplingParams(max_tokens=1, temperature=0))
        for _ in range(CANARY_STEPS):
            self.faults.before_step(core.steps + 1)
            for out in core.step():
                if out.finish_reason == "error":
                    raise RuntimeError(f"a known-good request failed after a step: {out.error}")
                if out.finish_reason is not None:
                    return
        core.abort(CANARY_ID)
        raise RuntimeError(f"a known-good request did not finish in {CANARY_STEPS} steps")

    @staticmethod
    def _call(job: Callable[[], None]) -> None:
        """Run an inbox job; one that raises is logged and the loop goes on."""
        try:
            job()
        except Exception:  # noqa: BLE001
            log.exception("an engine inbox job failed")

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every open stream with an engine_dead error."""
        self.dead = reason
        for request_id in list(self._streams):
            self._deliver(self._dead_output(request_id))

    def _dead_output(self, request_id: str) -> TokenOutput:
        message = f"the engine is dead ({self.dead}); the server is restarting"
        return TokenOutput(request_id, None, "error", error=message, error_code="engine_dead")

    def _deliver(self, out: TokenOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    # adapters -----------------------------------------------------------------------------
    def scan_adapters(self) -> ScanResult:
        """Register the adapters folder's subfolders now; start() then keeps watching it."""
        if self.config.adapters_dir is None:
            return ScanResult()
        if self.watcher is None:
            self.watcher = AdapterDirWatcher(
                self.config.adapters_dir, self.registry, self.base.name, self.config.adapters_poll_s
            )
        return self.watcher.scan(settle=False)

    def load_adapter(self, name: str, path: str, replace: bool = True) -> AdapterEntry:
        """Validate a name and a folder inside the adapter roots, read the adapter fully (on the
        caller's thread, never the step loop) and make it servable; a replaced adapter's running
        requests keep the old weights. Raises AdapterError naming the problem."""
        validate_name(name, self.base.name)
        if not replace and name in self.registry:
            raise AdapterError(f"adapter {name!r} is already loaded", "adapter_exists")
        folder = resolve_adapter_folder(path, self.config.adapter_root_paths)
        weights = self.core.read_adapter(name, str(folder))
        entry = self.registry.register(name, str(folder), weights, source="api")
        self._wake.set()
        return entry

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; its running requests finish on the old weights."""
        if self.registry.unregister(name) is None:
            raise AdapterError(f"adapter {name!r} is not loaded", "adapter_not_found")
        self._wake.set()

    def adapter_names(self) -> list[str]:
        """Names of every servable adapter."""
        return self.registry.names()

    def adapter_info(self) -> dict[str, dict]:
        """Per adapter: path, rank, float32 weight bytes, the bytes it takes on the device (at its
        own rank, in the LoRA dtype), tier (device, host or disk)."""
        info = self.registry.info(self.core.slots.resident_names)
        itemsize = self.config.torch_lora_dtype.itemsize
        for entry in info.values():
            entry["device_bytes"] = entry["bytes"] // FLOAT32_BYTES * itemsize
        return info

    # requests -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        request_id: str,
        cache_namespace: str = "",
    ) -> AsyncIterator[TokenOutput]:
        """Stream a request's tokens; the last output carries its finish_reason. Cached prefixes
        are shared only within one cache_namespace."""
        if self.dead is not None:
            raise EngineError(self._dead_output(request_id).error or "", "engine_dead", 503)
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
                self.core.add_request(request_id, prompt_ids, adapter, params, cache_namespace)
            except EngineError as error:
                out = TokenOutput(
                    request_id, None, "error", error=str(error), error_code=error.code
                )
                self._deliver(out)

        self._inbox.put(add)
        self._wake.set()
        if self.dead is not None:  # died after the check above: nobody will take the request
            self._deliver(self._dead_output(request_id))
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
        """A snapshot of the engine's queues and memory, with the open output streams."""
        return dataclasses.replace(self.core.stats(), open_streams=len(self._streams))
