"""The Triton kernels (batched LoRA against lora_reference, the fused NF4 matmul against
bitsandbytes' own dequantization): natively on CUDA when present, always on CPU in Triton's
interpreter.

Triton chooses interpreter or compiler when it is first imported, and by the time this module loads
the suite has imported it (torch._dynamo imports triton). So the `cpu-interpreter` cases run in a
child pytest started with TRITON_INTERPRET=1 (test_cpu_interpreter_child); in the parent they skip.
Running this file with TRITON_INTERPRET=1 set from the start runs them in-process.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from adapters.lora_ops import lora_reference
from adapters.nf4_matmul import nf4_matmul, supports
from adapters.triton_lora import interpreter_active, lora_triton, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

U32 = 2.0**-24  # unit roundoff of fp32
U16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
DEVICES = [pytest.param("cpu", id="cpu-interpreter")] + (
    [pytest.param("cuda", id="cuda")] if torch.cuda.is_available() else []
)
DTYPES = [  # (x dtype, stack dtype)
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, id="x32-bf16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Where the kernels run; CPU cases need this process to be in interpreter mode."""
    if request.param == "cpu" and not interpreter_active():
        pytest.skip("runs in test_cpu_interpreter_child's child process (TRITON_INTERPRET=1)")
    if request.param == "cuda" and interpreter_active():
        pytest.skip("interpreter mode: CUDA runs compiled kernels only without TRITON_INTERPRET")
    return request.param


def make_case(
    ranks: list[int], r_max: int, fan_in: int, fan_out: int, tokens: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, in], A [S, r_max, in], B [S, out, r_max] (zero past each rank), tokens, slot_ranks."""
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    A = torch.zeros(S, r_max, fan_in)
    B = torch.zeros(S, fan_out, r_max)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, fan_in, generator=g) / fan_in**0.5
        B[s, :, :r] = torch.randn(fan_out, r, generator=g)
    x = torch.randn(len(tokens), fan_in, generator=g)
    return x, A, B, torch.tensor(tokens), torch.tensor(ranks, dtype=torch.int32)


def error_bound(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Per element, the most lora_triton and lora_reference may differ by rounding alone.  [T, out]

    fp32: two fp32 sums of in + r_max terms each, in different orders: <= 2 (in + r) u32 |B| |A| |x|.
    bf16 stacks: lora_reference rounds h and its output to bf16 (u16 each), lora_triton keeps h in
    fp32 and rounds its output once (u16 on GPU; Triton's interpreter truncates: 2 u16), so
    |diff| <= 4 u16 |B| |h| on top of the fp32 term.
    """
    xr = x.to(A.dtype).double()  # both ops round x to the stacks' dtype first
    Ad, Bd = A.double().cpu(), B.double().cpu()
    T, r_max, fan_in = x.shape[0], A.shape[1], A.shape[2]
    bound = torch.zeros(T, B.shape[1], dtype=torch.float64)
    for t, s in enumerate(tokens.tolist()):
        if s < 0:
            continue
        h = Ad[s] @ xr[t].cpu()  # [r]
        bound[t] = 2 * (fan_in + r_max) * U32 * (Bd[s].abs() @ (Ad[s].abs() @ xr[t].cpu().abs()))
        if A.dtype == torch.bfloat16:
            bound[t] += 4 * U16 * (Bd[s].abs() @ h.abs())
    return bound


def assert_matches_reference(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    """got == want within the rounding bound, element by element."""
    diff = (got.double() - want.double()).abs().cpu()  # [T, out]
    worst = int((diff - bound).argmax())
    assert bool((diff <= bound).all()), (
        f"max abs diff {diff.max().item():.3g}; at element {worst} diff "
        f"{diff.flatten()[worst].item():.3g} exceeds its rounding bound {bound.flatten()[worst].item():.3g}"
    )


@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES)
def test_matches_reference_mixed_ranks(device, x_dtype, w_dtype):
    # slot 3 has rank 0 (an empty slot); -1 tokens are base-only
    tokens = [0, -1, 1, 2, 3, 2, -1]
    x, A, B, t, ranks = make_case([2, 4, 8, 0], 8, 32, 48, tokens)
    x, A, B = x.to(device, x_dtype), A.to(device, w_dtype), B.to(device, w_dtype)
    t, ranks = t.to(device), ranks.to(device)
    got = lora_triton(x, A, B, t, ranks)
    want = lora_reference(x, A, B, t)
    assert got.shape == (7, 48) and got.dtype == w_dtype and got.device == x.device
    assert_matches_reference(got, want, error_bound(x, A, B, t))
    no_lora = (t < 0) | (t == 3)
    assert bool((got[no_lora] == 0).all()), "base-only tokens and rank-0 slots must get exact zeros"


@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES)
def test_ragged_shapes_split_k(device, x_dtype, w_dtype):
    # in = 1100: three shrink splits, the last partial; out = 100: a partial expand block;
    # r_max = 20 and rank 17, 20: two rank steps of 16, the second partial
    tokens = [1, 0, -1, 2, 1, 0]
    x, A, B, t, ranks = make_case([20, 17, 3], 20, 1100, 100, tokens, seed=1)
    x, A, B = x.to(device, x_dtype), A.to(device, w_dtype), B.to(device, w_dtype)
    t, ranks = t.to(device), ranks.to(device)
    got = lora_triton(x, A, B, t, ranks)
    assert_matches_reference(got, lora_reference(x, A, B, t), error_bound(x, A, B, t))


def test_reads_only_each_slots_rank(device):
    # NaN past each slot's rank: any read of the padding would poison the result
    tokens = [0, 1, 2, 3, -1, 1]
    x, A, B, t, ranks = make_case([2, 4, 8, 0], 8, 32, 48, tokens, seed=2)
    clean = lora_triton(x.to(device), A.to(device), B.to(device), t.to(device), ranks.to(device))
    for s, r in enumerate(ranks.tolist()):
        A[s, r:] = float("nan")
        B[s, :, r:] = float("nan")
    x, A, B, t, ranks = (v.to(device) for v in (x, A, B, t, ranks))
    poisoned = lora_triton(x, A, B, t, ranks)
    assert torch.equal(poisoned, clean)


def test_token_result_independent_of_batch(device):
    # one program per token and a split of `in` fixed by the shape: bitwise batch invariance
    tokens = [2, 0, -1, 1, 2, 0, 1]
    x, A, B, t, ranks = make_case([8, 5, 3], 8, 600, 80, tokens, seed=3)
    x, A, B, t, ranks = (v.to(device) for v in (x, A, B, t, ranks))
    batch = lora_triton(x, A, B, t, ranks)
    for i in (0, 3, 6):
        alone = lora_triton(x[i : i + 1], A, B, t[i : i + 1], ranks)
        assert torch.equal(alone[0], batch[i])


def test_empty_and_base_only_batches(device):
    x, A, B, t, ranks = make_case([4, 2], 4, 32, 48, [-1, -1, -1])
    x, A, B, t, ranks = (v.to(device) for v in (x, A, B, t, ranks))
    assert torch.equal(lora_triton(x, A, B, t, ranks), torch.zeros(3, 48, device=device))
    empty = lora_triton(x[:0], A, B, t[:0], ranks)
    assert empty.shape == (0, 48)


def test_rejects_bad_operands():
    x, A, B, t, ranks = make_case([4, 2], 4, 32, 48, [0, 1])
    with pytest.raises(ValueError, match="slot_ranks"):
        lora_triton(x, A, B, t, ranks.long())
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_triton(x[:, :16], A, B, t, ranks)
    with pytest.raises(ValueError, match="tokens"):
        lora_triton(x, A, B, t[:1], ranks)


def test_cpu_interpreter_child(interpreter_child):
    """Run this file's cpu-interpreter cases in a child pytest with TRITON_INTERPRET=1."""
    interpreter_child(__file__)


def nf4_layer(n: int, k: int, nested: bool, device: str, seed: int) -> bnb.nn.Linear4bit:
    """A bnb NF4 Linear4bit of random weights, quantized by bitsandbytes on device."""
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        k, n, bias=True, compute_dtype=torch.bfloat16, compress_statistics=nested, device="meta"
    )
    weight = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=nested
    )
    layer.bias = torch.nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16))
    return layer.to(device)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain"])
@pytest.mark.parametrize(
    ("n", "k", "m"), [(96, 256, 1), (64, 384, 5), (200, 512, 33), (32, 128, 64)]
)
def test_nf4_matmul_equals_bitsandbytes_dequantization(device, nested, n, k, m):
    """x @ W.T + b with W exactly as bitsandbytes dequantizes it (its own layout, read in place).

    On CUDA the kernel's 16-bit weights equal bitsandbytes' bitwise and products of 16-bit values
    are exact in fp32, so only the fp32 summation order and the final bf16 rounding (half an ulp,
    2**-9 relative) differ from the fp32 reference: within one bf16 ulp per element and 4e-3 in
    norm. Triton's interpreter truncates fp32 -> bf16 instead of rounding (up to one more ulp per
    weight, all towards zero), hence 1e-2 there.
    """
    layer = nf4_layer(n, k, nested, device, seed=n + k + m)
    assert supports(layer)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
    state = layer.weight.quant_state
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, state)  # [n, k] bf16
    reference = x.float() @ dequantized.float().T + layer.bias.float()  # [m, n]
    got = nf4_matmul(x, layer)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    error = float((got.float() - reference).norm() / reference.norm())
    if device == "cuda":
        ulp = reference.abs().clamp_min(1e-3) * 2.0**-7
        assert bool(((got.float() - reference).abs() <= ulp).all()), error
    assert error < (1e-2 if device == "cpu" else 4e-3), error


def test_nf4_supports_only_what_the_kernel_reads():
    fp4 = bnb.nn.Linear4bit(128, 32, bias=False, quant_type="fp4", device="meta")
    fp4.weight = bnb.nn.Params4bit(torch.randn(32, 128), requires_grad=False, quant_type="fp4")
    assert not supports(fp4.to("cpu"))
    assert not supports(torch.nn.Linear(128, 32))
    assert not supports(nf4_layer(32, 192, True, "cpu", 0))  # in-features not a multiple of 128
    with pytest.raises(ValueError, match="at most 64 rows"):
        nf4_matmul(torch.zeros(65, 128, dtype=torch.bfloat16), nf4_layer(32, 128, True, "cpu", 0))


def test_kernels_compile_for_h100_without_a_gpu():
    """Both kernels lower through Triton's CUDA backend to sm_90 machine code (no device needed)."""
    if interpreter_active():
        pytest.skip("interpreter mode: the kernels are not compiled")
    pytest.importorskip("triton.backends.nvidia")
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adapters._triton_kernels import expand_kernel, shrink_kernel

    def source(fn, pointers: dict[str, str], constants: dict[str, int]) -> ASTSource:
        signature = {
            name: "constexpr" if name in constants else pointers.get(name, "i32")
            for name in fn.arg_names
        }
        return ASTSource(fn, signature, constants)

    target = GPUTarget("cuda", 90, 32)
    common = {"tokens_ptr": "*i64", "ranks_ptr": "*i32"}
    shrink = source(
        shrink_kernel,
        {**common, "x_ptr": "*bf16", "a_ptr": "*bf16", "h_ptr": "*fp32"},
        {"R_MAX": 64, "BLOCK_R": 16, "BLOCK_K": 256},
    )
    expand = source(
        expand_kernel,
        {**common, "h_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16"},
        {"R_MAX": 64, "BLOCK_R": 16, "BLOCK_N": 64},
    )
    for src in (shrink, expand):
        compiled = triton_compile(src, target=target, options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"], f"{src.name}: no cubin"
