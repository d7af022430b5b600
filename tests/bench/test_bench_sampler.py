"""Smoke test of `loraplex bench sampler`: a tiny run times both samplers in every case and writes
its results."""

from __future__ import annotations

import json

from bench.sampler import CASES, COMPARED
from server.cli import main


def test_bench_sampler_tiny_run_writes_positive_timings(tmp_path):
    argv = ["bench", "sampler", "--quick", "--vocab", "256,512", "--batch", "1,3"]
    argv += ["--results", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "sampler.json").read_text())
    assert set(summary) >= {"ms", "ratio_old_over_new", "settings", "wall_s"}
    assert summary["settings"]["repeats"] == 5
    assert set(summary["ms"]) == {"256", "512"}
    for batches in summary["ms"].values():
        assert set(batches) == {"1", "3"}
        for cases in batches.values():
            assert set(cases) == set(CASES)
            for case, samplers in cases.items():
                assert set(samplers) == set(CASES[case][1])
                for timing in samplers.values():
                    assert 0 < timing["median"] <= timing["p90"]
    assert set(summary["ratio_old_over_new"]) == set(COMPARED)
    for by_vocab in summary["ratio_old_over_new"].values():
        assert all(ratio > 0 for by_batch in by_vocab.values() for ratio in by_batch.values())
    assert "| sampled | 512 | 3 |" in (tmp_path / "sampler.md").read_text()
    assert (tmp_path / "sampler.png").stat().st_size > 0
