"""netio's IPv6: the Dispatcher steers TCP/UDP over IPv6 by the 36-byte
Toeplitz tuple, answers ICMPv6 echo (TUN and Ethernet), runs NDP on Ethernet
(RFC 4861: NS for us answered and its sender learned, NA resolving an
INCOMPLETE entry, a DAD probe of our address defended), and counts bad input
under a DropReason. Packets are built and read back by scapy (an independent
implementation of the formats)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.layers.l2 import Ether
from shardstack.core.dropreason import DropReason
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.neighbour import NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE
from shardstack.netio.process import (
    decode_neigh_entries,
    encode_neigh_request,
    encode_neighbour,
    is_ip6,
)
from shardstack.netio.rss import flow_to_worker6, make_reta

US, PEER = "2001:db8:1::2", "2001:db8:1::1"
US_I, PEER_I = int(ipaddress.IPv6Address(US)), int(ipaddress.IPv6Address(PEER))
MAC = bytes.fromhex("020000000002")
PEER_MAC = "02:00:00:00:00:01"
SNM_US = "ff02::1:ff00:2"  # our solicited-node group


def tcp6(sport: int, dport: int = 80, src: str = PEER, dst: str = US) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def eth(pkt, dst: str = "02:00:00:00:00:02") -> bytes:
    return bytes(Ether(src=PEER_MAC, dst=dst, type=0x86DD)) + bytes(pkt)


def l2(n: int = 1) -> Dispatcher:
    return Dispatcher(n, [], l2=True, mac=MAC, addrs6=[US_I])


@pytest.mark.parametrize("layer2", [False, True])
def test_tcp_and_udp_over_ipv6_steered_by_their_tuple(layer2):
    d = Dispatcher(4, [0xC6120002], l2=layer2, mac=MAC if layer2 else None, addrs6=[US_I])
    reta = make_reta(4)
    frames = [tcp6(p) for p in range(40000, 40100)]
    frames.append(bytes(IPv6(src=PEER, dst=US) / UDP(sport=5353, dport=53) / b"q"))
    # an extension header before TCP: walked, the ports still found
    frames.append(bytes(IPv6(src=PEER, dst=US) / IPv6ExtHdrDestOpt() / TCP(sport=999, dport=80)))
    out = d.dispatch([(eth(f) if layer2 else f, 0) for f in frames])
    got = {}
    for w, fs in enumerate(out.frames):
        for f in fs:
            p = IPv6(bytes(f)[14:] if layer2 else bytes(f))
            l4 = p[TCP] if TCP in p else p[UDP]
            got[(l4.sport, l4.dport)] = w
    assert len(got) == 102
    for (sport, dport), w in got.items():
        assert flow_to_worker6(PEER_I, US_I, sport, dport, reta) == w
    assert len(set(got.values())) == 4
    assert d.stats.tcp == 101 and d.stats.udp == 1 and d.stats.ipv6 == 102
    assert out.replies == []


def test_echo_request_answered_on_tun_and_ethernet():
    req = IPv6(src=PEER, dst=US, hlim=64) / ICMPv6EchoRequest(id=0x1234, seq=7, data=b"ping6")
    d = Dispatcher(2, [], addrs6=[US_I])
    out = d.dispatch([(bytes(req), 0)])
    [reply] = out.replies
    p = IPv6(reply)
    assert p.src == US and p.dst == PEER and ICMPv6EchoReply in p
    e = p[ICMPv6EchoReply]
    assert (e.id, e.seq, bytes(e.data)) == (0x1234, 7, b"ping6")
    cs = e.cksum
    del e.cksum  # scapy recomputes it: ours must agree
    assert IPv6(bytes(p))[ICMPv6EchoReply].cksum == cs
    assert d.stats.icmp_replies == 1
    d2 = l2()
    [reply] = d2.dispatch([(eth(req), 0)]).replies
    f = Ether(reply)
    assert f.dst == PEER_MAC and f.src == "02:00:00:00:00:02" and f.type == 0x86DD
    assert f[ICMPv6EchoReply].seq == 7


def test_neighbour_solicitation_answered_and_sender_learned():
    d = l2()
    d.now = 10.0
    ns = IPv6(src=PEER, dst=SNM_US, hlim=255) / ICMPv6ND_NS(tgt=US) / \
        ICMPv6NDOptSrcLLAddr(lladdr=PEER_MAC)
    out = d.dispatch([(eth(ns, dst="33:33:ff:00:00:02"), 0)])
    [reply] = out.replies
    f = Ether(reply)
    assert f.dst == PEER_MAC and f.type == 0x86DD
    na = f[ICMPv6ND_NA]
    assert f[IPv6].src == US and f[IPv6].dst == PEER and f[IPv6].hlim == 255
    assert na.tgt == US and na.S == 1 and na.O == 1 and na.R == 0
    assert f[ICMPv6NDOptDstLLAddr].lladdr == "02:00:00:00:00:02"
    n = d.neigh6.lookup(PEER_I)
    assert n is not None and n.state == NUD_STALE and n.mac == bytes.fromhex("020000000001")
    assert d.stats.ndisc_na_sent == 1
    # an NS for an address not ours: no answer, counted (to another group:
    # not even for us)
    other = IPv6(src=PEER, dst=US, hlim=255) / ICMPv6ND_NS(tgt="2001:db8:1::9")
    assert d.dispatch([(eth(other), 0)]).replies == []
    assert d.stats.drops[DropReason.IPV6_NDISC_NS_OTHERHOST] == 1
    group = IPv6(src=PEER, dst="ff02::1:ff00:9", hlim=255) / ICMPv6ND_NS(tgt="2001:db8:1::9")
    assert d.dispatch([(eth(group, dst="33:33:ff:00:00:09"), 0)]).replies == []
    assert d.stats.drops[DropReason.IP_OTHERHOST] == 1


def test_resolution_ns_out_na_in_reachable():
    d = l2()
    d.now = 1.0
    assert d.neigh6.neigh_event_send(PEER_I, 1.0) == NUD_INCOMPLETE
    [probe] = d.neigh6.take_probes()
    f = Ether(d.neigh_solicit(probe.ip, probe.mac))
    # RFC 4861 §7.2.2: to the solicited-node group, with our link-layer address
    assert f.dst == "33:33:ff:00:00:01" and f[IPv6].dst == "ff02::1:ff00:1"
    assert f[IPv6].src == US and f[IPv6].hlim == 255 and f[ICMPv6ND_NS].tgt == PEER
    assert f[ICMPv6NDOptSrcLLAddr].lladdr == "02:00:00:00:00:02"
    # the solicited answer makes the entry REACHABLE; an unsolicited one for a
    # stranger creates nothing
    na = IPv6(src=PEER, dst=US, hlim=255) / ICMPv6ND_NA(tgt=PEER, S=1, O=1) / \
        ICMPv6NDOptDstLLAddr(lladdr=PEER_MAC)
    stranger = IPv6(src="2001:db8:1::7", dst="ff02::1", hlim=255) / \
        ICMPv6ND_NA(tgt="2001:db8:1::7", S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=PEER_MAC)
    d.dispatch([(eth(na), 0), (eth(stranger, dst="33:33:00:00:00:01"), 0)])
    n = d.neigh6.lookup(PEER_I)
    assert n.state == NUD_REACHABLE and n.mac == bytes.fromhex("020000000001")
    assert d.neigh6.lookup(int(ipaddress.IPv6Address("2001:db8:1::7"))) is None
    assert d.stats.ndisc_learned == 1
    assert d.neigh6.take_changes() == [(PEER_I, n.mac, NUD_REACHABLE)]
    # a unicast probe (PROBE state) goes to the cached MAC, to the address itself
    u = Ether(d.neigh_solicit(PEER_I, n.mac))
    assert u.dst == PEER_MAC and u[IPv6].dst == PEER


def test_na_without_override_does_not_move_a_reachable_entry():
    d = l2()
    d.neigh6.neigh_event_send(PEER_I, 1.0)
    d.neigh6.ndisc_recv_na(PEER_I, bytes.fromhex("020000000001"), True, True, 1.0)
    moved = d.neigh6.ndisc_recv_na(PEER_I, bytes.fromhex("0200000000ee"), False, False, 2.0)
    n = d.neigh6.lookup(PEER_I)
    # RFC 4861 §7.2.5: the address stays, the entry turns STALE
    assert not moved and n.mac == bytes.fromhex("020000000001") and n.state == NUD_STALE


def test_duplicate_address_probe_of_ours_is_defended():
    d = l2()
    dad = IPv6(src="::", dst=SNM_US, hlim=255) / ICMPv6ND_NS(tgt=US)
    [reply] = d.dispatch([(eth(dad, dst="33:33:ff:00:00:02"), 0)]).replies
    f = Ether(reply)
    # RFC 4861 §7.2.4: to all-nodes, Solicited clear
    assert f.dst == "33:33:00:00:00:01" and f[IPv6].dst == "ff02::1"
    assert f[ICMPv6ND_NA].S == 0 and f[ICMPv6ND_NA].O == 1 and f[ICMPv6ND_NA].tgt == US
    assert len(d.neigh6) == 0


def _drops(d: Dispatcher, frame: bytes) -> list[DropReason]:
    before = dict(d.stats.drops)
    out = d.dispatch([(frame, 0)])
    assert out.replies == [] and not any(out.frames)
    return [r for r, k in d.stats.drops.items() if k != before.get(r, 0)]


def test_bad_ipv6_input_dropped_with_a_reason():
    d = l2()
    ns = IPv6(src=PEER, dst=SNM_US, hlim=255) / ICMPv6ND_NS(tgt=US)
    assert _drops(d, eth(IPv6(src=PEER, dst=SNM_US, hlim=64) / ICMPv6ND_NS(tgt=US),
                         dst="33:33:ff:00:00:02")) == [DropReason.IPV6_NDISC_HOP_LIMIT]
    bad = bytearray(eth(ns, dst="33:33:ff:00:00:02"))
    bad[-1] ^= 0xFF  # the ICMPv6 checksum no longer matches
    assert _drops(d, bytes(bad)) == [DropReason.ICMP_CSUM]
    assert _drops(d, eth(tcp6(1, dst="2001:db8:1::99"))) == [DropReason.IP_OTHERHOST]
    assert _drops(d, eth(tcp6(1))[:30]) == [DropReason.IP_HDR]  # truncated header
    assert _drops(d, eth(IPv6(src=PEER, dst=US, nh=132) / (b"x" * 8))) == [DropReason.IP_NOPROTO]
    # on a TUN there is no NDP
    tun = Dispatcher(1, [], addrs6=[US_I])
    assert _drops(tun, bytes(ns)) == [DropReason.ICMP_TYPE]


def test_neighbour_messages_carry_ipv6_addresses():
    assert is_ip6(PEER_I) and not is_ip6(0xC6120001)
    assert len(encode_neigh_request(0x52, PEER_I)) == 17
    assert len(encode_neigh_request(0x52, 0xC6120001)) == 5
    mac = bytes.fromhex("020000000001")
    parts = [b"", encode_neighbour(PEER_I, mac, NUD_STALE), encode_neighbour(0xC6120001, mac)]
    assert decode_neigh_entries(parts) == [(PEER_I, mac, NUD_STALE),
                                           (0xC6120001, mac, NUD_REACHABLE)]


@pytest.mark.parametrize("layer2", [False, True])
def test_ipv6_frames_keep_their_checksum_flags(layer2):
    """The device's checksum state goes with an IPv6 frame to its worker (a
    veth's CHECKSUM_PARTIAL frame has only the pseudo-header sum in it: the
    worker must not verify it)."""
    from shardstack.netio.device import RX_CSUM_VALID

    d = Dispatcher(2, [], l2=layer2, mac=MAC if layer2 else None, addrs6=[US_I])
    frames = [(eth(tcp6(p)) if layer2 else tcp6(p), RX_CSUM_VALID * (p % 2))
              for p in range(40000, 40040)]
    out = d.dispatch(frames)
    for fs, fl in zip(out.frames, out.flags, strict=True):
        for f, flag in zip(fs, fl, strict=True):
            sport = int.from_bytes(f[(54 if layer2 else 40):][:2], "big")
            assert flag == RX_CSUM_VALID * (sport % 2)
    assert sum(len(fs) for fs in out.frames) == 40


@given(st.binary(max_size=120), st.booleans(), st.integers(0, 255))
@settings(max_examples=400, deadline=None)
def test_ipv6_garbage_never_raises(data, layer2, nh):
    """Anything after a version-6 nibble (and any next header) is steered,
    answered or dropped under a reason, never raised (an IPv6 stack's netio)."""
    body = bytearray(b"\x60" + data)
    if len(body) > 6:
        body[6] = nh
    if len(body) >= 40:
        body[24:40] = US_I.to_bytes(16, "big")  # to us: past the address check
    d = l2(3) if layer2 else Dispatcher(3, [], addrs6=[US_I])
    frame = eth(bytes(body)) if layer2 else bytes(body)
    out = d.dispatch([(frame, 0)])
    handled = sum(len(f) for f in out.frames) + len(out.replies) + sum(d.stats.drops.values())
    assert handled == 1
