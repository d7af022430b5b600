"""`make loadtest`: serve the demo model with the demo adapters plus random ones (64+ in all), run locust
headless against 127.0.0.1 for a bounded time, stop, and write locust's CSV and HTML plus summary.md.

    python -m loadtests.run --users 16 --duration 60 --scenario mixed --out results/loadtest
Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = {
    "mixed": ["ChatUser", "CompletionUser", "BaseOnlyUser"],
    "cold-burst": ["ChatUser", "ColdBurstUser"],
    "churn": ["ChatUser", "ChurnUser"],
    "all": ["ChatUser", "CompletionUser", "BaseOnlyUser", "ColdBurstUser", "ChurnUser"],
}
USER_KEY, ADMIN_KEY = "lt-user", "lt-admin"
READY_TIMEOUT_S = 300


def start_server(args: argparse.Namespace, adapters: Path, churn: Path, log: Path) -> tuple:
    """`loraplex serve` on a free loopback port with both keys; (process, url)."""
    keys = args.out / "keys.json"
    keys.write_text(
        json.dumps(
            [
                {"key": USER_KEY, "role": "user", "adapters": "*"},
                {"key": ADMIN_KEY, "role": "admin", "adapters": "*"},
            ]
        )
    )
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(args.model), "--host",
        "127.0.0.1", "--port", "0", "--adapters", str(adapters), "--adapter-roots", str(churn),
        "--api-keys-file", str(keys), "--max-waiting", "1024", *args.serve_args,
    ]  # fmt: skip
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"ready: (http://\S+)", log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in time")


def add_load_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options the load test and the soak share (reports under results/NAME)."""
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--adapters", type=int, default=64, help="adapters served in all")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("results") / name)
    parser.add_argument("--work", type=Path, default=Path(f"/tmp/loraplex-{name}"))
    parser.add_argument("--demo-adapters", type=Path, default=Path("demo-adapters"))
    parser.add_argument("--model", default=None, help="base model folder (default: the demo)")
    parser.add_argument("serve_args", nargs="*", help="extra `loraplex serve` flags after --")


def serve_for_load(args: argparse.Namespace) -> tuple[list[str], Path, subprocess.Popen, str]:
    """The adapters (demo ones plus random up to args.adapters) and the churn folder under
    args.work, and the server on them: (adapter names, churn folder, process, url)."""
    from loader.demo import prepare_demo
    from loadtests.adapters import populate

    args.model = args.model or str(prepare_demo())
    args.out.mkdir(parents=True, exist_ok=True)
    names = populate(args.work / "adapters", Path(args.model), args.adapters, args.demo_adapters)
    churn = args.work / "churn"
    populate(churn, Path(args.model), 2)
    proc, url = start_server(args, args.work / "adapters", churn, args.out / "server.log")
    return names, churn, proc, url


def run_locust(args: argparse.Namespace, url: str, churn: Path) -> int:
    """Headless locust against url; writes locust_*.csv and report.html under args.out."""
    env = {
        **os.environ,
        "LOADTEST_API_KEY": USER_KEY,
        "LOADTEST_ADMIN_KEY": ADMIN_KEY,
        "LOADTEST_CHURN_DIR": str(churn),
        "LOADTEST_MAX_TOKENS": str(args.max_tokens),
        "LOADTEST_TOKENS_FILE": str(args.out / "tokens.json"),
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")),
        "--headless", "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
        "--host", url, "--csv", str(args.out / "locust"), "--html", str(args.out / "report.html"),
        "--only-summary", "--stop-timeout", "30", "--exit-code-on-error", "0",
        *SCENARIOS[args.scenario],
    ]  # fmt: skip
    return subprocess.run(command, env=env, timeout=args.duration + 120).returncode


def summarize(args: argparse.Namespace, adapters: int) -> dict:
    """Numbers from locust's stats CSV and the token count; also written as summary.md."""
    rows = list(csv.DictReader(open(args.out / "locust_stats.csv")))
    http = [r for r in rows if r["Type"] in ("GET", "POST")]
    requests = sum(int(r["Request Count"]) for r in http)
    failures = sum(int(r["Failure Count"]) for r in http)
    tokens = json.loads((args.out / "tokens.json").read_text())["tokens"]

    def pct(kind: str) -> dict:
        count = weight = 0.0
        out = {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        for r in (r for r in rows if r["Type"] == kind):
            n = int(r["Request Count"])
            count += n
            for p, col in (("p50", "50%"), ("p95", "95%"), ("p99", "99%")):
                out[p] += float(r[col] or 0) * n
            weight += n
        return {k: (v / weight if weight else 0.0) for k, v in out.items()} | {"n": int(count)}

    summary = {
        "scenario": args.scenario,
        "users": args.users,
        "duration_s": args.duration,
        "adapters": adapters,
        "requests": requests,
        "failures": failures,
        "requests_per_s": requests / args.duration,
        "tokens_per_s": tokens / args.duration,
        "ttft_ms": pct("TTFT"),
        "itl_ms": pct("ITL"),
    }
    lines = [
        f"# Load test: {args.scenario}",
        "",
        f"- users {args.users}, {args.duration}s, {adapters} adapters, max_tokens {args.max_tokens}",
        f"- requests {requests}, failures {failures}",
        f"- {summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s",
        "",
        "| metric | n | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name in ("ttft_ms", "itl_ms"):
        m = summary[name]
        lines.append(
            f"| {name[:-3].upper()} | {m['n']} | {m['p50']:.0f} | {m['p95']:.0f} | {m['p99']:.0f} |"
        )
    lines += ["", f"Command: `{args.command}`", ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run one bounded load test; 0 when nothing failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="all")
    add_load_arguments(parser, "loadtest")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m loadtests.run", *(sys.argv[1:] if argv is None else argv)])
    names, churn, proc, url = serve_for_load(args)
    try:
        run_locust(args, url, churn)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    summary = summarize(args, len(names))
    print((args.out / "summary.md").read_text())
    return 1 if summary["failures"] or not summary["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
