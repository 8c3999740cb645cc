"""Per-packet cost of core.wire: the Internet checksum, parse and build.

Usage: python bench/bench_wire.py [--quick]

Each figure is the best of several timeit repetitions (the least disturbed
by other processes on a shared machine), for random payloads (an all-zero
payload would make the big-int checksum trivially cheap).
"""

from __future__ import annotations

import random
import sys
import timeit

from shardstack.core.wire import (
    ACK,
    PSH,
    SYN,
    build_tcp_ipv4,
    build_tcp_options,
    internet_checksum,
    parse_ipv4,
    parse_tcp,
    str_to_ip,
    verify_tcp_checksum,
)
from shardstack.core.wire.checksum import FOLD_MIN_BYTES

SRC = str_to_ip("198.18.0.1")
DST = str_to_ip("198.18.0.2")


def best_ns(fn, min_time: float, repeat: int) -> float:
    """Best time per call in ns; each repetition runs for about ``min_time`` s."""
    timer = timeit.Timer(fn)
    number, elapsed = timer.autorange()
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def main(quick: bool = False) -> None:
    min_time, repeat = (0.05, 3) if quick else (0.25, 7)
    rng = random.Random(1)

    print(f"Internet checksum (big-int, fold above {FOLD_MIN_BYTES} B), random data")
    print(f"{'size':>10} {'ns/packet':>12} {'ns/byte':>9}")
    for size in (64, 1460, 65536):
        data = rng.randbytes(size)
        ns = best_ns(lambda d=data: internet_checksum(d), min_time, repeat)
        print(f"{size:>8} B {ns:>12.0f} {ns / size:>9.2f}")

    ts = build_tcp_options(ts=(0x12345678, 0x9ABCDEF0))
    syn_opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0))
    sack = build_tcp_options(ts=(5, 6), sack_blocks=((100, 200), (300, 400)))
    payload = rng.randbytes(1448)
    cases = [
        ("SYN, MSS+SACK_PERM+TS+WS", SYN, syn_opts, b""),
        ("pure ACK, no options", ACK, b"", b""),
        ("pure ACK, NOP,NOP,TS", ACK, ts, b""),
        ("ACK + 2 SACK blocks", ACK, sack, b""),
        ("1448 B data, NOP,NOP,TS", ACK | PSH, ts, payload),
    ]

    print()
    print("per packet, µs")
    print(f"{'segment':<26} {'parse':>7} {'parse+csum':>11} {'build':>7}")
    for name, flags, opts, data in cases:
        pkt = build_tcp_ipv4(SRC, DST, 40000, 80, 1, 2, flags, 502, opts, data)

        def parse(pkt=pkt):
            _, body = parse_ipv4(pkt)
            return parse_tcp(body)

        def parse_verify(pkt=pkt):
            hdr, body = parse_ipv4(pkt)
            verify_tcp_checksum(hdr.src, hdr.dst, body)
            return parse_tcp(body)

        def build(flags=flags, opts=opts, data=data):
            return build_tcp_ipv4(SRC, DST, 40000, 80, 1, 2, flags, 502, opts, data)

        p = best_ns(parse, min_time, repeat) / 1e3
        pv = best_ns(parse_verify, min_time, repeat) / 1e3
        b = best_ns(build, min_time, repeat) / 1e3
        print(f"{name:<26} {p:>7.2f} {pv:>11.2f} {b:>7.2f}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
