"""The multi-LoRA linear layer: a base linear (bnb Linear4bit or nn.Linear) plus per-slot LoRA weights.

Each step the engine sets one StepRouting (per-token slots) shared by every wrapped layer; a token's
output is base(x) + its own slot's LoRA delta, and base-only tokens (slot -1) get no LoRA term.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from adapters.format import LoraModule
from adapters.lora_ops import GroupPlan, SlotWeights, lora_reference
from adapters.triton_lora import lora_triton

LORA_OPS = ("grouped", "reference", "triton")


class StepRouting:
    """Per-step adapter routing: each token's slot and the grouping plan derived from it once."""

    def __init__(
        self,
        num_slots: int,
        op: str = "grouped",
        device: torch.device | str = "cpu",
        max_rank: int = 256,
    ) -> None:
        if op not in LORA_OPS:
            raise ValueError(f"unknown LoRA op {op!r}; choose from {LORA_OPS}")
        self.num_slots = num_slots
        self.max_rank = max_rank  # the largest adapter rank accepted: the Triton scratch width
        self.op = op
        self.device = torch.device(device)  # where the wrapped layers run
        self.tokens: torch.Tensor | None = None
        self.plan: GroupPlan | None = None  # the grouped op's plan
        self.slot_set: frozenset[int] | None = frozenset()  # None: any slot may be present

    def set(self, tokens: torch.Tensor | None) -> None:
        """Route the next forward: tokens [T] int64 slot per token (-1 = base) on the host, or None
        for no LoRA (as are tokens that all use the base). Everything is derived on the host and
        copied once: the device never waits."""
        slot_set = frozenset() if tokens is None else frozenset(tokens[tokens >= 0].tolist())
        if not slot_set:
            self.tokens, self.plan, self.slot_set = None, None, slot_set
            return
        self.slot_set = slot_set
        self.tokens = tokens.to(self.device)
        grouped = self.op == "grouped"  # some token uses an adapter, so build gives a plan
        self.plan = GroupPlan.build(tokens, self.num_slots).to(self.device) if grouped else None

    def set_static(self, tokens: torch.Tensor) -> None:
        """Route through a buffer read at run time (CUDA graph capture): every layer runs the
        Triton op over tokens [T], whose slots may change between replays."""
        if self.op != "triton":
            raise ValueError(f"static routing needs the triton LoRA op, not {self.op!r}")
        self.tokens, self.plan, self.slot_set = tokens, None, None


class MultiLoraLinear(nn.Module):
    """base(x) + per-token LoRA from each slot's weights, held at the adapter's own rank."""

    def __init__(
        self, base: nn.Module, routing: StepRouting, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        device = next(base.parameters()).device
        self.lora = SlotWeights(
            routing.num_slots, self.in_features, self.out_features, dtype, device
        )

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models that read a linear's weight dtype or device find it)."""
        return self.base.weight

    @property
    def nbytes(self) -> int:
        """Bytes of the LoRA tensors the slots hold."""
        return self.lora.nbytes

    @property
    def active(self) -> dict[int, int]:
        """slot -> rank of the slots holding an adapter that adapts this layer."""
        return self.lora.active

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Hold an adapter's A and scaled B in a slot at its rank (None empties the slot)."""
        if module is None:
            self.lora.set(slot, None, None, 0.0)
        else:
            self.lora.set(slot, module.A, module.B, module.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        y = self.base(x)
        routing = self.routing
        if routing.tokens is None:
            return y
        if routing.slot_set is not None and self.active.keys().isdisjoint(routing.slot_set):
            return y  # no token of this step uses an adapter that adapts this layer
        flat = x.reshape(-1, self.in_features)  # [T, in]
        if routing.op == "triton":
            # added into the base output by the expand kernel (fp32 sum, one rounding): no extra
            # launch for the add; y is the base layer's fresh output, so the view aliases it
            out = y.view(-1, self.out_features)  # [T, out]
            lora_triton(flat, self.lora, routing.tokens, routing.max_rank, out)
            return y
        if routing.op == "reference":
            delta = lora_reference(flat, self.lora, routing.tokens)
        else:
            delta = self.lora.grouped(flat, routing.plan)
        # as PEFT does: the LoRA output is cast to the base output's dtype, then added
        return y + delta.view(*y.shape[:-1], self.out_features).to(y.dtype)


def is_base_linear(module: nn.Module) -> bool:
    """Whether a module is a linear layer the multi-LoRA layer can wrap."""
    return isinstance(module, (bnb.nn.Linear4bit, nn.Linear))


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Paths of every linear layer inside the decoder blocks (lm_head and embeddings excluded).

    A layer already wrapped by MultiLoraLinear is reported under its own path, not its inner base.
    """
    names: list[str] = []
    for name, module in model.named_modules():
        if names and name.startswith(names[-1] + "."):
            continue  # the base inside a wrapper
        wrappable = isinstance(module, MultiLoraLinear) or is_base_linear(module)
        if wrappable and ".layers." in f".{name}" and not name.endswith("lm_head"):
            names.append(name)
    return names


def attach_multi_lora(
    model: nn.Module, routing: StepRouting, dtype: torch.dtype = torch.float32
) -> dict[str, MultiLoraLinear]:
    """Wrap every decoder linear of model in place; returns the wrappers by base module path."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for name in decoder_linear_names(model):
        if isinstance(model.get_submodule(name), MultiLoraLinear):
            raise ValueError(f"{name} is already wrapped")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear(getattr(parent, child), routing, dtype)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
