"""The adapter layout loraplex used before adapters were held at their own rank, kept only as the
baseline of `loraplex bench adapters`: every slot of every layer a preallocated rank-r_max stack
(A [S, r_max, in], Bt [S, r_max, out], zero past each adapter's rank), and a grouped op that
gathers the padded stacks of the step's slots and multiplies at r_max."""

from __future__ import annotations

import torch

from adapters.layer import MultiLoraLinear
from adapters.lora_ops import GroupPlan, SlotWeights


class PaddedSlotWeights(SlotWeights):
    """One layer's slots as rank-r_max stacks, preallocated."""

    def __init__(self, like: SlotWeights, max_rank: int) -> None:
        super().__init__(
            like.num_slots, like.in_features, like.out_features, like.dtype, like.device
        )
        shape = (like.num_slots, max_rank)
        self.stack_A = torch.zeros(*shape, like.in_features, dtype=like.dtype, device=like.device)
        self.stack_Bt = torch.zeros(*shape, like.out_features, dtype=like.dtype, device=like.device)

    @property
    def nbytes(self) -> int:
        """Bytes preallocated for the stacks."""
        return sum(t.numel() * t.element_size() for t in (self.stack_A, self.stack_Bt))

    def set(
        self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float
    ) -> None:
        """Write A and scaled B into the slot's stack rows, zeroing the rest."""
        self.stack_A[slot].zero_()
        self.stack_Bt[slot].zero_()
        if A is None or B is None:
            self.A[slot] = self.Bt[slot] = None
            self.active.pop(slot, None)
            return
        rank = A.shape[0]
        self.stack_A[slot, :rank].copy_(A)
        self.stack_Bt[slot, :rank].copy_(B.t()).mul_(scaling)
        self.A[slot], self.Bt[slot] = self.stack_A[slot], self.stack_Bt[slot]
        self.active[slot] = rank

    def grouped(self, x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """The old grouped op: tokens grouped by slot, the step's padded stacks gathered, two
        batched GEMMs at r_max, scattered back.  x [T, in] -> [T, out]"""
        T, width = x.shape
        G, m = len(plan.slots), plan.group_size
        x_ext = torch.cat([x.to(self.dtype), x.new_zeros(1, width, dtype=self.dtype)])  # [T+1, in]
        xg = x_ext.index_select(0, plan.gather).view(G, m, width)  # [G, m, in]
        slots = torch.tensor(plan.slots, device=self.device)  # [G]
        A = self.stack_A.index_select(0, slots)  # [G, r_max, in]
        Bt = self.stack_Bt.index_select(0, slots)  # [G, r_max, out]
        y = torch.bmm(torch.bmm(xg, A.transpose(1, 2)), Bt).view(G * m, -1)  # [G*m, out]
        y = torch.cat([y, y.new_zeros(1, y.shape[1])])  # [G*m+1, out]
        return y.index_select(0, plan.scatter)  # [T, out]


def use_padded_slots(layers: dict[str, MultiLoraLinear], max_rank: int) -> int:
    """Give every wrapped linear padded stacks (before any adapter is placed); their bytes."""
    for layer in layers.values():
        layer.lora = PaddedSlotWeights(layer.lora, max_rank)
    return sum(layer.lora.nbytes for layer in layers.values())
