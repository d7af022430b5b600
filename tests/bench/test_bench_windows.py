"""Smoke test of `loraplex bench windows`: a tiny run frees KV blocks and keeps the tokens."""

from __future__ import annotations

import json

from server.cli import main


def test_bench_windows_tiny_run_frees_blocks(tmp_path, demo_path):
    argv = ["bench", "windows", "--window", "16", "--requests", "2", "--prompt-tokens", "16"]
    argv += ["--new-tokens", "64", "--rounds", "1", "--results", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "windows.json").read_text())
    assert summary["same_tokens"] is True
    # kept: ceil(80 / 16) = 5 blocks per request; freed: the window, the growing block and the
    # next token's block at most
    assert summary["peak_blocks_keep"] == 2 * 5
    assert summary["peak_blocks_trim"] <= 2 * 3
    assert (tmp_path / "windows.png").stat().st_size > 0
