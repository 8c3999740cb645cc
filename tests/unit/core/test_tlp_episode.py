"""RACK-TLP's probe episode (RFC 8985 §7.3-7.4; Linux tlp_high_seq,
tcp_process_tlp_ack), as packet traces against one Shard: one probe per
episode; a probe that repaired a loss costs one congestion-window reduction;
a probe the peer reports as a duplicate (D-SACK: the original arrived too)
costs nothing."""

from __future__ import annotations

from core_helpers import ACK
from shardstack.core.tcp_cong import INFINITE_SSTHRESH
from test_recovery_script import MSS, rel, sack, server


def _probe_the_tail():
    """Ten segments out; the peer ACKs the first nine only (the tenth, or its
    ACK, was lost); the probe timer fires and resends the tenth."""
    sh, sd, peer, una = server()
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    t = 0.03
    peer.send(ACK, 1001, una + 9 * MSS, at=t)
    assert peer.recv() == []
    assert rel(peer.advance(sk.timers[7]), una) == [(9 * MSS, MSS)]  # the probe
    assert sh.stats.tlp_probes == 1 and sk.tlp_high_seq == (una + 10 * MSS) & 0xFFFFFFFF
    return sh, sd, sk, peer, una, sk.timers[7] or t + 0.3


def _then_new_data_acked(sh, sd, sk, peer, una, t):
    sh.send(sd, bytes(MSS), t)
    assert rel(peer.recv(), una) == [(10 * MSS, MSS)]
    peer.send(ACK, 1001, una + 11 * MSS, at=t + 0.01)


def test_a_probe_that_repaired_a_loss_reduces_cwnd_once():
    sh, sd, sk, peer, una, t = _probe_the_tail()
    cwnd = sk.cc.cwnd
    # The probe filled the hole: its ACK covers it, no D-SACK.  The episode
    # ends with the next ACK beyond TLPHighRxt: one reduction, no recovery.
    peer.send(ACK, 1001, una + 10 * MSS, at=t + 0.01)
    assert sk.cc.ssthresh == INFINITE_SSTHRESH
    _then_new_data_acked(sh, sd, sk, peer, una, t + 0.02)
    assert sh.stats.tlp_recoveries == 1 and sk.tlp_high_seq == -1
    assert sk.cc.ssthresh < INFINITE_SSTHRESH and sk.cc.cwnd < cwnd
    assert not sk.in_recovery and not sk.in_loss and sh.stats.fast_retrans == 0


def test_a_probe_reported_as_duplicate_costs_nothing():
    sh, sd, sk, peer, una, t = _probe_the_tail()
    # The original had arrived (its ACK was lost): the peer D-SACKs the probe.
    peer.send(ACK, 1001, una + 10 * MSS, sack=sack(una, (9 * MSS, 10 * MSS)), at=t + 0.01)
    assert sk.tlp_high_seq == -1
    _then_new_data_acked(sh, sd, sk, peer, una, t + 0.02)
    assert sh.stats.tlp_recoveries == 0 and sk.cc.ssthresh == INFINITE_SSTHRESH


def test_one_probe_per_episode():
    sh, sd, peer, una = server()
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    # The peer ACKs half, so cwnd has room; then silence.  The probe goes, the
    # application writes more, which goes out; the RTO, not a second probe,
    # comes next (RFC 8985 §7.3: one probe outstanding).
    peer.send(ACK, 1001, una + 5 * MSS, at=0.03)
    peer.recv()
    t = sk.timers[7]
    assert t is not None
    assert len(rel(peer.advance(t), una)) == 1 and sh.stats.tlp_probes == 1
    sh.send(sd, bytes(4 * MSS), t + 0.001)
    assert len(rel(peer.recv(), una)) >= 1  # new data within cwnd
    for _ in range(4):
        nxt = min(x for x in (sk.timers[7], sk.timers[0]) if x is not None)
        peer.advance(nxt)
        if sh.stats.rto_fires:
            break
    assert sh.stats.tlp_probes == 1 and sh.stats.rto_fires == 1
