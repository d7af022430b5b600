"""`loraplex serve --train-demo-adapters`: the server serves at once while the demo adapters missing
from its watched folder train in the background; stopping the server stops the trainer at a
checkpoint, the next start resumes it, and the adapter is served once published."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import httpx

from adapters.train.checkpoint import checkpoint_dir, read_progress
from adapters.train.demo import EXTRA_ARGS_ENV
from adapters.train.manifest import MANIFEST_NAME
from adapters.train.tasks import held_out
from loader.config import Config
from server.cli import build_parser, config_from_args
from server.serve import demo_trainer

STEPS = 4
QUICK = {EXTRA_ARGS_ENV: f"--max-steps {STEPS} --task-n 2"}  # a short run, scored on 2 prompts
TRAIN_TIMEOUT_S = 240


def wait_for_line(log: Path, pattern: str, timeout: float = TRAIN_TIMEOUT_S) -> str:
    """The first line of log matching pattern, once it appears."""
    deadline = time.monotonic() + timeout
    while not (match := re.search(f".*{pattern}.*", log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return match.group(0)


def train_flag(*argv: str) -> bool:
    """train_demo_adapters as `loraplex serve ARGV` sets it."""
    parser, _ = build_parser()
    return config_from_args(parser.parse_args(["serve", *argv])).train_demo_adapters


def test_flag_and_environment_variable(monkeypatch):
    assert not train_flag() and train_flag("--train-demo-adapters")
    monkeypatch.setenv("LORAPLEX_TRAIN_DEMO_ADAPTERS", "1")
    assert train_flag() and not train_flag("--no-train-demo-adapters")


def test_trains_only_the_demo_base_into_a_watched_folder(tmp_path: Path, caplog):
    folder = tmp_path / "new" / "adapters"
    on = Config(adapters_dir=str(folder), train_demo_adapters=True)
    assert demo_trainer(on.replace(train_demo_adapters=False)) is None
    with caplog.at_level("INFO", logger="loraplex.serve"):
        assert demo_trainer(on.replace(model="/models/other")) is None
        assert demo_trainer(on.replace(adapters_dir=None)) is None
    assert [r.getMessage() for r in caplog.records] == [
        "not training the demo adapters: they are for the demo base, not /models/other",
        "not training the demo adapters: no --adapters folder to serve them from",
    ]
    assert not folder.exists()
    trainer = demo_trainer(on)
    assert trainer is not None and trainer.tasks == ["json", "digits", "reverse"]
    assert folder.is_dir()  # created for the watcher


def test_serve_trains_the_missing_demo_adapter_resumably(
    launch_server, peft_adapters: dict[str, Path], tmp_path: Path
):
    folder = tmp_path / "adapters"
    for task in ("json", "reverse"):  # already there: only digits is trained
        shutil.copytree(peft_adapters["alpha"], folder / task)
    args = ["--model", "demo", "--adapters", str(folder), "--train-demo-adapters"]
    args += ["--adapters-poll-s", "0.2"]

    first = tmp_path / "first.log"
    with launch_server(args, first, QUICK) as srv:
        ready = wait_for_line(first, "ready: ")
        assert "2 adapters" in ready, ready
        assert "training 1 demo adapter in the background (digits)" in ready, ready
        assert ready.endswith(f"console: {srv.url}/ui"), ready
        wait_for_line(first, f"demo adapter digits: step [1-{STEPS}]/{STEPS}")
        srv.proc.send_signal(signal.SIGINT)  # Ctrl-C: the trainer saves a checkpoint, then stops
        assert srv.proc.wait(timeout=90) == 0, first.read_text()[-4000:]
    wait_for_line(first, "demo adapter digits: interrupted; the next start resumes it", 0)
    progress = read_progress(checkpoint_dir(folder / "digits"))
    assert progress is not None and 1 <= progress["step"] <= STEPS
    assert not (folder / "digits").exists()

    second = tmp_path / "second.log"
    with launch_server(args, second, QUICK) as srv:
        wait_for_line(second, f"demo adapter digits: resuming from step {progress['step']}")
        wait_for_line(
            second, r"demo adapter digits: finished in \d+ s, held-out score [\d.]+ \(bare base"
        )
        deadline = time.monotonic() + 30
        while "digits" not in [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "digits was never served"
            time.sleep(0.2)
        prompt = held_out("digits", 1)[0].prompt
        reply = httpx.post(
            srv.url + "/v1/chat/completions",
            json={
                "model": "digits",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "digits"
    results = json.loads((folder / "digits" / MANIFEST_NAME).read_text())["results"]
    assert results["steps"] == STEPS and len(results["loss_history"]) == STEPS
    assert results["task"]["n"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [".data", "digits", "json", "reverse"]
