"""Schema fuzzing with schemathesis' CLI (`st run --checks all`) against a real server on 127.0.0.1
with one adapter folder under its adapter roots: no 5xx, every status, content type, header and body
(SSE events included) as the OpenAPI document states, schema-invalid requests refused, and
schema-valid ones accepted.

The server's context is small (48 tokens, most of a chat prompt) to keep generations short, so
prompts that fill it are refused: both runs swap positive_data_acceptance for its variant in
st_hooks.py, which also accepts a 400 whose code is one of the runtime rules the OpenAPI document
lists (docs/reliability.md has the plain command's result on a default server). Two runs on one
server:
- as a user runs it: 150 examples per operation, no configuration (the stateful phase reaches the
  served model through the values /v1/models answers);
- deep: every generated request names the served base, loads name a real adapter folder, and the
  stateful phase follows the OpenAPI links (load an adapter, use it, unload it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

HOOKS = Path(__file__).with_name("st_hooks.py")
ST = Path(sys.executable).with_name("st")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def srv(launch_server, demo_path: Path, peft_adapters: dict[str, Path], tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-roots")
    adapter = shutil.copytree(peft_adapters["beta"], root / "one")
    args = ["--model", str(demo_path), "--max-model-len", "48", "--max-n", "2"]
    args += ["--adapter-roots", str(root)]
    with launch_server(args, root / "server.log") as running:
        running.adapter = adapter
        running.base = httpx.get(running.url + "/v1/models").json()["data"][0]["id"]
        yield running


def st_run(url: str, workdir: Path, examples: int, config: Path | None = None) -> dict:
    """Run `st run --checks all` (with st_hooks.py's acceptance check) on the server's OpenAPI
    document; its JSON report (failures printed)."""
    report = workdir / "report.json"
    command = [str(ST), *(["--config-file", str(config)] if config else []), "run"]
    command += [url + "/openapi.json", "--checks", "all", "--max-examples", str(examples)]
    command += ["--exclude-checks", "positive_data_acceptance", "--seed", "1"]
    command += ["--report", "json", "--report-json-path", str(report)]
    done = subprocess.run(
        command,
        cwd=workdir,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        capture_output=True,
        text=True,
        timeout=800,
    )
    (workdir / "st.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return json.loads(report.read_text())


def accepted(report: dict, operation: str) -> int:
    """How many generated requests of an operation were accepted (2xx), all phases."""
    return sum(phase["accepted"] for phase in report["valid_rates"][operation].values())


def test_st_run_all_checks_as_a_user_runs_it(srv, tmp_path: Path):
    report = st_run(srv.url, tmp_path, 150)
    assert report["test_cases"]["unique_failures"] == 0 and not report["errors"]
    assert report["phases"]["stateful"]["status"] == "success"


def test_st_run_deep_with_links(srv, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[parameters]\n"
        f'"body.model" = {json.dumps(srv.base)}\n'
        f'"body.lora_path" = {json.dumps(str(srv.adapter))}\n'
    )
    report = st_run(srv.url, tmp_path, 10, config)
    assert report["test_cases"]["unique_failures"] == 0 and not report["errors"]
    assert report["phases"]["stateful"]["status"] == "success"
    for operation in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert accepted(report, operation) > 0, operation  # 200 bodies were checked too
    assert accepted(report, "POST /v1/load_lora_adapter") > 0
    assert accepted(report, "POST /v1/unload_lora_adapter") > 0
    log = (tmp_path / "st.log").read_text()
    # the three load links, and the one schemathesis infers from /v1/models to its retrieve route
    assert "API Links:    4 covered / 4 selected / 4 total (1 inferred)" in log, log[-3000:]


def test_max_tokens_caps_at_the_context(srv):
    body = {"model": srv.base, "prompt": "Hello", "max_tokens": 10**6, "temperature": 0}
    answer = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert answer.json()["usage"]["total_tokens"] == 48
