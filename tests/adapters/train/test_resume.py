"""An interrupted run resumed from its checkpoint ends with the same adapter as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.train import tasks
from adapters.train.checkpoint import checkpoint_dir
from adapters.train.config import TrainConfig, TrainError
from adapters.train.loop import Interrupted
from adapters.train.manifest import MANIFEST_NAME
from adapters.train.trainer import train
from loader.config import Config

CFG = TrainConfig(max_steps=6, batch_size=2, grad_accum=2, max_len=64, eval_split=4, save_every=2,
                  lr=1e-3, dropout=0.1, seed=7)  # fmt: skip


class Crash(Exception):
    """Stands in for a killed process: nothing after the last checkpoint survives."""


def stop_at(step: int, how: str):
    def hook(done: int, loss: float) -> None:
        if done == step:
            if how == "crash":
                raise Crash
            os.kill(os.getpid(), signal.SIGINT)  # a user's Ctrl-C

    return hook


def test_resume_equals_uninterrupted(tmp_path: Path, demo_path: Path):
    base = Config(model=str(demo_path))
    data = tasks.write_jsonl("reverse", tmp_path / "data.jsonl", 40, seed=1)
    whole = train(base, CFG, data, tmp_path / "whole").out

    out = tmp_path / "resumed"
    with pytest.raises(Crash):  # killed after step 3: the checkpoint of step 2 survives
        train(base, CFG, data, out, on_step=stop_at(3, "crash"))
    assert json.loads((checkpoint_dir(out) / "progress.json").read_text())["step"] == 2
    with pytest.raises(Interrupted):  # Ctrl-C after step 4: step 5 finishes and is saved
        train(base, CFG, data, out, resume=True, on_step=stop_at(4, "sigint"))
    assert json.loads((checkpoint_dir(out) / "progress.json").read_text())["step"] == 5
    with pytest.raises(TrainError, match="different"):
        train(base, TrainConfig(**CFG.as_dict() | {"lr": 2e-3}), data, out, resume=True)
    train(base, CFG, data, out, resume=True)

    # Same seed, same data order and dropout draws: the weights match bit for bit on CPU
    # (asserted with atol 1e-6 so a harmless last-bit change elsewhere would not fail it).
    a, b = (
        load_file(whole / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume vs uninterrupted: max |diff| = {worst}")
    assert worst <= 1e-6
    ra = json.loads((whole / MANIFEST_NAME).read_text())["results"]
    rb = json.loads((out / MANIFEST_NAME).read_text())["results"]
    assert ra["loss_history"] == pytest.approx(rb["loss_history"], abs=1e-5)
    assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], abs=1e-6)
    assert not checkpoint_dir(out).exists()
    assert any(torch.count_nonzero(t) for t in a.values())
