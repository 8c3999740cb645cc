"""The process side of bucket moves (shardstack.migrate) and the rebalancing
policy (shardstack.rebalance), without worker processes: the hold/forward
filter, the transfer framing with real descriptors over a real AF_UNIX
stream, the bucket of a 4-tuple, and the balancer's choices."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

from shardstack.core.wire.ipv4 import str_to_ip
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4
from shardstack.netio import rss

from shardstack import migrate, rebalance
from shardstack import reta as retabook
from shardstack.load import frame_bucket

PEER = str_to_ip("198.18.0.1")
ADDR = str_to_ip("198.18.0.2")


def _frame(sport: int, dport: int = 80, payload: bytes = b"x") -> bytes:
    return build_tcp_ipv4(PEER, ADDR, sport, dport, 1, 1, ACK, 1000, payload=payload)


def test_bucket_of_tuple_is_the_frames_bucket_both_ways():
    rng = random.Random(15)
    for _ in range(2000):
        la, ra = rng.getrandbits(32), rng.getrandbits(32)
        lp, rp = rng.randrange(65536), rng.randrange(65536)
        want = rss.flow_hash(ra, la, rp, lp) & rss.RETA_MASK
        assert migrate.bucket_of(la, lp, ra, rp) == want
        assert migrate.bucket_of(ra, rp, la, lp) == want  # symmetric key
    for _ in range(2000):  # IPv6: 128-bit addresses, the 36-byte tuple
        la, ra = rng.getrandbits(128), rng.getrandbits(128)
        lp, rp = rng.randrange(65536), rng.randrange(65536)
        want = rss.flow_hash6(ra, la, rp, lp) & rss.RETA_MASK
        assert migrate.bucket_of(la, lp, ra, rp) == want
        assert migrate.bucket_of(ra, rp, la, lp) == want
    f = _frame(40000, 7)
    assert frame_bucket(f) == migrate.bucket_of(ADDR, 7, PEER, 40000)
    m = migrate.bucket_match({frame_bucket(f)})
    assert m(ADDR, 7, PEER, 40000)
    assert not migrate.bucket_match(set())(ADDR, 7, PEER, 40000)


def _ports_in(bucket: int, n: int, start: int = 30000) -> list[int]:
    out, p = [], start
    while len(out) < n:
        if frame_bucket(_frame(p)) == bucket:
            out.append(p)
        p += 1
    return out


def test_steer_passes_everything_when_idle():
    got, sent = [], []
    st = migrate.RxSteer(lambda fr, now, ok=None: got.append((list(fr), ok)),
                         lambda w, fr, fl: sent.append(w) or True)
    batch = [_frame(p) for p in range(30000, 30010)]
    st(batch, 1.0, True)
    assert got == [(batch, True)] and not sent and not st.active


def test_steer_holds_in_order_and_forwards_and_passes_the_rest():
    b_hold, b_fwd = 5, 9
    held_ports = _ports_in(b_hold, 3)
    fwd_ports = _ports_in(b_fwd, 2)
    other = [p for p in range(31000, 31100) if frame_bucket(_frame(p)) not in (b_hold, b_fwd)][:4]
    got, sent = [], []
    st = migrate.RxSteer(lambda fr, now, ok=None: got.append((list(fr), ok)),
                         lambda w, fr, fl: sent.append((w, list(fr), fl)) or True)
    st.start_hold([b_hold], 0.0)
    st.set_forward([b_fwd], 3)
    frames = [_frame(p, payload=bytes([i])) for i, p in
              enumerate([held_ports[0], other[0], fwd_ports[0], held_ports[1], other[1],
                         fwd_ports[1], held_ports[2]])]
    st(frames, 1.0, True)
    assert got == [([frames[1], frames[4]], True)]
    assert sent == [(3, [frames[2], frames[5]], b"\x01\x01")]
    st([_frame(other[2])], 1.1, False)  # a second batch, other checksum state
    held = st.take_held([b_hold])
    assert held == [(frames[0], True), (frames[3], True), (frames[6], True)]
    assert st.stats.held == 3 and st.stats.forwarded == 2
    # holding a bucket again cancels its forwarding (it comes back to us)
    st.start_hold([b_fwd], 2.0)
    assert b_fwd not in st.forward
    st.take_held([b_fwd])
    st.clear_forward([b_fwd])
    assert not st.active


def test_steer_counts_a_refused_forward_as_dropped():
    st = migrate.RxSteer(lambda *a: None, lambda w, fr, fl: False)
    p = _ports_in(7, 1)[0]
    st.set_forward([7], 1)
    st([_frame(p)], 0.0, None)
    assert st.stats.forward_dropped == 1 and st.stats.forwarded == 0


def test_transfer_carries_body_and_many_descriptors(tmp_path):
    """More descriptors than one SCM_RIGHTS message takes (SCM_MAX_FD 253):
    every one arrives, in order, each the same open file (checked by
    writing through the received end)."""
    path = str(tmp_path / "m.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    pairs = [socket.socketpair() for _ in range(600)]
    body = {"engine": [{"sd": i, "blob": os.urandom(64)} for i in range(600)],
            "big": os.urandom(3 << 20)}
    got: dict = {}

    def receive():
        c, _ = srv.accept()
        rd = migrate.TransferReader()
        while (done := rd.done()) is None:
            data, anc, _fl, _a = c.recvmsg(1 << 20, migrate.CARRIER_ANC)
            assert data, "EOF before the transfer was complete"
            rd.feed(data, anc)
        got["body"], got["fds"] = done
        c.send(b"K")
        c.close()

    t = threading.Thread(target=receive)
    t.start()
    s = migrate.send_transfer(path, body, [a.fileno() for a, _ in pairs], time.monotonic() + 10)
    assert migrate.wait_ack(s, time.monotonic() + 10)
    s.close()
    t.join(10)
    srv.close()
    assert got["body"] == body
    assert len(got["fds"]) == 600
    for (a, b), fd in zip(pairs, got["fds"], strict=True):
        os.write(fd, b"!")
        assert b.recv(1) == b"!"
        os.close(fd)
        a.close()
        b.close()


def test_transfer_without_receiver_fails_in_time(tmp_path):
    path = str(tmp_path / "slow.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)  # accepts (in the backlog) but never reads nor answers
    t0 = time.monotonic()
    try:
        s = migrate.send_transfer(path, {"x": os.urandom(4 << 20)}, [], t0 + 0.3)
    except OSError:
        pass  # the send itself timed out: the socket buffer is smaller than the body
    else:
        assert not migrate.wait_ack(s, t0 + 0.3)
        s.close()
    assert time.monotonic() - t0 < 1.0
    srv.close()


def _loads(cpu_w: list[float], cpu_b: list[dict[int, float]]) -> list[dict]:
    out = []
    for w, per in zip(cpu_w, cpu_b, strict=True):
        b = [0.0] * rss.RETA_SIZE
        for k, v in per.items():
            b[k] = v
        out.append({"cpu_seconds": w, "cpu": b})
    return out


def _feed(bal, reta, rate_w, rate_b, steps, t0=0.0):
    """Cumulative counters growing at the given rates; the first pick, if any."""
    dt = rebalance.SAMPLE_PERIOD
    for i in range(steps):
        t = t0 + i * dt
        loads = _loads([r * t for r in rate_w],
                       [{k: v * t for k, v in per.items()} for per in rate_b])
        pick = bal.observe(t, reta, loads)
        if pick is not None:
            return t, pick
    return None


def test_balancer_moves_half_the_gap_from_hot_to_cold():
    reta = rss.make_reta(2)
    hot = [0, 2, 4, 6]  # worker 0's buckets carrying 0.2 CPU s/s each
    bal = rebalance.Balancer(2)
    got = _feed(bal, reta, [0.8, 0.1], [{k: 0.2 for k in hot}, {1: 0.1}], 10)
    assert got is not None
    t, (buckets, dst) = got
    assert dst == 1
    # gap 0.7: two 0.2 buckets leave 0.4 / 0.5 (closer than one: 0.6 / 0.3)
    assert set(buckets) <= set(hot) and len(buckets) == 2
    # hysteresis: the window and CONSECUTIVE observations above the threshold
    assert t >= rebalance.SAMPLE_PERIOD * (rebalance.WINDOW + rebalance.CONSECUTIVE - 1)
    # cooldown: no second pick right after
    assert bal.observe(t + 0.1, reta, _loads([1, 1], [{}, {}])) is None


def test_balancer_leaves_a_balanced_or_idle_stack_alone():
    reta = rss.make_reta(2)
    assert _feed(rebalance.Balancer(2), reta, [0.5, 0.45], [{0: 0.5}, {1: 0.45}], 20) is None
    assert _feed(rebalance.Balancer(2), reta, [0.02, 0.0], [{0: 0.02}, {}], 20) is None


def test_choose_buckets_never_overshoots():
    load = [0.0] * rss.RETA_SIZE
    load[0], load[2] = 0.9, 0.05
    # one elephant bucket bigger than the gap: moving it would not help
    assert rebalance.choose_buckets([0, 2], load, 0.95, 0.1) == [2]
    load[2] = 0.0
    # only the elephant is busy: the cold worker would end hotter (0.1 + 0.9 > 0.9)
    assert rebalance.choose_buckets([0, 2], load, 0.9, 0.1) == []
    load[0] = 0.5  # now it lowers the larger load (max(0.4, 0.6) < 0.9)
    assert rebalance.choose_buckets([0, 2], load, 0.9, 0.1) == [0]


def test_reta_book_keeps_the_migrations():
    book = retabook.RetaBook(2)
    rec = migrate.MoveRecord(5, 1, 0, True, 1.0, 0.01, 0.002, 3, 2, 7).as_dict()
    book.record(rec)
    book.record(migrate.MoveRecord(6, 0, 1, False, 2.0, 2.0, 0.0, 0, 0, 0,
                                   reason="no acknowledgement in time").as_dict())
    rep = retabook.report(book, [None, None])
    assert rep["migrations"]["done"] == 1 and rep["migrations"]["aborted"] == 1
    assert rep["migrations"]["last"][0]["held"] == 7
    text = retabook.format_reta(rep)
    assert "1 done, 1 aborted" in text and "no acknowledgement" in text


def test_steer_forwards_other_workers_buckets_while_foreign():
    """A reload successor's first seconds (started owning no bucket): frames
    of buckets the RETA gives to another worker go there (what its
    predecessor left on the queue), its own buckets' frames pass; then,
    foreign off, everything passes."""
    reta = rss.make_reta(2)
    got, sent = [], []
    st = migrate.RxSteer(lambda fr, now, ok=None: got.extend(fr),
                         lambda w, fr, fl: sent.append((w, list(fr))) or True, reta, 1)
    st.set_foreign(True)
    mine = _ports_in(1, 1)[0]  # bucket 1: worker 1's
    theirs = _ports_in(2, 1)[0]  # bucket 2: worker 0's
    a, b = _frame(mine), _frame(theirs)
    st([a, b], 0.0, True)
    assert got == [a] and sent == [(0, [b])]
    reta[2] = 1  # set_reta updates the list in place
    st([b], 0.1, True)
    assert got == [a, b]
    st.set_foreign(False)
    reta[2] = 0
    st([b], 0.2, True)
    assert got == [a, b, b] and not st.active


def _simulate(follows: bool, seconds: float, bucket_rate: dict[int, float],
              base: list[float] | None = None):
    """Drive a Balancer for `seconds` of sampled time and apply its moves to
    the RETA. With `follows`, a worker's CPU is the load of the buckets it
    owns now (long-lived flows: the load moves with its bucket); without,
    the workers' CPU stays `base` whatever moves (load no bucket carries
    along: short connections hashing anywhere next time). The moves made."""
    reta = rss.make_reta(2)
    bal = rebalance.Balancer(2)
    cum_w, cum_b = [0.0, 0.0], [0.0] * rss.RETA_SIZE
    moves, t, dt = [], 0.0, rebalance.SAMPLE_PERIOD
    while t < seconds:
        t += dt
        for k, r in bucket_rate.items():
            cum_b[k] += r * dt
        if follows:
            for k, r in bucket_rate.items():
                cum_w[reta[k]] += r * dt
        else:
            cum_w = [c + r * dt for c, r in zip(cum_w, base, strict=True)]
        loads = [{"cpu_seconds": cum_w[i], "cpu": [cum_b[k] if reta[k] == i else 0.0
                                                   for k in range(rss.RETA_SIZE)]}
                 for i in range(2)]
        pick = bal.observe(t, reta, loads)
        if pick is not None:
            buckets, dst = pick
            for k in buckets:
                reta[k] = dst
            moves.append((t, buckets, dst))
    return moves, reta, bal


def test_balancer_backs_off_when_moves_do_not_pay():
    """Worker 0 stays 1.8x worker 1 whatever buckets move (its load is not
    in the buckets): a few judged moves, then the cooldown grows to
    MAX_COOLDOWN, so two minutes see a handful of moves, not one every
    couple of seconds (the crr/http flapping of 2026-12-07)."""
    rate = {k: 0.01 for k in range(rss.RETA_SIZE)}
    moves, _, bal = _simulate(False, 120.0, rate, base=[0.9, 0.5])
    assert 1 <= len(moves) <= 5
    assert bal.cooldown == rebalance.MAX_COOLDOWN and bal.futile >= 3
    assert all(len(b) <= rebalance.MAX_BUCKETS for _, b, _ in moves)


def test_balancer_moves_that_pay_keep_a_short_cooldown():
    """Long-lived skew (twelve busy buckets on worker 0): the load follows
    each move, so the moves are judged good, the cooldown stays COOLDOWN and
    the workers end within 20 % of the mean, in steps of at most MAX_BUCKETS."""
    busy = [k for k in range(0, 48, 2)][:12]  # even buckets: worker 0's
    rate = {k: 0.1 for k in busy}
    moves, reta, bal = _simulate(True, 20.0, rate)
    assert moves and all(len(b) <= rebalance.MAX_BUCKETS for _, b, _ in moves)
    load = [sum(r for k, r in rate.items() if reta[k] == i) for i in range(2)]
    mean = sum(load) / 2
    assert max(load) <= 1.2 * mean
    assert bal.futile == 0 and bal.cooldown == rebalance.COOLDOWN


def test_choose_buckets_moves_at_most_max_buckets():
    load = [0.0] * rss.RETA_SIZE
    mine = list(range(0, rss.RETA_SIZE, 2))
    for k in mine:
        load[k] = 0.01
    pick = rebalance.choose_buckets(mine, load, 0.64, 0.0)  # the gap wants 32
    assert len(pick) == rebalance.MAX_BUCKETS
