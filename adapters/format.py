"""The PEFT adapter format: read an adapter folder into plain tensors, validated against the base."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModule:
    """One adapted linear layer: A [r, in], B [out, r] and the PEFT scaling (alpha / r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """The LoRA rank of this layer."""
        return self.A.shape[0]


@dataclass
class AdapterWeights:
    """A validated adapter: its modules keyed by the base module path (e.g. model.layers.0.self_attn.q_proj)."""

    name: str
    path: str
    modules: dict[str, LoraModule]
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank over the adapter's layers."""
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all A and B tensors."""
        return sum(
            m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
            for m in self.modules.values()
        )
