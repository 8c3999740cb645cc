"""ICMP echo and destination-unreachable against scapy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import WireError, build_ipv4, parse_ipv4, str_to_ip
from shardstack.core.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMP_FRAG_NEEDED,
    ICMP_PORT_UNREACH,
    build_dest_unreachable,
    build_echo_reply,
    build_echo_request,
    build_icmp,
    echo_reply_for,
    echo_reply_ipv4,
    parse_icmp,
)
from wire_helpers import ICMP, IP, PROPERTY, int_to_ip, ipv4_int, u8, u16

SRC = str_to_ip("198.18.0.1")
DST = str_to_ip("198.18.0.2")


@PROPERTY
@given(u8, u8, u16, u16, st.binary(max_size=100))
def test_parse_what_scapy_builds(itype, code, ident, seq, payload):
    raw = bytes(ICMP(type=itype, code=code, id=ident, seq=seq) / payload)
    msg = parse_icmp(raw)
    if itype in (ICMP_ECHO, ICMP_ECHO_REPLY):
        assert (msg.ident, msg.seq) == (ident, seq)
    # scapy lays other types' rest-of-header out by type: compare the bytes.
    assert (msg.type, msg.code) == (itype, code)
    assert msg.ident.to_bytes(2, "big") + msg.seq.to_bytes(2, "big") == raw[4:8]
    assert isinstance(msg.payload, memoryview) and bytes(msg.payload) == raw[8:]
    if itype in (ICMP_ECHO, ICMP_ECHO_REPLY):
        assert bytes(msg.payload) == payload


# Echo-shaped types only: scapy dissects other types (e.g. 17, address mask) with fields of
# their own and fails on an empty body, which says nothing about our builder.
ECHO_TYPES = st.sampled_from([0, 8])


@PROPERTY
@given(ECHO_TYPES, u8, u16, u16, st.binary(max_size=100))
def test_scapy_parses_what_we_build(itype, code, ident, seq, payload):
    raw = build_icmp(itype, code, ident, seq, payload)
    pkt = ICMP(raw)
    assert (pkt.type, pkt.code) == (itype, code)
    assert bytes(pkt)[4:8] == ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
    ref = ICMP(raw)
    del ref.chksum
    assert bytes(ref) == raw  # scapy's checksum equals ours


@PROPERTY
@given(ipv4_int, ipv4_int, u16, u16, u8, st.binary(max_size=100))
def test_echo_reply_from_scapy_request(src, dst, ident, seq, tos, payload):
    request = bytes(IP(src=int_to_ip(src), dst=int_to_ip(dst), tos=tos)
                    / ICMP(type=8, id=ident, seq=seq) / payload)
    hdr, body = parse_ipv4(request)
    reply = IP(echo_reply_ipv4(hdr, parse_icmp(body), ttl=61, ident=7))
    assert (reply.src, reply.dst, reply.tos, reply.ttl, reply.id, reply.proto) == \
        (int_to_ip(dst), int_to_ip(src), tos, 61, 7, 1)
    icmp = reply[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, ident, seq)
    assert bytes(icmp.payload) == payload
    ref = IP(bytes(reply))
    del ref.chksum
    del ref[ICMP].chksum
    assert bytes(ref) == bytes(reply)


def test_echo_builders() -> None:
    req = parse_icmp(build_echo_request(0x1234, 9, b"ping"))
    assert (req.type, req.code, req.ident, req.seq, bytes(req.payload)) == \
        (ICMP_ECHO, 0, 0x1234, 9, b"ping")
    assert echo_reply_for(req) == build_echo_reply(0x1234, 9, b"ping")
    rep = parse_icmp(echo_reply_for(req))
    assert (rep.type, rep.ident, rep.seq, bytes(rep.payload)) == (ICMP_ECHO_REPLY, 0x1234, 9, b"ping")
    with pytest.raises(ValueError):
        echo_reply_for(rep)


def test_bad_checksum_and_truncation() -> None:
    raw = bytearray(build_echo_request(1, 2, b"abc"))
    raw[-1] ^= 0x10
    with pytest.raises(WireError) as err:
        parse_icmp(raw)
    assert err.value.reason == "checksum"
    with pytest.raises(WireError) as err:
        parse_icmp(bytes(8))  # all-zero: its sum is 0, never a valid checksum
    assert err.value.reason == "checksum"
    for n in range(8):
        with pytest.raises(WireError) as err:
            parse_icmp(build_echo_request(1, 2)[:n])
        assert err.value.reason == "truncated"


def test_dest_unreachable_quotes_the_original() -> None:
    original = build_ipv4(SRC, DST, 17, b"u" * 1000)
    msg = build_dest_unreachable(ICMP_PORT_UNREACH, original)
    assert 20 + len(msg) == 576  # RFC 1812 §4.3.2.3
    pkt = ICMP(msg)
    assert (pkt.type, pkt.code) == (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
    assert bytes(pkt.payload)[:20] == original[:20]
    parsed = parse_icmp(msg)
    assert bytes(parsed.payload) == original[:548]
    short = build_ipv4(SRC, DST, 17, b"12345678")
    assert bytes(parse_icmp(build_dest_unreachable(3, short)).payload) == short
    frag = parse_icmp(build_dest_unreachable(ICMP_FRAG_NEEDED, short, next_hop_mtu=1400))
    assert (frag.ident, frag.seq) == (0, 1400)
    assert ICMP(build_dest_unreachable(ICMP_FRAG_NEEDED, short, 1400)).nexthopmtu == 1400
