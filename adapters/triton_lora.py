"""Batched multi-LoRA with Triton kernels (BGMV style, as in Punica and S-LoRA): the CUDA fast path.

Same layout and contract as adapters.lora_ops.lora_reference: each slot's weights at its own rank,
read through the layer's tables of ranks and data pointers, so a token's kernels only walk its own
adapter's rank (mixed ranks cost what they use). Two launches per call, and no other device work:
  shrink  grid (T, SPLITS)        h_part [SPLITS, T, r_max] fp32 = x[t] @ A_s.T over a chunk of in
  expand  grid (T, out / BLOCK_N) delta [T, out] = (sum of h_part) @ Bt_s, fp32 accumulation,
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

from adapters.lora_ops import SlotWeights

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


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_dtype(dtype: torch.dtype) -> Any:
    """The triton.language dtype of a torch float dtype."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[
        dtype
    ]


def interpreter_active() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return _kernels()[2]


def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= n, capped at cap."""
    return min(cap, 1 << max(n - 1, 0).bit_length())


def _check(
    x: torch.Tensor, weights: SlotWeights, tokens: torch.Tensor, out: torch.Tensor | None
) -> None:
    """Raise ValueError unless the operands fit the layer's slot weights on one device."""
    if x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"want x [T, {weights.in_features}], got {tuple(x.shape)}")
    if tokens.shape != (x.shape[0],) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be [T] int64/int32, got {tokens.shape} {tokens.dtype}")
    if weights.dtype not in TRITON_DTYPES:
        raise ValueError(f"weights of dtype {weights.dtype} have no Triton path")
    shape = (x.shape[0], weights.out_features)
    if out is not None and (out.shape != shape or not out.is_floating_point()):
        raise ValueError(f"out must be a float [T, out] = {shape}, got {tuple(out.shape)}")
    operands = (x, tokens, weights.ranks) + (() if out is None else (out,))
    devices = {t.device for t in operands}
    if len(devices) != 1:
        raise ValueError(f"operands on several devices: {sorted(map(str, devices))}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"lora_triton runs on cuda (or cpu, interpreted), not {x.device.type}")


def lora_triton(
    x: torch.Tensor,
    weights: SlotWeights,
    tokens: torch.Tensor,
    max_rank: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """delta[t] = (x[t] @ A_s.T) @ Bt_s for s = tokens[t], zero where s == -1.  -> [T, out]

    x [T, in] (any float dtype; rounded to the weights' dtype like lora_reference), weights: the
    layer's slots (each at its own rank, found through its pointer tables), tokens [T] slot per
    token, max_rank: the largest rank any slot may hold (the fp32 scratch's width; ranks above it
    are clamped). Sums accumulate in fp32; h is never rounded. With out [T, out] (any float dtype,
    e.g. the base layer's output) delta is added to it in place instead, in fp32 and rounded once,
    and out is returned; rows without a LoRA term are untouched. Slots must lie in [-1, S): they are
    not checked here, as that would synchronize the device.
    """
    _check(x, weights, tokens, out)
    T, width = x.shape
    out_features = weights.out_features
    add_out = out is not None
    if out is None:
        out = torch.empty(T, out_features, dtype=weights.dtype, device=x.device)  # [T, out]
    if T == 0 or out_features == 0:
        return out
    if max_rank == 0 or width == 0:
        return out if add_out else out.zero_()
    # x rounded to the weights' dtype as lora_reference does (host side: torch rounds to nearest
    # even, where Triton's interpreter truncates fp32 -> bf16); a no-op when the dtypes agree
    x = x.to(weights.dtype)
    shrink, expand, interpreted = _kernels()
    if x.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "lora_triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported (torch._dynamo imports it), or use lora_grouped on CPU"
        )
    block_r = _pow2_at_most(max_rank, BLOCK_R)
    block_k = _pow2_at_most(width, BLOCK_K)
    k_per_split = -(-max(K_PER_SPLIT, block_k) // block_k) * block_k
    splits = -(-width // k_per_split)
    # each token's shrink writes the rows its expand reads (those below its rank): no fill needed
    h_part = torch.empty(
        splits, T, max_rank, dtype=torch.float32, device=x.device
    )  # [SPLITS, T, r]
    shrink[(T, splits)](
        x,
        weights.a_ptrs,
        tokens,
        weights.ranks,
        h_part,
        width,
        k_per_split,
        x.stride(0),
        x.stride(1),
        h_part.stride(0),
        h_part.stride(1),
        R_MAX=max_rank,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        enable_fp_fusion=FP_FUSION,
    )
    block_n = _pow2_at_most(out_features, BLOCK_N)
    expand[(T, -(-out_features // block_n))](
        h_part,
        weights.b_ptrs,
        tokens,
        weights.ranks,
        out,
        out_features,
        splits,
        h_part.stride(0),
        h_part.stride(1),
        out.stride(0),
        out.stride(1),
        W_DTYPE=_triton_dtype(weights.dtype),
        R_MAX=max_rank,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        ADD_OUT=add_out,
        enable_fp_fusion=FP_FUSION,
    )
    return out
