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
