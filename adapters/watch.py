"""The watched adapters folder: new, replaced and removed subfolders are picked up without a restart.

Rule against half-written folders: a subfolder is registered (or re-registered after a change) only
once it holds both adapter_config.json and adapter_model.safetensors and the sizes and mtimes of both
are unchanged across two consecutive polls. Names starting with "." are ignored, so
`cp -r x .tmp-x && mv .tmp-x x` adds an adapter atomically. At start-up the folder is taken as it is
(one scan, no wait); a truncated file fails validation there and is retried when it changes.
A folder is listed only after the same full checks as the load route (config, header, every value
finite, the budget): one that fails is logged and retried only when its files change. A registered folder
that disappears (or loses a file) is unregistered; requests already running keep their weights.
An adapter unloaded through the API stays unloaded until its folder changes.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from adapters.errors import AdapterError
from adapters.format import WEIGHTS_FILE
from adapters.names import validate_name
from adapters.peft_config import CONFIG_FILE
from adapters.registry import AdapterRegistry, Signature, folder_signature, resolve_adapter_folder

log = logging.getLogger("loraplex.adapters")


@dataclass
class ScanResult:
    """What one scan changed: names added, replaced, removed, and refused (name -> reason)."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class AdapterDirWatcher:
    """Polls one folder and keeps the registry in step with its adapter subfolders."""

    def __init__(
        self, root: str | Path, registry: AdapterRegistry, base_name: str, poll_s: float = 1.0
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.registry = registry
        self.base_name = base_name
        self.poll_s = poll_s
        self._previous: dict[str, Signature] = {}  # complete folders seen by the last poll
        self._applied: dict[str, Signature] = {}  # signature last registered or refused, per name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _folders(self) -> tuple[dict[str, Signature], list[str]]:
        """Signatures of the visible subfolders holding both adapter files, and the names of those
        that lack one."""
        found: dict[str, Signature] = {}
        incomplete: list[str] = []
        try:
            children = sorted(self.root.iterdir())
        except OSError as error:
            log.error("cannot list the adapters folder %s: %s", self.root, error)
            return found, incomplete
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue
            signature = folder_signature(child)
            if signature is None:
                incomplete.append(child.name)
            else:
                found[child.name] = signature
        return found, incomplete

    def scan(self, settle: bool = True) -> ScanResult:
        """One poll: register stable new or changed folders, unregister vanished ones.

        settle=False (start-up) takes complete folders at once instead of waiting for a second poll.
        """
        result = ScanResult()
        current, incomplete = self._folders()
        if not settle:
            for name in incomplete:
                result.skipped[name] = f"{CONFIG_FILE} or {WEIGHTS_FILE} is missing"
                log.error(
                    "adapter %s skipped: %s (picked up once complete)",
                    self.root / name,
                    result.skipped[name],
                )
        stable = {
            name: sig
            for name, sig in current.items()
            if not settle or self._previous.get(name) == sig
        }
        self._previous = current
        for name in sorted(stable):
            signature = stable[name]
            if self._applied.get(name) == signature:
                continue
            self._applied[name] = signature
            self._register(name, signature, result)
        for name in [n for n in self._applied if n not in current]:
            del self._applied[name]
            entry = self.registry.get(name)
            if entry is not None and entry.source == "dir":
                self.registry.unregister(name)
                result.removed.append(name)
                log.info("adapter %s removed (its folder is gone)", name)
        return result

    def _register(self, name: str, signature: Signature, result: ScanResult) -> None:
        folder = self.root / name
        known = self.registry.get(name) is not None
        try:
            validate_name(name, self.base_name)
            real = resolve_adapter_folder(folder, [self.root])
            self.registry.register(name, str(real), source="dir", signature=signature, full=True)
        except (AdapterError, OSError) as error:
            result.skipped[name] = str(error)
            log.error("adapter %s skipped: %s", folder, error)
            return
        (result.replaced if known else result.added).append(name)
        log.info("adapter %s %s from %s", name, "reloaded" if known else "added", real)

    def start(self) -> None:
        """Poll every poll_s seconds in a daemon thread."""
        self._thread = threading.Thread(
            target=self._run, name="loraplex-adapter-watch", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("scanning %s failed", self.root)

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
