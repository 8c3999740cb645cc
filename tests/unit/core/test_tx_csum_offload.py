"""Transmit checksum offload (ShardConfig.tx_csum_offload) through a tiny GSO "device".

The sender's super-segments carry only the pseudo-header sum (CHECKSUM_PARTIAL);
``GsoDevice`` stands for the kernel behind a virtio-net header: it cuts each
super-segment into gso_size segments (Linux ``tcp_gso_segment``: sequence
numbers advanced, PSH/FIN only on the last, the pseudo-header sum adjusted to
each segment's length) and completes each checksum (``skb_checksum_help``)
before the peer, which verifies every checksum, sees it.
"""

from __future__ import annotations

import hashlib
import random

from core_helpers import B, connect_over, make_shard
from shardstack.core.dropreason import DropReason
from shardstack.core.sock import State, TcpSock
from shardstack.core.tcp_output import tcp_transmit
from shardstack.core.wire.checksum import complete_partial, pseudo_header_sum, verify_tcp_checksum
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, FIN, PSH
from shardstack.netio.simlink import LinkParams, SimLink

IHL = 20
CSUM_OFFSET = 16


def _ip_header_sum(hdr: bytearray) -> None:
    hdr[10:12] = b"\0\0"
    total = sum(int.from_bytes(hdr[i:i + 2], "big") for i in range(0, len(hdr), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr[10:12] = (~total & 0xFFFF).to_bytes(2, "big")


def gso_segment(packet: bytes, mss: int) -> list[bytes]:
    """Cut a TCP/IPv4 super-segment (pseudo-header sum in its field) into
    segments, each still CHECKSUM_PARTIAL for its own length."""
    ihl = (packet[0] & 0x0F) * 4
    thl = (packet[ihl + 12] >> 4) * 4
    iph, tcph, payload = packet[:ihl], packet[ihl:ihl + thl], packet[ihl + thl:]
    src = int.from_bytes(iph[12:16], "big")
    dst = int.from_bytes(iph[16:20], "big")
    seq0 = int.from_bytes(tcph[4:8], "big")
    ident = int.from_bytes(iph[4:6], "big")
    out = []
    for n, off in enumerate(range(0, len(payload), mss)):
        chunk = payload[off:off + mss]
        last = off + mss >= len(payload)
        ip = bytearray(iph)
        ip[2:4] = (ihl + thl + len(chunk)).to_bytes(2, "big")
        ip[4:6] = ((ident + n) & 0xFFFF).to_bytes(2, "big")
        _ip_header_sum(ip)
        th = bytearray(tcph)
        th[4:8] = ((seq0 + off) & 0xFFFFFFFF).to_bytes(4, "big")
        if not last:
            th[13] &= ~(FIN | PSH) & 0xFF
        th[16:18] = pseudo_header_sum(src, dst, 6, thl + len(chunk)).to_bytes(2, "big")
        out.append(bytes(ip + th) + bytes(chunk))
    return out


class GsoDevice:
    """A SimLink endpoint: the shard plus a device doing GSO and NEEDS_CSUM."""

    def __init__(self, shard) -> None:
        self.shard = shard
        self.super_segments = 0
        self.partial_seen = 0

    def receive(self, packet, now):
        self.shard.receive(packet, now)

    def advance(self, now):
        self.shard.advance(now)

    def next_deadline(self):
        return self.shard.next_deadline()

    def take_frames(self) -> list[bytes]:
        out = []
        for frame, gso in self.shard.take_frames_gso():
            ip, seg = parse_ipv4(frame)
            if not gso:
                # Not marked NEEDS_CSUM by the device: must be complete already.
                assert verify_tcp_checksum(ip.src, ip.dst, seg)
                out.append(frame)
                continue
            self.super_segments += 1
            want = pseudo_header_sum(ip.src, ip.dst, 6, len(seg))
            if int.from_bytes(frame[IHL + CSUM_OFFSET:IHL + CSUM_OFFSET + 2], "big") == want:
                self.partial_seen += 1
            for piece in gso_segment(frame, gso):
                out.append(complete_partial(piece, IHL, CSUM_OFFSET))
        return out


def _transfer(tx_csum_offload: bool, seed: int, loss: float):
    a = make_shard(tso_max=65536, tx_csum_offload=tx_csum_offload)
    b = make_shard(B)  # verifies every checksum (csum_offload off)
    dev = GsoDevice(a)
    link = SimLink(dev, b, seed=seed, params=LinkParams(delay=0.002, loss=loss))
    c, s = connect_over(link, a, b, timeout=10.0)
    data = random.Random(seed).randbytes(3 << 20 | 12345)
    sent, got = 0, bytearray()

    def step() -> bool:
        nonlocal sent
        if sent < len(data):
            sent += a.send(c, memoryview(data)[sent:sent + 262144], link.now)
        while (chunk := b.recv(s, 1 << 20)):
            got.extend(chunk)
        return len(got) == len(data)

    for _ in range(10_000):
        if step() or link.now > 60.0:
            break
        link.run_for(0.005)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    return dev, b


def test_offloaded_super_segments_are_completed_by_the_device():
    dev, b = _transfer(True, seed=1, loss=0.0)
    assert dev.super_segments > 10
    assert dev.partial_seen == dev.super_segments
    assert b.stats.drops[DropReason.TCP_CSUM] == 0


def test_offload_survives_loss_and_retransmission():
    dev, b = _transfer(True, seed=2, loss=0.02)
    assert dev.super_segments > 10 and dev.partial_seen == dev.super_segments
    assert b.stats.drops[DropReason.TCP_CSUM] == 0


def test_default_off_sends_complete_checksums():
    dev, b = _transfer(False, seed=3, loss=0.0)
    assert dev.super_segments > 10
    assert dev.partial_seen == 0  # full checksums: the field is not the pseudo sum


def test_fast_path_partial_completes_to_the_full_frame():
    """tcp_transmit's packed timestamp path with csum_partial, then the device."""
    rnd = random.Random(9)
    sh = make_shard()
    for _ in range(200):
        sk = TcpSock(3, state=State.ESTABLISHED, laddr=rnd.getrandbits(32),
                     raddr=rnd.getrandbits(32), lport=rnd.randrange(65536),
                     rport=rnd.randrange(65536), ts_ok=rnd.random() < 0.8,
                     ts_recent=rnd.getrandbits(32), ts_off=rnd.getrandbits(32),
                     rcv_nxt=rnd.getrandbits(32), rcvbuf=rnd.randrange(2048, 1 << 20))
        sk.rcv_wup = sk.rcv_nxt
        seq = rnd.getrandbits(32)
        payload = memoryview(rnd.randbytes(rnd.choice([0, 1, 1447, 1448, 30001, 65000])))
        now = rnd.uniform(0, 1e5)
        sh.frames.clear()
        tcp_transmit(sh, sk, seq, ACK | PSH, payload, now)
        tcp_transmit(sh, sk, seq, ACK | PSH, payload, now, csum_partial=True)
        full, partial = sh.frames
        assert partial[36:38] == pseudo_header_sum(sk.laddr, sk.raddr, 6,
                                                   len(full) - 20).to_bytes(2, "big")
        assert complete_partial(partial, IHL, CSUM_OFFSET) == full
