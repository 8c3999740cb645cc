"""Closing: FIN-WAIT-1/2, CLOSING, TIME-WAIT, CLOSE-WAIT, LAST-ACK, half close, aborts."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from core_helpers import ACK, FIN, PSH, RST, SYN, Pair, Peer, make_shard, parse, server_conn
from shardstack.core import Closed, Readable, SocketError, State
from shardstack.core.wire.tcp import build_tcp_ipv4


def established():
    p = Pair()
    lsd, csd, ssd = p.connect()
    p.a.take_events()
    p.b.take_events()
    p.tap.clear()
    return p, csd, ssd


def test_active_close_goes_through_fin_wait_to_time_wait():
    p, c, s = established()
    p.a.close(c, 0.0)
    fin = p.a.take_frames()
    assert p.a.sock(c).state is State.FIN_WAIT1
    p.b.receive(fin[0], 0.0)
    assert p.b.state(s) is State.CLOSE_WAIT
    assert p.b.take_events() == [Readable(s)]
    assert p.b.recv(s, 10) == b""
    p.deliver()  # b's ACK of the FIN
    assert p.a.sock(c).state is State.FIN_WAIT2
    p.b.close(s, 0.0)
    assert p.b.state(s) is State.LAST_ACK
    p.deliver()
    assert p.b.take_events() == [Closed(s)]
    tw = next(iter(p.a.h.ehash.values()))
    assert tw.state is State.TIME_WAIT
    assert p.a.take_events() == [Closed(c)]
    assert [(d, x.flags) for _, d, x in p.tap] == [("ba", "."), ("ba", "F."), ("ab", ".")]
    # TIME-WAIT lasts 60 s and holds the port
    port = tw.lport
    p.advance(59.9)
    assert port in p.a.h.bhash
    p.advance(60.0)
    assert p.a.h.ehash == {} and p.a.h.bhash == {}


def test_simultaneous_close_goes_through_closing():
    p, c, s = established()
    p.a.close(c, 0.0)
    p.b.close(s, 0.0)
    p.deliver()
    assert [x.flags for x in p.segs()] == ["F.", "F.", ".", "."]
    states = sorted(str(sk.state) for sk in p.a.h.ehash.values()) + \
        sorted(str(sk.state) for sk in p.b.h.ehash.values())
    assert states == ["TIME-WAIT", "TIME-WAIT"]


def test_closing_state_seen_when_fin_crosses_before_ack():
    p, c, s = established()
    p.a.close(c, 0.0)
    p.b.close(s, 0.0)
    fa, fb = p.a.take_frames(), p.b.take_frames()
    p.a.receive(fb[0], 0.0)
    sk = p.a.sock(c)
    assert sk.state is State.CLOSING
    p.b.receive(fa[0], 0.0)
    p.deliver()
    assert sk.state is State.TIME_WAIT


@pytest.mark.parametrize("case", ["fin_with_data", "bare_fin_after_data", "bare_fin_no_data"])
def test_peer_fin_ack_is_delayed_once_data_was_received(case):
    # Linux tcp_fin enters pingpong mode in ESTABLISHED, so the FIN's ACK is a
    # delayed one (40 ms) once data started the delayed-ACK engine; with no data
    # ever received it goes at once (packetdrill close/fin-with-data and
    # close/passive-close pass on Linux 6.18).
    sh, sd, peer, una = server_conn()
    seq = 1001
    if case == "bare_fin_after_data":
        peer.send(ACK | PSH, seq, una, payload=b"x" * 10, at=0.1)
        assert peer.recv_one().ack == seq + 10  # quick-ack mode: at once
        seq += 10
    payload = b"y" * 10 if case == "fin_with_data" else b""
    peer.send(ACK | FIN, seq, una, payload=payload, at=0.3)
    end = seq + len(payload) + 1
    assert sh.state(sd) is State.CLOSE_WAIT
    if case == "bare_fin_no_data":
        assert peer.recv_one().ack == end
        return
    assert peer.recv() == []
    assert sh.next_deadline() == pytest.approx(0.340)
    (t, ack), = peer.run_timers(1)
    assert t == pytest.approx(0.340) and ack.flags == "." and ack.ack == end


def test_half_close_shutdown_wr_keeps_receiving():
    p, c, s = established()
    p.a.shutdown(c, socket.SHUT_WR, 0.0)
    p.deliver()
    assert p.a.state(c) is State.FIN_WAIT2 and p.b.state(s) is State.CLOSE_WAIT
    with pytest.raises(OSError) as e:
        p.a.send(c, b"x", 0.0)
    assert e.value.errno == errno.EPIPE
    p.b.send(s, b"still talking", 0.0)
    p.deliver()
    assert p.a.recv(c, 100) == b"still talking"
    p.b.shutdown(s, socket.SHUT_WR, 0.0)
    p.deliver()
    assert p.a.state(c) is State.TIME_WAIT and p.b.state(s) is State.CLOSED
    assert p.a.recv(c, 100) == b""


def test_so_linger_zero_sends_rst():
    p, c, s = established()
    p.a.setsockopt(c, socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    p.a.close(c, 0.0)
    p.deliver()
    assert [x.flags for x in p.segs()] == ["R."]
    assert p.a.h.ehash == {} and p.a.take_events() == [Closed(c)]
    assert p.b.take_events() == [SocketError(s, errno.ECONNRESET)]
    assert p.b.state(s) is State.CLOSED
    with pytest.raises(OSError) as e:
        p.b.recv(s, 10)
    assert e.value.errno == errno.ECONNRESET


def test_close_with_unread_data_sends_rst():
    p, c, s = established()
    p.a.send(c, b"unread", 0.0)
    p.deliver()
    p.b.close(s, 0.0)
    p.deliver()
    assert p.segs()[-1].flags == "R."
    assert p.a.take_events() == [SocketError(c, errno.ECONNRESET)]


def test_rst_in_close_wait_is_epipe():
    p, c, s = established()
    p.a.close(c, 0.0)
    p.deliver()
    sk_a = next(iter(p.a.h.ehash.values()))
    p.b.receive(_rst_from(sk_a), 0.0)
    assert p.b.take_events()[-1] == SocketError(s, errno.EPIPE)


def test_after_fin_then_rst_read_gives_eof_and_write_epipe():
    # Linux tcp_recvmsg checks SOCK_DONE (FIN received) before sk_err; the write
    # gets the EPIPE tcp_reset left, then EPIPE again (rst/rst-close-wait.pkt).
    p, c, s = established()
    p.a.close(c, 0.0)
    p.deliver()
    sk_a = next(iter(p.a.h.ehash.values()))
    p.b.receive(_rst_from(sk_a), 0.0)
    assert p.b.recv(s, 100) == b""
    for _ in range(2):
        with pytest.raises(OSError) as e:
            p.b.send(s, b"x", 0.0)
        assert e.value.errno == errno.EPIPE


def test_write_after_rst_is_econnreset_then_epipe():
    # Linux: sock_error() once, then sk_stream_wait_connect's EPIPE
    # (rst/rst-established-write.pkt); never ENOTCONN, not even on a socket that
    # never connected or a listener (Linux 6.18: both EPIPE).
    p, c, s = established()
    p.b.receive(_rst_from(p.a.sock(c)), 0.0)
    errs = []
    for _ in range(2):
        with pytest.raises(OSError) as e:
            p.b.send(s, b"x", 0.0)
        errs.append(e.value.errno)
    assert errs == [errno.ECONNRESET, errno.EPIPE]
    assert p.b.recv(s, 100) == b""  # tcp_done shut both directions
    lsd = p.b.socket()
    fresh = p.b.socket()
    p.b.bind(lsd, 0, 81)
    p.b.listen(lsd, 1)
    for sd in (fresh, lsd):
        with pytest.raises(OSError) as e:
            p.b.send(sd, b"x", 0.0)
        assert e.value.errno == errno.EPIPE


def _rst_from(sk):
    return build_tcp_ipv4(sk.laddr, sk.raddr, sk.lport, sk.rport, sk.snd_nxt, 0, RST, 0)


def test_last_ack_retransmits_fin_then_closes():
    p, c, s = established()
    p.a.close(c, 0.0)
    p.deliver()
    p.b.close(s, 0.0)
    p.b.take_frames()  # b's FIN is lost
    sk = p.b.sock(s)
    assert sk.state is State.LAST_ACK
    p.advance(sk.rto + 0.001)
    assert p.segs()[-2].flags == "F." and p.segs()[-1].flags == "."
    assert p.b.take_events()[-1] == Closed(s)


def test_orphaned_fin_wait2_times_out_after_60s():
    p, c, s = established()
    p.a.close(c, 0.0)
    p.deliver()  # b never closes
    assert p.a.sock(c).state is State.FIN_WAIT2
    p.advance(59.0)
    assert p.a.h.ehash
    p.advance(60.1)
    assert p.a.h.ehash == {} and p.a.h.bhash == {}


# -- TIME-WAIT and RST to no socket, against a scripted peer -------------------------------

def tw_shard():
    """A shard with one connection in TIME-WAIT toward Peer (B:40000 -> A:80)."""
    sh, sd, peer, _ = server_conn()
    sh.close(sd, 0.0)
    fin = peer.recv_one()
    assert fin.flags == "F."
    peer.send(FIN | ACK, 1001, fin.seq + 1)
    ack = peer.recv_one()
    assert ack.flags == "." and ack.ack == 1002
    tw = sh.h.ehash[(ack.src, 80, ack.dst, 40000)]
    assert tw.state is State.TIME_WAIT
    return sh, peer, tw, fin


def test_time_wait_reacks_retransmitted_fin_and_restarts_timer():
    sh, peer, tw, fin = tw_shard()
    peer.send(FIN | ACK, 1001, fin.seq + 1, at=30.0)
    ack = peer.recv_one()
    assert ack.flags == "." and ack.ack == 1002
    assert sh.next_deadline() == 90.0


def test_time_wait_recycled_by_new_syn():
    sh, peer, tw, fin = tw_shard()
    peer.send(SYN, 5000, at=1.0)
    sa = peer.recv_one()
    assert sa.flags == "S." and sa.ack == 5001
    assert sa.seq == (fin.seq + 1 + 65535 + 2) & 0xFFFFFFFF
    assert sh.stats.tw_recycled == 1


def test_time_wait_old_syn_gets_ack_not_synack():
    sh, peer, tw, fin = tw_shard()
    peer.send(SYN, 900, at=1.0)
    r = peer.recv_one()
    assert r.flags == "." and r.ack == 1002


def test_time_wait_killed_by_rst():
    sh, peer, tw, fin = tw_shard()
    peer.send(RST, 1002, at=1.0)
    assert peer.recv() == [] and sh.h.ehash == {}


def test_rst_for_segment_to_no_socket():
    sh = make_shard()
    peer = Peer(sh)
    peer.send(SYN, 1000, dport=81)
    r = peer.recv_one()
    assert r.flags == "R." and r.seq == 0 and r.ack == 1001
    peer.send(ACK, 1000, 4242, dport=81, payload=b"abc")
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == 4242
    peer.send(FIN, 1000, dport=81, payload=b"abc")
    assert peer.recv_one().ack == 1004
    peer.send(RST | ACK, 1000, 5, dport=81)
    assert peer.recv() == []  # never RST an RST


def _to_state(p, c, s, target):
    """Drive a's socket c into ``target`` (b's FINs/ACKs are lost where needed)."""
    if target == "FIN-WAIT-1":
        p.a.shutdown(c, socket.SHUT_WR, 0.0)
        p.a.take_frames()  # the FIN is lost
    elif target == "FIN-WAIT-2":
        p.a.shutdown(c, socket.SHUT_WR, 0.0)
        p.deliver()
    elif target == "CLOSING":
        p.a.shutdown(c, socket.SHUT_WR, 0.0)
        p.b.shutdown(s, socket.SHUT_WR, 0.0)
        p.a.take_frames()  # a's FIN is lost, so b's FIN finds a in FIN-WAIT-1
        p.a.receive(p.b.take_frames()[0], 0.0)
        p.a.take_frames()
    elif target == "CLOSE-WAIT":
        p.b.shutdown(s, socket.SHUT_WR, 0.0)
        p.deliver()
    elif target == "LAST-ACK":
        p.b.shutdown(s, socket.SHUT_WR, 0.0)
        p.deliver()
        p.a.shutdown(c, socket.SHUT_WR, 0.0)
        p.a.take_frames()
    assert str(p.a.sock(c).state) == target


@pytest.mark.parametrize("target,err", [("FIN-WAIT-1", errno.ECONNRESET),
                                        ("FIN-WAIT-2", errno.ECONNRESET),
                                        ("CLOSING", errno.ECONNRESET),
                                        ("CLOSE-WAIT", errno.EPIPE),
                                        ("LAST-ACK", errno.ECONNRESET)])
def test_rst_with_exact_sequence_closes_every_state(target, err):
    p, c, s = established()
    _to_state(p, c, s, target)
    ska = p.a.sock(c)
    skb = p.b.sock(s)
    # in-window but not exact: challenge ACK, state kept (RFC 5961 §3.2)
    p.a.receive(build_tcp_ipv4(skb.laddr, skb.raddr, skb.lport, skb.rport,
                               (ska.rcv_nxt + 10) & 0xFFFFFFFF, 0, RST, 0), 0.0)
    assert [x.flags for x in map(parse, p.a.take_frames())] == ["."]
    assert str(ska.state) == target
    p.a.receive(build_tcp_ipv4(skb.laddr, skb.raddr, skb.lport, skb.rport, ska.rcv_nxt, 0,
                               RST, 0), 1.0)
    assert p.a.take_frames() == []
    assert ska.state is State.CLOSED
    assert SocketError(c, err) in p.a.take_events()
    assert p.a.h.ehash == {}


def test_recv_on_never_connected_socket_is_enotconn():
    # Linux tcp_recvmsg: a CLOSE socket that was never connected (no SOCK_DONE,
    # no shutdown) answers ENOTCONN, fresh or bound; one that tcp_done closed
    # reads EOF (the case above).
    p = Pair()
    fresh = p.a.socket()
    bound = p.a.socket()
    p.a.bind(bound, 0, 4242)
    for sd in (fresh, bound):
        with pytest.raises(OSError) as e:
            p.a.recv(sd, 100)
        assert e.value.errno == errno.ENOTCONN
