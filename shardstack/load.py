"""Per-RETA-bucket load accounting in a worker: frames, bytes and CPU time.

RSS++ (Barbette et al., CoNEXT '19) balances by moving RETA buckets between
cores, and needs to know what each bucket costs. A worker counts, for every
frame its shard receives, the frame and its bytes under the frame's bucket:
the low 7 bits of the symmetric Toeplitz hash (netio.rss), the same value the
kernel's steering program (direct RX) or netio's Dispatcher used to pick this
worker. With the symmetric key the hash is a table lookup on the XOR of the
six 16-bit words of (src ip, dst ip, src port, dst port) (`FoldedToeplitz`),
and for an IPv4 header without options those 12 bytes are contiguous at
offset 12, so a frame costs one `unpack_from`, five XORs, one index and two
list increments (bench/bench_load.py measures it).

CPU time cannot be measured per frame at that price (a thread-CPU clock read
is a system call), so it is attributed: every SAMPLE_PERIOD the worker's
process CPU time since the last sample (time.process_time: everything the
worker did, the app pumping and timers included) is split over the buckets
in proportion to the frames each received in that period. Counters are
cumulative (Prometheus counters, deltas for a balancer); nothing is reset.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from shardstack.netio import rss

SAMPLE_PERIOD = 1.0  # s between CPU attributions (one loop timer)
N_BUCKETS = rss.RETA_SIZE
_SIX_WORDS = struct.Struct("!6H")  # src ip, dst ip (two words each), src port, dst port


def bucket_table() -> bytes:
    """folded 4-tuple (16 bits) -> RETA bucket (hash & 127), 64 KiB."""
    return bytes(h & rss.RETA_MASK for h in rss.FoldedToeplitz(rss.SYMMETRIC_KEY).table)


_BUCKET_OF = bucket_table()


_EIGHTEEN_WORDS = struct.Struct("!18H")


def frame_bucket(frame) -> int:
    """The RETA bucket of one TCP/IPv4 packet (header at offset 0), or -1 if it
    is not TCP or too short to say. TCP/IPv6 (TCP the first next header, as
    the steering programs take it): the fold of the 36-byte tuple's words."""
    try:
        if frame[0] >> 4 == 6:
            if frame[6] != 6:
                return -1
            x = 0
            for w in _EIGHTEEN_WORDS.unpack_from(frame, 8):
                x ^= w
            return _BUCKET_OF[x]
        if frame[9] != 6:
            return -1
        if frame[0] == 0x45:
            a, b, c, d, e, f = _SIX_WORDS.unpack_from(frame, 12)
        else:
            a, b, c, d = struct.unpack_from("!4H", frame, 12)
            e, f = struct.unpack_from("!2H", frame, (frame[0] & 15) * 4)
    except (IndexError, struct.error):
        return -1
    return _BUCKET_OF[a ^ b ^ c ^ d ^ e ^ f]


class BucketLoad:
    """One worker's per-bucket counters. `count(frames)` on every batch the
    shard receives; `snapshot()` for the control plane."""

    __slots__ = ("frames", "bytes", "cpu", "other_frames", "total_frames",
                 "_cpu_mark", "_frames_mark", "_loop", "_timer", "cpu_total")

    def __init__(self, loop: Any = None) -> None:
        self.frames = [0] * N_BUCKETS
        self.bytes = [0] * N_BUCKETS
        self.cpu = [0.0] * N_BUCKETS  # seconds, attributed (see module docstring)
        self.other_frames = 0  # not TCP (ICMP errors netio forwards), or runts
        self.total_frames = 0  # every frame counted, TCP or not
        self.cpu_total = 0.0  # attributed so far (= process CPU at the last sample)
        self._cpu_mark = time.process_time()
        self._frames_mark = [0] * N_BUCKETS
        self._loop = loop
        self._timer = None
        if loop is not None:
            self._timer = loop.call_later(SAMPLE_PERIOD, self._tick)

    def count(self, frames) -> None:
        """Count a batch of IPv4 or IPv6 packets (each starting at its IP header)."""
        unpack = _SIX_WORDS.unpack_from
        table = _BUCKET_OF
        fc = self.frames
        bc = self.bytes
        for fr in frames:
            size = len(fr)
            if size >= 24 and fr[0] == 0x45 and fr[9] == 6:
                a, b, c, d, e, f = unpack(fr, 12)
                k = table[a ^ b ^ c ^ d ^ e ^ f]
                fc[k] += 1
                bc[k] += size
            else:
                self._count_odd(fr)
        self.total_frames += len(frames)

    def _count_odd(self, fr) -> None:
        """IP options, not TCP, or a runt: the slow path."""
        k = frame_bucket(fr)
        if k < 0:
            self.other_frames += 1
        else:
            self.frames[k] += 1
            self.bytes[k] += len(fr)

    def wrap(self, receive_batch):
        """`shard.receive_batch`, counting each batch first (the worker's hook)."""
        count = self.count

        def receive_batch_counted(packets, now, csum_ok=None):
            count(packets)
            return receive_batch(packets, now, csum_ok)

        return receive_batch_counted

    def _tick(self) -> None:
        self.sample()
        self._timer = self._loop.call_later(SAMPLE_PERIOD, self._tick)

    def sample(self) -> None:
        """Attribute the CPU time since the last sample to the buckets that
        received frames in it (in proportion); with no frames it stays
        unattributed to any bucket (idle, timers) but counts in cpu_total."""
        now_cpu = time.process_time()
        spent = now_cpu - self._cpu_mark
        self._cpu_mark = now_cpu
        self.cpu_total += spent
        marks = self._frames_mark
        fc = self.frames
        delta = [fc[k] - marks[k] for k in range(N_BUCKETS)]
        total = sum(delta)
        if total and spent > 0:
            share = spent / total
            cpu = self.cpu
            for k in range(N_BUCKETS):
                if delta[k]:
                    cpu[k] += delta[k] * share
        self._frames_mark = list(fc)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def snapshot(self, shard: Any = None) -> dict[str, Any]:
        """What the control plane's `load` op returns (msgpack-able)."""
        self.sample()
        out: dict[str, Any] = {
            "frames": list(self.frames),
            "bytes": list(self.bytes),
            "cpu": [round(x, 6) for x in self.cpu],
            "other_frames": self.other_frames,
            "total_frames": self.total_frames,
            "cpu_seconds": round(self.cpu_total, 6),
        }
        if shard is not None:
            out["states"] = connection_states(shard)
        return out


def connection_states(shard: Any) -> dict[str, int]:
    """Connections by state (RFC 9293 names, as `ss`), listeners included."""
    return shard.state_counts()
