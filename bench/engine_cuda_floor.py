"""The GPU decode benchmark's memory-bandwidth floor: the fewest bytes one decode step must read.

Per step: every weight the forward touches (NF4 linears with their quantization state, lm_head,
norms; not the embedding table, of which only the batch's rows are read), the LoRA A and B rows of
each distinct adapter in the batch (real rank, slot dtype), and the K/V of every sequence's context.
Over the device's measured copy bandwidth (bytes read plus written per second) this gives the
shortest possible step, hence the highest possible decode tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from loader.memory import memory_report


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads, by kind."""

    weights: int
    lora: int
    kv: int

    @property
    def total(self) -> int:
        """All bytes of the step."""
        return self.weights + self.lora + self.kv


def weight_bytes_per_step(model: PreTrainedModel) -> int:
    """Resident bytes of the base (before adapters are attached) less an untied embedding table."""
    total = memory_report(model).total_resident_bytes
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def adapter_bytes(shapes: dict[str, tuple[int, int]], targets: list[str], rank: int) -> int:
    """Bytes of one adapter's A and B at rank over the targeted layers, in the slot dtype (bf16)."""
    elements = sum(
        (width + out) * rank
        for path, (width, out) in shapes.items()
        if path.rsplit(".", 1)[-1] in targets
    )
    return elements * torch.bfloat16.itemsize


def step_bytes(
    weights: int, one_adapter: int, distinct: int, kv_token: int, batch: int, context: float
) -> StepBytes:
    """What a decode step of batch sequences of mean context tokens with distinct adapters reads."""
    return StepBytes(weights, one_adapter * distinct, int(kv_token * batch * context))


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]
