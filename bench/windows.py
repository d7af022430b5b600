"""`loraplex bench windows`: KV memory of a sliding-window base with blocks behind the window freed.

A random Mistral-shaped checkpoint (every layer slides) serves the same long generations twice in
one run: with the engine's window trimming (KVCache.trim frees blocks no layer's window reaches) and
with it switched off (every block kept to the end, as for a full-attention base). Reported: peak KV
blocks and bytes, tokens/s (median over alternated rounds), and that both produced the same tokens.
Unquantized float32, so the two modes compute the same logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from loader.synthetic import TINY, random_checkpoint

MODEL = {  # TINY's family, wider and longer
    **TINY,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the windows benchmark."""
    parser.add_argument("--window", type=int, default=256, help="sliding window of every layer")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each mode")
    parser.add_argument("--quick", action="store_true", help="4 requests of 256 new tokens")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")


def _serve(folder: Path, args: argparse.Namespace, trim: bool) -> dict:
    """Run every request through a fresh engine; its peak blocks, blocks per step, rate, tokens."""
    from loader.config import Config
    from loader.model import load_base
    from server.engine.core import EngineCore
    from server.engine.types import SamplingParams

    per_request = args.prompt_tokens + args.new_tokens
    config = Config(
        model=str(folder),
        quant="none",
        compute_dtype="float32",
        kv_capacity_tokens=args.requests * (per_request + 16),  # room for everything kept
        max_num_seqs=args.requests,
        max_model_len=per_request,
    )
    engine = EngineCore(load_base(config), config)
    if not trim:
        engine.kv.horizon = None  # keep every block, as a full-attention base must
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    vocab = engine.base.tokenizer.vocab_size
    for i in range(args.requests):
        prompt = [
            (7 + 31 * (i * args.prompt_tokens + j)) % vocab for j in range(args.prompt_tokens)
        ]
        engine.add_request(f"r{i}", prompt, None, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(args.requests)}
    blocks, started = [], time.perf_counter()
    with tqdm(total=args.requests * args.new_tokens, desc=f"trim={'on' if trim else 'off'}") as bar:
        while engine.has_work():
            outputs = engine.step()
            blocks.append(engine.kv.used_blocks)
            for out in outputs:
                if out.token_id is not None:
                    tokens[out.request_id].append(out.token_id)
                    bar.update()
    elapsed = time.perf_counter() - started
    kv_block_bytes = engine.arch.kv_bytes_per_token(config.torch_compute_dtype) * config.block_size
    return {
        "peak_blocks": max(blocks),
        "peak_kv_mib": max(blocks) * kv_block_bytes / 2**20,
        "tokens_per_s": args.requests * args.new_tokens / elapsed,
        "blocks_per_step": blocks,
        "tokens": tokens,
    }


def _plot(path: Path, on: dict, off: dict, window: int) -> None:
    """KV blocks held per step, trimming on and off."""
    import matplotlib  # imported here: serving never needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(off["blocks_per_step"], label="every block kept")
    ax.plot(on["blocks_per_step"], label="blocks behind the window freed")
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV blocks held")
    ax.set_title(f"KV blocks of a sliding-window base (window {window})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Serve the workload with trimming on and off; print the table, write JSON and the plot."""
    from transformers import AutoTokenizer

    from loader.demo import prepare_demo

    if args.quick:
        args.requests, args.new_tokens = 4, 256
    tokenizer = AutoTokenizer.from_pretrained(prepare_demo())
    folder = Path(tempfile.mkdtemp(prefix="loraplex-windows-"))
    random_checkpoint("mistral", folder, tokenizer, sliding_window=args.window, **MODEL)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.rounds):  # alternated, so machine noise hits both alike
        for trim in (False, True):
            runs[trim].append(_serve(folder, args, trim))
    on, off = (
        {**runs[trim][0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[trim])}
        for trim in (True, False)
    )
    summary = {
        "window": args.window,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "peak_blocks_trim": on["peak_blocks"],
        "peak_blocks_keep": off["peak_blocks"],
        "peak_kv_mib_trim": round(on["peak_kv_mib"], 2),
        "peak_kv_mib_keep": round(off["peak_kv_mib"], 2),
        "kv_ratio": round(on["peak_blocks"] / off["peak_blocks"], 3),
        "throughput_ratio": round(on["tokens_per_s"] / off["tokens_per_s"], 3),
        "same_tokens": on["tokens"] == off["tokens"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "windows.json").write_text(json.dumps(summary, indent=1))
    _plot(args.results / "windows.png", on, off, args.window)
    print("| KV blocks | peak blocks | peak KV MiB | tokens/s |")
    print("|---|---|---|---|")
    for label, row in (("every block kept", off), ("behind the window freed", on)):
        print(
            f"| {label} | {row['peak_blocks']} | {row['peak_kv_mib']:.2f} | "
            f"{row['tokens_per_s']:.0f} |"
        )
    print(
        f"kv_ratio {summary['kv_ratio']}, throughput_ratio {summary['throughput_ratio']}, "
        f"same tokens: {summary['same_tokens']}"
    )
    return 0 if summary["same_tokens"] else 1
