"""PNG plots of a bench run (matplotlib, Agg backend: no display needed).

Per case: the headline figure over time for each variant, and CPU% per process
per variant. With more than one worker: shardstack's rate against the worker
count, the kernel's as a reference line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardstack.bench import scenarios as sc
from shardstack.bench.aggregate import Tick, interval_rates


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(case: sc.Case, rec: Any) -> tuple[list[float], list[float], str]:
    """(t, values, y label) of a run's ticks for the case's headline."""
    if case.unit == "us":
        pts = [(t["t"], t["p50_us"]) for t in rec.ticks if "p50_us" in t]
        return [p[0] for p in pts], [p[1] for p in pts], "p50 latency per interval (µs)"
    ticks = [Tick(t["t"], t["ops"], t["bytes"]) for t in rec.ticks]
    rates = interval_rates(ticks)
    if case.unit == "B/s":
        return [r[0] for r in rates], [r[2] / 1e6 for r in rates], "MB/s"
    return [r[0] for r in rates], [r[1] for r in rates], "operations/s"


def plot_all(out: Path, cases: Sequence[sc.Case], records: Sequence[Any], workers: int,
             scale: dict[str, list[tuple[int, float | None]]],
             kernel: dict[str, float | None]) -> list[Path]:
    plt = _plt()
    written = []
    for case in cases:
        runs = [r for r in records if r.case == case.key and r.status == "ok"
                and (r.variant == "kernel" or r.workers == workers)]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        label = ""
        for r in runs:
            t, y, label = _series(case, r)
            ax.plot(t, y, marker=".", label=r.variant)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{case.key}: {case.metric}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, plt, out / f"{case.key}-timeline.png"))

        fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
        for ax, r in zip(axes[0], runs, strict=True):
            roles = sorted({role for s in r.telemetry for role in s["procs"]})
            for role in roles:
                pts = [(s["t"], s["procs"][role]["cpu"]) for s in r.telemetry
                       if role in s["procs"]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=role)
            ax.set_title(r.variant)
            ax.set_xlabel("time (s)")
            ax.set_ylabel("CPU % (100 = one core)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"{case.key}: CPU per process")
        written.append(_save(fig, plt, out / f"{case.key}-cpu.png"))
    for case_key, pts in scale.items():
        xs = [w for w, v in pts if v is not None]
        ys = [v for _, v in pts if v is not None]
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="o", label="shardstack-tun")
        if kernel.get(case_key):
            ax.axhline(kernel[case_key], color="grey", linestyle="--", label="kernel")
        ax.set_xlabel("workers")
        ax.set_ylabel("operations/s")
        ax.set_ylim(bottom=0)
        ax.set_xticks(xs)
        ax.set_title(f"{case_key}: scaling with workers")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(_save(fig, plt, out / f"{case_key}-scaling.png"))
    return written


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
