"""Triton kernel bodies for the batched LoRA shrink and expand steps (BGMV style, Punica / S-LoRA).

Only adapters.triton_lora imports this module, on first use, so loraplex imports without triton.
With TRITON_INTERPRET=1 set before triton is first imported, triton.jit runs these kernels in
Triton's interpreter on CPU tensors instead of compiling them.

Layout (see adapters.lora_ops.SlotWeights): each slot's A_s [r_s, in] and scaled Bt_s [r_s, out]
live anywhere on the device, found through tables of data pointers (a_ptrs, b_ptrs [S] int64);
ranks [S] int32 is each slot's rank; tokens [T] slot per token (-1 = base-only). One program
handles one token, so a token's result never depends on the other tokens in the batch.
"""

# ruff: noqa: ANN001, ANN201
# (Triton reads kernel annotations itself: only tl.constexpr ones are used here.)

import triton
import triton.language as tl


@triton.jit
def shrink_kernel(
    x_ptr,  # [T, in] in the weights' dtype
    a_ptrs,  # [S] int64: address of each slot's A_s [r_s, in] (contiguous)
    tokens_ptr,  # [T]
    ranks_ptr,  # [S] int32
    h_ptr,  # [SPLITS, T, r_max] fp32 partial sums
    in_features,
    k_per_split,  # multiple of BLOCK_K
    stride_xt,
    stride_xk,
    stride_hs,
    stride_ht,
    R_MAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (T, SPLITS): h[split, t, :rank] = A_s[:rank, k-chunk] @ x[t, k-chunk], fp32."""
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    slot = tl.load(tokens_ptr + t)  # -1 = base-only
    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R_MAX)
    rank = tl.where(slot >= 0, rank, 0)  # base-only tokens: no rank, no LoRA term
    slot = tl.maximum(slot, 0).to(tl.int64)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_features)
    x_row = x_ptr + t * stride_xt
    a_slot = tl.load(a_ptrs + slot).to(tl.pointer_type(x_ptr.dtype.element_ty))  # A_s [r_s, in]
    h_row = h_ptr + split.to(tl.int64) * stride_hs + t * stride_ht
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    for r0 in range(0, rank, BLOCK_R):  # only the slot's real rank
        rows = r0 + offs_r  # [BLOCK_R]
        rmask = rows < rank
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + offs_k  # [BLOCK_K]
            kmask = cols < k_hi
            xv = tl.load(x_row + cols * stride_xk, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(
                a_slot + rows[:, None] * in_features + cols[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(av * xv[None, :], axis=1)  # [BLOCK_R]
        tl.store(h_row + rows, acc, mask=rmask)


@triton.jit
def expand_kernel(
    h_ptr,  # [SPLITS, T, r_max] fp32 partial sums from shrink_kernel
    b_ptrs,  # [S] int64: address of each slot's scaled Bt_s [r_s, out] (contiguous)
    tokens_ptr,  # [T]
    ranks_ptr,  # [S] int32
    out_ptr,  # [T, out]: written, or added to when ADD_OUT
    out_features,
    num_splits,
    stride_hs,
    stride_ht,
    stride_ot,
    stride_on,
    W_DTYPE: tl.constexpr,  # the weights' dtype
    R_MAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ADD_OUT: tl.constexpr,
):
    """Grid (T, cdiv(out, BLOCK_N)): out[t, n-block] (+)= sum_split(h) @ Bt_s[:rank, n-block], fp32.

    Without ADD_OUT every output element is written: base-only tokens and rank-0 slots get exact
    zeros. With ADD_OUT the LoRA term is added to out in fp32 and rounded once at the store; rows of
    base-only tokens and rank-0 slots are neither read nor written.
    """
    t = tl.program_id(0).to(tl.int64)
    block_n = tl.program_id(1)
    slot = tl.load(tokens_ptr + t)  # -1 = base-only
    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R_MAX)
    rank = tl.where(slot >= 0, rank, 0)  # base-only tokens: no rank, no LoRA term
    slot = tl.maximum(slot, 0).to(tl.int64)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    nmask = cols < out_features
    offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    h_row = h_ptr + t * stride_ht
    b_slot = tl.load(b_ptrs + slot).to(tl.pointer_type(W_DTYPE))  # Bt_s [r_s, out]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # only the slot's real rank
        rows = r0 + offs_r  # [BLOCK_R]
        rmask = rows < rank
        hv = tl.zeros([BLOCK_R], dtype=tl.float32)
        for split in range(0, num_splits):  # fixed order: deterministic
            hv += tl.load(h_row + split * stride_hs + rows, mask=rmask, other=0.0)
        bv = tl.load(
            b_slot + cols[:, None] + rows[None, :] * out_features,
            mask=nmask[:, None] & rmask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        acc += tl.sum(bv * hv[None, :], axis=1)  # [BLOCK_N]
    out_ptrs = out_ptr + t * stride_ot + cols * stride_on  # [BLOCK_N]
    if ADD_OUT:
        nmask = cols < tl.where(rank > 0, out_features, 0)  # no LoRA term: row left untouched
        acc += tl.load(out_ptrs, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=nmask)
