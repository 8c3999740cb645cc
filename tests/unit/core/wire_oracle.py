"""An on-the-wire oracle for loss recovery tests.

:class:`Watched` wraps a Shard as a SimLink endpoint.  It learns, from the
ACKs and SACK blocks actually *delivered* to the shard, what the peer has
acknowledged, and checks every data segment the shard then emits: a segment
carrying any byte the sender had already been told was received (cumulatively
or by SACK) is a violation.  It also samples the congestion window while the
socket is in fast recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardstack.core import Shard
from shardstack.core.wire.checksum import verify_tcp_checksum
from shardstack.core.wire.errors import WireError
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, FIN, SYN, parse_tcp

MASK = 0xFFFFFFFF


@dataclass
class FlowView:
    """What one sender knows its peer holds, in offsets from the sender's ISN."""

    isn: int
    cum: int = 0
    sacked: list = field(default_factory=list)  # merged [lo, hi) offsets above cum

    def off(self, seq: int) -> int:
        return (seq - self.isn) & MASK

    def learn(self, ack: int, blocks) -> None:
        a = self.off(ack)
        if a < 1 << 31 and a > self.cum:
            self.cum = a
        rs = self.sacked + [[self.off(lo), self.off(hi)] for lo, hi in blocks
                            if self.off(lo) < self.off(hi) < 1 << 31]
        rs.sort()
        merged: list = []
        for lo, hi in rs:
            if hi <= self.cum:
                continue
            lo = max(lo, self.cum)
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.sacked = merged

    def overlap(self, lo: int, hi: int) -> bool:
        if lo < self.cum:
            return True
        return any(s < hi and lo < e for s, e in self.sacked)


class Watched:
    """SimLink endpoint around a Shard that checks its retransmissions."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.flows: dict[tuple[int, int], FlowView] = {}
        self.violations: list[tuple[float, int, int]] = []
        self.data_segs = 0
        self.max_recovery_cwnd_ratio = 0.0  # cwnd in recovery / cwnd before it
        self.now = 0.0
        self.out: list[bytes] = []

    # SimLink endpoint API.  Frames are checked the moment the shard made them
    # (drained before and after every call into it), against what had been
    # delivered to it by then.
    def receive(self, packet: bytes, now: float) -> None:
        self._drain()
        self.now = now
        try:  # a corrupted packet teaches nothing (the shard drops it too)
            ip, payload = parse_ipv4(packet)
            seg = parse_tcp(payload) if verify_tcp_checksum(ip.src, ip.dst, payload) else None
        except WireError:
            seg = None
        view = None if seg is None else self.flows.get((seg.dst_port, seg.src_port))
        if view is not None and seg.flags & ACK:
            view.learn(seg.ack, seg.options.sack_blocks)
        self.shard.receive(packet, now)
        self._drain()
        self._sample()

    def advance(self, now: float) -> None:
        self._drain()
        self.now = now
        self.shard.advance(now)
        self._drain()

    def next_deadline(self) -> float | None:
        return self.shard.next_deadline()

    def take_frames(self) -> list[bytes]:
        self._drain()
        out, self.out = self.out, []
        return out

    def _drain(self) -> None:
        frames = self.shard.take_frames()
        if not frames:
            return
        self.out.extend(frames)
        for f in frames:
            ip, payload = parse_ipv4(f)
            seg = parse_tcp(payload)
            key = (seg.src_port, seg.dst_port)
            if seg.flags & SYN:
                self.flows[key] = FlowView(seg.seq)
                continue
            n = len(seg.payload) + (1 if seg.flags & FIN else 0)
            view = self.flows.get(key)
            if n == 0 or view is None:
                continue
            self.data_segs += 1
            lo = view.off(seg.seq)
            if view.overlap(lo, lo + n):
                self.violations.append((self.now, lo, lo + n))

    def _sample(self) -> None:
        for sk in self.shard.socks.values():
            cc = sk.cc
            if cc is not None and sk.in_recovery and cc.prior_cwnd:
                r = cc.cwnd / cc.prior_cwnd
                if r > self.max_recovery_cwnd_ratio:
                    self.max_recovery_cwnd_ratio = r
