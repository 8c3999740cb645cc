"""Loss recovery end to end: two Shards over an impaired SimLink (RFC 6675, 6937, 6582, 2883).

Every transfer is checked on the wire (``wire_oracle.Watched``): no segment
may carry a byte its sender had already been told (by a delivered ACK or SACK
block) was received.
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from core_helpers import B, connect_over, make_shard
from shardstack.netio.simlink import LinkParams, SimLink
from test_data import transfer
from wire_oracle import Watched


def watched_pair(params: LinkParams, seed: int = 1, **kw):
    a = Watched(make_shard(**kw))
    b = Watched(make_shard(B, **kw))
    link = SimLink(a, b, seed=seed, params=params)
    c, s = connect_over(link, a.shard, b.shard, timeout=60.0)
    return a, b, link, c, s


def both_ways(params: LinkParams, size: int, seed: int = 1, max_time: float = 600.0, **kw):
    rnd = random.Random(seed)
    up, down = rnd.randbytes(size), rnd.randbytes(size)
    a, b, link, c, s = watched_pair(params, seed, **kw)
    t0 = time.perf_counter()
    got_up = transfer(link, a.shard, c, b.shard, s, up, max_time)
    got_down = transfer(link, b.shard, s, a.shard, c, down, max_time)
    wall = time.perf_counter() - t0
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert a.violations == [] and b.violations == []
    return a, b, link, c, s, wall


def _sum(a, b, name: str) -> int:
    return getattr(a.shard.stats, name) + getattr(b.shard.stats, name)


MIB = 1 << 20


@pytest.mark.parametrize("loss", [0.01, 0.05])
def test_random_loss_recovers_mostly_by_fast_retransmit(loss):
    params = LinkParams(delay=0.010, loss=loss)
    a, b, link, c, s, _ = both_ways(params, MIB)
    lost = link.stats_ab.lost + link.stats_ba.lost
    assert lost > 0
    fr, rto = _sum(a, b, "fast_retrans"), _sum(a, b, "rto_fires")
    assert fr > 0
    assert fr > rto  # SACK recovery handles most losses without a timeout
    # PRR: cwnd never grows above its pre-recovery value while recovering.
    assert a.max_recovery_cwnd_ratio <= 1.0 and b.max_recovery_cwnd_ratio <= 1.0


def test_twenty_percent_loss_still_delivers():
    params = LinkParams(delay=0.005, loss=0.20)
    a, b, link, c, s, _ = both_ways(params, MIB // 4, max_time=3000.0)
    assert _sum(a, b, "rto_fires") > 0  # at 20% retransmissions are lost too
    assert _sum(a, b, "fast_retrans") > 0


def test_reordering_without_loss_needs_no_timeout():
    params = LinkParams(delay=0.005, reorder=0.05, reorder_delay=0.003)
    a, b, link, c, s, _ = both_ways(params, MIB)
    assert link.stats_ab.reordered + link.stats_ba.reordered > 0
    assert _sum(a, b, "rto_fires") == 0
    # Reordering beyond RACK's window causes spurious fast retransmits; the
    # receiver's D-SACKs prove them so and the cwnd reductions are undone.
    assert _sum(a, b, "fast_retrans") > 0
    assert _sum(a, b, "dsacks_recv") > 0 and _sum(a, b, "dsack_undos") > 0


def test_duplication_is_reported_by_dsack_and_needs_no_retransmission():
    params = LinkParams(delay=0.005, dup=0.05)
    a, b, link, c, s, _ = both_ways(params, MIB)
    assert link.stats_ab.duplicated + link.stats_ba.duplicated > 0
    assert _sum(a, b, "dsacks_sent") > 0 and _sum(a, b, "dsacks_recv") > 0
    assert _sum(a, b, "retrans_segs") == 0


def test_bottleneck_queue_overflow_recovers_with_prr():
    """Slow start overshoots a 10 Mbit/s bottleneck with a 32 KiB queue."""
    params = LinkParams(delay=0.020, bandwidth=10e6 / 8, queue_bytes=32 * 1024)
    a, b, link, c, s, _ = both_ways(params, 2 * MIB)
    assert link.stats_ab.queue_drops + link.stats_ba.queue_drops > 0
    assert _sum(a, b, "fast_retrans") > 0
    assert a.max_recovery_cwnd_ratio <= 1.0 and b.max_recovery_cwnd_ratio <= 1.0


def test_newreno_partial_acks_without_sack():
    params = LinkParams(delay=0.010, loss=0.02)
    a, b, link, c, s, _ = both_ways(params, MIB, sack=False)
    assert not a.shard.sock(c).sack_ok
    assert _sum(a, b, "fast_retrans") > 0
    assert _sum(a, b, "partial_acks") > 0


def test_mixed_impairments_then_lossy_close():
    params = LinkParams(delay=0.005, jitter=0.002, loss=0.05, reorder=0.02,
                        reorder_delay=0.004, dup=0.01)
    a, b, link, c, s, _ = both_ways(params, MIB, seed=3)
    # A last write with the FIN right behind it, over the same lossy link: data
    # and FIN are recovered and both ends close.
    tail = bytes(range(256)) * 200
    assert a.shard.send(c, tail, link.now) == len(tail)
    a.shard.shutdown(c, 1, link.now)  # SHUT_WR
    got = bytearray()

    def drained() -> bool:
        while (chunk := b.shard.recv(s, 1 << 20)):
            got.extend(chunk)
        return chunk == b""

    assert link.run_until(drained, link.now + 600.0)
    assert bytes(got) == tail
    a.shard.close(c, link.now)
    b.shard.close(s, link.now)
    assert link.run_until(lambda: c not in a.shard.socks and s not in b.shard.socks,
                          link.now + 600.0)
    assert a.violations == [] and b.violations == []


@pytest.mark.slow
@pytest.mark.parametrize("loss", [0.01, 0.05, 0.20])
def test_16mib_both_ways(loss):
    params = LinkParams(delay=0.005, jitter=0.001, loss=loss, reorder=0.01,
                        reorder_delay=0.002, dup=0.005, bandwidth=50e6 / 8,
                        queue_bytes=256 * 1024)
    a, b, link, c, s, wall = both_ways(params, 16 * MIB, max_time=36000.0)
    print(f"16 MiB x2 at {loss:.0%} loss: {wall:.1f} s wall, {link.now:.1f} s simulated, "
          f"fast_retrans={_sum(a, b, 'fast_retrans')} rto={_sum(a, b, 'rto_fires')}")


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("opts", [{}, {"sack": False}, {"timestamps": False},
                                  {"tso_max": 16384}])
def test_random_impairments_never_resend_acknowledged_data(seed, opts):
    rnd = random.Random(seed)
    params = LinkParams(delay=rnd.uniform(0.001, 0.03), jitter=rnd.uniform(0, 0.003),
                        loss=rnd.uniform(0, 0.08), reorder=rnd.uniform(0, 0.05),
                        reorder_delay=rnd.uniform(0.001, 0.01), dup=rnd.uniform(0, 0.03),
                        bandwidth=rnd.choice([None, 4e6, 20e6]), queue_bytes=64 * 1024)
    a, b, link, c, s, _ = both_ways(params, 256 * 1024, seed=seed, max_time=3000.0, **opts)
    assert a.data_segs and b.data_segs
