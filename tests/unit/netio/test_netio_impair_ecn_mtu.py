"""Impair's `ce` (RFC 3168 §5 marking, netem's ecn) and `blackhole` (an RFC 4821 path-MTU
black hole) on both framings, and the bridge's flags that set them."""

from __future__ import annotations

import argparse

import pytest
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import build_tcp_ipv4
from shardstack.netio import bridge
from shardstack.netio.device import LoopbackDevice
from shardstack.netio.impair import Impair, ImpairLane, parse_impair_spec

A, B = 0xC6120001, 0xC6120002  # 198.18.0.1, 198.18.0.2
ETH = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"


class FakeClock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def pkt(tos: int, n: int = 100, seq: int = 0) -> bytes:
    return build_tcp_ipv4(A, B, 40000, 80, seq, 0, 0x10, 1000, payload=b"x" * n, tos=tos)


def test_spec_keys() -> None:
    s = parse_impair_spec("ce=5%,blackhole=1280,seed=2")
    assert s.ce == 0.05 and s.blackhole == 1280
    with pytest.raises(ValueError):
        parse_impair_spec("ce=2")
    with pytest.raises(ValueError):
        parse_impair_spec("blackhole=-1")


def test_ce_marks_only_ect_packets_and_keeps_them_valid() -> None:
    a, b = LoopbackDevice.pair()
    dev = Impair(a, "ce=1,seed=1", clock=FakeClock())
    sent = [pkt(0), pkt(2, seq=1), pkt(1, seq=2), pkt(3, seq=3)]
    dev.send_batch(sent)
    got = [f for f, _ in b.recv_batch()]
    assert len(got) == 4
    tos = [parse_ipv4(f)[0].tos & 3 for f in got]  # parse_ipv4 checks the header checksum
    assert tos == [0, 3, 3, 3]  # Not-ECT passes unmarked; ECT(0)/ECT(1) become CE
    assert got[1][20:] == sent[1][20:]
    assert dev.counters()["tx"]["ce_marked"] == 2
    assert dev.counters()["tx"]["lost"] == 0


def test_ce_rate_is_seeded() -> None:
    def run() -> list[int]:
        a, b = LoopbackDevice.pair()
        dev = Impair(a, "ce=0.3,seed=7", clock=FakeClock())
        dev.send_batch([pkt(2, seq=i) for i in range(400)])
        return [parse_ipv4(f)[0].tos & 3 for f, _ in b.recv_batch(1000)]

    first = run()
    assert first == run()
    assert 80 < first.count(3) < 160


def test_blackhole_drops_big_packets_silently() -> None:
    a, b = LoopbackDevice.pair()
    dev = Impair(a, "blackhole=1000,seed=1", clock=FakeClock())
    dev.send_batch([pkt(0, 900), pkt(0, 960), pkt(0, 961), pkt(0, 1400)])
    got = [f for f, _ in b.recv_batch()]
    assert [len(f) for f in got] == [940, 1000]
    assert dev.counters()["tx"]["blackholed"] == 2


def test_blackhole_counts_a_super_segment_by_its_segments() -> None:
    a, b = LoopbackDevice.pair(record=True)
    dev = Impair(a, "blackhole=1500,seed=1", clock=FakeClock())
    big = build_tcp_ipv4(A, B, 1, 2, 0, 0, 0x10, 1000, payload=bytes(9000))
    dev.send_gso(big, 1460)  # 40 + 1460 = 1500: fits
    dev.send_gso(big, 1461)
    assert a.gso_sent == [(big, 1460)]


def test_lane_on_ethernet_frames() -> None:
    spec = parse_impair_spec("ce=1,blackhole=1000")
    lane = ImpairLane(spec, "a2b", True, True)
    out = lane.push([(ETH + pkt(2), 0), (ETH + pkt(0, 1200), 0), (b"\xff" * 60, 0)], 0.0)
    assert len(out) == 2
    assert parse_ipv4(out[0][0][14:])[0].tos & 3 == 3
    assert out[1][0] == b"\xff" * 60  # not IPv4: left alone
    assert lane.stats.blackholed == 1 and lane.stats.ce_marked == 1


def test_bridge_flags() -> None:
    p = argparse.ArgumentParser()
    bridge.add_arguments(p)
    a = p.parse_args(["x", "y", "--ce", "2%", "--mtu-blackhole", "1280"])
    spec = bridge.spec_from_args(a)
    assert spec.ce == 0.02 and spec.blackhole == 1280


def test_bridge_lane_items_carry_a_vnet_header() -> None:
    """In the bridge a lane's second field is 0 or the virtio-net header to send
    with (bytes), never a GSO size: the black hole reads the packet's own length."""
    lane = ImpairLane(parse_impair_spec("blackhole=1000"), "a2b", True, True)
    vnet = bytes(10)
    out = lane.push([(ETH + pkt(0, 900), vnet), (ETH + pkt(0, 1200), vnet)], 0.0)
    assert [len(f) for f, _ in out] == [14 + 940]
