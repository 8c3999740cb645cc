"""Transmit checksum offload: ``build_tcp_ipv4(csum_partial=True)`` (CHECKSUM_PARTIAL).

The oracle is what a virtio device / the kernel does with NEEDS_CSUM, written
here as the textbook word loop (independent of checksum.py's big-int sums):
sum 16-bit words from csum_start to the end, the field included, fold the
carries, complement, store at csum_start + csum_offset.  Completing the
partial packet must give, byte for byte, the packet with the full checksum.
"""

from __future__ import annotations

import random

import pytest
from shardstack.core.wire.checksum import complete_partial, pseudo_header_sum
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_ipv4, build_tcp_options

CSUM_START = 20  # IPv4 header without options: the TCP header starts here
CSUM_OFFSET = 16  # the TCP checksum field within the TCP header


def device_complete(packet: bytes, start: int, offset: int) -> bytes:
    """The device side of NEEDS_CSUM, as a word loop (RFC 1071 §4.1)."""
    data = bytearray(packet)
    tail = data[start:] + (b"\0" if (len(data) - start) & 1 else b"")
    total = 0
    for i in range(0, len(tail), 2):
        total += (tail[i] << 8) | tail[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    data[start + offset:start + offset + 2] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(data)


def _random_args(rnd: random.Random, plen: int) -> dict:
    opts = rnd.choice([b"", build_tcp_options(ts=(rnd.getrandbits(32), rnd.getrandbits(32))),
                       build_tcp_options(mss=1460, wscale=7, sack_perm=True),
                       build_tcp_options(ts=(1, 2), sack_blocks=((5, 9), (100, 200)))])
    return dict(src=rnd.getrandbits(32), dst=rnd.getrandbits(32),
                src_port=rnd.randrange(65536), dst_port=rnd.randrange(65536),
                seq=rnd.getrandbits(32), ack=rnd.getrandbits(32),
                flags=rnd.choice([ACK, ACK | PSH, ACK | FIN, SYN, RST | ACK]),
                window=rnd.randrange(65536), options=opts, payload=rnd.randbytes(plen),
                ttl=rnd.randrange(1, 256), ident=rnd.randrange(65536), tos=rnd.randrange(256))


LENGTHS = [0, 1, 2, 3, 7, 536, 1447, 1448, 1449, 4095, 9001, 65495 - 60]


@pytest.mark.parametrize("plen", LENGTHS)
def test_completing_the_partial_sum_gives_the_full_checksum(plen):
    rnd = random.Random(plen)
    for _ in range(20 if plen < 10000 else 3):
        args = _random_args(rnd, plen)
        full = build_tcp_ipv4(**args)
        partial = build_tcp_ipv4(**args, csum_partial=True)
        assert len(partial) == len(full)
        # Only the TCP checksum field differs (the IPv4 header sum is always complete).
        at = CSUM_START + CSUM_OFFSET
        assert partial[:at] == full[:at] and partial[at + 2:] == full[at + 2:]
        assert device_complete(partial, CSUM_START, CSUM_OFFSET) == full
        assert complete_partial(partial, CSUM_START, CSUM_OFFSET) == full


def test_random_lengths_odd_and_even():
    rnd = random.Random(7)
    for _ in range(300):
        plen = rnd.randrange(0, 3000)
        args = _random_args(rnd, plen)
        partial = build_tcp_ipv4(**args, csum_partial=True)
        assert device_complete(partial, CSUM_START, CSUM_OFFSET) == build_tcp_ipv4(**args)


def test_field_holds_the_uncomplemented_pseudo_header_sum():
    """What Linux's tcp_v4_send_check leaves for CHECKSUM_PARTIAL:
    ~tcp_v4_check(len, saddr, daddr, 0), i.e. the folded pseudo-header sum
    over the TCP length (header + payload), not complemented."""
    rnd = random.Random(3)
    for _ in range(200):
        args = _random_args(rnd, rnd.randrange(0, 2000))
        partial = build_tcp_ipv4(**args, csum_partial=True)
        ip, seg = parse_ipv4(partial)
        want = pseudo_header_sum(ip.src, ip.dst, 6, len(seg))
        assert int.from_bytes(partial[36:38], "big") == want
        # Independent of the payload: the payload is never summed.
        other = dict(args, payload=bytes(len(args["payload"])))
        assert build_tcp_ipv4(**other, csum_partial=True)[36:38] == partial[36:38]


def test_pseudo_header_sum_folds_to_0xffff_not_zero():
    # src + dst + 6 + len is a multiple of 0xFFFF: the folded sum is 0xFFFF
    # (one's-complement "negative zero"), as csum_fold of a non-zero sum.
    src, dst = 0xFFFF - 6 - 20, 0
    partial = build_tcp_ipv4(src, dst, 1, 2, 0, 0, ACK, 0, csum_partial=True)
    assert partial[36:38] == b"\xff\xff"
    full = build_tcp_ipv4(src, dst, 1, 2, 0, 0, ACK, 0)
    assert device_complete(partial, CSUM_START, CSUM_OFFSET) == full


def test_l2_offsets():
    """On AF_PACKET the device sees an Ethernet frame: csum_start = 14 + ihl."""
    rnd = random.Random(11)
    eth = bytes(range(14))
    for plen in (0, 1, 1449):
        args = _random_args(rnd, plen)
        frame = eth + build_tcp_ipv4(**args, csum_partial=True)
        assert device_complete(frame, 14 + CSUM_START, CSUM_OFFSET) == eth + build_tcp_ipv4(**args)
