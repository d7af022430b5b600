"""HTTP fixtures: a scripted fake engine behind the real app (fast), and the real server on the demo model."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from transformers import AutoTokenizer

from server.engine.types import EngineError, EngineStats, SamplingParams, TokenOutput

FAKE_SCRIPT = " one two three four five six seven eight nine ten eleven twelve"
SERVER_START_TIMEOUT_S = 240


class FakeEngine:
    """The AsyncEngine API with a scripted completion: FAKE_SCRIPT's tokens, then EOS."""

    def __init__(self, tokenizer: object) -> None:
        self.base = SimpleNamespace(name="fake-base", tokenizer=tokenizer, path=Path("/fake/base"))
        self.max_model_len = 128
        self.adapters = {"ad1": {"path": "/fake/ad1", "rank": 8, "bytes": 1, "resident": True}}
        self.script_text = FAKE_SCRIPT
        self.script = tokenizer(FAKE_SCRIPT, add_special_tokens=False).input_ids
        self.eos = tokenizer.eos_token_id
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.calls: list[tuple[list[int], str | None, SamplingParams, str]] = []
        self.overloaded = False
        self.fail = False
        self.first_error: str | None = None  # error_code of an "error" finish before any token
        self.delay_s = 0.0

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)

    def adapter_info(self) -> dict[str, dict]:
        return dict(self.adapters)

    async def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenOutput]:
        if adapter is not None and adapter not in self.adapters:
            raise EngineError(f"The model `{adapter}` does not exist.", "model_not_found", 404)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise EngineError("too long", "context_length_exceeded", 400)
        if self.overloaded:
            raise EngineError("The server is overloaded; retry later.", "overloaded", 429)
        if self.fail:
            raise RuntimeError("boom")
        self.calls.append((list(prompt_ids), adapter, params, request_id))
        if self.first_error is not None:
            out = TokenOutput(request_id, None, "error", error="cannot run")
            out.error_code = self.first_error or None
            yield out
            return
        self.active.add(request_id)
        top = params.logprobs or 0
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.delay_s)
                if i == len(self.script):
                    yield TokenOutput(request_id, self.eos, "stop", -0.1, [], len(prompt_ids))
                    return
                reason = "length" if i + 1 == params.max_tokens else None
                token = self.script[i]
                yield TokenOutput(
                    request_id, token, reason, -0.5, [(token, -0.5)] * top, len(prompt_ids)
                )
        finally:
            self.active.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        n = len(self.active)
        return EngineStats(n, 0, n, 64, 1, 0, 0, 0)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_path: Path) -> object:
    """The demo model's tokenizer (chat template included), without the model."""
    return AutoTokenizer.from_pretrained(demo_path)


@pytest.fixture
def fake_engine(demo_tokenizer: object) -> FakeEngine:
    """A fresh scripted engine."""
    return FakeEngine(demo_tokenizer)


def make_fake_client(engine: FakeEngine, **config_fields: object) -> object:
    """A TestClient over the real app wrapping engine."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Config

    return TestClient(create_app(engine, Config(**config_fields)), raise_server_exceptions=False)


@pytest.fixture
def fake_client_with() -> object:
    """make_fake_client, for tests that need a non-default Config."""
    return make_fake_client


@pytest.fixture
def fake_client(fake_engine: FakeEngine) -> object:
    """The app over the fake engine, without an API key."""
    return make_fake_client(fake_engine)


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
def serve_process(args: list[str], log_path: Path) -> Iterator[SimpleNamespace]:
    """`loraplex serve ARGS` on a free loopback port while the block runs: url, log, proc."""
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield SimpleNamespace(url=_wait_ready(proc, log_path), log=log_path, proc=proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
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
            raise RuntimeError(f"loraplex serve exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.25)
    raise RuntimeError(f"loraplex serve not ready after {SERVER_START_TIMEOUT_S}s")
