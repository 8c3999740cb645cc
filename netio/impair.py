"""`Impair`: a seeded fault injector that wraps any device (smoltcp's FaultInjector).

This kernel has no sch_netem, so impairment lives here, in both directions:
loss, duplication, reordering, delay with jitter, and corruption, each with
its own counter. It is driven by a spec string (the `--impair` option):

    "loss=0.03,dup=0.01,reorder=0.1,delay=2ms,jitter=1ms,corrupt=0.001,seed=1"

Rates are probabilities (0.03 or 3%); durations take us/ms/s (bare = ms).
`dir=rx|tx|both` limits which direction is impaired (default both).
Two more keys test what a path does besides losing packets: `ce=P` marks an
ECN-capable IPv4 packet (ECT(0) or ECT(1)) Congestion Experienced with
probability P, as an AQM router would instead of dropping it (RFC 3168 §5;
netem's `ecn`), and `blackhole=N` silently drops every IPv4 packet longer
than N bytes (a path-MTU black hole: no ICMP, RFC 4821 §1).

Reproducibility: each direction draws from its own `random.Random` seeded
from (seed, direction), so the same seed and the same frames give the same
faults whatever the other direction carries. Time comes from `clock` (a
callable; tests pass a fake one), never from inside the fault decisions.

Semantics per frame, in this order (netem's, simplified):
  blackhole drop it if its IPv4 packet is longer than N (a GSO super-segment
            counts by the segments it becomes).
  loss      drop it.
  ce        an ECT packet: set CE, redo the IPv4 header checksum.
  dup       send it twice (each copy then goes through the steps below).
  corrupt   flip one random bit; the RX_CSUM_VALID flag is cleared, because no
            NIC vouches for a corrupted frame, so the stack must catch it.
  delay     hold it for delay ± uniform(jitter) (jitter alone may reorder).
  reorder   hold it back until the next frame has gone out (an adjacent
            swap), or at most `hold` (default 10 ms) when no frame follows.
Frames held back are released by `poll(now)` and by the next recv/send;
`next_deadline()` tells the I/O loop when to call `poll`.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from shardstack.core.wire.ipv4 import header_checksum

from .device import RX_CSUM_VALID, Device, DeviceWrapper, Frame

__all__ = ["Impair", "ImpairLane", "ImpairSpec", "ImpairCounters", "parse_impair_spec"]


@dataclass(slots=True)
class ImpairSpec:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds
    corrupt: float = 0.0
    seed: int = 0
    hold: float = 0.010  # longest a reordered frame waits for a successor
    rx: bool = True
    tx: bool = True
    ce: float = 0.0  # probability of marking an ECT packet CE (RFC 3168 §5)
    blackhole: int = 0  # drop IPv4 packets longer than this, silently (0: none)


_RATES = ("loss", "dup", "reorder", "corrupt", "ce")
_TIMES = ("delay", "jitter", "hold")


def _parse_rate(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"rate out of range: {text}")
    return value


def _parse_time(text: str) -> float:
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            value = float(text[: -len(suffix)]) * scale
            break
    else:
        value = float(text) * 1e-3
    if value < 0:
        raise ValueError(f"negative duration: {text}")
    return value


def parse_impair_spec(spec: str) -> ImpairSpec:
    """Parse "loss=0.03,delay=2ms,seed=1"; raises ValueError naming the bad item."""
    out = ImpairSpec()
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep:
            raise ValueError(f"impair: expected key=value, got {item!r}")
        if key in _RATES:
            setattr(out, key, _parse_rate(value))
        elif key in _TIMES:
            setattr(out, key, _parse_time(value))
        elif key == "seed":
            out.seed = int(value)
        elif key == "blackhole":
            out.blackhole = int(value)
            if out.blackhole < 0:
                raise ValueError(f"impair: blackhole must be >= 0, got {value!r}")
        elif key == "dir":
            if value not in ("rx", "tx", "both"):
                raise ValueError(f"impair: dir must be rx, tx or both, got {value!r}")
            out.rx = value in ("rx", "both")
            out.tx = value in ("tx", "both")
        else:
            raise ValueError(f"impair: unknown key {key!r}")
    return out


@dataclass(slots=True)
class ImpairCounters:
    frames: int = 0  # frames offered to this direction
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    delayed: int = 0
    reordered: int = 0
    ce_marked: int = 0  # ECT packets marked Congestion Experienced
    blackholed: int = 0  # packets over the black hole's size, dropped
    passed: int = 0  # frames released (duplicates included)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Lane:
    """One direction's fault pipeline; emits (frame, flags) in release order."""

    __slots__ = ("spec", "rng", "stats", "_heap", "_seq", "_held", "_held_until", "active", "rx",
                 "l2")

    def __init__(self, spec: ImpairSpec, direction: str, active: bool, l2: bool = False) -> None:
        self.spec = spec
        self.rng = random.Random(f"{spec.seed}/{direction}")
        self.stats = ImpairCounters()
        self._heap: list[tuple[float, int, bytes, int, bool]] = []
        self._seq = 0
        self._held: tuple[bytes, int] | None = None
        self._held_until = 0.0
        self.active = active
        # On RX the second field is the device flags; on TX it is the GSO
        # mss (0: an ordinary frame).
        self.rx = direction == "rx"
        self.l2 = l2  # frames are Ethernet (else bare IP packets), for `ce` and `blackhole`

    def push(self, batch: Iterable[tuple[bytes, int]], now: float) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        if not self.active:
            out.extend(batch)
            self.stats.frames += len(out)
            self.stats.passed += len(out)
            return out
        sp, rng, st = self.spec, self.rng, self.stats
        for frame, flags in batch:
            st.frames += 1
            if sp.blackhole and self._too_big(frame, flags):
                st.blackholed += 1
                continue
            if sp.loss and rng.random() < sp.loss:
                st.lost += 1
                continue
            if sp.ce and self._ect(frame) and rng.random() < sp.ce:
                frame = self._mark_ce(frame)
                st.ce_marked += 1
            copies = 1
            if sp.dup and rng.random() < sp.dup:
                st.duplicated += 1
                copies = 2
            for _ in range(copies):
                f, fl = frame, flags
                if sp.corrupt and f and rng.random() < sp.corrupt and (self.rx or not fl):
                    # A TX super-segment is exempt: the kernel would checksum
                    # the damage and the peer could not detect it.
                    f = self._corrupt(f)
                    if self.rx:
                        fl &= ~RX_CSUM_VALID
                    st.corrupted += 1
                # Every decision is drawn here, in arrival order, so the same
                # seed and frames give the same faults whatever the timing
                # (a reorder draw at release time would interleave with
                # later arrivals' draws differently from run to run).
                hold = bool(sp.reorder) and rng.random() < sp.reorder
                if sp.delay or sp.jitter:
                    d = sp.delay + sp.jitter * (2.0 * rng.random() - 1.0)
                    if d > 0:
                        st.delayed += 1
                        heapq.heappush(self._heap, (now + d, self._seq, f, fl, hold))
                        self._seq += 1
                        continue
                self._emit(f, fl, now, out, hold)
        self._release(now, out)
        return out

    def _l3(self, frame: bytes) -> int:
        """Offset of the IPv4 header, or -1 when the frame holds no IPv4 packet."""
        if not self.l2:
            return 0 if frame and frame[0] >> 4 == 4 else -1
        off = 18 if len(frame) >= 18 and frame[12:14] == b"\x81\x00" else 14
        if len(frame) < off + 20 or frame[off - 2:off] != b"\x08\x00" or frame[off] >> 4 != 4:
            return -1
        return off

    def _too_big(self, frame: bytes, flags: int) -> bool:
        """Longer than the black hole lets through?  A TX super-segment (``flags``:
        its GSO mss) by the size of the segments it becomes."""
        l3 = self._l3(frame)
        if l3 < 0:
            return False
        size = frame[l3 + 2] << 8 | frame[l3 + 3]
        # On TX through Impair the second field is the GSO mss; the bridge's lanes
        # carry a virtio-net header there instead (its GSO frames are cut already).
        if flags and type(flags) is int and not self.rx:  # IP + TCP headers + one mss
            hl = (frame[l3] & 0x0F) * 4
            seg = hl + (frame[l3 + hl + 12] >> 4) * 4 + flags if len(frame) > l3 + hl + 12 else size
            size = min(size, seg)
        return size > self.spec.blackhole

    def _ect(self, frame: bytes) -> bool:
        l3 = self._l3(frame)
        return l3 >= 0 and frame[l3 + 1] & 3 in (1, 2)

    def _mark_ce(self, frame: bytes) -> bytes:
        l3 = self._l3(frame)
        hl = (frame[l3] & 0x0F) * 4
        hdr = bytearray(frame[l3:l3 + hl])
        hdr[1] |= 3
        hdr[10:12] = b"\0\0"
        hdr[10:12] = header_checksum(bytes(hdr)).to_bytes(2, "big")
        return b"".join((frame[:l3], hdr, frame[l3 + hl:]))

    def _corrupt(self, frame: bytes) -> bytes:
        buf = bytearray(frame)
        i = self.rng.randrange(len(buf))
        buf[i] ^= 1 << self.rng.randrange(8)
        return bytes(buf)

    def _emit(self, frame: bytes, flags: int, now: float, out: list[tuple[bytes, int]], hold: bool) -> None:
        """Send a frame whose delay is over, through the reorder stage (`hold`:
        its draw said "hold back", honoured unless a frame is held already)."""
        sp = self.spec
        if self._held is not None:
            # Adjacent swap: the successor overtakes the held frame.
            out.append((frame, flags))
            out.append(self._held)
            self.stats.passed += 2
            self._held = None
            return
        if hold:
            self.stats.reordered += 1
            self._held = (frame, flags)
            self._held_until = now + sp.hold
            return
        out.append((frame, flags))
        self.stats.passed += 1

    def _release(self, now: float, out: list[tuple[bytes, int]]) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, f, fl, hold = heapq.heappop(heap)
            self._emit(f, fl, now, out, hold)
        if self._held is not None and self._held_until <= now:
            out.append(self._held)
            self.stats.passed += 1
            self._held = None

    def poll(self, now: float) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        self._release(now, out)
        return out

    def next_deadline(self) -> float | None:
        t = self._heap[0][0] if self._heap else None
        if self._held is not None and (t is None or self._held_until < t):
            t = self._held_until
        return t


# One direction's pipeline, for tools that move frames themselves (netio/bridge.py).
ImpairLane = _Lane


class Impair(DeviceWrapper):
    """Wrap `inner` and impair frames in both directions (see module doc)."""

    def __init__(
        self,
        inner: Device,
        spec: ImpairSpec | str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        self.spec = parse_impair_spec(spec) if isinstance(spec, str) else spec
        self.clock = clock
        self.rx = _Lane(self.spec, "rx", self.spec.rx, inner.l2)
        self.tx = _Lane(self.spec, "tx", self.spec.tx, inner.l2)
        self._rx_ready: list[tuple[bytes, int]] = []

    def recv_batch(self, limit: int = 64) -> list[tuple[bytes, int]]:
        now = self.clock()
        self._rx_ready.extend(self.rx.push(self.inner.recv_batch(limit), now))
        out, self._rx_ready = self._rx_ready[:limit], self._rx_ready[limit:]
        return out

    def send_batch(self, frames: Iterable[Frame]) -> int:
        """Frames accepted (lost ones count as sent: the wire ate them)."""
        frames = list(frames)
        self._tx_out(self.tx.push(((bytes(f), 0) for f in frames), self.clock()))
        return len(frames)

    def _tx_out(self, ready: list[tuple[bytes, int]]) -> None:
        """Hand released frames to the inner device in order, batching runs
        of ordinary frames between super-segments."""
        run: list[bytes] = []
        for f, mss in ready:
            if not mss:
                run.append(f)
                continue
            if run:
                self.inner.send_batch(run)
                run = []
            self.inner.send_gso(f, mss)
        if run:
            self.inner.send_batch(run)

    def send_gso(self, packet: Frame, mss: int) -> bool:
        # A super-segment is one frame to the impairer: lost, delayed or
        # reordered as a whole (it would be segmented behind us on a wire).
        self._tx_out(self.tx.push([(bytes(packet), mss)], self.clock()))
        return True

    def poll(self, now: float | None = None) -> None:
        if now is None:
            now = self.clock()
        self.inner.poll(now)
        self._rx_ready.extend(self.rx.poll(now))
        self._tx_out(self.tx.poll(now))

    def next_deadline(self) -> float | None:
        ds = [d for d in (self.rx.next_deadline(), self.tx.next_deadline(),
                          self.inner.next_deadline()) if d is not None]  # fmt: skip
        if self._rx_ready:
            ds.append(self.clock())
        return min(ds) if ds else None

    def counters(self) -> dict[str, dict[str, int]]:
        return {"rx": self.rx.stats.as_dict(), "tx": self.tx.stats.as_dict()}

