"""The adapter registry: every servable adapter by name, a bounded host-memory cache, background loads.

Tiers: disk (every registered adapter: its folder, file signature and version), host memory (fully
validated float32 weights of at most `max_host` adapters, least recently used evicted first, never
one that a waiting request needs) and device slots (adapters/slots.py, owned by the engine thread).
A cold adapter is read and validated on one background loader thread, so the engine's step loop
never waits on disk; concurrent requests for the same adapter share one load. Every registration
gets a new version, so a replaced adapter never serves a stale host copy or device slot.
Thread-safe: one lock guards the catalog, the cache and the in-flight loads.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError
from adapters.format import WEIGHTS_FILE, AdapterWeights
from adapters.names import resolve_inside
from adapters.peft_config import CONFIG_FILE, MANIFEST_FILE

log = logging.getLogger("loraplex.adapters")

Signature = tuple[tuple[int, int], ...]  # (size, mtime_ns) of the config and the weights file
Reader = Callable[[str, str, bool], AdapterWeights]  # (name, folder, header_only) -> weights


def folder_signature(folder: Path) -> Signature | None:
    """(size, mtime_ns) of an adapter folder's config and weights files; None while one is missing."""
    signature = []
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            stat = (folder / file).stat()
        except OSError:
            return None
        signature.append((stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def resolve_adapter_folder(path: str | Path, roots: list[Path]) -> Path:
    """The real adapter folder, if it and every adapter file in it resolve inside one of the roots
    (a relative path is taken from the first root)."""
    if roots and not Path(path).is_absolute():
        path = roots[0] / path
    folder = resolve_inside(path, roots)
    for file in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        if (folder / file).is_symlink():
            resolve_inside(folder / file, roots)
    return folder


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter: real folder, file signature, version, rank and float32 weight bytes."""

    name: str
    path: str
    signature: Signature | None
    version: int
    rank: int
    nbytes: int
    source: str  # "dir" (the watched folder), "api" (the load route) or "engine" (in-process)


class AdapterRegistry:
    """Every known adapter (disk), an LRU host cache of validated weights, and the loader thread."""

    def __init__(
        self, read: Reader, max_host: int, on_loaded: Callable[[], None] | None = None
    ) -> None:
        self._read = read
        self.max_host = max_host
        self.on_loaded = on_loaded  # called after each background load (from the loader thread)
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # current versions, LRU first
        self._inflight: set[tuple[str, int]] = set()
        self._failures: dict[str, tuple[int, str]] = {}  # name -> (version, message)
        self._protected: frozenset[str] = frozenset()
        self._versions = itertools.count(1)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-adapter-loader")
        self.loads = 0  # disk reads finished by the loader
        self.changes = 0  # registrations and removals so far

    # catalog --------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        path: str,
        weights: AdapterWeights | None = None,
        source: str = "api",
        signature: Signature | None = None,
        full: bool = False,
    ) -> AdapterEntry:
        """Add or replace an adapter. Without weights it is read from path: fully with full (every
        check, values included, and the weights enter the host cache), else only its header (the
        values are checked on first use); given fully read weights enter the host cache."""
        if weights is None and full:
            weights = self._read(name, path, False)
        summary = self._read(name, path, True) if weights is None else weights
        if signature is None:
            signature = folder_signature(Path(path))
        with self._lock:
            entry = AdapterEntry(
                name, path, signature, next(self._versions), summary.rank, summary.nbytes, source
            )
            self._entries[name] = entry
            self._host.pop(name, None)
            self._failures.pop(name, None)
            if weights is not None:
                self._host[name] = weights
                self._evict()
            self.changes += 1
        return entry

    def unregister(self, name: str) -> AdapterEntry | None:
        """Forget an adapter (its host copy too); the removed entry, or None if it was unknown."""
        with self._lock:
            entry = self._entries.pop(name, None)
            self._host.pop(name, None)
            self._failures.pop(name, None)
            self.changes += 1
        return entry

    def get(self, name: str) -> AdapterEntry | None:
        """The current entry of name, or None."""
        with self._lock:
            return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Every registered adapter name, sorted."""
        with self._lock:
            return sorted(self._entries)

    def is_current(self, key: tuple[str, int]) -> bool:
        """Whether (name, version) is the adapter's current registration."""
        entry = self._entries.get(key[0])
        return entry is not None and entry.version == key[1]

    # host cache -----------------------------------------------------------------------------
    def weights(self, name: str, version: int) -> AdapterWeights | None:
        """The host copy of this version (marked recently used), or None if it is not in memory."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.version != version or name not in self._host:
                return None
            self._host.move_to_end(name)
            return self._host[name]

    def prefetch(self, wanted: list[str]) -> dict[str, str]:
        """Protect the host copies of wanted adapters (in priority order) and start background loads
        for the cold ones while the cache has room. Returns {name: reason} for wanted adapters that
        can no longer be served (unregistered, or their load failed); each failure is reported once."""
        failed: dict[str, str] = {}
        with self._lock:
            self._protected = frozenset(wanted)
            in_host = sum(1 for name in wanted if name in self._host)
            room = self.max_host - len(self._inflight) - in_host
            for name in wanted:
                entry = self._entries.get(name)
                if entry is None:
                    failed[name] = f"adapter {name!r} was unloaded before the request started"
                    continue
                failure = self._failures.pop(name, None)
                if failure is not None and failure[0] == entry.version:
                    failed[name] = failure[1]
                    continue
                if name in self._host or (name, entry.version) in self._inflight or room <= 0:
                    continue
                room -= 1
                self._inflight.add((name, entry.version))
                self._loader.submit(self._load, entry)
        return failed

    def _load(self, entry: AdapterEntry) -> None:
        error = None
        try:
            weights = self._read(entry.name, entry.path, False)
        except AdapterError as failure:
            error = f"adapter {entry.name!r} could not be loaded: {failure}"
        except Exception as failure:  # noqa: BLE001 - reported to the waiting requests
            log.exception("loading adapter %s from %s failed", entry.name, entry.path)
            error = f"adapter {entry.name!r} could not be loaded: {failure!r}"
        with self._lock:
            self._inflight.discard((entry.name, entry.version))
            self.loads += 1
            if self.is_current((entry.name, entry.version)):
                if error is not None:
                    self._failures[entry.name] = (entry.version, error)
                else:
                    self._host[entry.name] = weights
                    self._evict()
        if error is not None:
            log.error("%s", error)
        if self.on_loaded is not None:
            self.on_loaded()

    def _evict(self) -> None:
        """Drop least recently used host copies nobody waits for until the cache fits max_host."""
        while len(self._host) > self.max_host:
            victim = next((n for n in self._host if n not in self._protected), None)
            if victim is None:
                return
            del self._host[victim]

    # reporting ------------------------------------------------------------------------------
    def info(self, on_device: frozenset[str] = frozenset()) -> dict[str, dict]:
        """Per adapter: path, rank, float32 weight bytes and tier ("device", "host" or "disk")."""
        with self._lock:
            return {
                name: {
                    "path": e.path,
                    "rank": e.rank,
                    "bytes": e.nbytes,
                    "tier": "device"
                    if name in on_device
                    else "host"
                    if name in self._host
                    else "disk",
                    "resident": name in on_device,
                }
                for name, e in sorted(self._entries.items())
            }

    def host_usage(self) -> tuple[int, int]:
        """(adapters, bytes) held in the host cache."""
        with self._lock:
            return len(self._host), sum(w.nbytes for w in self._host.values())

    def close(self) -> None:
        """Stop the loader thread (queued loads are dropped)."""
        self._loader.shutdown(wait=False, cancel_futures=True)
