"""The timer heap stays bounded on long-lived connections and still fires on time.

Regression for the profiling finding: re-arming the retransmit timer on every
request/response round trip left one stale heap entry per round trip (1,985
entries after 2,000 round trips) and made every heap operation slower.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from core_helpers import A, parse
from shardstack.core.tcp_h import TCP_DELACK
from shardstack.core.tcp_recovery import _TLP_RTO_MARGIN
from shardstack.core.tcp_timer import TimerHeap, TimerKind
from shardstack.netio.simlink import LinkParams, SimLink
from test_data import connected_sim


@dataclass(eq=False)
class FakeSock:
    name: int
    timers: list = field(default_factory=lambda: [None] * 8)
    timer_seq: list = field(default_factory=lambda: [0] * 8)
    timer_q: list = field(default_factory=lambda: [None] * 8)


def _rr(link: SimLink, a, c, b, s, size: int = 64) -> None:
    """One request/response round trip; both sides read what they got."""
    a.send(c, b"q" * size, link.now)
    assert link.run_until(lambda: b.sock(s).rcvq_len >= size, link.now + 5.0)
    assert b.recv(s, 1 << 16) == b"q" * size
    b.send(s, b"r" * size, link.now)
    assert link.run_until(lambda: a.sock(c).rcvq_len >= size, link.now + 5.0)
    assert a.recv(c, 1 << 16) == b"r" * size


def test_heap_bounded_over_10000_round_trips_on_one_connection():
    a, b, link, c, s = connected_sim(LinkParams(delay=0.0001))
    a.setsockopt(c, 6, 1, 1)  # TCP_NODELAY: each request leaves at once
    b.setsockopt(s, 6, 1, 1)
    sizes = []
    for _ in range(10_000):
        _rr(link, a, c, b, s)
        sizes.append((len(a.timers.heap), len(b.timers.heap)))
    # One connection on each side: at most one entry per timer kind, plus the
    # listener's leftovers on b; nowhere near one per round trip.
    assert max(max(x) for x in sizes) <= 8
    # The round trips took ~2 s of simulated time: RTO entries re-queued, none piled up.
    assert link.now > 1.0
    assert a.stats.rto_fires == 0 and b.stats.rto_fires == 0


def test_timers_fire_at_exact_times_after_many_round_trips():
    lose = {"next_request": False}

    def drop(now: float, pkt: bytes) -> bool:
        seg = parse(pkt)
        if lose["next_request"] and seg.src == A and seg.payload:
            lose["next_request"] = False
            return True
        return False

    a, b, link, c, s = connected_sim(LinkParams(delay=0.0001, filter=drop))
    a.setsockopt(c, 6, 1, 1)
    b.setsockopt(s, 6, 1, 1)
    for _ in range(500):
        _rr(link, a, c, b, s)
    tap: list = []
    link.tap = lambda now, d, pkt: tap.append((now, d, parse(pkt)))
    # Delayed ACK: quick-ack mode is long over, so b answers a lone small
    # segment after exactly TCP_DELACK (nothing to piggyback on).
    t0 = link.now
    a.send(c, b"x" * 10, t0)
    assert link.run_until(lambda: any(d == "ba" for _, d, _ in tap), t0 + 1.0)
    sent = [t for t, d, seg in tap if d == "ab" and seg.payload]
    acks = [t for t, d, seg in tap if d == "ba"]
    assert sent == [pytest.approx(t0)]
    assert acks[0] == pytest.approx(t0 + 0.0001 + TCP_DELACK, abs=1e-9)
    link.run_for(0.01)
    b.recv(s, 100)
    # Lose the next request: a lone segment's tail loss probe would come after the
    # RTO (2 SRTT + 200 ms), so it goes exactly _TLP_RTO_MARGIN before the RTO
    # instead (Linux: the probe takes the RTO's place) and no RTO fires.
    tap.clear()
    lose["next_request"] = True
    t1 = link.now
    rto = a.sock(c).rto
    rto_fires = a.stats.rto_fires
    a.send(c, b"y" * 10, t1)
    assert link.run_until(lambda: b.sock(s).rcvq_len == 10, t1 + 5.0)
    data_times = [t for t, d, seg in tap if d == "ab" and seg.payload]
    assert data_times[:2] == [pytest.approx(t1),
                              pytest.approx(t1 + rto - _TLP_RTO_MARGIN, abs=1e-9)]
    assert a.stats.rto_fires == rto_fires and a.stats.tlp_probes >= 1


def test_model_random_arms_and_cancels_fire_exactly_and_stay_bounded():
    """Against a plain dict model: same due times, same order, heap O(live timers)."""
    rnd = random.Random(7)
    h = TimerHeap()
    socks = [FakeSock(i) for i in range(20)]
    model: dict[tuple[int, int], float] = {}
    now = 0.0
    fired_h: list = []
    fired_m: list = []
    max_len = 0
    for _ in range(6_000):
        op = rnd.random()
        sk = rnd.choice(socks)
        kind = rnd.randrange(8)
        if op < 0.55:
            d = now + rnd.choice((0.001, 0.04, 0.2, 1.0, 7200.0)) * rnd.random()
            h.arm(sk, kind, d)
            model[(sk.name, kind)] = d
        elif op < 0.8:
            if rnd.random() < 0.5:
                h.cancel(sk, kind)
            else:
                sk.timers[kind] = None  # the fast path cancels by writing the slot
            model.pop((sk.name, kind), None)
        else:
            now += rnd.random() * 0.05
            while (due := h.pop_due(now)) is not None:
                fired_h.append((due[0], due[1].name))
            for key, d in sorted(model.items(), key=lambda kv: kv[1]):
                if d <= now:
                    fired_m.append((key[1], key[0]))
                    del model[key]
            assert sorted(fired_h) == sorted(fired_m)
            nd = h.next_deadline()
            assert nd == (min(model.values()) if model else None)
        max_len = max(max_len, len(h.heap))
    assert fired_m  # the model exercised firing
    assert max_len <= max(TimerHeap.COMPACT_MIN, 2 * 20 * 8) + 1


def test_dead_socket_entries_are_compacted_away():
    h = TimerHeap()
    for i in range(5000):
        sk = FakeSock(i)
        h.arm(sk, TimerKind.KEEPALIVE, 7200.0 + i)
        h.cancel_all(sk)  # the connection closed long before its keepalive
    assert len(h.heap) <= TimerHeap.COMPACT_MIN + 1
    assert h.next_deadline() is None
