"""The demo adapters: one per demo task (adapters/train/tasks.py), trained on the demo base.

DEMO_STEPS is the one table of what both `make demo-adapters` (this module's command line, in the
foreground) and `loraplex serve --train-demo-adapters` (DemoTrainer, in the background) train:
each task's adapter goes to FOLDER/<task>/, from 400 generated examples in FOLDER/.data/, through
the `loraplex train` command line. Only tasks whose adapter is missing are trained; a run stopped
at a checkpoint (FOLDER/.<task>.checkpoint/) continues from it. The trainer publishes an adapter
by renaming a hidden temporary folder into place, so a watched folder never sees a half-written one.

$LORAPLEX_DEMO_TRAIN_ARGS adds `loraplex train` flags after the table's (the later flag wins), e.g.
`--max-steps 3 --task-n 2` for a quick try or a test.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from adapters.registry import folder_signature
from adapters.train.checkpoint import checkpoint_dir, read_progress
from adapters.train.tasks import write_jsonl
from loader.config import Config

log = logging.getLogger("loraplex.demo")

# task -> optimizer steps, the shortest run first so that a first adapter is served soonest
DEMO_STEPS = {"json": 40, "digits": 60, "reverse": 150}
EXAMPLES, SEED, LR, WARMUP_STEPS = 400, 0, 1e-3, 10
DATA_DIR = ".data"
EXTRA_ARGS_ENV = "LORAPLEX_DEMO_TRAIN_ARGS"
NICE = 19
STOP_TIMEOUT_S = 60.0
TAIL_LINES = 20
# the trainer's tqdm bar after a step: "train json:  50%|███  | 20/40 [01:40<01:40, ..., loss=0.1, ...]"
BAR = re.compile(r"train \S+:.*?\| (\d+)/(\d+) \[[^<\]]*<([^,\]]+)[^\]]*loss=([^,\]]+)")


def missing_tasks(folder: Path) -> list[str]:
    """The demo tasks without a complete adapter folder (config and weights) in folder."""
    return [task for task in DEMO_STEPS if folder_signature(folder / task) is None]


def prepare_run(folder: Path, task: str, base: Config) -> list[str]:
    """Write task's training data under folder and return the command that trains its adapter
    into folder/task on base (with --resume when a checkpoint of it exists)."""
    data = write_jsonl(task, folder / DATA_DIR / f"{task}.jsonl", EXAMPLES, SEED)
    out = folder / task
    command = [sys.executable, "-m", "server.cli", "train", "--model", base.model,
               "--quant", base.quant, "--compute-dtype", base.compute_dtype,
               "--device", base.device,
               "--double-quant" if base.double_quant else "--no-double-quant",
               "--data", str(data), "--out", str(out), "--task", task,
               "--max-steps", str(DEMO_STEPS[task]), "--lr", str(LR),
               "--warmup-steps", str(WARMUP_STEPS), "--overwrite"]  # fmt: skip
    command += shlex.split(os.environ.get(EXTRA_ARGS_ENV, ""))
    if read_progress(checkpoint_dir(out)) is not None:
        command.append("--resume")
    return command


class DemoTrainer:
    """Trains the demo adapters missing from a folder (created if need be), one task after another
    in a child process at the lowest CPU priority, and logs their progress; stop() ends the running
    task at a checkpoint that the next start resumes from."""

    def __init__(self, folder: Path, base: Config) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.base = folder, base
        self.tasks = missing_tasks(folder)
        self._lock = threading.Lock()
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="loraplex-demo-train", daemon=True)

    def start(self) -> None:
        """Start training the missing tasks in the background."""
        self._thread.start()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Train no further task; interrupt the running one and wait until it saved a checkpoint
        (killed after timeout_s)."""
        with self._lock:
            self._stopping = True
            proc = self._proc
            if proc is not None and proc.poll() is None:
                log.info("stopping demo training: saving a checkpoint first")
                proc.send_signal(signal.SIGINT)
        if not self._thread.is_alive():
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive() and proc is not None:
            log.warning("demo training did not stop in %.0f s: killed", timeout_s)
            proc.kill()

    def _run(self) -> None:
        for task in self.tasks:
            try:
                if not self._train(task):
                    return
            except Exception:  # noqa: BLE001 - a failed demo task must not take the server down
                log.exception("demo adapter %s: training failed", task)
        log.info("demo training done")

    def _train(self, task: str) -> bool:
        """Train one task in a child process; False once training should end."""
        command = ["nice", "-n", str(NICE), *prepare_run(self.folder, task, self.base)]
        # its progress bar is what follow() reports, so it must not be disabled
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        prior = read_progress(checkpoint_dir(self.folder / task))
        with self._lock:
            if self._stopping:
                return False
            self._proc = proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True)  # fmt: skip
        if prior is None:
            log.info("demo adapter %s: training into %s (nice %d)", task, self.folder / task, NICE)
        else:
            log.info("demo adapter %s: resuming from step %d (nice %d)", task, prior["step"], NICE)
        began = time.monotonic()
        summary, tail = follow(task, pieces(proc.stdout))
        code = proc.wait()
        with self._lock:
            self._proc = None
            stopping = self._stopping
        if code == 0:
            log.info("demo adapter %s: finished in %.0f s, held-out score %s (bare base %s)",
                     task, time.monotonic() - began, summary.get("task_score"),
                     summary.get("base_score"))  # fmt: skip
        elif stopping or code in (130, -signal.SIGINT):
            log.info("demo adapter %s: interrupted; the next start resumes it", task)
            return False
        else:
            log.error("demo adapter %s: training failed (exit %d); its last output:\n%s",
                      task, code, "\n".join(tail))  # fmt: skip
        return not stopping


def pieces(stream: IO[bytes]) -> Iterator[str]:
    """A child's output split at line ends and carriage returns, each piece as soon as it is read
    (a progress bar redraws itself after a carriage return, with no line end)."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    while chunk := stream.read1():
        yield from re.split(r"[\r\n]", decode(chunk))


def follow(task: str, lines: Iterable[str]) -> tuple[dict[str, Any], deque[str]]:
    """Log a `loraplex train` run's progress from its output (at the first step it reports, then at
    every tenth of the run); return its JSON summary and its last other lines."""
    summary: dict[str, Any] = {}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    reported = -1  # tenths of the run last reported
    for line in map(str.strip, lines):
        bar = BAR.search(line)
        if bar is not None:
            done, total = int(bar[1]), int(bar[2])
            if done * 10 // total > reported:
                reported = done * 10 // total
                log.info("demo adapter %s: step %d/%d, loss %s, %s left",
                         task, done, total, bar[4], bar[3])  # fmt: skip
        elif line.startswith("{"):  # the summary `loraplex train` prints at the end
            with contextlib.suppress(json.JSONDecodeError):
                summary = json.loads(line)
        elif line:
            tail.append(line)
    return summary, tail


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m adapters.train.demo FOLDER`: train the demo adapters missing from FOLDER on the
    demo base, one after another, in the foreground."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path, help="the adapters folder, e.g. demo-adapters")
    folder = parser.parse_args(argv).folder
    folder.mkdir(parents=True, exist_ok=True)
    for task in missing_tasks(folder):
        with subprocess.Popen(prepare_run(folder, task, Config())) as proc:
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # the child got the Ctrl-C too and is saving a checkpoint
                code = proc.wait()
        if code != 0:
            return code if code > 0 else 128 - code
    print(f"{folder}: the demo adapters {', '.join(DEMO_STEPS)} are trained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
