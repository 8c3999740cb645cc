"""The RETA as the supervisor keeps it: the table, the moves made, the load report.

A *move* is one bucket whose worker changed when a new table was installed
(`set_reta`, or a bucket move with its connections: `shardstack reta move`,
`serve --rebalance auto`, `shardstack reload`; shardstack.migrate), counted
per bucket and per worker (out of the old one, into the new one). Moves that
carried connections are also kept, the last HISTORY of them, with their
figures (pause, frames held, connections): `history`.

`report()` joins the table, the moves and each worker's per-bucket load
(shardstack.load, the worker's `load` control op) into what `shardstack reta`
prints and the metrics export: per bucket the frames, bytes and attributed
CPU seconds summed over every worker that ever served it (a moved bucket
has counts in both), per worker the same totals and its CPU seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shardstack.netio import rss

HISTORY = 32  # migrations remembered for `shardstack reta`


@dataclass(slots=True)
class RetaBook:
    """The current RETA and every move made to it since the stack started."""

    workers: int
    table: list[int] = field(default_factory=list)
    moves: int = 0
    bucket_moves: list[int] = field(default_factory=lambda: [0] * rss.RETA_SIZE)
    moves_in: list[int] = field(default_factory=list)
    moves_out: list[int] = field(default_factory=list)
    migrations: int = 0  # moves that carried connections (shardstack.migrate), done
    aborted: int = 0  # such moves aborted (the bucket stayed)
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def record(self, rec: dict[str, Any]) -> None:
        """One migration's figures (migrate.MoveRecord.as_dict())."""
        if rec.get("ok"):
            self.migrations += 1
        else:
            self.aborted += 1
        self.history.append(rec)

    def __post_init__(self) -> None:
        if not self.table:
            self.table = rss.make_reta(self.workers)
        self.moves_in = [0] * self.workers
        self.moves_out = [0] * self.workers

    def install(self, new: list[int]) -> list[int]:
        """Take `new` as the table; returns the buckets that moved."""
        moved = [b for b in range(rss.RETA_SIZE) if new[b] != self.table[b]]
        for b in moved:
            self.bucket_moves[b] += 1
            self.moves_out[self.table[b]] += 1
            self.moves_in[new[b]] += 1
        self.moves += len(moved)
        self.table = list(new)
        return moved


def report(book: RetaBook, loads: list[dict[str, Any] | None]) -> dict[str, Any]:
    """`loads[i]`: worker i's `load` reply (None if it did not answer)."""
    n = rss.RETA_SIZE
    frames = [0] * n
    nbytes = [0] * n
    cpu = [0.0] * n
    workers = []
    for wid, ld in enumerate(loads):
        w: dict[str, Any] = {"id": wid, "buckets": book.table.count(wid),
                             "moves_in": book.moves_in[wid], "moves_out": book.moves_out[wid],
                             "answered": ld is not None}
        if ld is not None:
            for b in range(n):
                frames[b] += ld["frames"][b]
                nbytes[b] += ld["bytes"][b]
                cpu[b] += ld["cpu"][b]
            w.update(frames=sum(ld["frames"]), bytes=sum(ld["bytes"]),
                     cpu_seconds=ld["cpu_seconds"], other_frames=ld["other_frames"],
                     states=ld.get("states", {}))
        workers.append(w)
    buckets = [{"bucket": b, "worker": book.table[b], "frames": frames[b], "bytes": nbytes[b],
                "cpu_seconds": round(cpu[b], 6), "moves": book.bucket_moves[b]}
               for b in range(n)]
    return {"reta": list(book.table), "moves": book.moves, "workers": workers,
            "buckets": buckets,
            "migrations": {"done": book.migrations, "aborted": book.aborted,
                           "last": list(book.history)}}


def format_reta(rep: dict[str, Any], all_buckets: bool = False) -> str:
    """Human-readable `shardstack reta`: per worker, then per bucket (busy
    buckets only, unless `all_buckets`)."""
    lines = [f"RETA: {len(rep['reta'])} buckets, {len(rep['workers'])} workers, "
             f"moves so far: {rep['moves']}"]
    lines.append(f"{'worker':<7} {'buckets':>7} {'frames':>12} {'MiB':>10} {'cpu s':>9} "
                 f"{'moves in':>8} {'out':>5}")
    for w in rep["workers"]:
        if not w.get("answered", True):
            lines.append(f"{w['id']:<7} {w['buckets']:>7}  (no answer)")
            continue
        lines.append(f"{w['id']:<7} {w['buckets']:>7} {w.get('frames', 0):>12} "
                     f"{w.get('bytes', 0) / 2**20:>10.1f} {w.get('cpu_seconds', 0.0):>9.2f} "
                     f"{w['moves_in']:>8} {w['moves_out']:>5}")
    lines.append("")
    lines.append(f"{'bucket':<7} {'worker':>6} {'frames':>12} {'MiB':>10} {'cpu s':>9} "
                 f"{'moves':>5}")
    shown = 0
    for b in rep["buckets"]:
        if not all_buckets and not b["frames"] and not b["moves"]:
            continue
        shown += 1
        lines.append(f"{b['bucket']:<7} {b['worker']:>6} {b['frames']:>12} "
                     f"{b['bytes'] / 2**20:>10.1f} {b['cpu_seconds']:>9.3f} {b['moves']:>5}")
    idle = len(rep["buckets"]) - shown
    if idle:
        lines.append(f"({idle} buckets without traffic or moves not shown; --all shows them)")
    mig = rep.get("migrations")
    if mig is not None:
        lines.append("")
        lines.append(f"moves with their connections: {mig['done']} done, "
                     f"{mig['aborted']} aborted")
        if mig["last"]:
            lines.append(f"{'bucket':<7} {'from':>4} {'to':>3} {'by':>6} {'conns':>5} "
                         f"{'pause ms':>9} {'held':>5} {'total ms':>9}  result")
        for m in mig["last"][-10:]:
            lines.append(f"{m['bucket']!s:<7} {m['from']:>4} {m['to']:>3} {m['by']:>6} "
                         f"{m['conns']:>5} {m['pause'] * 1e3:>9.2f} {m['held']:>5} "
                         f"{m['seconds'] * 1e3:>9.2f}  {'ok' if m['ok'] else m['reason']}")
    lines.append("")
    lines.append("table (bucket: worker of that bucket and the next 31):")
    t = rep["reta"]
    for start in range(0, len(t), 32):
        lines.append(f"{start:>4}: " + " ".join(str(w) for w in t[start:start + 32]))
    return "\n".join(lines)
