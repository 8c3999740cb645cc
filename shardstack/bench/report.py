"""The results: a summary per case (each variant beside the kernel, with the ratio), as
JSON and as a text table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardstack.bench import scenarios as sc
from shardstack.bench.aggregate import human_rate, ratio

KERNEL = "kernel"


def summarize(cases: Sequence[sc.Case], records: Sequence[Any], variants: Sequence[str],
              workers: int) -> list[dict[str, Any]]:
    """One row per (case, metric): each variant's figure (None: n/a) and shardstack/kernel.

    Only runs with the plan's worker count count here; the scaling runs have
    their own table (`scaling`). For a latency (lower is better) the ratio is
    still shardstack/kernel, so > 1 means slower, and the row says which way is good.
    """
    rows = []
    for case in cases:
        for key, unit in [(case.metric, case.unit), *sc.secondary_metrics(case)]:
            row: dict[str, Any] = {"case": case.key, "metric": key, "unit": unit,
                                   "higher_is_better": unit != "us", "values": {},
                                   "ratio": {}, "reasons": {}}
            by_variant = {r.variant: r for r in records
                          if r.case == case.key and (r.variant == KERNEL or r.workers == workers)}
            for v in variants:
                rec = by_variant.get(v)
                row["values"][v] = rec.metric(key) if rec else None
                if rec is not None and rec.status != "ok":
                    row["reasons"][v] = f"{rec.status}: {rec.reason}"
            for v in variants:
                if v != KERNEL:
                    row["ratio"][v] = ratio(row["values"][v], row["values"].get(KERNEL))
            rows.append(row)
    return rows


def scaling(records: Sequence[Any]) -> dict[str, list[tuple[int, float | None]]]:
    """case -> [(workers, ops/s)] for the shardstack-tun runs, sorted by workers."""
    out: dict[str, dict[int, float | None]] = {}
    for r in records:
        if r.variant == "shardstack-tun" and r.scenario in ("crr", "http"):
            out.setdefault(r.case, {})[r.workers] = r.metric("ops_per_s")
    return {case: sorted(d.items()) for case, d in out.items() if len(d) > 1}


def meta(args: Any, caps: Any) -> dict[str, Any]:
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": bool(args.quick),
        "seconds_per_case": args.duration,
        "workers": args.workers,
        "conns": args.conns,
        "shardstack": caps.to_dict(),
    }


def write_json(path: Path, meta_d: dict, rows: list, records: Sequence[Any],
               scale: dict) -> None:
    doc = {"meta": meta_d, "summary": rows, "scaling": scale,
           "runs": [r.to_dict() for r in records]}
    path.write_text(json.dumps(doc, indent=1, default=str))


def table(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """A fixed-width table: figures per variant, then shardstack/kernel ratios."""
    others = [v for v in variants if v != KERNEL]
    w = max([14, *(len(r["case"]) for r in rows)])
    head = f"{'case':<{w}} {'metric':<12}" + "".join(f" {v:>18}" for v in variants) + \
        "".join(f" {'x ' + v.removeprefix('shardstack-'):>9}" for v in others)
    lines = [head, "-" * len(head)]
    notes: dict[str, str] = {}
    for row in rows:
        cells = []
        for v in variants:
            val = row["values"].get(v)
            text = human_rate(val, row["unit"])
            if val is None and v in row["reasons"]:
                mark = _note_mark(notes, row["reasons"][v])
                text = f"n/a[{mark}]"
            cells.append(f" {text:>18}")
        for v in others:
            r = row["ratio"].get(v)
            text = f"{r:.2f}x" if r is not None else "-"
            cells.append(f" {text:>9}")
        lines.append(f"{row['case']:<{w}} {row['metric']:<12}" + "".join(cells))
    for reason, mark in notes.items():
        lines.append(f"[{mark}] {reason}")
    return "\n".join(lines)


def _note_mark(notes: dict[str, str], reason: str) -> str:
    if reason not in notes:
        notes[reason] = str(len(notes) + 1)
    return notes[reason]


def _tail(got: dict[str, dict[str, Any]], variant: str) -> str:
    """'21/3000': rr round trips that met a loss, of all (the p99's sample base)."""
    slow, n = got.get("rr:slow_count"), got.get("rr:latency_count")
    if slow is None or n is None:
        return "-"
    a, b = slow["values"].get(variant), n["values"].get(variant)
    return "-" if a is None or b is None else f"{a:.0f}/{b:.0f}"


def lossy_table(rows: Sequence[dict[str, Any]], variant: str = "shardstack-packet") -> str:
    """The lossy matrix, one line per link: upload and download goodput and the
    64 B request/response p99, kernel beside `variant`, with stack/kernel ratios
    (for p99, > 1 means the stack is slower). Empty when no lossy rows."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if not row["case"].startswith("lossy-"):
            continue
        kind, _, label = row["case"].removeprefix("lossy-").partition("-")
        by.setdefault(label, {})[f"{kind}:{row['metric']}"] = row
    if not by:
        return ""
    cols = [("up:bytes_per_s", "upload"), ("down:bytes_per_s", "download"),
            ("rr:p99_us", "rr p99")]
    head = f"{'link (loss-reorder-delay)':<26}" + "".join(
        f" {name + ' kernel':>16} {'stack':>11} {'x':>6}" for _, name in cols) + \
        f" {'rr slow/n k':>12} {'stack':>12}"
    lines = [head, "-" * len(head)]
    for label, got in by.items():
        cells = []
        for key, _ in cols:
            row = got.get(key)
            if row is None:
                cells.append(f" {'-':>16} {'-':>11} {'-':>6}")
                continue
            k, v = row["values"].get(KERNEL), row["values"].get(variant)
            r = row["ratio"].get(variant)
            cells.append(f" {human_rate(k, row['unit']):>16} {human_rate(v, row['unit']):>11} "
                         f"{(f'{r:.2f}' if r is not None else '-'):>6}")
        cells.append(f" {_tail(got, KERNEL):>12} {_tail(got, variant):>12}")
        lines.append(f"{label:<26}" + "".join(cells))
    lines.append("link: l<loss %>-r<reorder %>-d<one-way delay ms>, each direction; "
                 "x = stack / kernel (goodput: higher is better; p99: lower is better); "
                 "rr slow/n: round trips over p50 + 100 ms (they met a loss) of all")
    return "\n".join(lines)
