"""`loraplex bench engine --device cuda`: decode tokens/s on a GPU against the bandwidth floor.

For each Llama shape (random weights, decoder linears quantized to NF4 in place, see
loader.synthetic) and each (batch B, adapter count N): B requests of --prompt-tokens random ids,
request j on adapter j mod N (N = 0: the bare base), prefilled, then decode steps timed in rounds
(median kept). The floor and its ratio come from bench.engine_cuda_floor; PEFT `generate(
adapter_names=...)` on its own copy of the same base is timed on the same GPU for --peft-points,
its decode rate taken as the difference between generating 1 and 1 + T tokens.
Writes results/bench-engine-cuda/{engine-cuda.md, engine-cuda.json}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from adapters.format import AdapterWeights, LoraModule, base_linear_shapes
from bench.engine_cuda_floor import (
    adapter_bytes,
    copy_bandwidth,
    step_bytes,
    weight_bytes_per_step,
)
from bench.engine_cuda_report import markdown, write_json
from bench.engine_systems import PEFT_BASE_NAME
from bench.workload import STRENGTH, adapter_name, lora_stds, parse_ints
from loader.config import Config
from loader.synthetic import synthetic_base
from server.engine.core import EngineCore
from server.engine.types import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options used only with --device cuda (the shared ones live in bench.engine)."""
    group = parser.add_argument_group("--device cuda")
    group.add_argument("--shapes", default="llama3-8b,llama3-1b", help="synthetic base shapes")
    group.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    group.add_argument("--adapter-counts", default="0,8,32,128", help="adapters N per grid row")
    group.add_argument("--targets", default="all", help="adapted projections, or `all` linears")
    group.add_argument("--decode-steps", type=int, default=16, help="timed steps per round")
    group.add_argument("--peft-points", default="8x8,32x32", help="PEFT runs as BATCHxN pairs")
    group.add_argument("--eager-points", default="1x0,1x32,64x0,64x32", help="graphs-off runs")


def random_adapters(
    shapes: dict[str, tuple[int, int]], targets: list[str], rank: int, count: int, seed: int
) -> list[AdapterWeights]:
    """count adapters of random A, B (bf16, host memory), sized like bench.workload's PEFT ones."""
    generator = torch.Generator("cuda").manual_seed(seed)
    adapters = []
    for i in range(count):
        modules = {}
        for path, (width, out) in shapes.items():
            if path.rsplit(".", 1)[-1] not in targets:
                continue
            a_std, b_std = lora_stds(width, rank, STRENGTH)
            A = torch.randn(rank, width, generator=generator, device="cuda") * a_std
            B = torch.randn(out, rank, generator=generator, device="cuda") * b_std
            modules[path] = LoraModule(A.bfloat16().cpu(), B.bfloat16().cpu(), 2.0)
        adapters.append(AdapterWeights(adapter_name(i), f"<random {i}>", modules))
    return adapters


def decode_rate(
    engine: EngineCore, batch: int, count: int, args: argparse.Namespace, vocab: int
) -> tuple[float, float]:
    """Median decode tokens/s over rounds and the mean context length while timed."""
    steps, rounds = args.decode_steps, args.repeats
    # slack: sequences prefilled in an earlier step than the last one are a few tokens ahead
    params = SamplingParams(max_tokens=4 + steps * rounds + 16, temperature=0, ignore_eos=True)
    ids = torch.randint(256, vocab - 256, (batch, args.prompt_tokens)).tolist()
    rids = [f"b{batch}-n{count}-{j}" for j in range(batch)]
    for j, rid in enumerate(rids):
        engine.add_request(rid, ids[j], adapter_name(j % count) if count else None, params)
    seqs = [engine.seqs[rid] for rid in rids]
    while not all(s.output_ids for s in seqs):  # prefill
        engine.step()
    for _ in range(4):  # warm-up: graph capture, slot placement
        engine.step()
    samples, contexts = [], []
    for _ in range(rounds):
        contexts.append(statistics.mean(s.length for s in seqs) + steps / 2)
        torch.cuda.synchronize()
        start = time.perf_counter()
        produced = sum(
            len([o for o in engine.step() if o.token_id is not None]) for _ in range(steps)
        )
        torch.cuda.synchronize()
        if produced != batch * steps:
            raise RuntimeError(f"expected {batch * steps} decode tokens, got {produced}")
        samples.append(produced / (time.perf_counter() - start))
    for rid in rids:
        engine.abort(rid)
    return statistics.median(samples), statistics.mean(contexts)


@torch.inference_mode()
def peft_decode_rate(
    peft: torch.nn.Module, batch: int, count: int, args: argparse.Namespace, vocab: int
) -> float:
    """PEFT mixed-batch decode tokens/s: generate 1 + T tokens minus generate 1, same prompts."""
    ids = torch.randint(256, vocab - 256, (batch, args.prompt_tokens), device="cuda")
    names = [adapter_name(j % count) if count else PEFT_BASE_NAME for j in range(batch)]

    def timed(new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            adapter_names=names,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up
    steps = args.decode_steps
    return batch * steps / max(timed(1 + steps) - timed(1), 1e-9)


def build_peft(
    base_model: torch.nn.Module, adapters: list[AdapterWeights], targets: list[str]
) -> torch.nn.Module:
    """PEFT LoRA on a copy of the quantized base holding the same adapters' weights."""
    from peft import LoraConfig, get_peft_model

    rank = adapters[0].rank
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(base_model), config, adapter_name=adapters[0].name)
    for weights in adapters[1:]:
        peft.add_adapter(weights.name, config)
    inner = peft.base_model.model
    with torch.no_grad():
        for weights in adapters:
            for path, module in weights.modules.items():
                layer = inner.get_submodule(path)
                layer.lora_A[weights.name].weight.copy_(module.A)
                layer.lora_B[weights.name].weight.copy_(module.B)
    return peft.eval()


def _points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part.strip()]


def bench_shape(shape: str, args: argparse.Namespace, bandwidth: float) -> dict:
    """Every grid point of one shape: engine (graphs on), a few graphs off, PEFT, the floor."""
    batches, counts = parse_ints(args.batches), parse_ints(args.adapter_counts)
    config = Config(
        device="cuda",
        max_loras=max(max(counts), 1),
        max_cpu_loras=max(max(counts), 1),
        max_lora_rank=args.rank,
        max_num_seqs=max(batches),
        max_batch_tokens=max(2048, max(batches)),
        kv_capacity_tokens=max(batches) * (args.prompt_tokens + args.decode_steps * 8 + 96),
        max_model_len=args.prompt_tokens + args.decode_steps * 8 + 64,
    )
    started = time.perf_counter()
    base = synthetic_base(shape, config, seed=args.seed)
    model, vocab = base.model, base.model.config.vocab_size
    weights = weight_bytes_per_step(model)
    shapes = base_linear_shapes(model)
    targets = (
        sorted({p.rsplit(".", 1)[-1] for p in shapes})
        if args.targets == "all"
        else (args.targets.split(","))
    )
    adapters = random_adapters(shapes, targets, args.rank, max(counts), args.seed)
    peft_points = [(b, n) for b, n in _points(args.peft_points) if 0 < n <= max(counts)]
    peft_n = max((n for _, n in peft_points), default=0)
    peft = build_peft(model, adapters[:peft_n], targets) if peft_n else None
    engine = EngineCore(base, config)
    kv_token = engine.arch.kv_bytes_per_token(torch.bfloat16)
    for weights_i in adapters:
        engine.add_adapter(weights_i)
    print(f"{shape}: built in {time.perf_counter() - started:.0f} s")
    one_adapter = adapter_bytes(shapes, targets, args.rank)
    rows = []
    for batch in batches:
        for count in counts:
            rate, context = decode_rate(engine, batch, count, args, vocab)
            distinct = min(batch, count)
            need = step_bytes(weights, one_adapter, distinct, kv_token, batch, context)
            floor = batch * bandwidth / need.total
            row = {"batch": batch, "adapters": count, "distinct_in_batch": distinct}
            row |= {"tokens_per_s": rate, "floor_tokens_per_s": floor, "of_floor": rate / floor}
            row |= {"bytes_weights": need.weights, "bytes_lora": need.lora, "bytes_kv": need.kv}
            if (batch, count) in _points(args.eager_points):
                graphs, engine.runner.graphs = engine.runner.graphs, None
                row["tokens_per_s_no_graphs"] = decode_rate(engine, batch, count, args, vocab)[0]
                engine.runner.graphs = graphs
            if peft is not None and (batch, count) in peft_points:
                row["peft_tokens_per_s"] = peft_decode_rate(peft, batch, count, args, vocab)
            rows.append(row)
            print(
                f"{shape} B={batch:3d} N={count:3d}: {rate:8.0f} tok/s, {rate / floor:.2f} of floor"
            )
    engine.close()
    return {
        "shape": shape,
        "targets": targets,
        "graphs_captured": len(engine.runner.graphs.graphs) if engine.runner.graphs else 0,
        "weight_bytes_per_step": weights,
        "adapter_bytes": one_adapter,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> int:
    """Run the GPU grid for every shape; print and write the table and JSON."""
    if not torch.cuda.is_available():
        raise SystemExit("bench engine --device cuda: no CUDA device is visible to torch")
    out = Path(args.out if args.out != "results/bench-engine" else "results/bench-engine-cuda")
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    shapes = [bench_shape(s.strip(), args, bandwidth) for s in args.shapes.split(",") if s.strip()]
    settings = {
        "device": device,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "torch": torch.__version__,
        "rank": args.rank,
        "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps,
        "rounds": args.repeats,
    }
    table = markdown(shapes, settings)
    (out / "engine-cuda.md").write_text(table + "\n")
    write_json(shapes, settings, out / "engine-cuda.json")
    if args.json:
        write_json(shapes, settings, Path(args.json))
    print(f"\n{table}\nwrote {out / 'engine-cuda.md'}, {out / 'engine-cuda.json'}")
    return 0
