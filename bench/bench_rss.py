"""ns per 12-byte TCP/IPv4 tuple: table-driven Toeplitz vs the bit-serial reference.

Usage: python bench/bench_rss.py [N]
"""

from __future__ import annotations

import random
import struct
import sys
import time

from shardstack.netio.rss import (
    SYMMETRIC_KEY,
    FoldedToeplitz,
    Toeplitz,
    make_reta,
    packet_to_worker,
    toeplitz,
)


def _time(fn, items) -> float:
    t0 = time.perf_counter_ns()
    for it in items:
        fn(it)
    return (time.perf_counter_ns() - t0) / len(items)


def main(n: int = 200_000) -> None:
    rng = random.Random(1)
    tuples = [
        (rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16))
        for _ in range(n)
    ]
    raw = [struct.pack("!IIHH", *t) for t in tuples]
    packets = [
        struct.pack("!BBHHHBBHII", 0x45, 0, 40, 0, 0, 64, 6, 0, s, d) + struct.pack("!HH", a, b)
        + bytes(16)
        for s, d, a, b in tuples
    ]
    t = Toeplitz(SYMMETRIC_KEY)
    reta = make_reta(4)
    naive_n = max(1, n // 50)
    naive = _time(lambda b: toeplitz(SYMMETRIC_KEY, b), raw[:naive_n])
    tup = _time(lambda x: t.hash_tuple(*x), tuples)
    hb = t.hash_packet
    pkt = _time(lambda p: hb(p, 0, 20), packets)
    p2w = _time(lambda p: packet_to_worker(p, 0, 20, reta), packets)
    f = FoldedToeplitz(SYMMETRIC_KEY)
    wtab = f.worker_table(reta)
    unpack = struct.Struct("!IIHH").unpack_from

    def folded(p):
        s, d, a, b = unpack(p, 12)
        x = s ^ d ^ (a << 16 | b)
        return wtab[(x ^ (x >> 16)) & 0xFFFF]

    fold = _time(folded, packets)
    print(f"toeplitz bit-serial (reference)   {naive:9.0f} ns/tuple")
    print(f"table-driven hash_tuple           {tup:9.0f} ns/tuple")
    print(f"table-driven hash_packet (raw)    {pkt:9.0f} ns/tuple")
    print(f"packet_to_worker (hash + RETA)    {p2w:9.0f} ns/tuple")
    print(f"folded symmetric -> worker (raw)  {fold:9.0f} ns/tuple")
    print(f"speed-up table vs bit-serial      {naive / pkt:9.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
