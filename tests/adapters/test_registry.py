"""The adapter registry and the folder watcher: host cache, deduplicated background loads,
replacement versions, the half-written-folder rule. Fast: a fake reader instead of the model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from adapters.errors import AdapterError
from adapters.format import WEIGHTS_FILE, AdapterWeights, LoraModule
from adapters.peft_config import CONFIG_FILE
from adapters.registry import AdapterRegistry
from adapters.watch import AdapterDirWatcher


class FakeReader:
    """Reads nothing: returns a tiny rank-2 adapter, counts full reads, can be held or made to fail."""

    def __init__(self) -> None:
        self.full_reads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, name: str, path: str, header_only: bool) -> AdapterWeights:
        if not header_only:
            self.gate.wait(10)
            self.full_reads.append(name)
            if name in self.fail:
                raise AdapterError("corrupt or truncated adapter_model.safetensors", "corrupt")
        module = LoraModule(torch.zeros(2, 4), torch.zeros(4, 2), 1.0)
        return AdapterWeights(name, path, {"m": module})


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def reader() -> FakeReader:
    return FakeReader()


@pytest.fixture
def registry(reader: FakeReader):
    reg = AdapterRegistry(reader, max_host=3)
    yield reg
    reg.close()


def test_concurrent_requests_for_a_cold_adapter_cause_one_load(registry, reader):
    entry = registry.register("a", "/x/a")
    assert registry.weights("a", entry.version) is None  # registered on disk, not in memory
    reader.gate.clear()
    for _ in range(5):  # five engine steps with several waiting requests each
        assert registry.prefetch(["a", "a"]) == {}
    reader.gate.set()
    wait_for(lambda: registry.weights("a", entry.version) is not None)
    registry.prefetch(["a"])
    assert reader.full_reads == ["a"] and registry.loads == 1
    assert registry.info()["a"]["tier"] == "host"


def test_host_cache_is_lru_bounded_and_spares_wanted_adapters(registry, reader):
    versions = {n: registry.register(n, f"/x/{n}").version for n in "abcde"}
    registry.prefetch(["a", "b", "c"])
    wait_for(lambda: registry.host_usage()[0] == 3)
    registry.weights("a", versions["a"])  # a becomes most recently used; b is now the LRU
    registry.prefetch(["c", "d"])  # a and b are no longer wanted
    wait_for(lambda: registry.weights("d", versions["d"]) is not None)
    assert registry.weights("b", versions["b"]) is None  # evicted, not a or c
    assert registry.weights("a", versions["a"]) is not None
    assert registry.host_usage() == (3, 3 * 2 * 4 * 2 * 4)
    # four wanted adapters, room for three: the fourth waits until one leaves the wanted set
    assert registry.prefetch(["a", "c", "d", "e"]) == {}
    time.sleep(0.1)
    assert "e" not in reader.full_reads
    registry.prefetch(["e"])
    wait_for(lambda: registry.weights("e", versions["e"]) is not None)


def test_replacement_never_serves_the_stale_version(registry, reader):
    old = registry.register("a", "/x/a")
    reader.gate.clear()
    registry.prefetch(["a"])  # the load of the old version is in flight ...
    new = registry.register("a", "/x/a-v2")  # ... when the adapter is replaced
    assert new.version > old.version and not registry.is_current(("a", old.version))
    reader.gate.set()
    wait_for(lambda: registry.loads == 1)
    assert registry.weights("a", new.version) is None  # the old read was discarded
    registry.prefetch(["a"])
    wait_for(lambda: registry.weights("a", new.version) is not None)
    assert registry.weights("a", new.version).path == "/x/a-v2"


def test_load_failure_is_reported_once_then_retried(registry, reader):
    registry.register("bad", "/x/bad")
    reader.fail.add("bad")
    assert registry.prefetch(["bad"]) == {}
    wait_for(lambda: registry.loads == 1)
    failed = registry.prefetch(["bad"])
    assert "could not be loaded" in failed["bad"] and "corrupt" in failed["bad"]
    assert registry.prefetch(["bad"]) == {}  # a later request tries again
    wait_for(lambda: registry.loads == 2)
    registry.unregister("bad")
    assert "unloaded" in registry.prefetch(["bad"])["bad"]


def write_adapter(folder: Path, config: bool = True, weights: bytes | None = b"w1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / CONFIG_FILE).write_text("{}")
    if weights is not None:
        (folder / WEIGHTS_FILE).write_bytes(weights)


def test_watcher_picks_up_only_complete_stable_folders(tmp_path, registry):
    root = tmp_path / "adapters"
    write_adapter(root / "ready")
    write_adapter(root / "half", weights=None)
    write_adapter(root / ".tmp-copy")
    write_adapter(root / "bad name!")
    watcher = AdapterDirWatcher(root, registry, base_name="base", poll_s=0.05)
    first = watcher.scan(settle=False)  # start-up: complete folders at once
    assert first.added == ["ready"] and set(first.skipped) == {"half", "bad name!"}
    write_adapter(root / "half")  # the missing file arrives ...
    assert watcher.scan().added == []  # ... and must look the same on the next poll
    assert watcher.scan().added == ["half"]
    assert registry.names() == ["half", "ready"]

    version = registry.get("ready").version
    (root / "ready" / WEIGHTS_FILE).write_bytes(b"w2-longer")  # replaced in place
    assert watcher.scan().replaced == []
    assert watcher.scan().replaced == ["ready"] and registry.get("ready").version > version
    assert watcher.scan().replaced == []  # unchanged since: nothing to do

    (root / ".tmp-copy").rename(root / "renamed")  # the atomic way: copy under a dot name, rename
    watcher.scan()
    assert watcher.scan().added == ["renamed"]

    registry.unregister("half")  # unloaded through the API: stays unloaded while unchanged
    watcher.scan()
    assert "half" not in registry.names()

    (root / "ready" / WEIGHTS_FILE).unlink()
    assert watcher.scan().removed == ["ready"] and "ready" not in registry.names()


def test_watcher_refuses_symlink_escapes(tmp_path, registry):
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    write_adapter(outside / "evil")
    root.mkdir()
    (root / "linked").symlink_to(outside / "evil")
    write_adapter(root / "sneaky", weights=None)
    (root / "sneaky" / WEIGHTS_FILE).symlink_to(outside / "evil" / WEIGHTS_FILE)
    result = AdapterDirWatcher(root, registry, "base").scan(settle=False)
    assert result.added == [] and registry.names() == []
    assert all("outside the allowed adapter folders" in r for r in result.skipped.values())
