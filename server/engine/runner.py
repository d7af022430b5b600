"""Runs one scheduled step: packs every token into one forward of the HF model, returns logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from adapters.layer import StepRouting
from server.engine.attention import ATTN_NAME, AttnBatch, PrefillChunk, decode_table
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence


@dataclass
class PackedStep:
    """One step's tokens in packed order, with where their K/V go and what each attends to."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # adapter slot per token, -1 = base
    mapping: list[torch.Tensor] = field(default_factory=list)  # pool rows of each item's tokens
    decode_rows: list[int] = field(default_factory=list)
    decode_index: list[torch.Tensor] = field(default_factory=list)  # [L_i] pool rows attended
    prefills: list[PrefillChunk] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    # sequences that asked for prompt logprobs: (seq, first position scored, its packed row, count)
    prompt_scores: list[tuple[Sequence, int, int, int]] = field(default_factory=list)

    @property
    def prompt_rows(self) -> list[int]:
        """Packed rows whose logits score the next prompt token, in prompt_scores order."""
        return [r for _, _, row, n in self.prompt_scores for r in range(row, row + n)]

    @property
    def decode_only(self) -> bool:
        """Whether every token is a decode token (each one then samples)."""
        return len(self.decode_rows) == len(self.ids)


def pack(batch: ScheduledBatch, kv: KVCache) -> PackedStep:
    """The packed step of a scheduled batch."""
    step = PackedStep()
    for seq, n in batch.items:
        start, row = seq.num_computed, len(step.ids)
        step.ids.extend(seq.tokens[start : start + n])
        step.positions.extend(range(start, start + n))
        step.slots.extend([seq.slot] * n)
        step.mapping.append(kv.indices(seq, start, start + n))
        if seq.is_decoding:
            step.decode_rows.append(row)
            step.decode_index.append(kv.indices(seq, 0, start + 1))
        else:
            step.prefills.append(PrefillChunk(row, row + n, start, kv.indices(seq, 0, start + n)))
        if seq.params.prompt_logprobs is not None:  # logits at position p score prompt token p + 1
            first = max(start, len(seq.prompt_logprobs) - 1)  # preempted: scored already
            end = min(start + n, len(seq.prompt_ids) - 1)
            if first < end:
                step.prompt_scores.append((seq, first, row + first - start, end - first))
        if start + n == seq.length:  # the chunk reaches the end: sample the next token
            step.sample_seqs.append(seq)
            step.sample_rows.append(row + n - 1)
    return step


class ModelRunner:
    """Owns the model's forward for the engine: inputs, KV placement, adapter routing, logits."""

    def __init__(
        self,
        model: PreTrainedModel,
        kv: KVCache,
        routing: StepRouting,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.routing = routing
        self.graphs = graphs
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTN_NAME)

    def eager_inputs(self, step: PackedStep) -> dict:
        """Keyword arguments of the model's forward for a packed step (lora_slots included, on the
        host: StepRouting derives what it needs there before copying them)."""
        lmax = max((len(i) for i in step.decode_index), default=0)
        index, mask = decode_table(step.decode_index, len(step.decode_index), lmax, 0)
        dev = self.device
        attn = AttnBatch(
            kv=self.kv,
            slot_mapping=torch.cat(step.mapping).to(dev),
            decode_rows=torch.tensor(step.decode_rows, dtype=torch.int64, device=dev),
            decode_positions=torch.tensor(
                [step.positions[r] for r in step.decode_rows], dtype=torch.int64, device=dev
            ),
            decode_kv_index=index.to(dev),
            decode_mask=mask.to(dev),
            prefills=[
                PrefillChunk(p.start, p.end, p.offset, p.kv_index.to(dev)) for p in step.prefills
            ],
        )
        return {
            "input_ids": torch.tensor([step.ids], device=dev),  # [1, T]
            "position_ids": torch.tensor([step.positions], device=dev),  # [1, T]
            "attn_batch": attn,
            "lora_slots": torch.tensor(step.slots, dtype=torch.int64),  # [T]
        }

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[PackedStep, torch.Tensor, torch.Tensor]:
        """Forward the batch; returns the packed step, the logits [N, V] of its sample rows and
        those [P, V] of its prompt rows, in float32."""
        step = pack(batch, self.kv)
        if self.graphs is not None and step.decode_only and self.graphs.fits(step):
            logits = self.graphs.run(step)
            return step, logits, logits[:0]
        inputs = self.eager_inputs(step)
        keep = step.sample_rows + step.prompt_rows
        rows = torch.tensor(keep, dtype=torch.int64, device=self.device)  # [N + P]
        self.routing.set(inputs.pop("lora_slots"))
        try:
            # the model's own head: final softcapping, logit scales and tied weights as it computes
            # them, only for the rows that sample and the prompt rows asked to be scored
            logits = self.model(
                **inputs, use_cache=False, logits_to_keep=rows
            ).logits  # [1, N+P, V]
        finally:
            self.routing.set(None)
        logits = logits[0].float()
        sampled = len(step.sample_rows)
        return step, logits[:sampled], logits[sampled:]
