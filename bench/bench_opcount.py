"""Bytecodes the engine executes per operation: a load-independent cost proxy.

    .venv/bin/python bench/bench_opcount.py [rr|ack|data|gso|hs|bulk|crr ...] [--top N]

Why: on a shared machine CPU time moves by 10-20 % between runs of identical
code, so a 2 % change in a hot path cannot be seen with a clock.  The number
of Python bytecodes executed is the same on every run, and in this engine it
follows CPU time closely (8d308bb -> b1b9bbf: rr +33 % bytecodes, +38 % CPU).
It misses what happens inside C (allocation, the garbage collector, a
builtin's own work), so it guides the search; confirm with bench_engine.py.

How: ``sys.settrace`` with per-opcode events (``f_trace_opcodes``) over
bench_engine's workloads, run twice (n and 2n iterations) so the difference
leaves the cost of one iteration without the set-up; per function and in
total, engine code only.  Compare two trees by running it in each (e.g. a
``git worktree`` of the old commit).
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be  # noqa: E402

#: Workload name -> (iterations for one run, the run).
CASES: dict[str, tuple[int, Callable[[int], object]]] = {
    "rr": (50, lambda n: be.bench_rr(n)),
    "ack": (100, lambda n: be.bench_fastpath_ack(n, True)),
    "data": (200, lambda n: be.bench_fastpath_data(n, True)),
    "gso": (50, lambda n: be.bench_fastpath_ack(n, True, gso=True)),
    "hs": (50, lambda n: be.bench_handshakes(n)),
    "bulk": (1, lambda n: be.bench_bulk(n, 0, False)),  # per MiB of MSS segments
    "crr": (20, lambda n: be.bench_crr(n)),
}


def _count(run: Callable[[int], object], n: int) -> collections.Counter[str]:
    per_fn: collections.Counter[str] = collections.Counter()
    marker = "/core/"

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        frame.f_trace_opcodes = True
        if event == "opcode":
            path = frame.f_code.co_filename
            i = path.rfind(marker)
            if i >= 0:
                per_fn[path[i + len(marker):] + ":" + frame.f_code.co_name] += 1
            elif path == "<string>":  # dataclass-generated __init__ (TcpSock, ...)
                per_fn["<dataclass>:" + frame.f_code.co_name] += 1
        return tracer

    sys.settrace(tracer)
    try:
        run(n)
    finally:
        sys.settrace(None)
    return per_fn


def per_iteration(case: str) -> dict[str, float]:
    """Bytecodes per iteration of ``case``, by function (engine code only)."""
    n, run = CASES[case]
    run(n)  # warm-up: imports, first-use caches
    one, two = _count(run, n), _count(run, 2 * n)
    return {k: (two[k] - one[k]) / n for k in set(one) | set(two) if two[k] != one[k]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"workloads (default all): {' '.join(CASES)}")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest functions")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown workload {unknown[0]!r}; choose from {' '.join(CASES)}")
    for case in args.cases or list(CASES):
        fns = per_iteration(case)
        print(f"{case:5s} {sum(fns.values()):12.0f} bytecodes per iteration")
        for name, v in sorted(fns.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"      {v:12.1f}  {name}")


if __name__ == "__main__":
    main()
