"""A short `make soak` run: locust at capacity against the real server, RSS and gauges sampled over
time, every idle gauge back to zero at the end, the reports written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from loadtests.soak import IDLE_GAUGES, main


def test_short_soak_reports_rss_and_idle_gauges(demo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = ["--minutes", "0.4", "--users", "6", "--sample-s", "2", "--out", str(out)]
    argv += ["--work", str(tmp_path / "work"), "--model", str(demo_path)]
    verdict = main(argv)
    result = json.loads((out / "soak.json").read_text())
    assert result["requests"] > 0 and result["failures"] == 0, (out / "soak.md").read_text()
    assert all(result["idle"][name] == 0 for name in IDLE_GAUGES), result["idle"]
    assert verdict == (0 if result["rss_growth"] < 0.05 else 1)
    rows = list(csv.DictReader(open(out / "soak.csv")))
    assert len(rows) >= 5 and all(float(r["rss_mib"]) > 100 for r in rows)
    assert max(float(r["loraplex_running_sequences"]) for r in rows) > 0  # sampled under load
    assert (out / "rss.png").stat().st_size > 0 and (out / "report.html").is_file()
