"""Nothing leaks on a real `loraplex serve`: a few hundred requests mixing full and abandoned
streams, clients that give up while waiting, refused requests (unknown model, bad parameters, too
long), cold adapters churning through 2 device slots, preemption in a small KV pool and structured
outputs; at idle every engine counter is back to zero and the process's RSS after warm-up is
stable."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from loadtests.adapters import make_template, random_copy
from loadtests.soak import IDLE_GAUGES, RSS_GROWTH_LIMIT, rss_bytes, wait_idle

ADAPTERS = [f"a{i}" for i in range(6)]
WARMUP, ROUNDS, PER_ROUND = 50, 3, 50


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    template = make_template(demo_path, root / "template")
    for i, name in enumerate(ADAPTERS):
        random_copy(template, root / "adapters" / name, seed=i)
    args = ["--model", str(demo_path), "--adapters", str(root / "adapters")]
    args += ["--kv-capacity-tokens", "192", "--max-num-seqs", "8", "--max-loras", "2"]
    args += ["--max-cpu-loras", "2", "--max-waiting", "256", "--max-model-len", "192"]
    with launch_server(args, root / "server.log") as running:
        base = httpx.get(running.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        yield SimpleNamespace(url=running.url, base=base, proc=running.proc)


def one_request(srv, i: int) -> str:
    """Request i of the mix; returns what kind it was."""
    rng = random.Random(i)
    model = rng.choice([srv.base, *ADAPTERS])
    body = {
        "model": model,
        "prompt": f"Story {i}: " + "once upon a time, " * 8,
        "max_tokens": rng.randint(2, 40),
    }
    kind = ("full", "stream", "abandon", "give_up", "refused", "json")[i % 6]
    url = srv.url + "/v1/completions"
    try:
        if kind == "full":
            assert httpx.post(url, json=body, timeout=300).status_code == 200
        elif kind in ("stream", "abandon"):
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
                assert r.status_code == 200
                for n, _ in enumerate(r.iter_lines()):
                    if kind == "abandon" and n >= 2:
                        break  # the client walks away mid-stream
        elif kind == "give_up":
            try:
                httpx.post(url, json=body, timeout=0.05)  # gives up while queued or running
            except httpx.TimeoutException:
                pass
        elif kind == "refused":
            bad = rng.choice(
                [{"model": "nope"}, {"temperature": -1}, {"prompt": "hi " * 9000}, {"n": 99}]
            )
            assert httpx.post(url, json={**body, **bad}, timeout=60).status_code in (400, 404)
        else:
            choice = {"structured_outputs": {"choice": ["yes", "no"]}}
            assert httpx.post(url, json={**body, **choice}, timeout=300).status_code == 200
    except httpx.TransportError:
        pass  # a connection the server closed under the client: also exercised, not a leak
    return kind


def run_wave(srv, start: int, count: int) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: one_request(srv, i), range(start, start + count)))


def test_counters_return_to_zero_and_rss_is_stable(srv):
    run_wave(srv, 0, WARMUP)
    idle = wait_idle(srv.url)
    assert all(idle[name] == 0 for name in IDLE_GAUGES), idle
    warm = rss_bytes(srv.proc.pid)
    samples = []
    for r in range(ROUNDS):
        run_wave(srv, WARMUP + r * PER_ROUND, PER_ROUND)
        idle = wait_idle(srv.url)
        assert all(idle[name] == 0 for name in IDLE_GAUGES), (r, idle)
        samples.append(rss_bytes(srv.proc.pid))
    assert idle["loraplex_engine_preemptions_total"] > 0  # the small pool preempted
    assert idle["loraplex_adapter_loads_total"] > len(ADAPTERS)  # adapters went cold and back
    mib = [round(s / 2**20) for s in (warm, *samples)]
    print(f"RSS MiB after warm-up, then per round: {mib}")
    assert max(samples) < warm * (1 + RSS_GROWTH_LIMIT), mib
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
