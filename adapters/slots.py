"""Device slots for adapters: which adapter version sits in which slot of every multi-LoRA layer
(wrapped linears and fused-expert parameters alike).

A slot holds one adapter version, keyed (name, version). Slots are reused least-recently-used first
and a slot pinned by a sequence is never evicted. When a version stops being current (the adapter
was replaced or removed) its slot is detached: sequences already pinned to it keep those weights to
their end, and the slot is cleared when the last one releases it. Used from the engine thread only;
`resident_names` is a snapshot other threads may read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from adapters.errors import AdapterError
from adapters.experts import ExpertLoraStack
from adapters.format import AdapterWeights
from adapters.layer import MultiLoraLinear

SlotKey = tuple[str, int]  # (adapter name, registry version)


class SlotTable:
    """Maps adapter versions to device slots over a set of wrapped layers."""

    def __init__(
        self, layers: dict[str, MultiLoraLinear | ExpertLoraStack], num_slots: int
    ) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.resident: OrderedDict[SlotKey, int] = OrderedDict()  # current versions, LRU first
        self.detached: set[int] = set()  # slots of old versions still pinned
        self.pins = [0] * num_slots
        self.slot_bytes = [0] * num_slots  # bytes of real (unpadded) weights in each slot
        self.keys: list[SlotKey | None] = [None] * num_slots  # the version each slot holds
        self.digests = [""] * num_slots  # digest of the weights each slot holds
        self.free = list(range(num_slots - 1, -1, -1))
        self.resident_names: frozenset[str] = frozenset()
        self.placements = 0

    @property
    def max_rank(self) -> int:
        """The rank capacity of a slot."""
        return next(iter(self.layers.values())).max_rank

    @property
    def capacity_bytes(self) -> int:
        """Bytes allocated for all slots of all layers (A and B stacks)."""
        return sum(layer.capacity_bytes for layer in self.layers.values())

    @property
    def used_bytes(self) -> int:
        """Bytes of the adapter weights held in slots (current and detached), rank padding excluded."""
        return sum(self.slot_bytes)

    def check(self, weights: AdapterWeights) -> None:
        """Raise AdapterError if weights cannot sit in a slot (unknown modules, rank too large)."""
        unknown = set(weights.modules) - set(self.layers)
        if unknown:
            raise AdapterError(
                f"adapter {weights.name!r} targets modules the base lacks: {sorted(unknown)[:3]}",
                "unknown_target_module",
            )
        if weights.rank > self.max_rank:
            raise AdapterError(
                f"adapter {weights.name!r} has rank {weights.rank}, above the server's limit "
                f"{self.max_rank} (--max-lora-rank)",
                "rank_too_large",
            )

    def pin(self, key: SlotKey) -> int | None:
        """Pin key's slot if it is resident; None otherwise."""
        slot = self.resident.get(key)
        if slot is None:
            return None
        self.resident.move_to_end(key)
        self.pins[slot] += 1
        return slot

    def place(self, key: SlotKey, weights: AdapterWeights) -> int | None:
        """Pin key's slot, writing weights into a free or LRU slot if needed; None if all are pinned."""
        slot = self.pin(key)
        if slot is not None:
            return slot
        self.check(weights)
        slot = self._take_slot()
        if slot is None:
            return None
        for path, layer in self.layers.items():
            module = weights.modules.get(path)
            if module is not None or slot in layer.active:  # an inactive slot is already zero
                layer.set_slot(slot, module)
        self.slot_bytes[slot] = weights.nbytes
        self.keys[slot] = key
        self.digests[slot] = weights.digest
        self.placements += 1
        self.resident[key] = slot
        self._snapshot()
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot; a detached slot is cleared once nobody uses it."""
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and slot in self.detached:
            self.detached.remove(slot)
            self._clear(slot)

    def retain(self, is_current: Callable[[SlotKey], bool]) -> None:
        """Detach every resident version that is no longer current (replaced or removed)."""
        for key in [k for k in self.resident if not is_current(k)]:
            slot = self.resident.pop(key)
            if self.pins[slot]:
                self.detached.add(slot)
            else:
                self._clear(slot)
        self._snapshot()

    def _take_slot(self) -> int | None:
        """A free slot, else the least recently used unpinned one (overwritten by place)."""
        if self.free:
            return self.free.pop()
        victim = next((k for k, s in self.resident.items() if not self.pins[s]), None)
        return None if victim is None else self.resident.pop(victim)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if slot in layer.active:
                layer.set_slot(slot, None)
        self.slot_bytes[slot] = 0
        self.keys[slot] = None
        self.digests[slot] = ""
        self.free.append(slot)

    def _snapshot(self) -> None:
        self.resident_names = frozenset(name for name, _ in self.resident)
