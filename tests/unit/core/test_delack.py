"""The delayed-ACK engine (core/tcp_delack.py; Linux icsk_ack: tcp_event_data_recv,
tcp_send_delayed_ack, tcp_delack_timer_handler, tcp_event_data_sent), as packet
traces against one Shard: pingpong mode puts a request's ACK on its response,
the ato estimator stretches the delayed ACK when the application does not
answer, a retransmitted segment brings quick ACKs back, TCP_QUICKACK."""

from __future__ import annotations

import socket

from core_helpers import ACK, PSH, server_conn

REQ = b"q" * 100
RESP = b"r" * 100


def _exchange(sh, sd, peer, seq, una, at):
    """One request from the peer, the application's answer at once; the
    segments the shard sent for it (ACKs first, then the response)."""
    peer.send(ACK | PSH, seq, una, payload=REQ, at=at)
    assert sh.recv(sd, 1000) == REQ
    sh.send(sd, RESP, at)
    return peer.recv()


def test_request_response_acks_ride_on_the_responses():
    sh, sd, peer, una = server_conn()
    seq = 1001
    # The first request: quick-ack mode (the connection's start) ACKs it at
    # once; the answer, sent within ato of it, makes the connection interactive.
    out = _exchange(sh, sd, peer, seq, una, 0.1)
    assert [len(s.payload) for s in out] == [0, len(RESP)]
    assert sh.sock(sd).pingpong >= 1
    for i in range(1, 6):
        seq += len(REQ)
        una += len(RESP)
        out = _exchange(sh, sd, peer, seq, una, 0.1 + 0.05 * i)
        # No pure ACK: the request's ACK rides on the response (Linux pingpong).
        assert len(out) == 1 and out[0].payload == RESP and out[0].ack == seq + len(REQ)
    assert sh.stats.delayed_acks == 0


def test_the_delayed_ack_stretches_when_the_application_does_not_answer():
    # A 300 ms path (the handshake's RTT): the RTO is 0.9 s.
    sh, sd, peer, una = server_conn(ack_at=0.3)
    seq = 1001
    t = 0.5
    for _ in range(16):  # quick-ack mode: each segment ACKed at once
        peer.send(ACK | PSH, seq, una, payload=REQ, at=t)
        seq += len(REQ)
        assert peer.recv_one().ack == seq
        t += 0.5
    delays = []
    for _ in range(5):
        # One segment every 500 ms, never answered: each delayed ACK that fires
        # doubles ato (up to the RTO); the wait is ato, at most SRTT and 200 ms.
        peer.send(ACK | PSH, seq, una, payload=REQ, at=t)
        seq += len(REQ)
        assert peer.recv() == []
        due = sh.next_deadline()
        out = peer.advance(due)
        assert len(out) == 1 and out[0].ack == seq
        delays.append(round(due - t, 3))
        t += 0.5
    assert delays == [0.04, 0.08, 0.16, 0.2, 0.2]
    assert sh.stats.delayed_acks == 5


def test_a_retransmitted_segment_brings_quick_acks_back():
    sh, sd, peer, una = server_conn(sack_perm=True)
    seq = 1001
    for i in range(20):  # interactive, the quick ACKs of the start long used up
        _exchange(sh, sd, peer, seq, una, 0.1 + 0.05 * i)
        seq += len(REQ)
        una += len(RESP)
    t = 0.1 + 0.05 * 20
    # The peer sends its last request again (our ACK of it looked lost): a
    # D-SACK at once, and the next requests are ACKed at once too, before the
    # application answers (Linux tcp_send_dupack -> tcp_enter_quickack_mode).
    peer.send(ACK | PSH, seq - len(REQ), una, payload=REQ, at=t)
    dup = peer.recv_one()
    assert dup.ack == seq and dup.sack == ((seq - len(REQ), seq),)
    assert sh.stats.delayed_ack_lost == 1 and sh.sock(sd).pingpong == 0
    peer.send(ACK | PSH, seq, una, payload=REQ, at=t + 0.05)
    quick = peer.recv()
    assert len(quick) == 1 and not quick[0].payload and quick[0].ack == seq + len(REQ)


def test_tcp_quickack_option():
    sh, sd, peer, una = server_conn()
    _exchange(sh, sd, peer, 1001, una, 0.1)
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0  # pingpong
    # A request the application has not answered: its ACK is owed (delayed).
    peer.send(ACK | PSH, 1101, una + len(RESP), payload=REQ, at=0.15)
    assert peer.recv() == []
    # TCP_QUICKACK 1: out of pingpong mode, and the owed ACK goes now.
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    ack = peer.recv_one()
    assert ack.ack == 1201 and not ack.payload
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
