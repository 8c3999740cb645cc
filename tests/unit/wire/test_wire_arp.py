"""ARP (IPv4 over Ethernet) parse/build against scapy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardstack.core.wire import WireError, mac_to_str, parse_ethernet, str_to_ip, str_to_mac
from shardstack.core.wire.arp import (
    ARP_LEN,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    build_arp,
    build_arp_reply,
    build_arp_request,
    parse_arp,
)
from wire_helpers import ARP, PROPERTY, Ether, int_to_ip, ipv4_int

macs = st.binary(min_size=6, max_size=6)
ops = st.sampled_from([ARPOP_REQUEST, ARPOP_REPLY])

MY_MAC = str_to_mac("02:00:00:00:00:01")
PEER_MAC = str_to_mac("02:00:00:00:00:02")


@PROPERTY
@given(ops, macs, ipv4_int, macs, ipv4_int, st.binary(max_size=18))
def test_parse_what_scapy_builds(op, sha, spa, tha, tpa, pad):
    raw = bytes(ARP(op=op, hwsrc=mac_to_str(sha), psrc=int_to_ip(spa), hwdst=mac_to_str(tha),
                    pdst=int_to_ip(tpa)))
    assert len(raw) == ARP_LEN
    assert parse_arp(raw + pad) == (op, sha, spa, tha, tpa)


@PROPERTY
@given(ops, macs, ipv4_int, macs, ipv4_int)
def test_scapy_parses_what_we_build(op, sha, spa, tha, tpa):
    pkt = ARP(build_arp(op, sha, spa, tha, tpa))
    assert (pkt.hwtype, pkt.ptype, pkt.hwlen, pkt.plen) == (1, 0x0800, 6, 4)
    assert (pkt.op, pkt.hwsrc, pkt.psrc, pkt.hwdst, pkt.pdst) == \
        (op, mac_to_str(sha), int_to_ip(spa), mac_to_str(tha), int_to_ip(tpa))


def test_request_and_reply_from_a_scapy_frame() -> None:
    frame = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_to_str(PEER_MAC))
                  / ARP(op=1, hwsrc=mac_to_str(PEER_MAC), psrc="198.18.0.2", pdst="198.18.0.1"))
    eth = parse_ethernet(frame)
    assert eth.ethertype == 0x0806 and len(frame) == 42
    req = parse_arp(eth.payload)
    assert req.op == ARPOP_REQUEST and req.target_ip == str_to_ip("198.18.0.1")
    reply = ARP(build_arp_reply(req, MY_MAC))
    assert (reply.op, reply.hwsrc, reply.psrc, reply.hwdst, reply.pdst) == \
        (2, mac_to_str(MY_MAC), "198.18.0.1", mac_to_str(PEER_MAC), "198.18.0.2")
    with pytest.raises(ValueError):
        build_arp_reply(parse_arp(bytes(reply)), MY_MAC)
    ours = ARP(build_arp_request(MY_MAC, str_to_ip("198.18.0.1"), str_to_ip("198.18.0.2")))
    assert (ours.op, ours.hwdst, ours.pdst) == (1, "00:00:00:00:00:00", "198.18.0.2")


@pytest.mark.parametrize("field, value, reason", [
    ("htype", 6, "hardware_type"),
    ("ptype", 0x86DD, "protocol_type"),
    ("hlen", 8, "address_len"),
    ("plen", 16, "address_len"),
    ("op", 3, "op"),
    ("op", 0, "op"),
])
def test_rejects_other_shapes(field: str, value: int, reason: str) -> None:
    fields = dict(htype=1, ptype=0x0800, hlen=6, plen=4, op=1)
    fields[field] = value
    raw = struct.pack("!HHBBH", *fields.values()) + bytes(20)
    with pytest.raises(WireError) as err:
        parse_arp(raw)
    assert err.value.reason == reason


def test_truncated() -> None:
    raw = build_arp_request(MY_MAC, 1, 2)
    for n in range(ARP_LEN):
        with pytest.raises(WireError) as err:
            parse_arp(raw[:n])
        assert err.value.reason == "truncated"
    with pytest.raises(ValueError):
        build_arp(1, b"\0" * 5, 1, MY_MAC, 2)
