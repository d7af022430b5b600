"""Resumable checkpoints and atomic folder publishing.

A checkpoint holds everything the next step depends on: the trainable (LoRA) weights, the optimizer
and scheduler state, the RNG states (dropout draws) and the progress so far. The data order needs no
state: each epoch's permutation is a pure function of (seed, epoch).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.train.config import TrainError

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
PROGRESS = "progress.json"


def checkpoint_dir(out: Path) -> Path:
    """Where the checkpoints of a run writing `out` live: a hidden sibling folder."""
    return out.parent / f".{out.name}.checkpoint"


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing dst; an existing dst is kept as dst.old until the swap."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> None:
    """Write a checkpoint to folder atomically (a crash leaves the previous one intact)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / WEIGHTS))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    torch.save(state, tmp / STATE)
    (tmp / PROGRESS).write_text(json.dumps(progress))
    replace_dir(tmp, folder)


def read_progress(folder: Path) -> dict[str, Any] | None:
    """The progress record of the checkpoint in folder (or its .old twin), None if there is none."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / PROGRESS).is_file():
            return json.loads((candidate / PROGRESS).read_text()) | {"_folder": str(candidate)}
    return None


def load_checkpoint(
    progress: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore weights, optimizer, scheduler and RNG state from the checkpoint progress points to."""
    folder = Path(progress["_folder"])
    weights = load_file(str(folder / WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise TrainError(f"checkpoint {folder} does not match the model's trainable parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    state = torch.load(folder / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_random_state(state["python_rng"]))


def _as_random_state(state: Any) -> tuple:
    """random.setstate wants nested tuples; a round trip may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
