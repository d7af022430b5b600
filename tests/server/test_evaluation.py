"""lm-evaluation-harness against the real server, end to end: `lm_eval --model local-completions`
evaluates one adapter (model = the adapter's name) on a 12-question multiple-choice task read from
local files (tests/server/eval_tasks/capitals, no hub), with the API key in OPENAI_API_KEY, prompts
sent as token ids, several prompts per request and concurrent requests.

The server runs the demo model unquantized in float32, where the engine equals transformers + PEFT
to ~1e-5 per logprob, so every loglikelihood lm-eval computed from the server's echoed prompt
logprobs must equal plain transformers + PEFT scoring the same context + continuation tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

TASK_DIR = Path(__file__).parent / "eval_tasks" / "capitals"
TASK = "capitals"
ADAPTER = "alpha"  # rank 8 on every linear layer (tests/conftest.py ADAPTER_SPECS)
API_KEY = "sk-eval-3b9d2f7c1e"
LM_EVAL_TIMEOUT_S = 300
# A loglikelihood is a sum over the continuation's tokens (1-5 here). The float32 engine and a lone
# transformers forward differ only in GEMM reduction order: ~1e-5 per logprob (DESIGN.md), and the
# README's exactness contract is 1e-3 per logprob. 2e-3 on the sum sits well inside that contract
# and far below what a wrong or missing adapter moves (checked below: > 100x this).
LL_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, adapters_dir: Path, tmp_path_factory):
    """The server on the unquantized float32 demo model with the test adapters and an API key."""
    root = tmp_path_factory.mktemp("evaluation")
    args = ["--model", str(demo_path), "--adapters", str(adapters_dir), "--quant", "none"]
    args += ["--compute-dtype", "float32", "--api-key", API_KEY]
    with launch_server(args, root / "server.log") as running:
        yield SimpleNamespace(url=running.url, log=running.log, root=root)


def run_lm_eval(srv, demo_path: Path) -> tuple[dict, list[dict], float]:
    """Run the lm_eval CLI from the task folder, offline; (results, logged samples, seconds)."""
    out = srv.root / "lm-eval-out"
    model_args = ",".join(
        [
            f"model={ADAPTER}",
            f"base_url={srv.url}/v1/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={demo_path}",
            "num_concurrent=2",
            "max_retries=1",  # a refused request fails the run at once instead of backing off
        ]
    )
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions"]
    command += ["--model_args", model_args, "--batch_size", "4", "--tasks", TASK]
    command += ["--include_path", ".", "--output_path", str(out), "--log_samples"]
    env = {
        **os.environ,
        "OPENAI_API_KEY": API_KEY,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(srv.root / "datasets-cache"),
        "TQDM_DISABLE": "1",
    }
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=TASK_DIR,  # the task's data_files path is relative to where lm_eval runs
        env=env,
        capture_output=True,
        text=True,
        timeout=LM_EVAL_TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    refused = [line for line in output.splitlines() if "API request failed" in line][:3]
    log = "\n".join([*refused, output[-3000:]])
    assert done.returncode == 0, f"lm_eval exited {done.returncode}:\n{log}"
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    samples = [json.loads(line) for p in out.rglob(f"samples_{TASK}_*.jsonl") for line in p.open()]
    assert len(results) == 1 and samples, f"no results or samples under {out}:\n{log}"
    return results[0], samples, seconds


def arguments(sample: dict) -> list[tuple[str, str]]:
    """A logged sample's (context, continuation) requests, in choice order."""
    args = sample["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
    return [
        (args[f"gen_args_{i}"]["arg_0"], args[f"gen_args_{i}"]["arg_1"]) for i in range(len(args))
    ]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the way lm-eval splits them for a causal model: trailing
    spaces move to the continuation, the whole string is encoded and the context's length cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def reference_scores(demo_path: Path, adapter_path: Path, pairs: list[tuple[str, str]]) -> dict:
    """Per (context, continuation): (loglikelihood, is_greedy) from plain transformers + PEFT in
    float32, with the adapter ("adapter") and with the bare base ("base"). All pairs go through one
    right-padded forward each way (causal: padding after a sequence does not change its logits)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_path)
    base = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    encoded = [encode_pair(tokenizer, *pair) for pair in pairs]
    width = max(len(c) + len(t) for c, t in encoded)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)  # [pairs, width], right-padded
    mask = torch.zeros_like(ids)
    for row, (context, continuation) in enumerate(encoded):
        ids[row, : len(context) + len(continuation)] = torch.tensor(context + continuation)
        mask[row, : len(context) + len(continuation)] = 1

    def score(logits) -> dict:  # logits [pairs, width, vocab]
        out = {}
        for row, (pair, (context, continuation)) in enumerate(zip(pairs, encoded, strict=True)):
            rows = logits[row, len(context) - 1 : len(context) + len(continuation) - 1]
            logprobs = torch.log_softmax(rows.float(), -1)  # [len(continuation), vocab]
            chosen = torch.tensor(continuation)
            total = float(logprobs[torch.arange(len(chosen)), chosen].sum())
            out[pair] = (total, bool((rows.argmax(-1) == chosen).all()))
        return out

    with torch.no_grad():
        adapter = score(model(input_ids=ids, attention_mask=mask).logits)
        with model.disable_adapter():
            bare = score(model(input_ids=ids, attention_mask=mask).logits)
    return {"adapter": adapter, "base": bare}


def test_lm_eval_local_completions_scores_the_adapter(srv, demo_path, peft_adapters):
    """lm-eval's run completes, and each loglikelihood it computed through the server equals
    transformers + PEFT's for the same tokens; its acc is the one those reference scores give."""
    results, samples, seconds = run_lm_eval(srv, demo_path)
    metrics = results["results"][TASK]
    acc = metrics["acc,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0, metrics
    assert len(samples) == 12

    served = {}  # (context, continuation) -> (loglikelihood, is_greedy) as lm-eval computed them
    for sample in samples:
        for pair, response in zip(arguments(sample), sample["resps"], strict=True):
            loglikelihood, greedy = response[0]  # the samples file holds them as strings
            served[pair] = (float(loglikelihood), greedy in (True, "True"))
    expected = reference_scores(demo_path, peft_adapters[ADAPTER], list(served))

    drift = {pair: abs(served[pair][0] - expected["adapter"][pair][0]) for pair in served}
    worst = max(drift, key=drift.get)
    assert drift[worst] <= LL_TOLERANCE, (
        f"{worst}: lm-eval via the server {served[worst][0]:.6f}, "
        f"transformers + PEFT {expected['adapter'][worst][0]:.6f}"
    )
    adapter_effect = max(abs(expected["base"][p][0] - expected["adapter"][p][0]) for p in served)
    assert adapter_effect > 100 * LL_TOLERANCE, "the adapter barely changes these scores"
    for pair, (_, greedy) in served.items():
        assert greedy == expected["adapter"][pair][1], f"{pair}: is_greedy {greedy}"
    assert 0 < sum(greedy for _, greedy in served.values()) < len(served)  # both kinds checked

    picks = [max(arguments(s), key=lambda pair: expected["adapter"][pair][0]) for s in samples]
    right = [
        arguments(s).index(pick) == int(s["target"]) for s, pick in zip(samples, picks, strict=True)
    ]
    reference_acc = sum(right) / len(samples)
    assert acc == pytest.approx(reference_acc)
    print(
        f"lm_eval {seconds:.1f}s, {len(served)} loglikelihoods, acc {acc:.3f} "
        f"acc_norm {metrics['acc_norm,none']:.3f}, max |server - reference| {drift[worst]:.2e}, "
        f"max |adapter - base| {adapter_effect:.2f}, {sum(g for _, g in served.values())} greedy"
    )
