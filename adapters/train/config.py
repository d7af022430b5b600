"""Hyperparameters of one training run, validated at construction.

Defaults follow the QLoRA paper (Dettmers et al. 2023: LoRA on all linear layers, lr 2e-4, constant
schedule after a 3% warmup, max_grad_norm 0.3, AdamW without weight decay), with the rank and dropout
scaled for small models (rank 16 instead of 64; dropout 0.05 as the paper used for its larger runs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from adapters.train.data import OVERLONG
from adapters.train.tasks import HELD_OUT_MAX, TASKS

SCHEDULES = ("constant", "linear", "cosine")


class TrainError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Every tunable of `loraplex train` except the base model and the paths."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = "all-linear"
    lr: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 512
    overlong: str = "truncate"
    strict: bool = False
    eval_split: float = 0.05
    eval_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 50
    task: str | None = None
    task_n: int = 20

    def __post_init__(self) -> None:
        checks = [
            (self.rank > 0, "rank must be positive"),
            (self.alpha > 0, "alpha must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.lr > 0, "learning rate must be positive"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup steps must be >= 0"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (self.epochs > 0, "epochs must be positive"),
            (self.max_steps is None or self.max_steps > 0, "max steps must be positive"),
            (self.batch_size > 0, "batch size must be positive"),
            (self.grad_accum > 0, "gradient accumulation must be positive"),
            (self.max_len >= 2, "max length must be >= 2"),
            (self.overlong in OVERLONG, f"overlong must be one of {OVERLONG}"),
            (self.eval_split >= 0, "eval split must be >= 0"),
            (self.eval_every >= 0, "eval every must be >= 0 (0 = only at start and end)"),
            (self.save_every >= 0, "save every must be >= 0 (0 = no checkpoints)"),
            (self.task is None or self.task in TASKS, f"task must be one of {sorted(TASKS)}"),
            (0 < self.task_n <= HELD_OUT_MAX, f"task_n must be in 1..{HELD_OUT_MAX}"),
            (bool(self.target_modules.strip()), "target modules must not be empty"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise TrainError("; ".join(problems))

    @property
    def peft_targets(self) -> str | list[str]:
        """target_modules as PEFT takes it: "all-linear" or a list of module names."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps of the run: max_steps, else epochs over the training examples."""
        if self.max_steps is not None:
            return self.max_steps
        micro_batches = math.ceil(train_examples / self.batch_size)
        return max(1, math.ceil(self.epochs * micro_batches / self.grad_accum))

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: as given, else 3% of the run (at least 1)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(0.03 * total_steps))

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON view for manifests and checkpoints."""
        return dataclasses.asdict(self)
