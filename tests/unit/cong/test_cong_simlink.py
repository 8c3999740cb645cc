"""SimLink driven by two tiny fake endpoints (no Shard involved)."""

from __future__ import annotations

import pytest
from shardstack.netio.simlink import LinkParams, SimLink


class Fake:
    """Sends scheduled packets from its timer, records arrivals, optionally echoes."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.out: list[bytes] = []
        self.got: list[tuple[float, bytes]] = []
        self.timers: list[tuple[float, bytes]] = []
        self.advanced: list[float] = []

    def schedule(self, at: float, pkt: bytes) -> None:
        self.timers.append((at, pkt))
        self.timers.sort()

    def receive(self, packet: bytes, now: float) -> None:
        self.got.append((now, packet))
        if self.echo:
            self.out.append(b"re:" + packet)

    def advance(self, now: float) -> None:
        self.advanced.append(now)
        while self.timers and self.timers[0][0] <= now:
            self.out.append(self.timers.pop(0)[1])

    def take_frames(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> float | None:
        return self.timers[0][0] if self.timers else None


def numbered(n: int, size: int = 100) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(n)]


def test_delay_round_trip_and_timer_instants() -> None:
    a, b = Fake(), Fake(echo=True)
    a.schedule(0.5, b"ping")
    link = SimLink(a, b, params=LinkParams(delay=0.010))
    assert link.run_until(lambda: bool(a.got), max_time=10.0)
    assert b.got == [(pytest.approx(0.510), b"ping")]
    assert a.got == [(pytest.approx(0.520), b"re:ping")]
    assert a.advanced == [0.5]  # advance() only when the deadline came
    assert link.now == pytest.approx(0.520)
    assert link.stats_ab.delivered == 1 and link.stats_ba.delivered == 1


def test_frames_made_outside_run_are_pumped_at_now() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, params=LinkParams(delay=0.001), start=3.0)
    a.out.append(b"x")
    link.run_for(1.0)
    assert b.got == [(pytest.approx(3.001), b"x")]
    assert link.now == pytest.approx(4.0)  # idles to the horizon


def test_serialisation_delay_and_tail_drop() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, params=LinkParams(delay=0.002, bandwidth=1_000_000, queue_bytes=5000))
    a.out.extend(numbered(8, 1000))
    link.run_for(1.0)
    # 1000 B at 1 MB/s = 1 ms each; only 5000 B fit the queue, the rest is tail-dropped.
    assert [t for t, _ in b.got] == pytest.approx([0.003, 0.004, 0.005, 0.006, 0.007])
    assert [p[:4] for _, p in b.got] == [i.to_bytes(4, "big") for i in range(5)]
    assert link.stats_ab.queue_drops == 3
    assert link.stats_ab.max_queue_bytes == 5000


def test_queue_drains_over_time() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, params=LinkParams(bandwidth=1000, queue_bytes=200))
    a.out.extend(numbered(2, 100))
    link.pump()
    a.schedule(0.15, numbered(1, 100)[0])  # one packet has left the queue by then
    a.schedule(0.15, numbered(1, 100)[0])  # ...but not two
    link.run_for(2.0)
    assert link.stats_ab.queue_drops == 1
    assert len(b.got) == 3


def test_loss_rate_and_reproducibility() -> None:
    def run(seed: int) -> list[bytes]:
        a, b = Fake(), Fake()
        link = SimLink(a, b, seed=seed, params=LinkParams(loss=0.2, delay=0.001))
        a.out.extend(numbered(5000))
        link.run_for(1.0)
        assert link.stats_ab.lost + len(b.got) == 5000
        return [p for _, p in b.got]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    # Binomial(5000, 0.2): mean 1000, sd ~28; 6 sd either way.
    assert 830 < 5000 - len(first) < 1170


def test_per_direction_parameters() -> None:
    a, b = Fake(echo=True), Fake(echo=True)
    link = SimLink(a, b, a_to_b=LinkParams(delay=0.1), b_to_a=LinkParams(delay=0.3, loss=1.0))
    a.out.append(b"p")
    link.run_for(1.0)
    assert b.got == [(pytest.approx(0.1), b"p")]
    assert a.got == []
    assert link.stats_ba.lost == 1 and link.stats_ab.lost == 0


def test_duplication() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, seed=3, params=LinkParams(dup=0.5))
    a.out.extend(numbered(1000))
    link.run_for(1.0)
    assert len(b.got) == 1000 + link.stats_ab.duplicated
    assert 400 < link.stats_ab.duplicated < 600
    assert len({p for _, p in b.got}) == 1000


def test_reordering_holds_packets_back() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, seed=5, params=LinkParams(delay=0.01, bandwidth=100_000,
                                                   reorder=0.1, reorder_delay=0.05))
    a.out.extend(numbered(200))
    link.run_for(5.0)
    seqs = [int.from_bytes(p[:4], "big") for _, p in b.got]
    assert sorted(seqs) == list(range(200))
    # Packet i finishes serialising at (i+1) ms; it arrives 10 ms later, or 60 ms if held.
    held = set()
    for t, p in b.got:
        i = int.from_bytes(p[:4], "big")
        base = 0.001 * (i + 1) + 0.01
        if t == pytest.approx(base + 0.05):
            held.add(i)
        else:
            assert t == pytest.approx(base)
    assert len(held) == link.stats_ab.reordered > 5
    late = {seqs[i] for i in range(1, len(seqs)) if seqs[i] < max(seqs[:i])}
    assert late and late <= held  # only held packets are overtaken


def test_corruption_flips_one_bit() -> None:
    a, b = Fake(), Fake()
    link = SimLink(a, b, seed=11, params=LinkParams(corrupt=1.0))
    orig = numbered(50)
    a.out.extend(orig)
    link.run_for(1.0)
    assert link.stats_ab.corrupted == 50
    for o, (_, p) in zip(orig, b.got, strict=True):
        diff = sum(bin(x ^ y).count("1") for x, y in zip(o, p, strict=True))
        assert diff == 1


def test_filter_drops_chosen_packets_and_tap_sees_all() -> None:
    a, b = Fake(), Fake()
    seen: list[tuple[str, bytes]] = []
    link = SimLink(a, b, params=LinkParams(filter=lambda now, p: p[:4] == (2).to_bytes(4, "big")),
                   tap=lambda now, d, p: seen.append((d, p[:4])))
    a.out.extend(numbered(4))
    link.run_for(1.0)
    assert [int.from_bytes(p[:4], "big") for _, p in b.got] == [0, 1, 3]
    assert link.stats_ab.filtered == 1
    assert len(seen) == 4 and all(d == "ab" for d, _ in seen)


def test_run_until_false_at_horizon_and_stuck_endpoint_raises() -> None:
    a, b = Fake(), Fake()
    a.schedule(5.0, b"late")
    link = SimLink(a, b)
    assert not link.run_until(lambda: bool(b.got), max_time=2.0)
    assert link.now == 2.0 and b.got == []
    assert link.run_until(lambda: bool(b.got), max_time=6.0)

    class Stuck(Fake):
        def next_deadline(self) -> float | None:
            return 0.0

    link = SimLink(Stuck(), Fake())
    with pytest.raises(RuntimeError):
        link.run_until(lambda: False, max_time=1.0)


def test_bad_parameters_rejected() -> None:
    with pytest.raises(ValueError):
        LinkParams(loss=1.5)
    with pytest.raises(ValueError):
        LinkParams(bandwidth=0)
