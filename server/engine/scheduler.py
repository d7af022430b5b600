"""Iteration-level scheduling: which sequences run this step and how many tokens each processes.

Running sequences go first (decodes, then unfinished prefills), then waiting ones are admitted while
there is token budget, a free sequence seat, an adapter slot and KV room. When the KV pool cannot
grow a running sequence, the most recently admitted one is preempted: its blocks are freed and it
goes back to the head of the queue to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from adapters.slots import SlotTable
from server.config import Config
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of its uncomputed tokens to process) in packed order."""

    items: list[tuple[Sequence, int]]


class Scheduler:
    """Holds the waiting queue and running set and builds each step's batch."""

    def __init__(self, config: Config, kv: KVCache, slots: SlotTable) -> None:
        self.config = config
        self.kv = kv
        self.slots = slots
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
        self._admit(items, budget)
        return ScheduledBatch(items)

    def _admit(self, items: list[tuple[Sequence, int]], budget: int) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            n = min(seq.remaining, budget)
            # keep a block of headroom per running sequence so admissions don't force preemptions
            if not self.kv.can_allocate(seq, n, reserve=len(self.running)):
                self.waiting.appendleft(seq)
                break
            if seq.adapter is not None:
                slot = self.slots.acquire(seq.adapter)
                if slot is None:  # every slot pinned: let others pass, retry next step
                    skipped.append(seq)
                    continue
                seq.slot = slot
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.kv.allocate(seq, n)
            items.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _newest_running(self, exclude: list[Sequence]) -> Sequence:
        candidates = [s for s in self.running if s not in exclude]
        return max(candidates, key=lambda s: s.arrival)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's KV and slot and put it back at the head of the queue for recomputation."""
        self._release(seq)
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
            self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq)
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
