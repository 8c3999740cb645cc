"""`shardstack bench`: load tests of shardstack beside the Linux kernel's TCP, same run.

The same plain-Python load client (`shardstack.bench.client`) runs in a client
network namespace against (a) the kernel's TCP in a server namespace over a
veth pair and (b) `shardstack serve` in that namespace over TUN and over
AF_PACKET. Scenarios: `bulk` (one flow, both directions), `crr` (connect /
request / response / close with N concurrent clients), `rr` (64 B ping-pong
latency), `http` (unmodified `python -m http.server`, 1 KiB and 1 MiB files).
psutil telemetry is sampled throughout; results go to DIR as results.json,
summary.txt and PNG plots. A shardstack side that cannot run yet is reported
"n/a" with its reason, never with a number.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from shardstack.bench import scenarios as sc

__all__ = ["add_arguments", "main", "options"]

QUICK_BUDGET = 120.0  # seconds `--quick` must finish in


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"short runs ({sc.QUICK_DURATION:g} s per case), done in under 2 minutes")
    p.add_argument("--scenario", default="all",
                   help=f"comma-separated subset of {','.join(sc.SCENARIOS)}, or single cases "
                   "such as bulk-download, http-1MiB (default: all); `lossy` (never part of "
                   "all): bulk both ways and 64 B rr through `shardstack impair-bridge` at "
                   "0.5/1/3 %% loss, 0/10 %% reorder, 2/10/50 ms, kernel vs shardstack-packet "
                   "(--quick: 2 links; one lossy case by its key, e.g. lossy-rr-l0.5-r0-d2; "
                   "an rr case runs 15/loss transactions, at most 30 s)")
    p.add_argument("--out", metavar="DIR",
                   help="where results.json, summary.txt and the plots go "
                        "(default: ./bench-results/<UTC time>)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="shardstack worker processes (with N>1 also a 1..N scaling run)")
    p.add_argument("--duration", type=float, metavar="S",
                   help=f"seconds per case (default {sc.DEFAULT_DURATION:g}, "
                        f"{sc.QUICK_DURATION:g} with --quick)")
    p.add_argument("--conns", type=int, default=sc.DEFAULT_CONNS,
                   help="concurrent connections for crr and http (default %(default)s)")
    p.add_argument("--variants", default="kernel,shardstack-tun,shardstack-packet",
                   help="which servers to measure (default: all three)")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1..N workers runs")
    p.add_argument("--no-plots", action="store_true", help="JSON and text only")
    p.add_argument("--cc", default=sc.LOSSY_CC,
                   help="lossy scenario: congestion control of the kernel ends (client and "
                        "kernel server), set per socket (default %(default)s, as the stack)")
    p.add_argument("--seed", type=int, default=sc.LOSSY_SEED,
                   help="lossy scenario: the impair-bridge seed, the same for every side "
                        "(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstack bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def options(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check bench arguments; SystemExit(2) with a message on bad ones."""
    p = build_parser()
    return finish_options(p, p.parse_args(argv))


def finish_options(p: argparse.ArgumentParser | None, a: argparse.Namespace) -> argparse.Namespace:
    """Check and complete parsed arguments (also those parsed by the `shardstack` CLI)."""
    from shardstack.bench.targets import VARIANTS

    p = p or build_parser()
    try:
        a.scenarios = sc.parse_scenarios(a.scenario)
    except ValueError as e:
        p.error(str(e))
    a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variant_list if v not in VARIANTS]
    if bad or not a.variant_list:
        p.error(f"unknown variant {', '.join(bad)} (choose from {', '.join(VARIANTS)})")
    if a.duration is None:
        a.duration = sc.QUICK_DURATION if a.quick else sc.DEFAULT_DURATION
    if not 0.5 <= a.duration <= 600:
        p.error("--duration must be 0.5..600 seconds")
    if not 1 <= a.workers <= 64:
        p.error("--workers must be 1..64")
    if not 1 <= a.conns <= 256:
        p.error("--conns must be 1..256")
    if a.quick:
        a.no_scaling = a.no_scaling or a.workers > 2
    return a


def _default_out() -> Path:
    return Path("bench-results") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    a = finish_options(None, args) if args is not None else options(argv)
    from shardstack import netns as nsmod

    missing = nsmod.missing_requirements()
    if missing:
        print("shardstack bench needs: " + "; ".join(missing), file=sys.stderr)
        print("It builds its own network namespaces and veth/TUN devices (198.18.0.0/15), "
              "so run it as root.", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every namespace and process is removed.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(a, nsmod)
    except KeyboardInterrupt:
        print("\nshardstack bench: interrupted; everything it created was removed",
              file=sys.stderr)
        return 130


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(a: argparse.Namespace, nsmod) -> int:
    from shardstack.bench import report
    from shardstack.bench.progress import Progress
    from shardstack.bench.runner import Plan, run_plan
    from shardstack.bench.targets import probe_capabilities

    started = time.monotonic()
    nsmod.cleanup_stale()
    out = Path(a.out) if a.out else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    caps = probe_capabilities()
    cases = sc.plan(a.scenarios, a.conns, quick=a.quick, seed=a.seed, cc=a.cc)
    variants = a.variant_list
    plan = Plan(cases, variants, a.duration, a.workers, scaling=not a.no_scaling)
    n_lossy = sum(1 for c in cases if c.link)
    runs = (len(cases) - n_lossy) * len(variants) + \
        n_lossy * len([v for v in variants if v in plan.lossy_variants])
    progress.line(f"shardstack bench: {len(cases)} cases, {runs} runs on "
                  f"{len(variants)} variants, {a.duration:g} s each, {a.workers} workers -> {out}")
    for v in variants:
        if v != "kernel":
            why = caps.missing_for(v.removeprefix("shardstack-"), "echo")
            if why:
                progress.line(f"  {v}: n/a ({why})")

    def on_record(rec) -> None:
        fig = rec.result.get(next(c.metric for c in cases if c.key == rec.case)) \
            if rec.status == "ok" else None
        unit = next(c.unit for c in cases if c.key == rec.case)
        from shardstack.bench.aggregate import human_rate

        text = human_rate(fig, unit) if rec.status == "ok" else f"{rec.status}: {rec.reason[:90]}"
        cpu = " ".join(f"{role} {c['cpu_mean']:.0f}%" for role, c in rec.cpu.items())
        fps = f" {rec.frames_per_s:.0f} frames/s" if rec.frames_per_s is not None else ""
        progress.line(f"  {rec.case:<14} {rec.variant:<18} w={rec.workers} {text}"
                      + (f"  (cpu: {cpu}{fps})" if rec.status == "ok" else ""))

    records = run_plan(plan, caps, out, progress, on_record)
    rows = report.summarize(cases, records, variants, a.workers)
    scale = report.scaling(records)
    meta = report.meta(a, caps)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    report.write_json(out / "results.json", meta, rows, records, scale)
    text = report.table(rows, variants)
    lossy = report.lossy_table(rows)
    if lossy:
        text += (f"\n\nlossy (through shardstack impair-bridge, seed {a.seed} for both sides, "
                 f"kernel ends {a.cc}, the stack cubic):\n") + lossy
    (out / "summary.txt").write_text(text + "\n")
    progress.line("")
    progress.line(text)
    if not a.no_plots:
        kernel = {r["case"]: r["values"].get("kernel") for r in rows if r["metric"] == "ops_per_s"}
        from shardstack.bench.plots import plot_all

        plain = [c for c in cases if not c.link]  # the lossy matrix is a table, not 100 plots
        pngs = plot_all(out, plain, records, a.workers, scale, kernel)
        progress.line(f"{len(pngs)} plots in {out}")
    progress.line(f"results: {out / 'results.json'} ({time.monotonic() - started:.0f} s)")
    errors = [r for r in records if r.status == "error" and r.variant == "kernel"]
    return 1 if errors else 0
