"""`loraplex bench train`: the loraplex trainer vs plain PEFT + transformers Trainer.

Both arms train the same NF4 base (loaded by `loader.model.load_base`), on the same tokenized data
with the same LoRA config, batch size, learning rate, schedule and step count. Each arm runs in its
own fresh (spawned) process, so its peak RSS is its own; tokens/s counts non-padding input tokens
over the time spent in training steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("loraplex", "peft-trainer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the trainer benchmark."""
    parser.add_argument("--model", default="demo", help="base model source")
    parser.add_argument("--task", default="digits", help="demo task generating the data")
    parser.add_argument("--examples", type=int, default=400, help="generated training examples")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per arm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm (median reported)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="output folder")


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tail_mean(losses: list[float]) -> float:
    """Mean training loss over the last 5 steps."""
    tail = losses[-5:]
    return sum(tail) / len(tail)


def _arm_loraplex(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with `adapters.train.trainer.train` and report its step-loop figures."""
    from adapters.train.config import TrainConfig
    from adapters.train.trainer import train
    from loader.config import Config

    cfg = TrainConfig(rank=spec["rank"], alpha=spec["rank"], lr=spec["lr"], warmup_steps=3,
                      max_steps=spec["steps"], batch_size=spec["batch_size"], max_len=256,
                      eval_split=0, save_every=0, seed=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        result = train(Config(model=spec["model"]), cfg, Path(spec["data"]), Path(tmp) / "a")
    res = result.manifest["results"]
    loss = _tail_mean(res["loss_history"])
    return {"tokens": res["tokens"], "seconds": res["train_seconds"], "loss": loss}


def _arm_peft_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the same LoRA with a stock transformers Trainer (full-logit loss through labels=)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from adapters.train.data import load_dataset
    from loader.config import Config
    from loader.model import load_base

    base = load_base(Config(model=spec["model"]))
    data = load_dataset(Path(spec["data"]), base.tokenizer, 256)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.examples]
    lora = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.05,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base.model, lora)
    collate = DataCollatorForSeq2Seq(base.tokenizer, padding=True, label_pad_token_id=-100)
    counted = {"seconds": 0.0, "began": 0.0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            counted["began"] = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            counted["seconds"] += time.perf_counter() - counted["began"]

    with tempfile.TemporaryDirectory() as tmp:
        arguments = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"], learning_rate=spec["lr"], warmup_steps=3,
            lr_scheduler_type="constant_with_warmup", max_grad_norm=0.3, weight_decay=0.0,
            optim="adamw_torch", logging_steps=1, save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
        )  # fmt: skip
        trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate,
                          callbacks=[StepTimer()])  # fmt: skip
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": counted["seconds"], "loss": _tail_mean(losses)}


def _run_arm(arm: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a spawned arm process: its figures plus its own peak RSS and wall time."""
    began = time.perf_counter()
    figures = _arm_loraplex(spec) if arm == "loraplex" else _arm_peft_trainer(spec)
    return figures | {"wall": time.perf_counter() - began, "peak_rss": _rss_peak()}


def _table(rows: dict[str, dict[str, Any]], spec: dict[str, Any]) -> str:
    """The markdown results table, ours first, with ratios against the PEFT + Trainer arm."""
    ref = rows["peft-trainer"]
    lines = [
        f"steps {spec['steps']}, batch {spec['batch_size']}, rank {spec['rank']}, "
        f"task {spec['task']}, model {spec['model']}, repeats {spec['repeats']} (median)",
        "",
        "| arm | tokens/s | step-loop s | peak RSS MiB | train loss, last 5 steps | process wall s |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        lines.append(
            f"| {arm} | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} "
            f"| {r['loss']:.4f} | {r['wall']:.1f} |"
        )
    ours = rows["loraplex"]
    lines += [
        "",
        f"tokens/s ratio loraplex / PEFT+Trainer: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x; "
        f"peak RSS ratio: {ours['peak_rss'] / ref['peak_rss']:.2f}",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run both arms in fresh processes, write results/train.{md,json} and print the table."""
    from adapters.train.tasks import write_jsonl

    args.results.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(args.task, args.results / f"bench-train-{args.task}.jsonl", args.examples)
    spec = {k: getattr(args, k) for k in ("model", "task", "steps", "batch_size", "rank", "lr")}
    spec |= {"data": str(data), "repeats": args.repeats}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    spawn = multiprocessing.get_context("spawn")
    for repeat in range(args.repeats):
        order = ARMS if repeat % 2 == 0 else ARMS[::-1]  # alternate to spread machine noise
        for arm in order:
            with spawn.Pool(1) as pool:
                runs[arm].append(pool.apply(_run_arm, (arm, spec)))
    rows = {}
    for arm, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        median["tokens_per_s"] = statistics.median(r["tokens"] / r["seconds"] for r in results)
        rows[arm] = median
    table = _table(rows, spec)
    (args.results / "train.md").write_text(table)
    (args.results / "train.json").write_text(json.dumps({"spec": spec, "runs": runs}, indent=2))
    print(table)
    return 0
