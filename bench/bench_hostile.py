"""What a hostile peer's segments cost the engine (issue 11), in-process, no devices.

    .venv/bin/python bench/bench_hostile.py [--sizes 1000,10000,100000] [--out FILE]

1. ofo: the peer sends N one-byte segments on alternate bytes (every one
   lands behind a hole), to a connection whose SO_RCVBUF (4N, at least the
   256 KiB default) offers a window that fits all of them.  Reported: CPU µs
   per segment over the last 1000 (or all, if fewer) segments, entries the
   out-of-order queue holds at the end, and the memory it holds per entry
   (every object reachable from the connection, counted once: the ``deep``
   size, growth since the handshake) and in total against the buffer.
2. sack: we have the whole send buffer (1 MiB) in flight and the peer SACKs
   N ranges with 4 blocks per ACK.  Two strategies, the worse is what an
   attacker picks: (a) one-byte blocks on alternate bytes at the default MSS,
   (b) MSS 48 (the floor, with timestamps 36 bytes per segment) and whole
   alternate segments.  Reported: CPU µs per ACK over the last 1000 ACKs'
   worth of blocks, scoreboard entries held, deep bytes per entry.

The engine is driven through ``Shard.receive`` only; the one poke is the
sender's cwnd (set to cover the send buffer, as a long transfer's would be).
CPU is ``time.process_time``; a shared box makes figures noisy, so each size
is run ``--repeat`` times and the best kept.  Printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "core"))

import socket  # noqa: E402

from core_helpers import ACK, Peer, listen, make_shard, passive_open  # noqa: E402

MASK = 0xFFFFFFFF


def deep_size(root: object) -> int:
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | types.ModuleType | types.FunctionType
                                       | types.BuiltinFunctionType):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


def _entries(q: object) -> int:
    try:
        return len(q)  # type: ignore[arg-type]
    except TypeError:
        return -1


def bench_ofo(n: int, prefill: bool = False, tail_n: int = 1000) -> dict:
    sh = make_shard()
    peer = Peer(sh)
    rcvbuf = max(4 * n, 262144)
    lsd = listen(sh, opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf),))
    sd, sa = passive_open(peer, lsd, mss=1460, sack_perm=True, wscale=7)
    sh.take_frames()
    sk = sh.sock(sd)
    una = (sa.seq + 1) & MASK
    from shardstack.core.wire.tcp import build_tcp_ipv4
    frames = [build_tcp_ipv4(peer.addr, peer.shard_addr, peer.port, 80, (1001 + 2 * k) & MASK,
                             una, ACK, 65535, b"", b"o") for k in range(1, n + 1)]
    base = deep_size(sk)
    tail = min(tail_n, n)
    t_tail = 0.0
    recv = sh.receive
    take = sh.take_frames
    start = 0
    if prefill and isinstance(sk.ofo, list):
        # The list layout of 8d308bb ([start, end, bytes], sorted): what n - tail
        # receives would have built, built in place (through receive() it is
        # quadratic: over an hour at 100k).
        sk.ofo[:] = [[(1001 + 2 * k) & MASK, (1002 + 2 * k) & MASK, b"o"]
                     for k in range(1, n - tail + 1)]
        sk.ofo_len = n - tail
        start = n - tail
    for i in range(start, n):
        f = frames[i]
        if i == n - tail:
            t0 = time.process_time()
        recv(f, 0.01)
        take()
    t_tail = time.process_time() - t0
    entries = _entries(sk.ofo)
    held = deep_size(sk) - base
    return {"us_per_seg": 1e6 * t_tail / tail, "entries": entries,
            "bytes_per_entry": held / entries if entries > 0 else float("nan"),
            "held": held, "rcvbuf": rcvbuf,
            "drops": {r.value: c for r, c in sh.stats.drops.items()}}


def bench_sack(n: int, strategy: str, prefill: bool = False, tail_n: int = 1000) -> dict:
    sh = make_shard(sndbuf=1 << 20)
    peer = Peer(sh)
    lsd = listen(sh)
    mss = 1460 if strategy == "bytes" else 48
    sd, sa = passive_open(peer, lsd, mss=mss, sack_perm=True, wscale=7,
                          ts=(100, 0) if strategy == "segments" else None)
    sh.take_frames()
    sk = sh.sock(sd)
    una = (sa.seq + 1) & MASK
    sk.cc.cwnd = 1 << 20
    data = b"s" * (1 << 20)
    sent = 0
    while sent < len(data):
        k = sh.send(sd, data[sent:], 0.0)
        if not k:
            break
        sent += k
    sh.take_frames()
    flight = (sk.snd_max - sk.snd_una) & MASK
    seg = sk.mss_cache
    if strategy == "bytes":
        starts = [una + 1 + 2 * k for k in range(n) if 2 * k + 2 < flight]
        blocks = [(s & MASK, (s + 1) & MASK) for s in starts]
    else:
        starts = [una + seg * (2 * k + 1) for k in range(n) if seg * (2 * k + 2) < flight]
        blocks = [(s & MASK, (s + seg) & MASK) for s in starts]
    per = 3 if strategy == "segments" else 4  # TS takes the room of one block
    from shardstack.core.wire.tcp import build_tcp_ipv4, build_tcp_options
    frames = []
    for i in range(0, len(blocks), per):
        # Most recent first (RFC 2018 §4), as a receiver reports them.
        chunk = tuple(reversed(blocks[i:i + per]))
        ts = (200 + i, sk.ts_recent) if strategy == "segments" else None
        opts = build_tcp_options(sack_blocks=chunk, ts=ts)
        frames.append(build_tcp_ipv4(peer.addr, peer.shard_addr, peer.port, 80, 1001, una,
                                     ACK, 65535, opts, b""))
    base = deep_size(sk)
    tail = min(max(tail_n // per, 1), len(frames))
    t0 = 0.0
    start = 0
    if prefill and isinstance(sk.sacked, list):
        # 8d308bb's scoreboard layout (sorted, merged [start, end] lists), built in place.
        start = len(frames) - tail
        sk.sacked[:] = sorted([list(b) for b in blocks[:start * per]],
                              key=lambda b: (b[0] - una) & MASK)
        sk.sacked_bytes = sum((b[1] - b[0]) & MASK for b in sk.sacked)
    for i in range(start, len(frames)):
        f = frames[i]
        if i == len(frames) - tail:
            t0 = time.process_time()
        sh.receive(f, 0.01 + i * 1e-6)
        sh.take_frames()
    t_tail = time.process_time() - t0
    entries = _entries(sk.sacked)
    held = deep_size(sk) - base
    return {"strategy": strategy, "blocks_sent": len(blocks), "flight": flight, "mss": seg,
            "us_per_ack": 1e6 * t_tail / max(tail, 1), "entries": entries,
            "bytes_per_entry": held / entries if entries > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None, help="also append the table to this file")
    ap.add_argument("--only", choices=("ofo", "sack"), default=None)
    ap.add_argument("--tail", type=int, default=1000,
                    help="segments (SACK: blocks) timed at the end of each run (default 1000)")
    ap.add_argument("--prefill-from", type=int, default=0,
                    help="sizes >= this are prefilled in place when the queue has the old "
                         "list layout (the before run: filling through receive() is "
                         "quadratic); 0: never")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    lines = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    if args.only in (None, "ofo"):
        say("ofo: N one-byte segments on alternate bytes (all behind a hole)")
        say(f"{'N':>8} {'us/seg':>17} {'entries held':>13} {'B/entry':>9} "
            f"{'held/rcvbuf':>12}  drops   (us/seg over the last {args.tail})")
        for n in sizes:
            best = None
            for _ in range(args.repeat):
                r = bench_ofo(n, 0 < args.prefill_from <= n, args.tail)
                if best is None or r["us_per_seg"] < best["us_per_seg"]:
                    best = r
            say(f"{n:>8} {best['us_per_seg']:>17.1f} {best['entries']:>13} "
                f"{best['bytes_per_entry']:>9.0f} {best['held'] / best['rcvbuf']:>12.2f}  "
                f"{best['drops']}")
    if args.only in (None, "sack"):
        say("sack: N SACK ranges against a 1 MiB flight, (a) 1-byte blocks, MSS 1460; "
            "(b) whole alternate segments, MSS 48 + TS")
        say(f"{'N':>8} {'strategy':>9} {'us/ACK':>9} {'entries':>8} {'B/entry':>8} "
            f"{'blocks sent':>12} {'seg':>5}")
        for n in sizes:
            for strategy in ("bytes", "segments"):
                best = None
                for _ in range(args.repeat):
                    r = bench_sack(n, strategy, 0 < args.prefill_from <= n, args.tail)
                    if best is None or r["us_per_ack"] < best["us_per_ack"]:
                        best = r
                say(f"{n:>8} {strategy:>9} {best['us_per_ack']:>9.1f} {best['entries']:>8} "
                    f"{best['bytes_per_entry']:>8.0f} {best['blocks_sent']:>12} "
                    f"{best['mss']:>5}")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
