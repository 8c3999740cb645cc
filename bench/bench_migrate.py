"""What moving a connection between shards costs (core/tcp_migrate.py, issue 15).

    .venv/bin/python bench/bench_migrate.py [--rounds N] [--conns N] [--json]

Engine time per connection for ``Shard.migrate_out`` on the old shard plus
``Shard.migrate_in`` on the new one (the pause a connection sees, apart from
the process side's messaging), and the same with the msgpack encode/decode the
workers do between them, for:

1. an idle established connection (one connection moved, back and forth);
2. a sender with 256 KiB in flight (unacknowledged; grown on a lossless
   in-memory wire first, so cwnd and the peer's window allow it);
3. a receiver with 256 KiB unread in its receive queue;
4. a bucket of ``--conns`` idle connections moved together (per connection).

Also the state's size in msgpack bytes.  Best of ``--rounds`` moves; wall-clock
(time.perf_counter), printed, never asserted.  The kernel has no counterpart to
compare against (CRIU's TCP_REPAIR dump/restore is a different, whole-process
operation).
"""

from __future__ import annotations

import argparse
import json
import socket
import time

import msgpack
from shardstack.core import Shard, ShardConfig
from shardstack.core.wire.ipv4 import str_to_ip

SERVER = str_to_ip("198.18.0.1")
CLIENT = str_to_ip("198.18.0.2")
SECRET = b"bench-secret"


def shard(addr: int) -> Shard:
    return Shard(ShardConfig(addrs=[addr], secret=SECRET), 0.0)


def wire(a: Shard, b: Shard, now: float, drop_ab: bool = False) -> None:
    """Deliver frames both ways until quiet (lossless, instant); ``drop_ab``: a's
    frames are taken and thrown away (nothing acknowledges a's data)."""
    for _ in range(100_000):
        fa, fb = a.take_frames(), b.take_frames()
        if not fa and not fb:
            return
        if not drop_ab:
            b.receive_batch(fa, now)
        a.receive_batch(fb, now)


def connected(n: int = 1) -> tuple[Shard, Shard, list[int], list[int]]:
    """``n`` connections from a client shard to a server shard: (client, server,
    client sds, server sds)."""
    c, s = shard(CLIENT), shard(SERVER)
    lsd = s.socket()
    s.bind(lsd, 0, 80)
    s.listen(lsd, 4096)
    csds, ssds = [], []
    for _ in range(n):
        sd = c.socket()
        c.connect(sd, SERVER, 80, 0.0)
        wire(c, s, 0.0)
        acc = s.accept(lsd)
        assert acc is not None
        csds.append(sd)
        ssds.append(acc[0])
    c.take_events()
    s.take_events()
    return c, s, csds, ssds


def time_moves(src: Shard, rounds: int, addr: int, now: float) -> dict[str, float]:
    """Move everything on ``src`` to a fresh shard and back, ``rounds`` times: best
    µs for out+in (engine) and out+pack+unpack+in (what a worker pays), and bytes."""
    dst = shard(addr)
    for lsd in [sd for sd, sk in src.socks.items() if sk.state.value == "LISTEN"]:
        s2 = dst.socket()  # the listener copy the destination would have
        dst.bind(s2, 0, src.sock(lsd).lport)
        dst.listen(s2, 4096)
    best_engine = best_wire = float("inf")
    size = 0
    pair = [src, dst]
    clock = time.perf_counter
    for i in range(rounds):
        a, b = pair[i & 1], pair[(i + 1) & 1]
        t0 = clock()
        states = a.migrate_out(lambda *_: True)
        t1 = clock()
        blob = msgpack.packb(states)
        states2 = msgpack.unpackb(blob, raw=False)
        t2 = clock()
        b.migrate_in(states2, now)
        t3 = clock()
        n = max(len(states), 1)
        best_engine = min(best_engine, ((t1 - t0) + (t3 - t2)) / n)
        best_wire = min(best_wire, (t3 - t0) / n)
        size = len(blob) // n
        b.take_events()
    return {"engine_us": best_engine * 1e6, "with_msgpack_us": best_wire * 1e6,
            "state_bytes": size}


def case_idle(rounds: int) -> dict[str, float]:
    c, s, _, _ = connected()
    return time_moves(c, rounds, CLIENT, 0.0)


def case_in_flight(rounds: int, kib: int = 256) -> dict[str, float]:
    c, s, csds, ssds = connected()
    cs, ss = csds[0], ssds[0]
    # Grow cwnd and the receiver's window on a lossless wire first.
    now = 0.0
    buf = bytes(range(256)) * 4096  # 1 MiB of non-zero data
    for _ in range(16):
        now += 0.001
        c.send(cs, buf, now)
        wire(c, s, now)
        while s.recv(ss, 1 << 20):
            pass
        wire(c, s, now)
    c.send(cs, buf[:kib * 1024], now)
    wire(c, s, now, drop_ab=True)  # sent, never acknowledged
    sk = c.sock(cs)
    flight = (sk.snd_nxt - sk.snd_una) & 0xFFFFFFFF
    out = time_moves(c, rounds, CLIENT, now)
    out["in_flight_bytes"] = flight
    return out


def case_unread(rounds: int, kib: int = 256) -> dict[str, float]:
    c, s, csds, ssds = connected()
    s.setsockopt(ssds[0], socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # room to hold it
    now = 0.0
    buf = bytes(range(256)) * (kib * 4)
    sent = 0
    for _ in range(64):
        now += 0.001
        sent += c.send(csds[0], buf[sent:], now)
        wire(c, s, now)
        if s.sock(ssds[0]).rcvq_len >= kib * 1024:
            break
    unread = s.sock(ssds[0]).rcvq_len
    out = time_moves(s, rounds, SERVER, now)
    out["unread_bytes"] = unread
    return out


def case_bucket(rounds: int, conns: int) -> dict[str, float]:
    c, s, _, _ = connected(conns)
    return time_moves(s, rounds, SERVER, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {
        "idle established": case_idle(args.rounds),
        "256 KiB in flight (sender)": case_in_flight(max(args.rounds // 4, 5)),
        "256 KiB unread (receiver)": case_unread(max(args.rounds // 4, 5)),
        f"bucket of {args.conns} idle": case_bucket(max(args.rounds // 50, 3), args.conns),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{'case':32} {'engine µs/conn':>15} {'+msgpack µs/conn':>17} {'bytes/conn':>11}")
    for name, r in res.items():
        extra = "".join(f"  {k}={v}" for k, v in r.items() if k.endswith("bytes")
                        and k != "state_bytes")
        print(f"{name:32} {r['engine_us']:15.1f} {r['with_msgpack_us']:17.1f} "
              f"{r['state_bytes']:11d}{extra}")


if __name__ == "__main__":
    main()
