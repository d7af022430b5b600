"""Runs one scheduled step: packs every token into one forward of the HF model, returns logits."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from adapters.layer import StepRouting
from server.engine.attention import ATTN_NAME, AttnBatch, PrefillChunk
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence


class ModelRunner:
    """Owns the model's forward for the engine: inputs, KV placement, adapter routing, lm_head."""

    def __init__(self, model: PreTrainedModel, kv: KVCache, routing: StepRouting) -> None:
        self.model = model
        self.kv = kv
        self.routing = routing
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTN_NAME)

    def build(self, batch: ScheduledBatch) -> tuple[dict, list[Sequence], torch.Tensor]:
        """Model inputs for the batch, the sequences to sample, and their rows in the packed batch."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        mapping: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_index: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        for seq, n in batch.items:
            start, row = seq.num_computed, len(ids)
            ids.extend(seq.tokens[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend([seq.slot] * n)
            mapping.append(self.kv.indices(seq, start, start + n))
            if seq.is_decoding:
                decode_rows.append(row)
                decode_index.append(self.kv.indices(seq, 0, start + 1))
            else:
                prefills.append(
                    PrefillChunk(row, row + n, start, self.kv.indices(seq, 0, start + n))
                )
            if start + n == seq.length:  # the chunk reaches the end: sample the next token
                sample_seqs.append(seq)
                sample_rows.append(row + n - 1)
        lmax = max((len(i) for i in decode_index), default=0)
        index = torch.zeros(len(decode_index), lmax, dtype=torch.int64)  # [Nd, Lmax]
        mask = torch.zeros(len(decode_index), 1, 1, lmax, dtype=torch.bool)  # [Nd, 1, 1, Lmax]
        for i, rows in enumerate(decode_index):
            index[i, : len(rows)] = rows
            mask[i, 0, 0, : len(rows)] = True
        dev = self.device
        attn = AttnBatch(
            kv=self.kv,
            slot_mapping=torch.cat(mapping).to(dev),
            decode_rows=torch.tensor(decode_rows, dtype=torch.int64, device=dev),
            decode_kv_index=index.to(dev),
            decode_mask=mask.to(dev),
            prefills=[PrefillChunk(p.start, p.end, p.offset, p.kv_index.to(dev)) for p in prefills],
        )
        slot_tensor = torch.tensor(slots, dtype=torch.int64, device=dev)  # [T]
        inputs = {
            "input_ids": torch.tensor([ids], device=dev),  # [1, T]
            "position_ids": torch.tensor([positions], device=dev),  # [1, T]
            "attn_batch": attn,
            "lora_slots": slot_tensor,
        }
        return inputs, sample_seqs, torch.tensor(sample_rows, dtype=torch.int64, device=dev)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Forward the batch; returns the sequences to sample and their logits [N, V] in float32."""
        inputs, seqs, rows = self.build(batch)
        slots = inputs.pop("lora_slots")
        self.routing.set(slots if bool((slots >= 0).any()) else None)
        try:
            hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # [1, T, H]
        finally:
            self.routing.set(None)
        if not seqs:
            return seqs, torch.empty(0)
        logits = self.model.lm_head(hidden[0].index_select(0, rows))  # [N, V]
        return seqs, logits.float()
