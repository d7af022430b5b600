"""Device slots for adapters: which adapter sits in which slot of every multi-LoRA layer.

Known adapters are held in host memory; a slot is written when a sequence needs it. Slots are reused
least-recently-used first, and a slot pinned by a running sequence is never evicted. Replacing or
removing an adapter detaches its slot: sequences already pinned to it keep the old weights to their
end, and the slot is cleared when the last one releases it.
"""

from __future__ import annotations

from collections import OrderedDict

from adapters.errors import AdapterError
from adapters.format import AdapterWeights
from adapters.layer import MultiLoraLinear


class SlotTable:
    """Maps adapter names to device slots over a set of wrapped layers."""

    def __init__(self, layers: dict[str, MultiLoraLinear], num_slots: int) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.host: dict[str, AdapterWeights] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # current versions, LRU first
        self.detached: set[int] = set()  # slots of old versions still pinned
        self.pins = [0] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))

    @property
    def max_rank(self) -> int:
        """The rank capacity of a slot."""
        return next(iter(self.layers.values())).max_rank

    def add(self, weights: AdapterWeights) -> None:
        """Register (or replace) an adapter's host copy; a replaced one is rewritten on next use."""
        unknown = set(weights.modules) - set(self.layers)
        if unknown:
            raise AdapterError(
                f"adapter {weights.name!r} targets modules the base lacks: {sorted(unknown)[:3]}",
                "unknown_target_modules",
            )
        if weights.rank > self.max_rank:
            raise AdapterError(
                f"adapter {weights.name!r} has rank {weights.rank}, above the server's limit "
                f"{self.max_rank} (--max-lora-rank)",
                "rank_too_large",
            )
        self.host[weights.name] = weights
        self._detach(weights.name)

    def remove(self, name: str) -> None:
        """Forget an adapter; running sequences pinned to it finish on their slot."""
        self.host.pop(name, None)
        self._detach(name)

    def acquire(self, name: str) -> int | None:
        """Pin name's slot, writing it into a free or LRU slot if needed; None if all are pinned."""
        slot = self.resident.get(name)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            weights = self.host[name]
            for path, layer in self.layers.items():
                layer.set_slot(slot, weights.modules.get(path))
            self.resident[name] = slot
        self.resident.move_to_end(name)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot; a detached slot is cleared once nobody uses it."""
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and slot in self.detached:
            self.detached.remove(slot)
            self._clear(slot)

    def _detach(self, name: str) -> None:
        slot = self.resident.pop(name, None)
        if slot is None:
            return
        if self.pins[slot]:
            self.detached.add(slot)
        else:
            self._clear(slot)

    def _take_slot(self) -> int | None:
        if not self.free:
            victim = next((n for n, s in self.resident.items() if not self.pins[s]), None)
            if victim is None:
                return None
            self._clear(self.resident.pop(victim))
        return self.free.pop()

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.set_slot(slot, None)
        self.free.append(slot)
