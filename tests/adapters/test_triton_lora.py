"""The Triton LoRA kernels against lora_reference: natively on CUDA when present, always on CPU in
Triton's interpreter.

Triton chooses interpreter or compiler when it is first imported, and by the time this module loads
the suite has imported it (torch._dynamo imports triton). So the `cpu-interpreter` cases run in a
child pytest started with TRITON_INTERPRET=1 (test_cpu_interpreter_child); in the parent they skip.
Running this file with TRITON_INTERPRET=1 set from the start runs them in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters.format import LoraModule
from adapters.layer import MultiLoraLinear, StepRouting
from adapters.lora_ops import lora_reference
from adapters.triton_lora import interpreter_active, lora_triton, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CHILD_ENV = "LORAPLEX_TRITON_CHILD"
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


def store_bound(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The most one rounding of total [T, out] to dtype can move it (the interpreter truncates)."""
    unit = 2 * U16 if dtype == torch.bfloat16 else U32
    return unit * total.double().abs().cpu()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out32", "out16"])
@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES)
def test_adds_into_out_in_place(device, x_dtype, w_dtype, out_dtype):
    # the expand kernel adds the LoRA term to a given output (the base layer's) in fp32, one rounding
    tokens = [0, -1, 1, 2, 3, 2, -1]
    x, A, B, t, ranks = make_case([2, 4, 8, 0], 8, 600, 80, tokens, seed=4)
    x, A, B = x.to(device, x_dtype), A.to(device, w_dtype), B.to(device, w_dtype)
    t, ranks = t.to(device), ranks.to(device)
    base = torch.randn(len(tokens), 80, generator=torch.Generator().manual_seed(5)).to(out_dtype)
    out = base.to(device, copy=True)  # base keeps the values before the add
    got = lora_triton(x, A, B, t, ranks, out)
    assert got is out and got.dtype == out_dtype
    want = base.double() + lora_reference(x, A, B, t).double().cpu()  # [T, out]
    assert_matches_reference(got, want, error_bound(x, A, B, t) + store_bound(want, out_dtype))
    no_lora = ((t < 0) | (t == 3)).cpu()
    assert torch.equal(got.cpu()[no_lora], base[no_lora]), (
        "rows without a LoRA term must be untouched"
    )


def test_layer_triton_op_matches_reference_op(device):
    # MultiLoraLinear routes through lora_triton (added into the base output) or lora_reference
    g = torch.Generator().manual_seed(6)
    linear = nn.Linear(96, 64).to(device)
    routing = StepRouting(num_slots=3, op="triton", device=device)
    layer = MultiLoraLinear(linear, routing, max_rank=8)
    for slot, rank in enumerate((8, 3)):  # slot 2 stays empty
        module = LoraModule(
            torch.randn(rank, 96, generator=g), torch.randn(64, rank, generator=g), 0.5
        )
        layer.set_slot(slot, module)
    tokens = torch.tensor([1, -1, 0, 2, 0])  # on the host, as the runner passes them
    x = torch.randn(5, 96, generator=g).to(device)
    results = {}
    for op in ("triton", "reference"):
        routing.op = op
        routing.set(tokens)
        with torch.no_grad():
            results[op] = layer(x)  # [5, 64]
        routing.set(None)
    with torch.no_grad():
        base = linear(x)
    t = tokens.to(device)
    bound = error_bound(x, layer.lora_A, layer.lora_B, t) + store_bound(
        results["reference"], torch.float32
    )
    assert_matches_reference(results["triton"], results["reference"], bound)
    assert not torch.equal(results["triton"][0], base[0]), (
        "the adapter must change its token's output"
    )
    no_lora = ((tokens < 0) | (tokens == 2)).to(device)
    assert torch.equal(results["triton"][no_lora], base[no_lora])


def test_rejects_bad_operands():
    x, A, B, t, ranks = make_case([4, 2], 4, 32, 48, [0, 1])
    with pytest.raises(ValueError, match="slot_ranks"):
        lora_triton(x, A, B, t, ranks.long())
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_triton(x[:, :16], A, B, t, ranks)
    with pytest.raises(ValueError, match="tokens"):
        lora_triton(x, A, B, t[:1], ranks)
    with pytest.raises(ValueError, match="out must be"):
        lora_triton(x, A, B, t, ranks, torch.zeros(2, 47))


def test_cpu_interpreter_child():
    """Run this file's cpu-interpreter cases in a child pytest with TRITON_INTERPRET=1."""
    if interpreter_active():
        pytest.skip("this process is in interpreter mode: the CPU cases ran in-process")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", CHILD_ENV: "1"}
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q"]
    command += ["-k", "cpu-interpreter", "--noconftest", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


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
    expands = [
        source(
            expand_kernel,
            {**common, "h_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16"},
            {"R_MAX": 64, "BLOCK_R": 16, "BLOCK_N": 64, "ADD_OUT": add_out},
        )
        for add_out in (False, True)
    ]
    for src in (shrink, *expands):
        compiled = triton_compile(src, target=target, options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"], f"{src.name}: no cubin"
