"""Devices and wrappers on the in-memory loopback: Impair, Pcap, Trace."""

from __future__ import annotations

import io
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap
from shardstack.core.wire.checksum import verify_tcp_checksum
from shardstack.core.wire.tcp import build_tcp_ipv4
from shardstack.netio.device import (
    RX_CSUM_PARTIAL,
    RX_CSUM_VALID,
    RX_GSO,
    VNET_HDR,
    LoopbackDevice,
    _gso_header,
    partial_tcp_checksum,
    vnet_rx_flags,
)
from shardstack.netio.impair import Impair, ImpairSpec, parse_impair_spec
from shardstack.netio.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW, Pcap
from shardstack.netio.trace import Trace, describe

A, B = 0xC6120001, 0xC6120002  # 198.18.0.1, 198.18.0.2


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def frames(n: int) -> list[bytes]:
    """n distinct TCP/IPv4 packets (the sequence number is the index)."""
    return [
        build_tcp_ipv4(A, B, 40000, 80, i, 0, 0x10, 1000, payload=b"x" * (i % 50)) for i in range(n)
    ]


def seq_of(pkt: bytes) -> int:
    return struct.unpack_from("!I", pkt, 24)[0]


# ---- LoopbackDevice -------------------------------------------------------


def test_loopback_self_and_pair():
    lo = LoopbackDevice(record=True)
    fs = frames(3)
    assert lo.send_batch(fs) == 3
    assert lo.recv_batch(2) == [(fs[0], 0), (fs[1], 0)]
    assert lo.recv_batch() == [(fs[2], 0)]
    assert lo.recv_batch() == []
    assert lo.sent == fs
    a, b = LoopbackDevice.pair()
    a.send_batch(fs)
    assert a.recv_batch() == [] and [f for f, _ in b.recv_batch()] == fs


def test_loopback_capacity_drops():
    lo = LoopbackDevice(capacity=2)
    assert lo.send_batch(frames(5)) == 2
    assert lo.dropped == 3


def test_loopback_gso_flags():
    a, b = LoopbackDevice.pair()
    big = build_tcp_ipv4(A, B, 1, 2, 0, 0, 0x10, 1000, payload=bytes(20000))
    assert a.send_gso(big, 1460)
    [(f, flags)] = b.recv_batch()
    assert f == big and flags == RX_CSUM_VALID | RX_GSO


# ---- virtio-net header handling (pure parts of TunDevice/PacketDevice) ----


def test_rx_flags_from_virtio_header():
    assert vnet_rx_flags(VNET_HDR.pack(0, 0, 0, 0, 0, 0)) == 0
    assert vnet_rx_flags(VNET_HDR.pack(2, 0, 0, 0, 0, 0)) == RX_CSUM_VALID
    assert vnet_rx_flags(VNET_HDR.pack(1, 1, 52, 1448, 20, 16)) == (
        RX_CSUM_VALID | RX_CSUM_PARTIAL | RX_GSO
    )
    assert vnet_rx_flags(VNET_HDR.pack(1, 0x80, 0, 0, 20, 16)) == RX_CSUM_VALID | RX_CSUM_PARTIAL


def _complete_partial(pkt: bytearray, csum_start: int) -> None:
    """What the kernel does for NEEDS_CSUM: sum from csum_start, fold, complement."""
    from shardstack.core.wire.checksum import internet_checksum

    field = csum_start + 16
    partial = pkt[field : field + 2]
    seg = bytes(pkt[csum_start:field]) + partial + bytes(pkt[field + 2 :])
    pkt[field : field + 2] = internet_checksum(seg).to_bytes(2, "big")


@pytest.mark.parametrize("l3", [0, 14])
def test_partial_checksum_completes_to_valid(l3):
    pkt = bytearray(bytes(l3) + build_tcp_ipv4(A, B, 5, 6, 7, 8, 0x18, 999, payload=b"hello!!"))
    start, hdr_len = partial_tcp_checksum(pkt, l3)
    assert start == l3 + 20 and hdr_len == l3 + 40
    assert not verify_tcp_checksum(A, B, bytes(pkt[start:]))
    _complete_partial(pkt, start)
    assert verify_tcp_checksum(A, B, bytes(pkt[start:]))


def test_gso_header_fields():
    pkt = bytearray(build_tcp_ipv4(A, B, 5, 6, 7, 8, 0x10, 999, payload=bytes(4000)))
    flags, gso_type, hdr_len, gso_size, start, off = VNET_HDR.unpack(_gso_header(pkt, 1448, 0))
    assert (flags, gso_type, hdr_len, gso_size, start, off) == (1, 1, 40, 1448, 20, 16)
    small = bytearray(build_tcp_ipv4(A, B, 5, 6, 7, 8, 0x10, 999, payload=bytes(100)))
    assert VNET_HDR.unpack(_gso_header(small, 1448, 0))[1:4] == (0, 40, 0)


# ---- Impair ---------------------------------------------------------------


def test_parse_spec():
    sp = parse_impair_spec("loss=0.03,dup=0.01,reorder=0.1,delay=2ms,jitter=1ms,corrupt=0.001,seed=1")
    assert sp == ImpairSpec(
        loss=0.03, dup=0.01, reorder=0.1, delay=0.002, jitter=0.001, corrupt=0.001, seed=1
    )
    assert parse_impair_spec("loss=5%,delay=500us,dir=rx").loss == 0.05
    assert parse_impair_spec("delay=0.25s").delay == 0.25
    assert parse_impair_spec("delay=3").delay == pytest.approx(0.003)
    sp = parse_impair_spec("dir=tx")
    assert (sp.rx, sp.tx) == (False, True)
    for bad in ("loss=2", "bogus=1", "loss", "delay=-1ms", "dir=up", "loss=x"):
        with pytest.raises(ValueError):
            parse_impair_spec(bad)


def _run_rx(spec: str, n: int = 20000):
    lo = LoopbackDevice(capacity=n)
    clock = FakeClock()
    dev = Impair(lo, spec, clock=clock)
    fs = frames(n)
    for f in fs:
        lo.inject(f, RX_CSUM_VALID)
    got = []
    while True:
        batch = dev.recv_batch(256)
        got.extend(batch)
        if not batch and dev.next_deadline() is None and not lo.rxq:
            break
        clock.t += 0.001
        dev.poll()
    return dev, fs, got


def test_impair_rates_within_tolerance():
    n = 20000
    dev, fs, got = _run_rx("loss=0.03,dup=0.01,reorder=0.1,corrupt=0.01,seed=1", n)
    c = dev.counters()["rx"]
    assert c["frames"] == n
    assert abs(c["lost"] / n - 0.03) < 0.006
    assert abs(c["duplicated"] / n - 0.01) < 0.004
    assert abs(c["corrupted"] / n - 0.01) < 0.004
    assert abs(c["reordered"] / n - 0.1) < 0.015
    # Everything not lost comes out, duplicates included.
    assert len(got) == c["passed"] == n - c["lost"] + c["duplicated"]
    originals = set(fs)
    corrupted = [(f, fl) for f, fl in got if f not in originals]
    assert len(corrupted) == c["corrupted"]
    assert all(fl == 0 for _, fl in corrupted)  # no "checksum valid" on damage
    # Reordering is visible as sequence inversions between neighbours.
    seqs = [seq_of(f) for f, _ in got if f in originals]
    inversions = sum(1 for x, y in zip(seqs, seqs[1:], strict=False) if y < x)
    assert inversions >= c["reordered"] * 0.8


def test_impair_reproducible_with_seed():
    spec = "loss=0.05,dup=0.02,reorder=0.1,delay=2ms,jitter=1ms,corrupt=0.01,seed=7"
    _, _, g1 = _run_rx(spec, 3000)
    _, _, g2 = _run_rx(spec, 3000)
    _, _, g3 = _run_rx(spec.replace("seed=7", "seed=8"), 3000)
    assert g1 == g2
    assert g1 != g3


def test_impair_delay_and_deadline():
    lo = LoopbackDevice()
    clock = FakeClock(10.0)
    dev = Impair(lo, "delay=5ms,seed=1", clock=clock)
    lo.inject(frames(1)[0])
    assert dev.recv_batch() == []
    assert dev.next_deadline() == pytest.approx(10.005)
    clock.t = 10.004
    dev.poll()
    assert dev.recv_batch() == []
    clock.t = 10.005
    dev.poll()
    assert len(dev.recv_batch()) == 1
    assert dev.next_deadline() is None


def test_impair_tx_direction_only():
    a, b = LoopbackDevice.pair()
    clock = FakeClock()
    dev = Impair(a, "loss=1,dir=tx,seed=3", clock=clock)
    assert dev.send_batch(frames(10)) == 10
    assert b.recv_batch() == []
    assert dev.counters()["tx"]["lost"] == 10
    b.send_batch(frames(4))
    assert len(dev.recv_batch()) == 4  # RX untouched
    assert dev.counters()["rx"]["lost"] == 0


def test_impair_reorder_swaps_neighbours_and_hold_expires():
    a, b = LoopbackDevice.pair()
    clock = FakeClock()
    dev = Impair(a, "reorder=1,seed=1,hold=5ms", clock=clock)
    f = frames(3)
    dev.send_batch(f)
    # 0 held; 1 overtakes it; 2 held again, waiting for a successor.
    assert [x for x, _ in b.recv_batch()] == [f[1], f[0]]
    clock.t += 0.005
    dev.poll()
    assert [x for x, _ in b.recv_batch()] == [f[2]]


def test_impair_tx_gso_passthrough():
    a, b = LoopbackDevice.pair(record=True)
    dev = Impair(a, "corrupt=1,seed=1", clock=FakeClock())
    big = build_tcp_ipv4(A, B, 1, 2, 0, 0, 0x10, 1000, payload=bytes(9000))
    dev.send_gso(big, 1448)
    assert a.gso_sent == [(big, 1448)]  # super-segments are never corrupted on TX


# ---- Pcap -----------------------------------------------------------------


def test_pcap_l3_readable_by_scapy(tmp_path):
    path = tmp_path / "l3.pcap"
    a, b = LoopbackDevice.pair()
    dev = Pcap(a, str(path), clock=FakeClock(1700000000.25))
    tx = frames(3)
    dev.send_batch(tx)
    rx = bytes(IP(src="198.18.0.2", dst="198.18.0.1") / ICMP())
    b.send_batch([rx])
    assert dev.recv_batch() == [(rx, 0)]
    dev.close()
    pkts = rdpcap(str(path))
    assert [bytes(p) for p in pkts] == tx + [rx]
    assert pkts[0][TCP].dport == 80
    assert float(pkts[0].time) == pytest.approx(1700000000.25)
    assert struct.unpack_from("=I", path.read_bytes(), 20)[0] == LINKTYPE_RAW


def test_pcap_l2_ethernet(tmp_path):
    buf = io.BytesIO()
    lo = LoopbackDevice(l2=True)
    dev = Pcap(lo, buf, clock=FakeClock())
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01") / ARP(pdst="198.18.0.2"))
    dev.send_batch([arp])
    dev.recv_batch()
    path = tmp_path / "l2.pcap"
    path.write_bytes(buf.getvalue())
    pkts = rdpcap(str(path))
    assert [bytes(p) for p in pkts] == [arp, arp]
    assert pkts[0][ARP].pdst == "198.18.0.2"
    assert struct.unpack_from("=I", buf.getvalue(), 20)[0] == LINKTYPE_ETHERNET


# ---- Trace ----------------------------------------------------------------


def test_trace_one_line_per_frame():
    lines: list[str] = []
    lo = LoopbackDevice()
    dev = Trace(lo, sink=lines.append)
    syn = build_tcp_ipv4(A, B, 40000, 80, 1, 0, 0x02, 1000)
    dev.send_batch([syn, b"\x45junk"])
    dev.recv_batch()
    assert len(lines) == 4
    assert lines[0] == "tx 40B 198.18.0.1:40000 > 198.18.0.2:80 tcp [S]"
    assert lines[1].startswith("tx 5B ip?")
    assert lines[2].startswith("rx 40B 198.18.0.1:40000")


def test_describe_l2_never_raises():
    assert describe(b"", True).startswith("runt")
    assert describe(b"\x00" * 12 + b"\x08\x00" + b"\x45", True).startswith("ip?")
    arp = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP())
    assert describe(arp, True) == "arp 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff"
