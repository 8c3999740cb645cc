"""Loss recovery as packet traces against one Shard (RFC 6675 NextSeg/pipe, RFC 6937
PRR, RFC 6582 partial ACKs, RFC 2883 D-SACK), and super-segment GSO sizes."""

from __future__ import annotations

import socket

from core_helpers import ACK, PSH, Pair, server_conn
from shardstack.core.tcp_input import tcp_pipe

MSS = 1000


def server(sack: bool = True, data: int = 10 * MSS):
    """A server that accepted a connection (MSS 1000, no timestamps) and sent ``data``."""
    sh, sd, peer, una = server_conn(mss=MSS, sack_perm=sack, ack_at=0.01)
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sh.send(sd, bytes(data), 0.02)
    return sh, sd, peer, una


def rel(segs, una):
    return [((x.seq - una) & 0xFFFFFFFF, len(x.payload)) for x in segs if x.payload]


def sack(una, *ranges):
    return tuple(((una + lo) & 0xFFFFFFFF, (una + hi) & 0xFFFFFFFF) for lo, hi in ranges)


def test_sack_recovery_resends_exactly_the_holes_and_prr_bounds_cwnd():
    sh, sd, peer, una = server(data=30 * MSS)
    first = rel(peer.recv(), una)
    assert first == [(i * MSS, MSS) for i in range(10)]  # IW 10
    sk = sh.sock(sd)
    # Segments 1 and 4 are lost; the peer ACKs 0 and SACKs the others as they come.
    t = 0.05
    peer.send(ACK, 1001, una + MSS, at=t)
    sent = rel(peer.recv(), una)
    prior_cwnd = sk.cc.cwnd  # 11: slow start counted the first ACK
    got = [(2, 3)]
    retrans = []
    for hi in (4, 6, 7, 8, 9, 10):
        t += 0.001
        blocks = [(2 * MSS, 4 * MSS)] + ([(5 * MSS, hi * MSS)] if hi > 4 else [])
        peer.send(ACK, 1001, una + MSS, sack=sack(una, *blocks[::-1]), at=t)
        out = rel(peer.recv(), una)
        for off, n in out:
            # Never a byte the peer has SACKed or ACKed.
            assert off >= MSS
            assert not any(lo < off + n and off < h for lo, h in blocks)
            if off < 10 * MSS:
                retrans.append((off, n))
        sent += out
        assert sk.cc.cwnd <= prior_cwnd  # PRR: no inflation by dup ACKs
        got.append(hi)
    assert sh.stats.fast_retrans == 1 and sk.in_recovery
    assert retrans == [(MSS, MSS), (4 * MSS, MSS)]  # exactly the two holes, once each
    # PRR-SSRB: in recovery it sent no more than was delivered plus one segment.
    assert sk.prr_out <= sk.prr_delivered + MSS
    # The holes arrive: full ACK ends recovery with cwnd = ssthresh (RFC 6937).
    snd_max = (sk.snd_max - una) & 0xFFFFFFFF
    peer.send(ACK, 1001, una + snd_max, at=t + 0.01)
    assert not sk.in_recovery and sk.cc.cwnd == sk.cc.ssthresh
    assert tcp_pipe(sk) == (sk.snd_max - sk.snd_una) & 0xFFFFFFFF


def test_after_rto_sacked_data_is_never_resent():
    sh, sd, peer, una = server()
    # Conventional RTO recovery: with F-RTO (test_frto) the first ACK's SACK of
    # never-retransmitted segment 5 would prove the RTO spurious and undo it.
    sh.cfg.frto = 0
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    # No ACK at all: first the tail loss probe (the last segment again), then the RTO.
    assert rel(peer.advance(sk.timers[7]), una) == [(9 * MSS, MSS)]
    t = sk.timers[0]
    out = peer.advance(t)
    assert rel(out, una) == [(0, MSS)] and sh.stats.rto_fires == 1 and sk.in_loss
    resent = [(0, MSS)]
    for _ in range(12):
        acked = max(off + n for off, n in resent)
        acked = 6 * MSS if acked == 5 * MSS else acked
        t += 0.01
        # Segment 5 had arrived: the peer SACKs it until the cumulative ACK passes it.
        peer.send(ACK, 1001, una + acked, sack=sack(una, (5 * MSS, 6 * MSS)) if acked < 5 * MSS
                  else (), at=t)
        resent += rel(peer.recv(), una)
        if acked >= 10 * MSS:
            break
    offs = [off for off, _ in resent]
    assert 5 * MSS not in offs  # the SACKed segment is never sent again
    assert sorted(offs) == [i * MSS for i in range(10) if i != 5]
    assert not sk.in_loss and sh.stats.rto_fires == 1


def test_rack_marks_holes_lost_after_the_reordering_window():
    sh, sd, peer, una = server()
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    # Only segment 9 arrives: one SACK block, far from DupThresh.
    peer.send(ACK, 1001, una, sack=sack(una, (9 * MSS, 10 * MSS)), at=0.03)
    assert rel(peer.recv(), una) == [] and not sk.in_recovery
    reo = sk.timers[6]
    assert reo is not None and 0.03 < reo < 0.03 + sk.srtt  # RFC 8985: a fraction of an RTT
    out = rel(peer.advance(reo), una)
    assert sk.in_recovery and sh.stats.rack_reo_timeouts == 1 and sh.stats.rto_fires == 0
    assert out and out[0] == (0, MSS) and all(off < 9 * MSS for off, _ in out)


def test_tail_loss_probe_turns_a_tail_loss_into_fast_recovery():
    sh, sd, peer, una = server(data=3 * MSS)
    assert len(peer.recv()) == 3
    sk = sh.sock(sd)
    peer.send(ACK, 1001, una + MSS, at=0.03)  # segments 1 and 2 (the tail) are lost
    assert peer.recv() == []
    pto = sk.timers[7]
    assert pto is not None and pto < sk.timers[0]  # the probe comes before the RTO
    out = rel(peer.advance(pto), una)
    assert out == [(2 * MSS, MSS)] and sh.stats.tlp_probes == 1  # the last segment again
    # Its ACK SACKs it: the hole (segment 1) is repaired without an RTO.
    peer.send(ACK, 1001, una + MSS, sack=sack(una, (2 * MSS, 3 * MSS)), at=pto + 0.02)
    out = rel(peer.recv(), una)
    if not out:  # RACK waits its reordering window first
        out = rel(peer.advance(sk.timers[6]), una)
    assert out == [(MSS, MSS)] and sh.stats.rto_fires == 0


def test_newreno_partial_ack_resends_the_next_hole_at_once():
    sh, sd, peer, una = server(sack=False)
    assert len(peer.recv()) == 10
    sk = sh.sock(sd)
    # Segments 1 and 3 lost: ACK 1, then dup ACKs from 2, 4, 5.
    peer.send(ACK, 1001, una + MSS, at=0.05)
    peer.recv()
    for i in range(3):
        peer.send(ACK, 1001, una + MSS, at=0.051 + i * 0.001)
    out = rel(peer.recv(), una)
    assert out[0] == (MSS, MSS) and sh.stats.fast_retrans == 1
    for i in range(3):  # dup ACKs from 6..8 keep the clock going, no inflation
        peer.send(ACK, 1001, una + MSS, at=0.06 + i * 0.001)
        peer.recv()
        assert sk.cc.cwnd <= sk.cc.prior_cwnd
    # The retransmission fills hole 1: partial ACK up to the next hole (3).
    peer.send(ACK, 1001, una + 3 * MSS, at=0.07)
    out = rel(peer.recv(), una)
    assert out and out[0] == (3 * MSS, MSS)
    assert sh.stats.partial_acks == 1 and sk.in_recovery
    peer.send(ACK, 1001, una + 10 * MSS, at=0.08)
    assert not sk.in_recovery and sk.cc.cwnd == sk.cc.ssthresh


def test_duplicate_segments_are_reported_with_dsack():
    sh, _, peer, una = server_conn(mss=MSS, sack_perm=True)
    peer.send(ACK | PSH, 1001, una, payload=b"a" * 100)
    assert peer.recv_one().ack == 1101
    peer.send(ACK | PSH, 1001, una, payload=b"a" * 100)  # an old duplicate
    r = peer.recv_one()
    assert r.ack == 1101 and r.sack == ((1001, 1101),)  # RFC 2883 §4.1.1
    peer.send(ACK | PSH, 1301, una, payload=b"c" * 100)  # out of order
    assert peer.recv_one().sack == ((1301, 1401),)
    peer.send(ACK | PSH, 1301, una, payload=b"c" * 100)  # duplicate of the ofo segment
    r = peer.recv_one()
    assert r.sack == ((1301, 1401), (1301, 1401))  # D-SACK first, then the SACK block
    assert sh.stats.dsacks_sent == 2


def test_take_frames_gso_reports_segment_sizes():
    p = Pair(tso_max=16384)
    _, c, s = p.connect()
    p.a.send(c, bytes(30000), 0.0)
    pairs = p.a.take_frames_gso()
    mss = p.a.sock(c).mss_cache
    assert pairs and all(isinstance(f, bytes) for f, _ in pairs)
    big = [(len(f), g) for f, g in pairs if g]
    assert big and all(g == mss for _, g in big)
    assert all(len(f) <= 1500 for f, g in pairs if not g)
    assert p.a.take_frames_gso() == [] and p.a.take_frames() == []


def test_full_segments_with_sack_blocks_still_fit_the_mtu():
    """Bidirectional transfer while receiving out of order: SACK blocks ride on data."""
    p = Pair()
    _, c, s = p.connect()
    n = [0]

    def drop(direction, seg):  # lose every 7th data segment from b
        if direction == "ba" and seg.payload:
            n[0] += 1
            return n[0] % 7 == 0
        return False

    p.drop = drop
    p.a.send(c, bytes(200_000), 0.0)
    p.b.send(s, bytes(200_000), 0.0)
    p.advance(30.0)
    sizes = [20 + 20 + len(x.payload) + _optlen(x) for _, d, x in p.tap if d == "ab"]
    assert any(x.sack for _, d, x in p.tap if d == "ab" and x.payload)
    assert max(sizes) <= 1500


def _optlen(seg) -> int:
    n = 0
    if seg.ts:
        n += 12
    if seg.sack:
        n += 4 + 8 * len(seg.sack)
    return n
