"""Smoke test of `loraplex bench engine`: a tiny run writes the table, plot and JSON ratios."""

from __future__ import annotations

import json
import math

from server.cli import main

RATIOS = ("lora_overhead", "vs_peft_mixed", "vs_peft_sequential", "scaling_spread")


def test_bench_engine_tiny_run_writes_results(tmp_path, demo_path):
    out, json_path = tmp_path / "out", tmp_path / "engine.json"
    argv = [
        "bench",
        "engine",
        "--model",
        str(demo_path),
        "--requests",
        "4",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--ks",
        "1,2",
        "--repeats",
        "1",
        "--seq-requests",
        "1",
        "--out",
        str(out),
        "--adapters-dir",
        str(tmp_path / "adapters"),
        "--json",
        str(json_path),
    ]
    assert main(argv) == 0
    result = json.loads(json_path.read_text())
    assert result["ref_k"] == 2
    for name in RATIOS:
        assert math.isfinite(result[name]) and result[name] > 0, name
    speeds = result["tokens_per_s"]
    assert speeds["engine_no_adapters"] > 0
    assert speeds["peft_mixed"] > 0 and speeds["peft_sequential"] > 0
    for popularity in ("uniform", "zipf"):
        assert set(speeds["engine"][popularity]) == {"1", "2"}
        assert all(v > 0 for v in speeds["engine"][popularity].values())
    assert result["agreement_with_engine"]["peft_mixed"] > 0
    assert (out / "engine.md").read_text().startswith("| system |")
    assert (out / "engine.png").stat().st_size > 0
