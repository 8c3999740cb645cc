"""Malformed frames are counted under a named drop reason and dropped; frames are valid."""

from __future__ import annotations

import struct

import pytest
from core_helpers import ACK, SYN, A, B, Pair, Peer, make_shard, parse
from shardstack.core import DropReason
from shardstack.core.wire.ipv4 import build_ipv4
from shardstack.core.wire.tcp import build_tcp_ipv4


def syn(**kw) -> bytearray:
    return bytearray(build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN, 65535, **kw))


def listening(**kw):
    sh = make_shard(**kw)
    sd = sh.socket()
    sh.bind(sd, 0, 80)
    sh.listen(sd, 4)
    return sh


def feed(sh, pkt, csum_ok=None):
    sh.receive(bytes(pkt), 0.0, csum_ok)
    return sh.take_frames()


def test_bad_tcp_checksum():
    sh = listening()
    pkt = syn()
    pkt[36] ^= 0xFF  # TCP checksum field
    assert feed(sh, pkt) == []
    assert sh.stats.drops[DropReason.TCP_CSUM] == 1


def test_checksum_offload_skips_verification():
    sh = listening(csum_offload=True)
    pkt = syn()
    pkt[36] ^= 0xFF
    assert len(feed(sh, pkt)) == 1  # the device vouched for it
    sh2 = listening()
    assert len(feed(sh2, pkt, csum_ok=True)) == 1  # per-call override


def test_bad_ip_checksum_and_header():
    sh = listening()
    pkt = syn()
    pkt[10] ^= 0xFF
    assert feed(sh, pkt) == []
    assert sh.stats.drops[DropReason.IP_CSUM] == 1
    assert feed(sh, b"\x45\x00") == []
    assert feed(sh, b"\x75" + bytes(39)) == []  # version 7 (6 is IPv6: tests/unit/core/test_ipv6.py)
    assert feed(sh, b"\x65" + bytes(30)) == []  # an IPv6 header cut short
    assert sh.stats.drops[DropReason.IP_HDR] == 3


def test_bad_data_offset():
    sh = listening()
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x40, SYN, 1000, 0, 0))
    assert feed(sh, build_ipv4(B, A, 6, bytes(seg)), csum_ok=True) == []
    seg[12] = 0xF0  # 60-byte header in a 20-byte segment
    assert feed(sh, build_ipv4(B, A, 6, bytes(seg)), csum_ok=True) == []
    # each class under its own reason (issue 11)
    assert sh.stats.drops[DropReason.TCP_DOFF_SHORT] == 1
    assert sh.stats.drops[DropReason.TCP_DOFF_OVERRUN] == 1


def test_truncated_options():
    sh = listening()
    # NOP, NOP, then a timestamp option whose length (10) runs past the 4 option bytes
    seg = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x60, SYN, 1000, 0, 0) + b"\x01\x01\x08\x0a"
    assert feed(sh, build_ipv4(B, A, 6, seg), csum_ok=True) == []
    assert sh.stats.drops[DropReason.TCP_OPT_OVERRUN] == 1


def test_syn_fin_and_syn_rst():
    sh = listening()
    for flags in (0x03, 0x06):
        feed(sh, build_tcp_ipv4(B, A, 40000, 80, 1, 0, flags, 100))
    assert sh.stats.drops[DropReason.TCP_FLAGS] == 2


def test_not_tcp_other_host_and_fragments():
    sh = listening()
    assert feed(sh, build_ipv4(B, A, 47, b"gre!")) == []  # UDP is served (core/udp.py)
    assert feed(sh, build_tcp_ipv4(B, B, 40000, 80, 1, 0, SYN, 100)) == []
    frag = bytearray(syn())
    frag[6] = 0x20  # MF
    frag[10:12] = b"\x00\x00"
    from shardstack.core.wire.ipv4 import header_checksum
    frag[10:12] = struct.pack("!H", header_checksum(bytes(frag[:20])))
    assert feed(sh, frag) == []
    d = sh.stats.drops
    assert (d[DropReason.NOT_TCP], d[DropReason.IP_OTHERHOST], d[DropReason.IP_FRAGMENT]) \
        == (1, 1, 1)


def test_random_garbage_never_raises():
    import random
    rnd = random.Random(5)
    sh = listening()
    base = bytes(syn())
    for _ in range(2000):
        pkt = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            pkt[rnd.randrange(len(pkt))] = rnd.randrange(256)
        sh.receive(bytes(pkt[:rnd.randint(0, len(pkt))]), 0.0, rnd.random() < 0.5)
    assert sum(sh.stats.drops.values()) > 0


def test_engine_frames_are_valid_for_scapy():
    scapy = pytest.importorskip("scapy.all")
    raws = []
    sh = listening()
    peer = Peer(sh)
    peer.send(SYN, 1000, mss=1460, wscale=7, sack_perm=True, ts=(1, 0))
    raws += sh.take_frames()
    peer.send(ACK, 1001, 0)
    raws += sh.take_frames()
    assert len(raws) == 2
    for raw in raws:
        pkt = scapy.IP(raw)
        assert pkt.haslayer(scapy.TCP)
        ip_sum, tcp_sum = pkt[scapy.IP].chksum, pkt[scapy.TCP].chksum
        del pkt[scapy.IP].chksum
        del pkt[scapy.TCP].chksum
        again = scapy.IP(bytes(pkt))
        assert (again[scapy.IP].chksum, again[scapy.TCP].chksum) == (ip_sum, tcp_sum)
    opts = dict(scapy.IP(raws[0])[scapy.TCP].options)
    assert opts["MSS"] == 1460 and opts["WScale"] == 7 and "SAckOK" in opts
    assert scapy.IP(raws[1])[scapy.TCP].flags == "R"


def test_data_frames_are_valid_for_scapy():
    scapy = pytest.importorskip("scapy.all")
    p = Pair()
    _, c, s = p.connect()
    p.a.send(c, bytes(range(256)) * 20, 0.0)
    frames = p.a.take_frames()
    assert len(frames) == 4  # 3 full segments and the 776-byte tail (Minshall's Nagle)
    for raw in frames:
        pkt = scapy.IP(raw)
        tcp_sum = pkt[scapy.TCP].chksum
        del pkt[scapy.TCP].chksum
        assert scapy.IP(bytes(pkt))[scapy.TCP].chksum == tcp_sum
        assert bytes(pkt[scapy.TCP].payload) == parse(raw).payload


def test_random_valid_segments_in_every_state_never_raise():
    """Well-formed segments with random flags/seq/ack/options against a live connection."""
    import random

    from shardstack.core.wire.tcp import build_tcp_options

    rnd = random.Random(11)
    for round_ in range(30):
        p = Pair()
        _, c, s = p.connect()
        p.a.send(c, bytes(5000), 0.0)
        if round_ % 3 == 1:
            p.a.close(c, 0.0)
        if round_ % 3 == 2:
            p.b.close(s, 0.0)
        p.deliver()
        sk = p.b.sock(s) if s in p.b.socks else None
        base_seq = sk.rcv_nxt if sk else 0
        base_ack = sk.snd_nxt if sk else 0
        for i in range(200):
            flags = rnd.choice([0x10, 0x18, 0x11, 0x04, 0x14, 0x02, 0x12, 0x01, 0x00, 0x19])
            seq = (base_seq + rnd.randint(-70000, 70000)) & 0xFFFFFFFF
            ack = (base_ack + rnd.randint(-70000, 70000)) & 0xFFFFFFFF
            opts = build_tcp_options(
                ts=(rnd.getrandbits(32), rnd.getrandbits(32)) if rnd.random() < 0.5 else None,
                sack_blocks=[(seq, (seq + 100) & 0xFFFFFFFF)] if rnd.random() < 0.3 else ())
            pkt = build_tcp_ipv4(A, B, p.a.getsockname(c)[1] if c in p.a.socks and
                                 not p.a.sock(c).orphan else 50000, 80, seq, ack, flags,
                                 rnd.randint(0, 65535), opts,
                                 bytes(rnd.randint(0, 2000)) if rnd.random() < 0.5 else b"")
            p.b.receive(pkt, 0.01 * i)
            p.b.advance(0.01 * i)
            p.b.take_frames()
        p.advance(200.0)
