"""HTTP fixtures: the real `loraplex serve` on the demo model and test PEFT adapters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

SERVER_START_TIMEOUT_S = 240


# the real server --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def adapters_dir(peft_adapters: dict[str, Path]) -> Path:
    """The folder holding the test PEFT adapters, one subfolder each, plus a broken one."""
    root = next(iter(peft_adapters.values())).parent
    broken = root / "zz-broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{}")
    return root


@contextmanager
def serve_process(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    subcommand: str = "serve",
    stop_timeout_s: float = 20,
) -> Iterator[SimpleNamespace]:
    """`loraplex serve ARGS` (or another subcommand; env added to the environment) on a free
    loopback port while the block runs: url, log, proc."""
    command = [sys.executable, "-m", "server.cli", subcommand, "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield SimpleNamespace(url=_wait_ready(proc, log_path), log=log_path, proc=proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def launch_server() -> object:
    """serve_process, for test modules that need a server with their own flags."""
    return serve_process


@pytest.fixture(scope="session")
def server(
    demo_path: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """`loraplex serve` on the demo model and test adapters, on a free loopback port: url, log."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(demo_path), "--adapters", str(adapters_dir), "--max-waiting", "64"]
    with serve_process(args, log_path) as running:
        yield running


# access control: one real server with an API-keys file and small request limits -------------------
KEYED_BASE = "demo-base"
KEYED_USER_ADAPTER = "alpha"
KEYED_KEYS = {
    "admin": "sk-admin-7f3c9e1b2a4d",
    "user": "sk-user-5e8a0d6c4b2f",
    "base_only": "sk-base-9d1f7a3e5c0b",
}
KEYED_MAX_BODY_BYTES = 4096
KEYED_MAX_N = 2


@pytest.fixture(scope="module")
def keyed_server(
    demo_path: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """`loraplex serve` with an admin key (every adapter), a user key limited to one adapter, a
    base-only key, --max-body-bytes 4096, --max-n 2 and per-key prefix caching: url, log, proc,
    keys, base."""
    root = tmp_path_factory.mktemp("keyed")
    keys_file = root / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"key": KEYED_KEYS["admin"], "role": "admin", "adapters": "*"},
                {"key": KEYED_KEYS["user"], "role": "user", "adapters": [KEYED_USER_ADAPTER]},
                {"key": KEYED_KEYS["base_only"], "role": "user", "adapters": []},
            ]
        )
    )
    args = [
        "--model", str(demo_path),
        "--adapters", str(adapters_dir),
        "--served-model-name", KEYED_BASE,
        "--api-keys-file", str(keys_file),
        "--max-body-bytes", str(KEYED_MAX_BODY_BYTES),
        "--max-n", str(KEYED_MAX_N),
        "--prefix-cache-scope", "key",
    ]  # fmt: skip
    with serve_process(args, root / "server.log") as running:
        running.keys = dict(KEYED_KEYS)
        running.base = KEYED_BASE
        running.user_adapter = KEYED_USER_ADAPTER
        yield running


def _wait_ready(proc: subprocess.Popen, log_path: Path) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(r"ready: (http://\S+)", text)
        if match:
            url = match.group(1)
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        if proc.poll() is not None:
            raise RuntimeError(f"loraplex exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.25)
    raise RuntimeError(f"loraplex not ready after {SERVER_START_TIMEOUT_S}s")
