"""Wrap-safe sequence arithmetic (the engine across 2**32) and the timer heap."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from core_helpers import ACK, PSH, Peer, listen, make_shard, passive_open
from shardstack.core import tcp_input
from shardstack.core.tcp_timer import TimerHeap, TimerKind


@pytest.mark.parametrize("fast", [True, False])
def test_receive_across_the_sequence_wrap(fast, monkeypatch):
    """The peer's sequence numbers wrap past 2**32 - 1 mid-stream: in-order data,
    a segment ahead of a hole (SACKed), the hole filled, all across the wrap, on the
    fast path and on the slow one (tcp_h's inline idiom, RFC 9293 §3.4)."""
    monkeypatch.setattr(tcp_input, "HEADER_PREDICTION", fast)
    sh = make_shard()
    peer = Peer(sh)
    isn = 0xFFFFFFFF - 2500  # data starts 2500 bytes before the wrap
    sd, sa = passive_open(peer, listen(sh), isn, sack_perm=True)
    ack = sa.seq + 1
    seq = isn + 1
    data = bytes(range(256)) * 24  # 6144 bytes: 3 x 2048
    peer.send(ACK | PSH, seq, ack, payload=data[:2048])
    assert peer.recv()[-1].ack == (seq + 2048) & 0xFFFFFFFF
    # The third piece (past the wrap) before the second, which straddles it.
    peer.send(ACK | PSH, seq + 4096, ack, payload=data[4096:])
    out = peer.recv()[-1]
    assert out.ack == (seq + 2048) & 0xFFFFFFFF
    assert out.sack == (((seq + 4096) & 0xFFFFFFFF, (seq + 6144) & 0xFFFFFFFF),)
    peer.send(ACK | PSH, seq + 2048, ack, payload=data[2048:4096])
    out = peer.recv()[-1]
    assert out.ack == (seq + 6144) & 0xFFFFFFFF and out.ack < isn and not out.sack
    assert sh.recv(sd, 10000) == data


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
