"""LoRA on fused MoE expert weights (PEFT's target_parameters), batched per token like the dense path.

transformers 5 stores a layer's experts as 3-D parameters (gate_up_proj or up_proj, then down_proj:
[E, out, in], or [E, in, out] when the experts module says is_transposed) and describes them with
flags (has_gate, has_bias, has_post_expert_norm, _apply_gate). MultiLoraExperts wraps such a module:
a step in which no token uses an adapter with expert LoRA on it runs the module unchanged; otherwise
each hit expert runs over its routed tokens as the module's eager path does, and each token adds its
own slot's LoRA term to both projections: x W_e + scaling * (x A_e^T) B_e^T, which is what PEFT's
ParamWrapper computes by merging scaling * B_e A_e into W_e.

adapters/format.py reads PEFT's stacked layout into per-expert A [E, r, in] and B [E, out, r].
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from adapters.format import LoraModule
from adapters.lora_ops import CONTIGUOUS

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


def is_experts_module(module: nn.Module) -> bool:
    """Whether module is a transformers fused-experts module whose layout flags are known."""
    params = [getattr(module, p, None) for p in EXPERT_PARAMS]
    fused = any(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)
    return fused and all(hasattr(module, flag) for flag in EXPERT_FLAGS)


def expert_dims(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of one fused expert parameter of module."""
    experts, first, second = getattr(module, name).shape
    return (experts, first, second) if module.is_transposed else (experts, second, first)


class ExpertLoraStack:
    """Each slot's LoRA on one fused expert parameter at the adapter's own rank: per expert A
    [E, r_s, in] and scaled B stored as Bt [E, r_s, out]."""

    def __init__(
        self, dims: tuple[int, int, int], num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.experts, self.in_features, self.out_features = dims
        self.dtype, self.device = dtype, device
        self.lora_A: list[torch.Tensor | None] = [None] * num_slots  # [E, r_s, in]
        self.lora_Bt: list[torch.Tensor | None] = [None] * num_slots  # [E, r_s, out]
        self.active: dict[int, int] = {}  # slot -> rank

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the slots hold."""
        held = (*self.lora_A, *self.lora_Bt)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Hold an adapter's per-expert A and scaled B in a slot (None empties it)."""
        if module is None:
            self.lora_A[slot] = self.lora_Bt[slot] = None
            self.active.pop(slot, None)
            return
        self.lora_A[slot] = module.A.to(
            self.device, self.dtype, copy=True, memory_format=CONTIGUOUS
        )
        Bt = module.B.transpose(1, 2).to(
            self.device, self.dtype, copy=True, memory_format=CONTIGUOUS
        )
        self.lora_Bt[slot] = Bt.mul_(module.scaling)
        self.active[slot] = module.rank

    def delta(self, x: torch.Tensor, expert: int, slots: torch.Tensor) -> torch.Tensor:
        """LoRA term of tokens x [n, in] routed to expert, with slots [n] (-1: none).  -> [n, out]"""
        out = torch.zeros(x.shape[0], self.out_features, dtype=self.dtype, device=x.device)
        for slot in torch.unique(slots[slots >= 0]).tolist():
            A, Bt = self.lora_A[slot], self.lora_Bt[slot]
            if A is None or Bt is None:  # this adapter has no LoRA on this parameter
                continue
            rows = (slots == slot).nonzero().squeeze(1)  # [k]
            h = x.index_select(0, rows).to(self.dtype) @ A[expert].t()  # [k, r_s]
            out.index_copy_(0, rows, h @ Bt[expert])  # [k, out]
        return out


class MultiLoraExperts(nn.Module):
    """A fused-experts module plus per-slot LoRA stacks on its 3-D weights."""

    def __init__(self, base: nn.Module, routing: object, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.routing = routing  # adapters.layer.StepRouting
        self.signature = inspect.signature(base.forward)  # names differ by family
        device = next(base.parameters()).device
        names = [n for n in EXPERT_PARAMS if isinstance(getattr(base, n, None), nn.Parameter)]
        self.stacks = {
            n: ExpertLoraStack(expert_dims(base, n), routing.num_slots, dtype, device)
            for n in names
        }

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """(hidden [T, H], top-k expert indices [T, K], top-k weights [T, K]) -> [T, H], passed as
        the wrapped module takes them."""
        slots, slot_set = self.routing.tokens, self.routing.slot_set
        active = set().union(*(stack.active for stack in self.stacks.values()))
        if slots is None or not active or (slot_set is not None and active.isdisjoint(slot_set)):
            return self.base(*args, **kwargs)
        hidden, top_k_index, top_k_weights = self.signature.bind(*args, **kwargs).arguments.values()
        base = self.base
        out = torch.zeros_like(hidden)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= base.num_experts:  # expert-parallel sentinel: not on this rank
                continue
            token, pos = torch.where(top_k_index == expert)  # [n], [n]
            first = "gate_up_proj" if base.has_gate else "up_proj"
            h = self._project(first, hidden[token], expert, slots[token])  # [n, 2I or I]
            h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
            h = self._project("down_proj", h, expert, slots[token])  # [n, H]
            if base.has_post_expert_norm:
                h = base.post_expert_norm(h)
            out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
        return out

    def _project(
        self, name: str, x: torch.Tensor, expert: int, slots: torch.Tensor
    ) -> torch.Tensor:
        """One expert projection of x [n, in] with bias and each row's LoRA term.  -> [n, out]"""
        weight = getattr(self.base, name)[expert]  # [out, in], or [in, out] if transposed
        y = x @ weight if self.base.is_transposed else F.linear(x, weight)
        if self.base.has_bias:
            y = y + getattr(self.base, f"{name}_bias")[expert]
        stack = self.stacks[name]
        if stack.active:
            y = y + stack.delta(x, expert, slots).to(y.dtype)
        return y


def expert_param_dims(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(in_features, out_features, experts) of every fused expert parameter, by PEFT's path for it
    (the unwrapped module's path, also once MultiLoraExperts wraps it)."""
    dims: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiLoraExperts):
            module, owner = module.base, name
        elif is_experts_module(module) and not name.endswith(".base"):
            owner = name
        else:
            continue
        for param in EXPERT_PARAMS:
            if isinstance(getattr(module, param, None), nn.Parameter):
                experts, in_features, out_features = expert_dims(module, param)
                dims[f"{owner}.{param}"] = (in_features, out_features, experts)
    return dims


def attach_multi_lora_experts(
    model: nn.Module, routing: object, dtype: torch.dtype = torch.float32
) -> dict[str, ExpertLoraStack]:
    """Wrap every fused-experts module of model in place; its stacks keyed by the parameter's path
    as PEFT names it (model.layers.0.mlp.experts.gate_up_proj)."""
    stacks: dict[str, ExpertLoraStack] = {}
    found = [(n, m) for n, m in model.named_modules() if is_experts_module(m)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        wrapper = MultiLoraExperts(module, routing, dtype)
        setattr(model.get_submodule(parent_name), child, wrapper)
        stacks.update({f"{name}.{param}": stack for param, stack in wrapper.stacks.items()})
    return stacks
