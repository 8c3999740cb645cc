"""Ethernet II parse/build against scapy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import WireError, build_ipv4, parse_ipv4, str_to_ip
from shardstack.core.wire.ethernet import (
    BROADCAST_MAC,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_ZLEN,
    build_ethernet,
    mac_to_str,
    parse_ethernet,
    str_to_mac,
)
from wire_helpers import PROPERTY, Ether

macs = st.binary(min_size=6, max_size=6)
ethertypes = st.integers(0x0600, 0xFFFF)


@PROPERTY
@given(macs, macs, ethertypes, st.binary(max_size=100))
def test_parse_what_scapy_builds(dst, src, etype, payload):
    raw = bytes(Ether(dst=mac_to_str(dst), src=mac_to_str(src), type=etype) / payload)
    frame = parse_ethernet(raw)
    assert (frame.dst, frame.src, frame.ethertype) == (dst, src, etype)
    assert isinstance(frame.payload, memoryview) and bytes(frame.payload) == payload


@PROPERTY
@given(macs, macs, ethertypes, st.binary(max_size=100), st.booleans())
def test_scapy_parses_what_we_build(dst, src, etype, payload, pad):
    raw = build_ethernet(dst, src, etype, payload, pad=pad)
    pkt = Ether(raw)
    assert (pkt.dst, pkt.src, pkt.type) == (mac_to_str(dst), mac_to_str(src), etype)
    assert raw[14:14 + len(payload)] == payload
    assert len(raw) == (max(ETH_ZLEN, 14 + len(payload)) if pad else 14 + len(payload))
    assert raw[14 + len(payload):] == bytes(len(raw) - 14 - len(payload))


def test_padding_trimmed_by_ipv4_total_len() -> None:
    ip = build_ipv4(str_to_ip("198.18.0.1"), str_to_ip("198.18.0.2"), 6, b"x" * 20)
    frame = build_ethernet(BROADCAST_MAC, str_to_mac("02:00:00:00:00:01"), ETH_P_IP, ip, pad=True)
    assert len(frame) == ETH_ZLEN
    eth = parse_ethernet(frame)
    assert len(eth.payload) == 46
    hdr, body = parse_ipv4(eth.payload)
    assert hdr.total_len == 40 and bytes(body) == b"x" * 20


@pytest.mark.parametrize("etype", [0, 46, 1500, 0x05FF])
def test_8023_length_field_rejected(etype: int) -> None:
    with pytest.raises(WireError) as err:
        parse_ethernet(bytes(12) + etype.to_bytes(2, "big") + bytes(46))
    assert err.value.reason == "not_ethernet_ii"


def test_truncated() -> None:
    for n in range(14):
        with pytest.raises(WireError) as err:
            parse_ethernet((bytes(12) + b"\x08\x06")[:n])
        assert err.value.reason == "truncated"
    assert parse_ethernet(bytes(12) + b"\x08\x06").ethertype == ETH_P_ARP


def test_mac_strings() -> None:
    assert str_to_mac("02:00:5e:10:00:ff") == bytes.fromhex("02005e1000ff")
    assert str_to_mac("2-0-5e-10-0-ff") == bytes.fromhex("02005e1000ff")
    assert mac_to_str(bytes.fromhex("02005e1000ff")) == "02:00:5e:10:00:ff"
    for bad in ["", "02:00:5e:10:00", "02:00:5e:10:00:ff:01", "02:00:5e:10:00:zz", "020:0:5e:1:0:f"]:
        with pytest.raises(ValueError):
            str_to_mac(bad)
    with pytest.raises(ValueError):
        build_ethernet(b"\x01" * 5, BROADCAST_MAC, ETH_P_IP, b"")
