"""Graceful shutdown of a real `loraplex serve`: SIGTERM during a long stream -> new requests get 503,
the stream still ends with a finish_reason and [DONE] (aborted after the grace period), exit code 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

GRACE_S = 3


def read_stream(url: str, events: list[dict], started: threading.Event, model: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 4000,
        "temperature": 1.0,
        "seed": 3,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            events.append({"done": True} if data == "[DONE]" else json.loads(data))
            started.set()


def test_sigterm_drains_then_aborts_and_exits_zero(launch_server, demo_path: Path, tmp_path):
    args = [
        "--model",
        str(demo_path),
        "--shutdown-grace-s",
        str(GRACE_S),
        "--max-model-len",
        "4200",
    ]
    with launch_server(args, tmp_path / "server.log") as srv:
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()
        base = models["data"][0]["id"]
        events: list[dict] = []
        started = threading.Event()
        reader = threading.Thread(target=read_stream, args=(srv.url, events, started, base))
        reader.start()
        assert started.wait(120), "the stream never started"
        time.sleep(0.3)
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(
            srv.url + "/v1/completions", json={"model": base, "prompt": "x"}, timeout=30
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        reader.join(60)
        assert not reader.is_alive()
        assert srv.proc.wait(timeout=60) == 0, srv.log.read_text()[-3000:]
        elapsed = time.monotonic() - sent
    assert events[-1] == {"done": True}
    reasons = [c["choices"][0]["finish_reason"] for c in events[:-1] if c.get("choices")]
    assert reasons[-1] in ("stop", "length", "abort"), events[-3:]
    assert elapsed < GRACE_S + 20
