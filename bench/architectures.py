"""`loraplex bench architectures`: every causal-LM family of the installed transformers, served or
refused, never silently wrong.

Each model type of transformers' AutoModelForCausalLM mapping runs in a child process (a time and
memory limit each): a tiny random config (hidden 64, two layers, window 8 where the config has one)
with random weights, the engine unquantized in float32 (two requests longer than the window, prefill
in chunks across it), and transformers with eager attention forced along the engine's tokens. Verdicts:
exact (same greedy tokens, logprobs within 1e-3), wrong, refused (the start-up message), or not built
(the generic tiny config does not fit the family: multimodal, encoder-decoder, validation). Writes
results/architectures.json and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from loader.synthetic import TINY

DIMS = {**TINY, "num_key_value_heads": 2, "vocab_size": 512, "sliding_window": 8}  # 2 KV heads: MLA
TOLERANCE = 1e-3
CHILD_SECONDS = 120
CHILD_BYTES = 8 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the architectures sweep."""
    parser.add_argument("--types", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's own run
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")


def judge(model_type: str) -> dict:
    """The verdict on one model type (run in the child process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loader.architecture import UnsupportedArchitecture
    from loader.config import Config
    from loader.demo import prepare_demo
    from loader.model import BaseModel
    from server.engine.core import EngineCore
    from server.engine.types import SamplingParams

    try:
        config = AutoConfig.for_model(model_type, **DIMS)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
        reference.load_state_dict(model.state_dict())
        reference.eval().set_attn_implementation("eager")
    except Exception as error:  # noqa: BLE001 - the generic config does not fit this family
        return {"status": "not built", "detail": f"{type(error).__name__}: {error}"[:300]}
    folder = Path(tempfile.mkdtemp(prefix=f"loraplex-{model_type}-"))
    config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(prepare_demo())
    cfg = Config(model=str(folder), quant="none", compute_dtype="float32", max_batch_tokens=12)
    try:
        engine = EngineCore(BaseModel(model, tokenizer, folder, cfg), cfg)
    except UnsupportedArchitecture as error:
        return {"status": "refused", "detail": str(error)}
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (20, 15)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, None, params)
    outputs: dict[str, list] = collections.defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            if out.error:
                return {"status": "wrong", "detail": f"engine error: {out.error}"}
            if out.token_id is not None:
                outputs[out.request_id].append((out.token_id, out.logprob))
    same, worst = True, 0.0
    for i, ids in enumerate(prompts):
        tokens = [t for t, _ in outputs[str(i)]]
        with torch.no_grad():
            logits = reference(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
        same &= logits.argmax(-1).tolist() == tokens
        expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), tokens]
        got = torch.tensor([lp for _, lp in outputs[str(i)]])
        worst = max(worst, float((expected - got).abs().max()))
    status = "exact" if same and worst < TOLERANCE else "wrong"
    return {"status": status, "max_logprob_diff": worst, "attention": engine.arch.features()}


def _limit_child() -> None:
    """Address-space limit of a child (a family with huge defaults fails alone)."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_BYTES, CHILD_BYTES))


def _child(model_type: str) -> dict:
    """judge(model_type) in a child process, with its time and memory limits."""
    command = [sys.executable, "-m", "bench.architectures", "--one", model_type]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CHILD_SECONDS,
            preexec_fn=_limit_child,
        )
    except subprocess.TimeoutExpired:
        return {"status": "not built", "detail": f"over {CHILD_SECONDS} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"status": "not built", "detail": done.stderr.strip()[-300:]}
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> int:
    """Judge every (or each chosen) model type; print the table, write the JSON."""
    if args.one:
        print(json.dumps(judge(args.one)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t in args.types.split(",") if t] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    verdicts = {t: _child(t) for t in tqdm(types, desc="model types")}
    counts = collections.Counter(v["status"] for v in verdicts.values())
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "architectures.json").write_text(json.dumps(verdicts, indent=1))
    print("| model type | verdict | attention served / reason |")
    print("|---|---|---|")
    for model_type, v in verdicts.items():
        detail = v.get("attention") or v.get("detail", "")
        print(f"| {model_type} | {v['status']} | {detail[:160].replace('|', '/')} |")
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
