"""Every parser, fed random and mutated packets, fails only with WireError.

Seeded: a failure names the seed and the input index, so it replays exactly.
The corpus is valid packets of every format; mutations are what a hostile or
broken peer produces: truncation, bit flips, random bytes, wrong length
fields (IP total length and IHL, TCP data offset, option lengths), and junk
appended.  Successful parses must still be self-consistent.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import pytest
from shardstack.core.wire import (
    ACK,
    ETH_P_ARP,
    ETH_P_IP,
    PROTO_ICMP,
    PROTO_TCP,
    PSH,
    SYN,
    WireError,
    build_ethernet,
    build_ipv4,
    build_tcp_ipv4,
    build_tcp_options,
    parse_arp,
    parse_ethernet,
    parse_icmp,
    parse_ipv4,
    parse_tcp,
    str_to_mac,
)
from shardstack.core.wire.arp import build_arp_request
from shardstack.core.wire.icmp import build_dest_unreachable, build_echo_request
from shardstack.core.wire.tcp import MAX_WSCALE, parse_tcp_options

SRC = 0xC6120001
DST = 0xC6120002
MAC_A = str_to_mac("02:00:00:00:00:01")
MAC_B = str_to_mac("02:00:00:00:00:02")


def corpus() -> list[bytes]:
    """Valid packets: IPv4/TCP with every option layout, ICMP, ARP, frames."""
    opts = [
        b"",
        build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 2)),
        build_tcp_options(ts=(0xFFFFFFFF, 5)),
        build_tcp_options(ts=(3, 4), sack_blocks=((10, 20), (30, 40), (50, 60))),
        build_tcp_options(mss=536, sack_perm=True, wscale=14),
        bytes((30, 6, 1, 2, 3, 4, 1, 0)),  # unknown option, NOP, EOL
    ]
    ip_packets = [
        build_tcp_ipv4(SRC, DST, 40000, 80, 1, 2, flags, 65535, o, b"x" * plen)
        for o in opts for flags, plen in ((SYN, 0), (ACK | PSH, 33), (ACK, 1))
    ]
    ip_packets.append(build_ipv4(SRC, DST, PROTO_ICMP, build_echo_request(7, 8, b"ping" * 5)))
    ip_packets.append(build_ipv4(SRC, DST, PROTO_ICMP,
                                 build_dest_unreachable(3, ip_packets[0])))
    ip_packets.append(build_ipv4(SRC, DST, 17, b"udp-ish payload"))
    arp = build_arp_request(MAC_A, SRC, DST)
    frames = [build_ethernet(MAC_B, MAC_A, ETH_P_IP, p, pad=True) for p in ip_packets[:4]]
    frames.append(build_ethernet(b"\xff" * 6, MAC_A, ETH_P_ARP, arp, pad=True))
    segments = [p[20:] for p in ip_packets[:len(opts) * 3]]
    icmp = [p[20:] for p in ip_packets[-3:-1]]
    return ip_packets + frames + segments + icmp + [arp]


def check_ipv4(data) -> None:
    hdr, body = parse_ipv4(data)
    assert 20 <= hdr.header_len <= hdr.total_len <= len(data)
    assert len(body) == hdr.total_len - hdr.header_len and hdr.frag_offset == 0
    if hdr.proto == PROTO_TCP:
        check_tcp(body)
    elif hdr.proto == PROTO_ICMP:
        check_icmp(body)


def check_tcp(data) -> None:
    seg = parse_tcp(data)
    assert 20 <= seg.header_len <= len(data)
    assert len(seg.payload) == len(data) - seg.header_len
    assert not (seg.flags & SYN and seg.flags & 0x05)
    opts = seg.options
    assert opts.wscale is None or 0 <= opts.wscale <= MAX_WSCALE
    assert len(opts.sack_blocks) <= 4


def check_options(data) -> None:
    opts = parse_tcp_options(data[:40])
    assert opts.wscale is None or opts.wscale <= MAX_WSCALE


def check_icmp(data) -> None:
    msg = parse_icmp(data)
    assert len(msg.payload) == len(data) - 8


def check_ethernet(data) -> None:
    frame = parse_ethernet(data)
    assert len(frame.dst) == len(frame.src) == 6 and frame.ethertype >= 0x0600
    if frame.ethertype == ETH_P_IP:
        check_ipv4(frame.payload)
    elif frame.ethertype == ETH_P_ARP:
        check_arp(frame.payload)


def check_arp(data) -> None:
    pkt = parse_arp(data)
    assert pkt.op in (1, 2) and len(pkt.sender_mac) == len(pkt.target_mac) == 6


CHECKS: list[Callable] = [check_ipv4, check_tcp, check_options, check_icmp, check_ethernet,
                          check_arp]


def _set16(buf: bytearray, offset: int, value: int) -> None:
    if offset + 2 <= len(buf):
        struct.pack_into("!H", buf, offset, value & 0xFFFF)


def mutate(rng: random.Random, pkt: bytes) -> bytes:
    """One hostile variant of a valid packet."""
    buf = bytearray(pkt)
    choice = rng.randrange(8)
    if choice == 0:                                   # truncation
        return bytes(buf[: rng.randrange(len(buf) + 1)])
    if choice == 1:                                   # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif choice == 2:                                 # random bytes overwritten
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif choice == 3:                                 # IP total length / IHL
        _set16(buf, 2, rng.choice([0, 1, 19, 20, len(buf) - 1, len(buf) + 1, 0xFFFF,
                                   rng.randrange(0x10000)]))
        if rng.random() < 0.5 and buf:
            buf[0] = (buf[0] & 0xF0) | rng.randrange(16)
    elif choice == 4:                                 # TCP data offset (bare or after IP)
        off = rng.choice([12, 32])
        if off < len(buf):
            buf[off] = (rng.randrange(16) << 4) | (buf[off] & 0x0F)
    elif choice == 5:                                 # an option length byte
        start = rng.choice([20, 40])
        if start + 2 < len(buf):
            i = rng.randrange(start, min(len(buf), start + 40))
            buf[i] = rng.choice([0, 1, 2, 3, 4, 10, 40, 255])
    elif choice == 6:                                 # junk appended
        buf += rng.randbytes(rng.randrange(1, 40))
    else:                                             # entirely random
        return rng.randbytes(rng.randrange(0, 120))
    return bytes(buf)


def inputs(seed: int, count: int) -> Iterator[bytes | bytearray | memoryview]:
    rng = random.Random(seed)
    base = corpus()
    wrap = (bytes, bytearray, memoryview)
    for i in range(count):
        data = mutate(rng, rng.choice(base)) if i % 10 else rng.randbytes(rng.randrange(0, 80))
        yield wrap[i % 3](data)


def run_fuzz(seed: int, count: int) -> dict[str, int]:
    """Outcome counts: "ok", "wire_error", and one count per WireError reason."""
    outcomes = {"ok": 0, "wire_error": 0}
    for index, data in enumerate(inputs(seed, count)):
        for check in CHECKS:
            try:
                check(data)
            except WireError as err:
                outcomes["wire_error"] += 1
                outcomes[err.reason] = outcomes.get(err.reason, 0) + 1
            except Exception as exc:  # pragma: no cover - the failure we hunt
                raise AssertionError(
                    f"{check.__name__} raised {exc!r} on input #{index} (seed {seed}): "
                    f"{bytes(data).hex()}") from exc
            else:
                outcomes["ok"] += 1
    return outcomes


def test_corpus_is_valid() -> None:
    # The mutations start from packets every parser on their path accepts.
    for pkt in corpus():
        assert any(_accepts(check, pkt) for check in CHECKS), pkt.hex()


def _accepts(check: Callable, data: bytes) -> bool:
    try:
        check(data)
    except WireError:
        return False
    return True


def test_fuzz_fast() -> None:
    outcomes = run_fuzz(seed=1, count=5_000)
    # Both outcomes must be common, or the mutations are not exercising anything.
    assert outcomes["ok"] > 1_000 and outcomes["wire_error"] > 10_000
    # Every family of check was reached at least once.
    for reason in ("truncated", "version", "ihl", "total_len", "checksum", "data_offset",
                   "option_len", "bad_flags", "not_ethernet_ii", "hardware_type"):
        assert outcomes.get(reason, 0) > 0, (reason, outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_fuzz_100k(seed: int) -> None:
    outcomes = run_fuzz(seed=seed, count=100_000)
    assert outcomes["ok"] > 20_000 and outcomes["wire_error"] > 200_000
