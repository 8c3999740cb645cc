"""Wrap-safe sequence arithmetic and the timer heap."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardstack.core.seq import (
    seq_add,
    seq_between,
    seq_geq,
    seq_gt,
    seq_leq,
    seq_lt,
    seq_sub,
)
from shardstack.core.tcp_timer import TimerHeap, TimerKind


def test_seq_compare_across_wrap():
    top = 0xFFFFFFF0
    assert seq_add(top, 0x20) == 0x10
    assert seq_lt(top, 0x10) and seq_gt(0x10, top)
    assert seq_leq(5, 5) and seq_geq(5, 5) and not seq_lt(5, 5) and not seq_gt(5, 5)
    assert seq_sub(0x10, top) == 0x20 and seq_sub(top, 0x10) == -0x20
    assert seq_between(top, 0x5, 0x10) and not seq_between(0x10, top, 0x20)
    # half the space away is "before" (RFC 1982 leaves it undefined; we pick one side)
    assert seq_lt(0, 0x7FFFFFFF) and seq_gt(0, 0x80000001)


@dataclass(eq=False)
class FakeSock:
    timers: list = field(default_factory=lambda: [None] * 8)
    timer_seq: list = field(default_factory=lambda: [0] * 8)
    timer_q: list = field(default_factory=lambda: [None] * 8)


def drain(heap: TimerHeap, now: float):
    out = []
    while (due := heap.pop_due(now)) is not None:
        out.append(due)
    return out


def test_timer_fires_once_at_deadline():
    h = TimerHeap()
    sk = FakeSock()
    h.arm(sk, TimerKind.DELACK, 1.0)
    assert h.next_deadline() == 1.0
    assert drain(h, 0.999) == []
    assert drain(h, 1.0) == [(TimerKind.DELACK, sk)]
    assert drain(h, 5.0) == [] and h.next_deadline() is None


def test_cancel_is_lazy_and_rearm_later_does_not_grow_heap():
    h = TimerHeap()
    sk = FakeSock()
    h.arm(sk, TimerKind.RETRANSMIT, 1.0)
    for i in range(1000):
        h.arm(sk, TimerKind.RETRANSMIT, 1.0 + i * 0.001)  # pushed later on every ACK
    assert len(h.heap) == 1
    assert h.next_deadline() == 1.0 + 999 * 0.001
    h.cancel(sk, TimerKind.RETRANSMIT)
    assert h.next_deadline() is None


def test_rearm_earlier_and_kinds_are_independent():
    h = TimerHeap()
    a, b = FakeSock(), FakeSock()
    h.arm(a, TimerKind.KEEPALIVE, 10.0)
    h.arm(a, TimerKind.KEEPALIVE, 5.0)
    h.arm(a, TimerKind.PERSIST, 7.0)
    h.arm(b, TimerKind.TIME_WAIT, 6.0)
    assert drain(h, 20.0) == [(TimerKind.KEEPALIVE, a), (TimerKind.TIME_WAIT, b),
                              (TimerKind.PERSIST, a)]


def test_alternating_earlier_and_later_arms_keep_one_live_entry():
    h = TimerHeap()
    sk = FakeSock()
    t = 0.0
    for i in range(500):
        t += 0.01
        # an RTO that shrinks (earlier) and then moves on with the clock (later)
        h.arm(sk, TimerKind.RETRANSMIT, t + (0.5 if i % 2 else 0.3))
        h.next_deadline()
    assert len(h.heap) <= 3
    assert drain(h, t + 0.29) == []
    assert drain(h, t + 1.0) == [(TimerKind.RETRANSMIT, sk)]
    assert h.next_deadline() is None
