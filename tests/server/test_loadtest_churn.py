"""The churn user against a server that cannot load its adapters: one message, no failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_churn_user_stops_with_one_message_when_the_server_cannot_load(
    server, peft_adapters: dict[str, Path], tmp_path: Path
) -> None:
    churn = tmp_path / "churn"  # outside the server's adapter folders
    shutil.copytree(next(iter(peft_adapters.values())), churn / "one")
    locustfile = Path(__file__).parents[2] / "loadtests" / "locustfile.py"
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless"]
    command += ["-u", "4", "-r", "4", "-t", "4s", "--host", server.url, "--only-summary"]
    command += ["--exit-code-on-error", "1", "ChurnUser", "BaseOnlyUser"]
    env = {**os.environ, "LOADTEST_CHURN_DIR": str(churn)}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert '"ChurnUser": 2' in output  # two churn users spawned: one message for both
    assert output.count("ChurnUser skipped:") == 1, output
    assert "outside the allowed adapter folders" in output
    rows = [line.split() for line in output.splitlines()]  # locust's statistics table
    assert not [row for row in rows if "load_lora_adapter" in row], output  # never counted
    assert "Traceback" not in output
    assert [row for row in rows if row[:3] == ["TTFT", "base", "stream"]], output  # base ran
