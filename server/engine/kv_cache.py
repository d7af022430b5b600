"""The paged KV pool: fixed-capacity per-layer K/V tensors and a reference-counted block allocator
(blocks shared through the prefix cache are held by every sequence that reads them)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Layers

import torch

from loader.architecture import LayerAttention
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import Sequence

DROPPED = -1  # a block-table entry freed because no layer's window reaches it any more


class KVCache:
    """K/V storage for every attention layer, K as [num_blocks * block_size + 1, kv_heads, k_dim] and
    V with the layer's v_dim (layers may differ), plus free blocks; the last row belongs to no block
    (scratch_row: padding rows of a CUDA graph use it)."""

    def __init__(
        self,
        layers: Layers[LayerAttention],
        capacity_tokens: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
        prefix_caching: bool = False,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        self.scratch_row = self.num_blocks * block_size
        rows = self.scratch_row + 1

        def pool(heads: int, dim: int) -> torch.Tensor:
            return torch.zeros(rows, heads, dim, dtype=dtype, device=device)

        self.layers = tuple(layers)  # what each layer's attention computes (windows, softcaps)
        # when every layer slides: positions this far behind a sequence's next token are never read
        windows = [a.sliding_window or 0 for a in layers]
        self.horizon = max(windows) if windows and min(windows) > 0 else None
        self.k = [pool(a.kv_heads, a.k_dim) for a in layers]
        self.v = [pool(a.kv_heads, a.v_dim) for a in layers]
        self.free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # neither held nor cached
        self.refs = [0] * self.num_blocks  # sequences holding each block
        # trimmed blocks leave holes in a chain, so models whose layers all slide cache nothing
        self.prefix = PrefixCache(block_size) if prefix_caching and self.horizon is None else None

    @property
    def available(self) -> int:
        """Blocks a sequence can take: free ones and cached ones nobody holds."""
        return len(self.free) + (len(self.prefix.idle) if self.prefix else 0)

    @property
    def used_blocks(self) -> int:
        """Blocks currently held by sequences."""
        return self.num_blocks - self.available

    @property
    def cached_blocks(self) -> int:
        """Blocks in the prefix cache (held or not)."""
        return len(self.prefix.keys) if self.prefix else 0

    def blocks_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Extra blocks seq needs to hold new_tokens more tokens in the cache."""
        total = seq.num_computed + new_tokens
        return max(0, -(-total // self.block_size) - len(seq.blocks))

    def can_allocate(self, seq: Sequence, new_tokens: int, reserve: int = 0) -> bool:
        """Whether the pool can grow seq by new_tokens and still keep `reserve` blocks free."""
        return self.blocks_needed(seq, new_tokens) + reserve <= self.available

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence (holding no blocks) can start from."""
        return self.prefix.match(seq) if self.prefix else []

    def can_admit(self, seq: Sequence, hits: list[int], new_tokens: int, reserve: int) -> bool:
        """Whether a waiting sequence can take the cached blocks hits and then new_tokens more
        tokens, keeping `reserve` blocks available."""
        total = len(hits) * self.block_size + new_tokens
        idle = self.prefix.idle if self.prefix else {}
        taken_idle = sum(1 for b in hits if b in idle)  # parked hits stop being available
        return -(-total // self.block_size) - len(hits) + reserve <= self.available - taken_idle

    def share(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting sequence the cached blocks hits: their tokens count as computed."""
        for block in hits:
            if self.refs[block] == 0:
                self.prefix.unpark(block)
            self.refs[block] += 1
        seq.blocks = list(hits)
        seq.cached_blocks = len(hits)
        seq.num_computed = len(hits) * self.block_size
        if self.prefix is not None:
            self.prefix.record(seq, seq.num_computed)

    def allocate(self, seq: Sequence, new_tokens: int) -> None:
        """Grow seq's block table to hold new_tokens more tokens (caller checked can_allocate);
        cached blocks nobody holds are evicted, least recently used first, when none is free."""
        fresh = [
            self.free.pop() if self.free else self.prefix.evict()
            for _ in range(self.blocks_needed(seq, new_tokens))
        ]
        fresh.sort()  # ascending pool rows: attention gathers them in one forward sweep
        for block in fresh:
            self.refs[block] = 1
        seq.blocks.extend(fresh)

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on all its blocks (the last block first, so a chain's tail is evicted
        before its head)."""
        for block in reversed(seq.blocks):
            if block != DROPPED:
                self._drop(block)
        seq.blocks = []
        seq.cached_blocks = 0

    def _drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return
        if self.prefix is not None and self.prefix.holds(block):
            self.prefix.park(block)
        else:
            self.free.append(block)

    def invalidate(self, is_current: Callable[[tuple[str, int]], bool]) -> None:
        """Stop reusing blocks computed by adapter versions that are no longer current."""
        if self.prefix is not None:
            self.free.extend(self.prefix.invalidate(is_current))

    def longest_sequence(self, chunk: int) -> int | float:
        """The most tokens one sequence can hold: the pool, or no limit when every layer slides
        and the pool holds a window plus a prefill chunk of `chunk` tokens."""
        pool = self.num_blocks * self.block_size
        if (
            self.horizon is None
            or -(-(self.horizon + chunk) // self.block_size) + 1 > self.num_blocks
        ):
            return pool
        return float("inf")

    def trim(self, seq: Sequence) -> None:
        """Free seq's leading blocks that lie wholly outside every layer's window of its next token
        (models whose layers all slide); their table entries become DROPPED."""
        if self.horizon is None:
            return
        dead = (seq.num_computed - self.horizon + 1) // self.block_size  # blocks before the window
        # dropped blocks form a prefix: walk back from the newest dead block to the last one freed
        for i in range(min(dead, len(seq.blocks)) - 1, -1, -1):
            if seq.blocks[i] == DROPPED:
                break
            self._drop(seq.blocks[i])
            seq.blocks[i] = DROPPED

    def indices(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of seq's token positions [start, end); positions in dropped blocks read
        the scratch row (every layer's window masks them out).  -> [end - start] int64"""
        pos = torch.arange(start, end)
        block = torch.tensor(seq.blocks, dtype=torch.int64)[pos // self.block_size]
        rows = block * self.block_size + pos % self.block_size
        return torch.where(block == DROPPED, self.scratch_row, rows)
