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

3. the established fast path alone (header prediction, ``tcp_input``),
   against a scripted Linux-like peer (timestamps on): µs per in-order
   1448-byte data segment received (ACKing every second one) and µs per pure
   ACK received (it acks two segments and clocks out new ones), with and
   without the receive checksum check; and the GSO download case, where each
   pure ACK acks one 64 KiB super-segment and clocks out the next.  Payloads
   are non-zero data in memory already touched, as an application's are: a
   zero-filled buffer sums in a third of the time (int.from_bytes drops
   leading zero bytes) and faults its pages in on first read.
4. request/response on one connection: µs of engine time per round trip over
   ``--rr`` round trips, and the timer heap's size afterwards (it must stay at
   a handful of entries however many round trips are made).
5. connect/request/response/close between two Shards: µs per transaction
   (connect, accept, 100-byte request, 100-byte response, close from the
   client first on odd rounds and from the server first on even ones), the
   netperf TCP_CRR pattern.  ``--profile crr`` / ``--profile rr`` profile these.

Figures are wall-clock on whatever machine runs this; they are printed, never
asserted.  ``--clock cpu`` times with this process's CPU time instead
(``time.process_time``): on a machine other jobs keep busy, wall figures of
identical code move by 2x between runs, CPU time by a few percent (each clock
read costs ~0.5 µs, counted in every figure).  The kernel-stack baseline belongs to the end-to-end benchmarks.
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
#: The clock every figure is read with (``--clock``): wall time unless asked.
CLOCK = [time.perf_counter]


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
    perf = CLOCK[0]
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


def _established_server(csum_offload: bool = False, gso: bool = False):
    """A Shard that accepted a connection from a scripted Linux-like peer (TS, SACK, wscale)."""
    sh = Shard(ShardConfig(addrs=[SERVER], secret=SECRET, rcvbuf=4 << 20, sndbuf=64 << 20,
                           csum_offload=csum_offload, tso_max=65000 if gso else 0,
                           tx_csum_offload=gso), 0.0)
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    sh.listen(lsd, 8)
    opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0))
    sh.receive(build_tcp_ipv4(CLIENT, SERVER, 40000, 80, 1000, 0, SYN, 65535, opts), 0.0)
    _, seg_bytes = parse_ipv4(sh.take_frames()[0])
    sa = parse_tcp(seg_bytes)
    sh.receive(build_tcp_ipv4(CLIENT, SERVER, 40000, 80, 1001, sa.seq + 1, ACK, 65535,
                              build_tcp_options(ts=(2, sa.options.ts[0]))), 0.0)
    sd, _ = sh.accept(lsd)
    sh.take_frames()
    return sh, sd, sa.seq + 1


def _app_data(n: int) -> bytes:
    """``n`` bytes of non-zero data in memory already touched, like an application's."""
    return (bytes(range(1, 256)) * (n // 255 + 1))[:n]


def bench_fastpath_data(n: int, csum_offload: bool = False) -> float:
    """µs per in-order 1448-byte data segment received (ACK every second one)."""
    sh, sd, una = _established_server(csum_offload)
    payload = _app_data(1448)
    segs = [build_tcp_ipv4(CLIENT, SERVER, 40000, 80, 1001 + i * 1448, una, ACK | 0x08, 65535,
                           build_tcp_options(ts=(3 + i, 1)), payload) for i in range(n)]
    perf = CLOCK[0]
    engine = 0.0
    now = 0.0
    for i in range(0, n, 64):
        now += 0.001
        t0 = perf()
        for f in segs[i:i + 64]:
            sh.receive(f, now)
        sh.take_frames()
        engine += perf() - t0
        sh.recv(sd, 1 << 22)
    return engine / n * 1e6


def bench_fastpath_ack(n: int, csum_offload: bool = False, gso: bool = False
                       ) -> tuple[float, float]:
    """(µs per pure ACK received, frames it released): each ACK acks two
    segments; with a large steady cwnd it clocks out new data.  ``gso``: the
    download case of a GSO device (``tso_max`` 64 KiB, transmit checksum
    offload): each ACK acks one 64 KiB super-segment and releases another."""
    sh, sd, una = _established_server(csum_offload, gso)
    sk = sh.sock(sd)
    sk.cc.cwnd = sk.cc.ssthresh = 2 * n * (45 if gso else 1) + 16  # window never limits
    mss = sk.mss_cache
    per_ack = (65000 // mss) * mss if gso else 2 * mss
    # Data the application wrote (pages present, not zero): bytes(N) would be
    # calloc'ed pages that fault on first read and sum faster than real data.
    sh.send(sd, _app_data(min(64 << 20, 2 * n * per_ack)), 0.0)
    sent = sum(len(f) - 52 for f in sh.take_frames())
    acks = [build_tcp_ipv4(CLIENT, SERVER, 40000, 80, 1001, (una + (i + 1) * per_ack) & 0xFFFFFFFF,
                           ACK, 65535, build_tcp_options(ts=(3 + i, 1)))
            for i in range(min(n, sent // per_ack))]
    perf = CLOCK[0]
    out = 0
    now = 0.0
    t0 = perf()
    for f in acks:
        sh.receive(f, now)
        out += len(sh.take_frames())
    return (perf() - t0) / len(acks) * 1e6, out / len(acks)


def bench_rr(n: int) -> tuple[float, int]:
    """(µs per request/response round trip, timer heap size after) on one connection."""
    a = Shard(ShardConfig(addrs=[CLIENT], secret=SECRET), 0.0)
    b = Shard(ShardConfig(addrs=[SERVER], secret=SECRET), 0.0)
    lsd = b.socket()
    b.bind(lsd, 0, 80)
    b.listen(lsd, 8)
    c = a.socket()
    a.connect(c, SERVER, 80, 0.0)
    for _ in range(3):
        for f in a.take_frames():
            b.receive(f, 0.0)
        for f in b.take_frames():
            a.receive(f, 0.0)
    s, _ = b.accept(lsd)
    a.setsockopt(c, 6, 1, 1)
    b.setsockopt(s, 6, 1, 1)
    req = b"q" * 64
    perf = CLOCK[0]
    now = 0.0
    t0 = perf()
    for _ in range(n):
        now += 0.0003
        a.send(c, req, now)
        b.receive_batch(a.take_frames(), now)
        b.recv(s, 4096)
        b.send(s, req, now)
        a.receive_batch(b.take_frames(), now)
        a.recv(c, 4096)
        b.receive_batch(a.take_frames(), now)
        a.advance(now)
        b.advance(now)
    return (perf() - t0) / n * 1e6, len(a.timers.heap) + len(b.timers.heap)


def bench_crr(n: int) -> float:
    """µs of engine time per connect/request/response/close transaction."""
    a = Shard(ShardConfig(addrs=[CLIENT], secret=SECRET), 0.0)
    b = Shard(ShardConfig(addrs=[SERVER], secret=SECRET), 0.0)
    lsd = b.socket()
    b.bind(lsd, 0, 80)
    b.listen(lsd, 128)
    req = b"q" * 100
    now = 0.0

    def pump() -> None:
        for _ in range(4):  # bounded: a close exchange settles in three passes
            fa = a.take_frames()
            fb = b.take_frames()
            if not fa and not fb:
                return
            b.receive_batch(fa, now)
            a.receive_batch(fb, now)

    perf = CLOCK[0]
    t0 = perf()
    for i in range(n):
        now += 0.001
        c = a.socket()
        a.connect(c, SERVER, 80, now)
        pump()
        s, _ = b.accept(lsd)
        a.send(c, req, now)
        pump()
        b.recv(s, 4096)
        b.send(s, req, now)
        pump()
        a.recv(c, 4096)
        first, second = ((a, c), (b, s)) if i % 2 else ((b, s), (a, c))
        first[0].close(first[1], now)
        pump()
        second[0].close(second[1], now)
        pump()
        a.take_events()
        b.take_events()
        a.advance(now)
        b.advance(now)
    return (perf() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handshakes", type=int, default=5000)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (shared CPUs)")
    ap.add_argument("--rr", type=int, default=10000, help="request/response round trips")
    ap.add_argument("--crr", type=int, default=3000, help="connect/request/response/close rounds")
    ap.add_argument("--profile", nargs="?", const="bulk",
                    choices=("bulk", "rr", "crr", "ack", "data"),
                    help="cProfile a run: the MSS bulk one (default), rr, crr, or the fast "
                         "path's pure ACKs (ack) or in-order data (data), csum checked")
    ap.add_argument("--only", choices=("handshake", "bulk", "fastpath", "rr", "crr"),
                    help="run one section")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or this process's CPU time (a busy machine)")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    def want(section: str) -> bool:
        return args.only is None or args.only == section

    if want("handshake"):
        hs, us = max(bench_handshakes(args.handshakes) for _ in range(args.repeat))
        print(f"handshakes: {hs:10.0f} /s   ({us:.1f} µs engine time per SYN+ACK+accept+RST)")
    for label, tso, off in (("bulk, MSS segments", 0, False),
                            ("bulk, 64 KiB super-segments", 65000, False),
                            ("  same, rx checksum offload", 65000, True)):
        if not want("bulk"):
            break
        mbs, us_seg, segs = max(bench_bulk(args.mib, tso, off) for _ in range(args.repeat))
        print(f"{label:28s}: {mbs:8.1f} MB/s payload   {us_seg:6.2f} µs/segment   "
              f"({segs} segments incl. ACKs, {args.mib} MiB)")
    for off in (False, True):
        if not want("fastpath"):
            break
        d = min(bench_fastpath_data(20000, off) for _ in range(args.repeat))
        k, per = min(bench_fastpath_ack(5000, off) for _ in range(args.repeat))
        tag = "csum offload" if off else "csum checked"
        print(f"fast path ({tag}): {d:6.2f} µs per in-order data segment in, "
              f"{k:6.2f} µs per pure ACK in (+{per:.1f} MSS segments out)")
    if want("fastpath"):
        k, per = min(bench_fastpath_ack(3000, True, gso=True) for _ in range(args.repeat))
        print(f"fast path (GSO download): {k:6.2f} µs per pure ACK in "
              f"(+{per:.1f} 64 KiB super-segment out, tx checksum offloaded)")
    if want("rr"):
        us_rr, heap = min(bench_rr(args.rr) for _ in range(args.repeat))
        print(f"request/response: {us_rr:6.2f} µs engine time per round trip "
              f"({args.rr} round trips, timer heap {heap} entries after)")
    if want("crr"):
        us_crr = min(bench_crr(args.crr) for _ in range(args.repeat))
        print(f"connect/request/response/close: {us_crr:6.1f} µs engine time per transaction "
              f"({args.crr} transactions)")
    if args.profile:
        run = {"bulk": lambda: bench_bulk(min(args.mib, 16)), "rr": lambda: bench_rr(args.rr),
               "crr": lambda: bench_crr(args.crr), "ack": lambda: bench_fastpath_ack(5000),
               "data": lambda: bench_fastpath_data(20000)}[args.profile]
        pr = cProfile.Profile()
        pr.enable()
        run()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
