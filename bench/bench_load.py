"""What per-bucket load accounting (shardstack.load) costs per received frame.

    .venv/bin/python bench/bench_load.py [--frames N] [--repeat R]

A worker counts every frame its shard receives under its RETA bucket
(`BucketLoad.count`, called once per batch through the wrapped
`shard.receive_batch`). This times that call on batches of 64 frames of many
flows, as they come off a device, and prints it beside the engine's own cost
per in-order data segment and per pure ACK (bench_engine's fast path, same
run, same machine), so the share is read directly; then the engine's whole receive path for
data segments without the hook, with it, and with it after a `shardstack
trace` session was attached and detached (which must cost nothing more). Figures are printed, never
asserted; take the best of several runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import (  # noqa: E402
    CLIENT,
    SERVER,
    _app_data,
    _established_server,
    bench_fastpath_ack,
    bench_fastpath_data,
)
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4, build_tcp_options  # noqa: E402

from shardstack.load import BucketLoad  # noqa: E402
from shardstack.tracer import Tracer  # noqa: E402

BATCH = 64
DISTINCT = 4096  # distinct frames (flows' source ports cycle through 4000)


def frames_of_many_flows(n: int, payload: int) -> list[bytes]:
    opts = build_tcp_options(ts=(1, 1))
    data = bytes(range(1, 256)) * (payload // 255 + 1)
    return [build_tcp_ipv4(CLIENT, SERVER, 20000 + i % 4000, 80, i, 1, ACK, 65535, opts,
                           data[:payload]) for i in range(n)]


def bench_count(frames: list[bytes], repeat: int, rounds: int) -> float:
    """Best µs per frame of BucketLoad.count over `frames` in batches of 64,
    `rounds` times over: a frame the worker counts was just read from the
    device, so it is in cache; a small set of frames reused is the same."""
    views = [memoryview(f) for f in frames]  # what the worker hands the shard
    batches = [views[i:i + BATCH] for i in range(0, len(views), BATCH)]
    best = float("inf")
    perf = time.perf_counter
    for _ in range(repeat):
        load = BucketLoad()
        t0 = perf()
        for _ in range(rounds):
            for b in batches:
                load.count(b)
        best = min(best, (perf() - t0) / (len(frames) * rounds) * 1e6)
        assert load.total_frames == len(frames) * rounds
    return best


def bench_receive_path(mode: str, n: int = 20000) -> float:
    """µs per in-order data segment through `shard.receive_batch` (batches of
    64, checksum offloaded) on an established connection: `plain` shard, with
    the load hook (`load`), or with the hook after a port trace was attached
    and detached again (`detached`: must equal `load`)."""
    from shardstack.core.wire.tcp import ACK, build_tcp_ipv4, build_tcp_options

    sh, sd, una = _established_server(csum_offload=True)
    if mode != "plain":
        sh.receive_batch = BucketLoad().wrap(sh.receive_batch)
    if mode == "detached":
        tr = Tracer(sh, 0)
        tr.start(1, 80)
        tr.stop(1)
    payload = _app_data(1448)
    segs = [build_tcp_ipv4(CLIENT, SERVER, 40000, 80, 1001 + i * 1448, una, ACK | 0x08, 65535,
                           build_tcp_options(ts=(3 + i, 1)), payload) for i in range(n)]
    perf = time.perf_counter
    engine = 0.0
    for i in range(0, n, BATCH):
        t0 = perf()
        sh.receive_batch(segs[i:i + BATCH], i * 1e-5, True)
        sh.take_frames()
        engine += perf() - t0
        sh.recv(sd, 1 << 22)
    return engine / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000, help="frames counted per run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = frames_of_many_flows(DISTINCT, 1448)
    acks = frames_of_many_flows(DISTINCT, 0)
    rounds = max(1, args.frames // DISTINCT)
    c_data = bench_count(data, args.repeat, rounds)
    c_ack = bench_count(acks, args.repeat, rounds)
    e_data = min(bench_fastpath_data(20000, True) for _ in range(3))
    e_ack, _ = min(bench_fastpath_ack(5000, True) for _ in range(3))
    print(f"accounting, 1448-byte data frames: {c_data:6.3f} µs/frame "
          f"({c_data / e_data:5.1%} of the engine's {e_data:.2f} µs per data segment in)")
    print(f"accounting, pure ACKs:             {c_ack:6.3f} µs/frame "
          f"({c_ack / e_ack:5.1%} of the engine's {e_ack:.2f} µs per pure ACK in)")
    path = dict.fromkeys(("plain", "load", "detached"), float("inf"))
    for _ in range(args.repeat):  # interleaved: a busy moment hits every mode alike
        for m in path:
            path[m] = min(path[m], bench_receive_path(m))
    print(f"receive_batch, data segments: plain {path['plain']:.2f} µs, with load hook "
          f"{path['load']:.2f} µs (+{path['load'] - path['plain']:.2f}), after a trace "
          f"attached and detached {path['detached']:.2f} µs")


if __name__ == "__main__":
    main()
