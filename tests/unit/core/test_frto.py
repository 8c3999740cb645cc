"""F-RTO (RFC 5682, SACK-enhanced; Linux tcp_frto=2, tcp_process_loss): an RTO
caused by a delay spike on the data path, with nothing lost, is found spurious
from the ACKs that follow it and undone, instead of slow-starting from one
segment and resending the whole window behind the originals.

Timestamps are off on both ends so that Eifel detection (an ACK echoing an
original's TSval; test_spurious_rto) cannot be what finds it."""

from __future__ import annotations

from core_helpers import B, Bulk, connect_over, make_shard
from shardstack.core.tcp_cong import INFINITE_SSTHRESH
from shardstack.netio.simlink import LinkParams, SimLink

MIB = 1 << 20


def _data_path_spike(frto: int):
    ab, ba = LinkParams(delay=0.010), LinkParams(delay=0.010)
    a, b = make_shard(timestamps=False, frto=frto), make_shard(B, timestamps=False)
    link = SimLink(a, b, seed=3, a_to_b=ab, b_to_a=ba)
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 64 * MIB)

    def pump() -> bool:
        bulk.step()
        return False

    link.run_until(pump, link.now + 0.5)  # slow start up to a large window
    cc = a.sock(c).cc
    before = cc.cwnd
    retrans0 = a.stats.retrans_segs
    # The data path stalls for 800 ms (a handover, a queue held up) and then
    # releases what it holds in order: a segment sent at t arrives at the
    # later of t + 10 ms and the stall's end.  The RTO (~500 ms without
    # timestamps) fires inside the stall, so its retransmission of the head
    # queues behind the originals.  Nothing is lost.
    release = link.now + 0.8
    steps = [0]

    def stalled() -> bool:
        # (+ a nanosecond per step: arrival times computed as now + delay stay
        # in sending order despite float rounding, as a FIFO would keep them.)
        steps[0] += 1
        ab.delay = max(0.010, release + 0.010 - link.now) + steps[0] * 1e-9
        bulk.step()
        return False

    link.run_until(stalled, release + 1.0)
    assert bulk.got > 0
    return a, cc, before, a.stats.retrans_segs - retrans0


def test_frto_undoes_a_spurious_rto():
    a, cc, before, retrans = _data_path_spike(2)
    assert a.stats.rto_fires >= 1  # the timer did fire
    assert a.stats.spurious_rtos >= 1 and a.stats.rto_undos >= 1
    assert cc.ssthresh == INFINITE_SSTHRESH or cc.ssthresh >= before // 2
    assert cc.cwnd >= before, (cc.cwnd, before)
    # Only the head went again (once per RTO, beside the one tail loss probe
    # before it): F-RTO sent new data, not the window.
    assert retrans <= a.stats.rto_fires + a.stats.tlp_probes <= 2, (retrans, a.stats.rto_fires)
    assert a.stats.fast_retrans == 0


def test_without_frto_the_window_is_resent_needlessly():
    a, cc, before, retrans = _data_path_spike(0)
    assert a.stats.rto_fires >= 1 and a.stats.spurious_rtos == 0 and a.stats.rto_undos == 0
    # Slow start from one segment resent the stalled window behind the
    # originals; the peer reported every copy as a duplicate (D-SACK), which
    # undoes the reduction only once the whole window went twice.
    assert retrans > 4 * (a.stats.rto_fires + a.stats.tlp_probes), (retrans, a.stats.rto_fires)
    assert a.stats.dsacks_recv >= retrans - 2, (a.stats.dsacks_recv, retrans)
