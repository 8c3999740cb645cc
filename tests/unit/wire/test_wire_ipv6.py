"""IPv6 header and extension headers (RFC 8200): kernel-captured vectors,
round trips against scapy, and every malformed class."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import WireError
from shardstack.core.wire.checksum import (
    complete_partial,
    pseudo_header_sum,
    tcp_checksum,
    verify_tcp_checksum,
)
from shardstack.core.wire.ipv6 import (
    MAX_EXTHDRS,
    NEXTHDR_DEST,
    NEXTHDR_FRAGMENT,
    NEXTHDR_HOP,
    NEXTHDR_ROUTING,
    NEXTHDR_TCP,
    PARAMPROB_HEADER,
    PARAMPROB_NEXTHDR,
    PARAMPROB_OPTION,
    Ipv6ParamProblem,
    build_ipv6,
    ip6_to_str,
    is_v4_mapped,
    parse_ipv6,
    str_to_ip6,
    v4_mapped,
    v4_of_mapped,
)
from shardstack.core.wire.tcp import SYN, parse_tcp
from wire_helpers import PROPERTY, u8

A = str_to_ip6("fd00::1")
B = str_to_ip6("fd00::2")

# Captured on a veth between two namespaces we made (fd00::1 -> fd00::2,
# Linux 6.18): a kernel connect()'s SYN, Ethernet header stripped, sent with
# `ethtool -K va tx off` so the kernel computed the whole checksum.
KERNEL_SYN = bytes.fromhex(
    "600f3a0500280640fd000000000000000000000000000001fd000000000000000000000000000002"
    "bc8410924cbff92200000000a002fd20ae280000020405a00402080acef8c0d1000000000103030a")
# The same with transmit offload on: the field holds the pseudo-header sum the
# device completes (CHECKSUM_PARTIAL, tcp_v6_send_check).
KERNEL_SYN_PARTIAL = bytes.fromhex(
    "600d70af00280640fd000000000000000000000000000001fd000000000000000000000000000002"
    "849c1092ae9491b900000000a002fd20fa320000020405a00402080a159127cc000000000103030a")


def test_kernel_syn_parses_and_its_checksum_verifies() -> None:
    ip, payload = parse_ipv6(KERNEL_SYN)
    assert (ip.src, ip.dst, ip.next_header, ip.hop_limit) == (A, B, NEXTHDR_TCP, 64)
    assert ip.payload_len == 40 and ip.header_len == 40 and ip.flow_label == 0xf3a05
    seg = parse_tcp(payload)
    assert seg.flags == SYN and seg.dst_port == 4242 and seg.options.mss == 1440  # 1500 - 60
    # The IPv6 pseudo-header (RFC 8200 §8.1) sums like IPv4's with 128-bit ints.
    assert verify_tcp_checksum(ip.src, ip.dst, payload)
    zeroed = bytearray(payload)
    zeroed[16:18] = b"\0\0"
    assert tcp_checksum(ip.src, ip.dst, zeroed) == 0xAE28
    assert not verify_tcp_checksum(ip.src, B + 1, payload)


def test_kernel_partial_checksum_is_our_pseudo_header_sum() -> None:
    ip, payload = parse_ipv6(KERNEL_SYN_PARTIAL)
    assert pseudo_header_sum(ip.src, ip.dst, NEXTHDR_TCP, len(payload)) == 0xFA32
    assert payload[16:18] == b"\xfa\x32"
    done = complete_partial(KERNEL_SYN_PARTIAL, 40, 16)
    assert verify_tcp_checksum(ip.src, ip.dst, parse_ipv6(done)[1])


@PROPERTY
@given(st.integers(0, 2**128 - 1), st.integers(0, 2**120 - 1), u8, u8, u8,
       st.integers(0, 0xFFFFF), st.binary(max_size=64))
def test_round_trip_against_scapy(src: int, dst: int, nh: int, hlim: int, tc: int, fl: int,
                                  payload: bytes) -> None:
    from scapy.layers.inet6 import IPv6

    src &= ~(0xFF << 120)  # not multicast
    if nh in (NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_DEST, NEXTHDR_FRAGMENT):
        nh = 59
    pkt = build_ipv6(src, dst, nh, payload, hop_limit=hlim, traffic_class=tc, flow_label=fl)
    ref = IPv6(src=ip6_to_str(src), dst=ip6_to_str(dst), nh=nh, hlim=hlim, tc=tc, fl=fl) / payload
    assert pkt == bytes(ref)
    ip, body = parse_ipv6(pkt + b"pad")  # link padding is trimmed
    assert (ip.src, ip.dst, ip.next_header, ip.hop_limit, ip.traffic_class, ip.flow_label) == (
        src, dst, nh, hlim, tc, fl)
    assert bytes(body) == payload


def test_every_truncation_raises_wire_error() -> None:
    for cut in range(len(KERNEL_SYN)):
        with pytest.raises(WireError) as e:
            parse_ipv6(KERNEL_SYN[:cut])
        assert e.value.reason in ("truncated", "payload_len")


def test_bad_version_and_payload_length() -> None:
    with pytest.raises(WireError, match="version"):
        parse_ipv6(b"\x40" + KERNEL_SYN[1:])
    long = bytearray(KERNEL_SYN)
    long[4:6] = (41).to_bytes(2, "big")
    with pytest.raises(WireError, match="payload_len"):
        parse_ipv6(long)
    short = bytearray(KERNEL_SYN)
    short[4:6] = (20).to_bytes(2, "big")  # the rest is link padding
    ip, body = parse_ipv6(short)
    assert len(body) == 20


def test_multicast_source_refused() -> None:
    with pytest.raises(WireError, match="src_multicast"):
        parse_ipv6(build_ipv6(str_to_ip6("ff02::1"), B, NEXTHDR_TCP, b""))


def _ext(nh: int, body: bytes = b"\x01\x04\0\0\0\0") -> bytes:
    """An extension header of 8 bytes (PadN filling it by default)."""
    assert (len(body) + 2) % 8 == 0
    return bytes((nh, (len(body) + 2) // 8 - 1)) + body


def test_extension_headers_skipped() -> None:
    tcp = bytes(range(20))
    chain = _ext(NEXTHDR_DEST) + _ext(NEXTHDR_ROUTING) + bytes((NEXTHDR_TCP, 0, 0, 0, 0, 0, 0, 0))
    # hop-by-hop -> destination options -> routing (segments left 0) -> TCP
    pkt = build_ipv6(A, B, NEXTHDR_HOP, chain + tcp)
    ip, body = parse_ipv6(pkt)
    assert ip.next_header == NEXTHDR_TCP and bytes(body) == tcp
    assert ip.header_len == 40 + 24 and ip.nexthdr_off == 40 + 16


def test_against_scapy_extension_headers() -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

    ref = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrRouting(segleft=0) / UDP(sport=1, dport=2) / b"hi")
    ip, body = parse_ipv6(ref)
    assert ip.next_header == 17 and bytes(body[8:]) == b"hi"


# The expectations below about what Linux answers were observed on Linux 6.18:
# packets injected with AF_PACKET on a veth into a namespace we made (fd00::/64),
# the replies captured there (ICMPv6 type/code/pointer, or the RST to our SYN).


def test_fragments_dropped_and_atomic_fragments_processed() -> None:
    frag = bytes((NEXTHDR_TCP, 0, 0, 1, 0, 0, 0, 7))  # offset 0, M set
    with pytest.raises(WireError) as e:
        parse_ipv6(build_ipv6(A, B, NEXTHDR_FRAGMENT, frag + bytes(24)))
    assert e.value.reason == "fragment" and not isinstance(e.value, Ipv6ParamProblem)
    later = bytes((NEXTHDR_TCP, 0, 0, 8, 0, 0, 0, 7))  # offset 8, last
    with pytest.raises(WireError, match="fragment"):
        parse_ipv6(build_ipv6(A, B, NEXTHDR_FRAGMENT, later + bytes(20)))
    # Not the last fragment and not a multiple of 8 bytes: Linux's
    # ipv6_frag_rcv answers Parameter Problem code 0 at Payload Length.
    with pytest.raises(Ipv6ParamProblem) as pp:
        parse_ipv6(build_ipv6(A, B, NEXTHDR_FRAGMENT, frag + bytes(21)))
    assert (pp.value.code, pp.value.pointer) == (PARAMPROB_HEADER, 4)
    # An atomic fragment (offset 0, M clear) is processed alone (RFC 6946 §4).
    atomic = bytes((NEXTHDR_TCP, 0, 0, 0, 0, 0, 0, 7))
    ip, body = parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, _ext(NEXTHDR_FRAGMENT) + atomic
                                     + bytes(20)))
    assert ip.next_header == NEXTHDR_TCP and len(body) == 20 and ip.header_len == 56


def test_routing_header_with_segments_left_is_a_parameter_problem() -> None:
    rh = bytes((NEXTHDR_TCP, 0, 0, 1, 0, 0, 0, 0))  # type 0, segments left 1
    with pytest.raises(Ipv6ParamProblem) as e:
        parse_ipv6(build_ipv6(A, B, NEXTHDR_ROUTING, rh + bytes(20)))
    assert (e.value.code, e.value.pointer) == (PARAMPROB_HEADER, 42)  # the Routing Type


def test_hop_by_hop_not_first_is_an_unknown_next_header() -> None:
    pkt = build_ipv6(A, B, NEXTHDR_DEST, _ext(NEXTHDR_HOP) + _ext(NEXTHDR_TCP) + bytes(20))
    with pytest.raises(Ipv6ParamProblem) as e:
        parse_ipv6(pkt)
    assert (e.value.code, e.value.pointer) == (PARAMPROB_NEXTHDR, 40)


@pytest.mark.parametrize(("otype", "icmp", "unless_mc"), [
    (0x3E, False, False),  # 00: skipped
    (0x7E, None, False),  # 01: discarded silently
    (0xBE, True, False),  # 10: Parameter Problem code 2
    (0xFE, True, True),  # 11: the same unless sent to multicast
])
def test_unknown_option_actions(otype: int, icmp: bool | None, unless_mc: bool) -> None:
    pkt = build_ipv6(A, B, NEXTHDR_DEST, bytes((NEXTHDR_TCP, 0, otype, 2, 0, 0, 1, 0)) + bytes(20))
    if icmp is False:
        assert parse_ipv6(pkt)[0].next_header == NEXTHDR_TCP
        return
    with pytest.raises(WireError) as e:
        parse_ipv6(pkt)
    if icmp is None:
        assert not isinstance(e.value, Ipv6ParamProblem)
        assert e.value.reason == "exthdr_option_discard"
    else:
        assert isinstance(e.value, Ipv6ParamProblem)
        assert (e.value.code, e.value.pointer, e.value.unless_multicast) == (
            PARAMPROB_OPTION, 42, unless_mc)


@pytest.mark.parametrize("opts", [
    bytes((1, 9, 0, 0, 0, 0)),  # PadN past the header
    bytes((0x3E, 5, 0, 0, 0, 0)),  # an option past the header
    bytes((1, 4, 0, 1, 0, 0)),  # PadN with non-zero contents
    bytes((0, 0, 0, 0, 0, 0)) + bytes((1, 6)) + bytes(6),  # 14 bytes of padding in a row
])
def test_bad_options_are_dropped_silently(opts: bytes) -> None:
    """Linux's ip6_parse_tlv ``bad`` label: dropped, no ICMPv6."""
    body = bytes((NEXTHDR_TCP, (len(opts) + 2) // 8 - 1)) + opts
    with pytest.raises(WireError) as e:
        parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, body + bytes(20)))
    assert not isinstance(e.value, Ipv6ParamProblem)
    assert e.value.reason in ("exthdr_option_len", "exthdr_padding")


def test_padding_up_to_seven_bytes_is_fine() -> None:
    pad1s = bytes((NEXTHDR_TCP, 0, 0, 0, 0, 0, 0, 0))  # six Pad1
    assert parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, pad1s))[0].next_header == NEXTHDR_TCP


def test_extension_header_overrunning_the_packet() -> None:
    pkt = build_ipv6(A, B, NEXTHDR_DEST, bytes((NEXTHDR_TCP, 3, 1, 4, 0, 0, 0, 0)) + bytes(8))
    with pytest.raises(WireError, match="exthdr_truncated"):
        parse_ipv6(pkt)
    with pytest.raises(WireError, match="exthdr_truncated"):
        parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, bytes(4)))


def test_long_chains_are_bounded() -> None:
    ok = b"".join(_ext(NEXTHDR_DEST) for _ in range(MAX_EXTHDRS - 1)) + _ext(NEXTHDR_TCP)
    assert parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, ok))[0].next_header == NEXTHDR_TCP
    # 8000 empty destination-options headers in one 64 KiB packet: refused
    # after MAX_EXTHDRS steps, not walked.
    many = _ext(NEXTHDR_DEST) * 8000
    with pytest.raises(WireError, match="exthdr_chain"):
        parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, many))


def test_too_many_options_in_one_header() -> None:
    opts = bytes((0x3E, 0)) * 9  # nine skippable options (Linux's limit is 8)
    body = bytes((NEXTHDR_TCP, 2)) + opts + bytes(22 - len(opts) - 2 + 2)
    assert len(body) == 24
    with pytest.raises(WireError, match="exthdr_too_many_options"):
        parse_ipv6(build_ipv6(A, B, NEXTHDR_DEST, body))


def test_address_helpers() -> None:
    assert ip6_to_str(A) == "fd00::1" and str_to_ip6("2001:db8::1") == 0x20010DB8 << 96 | 1
    m = v4_mapped(0xC6120001)
    assert ip6_to_str(m) == "::ffff:198.18.0.1"
    assert is_v4_mapped(m) and not is_v4_mapped(A) and v4_of_mapped(m) == 0xC6120001
    with pytest.raises(ValueError):
        str_to_ip6("198.18.0.1")
