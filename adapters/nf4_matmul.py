"""Fused NF4 matmul for decode-sized batches: the CUDA fast path of the base's 4-bit linears.

bitsandbytes multiplies a few rows by a 4-bit weight either with a GEMV kernel (one row) or by
dequantizing the whole weight to 16 bits and calling cuBLAS (more rows), which moves about nine
times the 4-bit bytes. This kernel reads bitsandbytes' own packed storage (see
adapters._nf4_kernels), dequantizes each tile in registers exactly as bitsandbytes does (bitwise the
same 16-bit weights: fp32 products, no fused multiply-add; the 4-bit code looked up by a select
tree, not a memory gather) and multiplies it with `tl.dot`, fp32 accumulation. Up to MAX_ROWS rows; the in-features are split so that small layers still fill the
GPU, and the partial sums are added in a fixed order (deterministic).

CUDA tensors run compiled kernels; CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1
before triton's first import), for tests.
"""

from __future__ import annotations

import functools
from typing import Any

import bitsandbytes as bnb
import torch

from adapters.triton_lora import pow2_at_most

MAX_ROWS = 64  # larger batches (prefill chunks) go to bitsandbytes' dequantize + GEMM
BLOCK_N = 64  # out-features per program
BLOCK_K = 128  # in-features per inner step (a multiple of bitsandbytes' 64-element blocks)
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 (132 SMs)


@functools.cache
def _kernel() -> Any:
    from adapters._nf4_kernels import nf4_matmul_kernel

    return nf4_matmul_kernel


def supports(layer: torch.nn.Module) -> bool:
    """Whether layer is an NF4 bnb Linear4bit (blocksize 64) whose shape the kernel takes."""
    if not isinstance(layer, bnb.nn.Linear4bit):
        return False
    state = layer.weight.quant_state
    return (
        state is not None
        and state.quant_type == "nf4"
        and state.blocksize == 64
        and (not state.nested or state.state2.blocksize == 256)
        and layer.in_features % BLOCK_K == 0
    )


def nf4_matmul(x: torch.Tensor, layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """x [..., K] (bf16/fp16, at most MAX_ROWS rows) -> x @ W.T + bias [..., N] in x's dtype."""
    state = layer.weight.quant_state
    N, K = layer.out_features, layer.in_features
    rows = x.reshape(-1, K)
    if not rows.is_contiguous() or rows.stride(1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"nf4_matmul takes at most {MAX_ROWS} rows, got {M}")
    n_blocks = -(-N // BLOCK_N)
    steps = K // BLOCK_K
    splits = max(1, min(steps, TARGET_PROGRAMS // n_blocks))
    k_per_split = -(-steps // splits) * BLOCK_K
    splits = -(-K // k_per_split)
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)  # [SPLITS, M, N]
    nested = bool(state.nested)
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    _kernel()[(n_blocks, splits)](
        rows,
        layer.weight,
        state.absmax,
        absmax2,
        code2,
        state.code,
        partial,
        M,
        N,
        K,
        state.offset if nested else state.absmax,  # a tensor: reading it needs no host sync
        k_per_split,
        rows.stride(0),
        partial.stride(0),
        partial.stride(1),
        NESTED=nested,
        BLOCK_M=max(16, pow2_at_most(M, MAX_ROWS)),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        DOT_FP32=x.device.type == "cpu",  # the interpreter
        enable_fp_fusion=False,  # code2 * absmax2 + offset rounded as bitsandbytes rounds it
    )
    out = partial.sum(0) if splits > 1 else partial[0]  # [M, N]
    if layer.bias is not None:
        out = out + layer.bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], N)
