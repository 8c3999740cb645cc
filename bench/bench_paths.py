"""RX path comparison: the netio hop vs direct RX (kernel steering), with and
without busy polling, each beside the kernel's own figures from the same run.

Runs `shardstack bench --quick` once per configuration (the serve children
inherit the environment: SHARDSTACK_RX, SHARDSTACK_BUSY_POLL_US) and prints
one table: rows are (case, metric), columns are kernel / tun / packet per
configuration. Needs root (the bench builds network namespaces).

Usage: python bench/bench_paths.py [--scenario rr,crr,bulk,http]
       [--configs netio,direct,direct+poll50] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "netio": {"SHARDSTACK_RX": "netio", "SHARDSTACK_BUSY_POLL_US": "0"},
    "direct": {"SHARDSTACK_RX": "direct", "SHARDSTACK_BUSY_POLL_US": "0"},
    "direct+poll50": {"SHARDSTACK_RX": "direct", "SHARDSTACK_BUSY_POLL_US": "50"},
}
VARIANTS = ("kernel", "shardstack-tun", "shardstack-packet")
SHORT = {"kernel": "kern", "shardstack-tun": "tun", "shardstack-packet": "pkt"}


def run_one(name: str, scenario: str, duration: float | None, out: Path) -> dict:
    env = dict(os.environ, **CONFIGS[name])
    argv = [sys.executable, "-m", "shardstack", "bench", "--quick", "--scenario", scenario,
            "--no-scaling", "--no-plots", "--out", str(out / name)]
    if duration:
        argv += ["--duration", str(duration)]
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, timeout=900)
    return json.loads((out / name / "results.json").read_text())


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "B/s":
        return f"{value / 1e6:.0f}MB/s"
    if unit == "us":
        return f"{value:.0f}us"
    return f"{value:.0f}/s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="rr,crr,bulk")
    p.add_argument("--configs", default="netio,direct,direct+poll50")
    p.add_argument("--duration", type=float, default=None)
    args = p.parse_args()
    names = [c for c in args.configs.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="bench-paths-") as tmp:
        results = {n: run_one(n, args.scenario, args.duration, Path(tmp)) for n in names}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for n, res in results.items():
        for row in res["summary"]:
            key = (row["case"], row["metric"])
            cells = rows.setdefault(key, {})
            for v in VARIANTS:
                cells[f"{n}:{SHORT[v]}"] = fmt(row["values"].get(v), row["unit"])
    cols = [f"{n}:{SHORT[v]}" for n in names for v in VARIANTS]
    print(f"{'case':15} {'metric':12} " + " ".join(f"{c:>18}" for c in cols))
    for (case, metric), cells in rows.items():
        print(f"{case:15} {metric:12} " + " ".join(f"{cells.get(c, '-'):>18}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
