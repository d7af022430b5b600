"""Smoke test of `loraplex bench prefix`: a tiny run finds shared prefixes cached and writes its
results."""

from __future__ import annotations

import json

from server.cli import main


def test_bench_prefix_tiny_run_hits_the_cache(tmp_path, demo_path):
    # 64-token steps: a request's system prompt is cached before its adapter's next one is admitted
    argv = ["bench", "prefix", "--adapters", "2", "--requests-per-adapter", "2"]
    argv += ["--system-tokens", "64", "--user-tokens", "16", "--new-tokens", "4", "--rounds", "1"]
    argv += ["--max-batch-tokens", "64", "--results", str(tmp_path)]
    argv += ["--adapters-dir", str(tmp_path / "adapters")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "prefix.json").read_text())
    for key in ("ttft_p50_ratio", "throughput_ratio", "no_sharing_ratio"):
        assert summary[key] > 0
    assert summary["shared_cache_on"]["hit_rate"] > 0
    assert summary["shared_cache_off"]["hit_rate"] == summary["distinct_cache_on"]["hit_rate"] == 0
    assert (tmp_path / "prefix.png").stat().st_size > 0
