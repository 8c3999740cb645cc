"""A deterministic simulated link between two sans-I/O endpoints, with a fake clock.

This is the test bench's wire (smoltcp's ``FaultInjector`` + a netem-like
link, driven as a discrete-event simulation).  It lives in netio, beside the
real devices and the ``Impair`` wrapper, because it plays the device side:
the engine (core/) never imports it; tests and benches do.  It knows nothing about TCP or
``Shard`` internals: an *endpoint* is any object with

``receive(packet: bytes, now: float) -> None``   a packet arrives
``advance(now: float) -> None``                  fire timers due at ``now``
``take_frames() -> list[bytes]``                 packets the endpoint wants sent
``next_deadline() -> float | None``              when to call ``advance`` next

which is exactly what ``shardstack.core.Shard`` offers.

API sketch::

    link = SimLink(a, b, seed=1, params=LinkParams(delay=0.010, loss=0.01,
                                                  bandwidth=10e6, queue_bytes=64 * 1024))
    # or per direction: SimLink(a, b, a_to_b=LinkParams(...), b_to_a=LinkParams(...))
    a.connect(...)                                   # drive the endpoints' APIs directly
    ok = link.run_until(lambda: b_got_everything(), max_time=60.0)
    link.now                                         # the fake clock (seconds)
    link.stats_ab.lost, link.stats_ba.delivered ...  # LinkStats counters per direction
    link.run_for(0.5)                                # run 0.5 s of simulated time

The clock jumps from event to event: the next packet delivery on either
direction, or the earlier of the two endpoints' ``next_deadline()``.  At each
instant the link first delivers every packet due (in delivery order), then
calls ``advance(now)`` on each endpoint whose deadline has come, then collects
both endpoints' ``take_frames()`` and puts them on the wire at ``now``.  Frames
that endpoints produce while the test drives them directly (``connect``,
``send``) are collected at the start of the next ``run_*`` call, or by
:meth:`SimLink.pump`.

Per packet and direction, in this order (``LinkParams``):

1. *queue* (when ``bandwidth`` is set): the packet waits behind earlier ones
   and takes ``len / bandwidth`` seconds to serialise; if the bytes queued or
   being serialised would exceed ``queue_bytes`` it is tail-dropped
   (``queue_drops``).  Without ``bandwidth`` the link is infinitely fast.
2. ``filter(now, packet) -> bool``: a deterministic drop hook for tests
   ("drop the third data segment"); True drops it (``filtered``).
3. ``loss``: dropped with this probability (``lost``).
4. ``corrupt``: one random bit of a copy is flipped (``corrupted``).
5. ``dup``: a second copy is delivered as well (``duplicated``).
6. ``reorder`` / ``reorder_delay``: with this probability the packet is held
   back an extra ``reorder_delay`` seconds, so later ones overtake it
   (``reordered``).
7. ``delay`` + uniform ``[0, jitter)``: propagation delay.  Jitter alone may
   reorder, as netem's does.

All randomness comes from ``random.Random`` instances seeded from ``seed``
(one stream per direction), so a run is reproducible bit for bit; nothing
reads a real clock.  ``tap(now, direction, packet)`` (direction ``"ab"`` or
``"ba"``) is called for every packet put on the wire, before impairments.

Every loop is bounded: ``run_until`` stops at ``max_time`` of simulated time
and raises ``RuntimeError`` after ``max_steps`` events or when the clock stops
moving (an endpoint reporting a deadline in the past after ``advance``).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Endpoint", "LinkParams", "LinkStats", "SimLink"]


class Endpoint(Protocol):
    """What SimLink needs from each side (the Shard's frame/timer API)."""

    def receive(self, packet: bytes, now: float) -> None: ...

    def advance(self, now: float) -> None: ...

    def take_frames(self) -> list[bytes]: ...

    def next_deadline(self) -> float | None: ...


@dataclass(slots=True)
class LinkParams:
    """Impairments of one direction; probabilities in [0, 1], times in seconds."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    dup: float = 0.0
    corrupt: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.0
    bandwidth: float | None = None  # bytes per second; None: no serialisation delay
    queue_bytes: int = 256 * 1024  # tail-drop limit of the bottleneck queue
    filter: Callable[[float, bytes], bool] | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "dup", "corrupt", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p!r}")
        for name in ("delay", "jitter", "reorder_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("bandwidth must be > 0 bytes/s")
        if self.queue_bytes <= 0:
            raise ValueError("queue_bytes must be > 0")


@dataclass(slots=True)
class LinkStats:
    """What one direction did to the packets it was given."""

    sent: int = 0  # packets handed to the link
    sent_bytes: int = 0
    delivered: int = 0  # packets handed to the receiving endpoint (copies included)
    delivered_bytes: int = 0
    queue_drops: int = 0
    filtered: int = 0
    lost: int = 0
    corrupted: int = 0
    duplicated: int = 0
    reordered: int = 0
    max_queue_bytes: int = 0


@dataclass(slots=True)
class _Direction:
    params: LinkParams
    rng: random.Random
    stats: LinkStats = field(default_factory=LinkStats)
    busy_until: float = 0.0
    # (finish_time, size) of packets in the bottleneck queue, oldest first.
    queue: deque[tuple[float, int]] = field(default_factory=deque)
    queued_bytes: int = 0


class SimLink:
    """Two endpoints joined by a simulated, impaired, deterministic link."""

    def __init__(
        self,
        a: Endpoint,
        b: Endpoint,
        *,
        seed: int = 0,
        params: LinkParams | None = None,
        a_to_b: LinkParams | None = None,
        b_to_a: LinkParams | None = None,
        start: float = 0.0,
        tap: Callable[[float, str, bytes], None] | None = None,
    ) -> None:
        base = params or LinkParams()
        self.a = a
        self.b = b
        self.now = start
        self.tap = tap
        # Independent, reproducible streams per direction (seed-derived, no global RNG).
        self._ab = _Direction(a_to_b or base, random.Random(f"{seed}:ab"))
        self._ba = _Direction(b_to_a or base, random.Random(f"{seed}:ba"))
        # (deliver_at, order, to_b, packet): order keeps FIFO among equal times.
        self._wire: list[tuple[float, int, bool, bytes]] = []
        self._order = 0
        self.steps = 0  # events processed (deliveries + timer instants)
        self.timer_calls = 0  # advance() calls made

    # -- counters ------------------------------------------------------------------------

    @property
    def stats_ab(self) -> LinkStats:
        return self._ab.stats

    @property
    def stats_ba(self) -> LinkStats:
        return self._ba.stats

    @property
    def in_transit(self) -> int:
        """Packets on the wire, not yet delivered."""
        return len(self._wire)

    # -- putting packets on the wire -----------------------------------------------------

    def pump(self) -> int:
        """Collect both endpoints' pending frames and transmit them at ``now``."""
        n = 0
        for pkt in self.a.take_frames():
            self._transmit(self._ab, True, pkt)
            n += 1
        for pkt in self.b.take_frames():
            self._transmit(self._ba, False, pkt)
            n += 1
        return n

    def inject(self, packet: bytes, to_b: bool = True) -> None:
        """Put a hand-made packet on one direction at ``now`` (impairments apply)."""
        self._transmit(self._ab if to_b else self._ba, to_b, bytes(packet))

    def _transmit(self, d: _Direction, to_b: bool, pkt: bytes) -> None:
        p = d.params
        st = d.stats
        now = self.now
        size = len(pkt)
        st.sent += 1
        st.sent_bytes += size
        if self.tap is not None:
            self.tap(now, "ab" if to_b else "ba", pkt)
        t = now
        if p.bandwidth is not None:
            q = d.queue
            while q and q[0][0] <= now:  # packets fully serialised have left the queue
                d.queued_bytes -= q.popleft()[1]
            if d.queued_bytes + size > p.queue_bytes:
                st.queue_drops += 1
                return
            start = max(now, d.busy_until)
            d.busy_until = t = start + size / p.bandwidth
            q.append((t, size))
            d.queued_bytes += size
            if d.queued_bytes > st.max_queue_bytes:
                st.max_queue_bytes = d.queued_bytes
        if p.filter is not None and p.filter(now, pkt):
            st.filtered += 1
            return
        rng = d.rng
        if p.loss and rng.random() < p.loss:
            st.lost += 1
            return
        if p.corrupt and rng.random() < p.corrupt:
            st.corrupted += 1
            buf = bytearray(pkt)
            if buf:
                bit = rng.randrange(len(buf) * 8)
                buf[bit >> 3] ^= 1 << (bit & 7)
            pkt = bytes(buf)
        copies = 1
        if p.dup and rng.random() < p.dup:
            st.duplicated += 1
            copies = 2
        for _ in range(copies):
            at = t + p.delay
            if p.jitter:
                at += rng.random() * p.jitter
            if p.reorder and rng.random() < p.reorder:
                st.reordered += 1
                at += p.reorder_delay
            self._order += 1
            heapq.heappush(self._wire, (at, self._order, to_b, pkt))

    # -- the event loop ------------------------------------------------------------------

    def next_event_time(self) -> float | None:
        """The earliest of the next delivery and both endpoints' deadlines."""
        cands = []
        if self._wire:
            cands.append(self._wire[0][0])
        for ep in (self.a, self.b):
            dl = ep.next_deadline()
            if dl is not None:
                cands.append(dl)
        return min(cands) if cands else None

    def step(self, max_time: float = float("inf")) -> bool:
        """Process the next instant (if it is <= max_time).  False: nothing to do."""
        self.pump()
        t = self.next_event_time()
        if t is None or t > max_time:
            return False
        if t > self.now:
            self.now = t
        now = self.now
        self.steps += 1
        wire = self._wire
        while wire and wire[0][0] <= now:
            _, _, to_b, pkt = heapq.heappop(wire)
            d = self._ab if to_b else self._ba
            d.stats.delivered += 1
            d.stats.delivered_bytes += len(pkt)
            (self.b if to_b else self.a).receive(pkt, now)
        for ep in (self.a, self.b):
            dl = ep.next_deadline()
            if dl is not None and dl <= now:
                ep.advance(now)
                self.timer_calls += 1
        self.pump()
        return True

    def run_until(
        self,
        predicate: Callable[[], bool],
        max_time: float,
        *,
        max_steps: int = 10_000_000,
    ) -> bool:
        """Run events until ``predicate()`` is true (True) or ``now`` would pass
        ``max_time`` or nothing is left to do (False).

        ``max_time`` is an absolute simulated time.  The predicate is checked
        before the first event and after each one.
        """
        self.pump()
        stalled = 0
        last = self.now
        for _ in range(max_steps):
            if predicate():
                return True
            if not self.step(max_time):
                if max_time != float("inf") and self.now < max_time:
                    self.now = max_time  # idle until the horizon, like a real clock
                return predicate()
            if self.now == last:
                stalled += 1
                if stalled > 10_000:
                    raise RuntimeError(f"SimLink clock stuck at t={self.now}: an endpoint "
                                       "keeps reporting a past deadline after advance()")
            else:
                stalled = 0
                last = self.now
        raise RuntimeError(f"SimLink.run_until: more than {max_steps} events")

    def run_for(self, duration: float, *, max_steps: int = 10_000_000) -> None:
        """Run all events in the next ``duration`` seconds of simulated time."""
        self.run_until(lambda: False, self.now + duration, max_steps=max_steps)
