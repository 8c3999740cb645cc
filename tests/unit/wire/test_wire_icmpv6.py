"""ICMPv6 (RFC 4443) and NS/NA (RFC 4861): kernel-captured vectors, scapy as
oracle for the builders, and the receive checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import WireError
from shardstack.core.wire.icmpv6 import (
    ALL_NODES,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PKT_TOOBIG,
    ICMPV6_PORT_UNREACH,
    NA_OVERRIDE,
    NA_SOLICITED,
    NDISC_NEIGHBOUR_ADVERTISEMENT,
    NDISC_NEIGHBOUR_SOLICITATION,
    build_echo_request6,
    build_icmpv6_error,
    build_neigh_advert,
    build_neigh_solicit,
    echo_reply6_for,
    multicast_mac,
    parse_icmpv6,
    parse_icmpv6_quote,
    parse_ndp,
    solicited_node_multicast,
)
from shardstack.core.wire.ipv6 import NEXTHDR_DEST, NEXTHDR_ICMP, build_ipv6, parse_ipv6, str_to_ip6
from wire_helpers import PROPERTY, u16

A = str_to_ip6("fd00::1")
B = str_to_ip6("fd00::2")
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")

# Captured from Linux 6.18 on a veth in namespaces we made (Ethernet stripped):
# `ping -6 -c1 -s 16 fd00::2` and the kernel's NS resolving fd00::2.
KERNEL_ECHO = bytes.fromhex(
    "600d70af00183a40fd000000000000000000000000000001fd000000000000000000000000000002"
    "80001af57b1a0001ad30166b0000000027fc040000000000")
KERNEL_NS = bytes.fromhex(
    "6000000000203afffd000000000000000000000000000001ff0200000000000000000001ff000002"
    "87007d9700000000fd0000000000000000000000000000020101020000000001")


def test_kernel_echo_request() -> None:
    ip, body = parse_ipv6(KERNEL_ECHO)
    assert ip.next_header == NEXTHDR_ICMP
    msg = parse_icmpv6(ip.src, ip.dst, body)
    assert (msg.type, msg.code, msg.ident, msg.seq) == (ICMPV6_ECHO_REQUEST, 0, 0x7B1A, 1)
    assert len(msg.body) == 16
    reply = echo_reply6_for(ip, msg)
    rip, rbody = parse_ipv6(reply)
    assert (rip.src, rip.dst) == (B, A)
    r = parse_icmpv6(rip.src, rip.dst, rbody)
    assert (r.type, r.rest, bytes(r.body)) == (ICMPV6_ECHO_REPLY, msg.rest, bytes(msg.body))
    # The pseudo-header is part of the sum: another destination fails.
    with pytest.raises(WireError, match="checksum"):
        parse_icmpv6(ip.src, ip.dst + 1, body)
    bad = bytearray(body)
    bad[-1] ^= 1
    with pytest.raises(WireError, match="checksum"):
        parse_icmpv6(ip.src, ip.dst, bad)
    assert parse_icmpv6(ip.src, ip.dst, bad, verify=False).type == ICMPV6_ECHO_REQUEST


def test_kernel_neighbour_solicitation() -> None:
    ip, body = parse_ipv6(KERNEL_NS)
    assert ip.dst == solicited_node_multicast(B)
    ns = parse_ndp(ip, parse_icmpv6(ip.src, ip.dst, body))
    assert (ns.type, ns.target, ns.src_lladdr, ns.tgt_lladdr) == (
        NDISC_NEIGHBOUR_SOLICITATION, B, MAC_A, None)
    # Our builder makes the same bytes as the kernel did.
    assert build_neigh_solicit(A, solicited_node_multicast(B), B, MAC_A) == KERNEL_NS
    assert multicast_mac(ip.dst) == bytes.fromhex("3333ff000002")


def test_neighbour_advertisement_against_scapy() -> None:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6

    pkt = build_neigh_advert(B, A, B, NA_SOLICITED | NA_OVERRIDE, MAC_B)
    ref = (IPv6(src="fd00::2", dst="fd00::1", hlim=255) / ICMPv6ND_NA(tgt="fd00::2", R=0, S=1, O=1)
           / ICMPv6NDOptDstLLAddr(lladdr="02:00:00:00:00:02"))
    assert pkt == bytes(ref)
    ip, body = parse_ipv6(pkt)
    na = parse_ndp(ip, parse_icmpv6(ip.src, ip.dst, body))
    assert (na.type, na.target, na.flags, na.tgt_lladdr) == (
        NDISC_NEIGHBOUR_ADVERTISEMENT, B, NA_SOLICITED | NA_OVERRIDE, MAC_B)


def _ndp(pkt: bytes) -> None:
    ip, body = parse_ipv6(pkt)
    parse_ndp(ip, parse_icmpv6(ip.src, ip.dst, body))


def _raw_icmp(src: int, dst: int, itype: int, code: int, rest: int, body: bytes,
              hlim: int = 255) -> bytes:
    from shardstack.core.wire.icmpv6 import icmpv6_packet
    return icmpv6_packet(src, dst, itype, code, rest, body, hlim)


@pytest.mark.parametrize(("pkt", "reason"), ids=lambda v: v if isinstance(v, str) else "", argvalues=[
    (build_ipv6(A, solicited_node_multicast(B), NEXTHDR_ICMP, KERNEL_NS[40:], hop_limit=64),
     "ndp_hop_limit"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 1, 0, B.to_bytes(16, "big")), "ndp_code"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, bytes(15)), "ndp_truncated"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, ALL_NODES.to_bytes(16, "big")),
     "ndp_target_multicast"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, B.to_bytes(16, "big") + bytes(8)),
     "ndp_option_len"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, B.to_bytes(16, "big") + b"\x01\x02"
               + bytes(6)), "ndp_option_len"),
    (_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, B.to_bytes(16, "big") + b"\x01"),
     "ndp_option_len"),
    (build_neigh_solicit(0, solicited_node_multicast(B), B, MAC_A), "ndp_unspecified_slla"),
    (build_neigh_solicit(0, B, B, None), "ndp_dad_not_solicited_node"),
    (build_neigh_advert(B, ALL_NODES, B, NA_SOLICITED, MAC_B), "ndp_na_solicited_multicast"),
])
def test_ndp_receive_checks(pkt: bytes, reason: str) -> None:
    with pytest.raises(WireError) as e:
        _ndp(pkt)
    assert e.value.reason == reason


def test_ndp_unknown_option_skipped_and_dad_accepted() -> None:
    body = B.to_bytes(16, "big") + b"\x0e\x01" + bytes(6) + b"\x01\x01" + MAC_A
    _ndp(_raw_icmp(A, B, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, body))
    _ndp(build_neigh_solicit(0, solicited_node_multicast(B), B, None))


@PROPERTY
@given(u16, u16, st.binary(max_size=80))
def test_echo_request_against_scapy(ident: int, seq: int, data: bytes) -> None:
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    pkt = build_echo_request6(A, B, ident, seq, data)
    ref = IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=ident, seq=seq, data=data)
    assert pkt == bytes(ref)


def test_every_truncation() -> None:
    ip, body = parse_ipv6(KERNEL_ECHO)
    for cut in range(8):
        with pytest.raises(WireError, match="truncated"):
            parse_icmpv6(ip.src, ip.dst, body[:cut])


def test_error_quote_and_size_limit() -> None:
    tcp = (1234).to_bytes(2, "big") + (80).to_bytes(2, "big") + (99).to_bytes(4, "big") + bytes(1400)
    original = build_ipv6(B, A, 6, tcp)
    err = build_icmpv6_error(A, B, ICMPV6_PKT_TOOBIG, 0, original, rest=1280)
    assert len(err) == 1280  # RFC 4443 §2.4(c)
    ip, body = parse_ipv6(err)
    msg = parse_icmpv6(ip.src, ip.dst, body)
    assert (msg.type, msg.rest) == (ICMPV6_PKT_TOOBIG, 1280)
    q = parse_icmpv6_quote(msg.body)
    assert (q.src, q.dst, q.proto, q.sport, q.dport, q.seq) == (B, A, 6, 1234, 80, 99)
    # A quote with a destination-options header in front of TCP.
    quoted = build_ipv6(B, A, NEXTHDR_DEST, bytes((6, 0, 1, 4, 0, 0, 0, 0)) + tcp[:8])
    q = parse_icmpv6_quote(quoted)
    assert (q.proto, q.sport, q.seq) == (6, 1234, 99)
    for cut in range(48):
        with pytest.raises(WireError):
            parse_icmpv6_quote(original[:cut])
    with pytest.raises(WireError, match="quote_version"):
        parse_icmpv6_quote(b"\x45" + original[1:48])
    # A quoted non-first fragment has no TCP header to read.
    frag = build_ipv6(B, A, 44, bytes((6, 0, 0, 8, 0, 0, 0, 1)) + tcp[:8])
    with pytest.raises(WireError, match="quote_fragment"):
        parse_icmpv6_quote(frag)


def test_dest_unreachable_against_scapy() -> None:
    from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

    original = build_ipv6(B, A, 17, bytes(16))
    pkt = build_icmpv6_error(A, B, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, original)
    ref = IPv6(src="fd00::1", dst="fd00::2") / ICMPv6DestUnreach(code=4) / original
    assert pkt == bytes(ref)
