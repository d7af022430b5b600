"""Triton kernel body of the fused NF4 matmul for decode-sized batches (see adapters.nf4_matmul).

Only adapters.nf4_matmul imports this module, on first use, so loraplex imports without triton.

bitsandbytes' 4-bit layout, read as is: the weight W [N, K] flattened row-major, two 4-bit codes per
byte (element 2i in the high nibble, 2i+1 in the low one), one absmax per 64 consecutive elements;
with double quantization each absmax is itself a uint8 code into a 256-entry table, scaled by one
fp32 absmax per 256 blocks, plus a global offset. W[n, k] = code[q] * absmax[(n * K + k) // 64].
"""

# ruff: noqa: ANN001, ANN201
# (Triton reads kernel annotations itself: only tl.constexpr ones are used here.)

import triton
import triton.language as tl


@triton.jit
def _lookup(q, code_ptr):
    """code[q] for 4-bit q by a select tree on its bits (no per-element memory gather)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    c0, c1, c2, c3 = (
        tl.load(code_ptr),
        tl.load(code_ptr + 1),
        tl.load(code_ptr + 2),
        tl.load(code_ptr + 3),
    )
    c4, c5, c6, c7 = (
        tl.load(code_ptr + 4),
        tl.load(code_ptr + 5),
        tl.load(code_ptr + 6),
        tl.load(code_ptr + 7),
    )
    c8, c9, c10, c11 = (
        tl.load(code_ptr + 8),
        tl.load(code_ptr + 9),
        tl.load(code_ptr + 10),
        tl.load(code_ptr + 11),
    )
    c12, c13, c14, c15 = (
        tl.load(code_ptr + 12),
        tl.load(code_ptr + 13),
        tl.load(code_ptr + 14),
        tl.load(code_ptr + 15),
    )
    low = tl.where(
        b2,
        tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)),
        tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0)),
    )
    high = tl.where(
        b2,
        tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12)),
        tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8)),
    )
    return tl.where(b3, high, low)


@triton.jit
def nf4_matmul_kernel(
    x_ptr,  # [M, K] bf16 / fp16
    w_ptr,  # [N * K / 2] uint8 packed codes
    absmax_ptr,  # [N * K / 64] uint8 (NESTED) or fp32
    absmax2_ptr,  # [ceil(N * K / 64 / 256)] fp32 (NESTED only)
    code2_ptr,  # [256] fp32 (NESTED only)
    code_ptr,  # [16] fp32: the 4-bit values
    out_ptr,  # [SPLITS, M, N] fp32 partial sums
    M,
    N,
    K,
    offset_ptr,  # [] fp32 added to every dequantized absmax (NESTED only)
    k_per_split,  # multiple of BLOCK_K
    stride_xm,
    stride_os,
    stride_om,
    NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 64
    DOT_FP32: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), SPLITS): out[split, :, n-block] = x[:, k-chunk] @ W[n-block, k-chunk].T"""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)  # [BM]
    nmask = offs_n < N
    mmask = offs_m < M
    half = tl.arange(0, BLOCK_K // 2)  # [BK/2]
    blocks = tl.arange(0, BLOCK_K // 64)  # [BK/64]
    cols = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        packed = tl.load(
            w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + half)[None, :],
            mask=nmask[:, None],
            other=0,
        )  # [BN, BK/2] uint8
        high = _lookup((packed >> 4).to(tl.int32), code_ptr)  # [BN, BK/2] fp32
        low = _lookup((packed & 15).to(tl.int32), code_ptr)
        block = offs_n[:, None] * (K // 64) + (k0 // 64 + blocks)[None, :]  # [BN, BK/64]
        if NESTED:
            scale = tl.load(absmax_ptr + block, mask=nmask[:, None], other=0).to(tl.int32)
            scale = tl.load(code2_ptr + scale) * tl.load(absmax2_ptr + block // 256)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=nmask[:, None], other=0.0)
        w = tl.reshape(tl.interleave(high, low), [BLOCK_N, BLOCK_K // 64, 64])
        w = tl.reshape(w * scale[:, :, None], [BLOCK_N, BLOCK_K])  # [BN, BK] fp32
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + cols)[None, :],
            mask=mmask[:, None],
            other=0.0,
        )  # [BM, BK]
        w = w.to(x_ptr.dtype.element_ty)  # the 16-bit weight bitsandbytes would dequantize
        if DOT_FP32:  # Triton's interpreter multiplies 16-bit dot operands wrongly
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))  # [BM, BN], fp32 accumulation
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])
