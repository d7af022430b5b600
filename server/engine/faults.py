"""Test-only fault injection for the engine loop, off unless LORAPLEX_FAULT_INJECTION is set in the
server's environment (never reachable from a request).

The variable holds comma-separated `KIND@STEP` entries, each firing once when the engine is about to
run step STEP (`EngineCore.steps`):
- `step@N`: an exception escapes that step (the requests in the engine fail, the loop goes on);
- `device@N`: the device is lost: step N and every later one raise, the known-good request the
  engine runs after a failed step as well (the engine is marked dead);
- `loop@N`: the step loop itself dies (the engine is marked dead).
"""

from __future__ import annotations

import os

ENV = "LORAPLEX_FAULT_INJECTION"
KINDS = ("step", "device", "loop")


class InjectedFault(RuntimeError):
    """An exception escaping an engine step, raised on purpose."""


class InjectedLoopDeath(BaseException):
    """The engine loop dying, raised on purpose (a BaseException: no step handler catches it)."""


class Faults:
    """The faults still to fire, by step number."""

    def __init__(self, spec: str = "") -> None:
        self.pending: dict[int, str] = {}
        self.device_lost_at: int | None = None
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            kind, _, step = entry.partition("@")
            if kind not in KINDS or not step.isdigit():
                raise ValueError(f"{ENV}: expected KIND@STEP with KIND in {KINDS}, got {entry!r}")
            if kind == "device":
                self.device_lost_at = int(step)
            else:
                self.pending[int(step)] = kind

    @classmethod
    def from_env(cls) -> Faults:
        """The faults named in the environment (none unless the variable is set)."""
        return cls(os.environ.get(ENV, ""))

    def before_step(self, step: int) -> None:
        """Raise the fault planned for this step (once), or the lost device's (from then on)."""
        if self.device_lost_at is not None and step >= self.device_lost_at:
            raise InjectedFault(f"injected device loss from step {self.device_lost_at}")
        kind = self.pending.pop(step, None)
        if kind == "step":
            raise InjectedFault(f"injected fault before step {step}")
        if kind == "loop":
            raise InjectedLoopDeath(f"injected loop death before step {step}")
