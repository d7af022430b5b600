"""Attention over the paged KV pool, plugged into HF models through transformers' AttentionInterface.

The runner packs all of a step's tokens into one row (input_ids [1, T]); this function writes their K/V
into the layer's pool, then attends: one batched call for all decode tokens, one per prefill chunk.
It computes each layer as loader/architecture.py found eager attention computes it (the layer's
LayerAttention, kept by the KV pool): scaling, sliding window (a token sees itself and the window - 1
positions before it), attention-logit softcapping and attention sinks (a per-head logit that takes
softmax mass and adds no value; its values arrive as the s_aux argument).
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
    decode_positions: torch.Tensor  # [Nd] position of each decode token
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


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention. q [N, H, c, Dk], k [N, Hkv, L, Dk], v [N, Hkv, L, Dv], visible
    [N or 1, 1, c, L] bool (None: causal with keys = queries), sinks [H] -> [N, H, c, Dv]."""
    if softcap is None and sinks is None:
        causal = visible is None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, is_causal=causal, scale=scaling, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [N, H, L, D]
    scores = (q @ k.transpose(-1, -2)).float() * (scaling or q.shape[-1] ** -0.5)  # [N, H, c, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is None:
        c, L = scores.shape[-2:]
        visible = torch.ones(c, L, dtype=torch.bool, device=q.device).tril(L - c)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # [N, H, c, 1]
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return probs.to(v.dtype) @ v


def _prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    chunk: PrefillChunk,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One prefill chunk's attention. q [H, T, D] (the packed queries) -> [c, H, Dv]."""
    c = chunk.end - chunk.start
    first = max(0, chunk.offset - window + 1) if window else 0  # earliest key any query sees
    rows = chunk.kv_index[first:]  # [L] pool rows of positions first..offset+c-1
    qp = q[:, chunk.start : chunk.end].unsqueeze(0)  # [1, H, c, D]
    kp = k_pool[rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
    vp = v_pool[rows].transpose(0, 1).unsqueeze(0)
    visible = None  # plain causal
    if chunk.offset or window:
        keys = torch.arange(first, first + rows.shape[0], device=q.device)[None]  # [1, L]
        queries = chunk.offset + torch.arange(c, device=q.device)[:, None]  # [c, 1]
        visible = keys <= queries  # [c, L]
        if window:
            visible &= keys > queries - window
    out = attend(qp, kp, vp, visible, scaling, softcap, sinks)  # [1, H, c, Dv]
    return out[0].transpose(0, 1)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_batch: AttnBatch | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, Dk], key [1, Hkv, T, Dk], value [1, Hkv, T, Dv] -> ([1, T, H, Dv], None)."""
    if attn_batch is None:
        raise RuntimeError("paged attention needs the engine's attn_batch (run through the engine)")
    layer = module.layer_idx
    spec = attn_batch.kv.layers[layer]
    sliding_window, softcap = spec.sliding_window, spec.softcap
    s_aux = s_aux if spec.sinks else None
    k_pool, v_pool = attn_batch.kv.k[layer], attn_batch.kv.v[layer]  # [N, Hkv, Dk], [N, Hkv, Dv]
    k_pool.index_copy_(0, attn_batch.slot_mapping, key[0].transpose(0, 1))
    v_pool.index_copy_(0, attn_batch.slot_mapping, value[0].transpose(0, 1))
    q = query[0]  # [H, T, Dk]
    out = q.new_empty(q.shape[1], q.shape[0], value.shape[-1])  # [T, H, Dv]
    if attn_batch.decode_rows.numel():
        qd = q[:, attn_batch.decode_rows].transpose(0, 1).unsqueeze(2)  # [Nd, H, 1, Dk]
        kd = k_pool[attn_batch.decode_kv_index].transpose(1, 2)  # [Nd, Hkv, Lmax, Dk]
        vd = v_pool[attn_batch.decode_kv_index].transpose(1, 2)  # [Nd, Hkv, Lmax, Dv]
        visible = attn_batch.decode_mask  # [Nd, 1, 1, Lmax]
        if sliding_window:
            keys = torch.arange(visible.shape[-1], device=q.device)  # [Lmax] = key positions
            lowest = attn_batch.decode_positions - sliding_window  # [Nd]
            visible = visible & (keys[None] > lowest[:, None]).view(-1, 1, 1, keys.shape[0])
        od = attend(qd, kd, vd, visible, scaling, softcap, s_aux)  # [Nd, H, 1, Dv]
        out[attn_batch.decode_rows] = od.squeeze(2)
    for chunk in attn_batch.prefills:
        out[chunk.start : chunk.end] = _prefill(
            q, k_pool, v_pool, chunk, scaling, sliding_window, softcap, s_aux
        )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention)
