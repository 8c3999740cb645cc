"""Pure arithmetic over measurements: percentiles, rates, time series, ratios.

No I/O and no clocks here, so every figure the bench prints can be checked
by a unit test from made-up samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

LATENCY_QUANTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already-sorted values, linearly interpolated.

    The same definition as numpy's default ("linear", Hyndman & Fan type 7):
    rank = q/100 * (n-1), interpolate between its two neighbours. ValueError
    on an empty sequence or q outside 0..100.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def quantile_key(q: float) -> str:
    """50 -> 'p50', 99.9 -> 'p999' (the names the report uses)."""
    text = f"{q:g}".replace(".", "")
    return f"p{text}"


def latency_summary(samples_us: Iterable[float],
                    quantiles: Sequence[float] = LATENCY_QUANTILES) -> dict[str, float]:
    """count, min, mean, max and the named percentiles of latency samples (µs)."""
    values = sorted(samples_us)
    if not values:
        return {"count": 0}
    out: dict[str, float] = {
        "count": len(values),
        "min": values[0],
        "mean": sum(values) / len(values),
        "max": values[-1],
    }
    for q in quantiles:
        out[quantile_key(q)] = percentile(values, q)
    return out


def rate(amount: float, seconds: float) -> float:
    """amount per second; 0 when no time elapsed (never a division by zero)."""
    return amount / seconds if seconds > 0 else 0.0


@dataclass(slots=True, frozen=True)
class Tick:
    """A cumulative progress sample from the load client at time `t` (s from start)."""

    t: float
    ops: int
    nbytes: int


def interval_rates(ticks: Sequence[Tick]) -> list[tuple[float, float, float]]:
    """(t, ops/s, bytes/s) between consecutive cumulative ticks, at the interval's end.

    Ticks that do not advance in time are skipped (they carry no rate).
    """
    out = []
    prev = Tick(0.0, 0, 0)
    for tick in ticks:
        dt = tick.t - prev.t
        if dt <= 0:
            continue
        out.append((tick.t, (tick.ops - prev.ops) / dt, (tick.nbytes - prev.nbytes) / dt))
        prev = tick
    return out


def ratio(shardstack: float | None, kernel: float | None) -> float | None:
    """shardstack / kernel, or None when either side has no figure or the kernel's is 0."""
    if shardstack is None or kernel is None or kernel == 0:
        return None
    return shardstack / kernel


def cpu_summary(samples: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per role: mean and max CPU% and max RSS over telemetry samples.

    Each sample maps role -> {"cpu": %, "rss": bytes, ...} under key "procs";
    roles missing from a sample (not started yet, exited) are simply absent.
    """
    acc: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for role, proc in sample.get("procs", {}).items():
            slot = acc.setdefault(role, {"cpu": [], "rss": [], "ctx": []})
            slot["cpu"].append(float(proc.get("cpu", 0.0)))
            slot["rss"].append(float(proc.get("rss", 0.0)))
            slot["ctx"].append(float(proc.get("ctx_per_s", 0.0)))
    out = {}
    for role, slot in sorted(acc.items()):
        out[role] = {
            "cpu_mean": sum(slot["cpu"]) / len(slot["cpu"]),
            "cpu_max": max(slot["cpu"]),
            "rss_max": max(slot["rss"]),
            "ctx_per_s_mean": sum(slot["ctx"]) / len(slot["ctx"]),
        }
    return out


def human_rate(value: float | None, unit: str) -> str:
    """A figure for a table: '1.71 GB/s', '10.8k/s', '73 µs'; 'n/a' for None."""
    if value is None:
        return "n/a"
    if unit == "B/s":
        for scale, name in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B/s"
    if unit == "/s":
        return f"{value / 1e3:.1f}k/s" if abs(value) >= 1e4 else f"{value:.0f}/s"
    if unit == "us":
        return f"{value / 1e3:.2f} ms" if value >= 1e4 else f"{value:.0f} µs"
    return f"{value:g} {unit}".rstrip()
