"""A short load-test smoke run: the real server, 64 adapters, every user class, ~10 s, 0 failures."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.run import main


def test_smoke_load_has_no_failures(demo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    argv = ["--users", "4", "--spawn-rate", "4", "--duration", "10", "--scenario", "all"]
    argv += ["--out", str(out), "--work", str(tmp_path / "work"), "--model", str(demo_path)]
    assert main(argv) == 0, (out / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0
    assert summary["adapters"] >= 64 and summary["ttft_ms"]["n"] > 0
    assert (out / "report.html").is_file() and (out / "locust_stats.csv").is_file()
