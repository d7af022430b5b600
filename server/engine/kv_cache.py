"""The paged KV pool: fixed-capacity per-layer K/V tensors and a block allocator."""

from __future__ import annotations

from collections.abc import Sequence as Layers

import torch

from loader.architecture import LayerAttention
from server.engine.sequence import Sequence


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
        self.free.extend(reversed(seq.blocks))
        seq.blocks = []

    def indices(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of seq's token positions [start, end).  -> [end - start] int64"""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.blocks, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
