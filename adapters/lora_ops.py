"""Batched multi-LoRA math over per-layer slot stacks.

Layout of one wrapped linear layer (in_features -> out_features), shared by every op here:
  A       [S, r_max, in]   lora_A of the adapter in slot s, rows past its rank are zero
  B       [S, out, r_max]  lora_B * scaling of slot s, columns past its rank are zero
  tokens  [T] int64        slot of each token, -1 for base-only tokens (no LoRA term)
Ops return the LoRA delta [T, out] in A's dtype; the caller adds it to the base output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def lora_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The test oracle: one token at a time, delta[t] = (x[t] @ A[s].T) @ B[s].T.  -> [T, out]"""
    delta = torch.zeros(x.shape[0], B.shape[1], dtype=A.dtype, device=x.device)
    for t, slot in enumerate(tokens.tolist()):
        if slot >= 0:
            h = A[slot] @ x[t].to(A.dtype)  # [r_max]
            delta[t] = B[slot] @ h  # [out]
    return delta


@dataclass
class GroupPlan:
    """How one step's tokens are grouped by slot; built once per step, shared by every layer.

    slots    [G]      the distinct slots present, ascending
    gather   [G * m]  row of x feeding each padded group position (T = a zero pad row)
    scatter  [T]      padded position holding each token's result (G * m = a zero row; base tokens)
    """

    slots: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    group_size: int
    all_slots: bool

    @classmethod
    def build(cls, tokens: torch.Tensor, num_slots: int) -> GroupPlan | None:
        """The plan for these per-token slots, or None when no token uses an adapter."""
        lora = tokens >= 0
        if not bool(lora.any()):
            return None
        T = tokens.shape[0]
        slots, counts = torch.unique(tokens[lora], return_counts=True)  # [G], [G]
        G, m = slots.shape[0], int(counts.max())
        order = torch.argsort(torch.where(lora, tokens, num_slots), stable=True)[
            : int(counts.sum())
        ]
        group = torch.repeat_interleave(
            torch.arange(G), counts
        )  # [n_lora] group of each sorted token
        starts = torch.cumsum(counts, 0) - counts  # [G]
        rank_in_group = torch.arange(order.shape[0]) - starts[group]
        padded = group * m + rank_in_group  # [n_lora] padded position of each sorted token
        gather = torch.full((G * m,), T, dtype=torch.int64)
        gather[padded] = order
        scatter = torch.full((T,), G * m, dtype=torch.int64)
        scatter[order] = padded
        all_slots = G == num_slots
        return cls(slots, gather, scatter, m, all_slots)

    def to(self, device: torch.device) -> GroupPlan:
        """The same plan with its index tensors on device."""
        return GroupPlan(
            self.slots.to(device),
            self.gather.to(device),
            self.scatter.to(device),
            self.group_size,
            self.all_slots,
        )


def lora_grouped(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, plan: GroupPlan
) -> torch.Tensor:
    """CPU fast path: tokens grouped by slot into [G, m, in], two batched GEMMs, scattered back.

    Each adapter's weights are read once per step, whatever the number of its tokens.  -> [T, out]
    """
    T, width = x.shape
    G, m = plan.slots.shape[0], plan.group_size
    x_ext = torch.cat([x.to(A.dtype), x.new_zeros(1, width, dtype=A.dtype)])  # [T+1, in]
    xg = x_ext.index_select(0, plan.gather).view(G, m, width)  # [G, m, in]
    Bt = B.transpose(1, 2)  # [S, r, out]: contiguous when B is MultiLoraLinear's stored view
    A_used = A if plan.all_slots else A.index_select(0, plan.slots)  # [G, r, in]
    Bt_used = Bt if plan.all_slots else Bt.index_select(0, plan.slots)  # [G, r, out]
    h = torch.bmm(xg, A_used.transpose(1, 2))  # [G, m, r]
    y = torch.bmm(h, Bt_used).view(G * m, -1)  # [G*m, out]
    y = torch.cat([y, y.new_zeros(1, y.shape[1])])  # [G*m+1, out]
    return y.index_select(0, plan.scatter)  # [T, out]
