"""The paged KV pool: fixed-capacity per-layer K/V tensors and a block allocator."""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence


class KVCache:
    """K/V storage for every layer as [num_blocks * block_size + 1, kv_heads, head_dim] plus free
    blocks; the last row belongs to no block (scratch_row: padding rows of a CUDA graph use it)."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        self.scratch_row = self.num_blocks * block_size
        size = (self.scratch_row + 1, kv_heads, head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(num_layers)]
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
        self.free.extend(reversed(seq.blocks))
        seq.blocks = []

    def indices(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of seq's token positions [start, end).  -> [end - start] int64"""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.blocks, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
