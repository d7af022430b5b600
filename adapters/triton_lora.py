"""Batched multi-LoRA with Triton kernels (BGMV style, as in Punica and S-LoRA): the CUDA fast path.

Same layout and contract as adapters.lora_ops.lora_reference, plus slot_ranks [S] int32, the real
rank of each slot, so a token's kernels only walk its own adapter's rank (mixed ranks cost what
they use, not r_max). Two launches per call, and no other device work:
  shrink  grid (T, SPLITS)        h_part [SPLITS, T, r_max] fp32 = x[t] @ A[s].T over a chunk of in
  expand  grid (T, out / BLOCK_N) delta [T, out] = (sum of h_part) @ B[s].T, fp32 accumulation,
                                  written to a new tensor or added in place to the base output
The split of `in` depends only on the layer's shape, and each program reads one token, so a token's
delta is bitwise the same whatever else is in the batch.

CUDA tensors run compiled kernels. CPU tensors run only in Triton's interpreter, which must be chosen
before triton is first imported (TRITON_INTERPRET=1); it is slow and meant for tests: serve on CPU
with lora_grouped. This module imports without triton; the kernels are imported on the first call.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BLOCK_R = 16  # rank rows per inner step; a rank-r slot takes ceil(r / 16) steps
BLOCK_K = 256  # in-features per inner step of the shrink
BLOCK_N = 64  # out-features per expand program
K_PER_SPLIT = 512  # in-features per shrink program (a multiple of BLOCK_K)
FP_FUSION = True  # multiply-adds as FMAs (explicit: Triton 3.9 warns when left to its default)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports here (lora_triton then runs on CUDA tensors, or interpreted on CPU)."""
    try:
        import triton  # noqa: F401
    except Exception:  # missing, or a broken/mismatched install: both read as unavailable
        return False
    return True


@functools.cache
def _kernels() -> tuple[Any, Any, bool]:
    """The (shrink, expand) kernels and whether Triton's interpreter runs them."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from adapters._triton_kernels import expand_kernel, shrink_kernel

    interpreted = isinstance(shrink_kernel, InterpretedFunction)
    if interpreted != isinstance(tl.zeros, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported; set it before the first import"
        )
    return shrink_kernel, expand_kernel, interpreted


def interpreter_active() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return _kernels()[2]


def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= n, capped at cap."""
    return min(cap, 1 << max(n - 1, 0).bit_length())


def _check(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    tokens: torch.Tensor,
    slot_ranks: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError unless the operands follow the slot-stack layout on one device."""
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"want x [T, in], A [S, r, in], B [S, out, r]; got {x.shape}, {A.shape}, {B.shape}"
        )
    S, r_max, width = A.shape
    if x.shape[1] != width or B.shape[0] != S or B.shape[2] != r_max:
        raise ValueError(f"shape mismatch: x {x.shape}, A {A.shape}, B {B.shape}")
    if tokens.shape != (x.shape[0],) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be [T] int64/int32, got {tokens.shape} {tokens.dtype}")
    if slot_ranks.shape != (S,) or slot_ranks.dtype != torch.int32:
        raise ValueError(f"slot_ranks must be [S] int32, got {slot_ranks.shape} {slot_ranks.dtype}")
    if A.dtype != B.dtype:
        raise ValueError(f"A and B dtypes differ: {A.dtype} vs {B.dtype}")
    if out is not None and (out.shape != (x.shape[0], B.shape[1]) or not out.is_floating_point()):
        raise ValueError(
            f"out must be a float [T, out] = {(x.shape[0], B.shape[1])}, got {out.shape}"
        )
    operands = (x, A, B, tokens, slot_ranks) + (() if out is None else (out,))
    devices = {t.device for t in operands}
    if len(devices) != 1:
        raise ValueError(f"operands on several devices: {sorted(map(str, devices))}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"lora_triton runs on cuda (or cpu, interpreted), not {x.device.type}")


def lora_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    tokens: torch.Tensor,
    slot_ranks: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """delta[t] = (x[t] @ A[s].T) @ B[s].T for s = tokens[t], zero where s == -1.  -> [T, out] A.dtype

    x [T, in] (any float dtype; rounded to A's dtype like lora_reference), A [S, r_max, in],
    B [S, out, r_max] (scaled), tokens [T] slot per token, slot_ranks [S] int32 real rank of each
    slot (values above r_max are clamped to r_max). Sums accumulate in fp32; h is never rounded.
    With out [T, out] (any float dtype, e.g. the base layer's output) delta is added to it in place
    instead, in fp32 and rounded once, and out is returned; rows without a LoRA term are untouched.
    Slots must lie in [-1, S): they are not checked here, as that would synchronize the device.
    """
    _check(x, A, B, tokens, slot_ranks, out)
    T, width = x.shape
    S, r_max, _ = A.shape
    out_features = B.shape[1]
    add_out = out is not None
    if out is None:
        out = torch.empty(T, out_features, dtype=A.dtype, device=x.device)  # [T, out]
    if T == 0 or out_features == 0:
        return out
    if r_max == 0 or width == 0:
        return out if add_out else out.zero_()
    # x rounded to A's dtype as lora_reference does (host side: torch rounds to nearest even, where
    # Triton's interpreter truncates fp32 -> bf16); a no-op when the dtypes already agree
    x = x.to(A.dtype)
    shrink, expand, interpreted = _kernels()
    if x.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "lora_triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported (torch._dynamo imports it), or use lora_grouped on CPU"
        )
    block_r = _pow2_at_most(r_max, BLOCK_R)
    block_k = _pow2_at_most(width, BLOCK_K)
    k_per_split = -(-max(K_PER_SPLIT, block_k) // block_k) * block_k
    splits = -(-width // k_per_split)
    # each token's shrink writes the rows its expand reads (those below its rank): no fill needed
    h_part = torch.empty(splits, T, r_max, dtype=torch.float32, device=x.device)  # [SPLITS, T, r]
    shrink[(T, splits)](
        x,
        A,
        tokens,
        slot_ranks,
        h_part,
        width,
        k_per_split,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        h_part.stride(0),
        h_part.stride(1),
        R_MAX=r_max,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        enable_fp_fusion=FP_FUSION,
    )
    block_n = _pow2_at_most(out_features, BLOCK_N)
    expand[(T, -(-out_features // block_n))](
        h_part,
        B,
        tokens,
        slot_ranks,
        out,
        out_features,
        splits,
        h_part.stride(0),
        h_part.stride(1),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        out.stride(0),
        out.stride(1),
        R_MAX=r_max,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        ADD_OUT=add_out,
        enable_fp_fusion=FP_FUSION,
    )
    return out
