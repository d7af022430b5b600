"""Resident-memory report of a loaded base: 4-bit linear layers against the same layers in bf16."""

from __future__ import annotations

import os
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

BF16_BYTES = 2


@dataclass(frozen=True)
class MemoryReport:
    """Byte counts of a loaded model."""

    quantized_layers: int
    quantized_linear_bytes: int
    bf16_linear_bytes: int
    total_resident_bytes: int
    expert_tensors: int = 0  # fused 3-D MoE expert weights: bitsandbytes leaves them 16-bit
    expert_bytes: int = 0
    unquantized_linears: int = 0  # decoder linears kept 16-bit (MoE routers)
    unquantized_linear_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Quantized linear bytes over the same layers in bf16 (NF4 + double quant floor: 0.258)."""
        return self.quantized_linear_bytes / max(self.bf16_linear_bytes, 1)

    def format(self) -> str:
        """One human-readable line."""
        mib = 1024 * 1024
        kept = [
            f"{count} {what} {nbytes / mib:.1f} MiB"
            for count, what, nbytes in (
                (self.expert_tensors, "fused MoE expert tensors", self.expert_bytes),
                (self.unquantized_linears, "router linears", self.unquantized_linear_bytes),
            )
            if count
        ]
        return (
            f"memory: {self.quantized_layers} quantized linear layers "
            f"{self.quantized_linear_bytes / mib:.1f} MiB vs {self.bf16_linear_bytes / mib:.1f} MiB "
            f"in bf16 (ratio {self.ratio:.3f}); "
            + (f"kept 16-bit in the decoder: {', '.join(kept)}; " if kept else "")
            + f"model resident {self.total_resident_bytes / mib:.1f} MiB"
        )


def _quant_state_bytes(state: object) -> int:
    """Bytes of every tensor held by a bitsandbytes QuantState, nested states included."""
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif type(value).__name__ == "QuantState":
            total += _quant_state_bytes(value)
    return total


def fused_expert_params(model: nn.Module) -> tuple[str, ...]:
    """Names of the 3-D (per-expert) weight parameters inside the decoder layers (bitsandbytes
    quantizes only nn.Linear, so these stay 16-bit)."""
    return tuple(
        name
        for name, param in model.named_parameters()
        if param.dim() == 3 and ".layers." in f".{name}"
    )


def memory_report(model: nn.Module) -> MemoryReport:
    """Count quantized-linear bytes (packed weights + quantization state) and all resident bytes."""
    layers = quantized = bf16 = state_bytes = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            extra = _quant_state_bytes(weight.quant_state) if weight.quant_state else 0
            layers += 1
            quantized += weight.numel() * weight.element_size() + extra
            bf16 += module.in_features * module.out_features * BF16_BYTES
            state_bytes += extra
    expert_names = set(fused_expert_params(model))
    experts = [p for name, p in model.named_parameters() if name in expert_names]
    routers = [
        m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and ".layers." in f".{name}" and layers  # quantized model only
    ]
    seen: set[int] = set()
    resident = state_bytes
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:  # tied weights share one storage
            seen.add(key)
            resident += tensor.untyped_storage().nbytes()
    return MemoryReport(
        layers,
        quantized,
        bf16,
        resident,
        len(experts),
        sum(p.numel() * p.element_size() for p in experts),
        len(routers),
        sum(p.numel() * p.element_size() for m in routers for p in m.parameters()),
    )


def device_memory_bytes(device: str) -> int:
    """Total memory of a device: the GPU's for cuda, the machine's RAM for cpu."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
