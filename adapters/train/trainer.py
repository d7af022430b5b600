"""One QLoRA training run: NF4 base + PEFT LoRA, AdamW, answer-only loss, checkpoints, atomic output.

The base is loaded exactly as the server loads it (`loader.model.load_base`), so the adapter is
trained against the weights it will be served on.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from adapters.train.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    read_progress,
    replace_dir,
)
from adapters.train.config import TrainConfig, TrainError
from adapters.train.data import load_dataset, split
from adapters.train.evaluate import AnswerLoss, task_score
from adapters.train.loop import Batches, Session, StepHook, lr_factor
from adapters.train.manifest import base_fingerprint, build_manifest, write_manifest
from loader.config import Config
from loader.model import load_base
from loader.source import resolve_source

log = logging.getLogger("loraplex.train")

# Hyperparameters that do not change the trained weights, so a resumed run may change them.
RESUME_FREE = ("save_every", "eval_every", "task", "task_n", "strict")


@dataclass
class TrainResult:
    """Where the adapter went and what its manifest says."""

    out: Path
    manifest: dict[str, Any]


def set_training_kernels(model: torch.nn.Module, training: bool) -> None:
    """Keep bnb's AVX512-BF16 weight repack off while training (it kills input gradients)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False if training else has_avx512bf16()


def train(
    base_config: Config,
    cfg: TrainConfig,
    data_path: Path,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train a LoRA adapter on data_path and publish it (PEFT folder + manifest) at out."""
    wall = time.perf_counter()
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise TrainError(f"{out} already exists; pass --overwrite to replace it")
    ckpt = checkpoint_dir(out)
    prior = read_progress(ckpt) if resume else None
    if resume and prior is None:
        raise TrainError(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # Data first (tokenizer only): bad data fails before a large base is loaded.
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(base_config.model))
    data = load_dataset(Path(data_path), tokenizer, cfg.max_len, cfg.overlong, cfg.strict)
    train_set, eval_set = split(data.examples, cfg.eval_split, cfg.seed)
    log.info("%d training and %d eval examples from %s", len(train_set), len(eval_set), data_path)
    hyper = {k: v for k, v in cfg.as_dict().items() if k not in RESUME_FREE}
    identity = {"hyperparameters": hyper, "data_sha256": data.sha256}
    _check_resumable(prior, identity, ckpt)
    base = load_base(base_config)
    set_training_kernels(base.model, training=True)
    fingerprint = base_fingerprint(base)
    identity["base"] = fingerprint
    _check_resumable(prior, identity, ckpt)

    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.peft_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.model, lora)
    if cfg.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.total_steps(len(train_set))
    run = Session(
        model=model,
        cfg=cfg,
        total=total,
        batches=Batches(train_set, cfg.batch_size, cfg.seed),
        eval_set=eval_set,
        loss_fn=AnswerLoss(model),
        pad_id=base.tokenizer.pad_token_id,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total)),
        ckpt=ckpt,
    )
    if prior is not None:
        load_checkpoint(prior, model, run.optimizer, run.scheduler)
        run.progress = {k: v for k, v in prior.items() if k != "_folder"}
        log.info("resuming from step %d of %d (%s)", run.progress["step"], total, ckpt)
    else:
        run.progress = {"identity": identity, "step": 0, "history": [], "tokens": 0, "seconds": 0.0}
        run.progress["eval"] = [[0, run.evaluate()]]
    run.loop(on_step, out.name)
    if run.progress["eval"][-1][0] != total:
        run.progress["eval"].append([total, run.evaluate()])
    results = _results(run.progress, total, time.perf_counter() - wall)
    data_info = data.summary() | {"train": len(train_set), "eval": len(eval_set)}
    return _publish(model, base.tokenizer, cfg, data_info, fingerprint, results, out,
                    overwrite, keep_checkpoints)  # fmt: skip


def _check_resumable(prior: dict[str, Any] | None, identity: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume a checkpoint made with other hyperparameters, data or base."""
    if prior is None:
        return
    changed = [k for k in identity if prior["identity"].get(k) != identity[k]]
    if changed:
        raise TrainError(
            f"--resume: the checkpoint at {ckpt} was made with different {', '.join(changed)}; "
            "rerun with the original settings, or without --resume to start over"
        )


def _results(progress: dict[str, Any], total: int, wall: float) -> dict[str, Any]:
    """Loss, throughput and memory figures of the finished run."""
    history = progress["history"]
    tail = history[-max(1, len(history) // 10) :]
    return {
        "steps": total,
        "train_loss_first": history[0] if history else None,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "eval_loss_start": progress["eval"][0][1],
        "eval_loss": progress["eval"][-1][1],
        "eval_history": progress["eval"],
        "train_seconds": round(progress["seconds"], 2),
        "wall_seconds_this_process": round(wall, 2),
        "tokens": progress["tokens"],
        "tokens_per_s": round(progress["tokens"] / max(progress["seconds"], 1e-9), 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_history": history,
    }


def _publish(
    model: PeftModel,
    tokenizer: Any,
    cfg: TrainConfig,
    data: dict[str, Any],
    fingerprint: dict[str, Any],
    results: dict[str, Any],
    out: Path,
    overwrite: bool,
    keep_checkpoints: bool,
) -> TrainResult:
    """Save adapter + manifest into a temp folder beside out, score it, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if cfg.task:
            set_training_kernels(model, training=False)  # inference kernels: 2.5x faster
            results["task"] = task_score(model, tokenizer, cfg.task, cfg.task_n)
            log.info("task %s: adapter %.2f, base %.2f on %d held-out prompts", cfg.task,
                     results["task"]["score"], results["task"]["base_score"], cfg.task_n)  # fmt: skip
        manifest = build_manifest(fingerprint, data, cfg.as_dict(), results)
        write_manifest(tmp, manifest)
        tmp.chmod(0o755)
        if out.exists() and not overwrite:
            raise TrainError(f"{out} appeared during training; not replacing it")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not keep_checkpoints:
        ckpt = checkpoint_dir(out)
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(ckpt.with_name(ckpt.name + ".old"), ignore_errors=True)
    log.info("adapter written to %s", out)
    return TrainResult(out=out, manifest=manifest)
