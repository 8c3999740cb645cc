"""HyStart++ (RFC 9406), on by default in CUBIC as Linux's HyStart is: slow start
leaves before a deep bottleneck queue overflows, because the round's minimum
RTT rises; without it, slow start doubles until the queue drops a burst."""

from __future__ import annotations

from core_helpers import B, Bulk, connect_over, make_shard
from shardstack.core import tcp_cubic
from shardstack.core.tcp_cong import INFINITE_SSTHRESH
from shardstack.netio.simlink import LinkParams, SimLink

MIB = 1 << 20


def _slow_start_over_a_deep_queue(hystart: bool, monkeypatch):
    if not hystart:
        monkeypatch.setattr(tcp_cubic.Cubic, "_hystart_ack", lambda *a: None)
    # 20 Mbit/s, 40 ms RTT (BDP 100 KB) in front of a 1 MiB queue (bufferbloat);
    # a send buffer that can fill both.
    params = LinkParams(delay=0.020, bandwidth=20e6 / 8, queue_bytes=MIB)
    a, b = make_shard(sndbuf=4 * MIB), make_shard(B)
    link = SimLink(a, b, seed=5, params=params)
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 8 * MIB)

    def step() -> bool:
        bulk.step()
        return link.stats_ab.queue_drops > 0  # the first overflow is all we need to see

    link.run_until(step, link.now + 1.6)
    return a.sock(c).cc, link


def test_hystart_leaves_slow_start_before_the_queue_overflows(monkeypatch):
    cc, link = _slow_start_over_a_deep_queue(True, monkeypatch)
    assert cc.ssthresh < INFINITE_SSTHRESH  # slow start ended...
    assert link.stats_ab.queue_drops == 0  # ...without a single drop
    assert cc.cwnd * cc.mss < 900 * 1024  # short of BDP + queue (1.1 MB)


def test_without_hystart_slow_start_overflows_the_queue(monkeypatch):
    cc, link = _slow_start_over_a_deep_queue(False, monkeypatch)
    assert link.stats_ab.queue_drops > 0


def test_a_flat_rtt_keeps_slow_start_going():
    # No queue (no bandwidth limit): the RTT stays flat, HyStart++ must not fire.
    params = LinkParams(delay=0.020)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=6, params=params)
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 4 * MIB)
    link.run_until(lambda: bulk.step() and False, link.now + 0.3)  # never done: 0.3 s
    cc = a.sock(c).cc
    assert cc.ssthresh == INFINITE_SSTHRESH and cc.cwnd > 100
