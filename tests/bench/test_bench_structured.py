"""Smoke test of `loraplex bench structured`: a tiny run serves both modes on the same work, every
constrained output is valid JSON of its schema, and compile times and the plot are written."""

from __future__ import annotations

import json
import math

from server.cli import main


def test_bench_structured_tiny_run_writes_valid_results(tmp_path, demo_path):
    json_path, plot_path = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["bench", "structured", "--requests", "4", "--adapters", "1", "--rounds", "1"]
    argv += ["--compile-rounds", "2", "--results", str(tmp_path), "--json", str(json_path)]
    argv += ["--plot", str(plot_path), "--adapters-dir", str(tmp_path / "adapters")]
    assert main(argv) == 0
    summary = json.loads(json_path.read_text())
    ratio = summary["structured_throughput_ratio"]
    assert math.isfinite(ratio) and ratio > 0
    assert summary["tokens_per_s"]["none"] > 0 and summary["tokens_per_s"]["half"] > 0
    # warm-up and one timed run of half: 2 constrained requests each, all finished and valid
    assert summary["constrained_total"] == 4
    assert summary["constrained_valid"] == summary["constrained_total"]
    # the unconstrained run matched the constrained lengths: the same tokens in the same steps
    assert summary["constrained_lengths_stable"]
    assert summary["generated_tokens"]["none"] == summary["generated_tokens"]["half"]
    assert summary["steps"]["none"] == summary["steps"]["half"]
    lengths = summary["mean_output_tokens"]["half"]
    assert lengths["free_half"] == summary["settings"]["max_tokens"]
    assert 0 < lengths["constrained_half"] < lengths["free_half"]
    assert 0 < summary["grammar_share"] < 1
    for kind in ("cold", "cached"):
        times = summary["compile_ms"][kind]
        assert 0 < times["p50"] <= times["p99"]
    assert summary["compile_ms"]["cached"]["p50"] < summary["compile_ms"]["cold"]["p50"]
    assert len(summary["compile_ms_by_grammar"]) >= 8
    assert summary["tokenizer_info_s"] > 0
    assert plot_path.stat().st_size > 0
