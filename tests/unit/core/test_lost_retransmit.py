"""Loss recovery with a small congestion window (the interop shape at 3% loss, cwnd
1-5 segments): the ACK clock must survive one more loss, so that an RTO stays rare.
Packet traces against one Shard (RFC 6937 PRR, RFC 8985 RACK, RFC 6675 pipe)."""

from __future__ import annotations

import random

import pytest
from core_helpers import ACK, B, connect_over, make_shard
from shardstack.core.tcp_input import tcp_pipe
from shardstack.netio.simlink import LinkParams, SimLink
from test_recovery_script import MSS, rel, sack, server


def small_window_server():
    """Four segments in flight, six more queued behind a 4-segment cwnd."""
    sh, sd, peer, una = server(data=4 * MSS)
    assert rel(peer.recv(), una) == [(i * MSS, MSS) for i in range(4)]
    sk = sh.sock(sd)
    sk.cc.cwnd = 4
    sh.send(sd, bytes(6 * MSS), 0.025)
    assert rel(peer.recv(), una) == []
    return sh, sd, peer, una, sk


def test_fast_retransmit_with_a_small_window_sends_new_data_too():
    """RFC 6937: the ACK that starts recovery delivered three segments; PRR-SSRB lets
    one new segment go with the retransmission, so an ACK still returns if the
    retransmission (or its ACK) is lost."""
    sh, sd, peer, una, sk = small_window_server()
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 4 * MSS)), at=0.03)
    out = rel(peer.recv(), una)
    assert sk.in_recovery
    assert out == [(0, MSS), (4 * MSS, MSS)]


def test_rack_entry_counts_one_segment_delivered():
    """Linux tcp_rack_reo_timeout: recovery entered by the reordering timer runs PRR
    with one segment delivered.  Linux 6.x's PRR (tcp_cwnd_reduction) adds its
    slow-start segment only on an ACK that advances SND.UNA without new losses,
    so one hole goes now and the next with the first hole's ACK (as
    fastretx/sack-two-holes.pkt shows on Linux 6.18)."""
    sh, sd, peer, una = server(data=4 * MSS)
    assert len(peer.recv()) == 4
    sk = sh.sock(sd)
    peer.send(ACK, 1001, una, sack=sack(una, (3 * MSS, 4 * MSS)), at=0.03)
    assert rel(peer.recv(), una) == []
    t = sk.timers[6]
    out = rel(peer.advance(t), una)
    assert sk.in_recovery and sh.stats.rack_reo_timeouts == 1
    assert out == [(0, MSS)]
    peer.send(ACK, 1001, una + MSS, sack=sack(una, (3 * MSS, 4 * MSS)), at=t + 0.01)
    assert rel(peer.recv(), una) == [(MSS, MSS), (2 * MSS, MSS)]


def test_a_retransmission_found_lost_leaves_the_pipe():
    """RACK: once later data is SACKed, a lost retransmission is no longer in flight
    (Linux takes it out of retrans_out); it is queued to go again."""
    sh, sd, peer, una = server(data=10 * MSS)
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    t = sk.timers[7]
    peer.advance(t)  # the tail loss probe; everything was lost
    t = sk.timers[0]
    assert rel(peer.advance(t), una) == [(0, MSS)]  # RTO, cwnd 1
    t += 0.01
    peer.send(ACK, 1001, una + MSS, at=t)
    assert rel(peer.recv(), una) == [(MSS, MSS), (2 * MSS, MSS)]
    # The retransmission of segment 1 is lost; 2, then 3 and 4 are SACKed.  The
    # first SACK comes a round trip (10 ms) after those retransmissions: one
    # SACKed sooner than min_RTT after it was sent would be its original
    # arriving, which proves nothing (RFC 8985 §6.2 step 2).
    t += 0.01
    resent = []
    for hi in (3, 4, 5):
        t += 0.001
        peer.send(ACK, 1001, una + MSS, sack=sack(una, (2 * MSS, hi * MSS)), at=t)
        resent += rel(peer.recv(), una)
    assert (MSS, MSS) in resent and sh.stats.lost_retransmits == 1
    assert sh.stats.rto_fires == 1
    # Queued but not yet sent again: the relost range is not counted in pipe.
    sk.relost.append([(una + 5 * MSS) & 0xFFFFFFFF, (una + 6 * MSS) & 0xFFFFFFFF])
    before = tcp_pipe(sk)
    sk.relost.pop()
    assert tcp_pipe(sk) - before == MSS


def _slow_reader_bulk(seed: int, size: int = 4 << 20, rate: float = 3e6):
    """a sends ``size`` bytes to b over 3% loss both ways, 2 ms RTT; b reads at ``rate``."""
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=seed, params=LinkParams(delay=0.001, loss=0.03))
    c, s = connect_over(link, a, b)
    data = random.Random(seed).randbytes(size)
    sent = got = 0
    budget, last = 0.0, link.now

    def app() -> bool:
        nonlocal sent, got, budget, last
        if sent < size:
            sent += a.send(c, memoryview(data)[sent:sent + 262144], link.now)
        budget = min(budget + (link.now - last) * rate, 1 << 20)
        last = link.now
        while budget >= 1:
            chunk = b.recv(s, min(int(budget), 65536))
            if not chunk:
                break
            got += len(chunk)
            budget -= len(chunk)
        return got == size

    while not app() and link.now < 120.0:
        link.run_until(app, link.now + 0.005)
    assert got == size
    return a, link


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_three_percent_loss_two_ms_rtt_slow_reader_rarely_times_out(seed):
    """The interop conditions (3% loss both ways, 2 ms RTT) with a receiver that reads
    slowly: SACK recovery, RACK and TLP repair the losses; RTOs stay rare."""
    a, link = _slow_reader_bulk(seed)
    st = a.stats
    assert link.stats_ab.lost > 50 and st.fast_retrans > 50
    assert st.rto_fires <= 2, (st.rto_fires, st.fast_retrans)
