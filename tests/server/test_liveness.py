"""Engine liveness on a real `loraplex serve` with test-only fault injection
(LORAPLEX_FAULT_INJECTION, server/engine/faults.py): an exception escaping a step fails the
requests in the engine and the server goes on, however many in a row; a dead step loop or a lost
device turns /health red at once, ends the open stream with an engine_dead error event and [DONE],
refuses new requests with 503 engine_dead, and the process exits non-zero so a supervisor restarts
it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from server.engine.faults import ENV
from server.serve import EXIT_ENGINE_DEAD

# steps 2, 3 and 4 fail (the first request's first decode, then the next two requests' prefills;
# the known-good request after each takes one step); the loop dies before step 40 (mid-stream)
FAULTS = "step@2,step@3,step@4,loop@40"


def complete(url: str, model: str, max_tokens: int) -> httpx.Response:
    body = {"model": model, "prompt": "Count: 1, 2,", "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_failed_step_then_dead_loop(launch_server, demo_path: Path, tmp_path: Path):
    with launch_server(["--model", str(demo_path)], tmp_path / "server.log", {ENV: FAULTS}) as srv:
        base = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for _ in range(3):  # failures in a row that a request can cause do not kill the engine
            failed = complete(srv.url, base, 8)
            assert failed.status_code == 500, failed.text
            assert failed.json()["error"]["code"] == "internal_error"
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        assert complete(srv.url, base, 2).status_code == 200  # the loop went on

        body = {"model": base, "prompt": "Once upon a time", "max_tokens": 100, "stream": True}
        body["ignore_eos"] = True  # the stream outlives step 40 whatever the greedy text
        events = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
        ended = time.monotonic()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and "injected loop death" in error["message"]
        assert any("choices" in json.loads(e) for e in events[:-2])  # tokens came before

        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and time.monotonic() - ended < 1.0
        assert health.json()["status"] == "dead" and "injected" in health.json()["reason"]
        refused = complete(srv.url, base, 2)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert srv.proc.wait(timeout=30) == EXIT_ENGINE_DEAD
    assert "engine loop died" in (tmp_path / "server.log").read_text()


def test_lost_device(launch_server, demo_path: Path, tmp_path: Path):
    faults = {ENV: "device@3"}  # steps 1-2 serve the first request; from step 3 every step raises
    with launch_server(["--model", str(demo_path)], tmp_path / "server.log", faults) as srv:
        base = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        assert complete(srv.url, base, 2).status_code == 200
        failed = complete(srv.url, base, 2)  # its step fails, and so does the known-good request
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "engine_dead"
        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and "injected device loss" in health.json()["reason"]
        refused = complete(srv.url, base, 2)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        assert srv.proc.wait(timeout=30) == EXIT_ENGINE_DEAD
