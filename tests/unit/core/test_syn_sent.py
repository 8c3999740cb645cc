"""SYN-SENT: active open, retries, refusal, simultaneous open."""

from __future__ import annotations

import errno

import pytest
from core_helpers import ACK, RST, SYN, A, B, Pair, Peer, make_shard
from shardstack.core import Connected, SocketError, State


def client(**kw):
    sh = make_shard(**kw)
    sd = sh.socket()
    sh.connect(sd, B, 80, 0.0)
    peer = Peer(sh)
    syn = peer.recv_one()
    peer.port = 80
    return sh, sd, peer, syn


def test_syn_carries_mss_ws_sackperm_ts():
    sh, sd, peer, syn = client()
    assert syn.flags == "S" and syn.dport == 80 and syn.ack == 0
    assert syn.mss == 1460 and syn.wscale == 7 and syn.sack_perm and syn.ts[1] == 0
    assert syn.window == 64240  # Linux: 44 x 1460, timestamps or not (tcp_connect_init)
    assert 32768 <= syn.sport <= 60999
    assert sh.state(sd) is State.SYN_SENT


def test_synack_establishes_and_acks():
    sh, sd, peer, syn = client()
    peer.port = 80
    peer.send(SYN | ACK, 5000, syn.seq + 1, dport=syn.sport, mss=1400, wscale=2,
              sack_perm=True, ts=(77, syn.ts[0]), at=0.05)
    ack = peer.recv_one()
    assert ack.flags == "." and ack.seq == syn.seq + 1 and ack.ack == 5001
    assert ack.ts[1] == 77
    assert sh.state(sd) is State.ESTABLISHED
    assert sh.take_events() == [Connected(sd)]
    sk = sh.sock(sd)
    assert sk.mss_cache == 1400 - 12 and sk.snd_wscale == 2
    assert sk.srtt == pytest.approx(0.05)
    assert sh.getpeername(sd) == (B, 80)


def test_rst_ack_is_econnrefused():
    sh, sd, peer, syn = client()
    peer.send(RST | ACK, 0, syn.seq + 1, dport=syn.sport)
    assert peer.recv() == []
    assert sh.take_events() == [SocketError(sd, errno.ECONNREFUSED)]
    assert sh.state(sd) is State.CLOSED
    assert sh.getsockopt(sd, 1, 4) == errno.ECONNREFUSED  # SO_ERROR
    assert sh.h.bhash == {} and sh.h.ehash == {}


def test_rst_with_bad_ack_is_ignored_and_bad_ack_gets_rst():
    sh, sd, peer, syn = client()
    peer.send(RST | ACK, 0, syn.seq + 7, dport=syn.sport)
    assert peer.recv() == [] and sh.state(sd) is State.SYN_SENT
    peer.send(SYN | ACK, 5000, syn.seq + 7, dport=syn.sport)
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == syn.seq + 7
    assert sh.state(sd) is State.SYN_SENT


def test_syn_retries_linear_then_exponential_then_etimedout():
    sh, sd, peer, syn = client()
    sent = peer.run_timers(20)
    assert all(s.flags == "S" and s.seq == syn.seq for _, s in sent)
    times = [t for t, _ in sent]
    # Linux 6.18, tcp_syn_retries = 6 and tcp_syn_linear_timeouts = 4 (measured on a
    # veth): the RTO stays 1 s for the first four, then doubles: 1, 2, 3, 4, 5, 7, 11,
    # 19, 35, 67 s; 6 + 4 retransmissions, so ETIMEDOUT with the next timer, 131 s.
    # (Linux's long timers fire late by the timer wheel's slack: 69.2 and 134.7 s.)
    assert times == [1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 11.0, 19.0, 35.0, 67.0]
    assert peer.now == 131.0
    assert sh.take_events() == [SocketError(sd, errno.ETIMEDOUT)]
    assert sh.state(sd) is State.CLOSED


def test_connect_errors():
    sh, sd, peer, syn = client()
    with pytest.raises(OSError) as e:
        sh.connect(sd, B, 80, 0.1)
    assert e.value.errno == errno.EALREADY
    lsd = sh.socket()
    sh.listen(lsd, 1)
    with pytest.raises(OSError) as e:
        sh.connect(lsd, B, 80, 0.1)
    assert e.value.errno == errno.EISCONN


def test_port_filter_chooses_ephemeral_port():
    sh = make_shard(port_filter=lambda la, lp, ra, rp: lp % 8 == 5)
    ports = set()
    for _ in range(20):
        sd = sh.socket()
        sh.connect(sd, B, 80, 0.0)
        ports.add(sh.getsockname(sd)[1])
    assert len(ports) == 20 and all(p % 8 == 5 for p in ports)


def test_connect_takes_even_ports_first_and_odd_ones_after():
    """Linux's __inet_hash_connect: even ports, then odd ones; bind(0) takes
    odd ones first (test_bind), so a listener's port rarely meets a client's."""
    sh = make_shard(ephemeral_range=(50000, 50007))
    ports = []
    for _ in range(8):
        sd = sh.socket()
        sh.connect(sd, B, 80, 0.0)  # one destination: every port once
        ports.append(sh.getsockname(sd)[1])
    assert all(p % 2 == 0 for p in ports[:4]) and all(p % 2 == 1 for p in ports[4:])
    assert sorted(ports) == list(range(50000, 50008))


def test_no_port_left_is_eaddrnotavail():
    sh = make_shard(port_filter=lambda la, lp, ra, rp: False)
    with pytest.raises(OSError) as e:
        sh.connect(sh.socket(), B, 80, 0.0)
    assert e.value.errno == errno.EADDRNOTAVAIL


def test_connect_ports_shared_across_destinations_but_not_same_tuple():
    sh = make_shard(ephemeral_range=(50000, 50000))
    s1, s2 = sh.socket(), sh.socket()
    sh.connect(s1, B, 80, 0.0)
    sh.connect(s2, B, 81, 0.0)  # same local port, other destination
    assert sh.getsockname(s1) == sh.getsockname(s2) == (A, 50000)
    with pytest.raises(OSError) as e:
        sh.connect(sh.socket(), B, 80, 0.0)
    assert e.value.errno == errno.EADDRNOTAVAIL


def test_simultaneous_open():
    p = Pair()
    sa, sb = p.a.socket(), p.b.socket()
    p.a.bind(sa, A, 5000)
    p.b.bind(sb, B, 6000)
    p.a.connect(sa, B, 6000, 0.0)
    p.b.connect(sb, A, 5000, 0.0)
    p.deliver()
    flags = [(d, s.flags) for _, d, s in p.tap]
    assert flags[:4] == [("ab", "S"), ("ba", "S"), ("ab", "S."), ("ba", "S.")]
    assert p.a.state(sa) is State.ESTABLISHED and p.b.state(sb) is State.ESTABLISHED
    assert p.a.take_events() == [Connected(sa)] and p.b.take_events() == [Connected(sb)]
    p.a.send(sa, b"ping", 0.0)
    p.deliver()
    assert p.b.recv(sb, 10) == b"ping"


def test_handshake_through_pair_with_lost_syn():
    p = Pair()
    drops = {"n": 0}

    def lose_first_syn(direction, seg):
        if seg.flags == "S" and drops["n"] == 0:
            drops["n"] += 1
            return True
        return False

    p.drop = lose_first_syn
    p.listen()
    csd = p.a.socket()
    p.a.connect(csd, B, 80, 0.0)
    p.advance(0.5)
    assert p.a.state(csd) is State.SYN_SENT
    p.advance(1.0)
    assert p.a.state(csd) is State.ESTABLISHED
    assert p.a.sock(csd).srtt == 0.0  # Karn: no RTT sample from a retransmitted SYN


def _listen_pair():
    p = Pair()
    return p, p.listen()


def test_lost_synack_is_retransmitted_after_1s():
    p, lsd = _listen_pair()
    lost = []
    p.drop = lambda d, seg: seg.flags == "S." and not lost and not lost.append(seg)
    c = p.a.socket()
    p.a.connect(c, B, 80, 0.0)
    p.advance(0.99)
    assert p.a.state(c) is State.SYN_SENT
    p.advance(1.0)  # both the SYN and the SYN-ACK timers fire at 1 s
    assert p.a.state(c) is State.ESTABLISHED
    assert p.b.accept(lsd) is not None


def test_lost_final_ack_recovered_by_synack_retransmission():
    p, lsd = _listen_pair()
    lost = []
    p.drop = lambda d, seg: (d == "ab" and seg.flags == "." and not lost
                             and not lost.append(seg))
    c = p.a.socket()
    p.a.connect(c, B, 80, 0.0)
    p.deliver()
    assert p.a.state(c) is State.ESTABLISHED and p.b.accept(lsd) is None
    p.advance(1.0)
    # the retransmitted SYN-ACK draws an ACK (RFC 5961 §4.2 challenge) that completes it
    assert [x.flags for x in p.segs()][-2:] == ["S.", "."]
    assert p.b.accept(lsd) is not None
