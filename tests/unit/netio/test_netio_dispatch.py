"""Dispatcher: steering TCP by symmetric Toeplitz + RETA, ARP/ICMP answers, named drops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from shardstack.core.dropreason import DropReason
from shardstack.core.wire.tcp import build_tcp_ipv4
from shardstack.netio.device import RX_CSUM_VALID
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.rss import flow_to_worker, make_reta

US, PEER = "198.18.0.2", "198.18.0.1"
US_I, PEER_I = 0xC6120002, 0xC6120001
MAC = bytes.fromhex("020000000002")
PEER_MAC = "02:00:00:00:00:01"


def tcp(sport: int, dport: int = 80, src: str = PEER, dst: str = US, **kw) -> bytes:
    return bytes(IP(src=src, dst=dst, **kw) / TCP(sport=sport, dport=dport, flags="S"))


def test_tcp_grouped_by_flow_hash():
    d = Dispatcher(4, [US_I])
    reta = make_reta(4)
    batch = [(tcp(p), RX_CSUM_VALID if p % 2 else 0) for p in range(40000, 40200)]
    out = d.dispatch(batch)
    assert sum(len(f) for f in out.frames) == 200
    for w in range(4):
        assert len(out.frames[w]) == len(out.flags[w])
        for frame, fl in zip(out.frames[w], out.flags[w], strict=True):
            sport = int.from_bytes(frame[20:22], "big")
            assert flow_to_worker(PEER_I, US_I, sport, 80, reta=reta) == w
            assert fl == (RX_CSUM_VALID if sport % 2 else 0)
    assert all(len(f) > 20 for f in out.frames)  # spread over all 4 workers
    assert d.stats.tcp == 200 and sum(d.stats.per_worker) == 200
    assert out.replies == []


def test_order_within_a_flow_preserved():
    d = Dispatcher(2, [US_I])
    batch = [(build_tcp_ipv4(PEER_I, US_I, 5555, 80, i, 0, 0x10, 100), 0) for i in range(50)]
    out = d.dispatch(batch)
    [frames] = [f for f in out.frames if f]
    assert [int.from_bytes(f[24:28], "big") for f in frames] == list(range(50))


@given(st.integers(1024, 65535), st.integers(1, 65535), st.integers(1, 8))
@settings(max_examples=50)
def test_both_directions_same_worker(sport, dport, n):
    d = Dispatcher(n, [US_I, PEER_I])
    out = d.dispatch([(tcp(sport, dport), 0), (tcp(dport, sport, src=US, dst=PEER), 0)])
    assert sorted(len(f) for f in out.frames)[-1] == 2


def test_ip_options_and_l2_offsets():
    d = Dispatcher(3, [US_I])
    plain = tcp(41000)
    with_opts = bytes(IP(src=PEER, dst=US, options=b"\x01\x01\x01\x00") / TCP(sport=41000, dport=80))
    out = d.dispatch([(plain, 0), (with_opts, 0)])
    assert [len(f) for f in out.frames if f] == [2]  # same flow, same worker
    d2 = Dispatcher(3, [US_I], l2=True, mac=MAC)
    eth = bytes(Ether(src=PEER_MAC, dst="02:00:00:00:00:02") / IP(src=PEER, dst=US) / TCP(sport=41000))
    out2 = d2.dispatch([(eth, 0)])
    w = [i for i, f in enumerate(out.frames) if f][0]
    assert out2.frames[w] == [eth]


def test_icmp_echo_reply_l3():
    d = Dispatcher(2, [US_I])
    req = IP(src=PEER, dst=US, id=7) / ICMP(type=8, id=0x1234, seq=3) / Raw(b"ping-payload")
    out = d.dispatch([(bytes(req), 0)])
    [reply] = out.replies
    r = IP(reply)
    assert (r.src, r.dst) == (US, PEER)
    assert r[ICMP].type == 0 and (r[ICMP].id, r[ICMP].seq) == (0x1234, 3)
    assert bytes(r[ICMP].payload) == b"ping-payload"
    # scapy recomputes both checksums: they must match ours
    again = IP(reply)
    del again.chksum
    del again[ICMP].chksum
    assert bytes(IP(bytes(again))) == reply
    assert d.stats.icmp_replies == 1


def test_icmp_echo_reply_l2():
    d = Dispatcher(1, [US_I], l2=True, mac=MAC)
    req = Ether(src=PEER_MAC, dst="02:00:00:00:00:02") / IP(src=PEER, dst=US) / ICMP(seq=9)
    [reply] = d.dispatch([(bytes(req), 0)]).replies
    e = Ether(reply)
    assert (e.dst, e.src) == (PEER_MAC, "02:00:00:00:00:02")
    assert e[ICMP].type == 0 and e[ICMP].seq == 9 and e[IP].dst == PEER


def test_arp_request_answered_and_sender_learned():
    d = Dispatcher(1, [US_I], l2=True, mac=MAC)
    req = Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=PEER_MAC, psrc=PEER, pdst=US
    )
    [reply] = d.dispatch([(bytes(req), 0)]).replies
    assert len(reply) == 60
    e = Ether(reply)
    assert e.dst == PEER_MAC and e.type == 0x0806
    a = e[ARP]
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, "02:00:00:00:00:02", US, PEER_MAC, PEER)
    assert d.neighbours[PEER_I] == bytes.fromhex("020000000001")
    # ARP for someone else: dropped, not answered
    other = Ether(src=PEER_MAC) / ARP(op=1, hwsrc=PEER_MAC, psrc=PEER, pdst="198.18.0.9")
    assert d.dispatch([(bytes(other), 0)]).replies == []
    assert d.stats.drops[DropReason.ARP_NOT_FOR_US] == 1
    # ARP reply to us: nothing sent; an unsolicited one creates no entry
    # (Linux arp_accept=0), one for an address we are resolving fills it
    rep = Ether(src="02:00:00:00:00:07", dst="02:00:00:00:00:02") / ARP(op=2, hwsrc="02:00:00:00:00:07", psrc="198.18.0.7", pdst=US)
    assert d.dispatch([(bytes(rep), 0)]).replies == []
    assert 0xC6120007 not in d.neighbours
    assert d.stats.drops[DropReason.ARP_REPLY_IGNORED] == 1 and d.stats.arp_learned == 0
    d.neigh.neigh_event_send(0xC6120007, 0.0)
    assert d.dispatch([(bytes(rep), 0)]).replies == []
    assert d.neighbours[0xC6120007] == bytes.fromhex("020000000007")
    assert d.stats.arp_learned == 1


def test_arp_request_builder_parses():
    d = Dispatcher(1, [US_I], l2=True, mac=MAC)
    e = Ether(d.arp_request(PEER_I, US_I))
    assert e.dst == "ff:ff:ff:ff:ff:ff" and e[ARP].op == 1
    assert (e[ARP].psrc, e[ARP].pdst) == (US, PEER)


def _dropped_as(d: Dispatcher, frame: bytes) -> list[DropReason]:
    """The reasons one frame was counted under (expected: exactly one)."""
    before = d.stats.drops.copy()
    out = d.dispatch([(frame, 0)])
    assert out.replies == [] and not any(out.frames)
    return list((d.stats.drops - before).elements())


def test_drop_reasons():
    """Each frame alone: dropped under exactly its reason, and as_dict (what
    the control socket sends) names the reasons."""
    d = Dispatcher(2, [US_I], l2=False)
    bad_csum = bytearray(bytes(IP(src=PEER, dst=US) / ICMP()))
    bad_csum[-1] ^= 0xFF
    bad_ip_csum = bytearray(bytes(IP(src=PEER, dst=US, proto=47) / Raw(b"gre!")))
    bad_ip_csum[10] ^= 0xFF
    frames = [
        (b"", DropReason.IP_HDR),  # truncated
        (b"\x45" + bytes(10), DropReason.IP_HDR),  # truncated
        (bytes(IP(src=PEER, dst=US, proto=47) / Raw(b"gre!")), DropReason.NOT_TCP),  # GRE
        (bytes(IP(src=PEER, dst=US, proto=17) / Raw(b"ud")), DropReason.PKT_TOO_SMALL),  # UDP
        (bytes(IP(src=PEER, dst=US, proto=47) / Raw(b"gre!")), DropReason.NOT_TCP),
        (bytes(IP(src=PEER, dst=US, flags="MF") / TCP()), DropReason.IP_FRAGMENT),
        # a fragment, but not TCP: parse_ipv4's check
        (bytes(IP(src=PEER, dst=US, frag=10) / Raw(b"x" * 8)), DropReason.IP_FRAGMENT),
        (tcp(1, src=PEER, dst="198.18.0.99"), DropReason.IP_OTHERHOST),  # not ours
        (bytes(IP(src=PEER, dst=US) / ICMP(type=0)), DropReason.ICMP_TYPE),  # echo reply
        (bytes(bad_csum), DropReason.ICMP_CSUM),
        (bytes(IP(src=PEER, dst=US, proto=1) / Raw(b"\x08\x00")), DropReason.ICMP_HDR),  # 2 bytes
        (bytes(bad_ip_csum), DropReason.IP_CSUM),
        (bytes(IP(src=PEER, dst=US) / TCP())[:22], DropReason.TCP_HDR),  # ports cut
        (b"\x65" + bytes(39), DropReason.IP_HDR),  # version 6 nibble
        (b"\x43" + bytes(8) + b"\x06" + bytes(30), DropReason.IP_HDR),  # IHL 3 on TCP
        (b"\x42" + bytes(39), DropReason.IP_HDR),  # IHL 2 on anything else
    ]
    for frame, reason in frames:
        assert _dropped_as(d, frame) == [reason], frame
    assert d.stats.as_dict()["drops"] == {
        "IP_HDR": 5, "NOT_TCP": 2, "IP_FRAGMENT": 2, "IP_OTHERHOST": 1, "ICMP_TYPE": 1,
        "ICMP_CSUM": 1, "ICMP_HDR": 1, "IP_CSUM": 1, "TCP_HDR": 1, "PKT_TOO_SMALL": 1}


def test_l2_drops():
    d = Dispatcher(1, [US_I], l2=True, mac=MAC)
    ipv6 = bytes(Ether(type=0x86DD) / Raw(bytes(40)))
    arp_bad = bytes(Ether(type=0x0806) / Raw(bytes(10)))
    arp_op = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / ARP(op=7, psrc=PEER, pdst=US))
    other = bytes(Ether(dst="02:00:00:00:00:09") / IP(src=PEER, dst=US) / TCP())
    assert _dropped_as(d, b"\x00" * 5) == [DropReason.PKT_TOO_SMALL]
    assert _dropped_as(d, ipv6) == [DropReason.UNHANDLED_PROTO]
    assert _dropped_as(d, arp_bad) == [DropReason.ARP_HDR]
    assert _dropped_as(d, arp_op) == [DropReason.ARP_HDR]
    assert _dropped_as(d, other) == [DropReason.OTHERHOST]
    assert sum(d.stats.drops.values()) == 5


@given(st.binary(max_size=120), st.booleans())
@settings(max_examples=300)
def test_never_raises_on_garbage(data, l2):
    d = Dispatcher(3, [US_I], l2=l2, mac=MAC)
    out = d.dispatch([(data, 0)])
    handled = sum(len(f) for f in out.frames) + len(out.replies) + sum(d.stats.drops.values())
    assert handled == 1


def test_set_reta_validates_and_moves_flows():
    d = Dispatcher(2, [US_I])
    try:
        d.set_reta([0] * 10)
    except ValueError:
        pass
    else:
        raise AssertionError("short RETA accepted")
    d.set_reta([1] * 128)
    out = d.dispatch([(tcp(p), 0) for p in range(100, 120)])
    assert len(out.frames[1]) == 20 and out.frames[0] == []


def test_any_key_steers_like_flow_to_worker():
    from shardstack.netio.rss import DEFAULT_KEY, Toeplitz

    d = Dispatcher(3, [US_I], key=DEFAULT_KEY)
    assert d.wtab is None  # not a period-16 key: the 12-table path
    t = Toeplitz(DEFAULT_KEY)
    reta = make_reta(3)
    out = d.dispatch([(tcp(p), 0) for p in range(2000, 2100)])
    for w, frames in enumerate(out.frames):
        for f in frames:
            sport = int.from_bytes(f[20:22], "big")
            assert flow_to_worker(PEER_I, US_I, sport, 80, reta=reta, hasher=t) == w


def test_udp_goes_to_a_worker_by_its_tuple():
    """UDP (core/udp.py): each datagram to one worker, one flow to one worker."""
    d = Dispatcher(4, [US_I])
    frames = [bytes(IP(src=PEER, dst=US) / UDP(sport=40000 + i, dport=53) / Raw(b"q"))
              for i in range(32)]
    out = d.dispatch([(f, 0) for f in frames] + [(frames[0], 0)])
    got = [(w, f) for w, fs in enumerate(out.frames) for f in fs]
    assert sorted(f for _, f in got) == sorted(frames + [frames[0]])
    assert len({w for w, f in got if f == frames[0]}) == 1
    assert len({w for w, _ in got}) > 1  # spread
    assert d.stats.udp == 33 and d.stats.tcp == 0
