"""The training loop: deterministic micro-batch stream, LR schedule, steps, evals, checkpoints."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm import tqdm

from adapters.train.checkpoint import save_checkpoint
from adapters.train.config import TrainConfig, TrainError
from adapters.train.data import Example, collate
from adapters.train.evaluate import AnswerLoss, eval_loss

StepHook = Callable[[int, float], None]


class Interrupted(TrainError):
    """Training stopped on SIGINT after saving a checkpoint; rerun with --resume to continue."""


class Batches:
    """The micro-batch stream: epoch e visits the examples in a permutation fixed by (seed, e)."""

    def __init__(self, examples: list[Example], size: int, seed: int) -> None:
        self.examples, self.size, self.seed = examples, size, seed
        self.per_epoch = math.ceil(len(examples) / size)
        self._epoch, self._order = -1, []

    def __getitem__(self, k: int) -> list[Example]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epoch, self._order = epoch, torch.randperm(len(self.examples), generator=gen)
        return [self.examples[i] for i in self._order[j * self.size : (j + 1) * self.size]]


def lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier per step: linear warmup, then constant, linear or cosine."""
    warmup = cfg.warmup(total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextmanager
def graceful_sigint() -> Iterator[threading.Event]:
    """A flag set by the first Ctrl-C (the loop checkpoints and stops); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Session:
    """The live state of a run: model, optimizer, schedule, data stream and progress record."""

    model: PeftModel
    cfg: TrainConfig
    total: int
    batches: Batches
    eval_set: list[Example]
    loss_fn: AnswerLoss
    pad_id: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ckpt: Path
    progress: dict[str, Any] = field(default_factory=dict)

    def evaluate(self) -> float | None:
        """Mean eval loss per trained token (None without an eval split)."""
        loss = eval_loss(self.model, self.loss_fn, self.eval_set, self.pad_id, self.cfg.batch_size)
        self.model.train()
        return loss

    def step(self, step: int) -> float:
        """One optimizer step over grad_accum micro-batches; returns its mean loss per token."""
        accum = self.cfg.grad_accum
        micro = [self.batches[step * accum + i] for i in range(accum)]
        targets = sum(e.targets for mb in micro for e in mb)
        loss_sum = 0.0
        for examples in micro:
            batch = collate(examples, self.pad_id)
            loss, _ = self.loss_fn(batch)
            (loss / targets).backward()  # token-mean over the whole accumulated batch
            loss_sum += loss.item()
            self.progress["tokens"] += int(batch["attention_mask"].sum())
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / targets

    def loop(self, on_step: StepHook | None, name: str) -> None:
        """Run the remaining steps with a progress bar, evals and checkpoints."""
        cfg, progress = self.cfg, self.progress
        self.model.train()
        bar = tqdm(total=self.total, initial=progress["step"], desc=f"train {name}", unit="step")
        with graceful_sigint() as stop:
            for step in range(progress["step"], self.total):
                began = time.perf_counter()
                loss = self.step(step)
                progress["seconds"] += time.perf_counter() - began
                progress["step"] = done = step + 1
                progress["history"].append(round(loss, 5))
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update()
                if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total:
                    progress["eval"].append([done, self.evaluate()])
                    tqdm.write(f"step {done}: eval loss {progress['eval'][-1][1]}")
                periodic = cfg.save_every and done % cfg.save_every == 0 and done < self.total
                if periodic or stop.is_set():
                    save_checkpoint(self.ckpt, self.model, self.optimizer, self.scheduler, progress)
                if stop.is_set():
                    bar.close()
                    raise Interrupted(f"stopped at step {done}; continue with --resume")
                if on_step is not None:
                    on_step(done, loss)
        bar.close()
