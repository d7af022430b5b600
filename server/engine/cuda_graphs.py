"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, context bucket, LoRA on/off).

A decode-only step of n sequences is padded to the next batch bucket and its longest context to the
next context bucket; every input the forward reads (token ids, positions, KV write rows, the KV rows
each token attends and their mask, adapter slots) lives in a static buffer that the step overwrites
before the replay. Padding rows write and read the KV pool's scratch row and use no adapter. Graphs
are captured on first use, after one eager warm-up run of the same inputs (which compiles the Triton
kernels and writes the same K/V the replay writes again), and share one memory pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from adapters.layer import StepRouting
from server.engine.attention import AttnBatch, decode_table
from server.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from server.engine.runner import PackedStep

MIN_CONTEXT = 64  # smallest context bucket (keys per decode token)


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


class DecodeGraphs:
    """Captured decode forwards (model and its head) over static input buffers."""

    def __init__(
        self,
        model: PreTrainedModel,
        kv: KVCache,
        routing: StepRouting,
        max_batch: int,
        max_context: int,
    ) -> None:
        self.model, self.kv, self.routing = model, kv, routing
        self.max_batch = bucket(max_batch)
        self.max_context = bucket(max_context, MIN_CONTEXT)
        device = kv.k[0].device
        B, L, scratch = self.max_batch, self.max_context, kv.scratch_row
        self.ids = torch.zeros(1, B, dtype=torch.int64, device=device)  # [1, B]
        self.positions = torch.zeros(1, B, dtype=torch.int64, device=device)  # [1, B]
        self.slot_mapping = torch.full((B,), scratch, dtype=torch.int64, device=device)  # [B]
        self.rows = torch.arange(B, device=device)  # [B] decode rows: all of them
        self.kv_index = torch.full((B, L), scratch, dtype=torch.int64, device=device)  # [B, L]
        self.mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=device)  # [B, 1, 1, L]
        self.lora = torch.full((B,), -1, dtype=torch.int64, device=device)  # [B] slot per row
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def fits(self, step: PackedStep) -> bool:
        """Whether a decode-only step fits the largest batch and context buckets."""
        longest = max(len(rows) for rows in step.decode_index)
        return len(step.ids) <= self.max_batch and longest <= self.max_context

    def run(self, step: PackedStep) -> torch.Tensor:
        """Logits [n, V] float32 of a decode-only step, from its graph (captured if new)."""
        n = len(step.ids)
        b = bucket(n)
        L = bucket(max(len(rows) for rows in step.decode_index), MIN_CONTEXT)
        lora = any(s >= 0 for s in step.slots)
        self._fill(step, b, L)
        key = (b, L, lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, L, lora)
        graph, logits = self.graphs[key]
        graph.replay()
        self.replays += 1
        return logits[:n]

    def _fill(self, step: PackedStep, b: int, L: int) -> None:
        """Write the step's inputs into the first b rows and L columns of the static buffers."""
        n, scratch = len(step.ids), self.kv.scratch_row
        pad = b - n
        index, mask = decode_table(step.decode_index, b, L, scratch)  # [b, L], [b, 1, 1, L]
        mask[n:, 0, 0, 0] = True  # padding rows attend the scratch row only
        self.ids[0, :b].copy_(torch.tensor(step.ids + [0] * pad))
        self.positions[0, :b].copy_(torch.tensor(step.positions + [0] * pad))
        self.slot_mapping[:b].copy_(torch.cat([*step.mapping, torch.full((pad,), scratch)]))
        self.lora[:b].copy_(torch.tensor(step.slots + [-1] * pad))
        self.kv_index[:b, :L].copy_(index)
        self.mask[:b, :, :, :L].copy_(mask)

    def _forward(self, b: int, L: int, lora: bool) -> torch.Tensor:
        """The model over the static buffers' first b rows.  -> logits [b, V] float32"""
        attn = AttnBatch(
            kv=self.kv,
            slot_mapping=self.slot_mapping[:b],
            decode_rows=self.rows[:b],
            decode_positions=self.positions[0, :b],
            decode_kv_index=self.kv_index[:b, :L],
            decode_mask=self.mask[:b, :, :, :L],
            prefills=[],
        )
        if lora:
            self.routing.set_static(self.lora[:b])
        try:
            logits = self.model(
                input_ids=self.ids[:, :b],
                position_ids=self.positions[:, :b],
                attn_batch=attn,
                use_cache=False,
                logits_to_keep=0,  # every row: all of them sample
            ).logits  # [1, b, V]
        finally:
            self.routing.set(None)
        return logits[0].float()  # [b, V]

    def _capture(self, b: int, L: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up once on a side stream, then capture the forward into a graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(b, L, lora)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(b, L, lora)
        return graph, logits
