"""Batched multi-LoRA math over one wrapped layer's slots, each adapter held at its own rank.

Layout of one wrapped linear layer (in_features -> out_features), shared by every op here:
  SlotWeights   per slot s: A_s [r_s, in] and the scaled B_s stored as Bt_s [r_s, out], at the
                adapter's own rank r_s (no padding to a largest rank); empty slots hold nothing
  tokens  [T] int64   slot of each token, -1 for base-only tokens (no LoRA term)
Ops return the LoRA delta [T, out] in the weights' dtype; the caller adds it to the base output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTIGUOUS = torch.contiguous_format  # a slot's own copy, laid out row by row (one pass)


class SlotWeights:
    """One layer's LoRA weights per slot, each at its own rank, plus what the Triton kernels read
    on the device: ranks [S] int32 and the data pointers of every slot's A and Bt, [S] int64 each
    (tables at fixed addresses, so CUDA graphs replay over whatever the slots hold)."""

    def __init__(
        self,
        num_slots: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, torch.device(device)
        self.A: list[torch.Tensor | None] = [None] * num_slots  # [r_s, in]
        self.Bt: list[torch.Tensor | None] = [None] * num_slots  # [r_s, out], scaled
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=self.device)  # [S]
        self.a_ptrs = torch.zeros(num_slots, dtype=torch.int64, device=self.device)  # [S]
        self.b_ptrs = torch.zeros(num_slots, dtype=torch.int64, device=self.device)  # [S]
        self.active: dict[int, int] = {}  # slot -> rank, for the slots that hold weights

    @property
    def num_slots(self) -> int:
        """How many slots the layer addresses."""
        return len(self.A)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the slots hold."""
        return sum(t.numel() * t.element_size() for t in (*self.A, *self.Bt) if t is not None)

    def set(
        self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float
    ) -> None:
        """Hold A [r, in] and scaling * B [out, r] in slot at rank r (None: empty the slot)."""
        if A is None or B is None:
            self.A[slot] = self.Bt[slot] = None
            self.active.pop(slot, None)
            rank, a_ptr, b_ptr = 0, 0, 0
        else:
            self.A[slot] = A.to(self.device, self.dtype, copy=True, memory_format=CONTIGUOUS)
            Bt = B.t().to(self.device, self.dtype, copy=True, memory_format=CONTIGUOUS)
            self.Bt[slot] = Bt.mul_(scaling)
            rank = A.shape[0]
            self.active[slot] = rank
            a_ptr, b_ptr = self.A[slot].data_ptr(), self.Bt[slot].data_ptr()
        self.ranks[slot] = rank
        self.a_ptrs[slot] = a_ptr
        self.b_ptrs[slot] = b_ptr

    def grouped(self, x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """The grouped op over these slots (lora_grouped).  x [T, in] -> [T, out]"""
        return lora_grouped(x, self, plan)


def lora_reference(x: torch.Tensor, weights: SlotWeights, tokens: torch.Tensor) -> torch.Tensor:
    """The test oracle: one token at a time, delta[t] = (x[t] @ A_s.T) @ Bt_s.  -> [T, out]"""
    delta = torch.zeros(x.shape[0], weights.out_features, dtype=weights.dtype, device=x.device)
    for t, slot in enumerate(tokens.tolist()):
        A = weights.A[slot] if slot >= 0 else None
        if A is not None:
            h = A @ x[t].to(weights.dtype)  # [r_s]
            delta[t] = h @ weights.Bt[slot]  # [out]
    return delta


@dataclass
class GroupPlan:
    """How one step's tokens are grouped by slot; built once per step, shared by every layer.

    slots    [G]      the distinct slots present, ascending (on the host)
    gather   [G * m]  row of x feeding each padded group position (T = a zero pad row)
    scatter  [T]      padded position holding each token's result (G * m = a zero row; base tokens)
    """

    slots: list[int]
    gather: torch.Tensor
    scatter: torch.Tensor
    group_size: int

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
        return cls(slots.tolist(), gather, scatter, m)

    def to(self, device: torch.device) -> GroupPlan:
        """The same plan with its index tensors on device."""
        return GroupPlan(
            self.slots,
            self.gather.to(device),
            self.scatter.to(device),
            self.group_size,
        )


def lora_grouped(x: torch.Tensor, weights: SlotWeights, plan: GroupPlan) -> torch.Tensor:
    """CPU fast path: tokens grouped by slot into [G, m, in], then per group two GEMMs at that
    adapter's own rank, scattered back. Each adapter's weights are read once per step, in place
    (never gathered or padded), whatever the number of its tokens.  -> [T, out]"""
    T, width = x.shape
    G, m = len(plan.slots), plan.group_size
    dtype = weights.dtype
    x_ext = torch.cat([x.to(dtype), x.new_zeros(1, width, dtype=dtype)])  # [T+1, in]
    xg = x_ext.index_select(0, plan.gather).view(G, m, width)  # [G, m, in]
    y = x.new_empty(G * m + 1, weights.out_features, dtype=dtype)  # [G*m+1, out]
    y[-1].zero_()  # the row base-only tokens read
    yg = y[:-1].view(G, m, -1)  # [G, m, out]
    for g, slot in enumerate(plan.slots):
        A, Bt = weights.A[slot], weights.Bt[slot]
        if A is None or Bt is None:  # this adapter does not adapt this layer
            yg[g].zero_()
        else:
            torch.mm(torch.mm(xg[g], A.t()), Bt, out=yg[g])  # [m, r_s] -> [m, out]
    return y.index_select(0, plan.scatter)  # [T, out]
