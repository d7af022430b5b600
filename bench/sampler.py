"""`loraplex bench sampler`: the batched sampler (server/engine/sampler.py) against the per-row
sampler it replaced (kept here as old_sample), one call's wall time on random float32 logits
[batch, vocab].

For every vocabulary size (default 49,152 and 128,256) and batch size (default 1, 8 and 64), each
case gives every row the same parameters:

- sampled: temperature 0.8, top_p 0.95, top_k 50 (what both samplers support)
- greedy: temperature 0 (argmax: both samplers should stay cheap)
- temperature: temperature 0.8 alone (no top-k or top-p, so neither sampler sorts)
- logprobs: sampled, with the chosen token's logprob and the top 5
- seeded: sampled, each row with its own seed (its own generator)
- top_p, top_p_peaked: top_p 0.95 without top_k at temperature 0.8 (a nucleus of thousands of
  tokens) and 0.3 (a peaked distribution, as a language model's often is)
- min_p: sampled with min_p 0.05 (the batched sampler only)
- penalties: sampled with repetition 1.1, frequency 0.5 and presence 0.5 over 256 prompt and 64
  generated tokens per row (the batched sampler only)

Each case warms both samplers up, then times them in alternation (old new, new old, ...: drift on a
shared machine hits both alike); reported are the median and p90 milliseconds per call and the ratio
of medians old / new (above 1: the batched sampler is faster). On CUDA every call is synchronized.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.workload import parse_ints
from server.engine import penalties
from server.engine import sampler as batched
from server.engine.sampler import Sample
from server.engine.sampler import sample as new_sample
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams

VOCABS = "49152,128256"  # SmolLM2 / Llama 3
BATCHES = "1,8,64"
QUICK = {"repeats": 5, "warmup": 1}
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 64
SAMPLED: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "top_k": 50}
# case -> (every row's sampling parameters, the samplers that support them)
CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "sampled": (SAMPLED, ("old", "new")),
    "greedy": ({"temperature": 0.0}, ("old", "new")),
    "temperature": ({"temperature": 0.8}, ("old", "new")),  # no top-k / top-p: no sort
    "logprobs": ({**SAMPLED, "logprobs": 5}, ("old", "new")),
    "seeded": (SAMPLED, ("old", "new")),  # each row seeded with its index
    # top_p without top_k: at temperature 0.8 the nucleus of N(0, 3^2) logits is thousands of
    # tokens (the batched sampler's candidates miss it and it sorts the batch); at 0.3 it is small
    "top_p": ({"temperature": 0.8, "top_p": 0.95}, ("old", "new")),
    "top_p_peaked": ({"temperature": 0.3, "top_p": 0.95}, ("old", "new")),
    "min_p": ({**SAMPLED, "min_p": 0.05}, ("new",)),
    "penalties": (
        {**SAMPLED, "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5},
        ("new",),
    ),
}
COMPARED = [case for case, (_, samplers) in CASES.items() if "old" in samplers]
EXTRA = [case for case, (_, samplers) in CASES.items() if "old" not in samplers]


# the baseline -----------------------------------------------------------------------------------
def _old_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k and outside the top-p nucleus with -inf.

    bf16 logits tie often: a stable sort breaks ties by token id, as argmax does, so top_k=1 is greedy.
    """
    if not top_k and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)  # [V], [V]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k:
        drop[top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), -1)
        drop |= probs.cumsum(-1) - probs >= top_p  # keep the token that crosses p
        drop[0] = False  # and the most likely one, whatever p (a tiny p rounds to 0 in float32)
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def old_sample(
    logits: torch.Tensor, seqs: list[Sequence], raw: torch.Tensor | None = None
) -> list[Sample]:
    """The per-row sampler loraplex shipped before the batched one (server/engine/sampler.py up
    to commit 7b63e0b), kept only as this benchmark's baseline (a copy of its `sample` and
    `_filter`): a Python loop over the rows of logits [N, V], each filtered (sort, top-k, top-p),
    softmaxed and drawn with torch.multinomial from its sequence's own generator. Its sequences
    need a generator each when sampled (the old Sequence made one; see _sequences)."""
    greedy_ids = logits.argmax(-1).tolist()  # [N]
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    source = logits if raw is None else raw
    logprobs = torch.log_softmax(source, -1) if want_logprobs else None  # [N, V]
    samples = []
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.greedy:
            token = greedy_ids[row]
        else:
            scaled = _old_filter(logits[row] / params.temperature, params.top_k, params.top_p)
            probs = torch.softmax(scaled, -1)  # [V]
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        logprob, top = None, []
        if logprobs is not None and params.logprobs is not None:
            logprob = float(logprobs[row, token])
            if params.logprobs:
                values, ids = torch.topk(logprobs[row], params.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
        samples.append(Sample(token, logprob, top))
    return samples


# the measurement --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the sampler micro-benchmark."""
    parser.add_argument("--vocab", default=VOCABS, help=f"vocabulary sizes (default {VOCABS})")
    parser.add_argument("--batch", default=BATCHES, help=f"batch sizes (default {BATCHES})")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per sampler and case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--quick", action="store_true", help="5 timed calls after 1 warm-up")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seed", type=int, default=0, help="logits and token ids")
    parser.add_argument(
        "--results",
        "--out",
        dest="results",
        type=Path,
        default=Path("results"),
        help="folder of sampler.json, sampler.md and sampler.png",
    )
    parser.add_argument("--json", type=Path, default=None, help="default: RESULTS/sampler.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: RESULTS/sampler.png")


def _sequences(
    case: str, sampler: str, batch: int, vocab: int, device: torch.device, rng: torch.Generator
) -> list[Sequence]:
    """batch sequences with the case's parameters, PROMPT_TOKENS random prompt and OUTPUT_TOKENS
    random generated ids each; for the old sampler with a generator each, as its Sequence made."""
    settings, _ = CASES[case]
    seqs = []
    for row in range(batch):
        seed = row if case == "seeded" else None
        params = SamplingParams(max_tokens=OUTPUT_TOKENS + 1, seed=seed, **settings)
        prompt = torch.randint(vocab, (PROMPT_TOKENS,), generator=rng).tolist()
        seq = Sequence(f"{case}-{row}", prompt, None, params)
        seq.output_ids = torch.randint(vocab, (OUTPUT_TOKENS,), generator=rng).tolist()
        if sampler == "old" and not params.greedy:
            seq.generator = torch.Generator(device)
            if seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(seed)
        seqs.append(seq)
    return seqs


def _call(sampler: str, logits: torch.Tensor, seqs: list[Sequence]) -> Callable[[], list[Sample]]:
    """One sampler's call on logits [B, V] for seqs."""
    sample = old_sample if sampler == "old" else new_sample
    return lambda: sample(logits, seqs)


def _timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure_case(
    logits: torch.Tensor,
    case: str,
    repeats: int,
    warmup: int,
    rng: torch.Generator,
) -> dict[str, list[float]]:
    """Seconds per call of each sampler supporting the case on logits [B, V], calls alternated."""
    batch, vocab = logits.shape
    calls = {
        name: _call(name, logits, _sequences(case, name, batch, vocab, logits.device, rng))
        for name in CASES[case][1]
    }
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for index in range(repeats):
        for name in order if index % 2 == 0 else order[::-1]:
            times[name].append(_timed(calls[name], logits.device))
    return times


def _ms(seconds: list[float]) -> dict[str, float]:
    """Median and p90 milliseconds of per-call seconds."""
    p50, p90 = np.percentile(np.array(seconds) * 1e3, [50, 90]).tolist()
    return {"median": round(p50, 3), "p90": round(p90, 3)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every vocab x batch x case: {"ms": {vocab: {batch: {case: {sampler: {median, p90}}}}},
    "ratio_old_over_new": {case: {vocab: {batch: ratio of medians}}}} (JSON keys are strings)."""
    device = torch.device(args.device)
    vocabs, batches = parse_ints(args.vocab), parse_ints(args.batch)
    rng = torch.Generator().manual_seed(args.seed)
    ms: dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]] = {}
    ratios: dict[str, dict[str, dict[str, float]]] = {case: {} for case in COMPARED}
    jobs = [(v, b, c) for v in vocabs for b in batches for c in CASES]
    for vocab, batch, case in tqdm(jobs, desc="sampler", leave=False):
        # logits of a trained head spread over a few units; random ones alike
        logits = (torch.randn(batch, vocab, generator=rng) * 3).to(device)  # [B, V]
        times = measure_case(logits, case, args.repeats, args.warmup, rng)
        row = ms.setdefault(str(vocab), {}).setdefault(str(batch), {})
        row[case] = {name: _ms(seconds) for name, seconds in times.items()}
        if case in ratios:
            ratio = statistics.median(times["old"]) / statistics.median(times["new"])
            ratios[case].setdefault(str(vocab), {})[str(batch)] = round(ratio, 3)
    return {"ms": ms, "ratio_old_over_new": ratios}


# the report -------------------------------------------------------------------------------------
def table(summary: dict[str, Any]) -> str:
    """Markdown tables: old against new per compared case, then the batched sampler's extras."""
    ms, ratios = summary["ms"], summary["ratio_old_over_new"]
    lines = [
        "| case | vocab | batch | old p50 (ms) | old p90 | new p50 (ms) | new p90 | old / new |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in COMPARED:
        for vocab, batches in ms.items():
            for batch, cases in batches.items():
                old, new = cases[case]["old"], cases[case]["new"]
                lines.append(
                    f"| {case} | {vocab} | {batch} | {old['median']:.2f} | {old['p90']:.2f} | "
                    f"{new['median']:.2f} | {new['p90']:.2f} | "
                    f"**{ratios[case][vocab][batch]:.2f}** |"
                )
    lines += [
        "",
        "| vocab | batch | new sampled p50 (ms) | "
        + " | ".join(f"new {case} p50 (ms)" for case in EXTRA)
        + " |",
        "|---|---|---|" + "---|" * len(EXTRA),
    ]
    for vocab, batches in ms.items():
        for batch, cases in batches.items():
            extras = " | ".join(f"{cases[case]['new']['median']:.2f}" for case in EXTRA)
            lines.append(
                f"| {vocab} | {batch} | {cases['sampled']['new']['median']:.2f} | {extras} |"
            )
    return "\n".join(lines)


def plot(path: Path, summary: dict[str, Any]) -> None:
    """One column per vocabulary: median ms per call against batch size (old dashed, new solid),
    and below it the ratio old / new of each case both samplers run."""
    import matplotlib  # imported here: serving never needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms, ratios = summary["ms"], summary["ratio_old_over_new"]
    fig, axes = plt.subplots(
        2, len(ms), figsize=(6 * len(ms), 8), squeeze=False, gridspec_kw={"height_ratios": [2, 1]}
    )
    for column, (vocab, batches) in enumerate(ms.items()):
        time_ax, ratio_ax = axes[0][column], axes[1][column]
        sizes = [int(b) for b in batches]
        for color, case in enumerate(CASES):
            for sampler in CASES[case][1]:
                time_ax.plot(
                    sizes,
                    [batches[str(b)][case][sampler]["median"] for b in sizes],
                    "--" if sampler == "old" else "-",
                    marker="o",
                    color=f"C{color}",
                    label=f"{sampler} {case}",
                )
            if case in ratios:
                ratio_ax.plot(
                    sizes,
                    [ratios[case][vocab][str(b)] for b in sizes],
                    marker="o",
                    color=f"C{color}",
                    label=case,
                )
        ratio_ax.axhline(1.0, color="gray", linewidth=0.8)
        for ax in (time_ax, ratio_ax):
            ax.set_xscale("log")
            ax.set_xticks(sizes, [str(b) for b in sizes])
        time_ax.set_yscale("log")
        time_ax.set_ylabel("ms per call (median)")
        time_ax.set_title(f"vocab {int(vocab):,}")
        ratio_ax.set_xlabel("batch (rows sampled per call)")
        ratio_ax.set_ylabel("old / new (> 1: batched faster)")
    axes[0][-1].legend(fontsize=8, ncol=2)
    axes[1][-1].legend(fontsize=8)
    device = summary["settings"]["device"]
    threads = summary["settings"]["threads"]
    fig.suptitle(
        f"sampler: per-row (old, dashed) vs batched (new), {device}, torch threads: {threads}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sources() -> dict[str, str]:
    """Which batched sampler is measured: the first 12 hex digits of the sha256 of the working
    tree's sampler.py and penalties.py, committed or not."""
    paths = [Path(module.__file__) for module in (batched, penalties)]
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for path in paths}


def run(args: argparse.Namespace) -> int:
    """Measure, print the tables, write the JSON, the markdown tables and the plot."""
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sources = _sources()
    summary = measure(args)
    summary["settings"] = {
        "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "cpu",
        "cases": {case: {**settings, "samplers": list(s)} for case, (settings, s) in CASES.items()},
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "source_sha256": sources,
    }
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    json_path = args.json or args.results / "sampler.json"
    plot_path = args.plot or args.results / "sampler.png"
    markdown_path = args.results / "sampler.md"
    for path in (json_path, plot_path, markdown_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    markdown_path.write_text(table(summary) + "\n")
    plot(plot_path, summary)
    print(table(summary))
    print(f"wrote {json_path}, {markdown_path}, {plot_path} ({summary['wall_s']} s)")
    return 0
