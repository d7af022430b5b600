"""Device slots for adapters within a byte budget: which adapter version sits in which slot of every
multi-LoRA layer (wrapped linears and fused-expert parameters alike).

Each adapter is held at its own rank (adapters/lora_ops.py), so it takes device bytes in proportion
to its rank and target layers; admission counts those bytes against the budget (`--adapter-memory`)
and a slot is only an index. A slot holds one adapter version, keyed (name, version). Adapters are
evicted least-recently-used first until a new one fits, and one pinned by a sequence is never
evicted. When a version stops being current (the adapter was replaced or removed) its slot is
detached: sequences already pinned to it keep those weights to their end, and the slot is freed when
the last one releases it. Used from the engine thread only; `resident_names` is a snapshot other
threads may read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from adapters.errors import AdapterError
from adapters.experts import ExpertLoraStack
from adapters.format import AdapterWeights
from adapters.layer import MultiLoraLinear

SlotKey = tuple[str, int]  # (adapter name, registry version)


def device_bytes(weights: AdapterWeights, dtype: torch.dtype) -> int:
    """Bytes an adapter takes on the device in dtype: its A and B at their own ranks."""
    return sum(m.A.numel() + m.B.numel() for m in weights.modules.values()) * dtype.itemsize


class SlotTable:
    """Maps adapter versions to slots over a set of wrapped layers, within a byte budget."""

    def __init__(
        self,
        layers: dict[str, MultiLoraLinear | ExpertLoraStack],
        num_slots: int,
        budget_bytes: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        self.layers = layers
        self.num_slots = num_slots
        self.budget_bytes = budget_bytes
        self.max_rank = max_rank
        self.dtype = dtype
        self.resident: OrderedDict[SlotKey, int] = OrderedDict()  # current versions, LRU first
        self.detached: set[int] = set()  # slots of old versions still pinned
        self.pins = [0] * num_slots
        self.slot_bytes = [0] * num_slots  # device bytes of the weights each slot holds
        self.keys: list[SlotKey | None] = [None] * num_slots  # the version each slot holds
        self.digests = [""] * num_slots  # digest of the weights each slot holds
        self.free = list(range(num_slots - 1, -1, -1))
        self.resident_names: frozenset[str] = frozenset()
        self.resident_bytes: dict[str, int] = {}  # snapshot: device bytes per resident adapter
        self.placements = 0

    @property
    def used_bytes(self) -> int:
        """Device bytes of the adapters held (current and detached)."""
        return sum(self.slot_bytes)

    def check(self, weights: AdapterWeights) -> int:
        """The device bytes weights take; AdapterError if they can never be held (unknown modules,
        rank above the limit, more bytes than the whole budget)."""
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
        need = device_bytes(weights, self.dtype)
        if need > self.budget_bytes:
            raise AdapterError(
                f"adapter {weights.name!r} needs {need} bytes of device memory, more than the "
                f"whole adapter budget of {self.budget_bytes} bytes (--adapter-memory)",
                "adapter_too_large",
            )
        return need

    def pin(self, key: SlotKey) -> int | None:
        """Pin key's slot if it is resident; None otherwise."""
        slot = self.resident.get(key)
        if slot is None:
            return None
        self.resident.move_to_end(key)
        self.pins[slot] += 1
        return slot

    def place(self, key: SlotKey, weights: AdapterWeights) -> int | None:
        """Pin key's slot, writing weights into a slot once their bytes fit the budget (evicting
        least recently used unpinned adapters); None while pinned adapters fill it."""
        slot = self.pin(key)
        if slot is not None:
            return slot
        need = self.check(weights)
        while not self.free or self.used_bytes + need > self.budget_bytes:
            victim = next((k for k, s in self.resident.items() if not self.pins[s]), None)
            if victim is None:
                return None
            self._clear(self.resident.pop(victim))
        slot = self.free.pop()
        for path, module in weights.modules.items():
            self.layers[path].set_slot(slot, module)
        self.slot_bytes[slot] = need
        self.keys[slot] = key
        self.digests[slot] = weights.digest
        self.placements += 1
        self.resident[key] = slot
        self._snapshot()
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot; a detached slot is freed once nobody uses it."""
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

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if slot in layer.active:
                layer.set_slot(slot, None)
        self.slot_bytes[slot] = 0
        self.keys[slot] = None
        self.digests[slot] = ""
        self.free.append(slot)
        self._snapshot()

    def _snapshot(self) -> None:
        self.resident_names = frozenset(name for name, _ in self.resident)
        self.resident_bytes = {name: self.slot_bytes[s] for (name, _), s in self.resident.items()}
