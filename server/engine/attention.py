"""Attention over the paged KV pool, plugged into HF models through transformers' AttentionInterface.

The runner packs all of a step's tokens into one row (input_ids [1, T]); this function writes their K/V
into the pool, then attends: one batched SDPA for all decode tokens, one SDPA per prefill chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from server.engine.kv_cache import KVCache

ATTN_NAME = "loraplex_paged"


@dataclass
class PrefillChunk:
    """One sequence's chunk: rows [start, end) of the packed batch, at positions from `offset`."""

    start: int
    end: int
    offset: int
    kv_index: torch.Tensor  # [offset + end - start] pool rows of positions 0..offset+len-1


@dataclass
class AttnBatch:
    """Where one step's tokens go in the KV pool and what each attends to."""

    kv: KVCache
    slot_mapping: torch.Tensor  # [T] pool row of each new token
    decode_rows: torch.Tensor  # [Nd] packed rows of decode tokens
    decode_kv_index: torch.Tensor  # [Nd, Lmax] pool rows each decode token attends (padded)
    decode_mask: torch.Tensor  # [Nd, 1, 1, Lmax] True where the key is real
    prefills: list[PrefillChunk]


def decode_table(
    decode_index: list[torch.Tensor], rows: int, width: int, fill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode token's attended pool rows padded to width with fill, and the mask of the real
    ones; rows past len(decode_index) hold only fill and an all-False mask.
    -> index [rows, width] int64, mask [rows, 1, 1, width] bool (host tensors)"""
    index = torch.full((rows, width), fill, dtype=torch.int64)
    mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool)
    for i, pool_rows in enumerate(decode_index):
        index[i, : len(pool_rows)] = pool_rows
        mask[i, 0, 0, : len(pool_rows)] = True
    return index, mask


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_batch: AttnBatch | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    if attn_batch is None:
        raise RuntimeError("paged attention needs the engine's attn_batch (run through the engine)")
    layer = module.layer_idx
    k_pool, v_pool = attn_batch.kv.k[layer], attn_batch.kv.v[layer]  # [N, Hkv, D]
    k_pool.index_copy_(0, attn_batch.slot_mapping, key[0].transpose(0, 1))
    v_pool.index_copy_(0, attn_batch.slot_mapping, value[0].transpose(0, 1))
    q = query[0]  # [H, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)
    if attn_batch.decode_rows.numel():
        qd = q[:, attn_batch.decode_rows].transpose(0, 1).unsqueeze(2)  # [Nd, H, 1, D]
        kd = k_pool[attn_batch.decode_kv_index].transpose(1, 2)  # [Nd, Hkv, Lmax, D]
        vd = v_pool[attn_batch.decode_kv_index].transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=attn_batch.decode_mask, scale=scaling, enable_gqa=True
        )  # [Nd, H, 1, D]
        out[attn_batch.decode_rows] = od.squeeze(2)
    for chunk in attn_batch.prefills:
        qp = q[:, chunk.start : chunk.end].unsqueeze(0)  # [1, H, c, D]
        kp = k_pool[chunk.kv_index].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vp = v_pool[chunk.kv_index].transpose(0, 1).unsqueeze(0)
        if chunk.offset == 0:
            op = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            c, L = chunk.end - chunk.start, chunk.kv_index.shape[0]
            visible = torch.arange(L, device=q.device)[None] <= (
                chunk.offset + torch.arange(c, device=q.device)[:, None]
            )  # [c, L]
            op = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=visible, scale=scaling, enable_gqa=True
            )
        out[chunk.start : chunk.end] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention)
