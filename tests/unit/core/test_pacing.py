"""Pacing and delivery-rate sampling (core/tcp_pacing.py, core/tcp_rate.py), over a
simulated link: the pacing rate follows cwnd/SRTT with Linux's 200 % / 120 %
ratios and SO_MAX_PACING_RATE's cap, paced departures are spread len/rate apart
instead of leaving in a burst, super-segments shrink to the rate, the delivery
rate measures the bottleneck, and an application that does not fill the window
gets its samples flagged app-limited (TCP_INFO, as ``ss -ti`` shows them)."""

from __future__ import annotations

import socket
import statistics

import pytest
from core_helpers import B, Bulk, connect_over, make_shard, parse
from shardstack.core import tcp_pacing
from shardstack.core.shard import SO_MAX_PACING_RATE
from shardstack.core.tcp_info import tcp_get_info, unpack_tcp_info
from shardstack.netio.simlink import LinkParams, SimLink

MIB = 1 << 20
SOL = socket.SOL_SOCKET


def _info(sh, sd, now):
    return unpack_tcp_info(tcp_get_info(sh.sock(sd), now))


def _expected_rate(sk) -> int:
    """tcp_update_pacing_rate's formula, from the socket's own state."""
    cc = sk.cc
    out = (sk.snd_nxt - sk.snd_una) & 0xFFFFFFFF
    cwnd = max(cc.cwnd, -(-out // sk.mss_cache))
    ratio = 200 if cwnd < cc.ssthresh // 2 else 120
    return min(int(sk.mss_cache * cwnd * ratio / (100 * sk.srtt)), sk.max_pacing_rate)


def _data_departures(link_taps, src_port=None):
    """(time, payload length) of every data segment a sent, in order."""
    out = []
    for t, direction, pkt in link_taps:
        if direction != "ab":
            continue
        seg = parse(pkt)
        if seg.payload:
            out.append((t, len(seg.payload)))
    return out


def _paced_pair(rate: int | None, *, tso: int = 0, delay: float = 0.010, seed: int = 1):
    taps: list = []
    a, b = make_shard(tso_max=tso), make_shard(B)
    link = SimLink(a, b, seed=seed, params=LinkParams(delay=delay, bandwidth=125e6,
                                                      queue_bytes=4 * MIB),
                   tap=lambda t, d, p: taps.append((t, d, p)))
    c, s = connect_over(link, a, b)
    if rate is not None:
        a.setsockopt(c, SOL, SO_MAX_PACING_RATE, rate)
    return a, b, link, c, s, taps


def test_pacing_rate_follows_cwnd_and_srtt_in_slow_start():
    a, b, link, c, s, _ = _paced_pair(None)
    sk = a.sock(c)
    # Right after the handshake: from the SYN's RTT sample and the initial window.
    assert _info(a, c, link.now)["pacing_rate"] == _expected_rate(sk) > 0
    bulk = Bulk(link, a, c, b, s, 256 * 1024)
    assert link.run_until(bulk.step, link.now + 10.0)
    link.run_for(0.1)  # everything acknowledged
    assert sk.cc.ssthresh > 2 * sk.cc.cwnd  # still slow start: the 200 % ratio
    info = _info(a, c, link.now)
    assert info["pacing_rate"] == _expected_rate(sk)
    assert abs(info["pacing_rate"] - int(sk.mss_cache * sk.cc.cwnd * 2.0 / sk.srtt)) <= 1
    assert info["max_pacing_rate"] == tcp_pacing.NO_PACING_RATE  # ~0: no cap, as Linux
    assert not sk.pacing_needed  # CUBIC without SO_MAX_PACING_RATE: computed, not enforced


def test_pacing_rate_uses_the_ca_ratio_after_a_loss():
    # A bottleneck with a small queue: slow start overflows it, recovery sets
    # ssthresh, and congestion avoidance paces at 120 % of cwnd/SRTT.  A paced
    # sender (ShardConfig.pacing) updates its rate on every ACK.
    a, b = make_shard(pacing=True), make_shard(B)
    link = SimLink(a, b, seed=3, params=LinkParams(delay=0.005, bandwidth=2e6,
                                                   queue_bytes=30_000))
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 3 * MIB)
    assert link.run_until(bulk.step, link.now + 60.0)
    link.run_for(0.5)
    sk = a.sock(c)
    assert sk.recoveries >= 1
    cc = sk.cc
    assert sk.pacing_needed
    assert cc.cwnd >= cc.ssthresh // 2  # congestion avoidance: the 120 % ratio
    assert sk.pacing_rate == _expected_rate(sk) == _info(a, c, link.now)["pacing_rate"]
    assert abs(sk.pacing_rate - int(sk.mss_cache * cc.cwnd * 1.2 / sk.srtt)) <= 1


def test_so_max_pacing_rate_caps_the_rate_and_reads_back():
    a, b, link, c, s, _ = _paced_pair(300_000)
    sk = a.sock(c)
    assert a.getsockopt(c, SOL, SO_MAX_PACING_RATE) == 300_000
    assert sk.pacing_needed  # Linux: SK_PACING_NONE -> SK_PACING_NEEDED
    bulk = Bulk(link, a, c, b, s, 512 * 1024)
    assert link.run_until(bulk.step, link.now + 30.0)
    assert int(sk.mss_cache * sk.cc.cwnd * 1.2 / sk.srtt) > 300_000  # uncapped would be higher
    assert sk.pacing_rate == 300_000
    info = _info(a, c, link.now)
    assert info["pacing_rate"] == info["max_pacing_rate"] == 300_000
    # ~0U (a C int's -1) removes the cap; Linux leaves pacing switched on.
    a.setsockopt(c, SOL, SO_MAX_PACING_RATE, -1)
    assert _info(a, c, link.now)["max_pacing_rate"] == tcp_pacing.NO_PACING_RATE
    assert a.getsockopt(c, SOL, SO_MAX_PACING_RATE) == 0xFFFFFFFF
    # An 8-byte value is an unsigned long.
    a.setsockopt(c, SOL, SO_MAX_PACING_RATE, (5 << 32).to_bytes(8, "little"))
    assert sk.max_pacing_rate == 5 << 32


def test_paced_departures_are_spread_len_over_rate_apart():
    rate = 1_000_000  # bytes/s: a 1448-byte segment every 1.448 ms
    a, b, link, c, s, taps = _paced_pair(rate)
    bulk = Bulk(link, a, c, b, s, 300 * 1024)
    assert link.run_until(bulk.step, link.now + 30.0)
    deps = _data_departures(taps)
    assert sum(n for _t, n in deps) == 300 * 1024
    # Linux paces from the 11th data segment on (the initial window leaves at once).
    assert deps[9][0] - deps[0][0] < 1e-9
    paced = deps[10:]
    gaps = [t1 - t0 for (t0, _n), (t1, _m) in zip(paced, paced[1:], strict=False)]
    assert min(gaps) > 0.0  # no two paced segments leave together
    assert statistics.median(gaps) == pytest.approx(1448 / rate, rel=0.05)
    # Overall, the paced part leaves at the rate (and not faster).
    span = paced[-1][0] - paced[0][0]
    sent = sum(n for _t, n in paced[:-1])
    assert sent / span == pytest.approx(rate, rel=0.05)
    assert a.sock(c).pacing_rate == rate


def test_unpaced_sender_bursts():
    # The control for the test above: same link and transfer, no SO_MAX_PACING_RATE:
    # whole windows leave at one instant (CUBIC without fq is not paced by Linux).
    a, b, link, c, s, taps = _paced_pair(None)
    bulk = Bulk(link, a, c, b, s, 300 * 1024)
    assert link.run_until(bulk.step, link.now + 30.0)
    deps = _data_departures(taps)
    gaps = [t1 - t0 for (t0, _n), (t1, _m) in zip(deps, deps[1:], strict=False)]
    assert sum(1 for g in gaps if g == 0.0) > len(gaps) // 2


def test_super_segments_carry_about_a_millisecond_of_the_rate():
    # tcp_tso_autosize: at 2 MB/s ~2 KB per ms, i.e. the 2-segment minimum; an
    # unpaced sender sends full 64 KiB super-segments (the engine autosizes
    # only paced flows: tcp_pacing's docstring).
    a, b, link, c, s, taps = _paced_pair(2_000_000, tso=65000, delay=0.010)
    bulk = Bulk(link, a, c, b, s, 400 * 1024)
    assert link.run_until(bulk.step, link.now + 30.0)
    mss = a.sock(c).mss_cache
    sizes = [n for _t, n in _data_departures(taps)]
    assert max(sizes[3:]) <= 2 * mss  # after the first (unpaced) burst
    a2, b2, link2, c2, s2, taps2 = _paced_pair(None, tso=65000, delay=0.0002)
    bulk2 = Bulk(link2, a2, c2, b2, s2, 400 * 1024)
    assert link2.run_until(bulk2.step, link2.now + 30.0)
    assert max(n for _t, n in _data_departures(taps2)) > 20 * mss
    # Paced on a sub-millisecond path: the RTT term lets the whole GSO size
    # through, so pacing costs a LAN nothing.
    a3, b3, link3, c3, s3, taps3 = _paced_pair(100_000_000, tso=65000, delay=0.0002)
    bulk3 = Bulk(link3, a3, c3, b3, s3, 2 * MIB)
    assert link3.run_until(bulk3.step, link3.now + 30.0)
    assert a3.sock(c3).pacing_needed
    assert max(n for _t, n in _data_departures(taps3)[12:]) > 20 * mss


def test_delivery_rate_measures_the_bottleneck():
    bw = 1.25e6  # bytes/s of IP frames
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=4, params=LinkParams(delay=0.005, bandwidth=bw,
                                                   queue_bytes=2 * MIB))
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 2 * MIB)
    assert link.run_until(bulk.step, link.now + 60.0)
    link.run_for(0.1)  # the last ACKs
    info = _info(a, c, link.now)
    mss = a.sock(c).mss_cache
    goodput = bw * mss / (mss + 52)  # payload share of each frame
    assert info["delivery_rate"] == pytest.approx(goodput, rel=0.1)
    assert info["delivery_rate_app_limited"] == 0
    assert info["delivered"] >= 2 * MIB // mss


def test_app_limited_sender_is_flagged():
    # 1000 bytes every 50 ms on a 12.5 MB/s path: the window is never full,
    # the samples measure the application (20 kB/s), and say so.
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=5, params=LinkParams(delay=0.005, bandwidth=12.5e6))
    c, s = connect_over(link, a, b)
    for _ in range(20):
        assert a.send(c, b"x" * 1000, link.now) == 1000
        link.run_for(0.05)
        while b.recv(s, 65536):
            pass
    info = _info(a, c, link.now)
    assert info["delivery_rate_app_limited"] == 1
    assert 0 < info["delivery_rate"] < 1e6
    # Then a bulk transfer fills the window: samples are the path's again.
    bulk = Bulk(link, a, c, b, s, 2 * MIB)
    assert link.run_until(bulk.step, link.now + 30.0)
    info = _info(a, c, link.now)
    assert info["delivery_rate_app_limited"] == 0
    assert info["delivery_rate"] > 2e6


def test_a_zero_rtt_path_gives_a_finite_rate():
    # Two shards in one process, frames handed over at once: every RTT sample
    # is 0 and SRTT decays towards 0 (through subnormal floats); the rate must
    # stay a finite integer (Linux's srtt_us floor: 1/8 µs), not abort the
    # connection with an OverflowError.
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=6, params=LinkParams())
    c, s = connect_over(link, a, b)
    data = memoryview(bytes(24 * MIB))  # ~8000 zero RTT samples: SRTT < 1e-300
    sent = got = 0
    now = link.now
    for _ in range(200_000):
        if got == len(data):
            break
        now += 0.0001
        if sent < len(data):
            sent += a.send(c, data[sent:], now)
        b.receive_batch(a.take_frames(), now)
        while chunk := b.recv(s, 1 << 22):
            got += len(chunk)
        a.receive_batch(b.take_frames(), now)
    assert got == len(data)
    sk = a.sock(c)
    assert sk.srtt < 1e-6 and 0 < _info(a, c, now)["pacing_rate"] < tcp_pacing.NO_PACING_RATE
