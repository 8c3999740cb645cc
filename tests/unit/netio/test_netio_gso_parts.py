"""`_gso_parts` (zero-copy GSO send) builds exactly the bytes `_gso_header`
(the copying version) builds, for TUN (l3 = 0), AF_PACKET (l3 = 14) and an
Ethernet header sent apart (base = 14)."""

from __future__ import annotations

import random

import pytest
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4
from shardstack.netio.device import _gso_header, _gso_parts


@pytest.mark.parametrize("size,mss", [(3000, 1448), (60000, 1448), (500, 1448), (1448, 1448)])
def test_parts_equal_copying_version(size, mss):
    rng = random.Random(size)
    pkt = build_tcp_ipv4(0xC6120001, 0xC6120002, 40000, 80, rng.getrandbits(32), 1, ACK, 500,
                         options=b"\x01\x01\x08\x0a" + bytes(8), payload=rng.randbytes(size))
    eth = bytes(range(14))
    for l3, prefix in ((0, b""), (14, eth)):
        whole = bytearray(prefix + pkt)
        want = _gso_header(whole, mss, l3) + bytes(whole)
        vnet, head, payload = _gso_parts(prefix + pkt, mss, l3)
        assert vnet + head + payload == want
    whole = bytearray(eth + pkt)
    want = _gso_header(whole, mss, 14) + bytes(whole)
    vnet, head, payload = _gso_parts(pkt, mss, 0, base=len(eth))
    assert vnet + eth + head + payload == want


@pytest.mark.parametrize("size,mss", [(60000, 1428), (500, 1428)])
def test_ipv6_super_segment(size, mss):
    """An IPv6 super-segment (the engine sends them to IPv6 peers too): GSO
    type TCPV6, TCP after the 40-byte header, the IPv6 pseudo-header sum in
    the checksum field, so the device's completion gives the real checksum."""
    from shardstack.core.wire.checksum import complete_partial
    from shardstack.core.wire.tcp import build_tcp_ipv6
    from shardstack.netio.device import VNET_HDR

    rng = random.Random(size)
    src, dst = 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 2
    pkt = build_tcp_ipv6(src, dst, 40000, 80, rng.getrandbits(32), 1, ACK, 500,
                         options=b"\x01\x01\x08\x0a" + bytes(8), payload=rng.randbytes(size))
    eth = bytes(range(14))
    for l3, prefix, base in ((0, b"", 0), (14, eth, 0), (0, b"", 14)):
        vnet, head, payload = _gso_parts(prefix + pkt, mss, l3, base=base)
        flags, gso_type, hdr_len, gso_size, start, off = VNET_HDR.unpack(vnet)
        at = l3 + base
        assert (start, off, hdr_len) == (at + 40, 16, at + 40 + 32)
        assert (gso_type, gso_size) == ((4, mss) if size > mss else (0, 0))
        whole = (eth if base else b"") + head + payload
        assert complete_partial(whole, start, off) == (eth if base or l3 else b"") + pkt
        copy = bytearray(prefix + pkt)
        assert _gso_header(copy, mss, l3) == (vnet if not base else _gso_header(copy, mss, l3))
