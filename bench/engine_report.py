"""The engine benchmark's results: per-system samples, the protocol's ratios, a table, a plot, JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = {
    "lora_overhead": (">=", 0.85),
    "vs_peft_mixed": (">=", 3.0),
    "vs_peft_sequential": (">=", 15.0),
    "scaling_spread": ("<=", 1.15),
}


@dataclass
class EngineResults:
    """Tokens/s samples (one per measurement round) of every system, keyed by what was run.

    A system's figure is its best round (highest tokens/s): on a shared machine the slow rounds
    measure the neighbours, not the system.
    """

    ref_k: int
    engine: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # popularity -> K ->
    engine_base: list[float] = field(default_factory=list)
    peft_mixed: list[float] = field(default_factory=list)
    peft_sequential: list[float] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)

    def engine_best(self, popularity: str, k: int) -> float:
        """Best tokens/s of the engine at K adapters under a popularity."""
        return max(self.engine[popularity][k])

    def ratios(self) -> dict[str, float]:
        """The performance protocol's figures (engine at ref_k uniform against each baseline)."""
        a_ref = self.engine_best("uniform", self.ref_k)
        every = [max(v) for curve in self.engine.values() for v in curve.values()]
        ratios = {
            "lora_overhead": a_ref / max(self.engine_base),
            "vs_peft_mixed": a_ref / max(self.peft_mixed),
            "vs_peft_sequential": a_ref / max(self.peft_sequential),
            "scaling_spread": max(every) / min(every),
        }
        for popularity, curve in self.engine.items():
            values = [max(v) for v in curve.values()]
            ratios[f"scaling_spread_{popularity}"] = max(values) / min(values)
        return ratios


def target_met(name: str, value: float) -> bool:
    """Whether a ratio meets the protocol's goal."""
    op, goal = TARGETS[name]
    return value >= goal if op == ">=" else value <= goal


def _row(system: str, k: str, popularity: str, samples: list[float], base: float) -> str:
    best = max(samples)
    spread = f"{min(samples):.0f}-{max(samples):.0f}"
    return f"| {system} | {k} | {popularity} | {best:.0f} | {spread} | {best / base:.2f} |"


def markdown_table(results: EngineResults) -> str:
    """One row per system and K: best tokens/s, range over rounds, ratio to no adapters."""
    base = max(results.engine_base)
    lines = [
        "| system | K | popularity | tokens/s (best round) | all rounds | / engine no adapters |",
        "|---|---|---|---|---|---|",
        _row("engine, no adapters", "0", "-", results.engine_base, base),
    ]
    for popularity, curve in results.engine.items():
        for k, samples in sorted(curve.items()):
            lines.append(_row("engine", str(k), popularity, samples, base))
    ref = str(results.ref_k)
    lines.append(_row("PEFT generate(adapter_names)", ref, "uniform", results.peft_mixed, base))
    lines.append(_row("PEFT set_adapter, 1 by 1", ref, "uniform", results.peft_sequential, base))
    return "\n".join(lines)


def ratios_table(ratios: dict[str, float]) -> str:
    """The protocol's ratios against their targets."""
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for name, (op, goal) in TARGETS.items():
        met = "yes" if target_met(name, ratios[name]) else "no"
        lines.append(f"| {name} | {ratios[name]:.2f} | {op} {goal} | {met} |")
    return "\n".join(lines)


def write_plot(results: EngineResults, path: Path) -> None:
    """tokens/s against K (log scale) for each popularity, with the baselines as flat lines."""
    import matplotlib  # imported here: serving never needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for popularity, curve in results.engine.items():
        ks = sorted(curve)
        ax.plot(ks, [max(curve[k]) for k in ks], "o-", label=f"engine, {popularity}")
    baselines = (
        ("engine, no adapters", results.engine_base, "k--"),
        (f"PEFT generate(adapter_names), K={results.ref_k}", results.peft_mixed, "r:"),
        (f"PEFT set_adapter 1 by 1, K={results.ref_k}", results.peft_sequential, "m-."),
    )
    for label, samples, style in baselines:
        ax.axhline(max(samples), linestyle=style[1:], color=style[0], label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters K")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("loraplex engine throughput vs number of adapters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results: EngineResults, settings: dict, path: Path) -> dict:
    """Write ratios, best tokens/s, every sample and settings to path; returns what was written."""
    payload = {
        **results.ratios(),
        "ref_k": results.ref_k,
        "targets": {name: f"{op} {goal}" for name, (op, goal) in TARGETS.items()},
        "tokens_per_s": {
            "engine_no_adapters": max(results.engine_base),
            "engine": {
                pop: {str(k): max(v) for k, v in sorted(curve.items())}
                for pop, curve in results.engine.items()
            },
            "peft_mixed": max(results.peft_mixed),
            "peft_sequential": max(results.peft_sequential),
        },
        "samples": {
            "engine_no_adapters": results.engine_base,
            "engine": {
                pop: {str(k): v for k, v in sorted(curve.items())}
                for pop, curve in results.engine.items()
            },
            "peft_mixed": results.peft_mixed,
            "peft_sequential": results.peft_sequential,
        },
        "agreement_with_engine": results.agreement,
        "settings": settings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return payload
