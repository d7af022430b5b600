"""The demo adapters' table and runner pieces: which tasks are missing, the `loraplex train` command
each gets (resuming from a checkpoint, extra flags from the environment), and how a run's output
becomes progress lines. The training itself runs in tests/server/test_demo_training.py."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from adapters.train.checkpoint import PROGRESS, checkpoint_dir
from adapters.train.demo import (
    DEMO_STEPS,
    EXTRA_ARGS_ENV,
    follow,
    main,
    missing_tasks,
    pieces,
    prepare_run,
)
from loader.config import Config


def make_complete(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")


def test_missing_tasks_and_their_train_commands(tmp_path: Path, monkeypatch):
    make_complete(tmp_path / "json")
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "adapter_config.json").write_text("{}")  # half there: still missing
    assert missing_tasks(tmp_path) == ["digits", "reverse"]

    monkeypatch.delenv(EXTRA_ARGS_ENV, raising=False)
    command = prepare_run(tmp_path, "digits", Config())
    data = tmp_path / ".data" / "digits.jsonl"
    assert len(data.read_text().splitlines()) == 400
    assert command[1:4] == ["-m", "server.cli", "train"]
    flags = " ".join(command[4:])
    assert f"--data {data} --out {tmp_path / 'digits'} --task digits" in flags
    assert f"--max-steps {DEMO_STEPS['digits']} --lr 0.001 --warmup-steps 10" in flags
    assert "--model demo --quant nf4" in flags and "--resume" not in flags

    checkpoint = checkpoint_dir(tmp_path / "digits")
    checkpoint.mkdir()
    (checkpoint / PROGRESS).write_text(json.dumps({"step": 7}))
    monkeypatch.setenv(EXTRA_ARGS_ENV, "--max-steps 3 --task-n 2")
    assert prepare_run(tmp_path, "digits", Config())[-6:] == [
        "--overwrite", "--max-steps", "3", "--task-n", "2", "--resume",
    ]  # fmt: skip


def test_follow_reports_the_trainer_bar_by_tenths(caplog):
    out = io.StringIO()  # what `loraplex train` writes: its tqdm bar, log lines, the JSON summary
    out.write("INFO loraplex.train: 380 training and 20 eval examples\n")
    bar = tqdm(total=20, desc="train digits", unit="step", file=out, mininterval=0)
    for step in range(20):
        bar.set_postfix(loss=f"{4 - step / 10:.4f}", lr="1.00e-03", refresh=False)
        bar.update()
    bar.close()
    out.write('\n{"steps": 20, "task_score": 0.95, "base_score": 0.0}\n/x/digits\n')
    with caplog.at_level(logging.INFO, logger="loraplex.demo"):
        summary, tail = follow("digits", pieces(io.BytesIO(out.getvalue().encode())))
    assert summary == {"steps": 20, "task_score": 0.95, "base_score": 0.0}
    assert list(tail) == [  # the bar before any step is no progress report
        "INFO loraplex.train: 380 training and 20 eval examples",
        "train digits:   0%|          | 0/20 [00:00<?, ?step/s]",
        "/x/digits",
    ]
    steps = [r.getMessage() for r in caplog.records]
    assert [m.split(",")[0] for m in steps] == [
        f"demo adapter digits: step {n}/20" for n in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
    ]
    assert steps[0].startswith("demo adapter digits: step 1/20, loss 4.0000, ")
    assert steps[-1].endswith("loss 2.1000, 00:00 left")


def test_cli_trains_nothing_when_every_demo_adapter_is_there(tmp_path: Path, capsys):
    for task in DEMO_STEPS:
        make_complete(tmp_path / task)
    assert main([str(tmp_path)]) == 0
    assert "the demo adapters json, digits, reverse are trained" in capsys.readouterr().out


def test_pieces_yields_a_redrawn_bar_before_any_line_end():
    read, write = os.pipe()
    os.write(write, "\rtrain json:  25%|██▌       | 1/4 [00:02<00:06]".encode())
    with open(read, "rb") as stream:
        got = pieces(stream)
        assert next(got) == "" and next(got).endswith("| 1/4 [00:02<00:06]")
    os.close(write)
