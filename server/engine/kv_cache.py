"""The paged KV pool: fixed-capacity per-layer K/V tensors and a block allocator."""

from __future__ import annotations

from collections.abc import Sequence as Layers

import torch

from loader.architecture import LayerAttention
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
        self.free: list[int] = list(range(self.num_blocks - 1, -1, -1))

    @property
    def used_blocks(self) -> int:
        """Blocks currently held by sequences."""
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Extra blocks seq needs to hold new_tokens more tokens in the cache."""
        total = seq.num_computed + new_tokens
        return max(0, -(-total // self.block_size) - len(seq.blocks))

    def can_allocate(self, seq: Sequence, new_tokens: int, reserve: int = 0) -> bool:
        """Whether the pool can grow seq by new_tokens and still keep `reserve` blocks free."""
        return self.blocks_needed(seq, new_tokens) + reserve <= len(self.free)

    def allocate(self, seq: Sequence, new_tokens: int) -> None:
        """Grow seq's block table to hold new_tokens more tokens (caller checked can_allocate)."""
        for _ in range(self.blocks_needed(seq, new_tokens)):
            seq.blocks.append(self.free.pop())

    def release(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool."""
        self.free.extend(b for b in reversed(seq.blocks) if b != DROPPED)
        seq.blocks = []

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
            self.free.append(seq.blocks[i])
            seq.blocks[i] = DROPPED

    def indices(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of seq's token positions [start, end); positions in dropped blocks read
        the scratch row (every layer's window masks them out).  -> [end - start] int64"""
        pos = torch.arange(start, end)
        block = torch.tensor(seq.blocks, dtype=torch.int64)[pos // self.block_size]
        rows = block * self.block_size + pos % self.block_size
        return torch.where(block == DROPPED, self.scratch_row, rows)
