"""Engine-only figures for ``shardstack.core.Shard`` (no devices, no processes).

    .venv/bin/python bench/bench_engine.py [--handshakes N] [--mib M] [--profile]

1. handshakes/s: one Shard with a listener against a scripted peer that sends
   SYN, reads the SYN-ACK, sends the final ACK; the server accept()s and the
   peer resets the connection so the tables stay small.  The peer's packet
   building is excluded: only the Shard calls are timed.
2. bulk throughput between two Shards in one process over a lossless in-memory
   wire: MB/s of payload delivered to the receiving application, and
   microseconds of engine time per segment handled (sender + receiver,
   data + ACKs), with MSS segments, and with 64 KiB super-segments
   (``tso_max``), which is what GSO/GRO hand us on a real interface, with and
   without the receive checksum check (``csum_offload``: the device vouched).

Figures are wall-clock on whatever machine runs this; they are printed, never
asserted.  The kernel-stack baseline belongs to the end-to-end benchmarks.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from shardstack.core import Shard, ShardConfig
from shardstack.core.wire.ipv4 import parse_ipv4, str_to_ip
from shardstack.core.wire.tcp import ACK, RST, SYN, build_tcp_ipv4, build_tcp_options, parse_tcp

SERVER = str_to_ip("198.18.0.1")
CLIENT = str_to_ip("198.18.0.2")
SECRET = b"bench-secret"


def bench_handshakes(n: int) -> tuple[float, float]:
    """(handshakes per second, µs per handshake) of engine time."""
    sh = Shard(ShardConfig(addrs=[SERVER], secret=SECRET), 0.0)
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    sh.listen(lsd, 4096)
    opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0))
    syns = [build_tcp_ipv4(CLIENT, SERVER, 1024 + (i % 60000), 80, 1000 + i, 0, SYN, 65535, opts)
            for i in range(n)]
    engine = 0.0
    perf = time.perf_counter
    now = 0.0
    for i, syn in enumerate(syns):
        now += 1e-5
        t0 = perf()
        sh.receive(syn, now)
        frames = sh.take_frames()
        engine += perf() - t0
        _, seg_bytes = parse_ipv4(frames[0])
        sa = parse_tcp(seg_bytes)
        sport = 1024 + (i % 60000)
        ack = build_tcp_ipv4(CLIENT, SERVER, sport, 80, 1001 + i, sa.seq + 1, ACK, 65535,
                             build_tcp_options(ts=(2, sa.options.ts[0])))
        t0 = perf()
        sh.receive(ack, now)
        sd, _ = sh.accept(lsd)
        engine += perf() - t0
        rst = build_tcp_ipv4(CLIENT, SERVER, sport, 80, 1001 + i, 0, RST, 0)
        t0 = perf()
        sh.receive(rst, now)
        sh.close(sd, now)
        sh.take_events()
        sh.take_frames()
        engine += perf() - t0
    return n / engine, engine / n * 1e6


def bench_bulk(mib: int, tso_max: int = 0, csum_offload: bool = False) -> tuple[float, float, int]:
    """(payload MB/s, µs per segment, segments) moving ``mib`` MiB a -> b."""
    cfg = dict(secret=SECRET, rcvbuf=4 << 20, sndbuf=4 << 20, tso_max=tso_max,
               csum_offload=csum_offload)
    a = Shard(ShardConfig(addrs=[CLIENT], **cfg), 0.0)
    b = Shard(ShardConfig(addrs=[SERVER], **cfg), 0.0)
    lsd = b.socket()
    b.bind(lsd, 0, 80)
    b.listen(lsd, 8)
    c = a.socket()
    a.connect(c, SERVER, 80, 0.0)
    for f in a.take_frames():
        b.receive(f, 0.0)
    for f in b.take_frames():
        a.receive(f, 0.0)
    for f in a.take_frames():
        b.receive(f, 0.0)
    s, _ = b.accept(lsd)
    data = bytes(range(256)) * (4096 * mib)  # mib MiB
    total = len(data)
    view = memoryview(data)
    sent = got = segs = 0
    now = 0.0
    perf = time.perf_counter
    t0 = perf()
    for _ in range(10_000_000):
        if got >= total:
            break
        now += 0.0001
        if sent < total:
            sent += a.send(c, view[sent:], now)
        fa = a.take_frames()
        segs += len(fa)
        b.receive_batch(fa, now)
        while True:
            chunk = b.recv(s, 1 << 22)
            if not chunk:
                break
            got += len(chunk)
        fb = b.take_frames()
        segs += len(fb)
        a.receive_batch(fb, now)
        if not fa and not fb:
            now = max(now, min(d for d in (a.next_deadline(), b.next_deadline(), now + 1)
                               if d is not None))
            a.advance(now)
            b.advance(now)
    elapsed = perf() - t0
    assert got == total, (got, total)
    return total / elapsed / 1e6, elapsed / segs * 1e6, segs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handshakes", type=int, default=5000)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (shared CPUs)")
    ap.add_argument("--profile", action="store_true", help="cProfile the MSS bulk run")
    args = ap.parse_args()
    hs, us = max(bench_handshakes(args.handshakes) for _ in range(args.repeat))
    print(f"handshakes: {hs:10.0f} /s   ({us:.1f} µs engine time per SYN+ACK+accept+RST)")
    for label, tso, off in (("bulk, MSS segments", 0, False),
                            ("bulk, 64 KiB super-segments", 65000, False),
                            ("  same, rx checksum offload", 65000, True)):
        mbs, us_seg, segs = max(bench_bulk(args.mib, tso, off) for _ in range(args.repeat))
        print(f"{label:28s}: {mbs:8.1f} MB/s payload   {us_seg:6.2f} µs/segment   "
              f"({segs} segments incl. ACKs, {args.mib} MiB)")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        bench_bulk(min(args.mib, 16))
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
