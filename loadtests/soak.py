"""`make soak`: locust at capacity (every user class of the load test) against the demo model and 64+
adapters for a configurable time (default 30 minutes), sampling the server's RSS and engine gauges;
then, at idle, the gauges must be back to zero. Writes soak.csv (RSS and gauges over time),
rss.png, soak.md and soak.json, next to the load test's locust reports.

    python -m loadtests.soak --minutes 30 --users 16 --out results/soak
Exit status 1 when a request failed, a gauge stayed above zero at idle, or the RSS after warm-up
grew by RSS_GROWTH_LIMIT or more.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from loadtests.run import add_load_arguments, run_locust, serve_for_load, summarize

IDLE_GAUGES = (
    "loraplex_running_sequences",
    "loraplex_waiting_sequences",
    "loraplex_kv_used_blocks",
    "loraplex_adapter_pins",
    "loraplex_open_streams",
)
COUNTERS = ("loraplex_engine_preemptions_total", "loraplex_adapter_loads_total")
RSS_GROWTH_LIMIT = 0.05
WARMUP_FRACTION = 0.2  # the first fifth of the run warms caches, pools and allocators up
IDLE_TIMEOUT_S = 120


def rss_bytes(pid: int) -> int:
    """The resident set size of process pid."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def gauges(url: str) -> dict[str, float]:
    """The idle gauges and the preemption and adapter-load counters from /metrics (nan if absent)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found = {}
    for name in (*IDLE_GAUGES, *COUNTERS):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def wait_idle(url: str, timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, float]:
    """The gauges once every idle gauge reads zero (or when timeout_s has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = gauges(url)
        if all(now[name] == 0 for name in IDLE_GAUGES) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


FIELDS = ("t_s", "rss_mib", *IDLE_GAUGES, *COUNTERS)


class Sampler(threading.Thread):
    """Samples RSS (MiB) and the gauges every period_s into rows and the CSV at path (as they
    come: a cut-short run keeps its samples), with a progress bar."""

    def __init__(self, url: str, pid: int, period_s: float, total_s: float, path: Path) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.period_s, self.total_s = url, pid, period_s, total_s
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        with (
            open(self.path, "w", newline="") as out,
            tqdm(total=round(self.total_s), unit="s", desc="soak") as bar,
        ):
            writer = csv.DictWriter(out, fieldnames=FIELDS)
            writer.writeheader()
            while not self.stop.is_set():
                elapsed = time.monotonic() - start
                try:
                    row = {"t_s": elapsed, "rss_mib": rss_bytes(self.pid) / 2**20}
                    self.rows.append(row | gauges(self.url))
                    writer.writerow(self.rows[-1])
                    out.flush()
                except (OSError, httpx.HTTPError):
                    pass  # the server is busy or gone: the next sample tells
                bar.update(min(round(elapsed), bar.total) - bar.n)
                self.stop.wait(self.period_s)


def plot_rss(rows: list[dict[str, float]], warm_s: float, limit_mib: float, path: Path) -> None:
    """RSS against time, the end of warm-up and the growth limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["t_s"] / 60 for r in rows], [r["rss_mib"] for r in rows], label="server RSS")
    ax.axvline(warm_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.axhline(limit_mib, color="red", linestyle="--", label="warm-up RSS + 5%")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("loraplex soak: RSS at capacity")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(
    args: argparse.Namespace, rows: list[dict[str, float]], idle: dict, load: dict, rss_idle: float
) -> dict:
    """soak.json, rss.png and soak.md from the samples; the verdict under "ok"."""
    warm_s = args.minutes * 60 * WARMUP_FRACTION
    after = [r for r in rows if r["t_s"] >= warm_s] or rows[-1:]
    warm = after[0]["rss_mib"]
    peak = max(r["rss_mib"] for r in after)
    growth = max(peak, rss_idle) / warm - 1
    leaked = {name: idle[name] for name in IDLE_GAUGES if idle[name] != 0}
    result = {
        "minutes": args.minutes,
        "users": args.users,
        "requests": load["requests"],
        "failures": load["failures"],
        "tokens_per_s": load["tokens_per_s"],
        "rss_warm_mib": warm,
        "rss_peak_after_warmup_mib": peak,
        "rss_idle_mib": rss_idle,
        "rss_growth": growth,
        "idle": idle,
        "ok": not load["failures"] and not leaked and growth < RSS_GROWTH_LIMIT,
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot_rss(rows, warm_s, warm * (1 + RSS_GROWTH_LIMIT), args.out / "rss.png")
    lines = [
        f"# Soak: {args.minutes:g} min, {args.users} users, {load['adapters']} adapters",
        "",
        f"- requests {load['requests']}, failures {load['failures']}, "
        f"{load['tokens_per_s']:.1f} tokens/s",
        f"- RSS after warm-up (t = {warm_s / 60:.1f} min) {warm:.0f} MiB, peak after "
        f"{peak:.0f} MiB, at idle {rss_idle:.0f} MiB: growth {growth:+.1%} "
        f"(limit {RSS_GROWTH_LIMIT:.0%})",
        "",
        "| at idle | value |",
        "|---|---|",
        *(f"| `{name}` | {idle[name]:g} |" for name in (*IDLE_GAUGES, *COUNTERS)),
        "",
        f"Command: `{args.command}`",
        "",
    ]
    (args.out / "soak.md").write_text("\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one soak; 0 when nothing failed or leaked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=10, help="seconds between samples")
    add_load_arguments(parser, "soak")
    args = parser.parse_args(argv)
    args.scenario, args.duration = "all", max(1, round(args.minutes * 60))
    args.command = " ".join(["python -m loadtests.soak", *(sys.argv[1:] if argv is None else argv)])
    names, churn, proc, url = serve_for_load(args)
    sampler = Sampler(url, proc.pid, args.sample_s, args.duration, args.out / "soak.csv")
    try:
        sampler.start()
        run_locust(args, url, churn)
        sampler.stop.set()
        sampler.join()
        idle = wait_idle(url)
        rss_idle = rss_bytes(proc.pid) / 2**20
    finally:
        sampler.stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = report(args, sampler.rows, idle, summarize(args, len(names)), rss_idle)
    print((args.out / "soak.md").read_text())
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
