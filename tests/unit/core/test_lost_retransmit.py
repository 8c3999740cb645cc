"""A retransmission that is itself lost, with a small congestion window (the interop
shape at 3% loss: cwnd 1-5 segments): it must go again as soon as later data is
SACKed (RFC 8985 RACK), not after an RTO.  Packet traces against one Shard."""

from __future__ import annotations

from core_helpers import ACK
from test_recovery_script import MSS, rel, sack, server


def test_lost_retransmission_goes_again_without_rto_when_cwnd_is_small():
    sh, sd, peer, una = server(data=4 * MSS)
    assert rel(peer.recv(), una) == [(i * MSS, MSS) for i in range(4)]
    sk = sh.sock(sd)
    # A small window, as after earlier losses: cwnd 3, ssthresh 2 (the floor).
    sk.cc.cwnd, sk.cc.ssthresh = 3, 2
    # Segment 0 is lost; 1-3 arrive: IsLost(0) (RFC 6675), fast retransmit.
    t = 0.03
    for hi in (2, 3, 4):
        peer.send(ACK, 1001, una, sack=sack(una, (MSS, hi * MSS)), at=t)
        t += 0.001
    out = rel(peer.recv(), una)
    assert (0, MSS) in out and sk.in_recovery
    # More data to send; PRR lets some of it out as the SACKs arrive.
    sh.send(sd, bytes(6 * MSS), t)
    out = rel(peer.recv(), una)
    # The retransmission of segment 0 is lost too; everything sent after it arrives.
    sent_after = [off for off, _ in out if off >= 4 * MSS]
    hi = 4
    resent = []
    for _ in range(12):
        if not sent_after:
            break
        hi = max(hi, sent_after.pop(0) // MSS + 1)
        peer.send(ACK, 1001, una, sack=sack(una, (MSS, hi * MSS)), at=t)
        t += 0.001
        out = rel(peer.recv(), una)
        resent += [o for o in out if o[0] == 0]
        sent_after += [off for off, _ in out if off >= hi * MSS]
        if resent:
            break
    assert resent == [(0, MSS)], "the lost retransmission must go again before the RTO"
    assert sh.stats.lost_retransmits == 1 and sh.stats.rto_fires == 0
    assert t < sk.timers[0]  # the RTO has not come
