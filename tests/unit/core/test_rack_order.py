"""RACK orders by transmission time (RFC 8985 §6.2), not by sequence.

A segment is lost once something *sent after it* has been delivered and a
reordering window has passed since it left; a retransmission is sent after
the data above it, so a lost retransmission is found by the first later
segment delivered, and a hole sent well before the SACKed data needs no
reordering window at all.  Packet traces against one Shard (MSS 1000, no
timestamps, handshake RTT 10 ms), and a SimLink bulk transfer."""

from __future__ import annotations

import pytest
from core_helpers import ACK, B, connect_over, make_shard, parse
from shardstack.core.tcp_timer import TimerKind
from shardstack.netio.simlink import LinkParams, SimLink
from test_recovery_script import MSS, rel, sack, server

REO = TimerKind.REO


def test_a_lost_retransmission_is_found_by_one_later_segment_without_an_rto():
    """Segment 0 is lost, then its retransmission (sent at 30 ms) too.  The one new
    segment PRR sent right after it is SACKed a round trip later: it left after
    the retransmission, so the retransmission is lost and goes again at once
    (RFC 8985 §6.2; DupThresh-style rules need three segments' worth)."""
    sh, sd, peer, una = server(data=10 * MSS)
    peer.recv()
    sk = sh.sock(sd)
    sh.send(sd, bytes(10 * MSS), 0.021)  # queued behind cwnd
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 4 * MSS)), at=0.03)
    assert rel(peer.recv(), una) == [(0, MSS)] and sk.in_recovery  # fast retransmit
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 10 * MSS)), at=0.031)
    after = rel(peer.recv(), una)
    assert after and after[0] == (10 * MSS, MSS)  # new data, sent after the retransmission
    # Only segment 10 (sent at 31 ms) arrives; the retransmission of 0 does not.
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 11 * MSS)), at=0.041)
    out = rel(peer.recv(), una)
    assert out[0] == (0, MSS)
    assert sh.stats.lost_retransmits == 1 and sh.stats.rto_fires == 0
    # The resent copy arrives: recovery goes on without a timeout.
    peer.send(ACK, 1001, una + 11 * MSS, at=0.052)
    assert sh.stats.rto_fires == 0 and sk.snd_una == (una + 11 * MSS) & 0xFFFFFFFF


def test_an_early_sack_of_a_retransmitted_range_is_its_original_arriving():
    """RFC 8985 §6.2 step 2: a retransmission SACKed sooner than min_RTT after it was
    sent cannot be what arrived, so it says nothing about what was sent before it."""
    sh, sd, peer, una = server(data=10 * MSS)
    peer.recv()
    sk = sh.sock(sd)
    peer.send(ACK, 1001, una, sack=sack(una, (2 * MSS, 5 * MSS)), at=0.03)
    out = rel(peer.recv(), una)
    assert (0, MSS) in out and (MSS, MSS) in out  # both holes resent at 30 ms
    # 1 ms later segment 1 is SACKed: its original, late.  The resent 0 is not lost.
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 5 * MSS)), at=0.031)
    assert (0, MSS) not in rel(peer.recv(), una)
    assert sh.stats.lost_retransmits == 0 and sk.rack_xmit == pytest.approx(0.02)


@pytest.mark.parametrize("gap", [0.03, 0.001, 0.0])
def test_the_reordering_window_runs_from_when_the_hole_was_sent(gap):
    """Segment 0 leaves alone at 20 ms, segments 1-3 ``gap`` later; 0 is lost and
    only 1 is SACKed (one segment: no DupThresh).  The hole is lost once
    RACK.rtt + reo_wnd have passed since *it* was sent: at once when the gap
    exceeds the window, else at send time + RACK.rtt + reo_wnd, earlier than
    ACK arrival + reo_wnd by the gap."""
    sh, sd, peer, una = server(data=MSS)
    assert rel(peer.recv(), una) == [(0, MSS)]
    sk = sh.sock(sd)
    sh.send(sd, bytes(3 * MSS), 0.02 + gap)
    assert rel(peer.recv(), una) == [(MSS, MSS), (2 * MSS, MSS), (3 * MSS, MSS)]
    t_ack = 0.03 + gap
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 2 * MSS)), at=t_ack)
    out = rel(peer.recv(), una)
    rack_rtt = t_ack - (0.02 + gap)
    reo = sk.srtt / 4  # RFC 8985 §6.2.4 before any reordering: min_RTT / 4
    if gap > reo:
        assert out == [(0, MSS)] and sk.in_recovery and sk.timers[REO] is None
        return
    assert out == [] and not sk.in_recovery
    deadline = sk.timers[REO]
    assert deadline == pytest.approx(0.02 + rack_rtt + reo)
    assert deadline == pytest.approx(t_ack + reo - gap)
    assert rel(peer.advance(deadline), una)[0] == (0, MSS)
    assert sk.in_recovery and sh.stats.rack_reo_timeouts == 1


def test_reordering_seen_gives_a_lost_retransmission_a_window():
    """Until reordering is seen RACK's window is zero in recovery (RFC 8985 §6.2.4);
    after a hole was filled by its own late original, a lost retransmission is
    resent by the REO timer, a fraction of an RTT later, still without an RTO."""
    results = {}
    for reordered in (False, True):
        sh, sd, peer, una = server(data=10 * MSS)
        peer.recv()
        sk = sh.sock(sd)
        sh.send(sd, bytes(20 * MSS), 0.021)
        if reordered:  # segment 0 arrives after segment 1: reordering, no loss
            peer.send(ACK, 1001, una, sack=sack(una, (MSS, 2 * MSS)), at=0.03)
            assert not sk.reord_seen
        peer.send(ACK, 1001, una + 2 * MSS, at=0.031)
        assert sk.reord_seen is reordered
        peer.recv()
        # Segment 2 is lost, and so is its retransmission (sent at 32 ms).
        peer.send(ACK, 1001, una + 2 * MSS, sack=sack(una, (3 * MSS, 6 * MSS)), at=0.032)
        assert rel(peer.recv(), una) == [(2 * MSS, MSS)]
        peer.send(ACK, 1001, una + 2 * MSS, sack=sack(una, (3 * MSS, 10 * MSS)), at=0.033)
        later = rel(peer.recv(), una)
        assert later[0] == (14 * MSS, MSS)  # sent after the retransmission
        # Segment 14 arrives one RTT later.
        peer.send(ACK, 1001, una + 2 * MSS,
                  sack=sack(una, (3 * MSS, 10 * MSS), (14 * MSS, 15 * MSS)), at=0.043)
        now = rel(peer.recv(), una)
        if not reordered:
            assert (2 * MSS, MSS) in now and sk.timers[REO] is None
        else:
            assert (2 * MSS, MSS) not in now
            t = sk.timers[REO]
            assert 0.043 < t < 0.043 + sk.srtt
            assert (2 * MSS, MSS) in rel(peer.advance(t), una)
        results[reordered] = (sh.stats.lost_retransmits, sh.stats.rto_fires)
    assert results == {False: (1, 0), True: (1, 0)}


def test_a_retransmission_filling_a_hole_is_not_reordering():
    """Step 3 counts only data never retransmitted: a hole filled by our own
    retransmission proves nothing about the network."""
    sh, sd, peer, una = server(data=10 * MSS)
    peer.recv()
    sk = sh.sock(sd)
    peer.send(ACK, 1001, una, sack=sack(una, (MSS, 5 * MSS)), at=0.03)
    assert rel(peer.recv(), una)[0] == (0, MSS)
    peer.send(ACK, 1001, una + 5 * MSS, at=0.041)
    assert not sk.reord_seen


@pytest.mark.parametrize("drops", [2, 3])
def test_bulk_transfer_repairs_a_twice_lost_segment_without_an_rto(drops):
    """SimLink, 10 ms RTT: the segment holding byte 100 000 is dropped ``drops``
    times (its original and each retransmission but the last).  Every lost
    retransmission is found by RACK; no retransmission timeout fires."""
    a, b = make_shard(), make_shard(B)
    seen = {"base": None, "hit": 0}

    def drop(now: float, pkt: bytes) -> bool:
        seg = parse(pkt)
        if not seg.payload:
            return False
        if seen["base"] is None:
            seen["base"] = seg.seq
        off = (seg.seq - seen["base"]) & 0xFFFFFFFF
        if off <= 100_000 < off + len(seg.payload) and seen["hit"] < drops:
            seen["hit"] += 1
            return True
        return False

    link = SimLink(a, b, a_to_b=LinkParams(delay=0.005, filter=drop),
                   b_to_a=LinkParams(delay=0.005))
    c, s = connect_over(link, a, b)
    data = bytes(range(256)) * 1600  # 409 600 bytes
    sent = 0
    got = bytearray()

    def app() -> bool:
        nonlocal sent
        if sent < len(data):
            sent += a.send(c, memoryview(data)[sent:], link.now)
        while (chunk := b.recv(s, 1 << 20)):
            got.extend(chunk)
        return len(got) == len(data)

    while not app() and link.now < 30.0:
        link.run_until(app, link.now + 0.01)
    assert bytes(got) == data and seen["hit"] == drops
    st = a.stats
    assert st.rto_fires == 0 and st.lost_retransmits == drops - 1 and st.fast_retrans == 1
