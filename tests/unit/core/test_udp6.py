"""core/udp.py over IPv6 (Linux net/ipv6/udp.c): delivery, the mandatory checksum,
ICMPv6 port unreachable, sending, dual-stack sockets and V6ONLY, errors."""

from __future__ import annotations

import errno

import pytest
from core_helpers import A6, B6, make_shard6
from shardstack.core.udp import (
    UdpDatagram,
    UdpError,
    _udp_header,
    udp_bind,
    udp_connect,
    udp_sendmsg,
    udp_table,
)
from shardstack.core.wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_PORT_UNREACH,
    build_icmpv6_error,
    parse_icmpv6,
    parse_icmpv6_quote,
)
from shardstack.core.wire.ipv4 import build_ipv4, parse_ipv4, str_to_ip
from shardstack.core.wire.ipv6 import build_ipv6, parse_ipv6, v4_mapped

US4 = str_to_ip("198.18.0.2")
PEER4 = str_to_ip("198.18.0.1")
AF_INET6 = 10


def _shard():
    return make_shard6(A6, addr4=US4)


def _dgram6(sport: int, dport: int, data: bytes, src: int = B6, dst: int = A6) -> bytes:
    return build_ipv6(src, dst, 17, _udp_header(src, dst, sport, dport, data))


def _dgram4(sport: int, dport: int, data: bytes) -> bytes:
    return build_ipv4(PEER4, US4, 17, _udp_header(PEER4, US4, sport, dport, data), df=False)


def test_delivery_and_mandatory_checksum():
    sh = _shard()
    udp_bind(sh, 1, 0, 53, family=AF_INET6)
    sh.receive(_dgram6(40000, 53, b"q"), 1.0)
    bad = bytearray(_dgram6(40000, 53, b"x"))
    bad[-1] ^= 0xFF
    sh.receive(bytes(bad), 1.0)
    zero = bytearray(_dgram6(40000, 53, b"z"))
    zero[46:48] = b"\0\0"  # RFC 8200 §8.1: no "no checksum" over IPv6
    sh.receive(bytes(zero), 1.0)
    assert sh.take_events() == [UdpDatagram(1, B6, 40000, A6, b"q")]
    st = udp_table(sh).stats
    assert st.in_datagrams == 1 and st.in_csum_errors == 2
    assert sh.take_frames() == []


def test_no_socket_answers_icmpv6_port_unreachable():
    sh = _shard()
    udp_bind(sh, 1, 0, 53)  # an AF_INET socket: IPv4 only
    pkt = _dgram6(40000, 53, b"hello")
    sh.receive(pkt, 1.0)
    (frame,) = sh.take_frames()
    ip, body = parse_ipv6(frame)
    msg = parse_icmpv6(ip.src, ip.dst, body)
    assert (ip.src, ip.dst, msg.type, msg.code) == (A6, B6, ICMPV6_DEST_UNREACH,
                                                    ICMPV6_PORT_UNREACH)
    assert bytes(msg.body) == pkt
    assert udp_table(sh).stats.no_ports == 1


def test_dual_stack_socket_sees_ipv4_peers_mapped_and_v6only_does_not():
    sh = _shard()
    udp_bind(sh, 1, 0, 53, family=AF_INET6)
    sh.receive(_dgram4(40000, 53, b"four"), 1.0)
    assert sh.take_events() == [UdpDatagram(1, v4_mapped(PEER4), 40000, v4_mapped(US4), b"four")]
    udp_sendmsg(sh, 1, v4_mapped(PEER4), 40000, b"back")
    (frame,) = sh.take_frames()
    ip, _ = parse_ipv4(frame)
    assert (ip.src, ip.dst, ip.proto) == (US4, PEER4, 17)
    sh2 = _shard()
    udp_bind(sh2, 1, 0, 53, family=AF_INET6, v6only=True)
    sh2.receive(_dgram4(40000, 53, b"four"), 1.0)
    assert sh2.take_events() == []
    sh2.receive(_dgram6(40000, 53, b"six"), 1.0)
    assert sh2.take_events() == [UdpDatagram(1, B6, 40000, A6, b"six")]
    with pytest.raises(OSError) as e:
        udp_sendmsg(sh2, 1, v4_mapped(PEER4), 40000, b"x")
    assert e.value.errno == errno.ENETUNREACH


def test_send_connect_and_econnrefused():
    sh = _shard()
    udp_bind(sh, 1, 0, 4000, family=AF_INET6)
    udp_sendmsg(sh, 1, B6, 53, b"query")
    (frame,) = sh.take_frames()
    ip, payload = parse_ipv6(frame)
    assert (ip.src, ip.dst, ip.next_header) == (A6, B6, 17)
    assert bytes(payload) == _udp_header(A6, B6, 4000, 53, b"query")
    udp_connect(sh, 1, B6, 53)
    sh.receive(_dgram6(9999, 4000, b"stranger"), 1.0)
    assert sh.take_events() == []
    sh.receive(build_icmpv6_error(B6, A6, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, frame), 1.0)
    assert sh.take_events() == [UdpError(1, errno.ECONNREFUSED)]
    q = parse_icmpv6_quote(parse_icmpv6(B6, A6, parse_ipv6(
        build_icmpv6_error(B6, A6, 1, 4, frame))[1]).body)
    assert q.proto == 17


def test_errors_are_the_kernels():
    sh = _shard()
    udp_bind(sh, 1, 0, 4000, family=AF_INET6)
    with pytest.raises(OSError) as e:
        udp_sendmsg(sh, 1, B6, 53, b"x" * 1453)  # 1500 - 40 - 8 = 1452 fits
    assert e.value.errno == errno.EMSGSIZE
    udp_sendmsg(sh, 1, B6, 53, b"x" * 1452)
    with pytest.raises(OSError) as e:
        udp_sendmsg(sh, 1, 1, 53, b"x")  # ::1: no route from this stack
    assert e.value.errno == errno.ENETUNREACH
