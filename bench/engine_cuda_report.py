"""Tables and JSON of the GPU decode benchmark (bench.engine_cuda)."""

from __future__ import annotations

import json
from pathlib import Path

GOALS = {"batch-1 decode within 3x of the floor": 1 / 3, "LoRA overhead at 32 adapters": 0.85}


def _lookup(rows: list[dict], batch: int, count: int) -> dict | None:
    return next((r for r in rows if r["batch"] == batch and r["adapters"] == count), None)


def summary(shape: dict) -> dict[str, float]:
    """Per shape: batch-1 share of the floor, and LoRA overhead (N=32 over N=0) per batch."""
    rows = shape["rows"]
    out: dict[str, float] = {}
    one = _lookup(rows, 1, 0)
    if one:
        out["batch1_of_floor"] = one["of_floor"]
    for batch in sorted({r["batch"] for r in rows}):
        bare, mixed = _lookup(rows, batch, 0), _lookup(rows, batch, 32)
        if bare and mixed:
            out[f"lora_overhead_b{batch}"] = mixed["tokens_per_s"] / bare["tokens_per_s"]
        if mixed and "peft_tokens_per_s" in mixed:
            out[f"vs_peft_mixed_b{batch}"] = mixed["tokens_per_s"] / mixed["peft_tokens_per_s"]
    return out


def markdown(shapes: list[dict], settings: dict) -> str:
    """One table per shape plus its summary figures."""
    gb = 1e9
    parts = [
        f"device: {settings['device']}, copy bandwidth {settings['copy_bandwidth_bytes_per_s'] / gb:.0f}"
        f" GB/s (read + write), rank {settings['rank']}, prompt {settings['prompt_tokens']} tokens"
    ]
    for shape in shapes:
        parts.append(
            f"\n**{shape['shape']}**: {shape['weight_bytes_per_step'] / gb:.2f} GB of weights read "
            f"per step, {shape['adapter_bytes'] / 1e6:.1f} MB per adapter "
            f"({','.join(shape['targets'])})\n"
        )
        parts.append(
            "| batch | adapters N | distinct in batch | tokens/s | floor tokens/s | of floor "
            "| graphs off tokens/s | PEFT mixed tokens/s |"
        )
        parts.append("|---|---|---|---|---|---|---|---|")
        for r in shape["rows"]:
            eager = r.get("tokens_per_s_no_graphs")
            peft = r.get("peft_tokens_per_s")
            parts.append(
                f"| {r['batch']} | {r['adapters']} | {r['distinct_in_batch']} "
                f"| {r['tokens_per_s']:.0f} | {r['floor_tokens_per_s']:.0f} | {r['of_floor']:.2f} "
                f"| {'-' if eager is None else f'{eager:.0f}'} "
                f"| {'-' if peft is None else f'{peft:.0f}'} |"
            )
        figures = summary(shape)
        parts.append("")
        parts.append(", ".join(f"{k} = {v:.2f}" for k, v in figures.items()))
    return "\n".join(parts)


def write_json(shapes: list[dict], settings: dict, path: Path) -> None:
    """Every row, the summaries and the settings."""
    payload = {
        "settings": settings,
        "goals": GOALS,
        "shapes": [{**s, "summary": summary(s)} for s in shapes],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
