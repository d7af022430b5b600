"""Iteration-level scheduling: which sequences run this step and how many tokens each processes.

Running sequences go first (decodes, then unfinished prefills), then waiting ones are admitted while
there is token budget, a free sequence seat, an adapter slot and KV room; an admitted sequence starts
from the longest cached prefix of its tokens (server/engine/prefix_cache.py). A waiting sequence whose
adapter is not in host memory yet is skipped (never waited on) while the registry loads it in the
background; one whose adapter was unloaded or failed to load is reported in the batch to be failed.
When the KV pool cannot grow a running sequence, the most recently admitted one is preempted: its
blocks are freed (its adapter slot stays pinned, so it resumes on the same weights) and it goes
back to the head of the queue to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from adapters.slots import SlotTable
from loader.config import Config
from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import BASE_IDENTITY, chain_root
from server.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of its uncomputed tokens to process) in packed order, and
    waiting sequences to fail because their adapter cannot be served: (sequence, reason, code)."""

    items: list[tuple[Sequence, int]]
    failed: list[tuple[Sequence, str, str]] = field(default_factory=list)


class Scheduler:
    """Holds the waiting queue and running set and builds each step's batch."""

    def __init__(
        self, config: Config, kv: KVCache, slots: SlotTable, registry: AdapterRegistry
    ) -> None:
        self.config = config
        self.kv = kv
        self.slots = slots
        self.registry = registry
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's tokens under the token budget, preempting when KV runs out."""
        budget = self.config.max_batch_tokens
        items: list[tuple[Sequence, int]] = []
        ordered = sorted(self.running, key=lambda s: (not s.is_decoding, s.arrival))
        for seq in ordered:
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = min(seq.remaining, budget)
            while not self.kv.can_allocate(seq, n):
                victim = self._newest_running(exclude=[s for s, _ in items])
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.kv.allocate(seq, n)
            items.append((seq, n))
            budget -= n
        failed = self._prefetch()
        self._admit(items, budget, {id(seq) for seq, _, _ in failed})
        return ScheduledBatch(items, failed)

    def _prefetch(self) -> list[tuple[Sequence, str, str]]:
        """Have the registry load the adapters waiting sequences need (queue order is priority);
        the waiting sequences whose adapter was unloaded (model_not_found) or failed to load
        (adapter_unavailable)."""
        wanted: dict[str, None] = {}
        for seq in self.waiting:
            if seq.adapter is not None and seq.slot < 0 and not self._on_device(seq.adapter):
                wanted.setdefault(seq.adapter)
        failures = self.registry.prefetch(list(wanted))
        codes = {
            name: "adapter_unavailable" if name in self.registry else "model_not_found"
            for name in failures
        }
        return [
            (s, failures[s.adapter], codes[s.adapter])
            for s in self.waiting
            if s.adapter in failures
        ]

    def _on_device(self, name: str) -> bool:
        entry = self.registry.get(name)
        return entry is not None and (name, entry.version) in self.slots.resident

    def _acquire_slot(self, name: str) -> int | None:
        """Pin the current version of an adapter in a device slot; None if it is not in host
        memory yet or every slot is pinned."""
        entry = self.registry.get(name)
        if entry is None:
            return None
        key = (name, entry.version)
        slot = self.slots.pin(key)
        if slot is None:
            weights = self.registry.weights(*key)
            slot = None if weights is None else self.slots.place(key, weights)
        return slot

    def _admit(self, items: list[tuple[Sequence, int]], budget: int, failing: set[int]) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            if id(seq) in failing:
                skipped.append(seq)
                continue
            acquired = seq.adapter is not None and seq.slot < 0
            if acquired:
                slot = self._acquire_slot(seq.adapter)
                if slot is None:  # cold, or every slot pinned: let others pass, retry next step
                    skipped.append(seq)
                    continue
                seq.slot = slot
            hits = self._cached_prefix(seq)
            n = min(seq.remaining - len(hits) * self.kv.block_size, budget)
            # keep a block of headroom per running sequence so admissions don't force preemptions
            if not self.kv.can_admit(seq, hits, n, reserve=len(self.running)):
                if acquired:
                    self.slots.release(seq.slot)
                    seq.slot = -1
                self.waiting.appendleft(seq)
                break
            self.kv.share(seq, hits)
            if seq.cached_tokens is None:
                seq.cached_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.kv.allocate(seq, n)
            items.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks seq can start from, under its adapter slot's weights and namespace
        (none when it asked for prompt logprobs: every prompt row must be computed)."""
        if self.kv.prefix is None or seq.params.prompt_logprobs is not None:
            return []
        if not seq.cache_root:
            identity = self.slots.digests[seq.slot] if seq.slot >= 0 else BASE_IDENTITY
            seq.cache_root = chain_root(identity, seq.cache_namespace)
        return self.kv.cached_prefix(seq)

    def _newest_running(self, exclude: list[Sequence]) -> Sequence:
        candidates = [s for s in self.running if s not in exclude]
        return max(candidates, key=lambda s: s.arrival)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's KV (it keeps its slot pin) and put it back at the head of the queue."""
        self.running.remove(seq)
        self.kv.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free everything it holds."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq)
        if seq.status is not Status.FINISHED and seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
        seq.status = Status.FINISHED
