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
from adapters.lora_ops import SlotWeights, lora_reference
from adapters.triton_lora import interpreter_active, lora_triton, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

CHILD_ENV = "LORAPLEX_TRITON_CHILD"
U32 = 2.0**-24  # unit roundoff of fp32
U16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
DEVICES = [pytest.param("cpu", id="cpu-interpreter")] + (
    [pytest.param("cuda", id="cuda")] if torch.cuda.is_available() else []
)
MAX_RANK = 32  # the scratch width the engine would pass (its --max-lora-rank)
DTYPES = [  # (x dtype, weights dtype)
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
    ranks: list[int],
    fan_in: int,
    fan_out: int,
    tokens: list[int],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[torch.Tensor, SlotWeights, torch.Tensor]:
    """x [T, in], slot weights of these ranks (rank 0: an empty slot), tokens [T]."""
    g = torch.Generator().manual_seed(seed)
    weights = SlotWeights(len(ranks), fan_in, fan_out, dtype, device)
    for s, r in enumerate(ranks):
        if r:
            A = torch.randn(r, fan_in, generator=g) / fan_in**0.5
            weights.set(s, A, torch.randn(fan_out, r, generator=g), 1.0)
    x = torch.randn(len(tokens), fan_in, generator=g)
    return x.to(device), weights, torch.tensor(tokens, device=device)


def error_bound(x: torch.Tensor, weights: SlotWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Per element, the most lora_triton and lora_reference may differ by rounding alone.  [T, out]

    fp32: two fp32 sums of in + r terms each, in different orders: <= 2 (in + r) u32 |B| |A| |x|.
    bf16 weights: lora_reference rounds h and its output to bf16 (u16 each), lora_triton keeps h
    in fp32 and rounds its output once (u16 on GPU; Triton's interpreter truncates: 2 u16), so
    |diff| <= 4 u16 |B| |h| on top of the fp32 term.
    """
    xr = x.to(weights.dtype).double().cpu()  # both ops round x to the weights' dtype first
    T, fan_in = x.shape
    bound = torch.zeros(T, weights.out_features, dtype=torch.float64)
    for t, s in enumerate(tokens.tolist()):
        if s < 0 or weights.A[s] is None:
            continue
        A, Bt = weights.A[s].double().cpu(), weights.Bt[s].double().cpu()  # [r, in], [r, out]
        h = A @ xr[t]  # [r]
        rank = A.shape[0]
        bound[t] = 2 * (fan_in + rank) * U32 * ((A.abs() @ xr[t].abs()) @ Bt.abs())
        if weights.dtype == torch.bfloat16:
            bound[t] += 4 * U16 * (h.abs() @ Bt.abs())
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
    # slot 3 is empty; -1 tokens are base-only
    tokens = [0, -1, 1, 2, 3, 2, -1]
    x, w, t = make_case([2, 4, 8, 0], 32, 48, tokens, dtype=w_dtype, device=device)
    x = x.to(x_dtype)
    got = lora_triton(x, w, t, MAX_RANK)
    want = lora_reference(x, w, t)
    assert got.shape == (7, 48) and got.dtype == w_dtype and got.device == x.device
    assert_matches_reference(got, want, error_bound(x, w, t))
    no_lora = (t < 0) | (t == 3)
    assert bool((got[no_lora] == 0).all()), "base-only tokens and empty slots must get exact zeros"


@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES)
def test_ragged_shapes_split_k(device, x_dtype, w_dtype):
    # in = 1100: three shrink splits, the last partial; out = 100: a partial expand block;
    # ranks 17 and 20: two rank steps of 16, the second partial
    tokens = [1, 0, -1, 2, 1, 0]
    x, w, t = make_case([20, 17, 3], 1100, 100, tokens, seed=1, dtype=w_dtype, device=device)
    x = x.to(x_dtype)
    got = lora_triton(x, w, t, MAX_RANK)
    assert_matches_reference(got, lora_reference(x, w, t), error_bound(x, w, t))


def test_high_ranks_up_to_256(device):
    tokens = [0, 1, -1, 2, 0]
    x, w, t = make_case([256, 130, 64], 96, 80, tokens, seed=7, device=device)
    got = lora_triton(x, w, t, 256)
    assert_matches_reference(got, lora_reference(x, w, t), error_bound(x, w, t))


def test_reads_only_each_slots_rank(device):
    # each slot's weights sit inside a NaN-filled buffer: any read past its rank would poison it
    tokens = [0, 1, 2, 3, -1, 1]
    x, w, t = make_case([2, 4, 8, 0], 32, 48, tokens, seed=2, device=device)
    clean = lora_triton(x, w, t, MAX_RANK)
    for s, rank in list(w.active.items()):
        for table, pointers, width in ((w.A, w.a_ptrs, 32), (w.Bt, w.b_ptrs, 48)):
            padded = torch.full((rank + 8, width), float("nan"), device=device)
            padded[:rank] = table[s]
            table[s] = padded  # keeps the buffer alive
            pointers[s] = padded.data_ptr()
    assert torch.equal(lora_triton(x, w, t, MAX_RANK), clean)


def test_token_result_independent_of_batch(device):
    # one program per token and a split of `in` fixed by the shape: bitwise batch invariance
    tokens = [2, 0, -1, 1, 2, 0, 1]
    x, w, t = make_case([8, 5, 3], 600, 80, tokens, seed=3, device=device)
    batch = lora_triton(x, w, t, MAX_RANK)
    for i in (0, 3, 6):
        alone = lora_triton(x[i : i + 1], w, t[i : i + 1], MAX_RANK)
        assert torch.equal(alone[0], batch[i])


def test_empty_and_base_only_batches(device):
    x, w, t = make_case([4, 2], 32, 48, [-1, -1, -1], device=device)
    assert torch.equal(lora_triton(x, w, t, MAX_RANK), torch.zeros(3, 48, device=device))
    empty = lora_triton(x[:0], w, t[:0], MAX_RANK)
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
    x, w, t = make_case([2, 4, 8, 0], 600, 80, tokens, seed=4, dtype=w_dtype, device=device)
    x = x.to(x_dtype)
    base = torch.randn(len(tokens), 80, generator=torch.Generator().manual_seed(5)).to(out_dtype)
    out = base.to(device, copy=True)  # base keeps the values before the add
    got = lora_triton(x, w, t, MAX_RANK, out)
    assert got is out and got.dtype == out_dtype
    want = base.double() + lora_reference(x, w, t).double().cpu()  # [T, out]
    assert_matches_reference(got, want, error_bound(x, w, t) + store_bound(want, out_dtype))
    no_lora = ((t < 0) | (t == 3)).cpu()
    assert torch.equal(got.cpu()[no_lora], base[no_lora]), (
        "rows without a LoRA term must be untouched"
    )


def test_layer_triton_op_matches_reference_op(device):
    # MultiLoraLinear routes through lora_triton (added into the base output) or lora_reference
    g = torch.Generator().manual_seed(6)
    linear = nn.Linear(96, 64).to(device)
    routing = StepRouting(num_slots=3, op="triton", device=device, max_rank=MAX_RANK)
    layer = MultiLoraLinear(linear, routing)
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
    bound = error_bound(x, layer.lora, t) + store_bound(results["reference"], torch.float32)
    assert_matches_reference(results["triton"], results["reference"], bound)
    assert not torch.equal(results["triton"][0], base[0]), (
        "the adapter must change its token's output"
    )
    no_lora = ((tokens < 0) | (tokens == 2)).to(device)
    assert torch.equal(results["triton"][no_lora], base[no_lora])


def test_rejects_bad_operands():
    x, w, t = make_case([4, 2], 32, 48, [0, 1])
    with pytest.raises(ValueError, match="want x"):
        lora_triton(x[:, :16], w, t, MAX_RANK)
    with pytest.raises(ValueError, match="tokens"):
        lora_triton(x, w, t[:1], MAX_RANK)
    with pytest.raises(ValueError, match="out must be"):
        lora_triton(x, w, t, MAX_RANK, torch.zeros(2, 47))
    with pytest.raises(ValueError, match="no Triton path"):
        lora_triton(x, SlotWeights(2, 32, 48, torch.float64, "cpu"), t, MAX_RANK)


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

    import triton.language as tl

    target = GPUTarget("cuda", 90, 32)
    common = {"tokens_ptr": "*i64", "ranks_ptr": "*i32"}
    shrink = source(
        shrink_kernel,
        {**common, "x_ptr": "*bf16", "a_ptrs": "*i64", "h_ptr": "*fp32"},
        {"R_MAX": 256, "BLOCK_R": 16, "BLOCK_K": 256},
    )
    expands = [
        source(
            expand_kernel,
            {**common, "h_ptr": "*fp32", "b_ptrs": "*i64", "out_ptr": "*bf16"},
            {
                "W_DTYPE": tl.bfloat16,
                "R_MAX": 256,
                "BLOCK_R": 16,
                "BLOCK_N": 64,
                "ADD_OUT": add_out,
            },
        )
        for add_out in (False, True)
    ]
    for src in (shrink, *expands):
        compiled = triton_compile(src, target=target, options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"], f"{src.name}: no cubin"
