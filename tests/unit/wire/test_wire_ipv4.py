"""IPv4 parse/build against scapy, and each receive check (Linux ip_rcv_core)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IPOption_NOP
from shardstack.core.wire import WireError, build_ipv4, ip_to_str, parse_ipv4, str_to_ip
from shardstack.core.wire.checksum import internet_checksum
from shardstack.core.wire.ipv4 import FLAG_DF, header_checksum
from wire_helpers import IP, PROPERTY, int_to_ip, ipv4_int, u8, u16

SRC = str_to_ip("198.18.0.1")
DST = str_to_ip("198.19.255.254")


def reseal(hdr: bytearray, ihl_bytes: int = 20) -> bytearray:
    """Recompute the header checksum after a test edited the header."""
    hdr[10:12] = b"\0\0"
    hdr[10:12] = internet_checksum(hdr[:ihl_bytes]).to_bytes(2, "big")
    return hdr


@PROPERTY
@given(ipv4_int, ipv4_int, u8, u8, u16, st.integers(1, 255), st.booleans(),
       st.integers(0, 10), st.binary(max_size=64), st.binary(max_size=8))
def test_parse_what_scapy_builds(src, dst, proto, tos, ident, ttl, df, nops, payload, pad):
    pkt = IP(src=int_to_ip(src), dst=int_to_ip(dst), proto=proto, tos=tos, id=ident, ttl=ttl,
             flags="DF" if df else 0, options=[IPOption_NOP()] * nops) / payload
    raw = bytes(pkt)
    hdr, body = parse_ipv4(raw + pad)  # link-layer padding after total_len is trimmed
    assert (hdr.src, hdr.dst, hdr.proto, hdr.tos, hdr.ident, hdr.ttl) == \
        (src, dst, proto, tos, ident, ttl)
    assert hdr.flags == (FLAG_DF if df else 0)
    assert hdr.frag_offset == 0
    assert hdr.header_len == IP(raw).ihl * 4 == 20 + (nops + 3) // 4 * 4
    assert hdr.total_len == len(raw)
    assert isinstance(body, memoryview)
    assert bytes(body) == payload


@PROPERTY
@given(ipv4_int, ipv4_int, u8, st.binary(max_size=64), u8, u16, u8, st.booleans())
def test_scapy_parses_what_we_build(src, dst, proto, payload, ttl, ident, tos, df):
    raw = build_ipv4(src, dst, proto, payload, ttl=ttl, ident=ident, tos=tos, df=df)
    pkt = IP(raw)
    assert (pkt.version, pkt.ihl, pkt.len) == (4, 5, 20 + len(payload))
    assert (pkt.src, pkt.dst, pkt.proto, pkt.ttl, pkt.id, pkt.tos) == \
        (int_to_ip(src), int_to_ip(dst), proto, ttl, ident, tos)
    assert int(pkt.flags) == (FLAG_DF if df else 0) and pkt.frag == 0
    assert bytes(pkt.payload) == payload
    # scapy recomputes the checksum from scratch and must agree with ours.
    ref = IP(raw)
    del ref.chksum
    assert bytes(ref) == raw
    assert header_checksum(raw[:10] + b"\0\0" + raw[12:20]) == pkt.chksum


def test_payload_is_a_view_not_a_copy() -> None:
    buf = bytearray(build_ipv4(SRC, DST, 6, b"abcdef"))
    _, body = parse_ipv4(buf)
    buf[20] = ord("X")
    assert bytes(body) == b"Xbcdef"


@pytest.mark.parametrize("mf, offset", [(1, 0), (0, 1), (1, 185), (0, 8191)])
def test_fragments_are_rejected(mf: int, offset: int) -> None:
    raw = bytes(IP(src="198.18.0.1", dst="198.18.0.2", proto=6, flags=mf, frag=offset)
                / (b"x" * 16))
    with pytest.raises(WireError) as err:
        parse_ipv4(raw)
    assert err.value.reason == "fragment"


def test_bad_header_checksum() -> None:
    raw = bytearray(build_ipv4(SRC, DST, 6, b"data"))
    raw[10] ^= 0x40
    with pytest.raises(WireError) as err:
        parse_ipv4(raw)
    assert err.value.reason == "checksum"
    # A changed field under the old checksum fails the same way.
    raw = bytearray(build_ipv4(SRC, DST, 6, b"data"))
    raw[8] -= 1  # TTL
    with pytest.raises(WireError, match="checksum"):
        parse_ipv4(raw)
    # With options the checksum covers them too (the general path).
    raw = bytearray(bytes(IP(src="198.18.0.1", dst="198.18.0.2", options=[IPOption_NOP()] * 4)))
    parse_ipv4(raw)
    raw[21] ^= 0x01  # an option byte
    with pytest.raises(WireError, match="checksum"):
        parse_ipv4(raw)


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ihl_below_five(ihl: int) -> None:
    raw = bytearray(build_ipv4(SRC, DST, 6, b"x" * 40))
    raw[0] = 0x40 | ihl
    with pytest.raises(WireError) as err:
        parse_ipv4(reseal(raw))
    assert err.value.reason == "ihl"


def test_wrong_version() -> None:
    raw = bytearray(build_ipv4(SRC, DST, 6, b"x" * 40))
    raw[0] = 0x65
    with pytest.raises(WireError) as err:
        parse_ipv4(reseal(raw))
    assert err.value.reason == "version"


@pytest.mark.parametrize("total", [0, 19, 23, 24 + 64 + 1, 0xFFFF])
def test_total_len_inconsistent(total: int) -> None:
    raw = bytearray(bytes(IP(src="198.18.0.1", dst="198.18.0.2", options=[IPOption_NOP()] * 4)
                          / (b"y" * 64)))
    raw[2:4] = struct.pack("!H", total)
    with pytest.raises(WireError) as err:
        parse_ipv4(reseal(raw, 24))
    assert err.value.reason == "total_len"


@pytest.mark.parametrize("n", range(20))
def test_truncated_header(n: int) -> None:
    raw = build_ipv4(SRC, DST, 6, b"")
    with pytest.raises(WireError) as err:
        parse_ipv4(raw[:n])
    assert err.value.reason == "truncated"


def test_header_longer_than_buffer() -> None:
    raw = bytearray(build_ipv4(SRC, DST, 6, b""))
    raw[0] = 0x4F  # 60-byte header in a 20-byte packet
    with pytest.raises(WireError):
        parse_ipv4(raw)


def test_trailing_ethernet_padding_trimmed() -> None:
    # A 40-byte SYN-sized packet arrives in a 60-byte minimum Ethernet frame.
    raw = build_ipv4(SRC, DST, 6, b"t" * 20)
    hdr, body = parse_ipv4(raw + b"\0" * 6)
    assert hdr.total_len == 40
    assert bytes(body) == b"t" * 20


def test_build_too_long() -> None:
    with pytest.raises(ValueError):
        build_ipv4(SRC, DST, 6, bytes(0xFFFF - 19))
    assert len(build_ipv4(SRC, DST, 6, bytes(0xFFFF - 20))) == 0xFFFF


@pytest.mark.parametrize("text", ["0.0.0.0", "198.18.0.1", "255.255.255.255", "10.1.2.3"])
def test_address_round_trip(text: str) -> None:
    assert ip_to_str(str_to_ip(text)) == text
    assert str_to_ip(text) == int.from_bytes(bytes(int(p) for p in text.split(".")), "big")


@pytest.mark.parametrize("bad", ["", "1.2.3", "256.0.0.1", "a.b.c.d", "1.2.3.4.5"])
def test_str_to_ip_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        str_to_ip(bad)


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_ip_to_str_rejects(bad: int) -> None:
    with pytest.raises(ValueError):
        ip_to_str(bad)
