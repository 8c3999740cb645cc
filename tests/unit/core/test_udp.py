"""core/udp.py: datagrams in and out of a Shard, ICMP port unreachable, errors (no I/O)."""

from __future__ import annotations

import errno

from shardstack.core import Shard, ShardConfig
from shardstack.core.udp import (
    UdpDatagram,
    UdpError,
    _udp_header,
    udp_bind,
    udp_close,
    udp_connect,
    udp_sendmsg,
    udp_table,
)
from shardstack.core.wire.icmp import build_dest_unreachable, parse_icmp, parse_icmp_quote
from shardstack.core.wire.ipv4 import build_ipv4, parse_ipv4

US = 0xC6120002  # 198.18.0.2
PEER = 0xC6120001


def _shard() -> Shard:
    return Shard(ShardConfig(addrs=[US], secret=b"k" * 16), 0.0)


def _dgram(sport: int, dport: int, data: bytes, src: int = PEER, dst: int = US) -> bytes:
    return build_ipv4(src, dst, 17, _udp_header(src, dst, sport, dport, data), df=False)


def test_delivery_lookup_order_and_checksum():
    sh = _shard()
    udp_bind(sh, 1, 0, 53)
    udp_bind(sh, 2, US, 5353)
    sh.receive(_dgram(40000, 53, b"q"), 1.0)
    sh.receive(_dgram(40000, 5353, b"m"), 1.0)
    bad = bytearray(_dgram(40000, 53, b"x"))
    bad[-1] ^= 0xFF  # payload corrupted: the checksum no longer holds
    sh.receive(bytes(bad), 1.0)
    ev = sh.take_events()
    assert ev == [UdpDatagram(1, PEER, 40000, US, b"q"), UdpDatagram(2, PEER, 40000, US, b"m")]
    st = udp_table(sh).stats
    assert st.in_datagrams == 2 and st.in_csum_errors == 1
    assert sh.take_frames() == []  # no ICMP for a bad checksum


def test_no_socket_answers_port_unreachable():
    sh = _shard()
    pkt = _dgram(40000, 9, b"hello")
    sh.receive(pkt, 1.0)
    (frame,) = sh.take_frames()
    ip, payload = parse_ipv4(frame)
    assert (ip.src, ip.dst, ip.proto) == (US, PEER, 1)
    msg = parse_icmp(payload)
    assert (msg.type, msg.code) == (3, 3)
    q = parse_icmp_quote(msg.payload)
    assert (q.src, q.dst, q.proto, q.sport, q.dport) == (PEER, US, 17, 40000, 9)
    assert udp_table(sh).stats.no_ports == 1


def test_port_unreachable_is_rate_limited():
    sh = _shard()
    for _ in range(200):
        sh.receive(_dgram(40000, 9, b"x"), 5.0)  # one instant: only the burst goes out
    assert len(sh.take_frames()) == 50
    assert udp_table(sh).stats.icmp_ratelimited == 150


def test_send_and_connected_filter_and_econnrefused():
    sh = _shard()
    udp_bind(sh, 1, 0, 4000)
    udp_sendmsg(sh, 1, PEER, 53, b"query")
    (frame,) = sh.take_frames()
    ip, payload = parse_ipv4(frame)
    assert (ip.src, ip.dst, ip.proto) == (US, PEER, 17)
    assert bytes(payload) == _udp_header(US, PEER, 4000, 53, b"query")
    udp_connect(sh, 1, PEER, 53)
    sh.receive(_dgram(9999, 4000, b"stranger"), 1.0)  # not from the connected peer
    assert sh.take_events() == []
    # The peer's port unreachable quoting our datagram: ECONNREFUSED.
    icmp = build_ipv4(PEER, US, 1, build_dest_unreachable(3, frame), df=False)
    sh.receive(icmp, 1.0)
    assert sh.take_events() == [UdpError(1, errno.ECONNREFUSED)]
    udp_close(sh, 1)
    assert udp_table(sh).socks == {} and udp_table(sh).connected == {}


def test_errors_are_the_kernels():
    sh = _shard()
    udp_bind(sh, 1, 0, 4000)
    for call, code in ((lambda: udp_sendmsg(sh, 1, 0, 0, b"x"), errno.EDESTADDRREQ),
                       (lambda: udp_sendmsg(sh, 1, PEER, 53, b"x" * 1500), errno.EMSGSIZE),
                       (lambda: udp_sendmsg(sh, 7, PEER, 53, b"x"), errno.EBADF)):
        try:
            call()
        except OSError as e:
            assert e.errno == code
        else:
            raise AssertionError(code)
