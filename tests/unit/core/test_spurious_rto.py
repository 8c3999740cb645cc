"""A spurious RTO is undone (Linux tcp_try_undo_loss; Eifel detection, RFC 3522,
with RFC 4015's response): when the ACK path stalls longer than the RTO, the
timer fires although nothing was lost; the first ACK that then arrives echoes
the timestamp of an original transmission, so cwnd and ssthresh come back
instead of restarting from one segment."""

from __future__ import annotations

from core_helpers import B, Bulk, connect_over, make_shard
from shardstack.core import tcp_input
from shardstack.core.tcp_cong import INFINITE_SSTHRESH
from shardstack.netio.simlink import LinkParams, SimLink

MIB = 1 << 20


def _ack_path_stall(monkeypatch, undo: bool):
    if not undo:
        # No undo at all: not by the timestamps, nor by the D-SACKs of the RTO's
        # retransmissions (which come back when it resent little), nor by F-RTO.
        monkeypatch.setattr(tcp_input, "tcp_try_undo_loss", lambda *a: None)
        monkeypatch.setattr(tcp_input, "tcp_try_undo_dsack", lambda *a: None)
    ab, ba = LinkParams(delay=0.010), LinkParams(delay=0.010)
    a, b = make_shard(frto=2 if undo else 0), make_shard(B)
    link = SimLink(a, b, seed=7, a_to_b=ab, b_to_a=ba)
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 16 * MIB)

    def pump() -> bool:
        bulk.step()
        return False

    link.run_until(pump, link.now + 0.5)  # slow start up to a large window
    cc = a.sock(c).cc
    before = cc.cwnd
    # The ACK path stalls: ACKs sent in the next 300 ms take 600 ms, longer than
    # the RTO (~220 ms), so the timer fires; then the path is quick again.
    # Nothing is lost: the first ACK back was sent for an original segment.
    ba.delay = 0.600
    link.run_until(pump, link.now + 0.3)
    ba.delay = 0.010
    link.run_until(pump, link.now + 1.5)
    return a, c, cc, before


def test_spurious_rto_is_undone(monkeypatch):
    a, c, cc, before = _ack_path_stall(monkeypatch, True)
    assert a.stats.rto_fires >= 1  # the timer did fire
    assert a.stats.rto_undos >= 1
    assert cc.ssthresh == INFINITE_SSTHRESH or cc.ssthresh >= before // 2
    assert cc.cwnd >= before, (cc.cwnd, before)


def test_without_undo_the_window_restarts(monkeypatch):
    a, c, cc, before = _ack_path_stall(monkeypatch, False)
    assert a.stats.rto_fires >= 1 and a.stats.rto_undos == 0
    assert cc.ssthresh < INFINITE_SSTHRESH and cc.cwnd < before
