"""Adapters at runtime through a real `loraplex serve`: the vLLM-shaped load/unload routes and their
refusals, the watched folder (hot pickup, replacement, removal), unload during streaming, and
adapters made by plain PEFT or by loraplex matching PEFT."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from adapters.train.manifest import base_fingerprint, build_manifest, write_manifest
from loader.config import Config

BASE = "SmolLM2-135M-Instruct"
PROMPT = "The three primary colors are"
NEW_TOKENS = 8
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def folders(peft_adapters, tmp_path_factory) -> SimpleNamespace:
    """served/ (watched): alpha, beta. library/ (an extra root): gamma, delta and broken ones.
    outside/: not a root."""
    root = tmp_path_factory.mktemp("routes")
    served, library, outside = root / "served", root / "library", root / "outside"
    for name in ("alpha", "beta"):
        shutil.copytree(peft_adapters[name], served / name)
    for name in ("gamma", "delta"):
        shutil.copytree(peft_adapters[name], library / name)
    shutil.copytree(peft_adapters["delta"], outside / "evil")
    (library / "escape").symlink_to(outside / "evil")
    corrupt = shutil.copytree(peft_adapters["delta"], library / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    big = shutil.copytree(peft_adapters["delta"], library / "big-rank")
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    foreign = shutil.copytree(peft_adapters["delta"], library / "foreign")
    other_base = {"architecture": "LlamaForCausalLM", "config_sha256": "0" * 64, "quant": "nf4"}
    write_manifest(foreign, build_manifest(other_base, {}, {}, {}))
    pickled = library / "pickled"
    pickled.mkdir()
    shutil.copy(peft_adapters["delta"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return SimpleNamespace(served=served, library=library, outside=outside)


@pytest.fixture(scope="module")
def live(launch_server, demo_path, folders, tmp_path_factory) -> SimpleNamespace:
    args = ["--model", str(demo_path), "--adapters", str(folders.served)]
    args += ["--adapter-roots", str(folders.library), "--adapters-poll-s", "0.2"]
    args += ["--max-loras", "2", "--max-cpu-loras", "3", "--max-lora-rank", "16"]
    with launch_server(args, tmp_path_factory.mktemp("log") / "serve.log") as running:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            yield SimpleNamespace(client=client, log=running.log)


def load(client: httpx.Client, name: str, path: str | Path) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def models(client: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def complete(client: httpx.Client, model: str, prompt: str | list[int] = PROMPT) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_load_route_refuses_bad_adapters_with_named_errors(live, folders):
    lib = folders.library
    cases = [
        ("../evil", lib / "delta", 400, "invalid_adapter_name"),
        (BASE, lib / "delta", 400, "invalid_adapter_name"),
        ("t1", lib / ".." / "outside" / "evil", 403, "adapter_path_forbidden"),
        ("t2", "../outside/evil", 403, "adapter_path_forbidden"),  # relative: from the root
        ("t3", lib / "escape", 403, "adapter_path_forbidden"),  # a symlink out of the root
        ("t4", lib / "missing", 404, "adapter_not_found"),
        ("t5", lib / "corrupt", 400, "corrupt_adapter_weights"),
        ("t6", lib / "big-rank", 400, "rank_too_large"),
        ("t7", lib / "foreign", 400, "base_mismatch"),
        ("t8", lib / "pickled", 400, "pickle_weights_refused"),
    ]
    for name, path, status, code in cases:
        response = load(live.client, name, path)
        assert response.status_code == status, (name, path, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"], (name, error)
    missing = live.client.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    assert set(models(live.client)) == {BASE, "alpha", "beta"}
    assert complete(live.client, "alpha")  # still serving


def test_load_serve_report_and_unload(live, folders):
    response = load(live.client, "gamma", folders.library / "gamma")
    assert response.status_code == 200 and "gamma" in response.text
    listed = models(live.client)["gamma"]
    assert listed["parent"] == BASE and listed["root"] == str(folders.library / "gamma")
    assert listed["metadata"]["rank"] == 16 and listed["metadata"]["bytes"] > 0
    assert complete(live.client, "gamma") != complete(live.client, BASE)
    assert models(live.client)["gamma"]["metadata"]["tier"] == "device"
    metrics = live.client.get("/metrics").text
    for gauge in ("loraplex_adapter_host_bytes", "loraplex_adapter_device_bytes"):
        line = next(x for x in metrics.splitlines() if x.startswith(gauge + " "))
        assert float(line.split()[1]) > 0
    assert live.client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).is_success
    assert "gamma" not in models(live.client)
    again = live.client.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"
    gone = live.client.post("/v1/completions", json={"model": "gamma", "prompt": PROMPT})
    assert gone.status_code == 404


def test_unload_during_streaming_finishes_the_stream(live, folders):
    assert load(live.client, "streamer", folders.library / "delta").status_code == 200
    body = {"model": "streamer", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    expected = live.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks, unloaded = [], False
    with live.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunks.append(json.loads(line[6:]))
            if not unloaded:
                response = live.client.post(
                    "/v1/unload_lora_adapter", json={"lora_name": "streamer"}
                )
                assert response.status_code == 200
                unloaded = True
    assert "error" not in chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert "streamer" not in models(live.client)


def test_watched_folder_pickup_replacement_and_removal(live, folders, peft_adapters):
    tmp = folders.served / ".tmp-hot"
    shutil.copytree(peft_adapters["gamma"], tmp)
    time.sleep(0.6)  # three polls: dot names are never picked up
    assert "hot" not in models(live.client) and ".tmp-hot" not in models(live.client)
    tmp.rename(folders.served / "hot")  # the atomic way to add an adapter
    wait_until(lambda: "hot" in models(live.client))
    assert models(live.client)["hot"]["metadata"]["rank"] == 16
    first = complete(live.client, "hot")

    for file in ("adapter_config.json", "adapter_model.safetensors"):  # replace file by file
        staged = folders.served / "hot" / f".{file}.new"
        shutil.copy(peft_adapters["alpha"] / file, staged)
        os.replace(staged, folders.served / "hot" / file)
    wait_until(lambda: models(live.client)["hot"]["metadata"]["rank"] == 8)
    second = complete(live.client, "hot")
    assert second != first and second == complete(live.client, "alpha")  # no stale slot or cache

    shutil.rmtree(folders.served / "hot")
    wait_until(lambda: "hot" not in models(live.client))
    assert "adapter hot removed" in live.log.read_text()


def test_plain_peft_and_loraplex_adapters_match_peft(
    live, folders, demo_path, peft_scratch, peft_oracle, demo_tokenizer
):
    # beta: trained elsewhere with plain PEFT, rank 4, only q_proj and v_proj
    served = {"beta": "beta"}
    # ours: a loraplex-format adapter (PEFT files + our manifest with the served base fingerprint)
    ours = shutil.copytree(folders.library / "gamma", folders.library / "ours")
    base = SimpleNamespace(
        config=Config(model=str(demo_path)),
        name=BASE,
        model=peft_scratch.get_base_model(),
        path=demo_path,
    )
    write_manifest(ours, build_manifest(base_fingerprint(base), {}, {}, {}))
    assert load(live.client, "ours", ours).status_code == 200
    peft_scratch.load_adapter(ours, adapter_name="ours")  # plain PEFT reads it as is
    served["ours"] = "ours"
    try:
        ids = demo_tokenizer(PROMPT).input_ids
        for model, peft_name in served.items():
            text = complete(live.client, model, ids)
            expected = peft_oracle.greedy(peft_scratch, ids, peft_name, NEW_TOKENS)
            if text != demo_tokenizer.decode(expected):  # only where PEFT itself nearly tied
                top2 = peft_oracle.forced(peft_scratch, ids, peft_name, expected).topk(2).values
                margin = float((top2[:, 0] - top2[:, 1]).min())
                tolerance = peft_oracle.tolerance(peft_scratch, ids, peft_name, expected)
                assert margin <= tolerance, (
                    model,
                    text,
                    demo_tokenizer.decode(expected),
                )
    finally:
        peft_scratch.delete_adapter("ours")
