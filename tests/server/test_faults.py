"""Faults a real `loraplex serve` survives: client disconnect mid-stream, an adapter corrupted then deleted
while resident, one request whose adapter overflows bf16 to non-finite logits (only it fails), KV pool
exhaustion (requests queue), and a burst far above --max-waiting (429s, never a 5xx). After each, the
server still answers."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loadtests.adapters import WEIGHTS, make_template, random_copy

MAX_WAITING = 4


def poison(folder: Path, value: float = 1e30) -> None:
    """Make an adapter's weights finite but large enough to overflow bf16 activations."""
    tensors = {k: torch.full_like(v, value) for k, v in load_file(folder / WEIGHTS).items()}
    save_file(tensors, folder / WEIGHTS)


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    template = make_template(demo_path, root / "template")
    adapters = root / "adapters"
    for i, name in enumerate(("good", "victim", "poison")):
        random_copy(template, adapters / name, seed=i)
    poison(adapters / "poison")
    args = ["--model", str(demo_path), "--adapters", str(adapters), "--kv-capacity-tokens", "256"]
    args += ["--max-model-len", "200", "--max-num-seqs", "4", "--max-waiting", str(MAX_WAITING)]
    args += ["--max-loras", "2", "--adapters-poll-s", "0.5"]
    with launch_server(args, root / "server.log") as running:
        base = httpx.get(running.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        yield SimpleNamespace(url=running.url, base=base, adapters=adapters, log=running.log)


def complete(srv, model: str, max_tokens: int = 4, prompt: str = "Count: 1, 2,") -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=180)


def assert_alive(srv) -> None:
    assert complete(srv, srv.base, 2).status_code == 200
    assert complete(srv, "good", 2).status_code == 200


def test_client_disconnect_mid_stream(srv):
    body = {"model": "good", "prompt": "Once upon a time", "max_tokens": 150, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    assert_alive(srv)


def test_non_finite_logits_fail_only_that_request(srv):
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, srv, m, 6) for m in ("poison", "good", srv.base)]
        poisoned, good, base = (f.result() for f in futures)
    assert good.status_code == 200 and base.status_code == 200, (good.text, base.text)
    assert poisoned.status_code == 500, poisoned.text
    assert poisoned.json()["error"]["code"] == "internal_error"
    assert "non-finite" in poisoned.json()["error"]["message"]
    assert_alive(srv)


def test_kv_pool_exhaustion_queues(srv):
    prompt = "Write the numbers from one to fifty in words: one, two, three,"
    with ThreadPoolExecutor(MAX_WAITING) as pool:
        futures = [pool.submit(complete, srv, srv.base, 100, prompt) for _ in range(MAX_WAITING)]
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * MAX_WAITING, [r.text for r in responses]
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in responses)


def test_burst_far_above_capacity_gets_429_not_5xx(srv):
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda _: complete(srv, srv.base, 8).status_code, range(48)))
    assert all(s in (200, 429) for s in statuses), statuses
    assert 429 in statuses and 200 in statuses
    assert_alive(srv)


def test_adapter_corrupted_then_deleted_while_resident(srv):
    assert complete(srv, "victim", 2).status_code == 200
    (srv.adapters / "victim" / WEIGHTS).write_bytes(b"\x00garbage" * 64)
    for _ in range(3):
        status = complete(srv, "victim", 2).status_code
        assert status in (200, 404, 503), status
    shutil.rmtree(srv.adapters / "victim")
    for _ in range(3):
        status = complete(srv, "victim", 2).status_code
        assert status in (200, 404, 503), status
    assert_alive(srv)
