"""The engine over IPv6 beside the engine over IPv4 (issue 14): same workloads, same run.

    .venv/bin/python bench/bench_ipv6.py [--mib M] [--handshakes N] [--rr N] [--repeat R]
                                         [--clock cpu]

Engine-only (no devices, no processes), like bench_engine.py: two Shards in one
process on a lossless in-memory wire.  Each figure is measured for IPv4
(198.18.0.0/15) and IPv6 (fd00::/64) in alternation, best of ``--repeat``:

1. handshakes/s: a scripted peer's SYN, the SYN-ACK, its ACK, accept, RST;
   only the Shard's calls are timed.
2. bulk, MSS segments and 64 KiB super-segments (``tso_max``): µs of engine
   time per segment handled (sender + receiver, data + ACKs) and payload MB/s.
3. request/response: µs per 100-byte round trip on one connection.

The IPv6 packets carry 20 more bytes of header (MSS 1440 against 1460), so
per-byte figures favour IPv4 by that much; per-segment costs compare the
code paths.  Figures are printed, never asserted; the kernel's belong to the
end-to-end benchmarks.
"""

from __future__ import annotations

import argparse
import socket
import time

from shardstack.core import Shard, ShardConfig
from shardstack.core.wire.ipv4 import parse_ipv4, str_to_ip
from shardstack.core.wire.ipv6 import parse_ipv6, str_to_ip6
from shardstack.core.wire.tcp import (
    ACK,
    RST,
    SYN,
    build_tcp_ipv4,
    build_tcp_ipv6,
    build_tcp_options,
    parse_tcp,
)

SECRET = b"bench-secret"
CLOCK = [time.perf_counter]
FAMILIES = {
    "IPv4": (socket.AF_INET, str_to_ip("198.18.0.1"), str_to_ip("198.18.0.2")),
    "IPv6": (socket.AF_INET6, str_to_ip6("fd00::1"), str_to_ip6("fd00::2")),
}


def _shard(fam: int, addr: int, **kw) -> Shard:
    if fam == socket.AF_INET6:
        return Shard(ShardConfig(addrs6=[addr], secret=SECRET, **kw), 0.0)
    return Shard(ShardConfig(addrs=[addr], secret=SECRET, **kw), 0.0)


def bench_handshakes(name: str, n: int) -> float:
    """µs of engine time per SYN + ACK + accept + RST."""
    fam, server, client = FAMILIES[name]
    build = build_tcp_ipv6 if fam == socket.AF_INET6 else build_tcp_ipv4
    parse_ip = parse_ipv6 if fam == socket.AF_INET6 else parse_ipv4
    sh = _shard(fam, server)
    lsd = sh.socket(fam)
    sh.bind(lsd, 0, 80)
    sh.listen(lsd, 4096)
    opts = build_tcp_options(mss=1440, wscale=7, sack_perm=True, ts=(1, 0))
    perf = CLOCK[0]
    engine = 0.0
    now = 0.0
    for i in range(n):
        sport = 1024 + (i % 60000)
        syn = build(client, server, sport, 80, 1000 + i, 0, SYN, 65535, opts)
        now += 1e-5
        t0 = perf()
        sh.receive(syn, now)
        frames = sh.take_frames()
        engine += perf() - t0
        sa = parse_tcp(parse_ip(frames[0])[1])
        ack = build(client, server, sport, 80, 1001 + i, sa.seq + 1, ACK, 65535,
                    build_tcp_options(ts=(2, sa.options.ts[0])))
        rst = build(client, server, sport, 80, 1001 + i, 0, RST, 0)
        t0 = perf()
        sh.receive(ack, now)
        sd, _ = sh.accept(lsd)
        sh.receive(rst, now)
        sh.close(sd, now)
        sh.take_events()
        sh.take_frames()
        engine += perf() - t0
    return engine / n * 1e6


def _pair(name: str, **kw) -> tuple[Shard, Shard, int, int]:
    fam, server, client = FAMILIES[name]
    a = _shard(fam, client, **kw)
    b = _shard(fam, server, **kw)
    lsd = b.socket(fam)
    b.bind(lsd, 0, 80)
    b.listen(lsd, 8)
    c = a.socket(fam)
    a.connect(c, server, 80, 0.0)
    for _ in range(3):
        for f in a.take_frames():
            b.receive(f, 0.0)
        for f in b.take_frames():
            a.receive(f, 0.0)
    acc = b.accept(lsd)
    assert acc is not None
    return a, b, c, acc[0]


def bench_bulk(name: str, mib: int, tso_max: int = 0) -> tuple[float, float]:
    """(payload MB/s, µs per segment) moving ``mib`` MiB a -> b."""
    a, b, c, s = _pair(name, rcvbuf=4 << 20, sndbuf=4 << 20, tso_max=tso_max)
    view = memoryview(bytes(range(256)) * (4096 * mib))
    total = len(view)
    sent = got = segs = 0
    now = 0.0
    perf = CLOCK[0]
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
        while chunk := b.recv(s, 1 << 22):
            got += len(chunk)
        fb = b.take_frames()
        segs += len(fb)
        a.receive_batch(fb, now)
        if not fa and not fb:
            nxt = [d for d in (a.next_deadline(), b.next_deadline()) if d is not None]
            now = max(now, min(nxt)) if nxt else now + 0.2
            a.advance(now)
            b.advance(now)
    dt = perf() - t0
    return total / dt / 1e6, dt / max(segs, 1) * 1e6


def bench_rr(name: str, n: int) -> float:
    """µs of engine time per 100-byte request/response round trip."""
    a, b, c, s = _pair(name)
    req = b"q" * 100
    now = 0.0
    perf = CLOCK[0]
    t0 = perf()
    for _ in range(n):
        now += 0.001
        a.send(c, req, now)
        b.receive_batch(a.take_frames(), now)
        b.recv(s, 1 << 16)
        b.send(s, req, now)
        a.receive_batch(b.take_frames(), now)
        a.recv(c, 1 << 16)
        b.receive_batch(a.take_frames(), now)
    return (perf() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--handshakes", type=int, default=3000)
    ap.add_argument("--rr", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3, help="best of N (shared CPUs)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    rows: dict[tuple[str, str], float] = {}

    def best(key: tuple[str, str], value: float, lower: bool = True) -> None:
        old = rows.get(key)
        rows[key] = value if old is None else (min(old, value) if lower else max(old, value))

    for _ in range(args.repeat):
        for name in FAMILIES:  # alternate, so both see the same machine
            best((name, "handshake us"), bench_handshakes(name, args.handshakes))
            mbs, us = bench_bulk(name, args.mib)
            best((name, "bulk MSS us/seg"), us)
            best((name, "bulk MSS MB/s"), mbs, lower=False)
            mbs, us = bench_bulk(name, args.mib, tso_max=65536)
            best((name, "bulk 64K us/seg"), us)
            best((name, "bulk 64K MB/s"), mbs, lower=False)
            best((name, "rr us"), bench_rr(name, args.rr))
    print(f"{'':22s}{'IPv4':>12s}{'IPv6':>12s}   (best of {args.repeat}, {args.clock} clock)")
    for what in ("handshake us", "bulk MSS us/seg", "bulk MSS MB/s", "bulk 64K us/seg",
                 "bulk 64K MB/s", "rr us"):
        print(f"{what:22s}{rows[('IPv4', what)]:12.2f}{rows[('IPv6', what)]:12.2f}")


if __name__ == "__main__":
    main()
