"""The impair-bridge's pure parts: GSO segmentation of a TCP/IPv4 super-frame
(what a NIC puts on the wire) and its rate and spec parsing."""

from __future__ import annotations

import pytest
from shardstack.core.wire.checksum import complete_partial, verify_tcp_checksum
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, CWR, FIN, PSH, build_tcp_ipv4, parse_tcp
from shardstack.netio.bridge import gso_segment_tcpv4, parse_rate

SRC, DST = 0xC6120001, 0xC6120002  # 198.18.0.1 -> 198.18.0.2
ETH = bytes.fromhex("020000000002" "020000000001" "0800")


def _super(payload: bytes, flags: int) -> bytes:
    ip = build_tcp_ipv4(SRC, DST, 40000, 9, 0xFFFFFF00, 77, flags, 512, payload=payload,
                        ident=0xFFFE)
    return ETH + ip


def test_segments_carry_the_payload_in_order_with_linux_flag_rules():
    payload = bytes(range(256)) * 20  # 5120 bytes -> 4 segments of 1448 + 776
    segs = gso_segment_tcpv4(_super(payload, ACK | PSH | FIN | CWR), 1448)
    assert [len(s) - 14 - 40 for s in segs] == [1448, 1448, 1448, 776]
    data = b""
    for i, seg in enumerate(segs):
        assert seg[:14] == ETH
        ip, l4 = parse_ipv4(seg[14:])
        assert ip.total_len == len(seg) - 14
        assert ip.ident == (0xFFFE + i) & 0xFFFF  # incrementing ids, wrapping
        tcp_bytes = complete_partial(bytes(seg[14:]), ip.header_len, 16)[ip.header_len:]
        assert verify_tcp_checksum(SRC, DST, tcp_bytes)
        t = parse_tcp(tcp_bytes)
        assert t.seq == (0xFFFFFF00 + i * 1448) & 0xFFFFFFFF
        assert t.ack == 77
        last = i == len(segs) - 1
        assert bool(t.flags & FIN) == last and bool(t.flags & PSH) == last
        assert bool(t.flags & CWR) == (i == 0)
        data += bytes(t.payload)
    assert data == payload


def test_a_frame_within_gso_size_is_left_whole():
    frame = _super(b"x" * 100, ACK)
    assert gso_segment_tcpv4(frame, 1448) == [frame]


@pytest.mark.parametrize(("text", "bps"), [("100mbit", 100e6), ("1gbit", 1e9), ("500kbit", 5e5),
                                           ("12345", 12345.0), ("0", 0.0)])
def test_parse_rate(text, bps):
    assert parse_rate(text) == bps


def test_parse_rate_rejects_negative():
    with pytest.raises(ValueError):
        parse_rate("-1mbit")


def test_rate_shaper_serialises_at_the_rate_and_tail_drops():
    from shardstack.netio.bridge import _Shaper

    sh = _Shaper(rate=8000.0, limit=3)  # 1000 bytes/s
    frame = (bytes(100), 0)  # 0.1 s each on the wire
    assert all(sh.push(frame, 0.0) for _ in range(3))
    assert not sh.push(frame, 0.0)  # the queue holds 3: tail drop
    out: list = []
    sh.pop_due(0.15, out)
    assert len(out) == 1  # the first finished at 0.1 s, the second at 0.2 s
    assert sh.next_deadline() == pytest.approx(0.2)
    sh.pop_due(0.31, out)
    assert len(out) == 3 and sh.next_deadline() is None
    assert sh.push(frame, 1.0)  # an idle link starts at once
    assert sh.next_deadline() == pytest.approx(1.1)
