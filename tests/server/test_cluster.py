"""`loraplex cluster` on a local Ray cluster: two replicas of the demo model, six adapters, API keys.

One cluster for the module (it takes ~45 s to come up on 2 cores). Greedy outputs are compared with
a single-process `loraplex serve` on the same flags and one torch thread, as each replica has
(--replica-cpus 1): each request alone, so both run the same computation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from bench.cluster import free_port
from bench.workload import make_adapters

pytest.importorskip("ray.serve", reason="loraplex[cluster] is not installed")

pytestmark = pytest.mark.slow

ADAPTERS = [f"tenant{i}" for i in range(6)]
ADMIN, USER = "sk-cluster-admin-1f4e", "sk-cluster-user-8b2c"
PROMPTS = ["Name a colour:", "Count to three:"]
NEW_TOKENS = 8
RECOVERY_TIMEOUT_S = 240


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(url: str, model: str, prompt: str, key: str = USER, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=auth(key), timeout=120)


def greedy_texts(url: str, models: list[str]) -> dict[str, str]:
    """Each model's greedy completion of the first prompt, requests sent one at a time."""
    texts = {}
    for model in models:
        response = complete(url, model, PROMPTS[0])
        assert response.status_code == 200, response.text
        texts[model] = response.json()["choices"][0]["text"]
    return texts


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def metric(text: str, name: str, replica: str) -> float:
    """The value of an unlabelled-by-model series of one replica in the cluster's /metrics."""
    for line in text.splitlines():
        if line.startswith(f'{name}{{replica="{replica}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name} of replica {replica} not in /metrics")


@pytest.fixture(scope="module")
def cluster(demo_path: Path, tmp_path_factory: pytest.TempPathFactory, launch_server):
    """The single-process reference texts, then the cluster: url, log, proc, base, reference,
    roots (a folder of adapters only the admin load route serves)."""
    work = tmp_path_factory.mktemp("cluster")
    folder, roots = work / "adapters", work / "roots"
    made = make_adapters(demo_path, work / "made", len(ADAPTERS) + 1, 8, seed=31)
    for name, path in zip(ADAPTERS, made, strict=False):
        shutil.copytree(path, folder / name)
    shutil.copytree(made[-1], roots / "late")
    keys = work / "keys.json"
    keys.write_text(
        json.dumps(
            [
                {"key": ADMIN, "role": "admin", "adapters": "*"},
                {"key": USER, "role": "user", "adapters": "*"},
            ]
        )
    )
    flags = ["--model", str(demo_path), "--adapters", str(folder), "--adapter-roots", str(roots)]
    flags += ["--api-keys-file", str(keys), "--max-waiting", "64"]
    with launch_server(flags, work / "serve.log", env={"OMP_NUM_THREADS": "1"}) as single:
        base = httpx.get(single.url + "/v1/models", headers=auth(USER)).json()["data"][0]["id"]
        reference = greedy_texts(single.url, [base, *ADAPTERS])
    cluster_flags = ["--replicas", "2", "--replica-cpus", "1", "--port", str(free_port())]
    with launch_server(
        flags + cluster_flags, work / "cluster.log", subcommand="cluster", stop_timeout_s=60
    ) as running:
        yield SimpleNamespace(
            url=running.url, log=running.log, base=base, reference=reference, roots=roots
        )


def test_greedy_outputs_equal_single_process_serve(cluster):
    assert greedy_texts(cluster.url, [cluster.base, *ADAPTERS]) == cluster.reference


def test_each_adapter_stays_on_one_replica_while_both_are_busy(cluster):
    placed = [  # one at a time first: Ray sends an id no replica holds to the one holding fewest
        (name, complete(cluster.url, name, PROMPTS[0], max_tokens=1)) for name in ADAPTERS
    ]
    jobs = [(model, prompt) for model in [*ADAPTERS, cluster.base] for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        burst = list(pool.map(lambda job: complete(cluster.url, *job), jobs))
    served: dict[str, set[str]] = {}
    for model, response in placed + [(m, r) for (m, _), r in zip(jobs, burst, strict=True)]:
        assert response.status_code == 200, response.text
        served.setdefault(model, set()).add(response.headers["x-loraplex-replica"])
    replicas = {r["replica"] for r in health(cluster.url)["replicas"]}
    assert len(replicas) == 2
    in_burst = {r.headers["x-loraplex-replica"] for r in burst}
    assert in_burst == replicas  # both replicas were busy with the burst
    for name in ADAPTERS:
        assert len(served[name]) == 1, f"{name} was served by {served[name]}"


def test_streaming_passes_through(cluster):
    body = {
        "model": ADAPTERS[1],
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
    }
    plain = httpx.post(
        cluster.url + "/v1/chat/completions", json=body, headers=auth(USER), timeout=120
    )
    pieces, done = [], False
    with httpx.stream(
        "POST",
        cluster.url + "/v1/chat/completions",
        json={**body, "stream": True},
        headers=auth(USER),
        timeout=120,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-loraplex-replica"]
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert done and len(pieces) > 2
    assert "".join(pieces) == plain.json()["choices"][0]["message"]["content"]


def test_keys_limits_and_errors_are_the_apps(cluster):
    anonymous = httpx.post(
        cluster.url + "/v1/completions", json={"model": ADAPTERS[0], "prompt": "x"}
    )
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"]
    unknown = complete(cluster.url, "no-such-adapter", "x")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    huge = {**auth(USER), "content-type": "application/json"}  # the ingress does not read it
    too_large = httpx.post(cluster.url + "/v1/completions", content=b" " * 2**21, headers=huge)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "request_too_large"
    bad = complete(cluster.url, ADAPTERS[0], "x", max_tokens=-1)
    assert bad.status_code == 400 and bad.json()["error"]["param"]
    refused = httpx.post(
        cluster.url + "/v1/load_lora_adapter",
        json={"lora_name": "late", "lora_path": str(cluster.roots / "late")},
        headers=auth(USER),
    )
    assert refused.status_code == 403, refused.text
    assert httpx.get(cluster.url + "/openapi.json").json()["info"]["title"] == "loraplex"


def test_admin_routes_apply_to_every_replica(cluster):
    load = {"lora_name": "late", "lora_path": str(cluster.roots / "late")}
    response = httpx.post(cluster.url + "/v1/load_lora_adapter", json=load, headers=auth(ADMIN))
    assert response.status_code == 200, response.text
    ids = [
        m["id"] for m in httpx.get(cluster.url + "/v1/models", headers=auth(USER)).json()["data"]
    ]
    assert ids.count("late") == 1 and set(ADAPTERS) <= set(ids)
    metrics = httpx.get(cluster.url + "/metrics").text
    replicas = [r["replica"] for r in health(cluster.url)["replicas"]]
    for replica in replicas:  # every replica's own series, labelled
        assert metric(metrics, "loraplex_registered_adapters", replica) == len(ADAPTERS) + 1
    assert 'loraplex_cluster_replicas{state="RUNNING"} 2.0' in metrics
    assert complete(cluster.url, "late", PROMPTS[0]).status_code == 200
    unload = httpx.post(
        cluster.url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=auth(ADMIN)
    )
    assert unload.status_code == 200, unload.text
    assert complete(cluster.url, "late", PROMPTS[0]).status_code == 404
    metrics = httpx.get(cluster.url + "/metrics").text
    for replica in replicas:
        assert metric(metrics, "loraplex_registered_adapters", replica) == len(ADAPTERS)


def test_killed_replica_fails_its_requests_clearly_and_is_restarted(cluster):
    load = {"lora_name": "kept", "lora_path": str(cluster.roots / "late")}
    assert (
        httpx.post(
            cluster.url + "/v1/load_lora_adapter", json=load, headers=auth(ADMIN)
        ).status_code
        == 200
    )
    pids = {r["replica"]: r["pid"] for r in health(cluster.url)["replicas"]}
    events = []
    started = time.monotonic()
    body = {
        "model": ADAPTERS[2],
        "prompt": "Count:",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", cluster.url + "/v1/completions", json=body, headers=auth(USER), timeout=60
    ) as response:
        victim = response.headers["x-loraplex-replica"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(pids[victim], signal.SIGKILL)
    assert time.monotonic() - started < 60  # ended, not hung
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_unavailable" and "retry" in error["message"]

    during = httpx.get(cluster.url + "/health", timeout=30)
    assert during.status_code == 200 and during.json()["status"] == "degraded"
    for name in (ADAPTERS[2], "kept", cluster.base):  # the survivor serves everything meanwhile
        assert complete(cluster.url, name, PROMPTS[1]).status_code == 200

    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while (now := health(cluster.url))["status"] != "ok":
        assert time.monotonic() < deadline, f"replica not restarted: {now}"
        time.sleep(2)
    restarted = {r["replica"] for r in now["replicas"]} - set(pids)
    assert len(restarted) == 1
    metrics = httpx.get(cluster.url + "/metrics").text  # the new replica replayed the admin load
    assert metric(metrics, "loraplex_registered_adapters", restarted.pop()) == len(ADAPTERS) + 1
    assert greedy_texts(cluster.url, [ADAPTERS[2]])[ADAPTERS[2]] == cluster.reference[ADAPTERS[2]]
