"""LISTEN and SYN-RECEIVED (passive open), against a scripted peer."""

from __future__ import annotations

import errno
import socket

import pytest
from core_helpers import ACK, FIN, RST, SYN, B, Peer, listen, make_shard
from shardstack.core import Acceptable, DropReason, State


def listener(backlog: int = 8, **kw):
    sh = make_shard(**kw)
    return sh, listen(sh, backlog=backlog), Peer(sh)


def handshake(peer: Peer, isn: int = 1000, port: int | None = None, ts=(100, 0)):
    if port is not None:
        peer.port = port
    peer.send(SYN, isn, mss=1460, wscale=7, sack_perm=True, ts=ts)
    synack = peer.recv_one()
    peer.send(ACK, isn + 1, synack.seq + 1, ts=(101, synack.ts[0]) if ts else None)
    return synack


def test_syn_gets_synack_with_negotiated_options():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000, mss=1400, wscale=7, sack_perm=True, ts=(555, 0))
    s = peer.recv_one()
    assert s.flags == "S." and s.ack == 1001
    assert (s.sport, s.dport) == (80, 40000)
    assert s.mss == 1460 and s.wscale == 3 and s.sack_perm and s.ts[1] == 555
    # RFC 7323 §2.2: SYN windows are not scaled; Linux offers whole segments of its MSS
    # less the timestamp option: 45 x 1448 (tcp_select_initial_window)
    assert s.window == 65160
    assert sh.accept(lsd) is None  # only a request sock so far
    assert [c.state for c in sh.connections()] == ["LISTEN", "NEW-SYN-RECV"]


def test_synack_omits_options_the_peer_did_not_offer():
    sh, lsd, peer = listener()
    peer.send(SYN, 7, mss=1000)
    s = peer.recv_one()
    assert s.mss == 1460 and s.wscale is None and not s.sack_perm and s.ts is None


def test_final_ack_completes_and_accept_returns_child():
    sh, lsd, peer = listener()
    synack = handshake(peer)
    assert peer.recv() == []  # no reply to the final ACK
    assert sh.take_events() == [Acceptable(lsd)]
    sd, addr = sh.accept(lsd)
    assert addr == (B, 40000)
    assert sh.state(sd) is State.ESTABLISHED
    assert str(sh.state(sd)) == "ESTABLISHED"
    sk = sh.sock(sd)
    assert sk.snd_una == synack.seq + 1 and sk.rcv_nxt == 1001
    assert sk.snd_wscale == 7 and sk.rcv_wscale == 3 and sk.sack_ok and sk.ts_ok
    assert sk.mss_cache == 1460 - 12
    assert sh.accept(lsd) is None


def test_data_on_the_final_ack_is_queued():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000, mss=1460)
    synack = peer.recv_one()
    peer.send(ACK | 0x08, 1001, synack.seq + 1, payload=b"hello")
    sd, _ = sh.accept(lsd)
    assert sh.recv(sd, 100) == b"hello"


def test_ack_to_listener_gets_rst_from_its_ack():
    sh, lsd, peer = listener()
    peer.send(ACK, 5000, 123456)
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == 123456
    assert sh.stats.drops[DropReason.TCP_FLAGS] == 1


def test_rst_to_listener_is_dropped_silently():
    sh, lsd, peer = listener()
    peer.send(RST, 5000)
    assert peer.recv() == []


def test_wrong_ack_for_request_sock_gets_rst():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000)
    synack = peer.recv_one()
    peer.send(ACK, 1001, synack.seq + 5)
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == synack.seq + 5
    # the request sock survives; the right ACK still completes
    peer.send(ACK, 1001, synack.seq + 1)
    assert sh.accept(lsd) is not None


def test_retransmitted_syn_resends_synack():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000, mss=1460)
    s1 = peer.recv_one()
    peer.send(SYN, 1000, mss=1460, at=0.5)
    s2 = peer.recv_one()
    assert s2.flags == "S." and s2.seq == s1.seq and s2.ack == 1001


def test_synack_retransmission_timing_and_give_up():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000, mss=1460)
    first = peer.recv_one()
    times = []
    t = 0.0
    for _ in range(12):
        dl = sh.next_deadline()
        if dl is None:
            break
        t = dl
        for s in peer.advance(t):
            assert s.flags == "S." and s.seq == first.seq
            times.append(t)
    # Linux: tcp_synack_retries = 5, 1 s initial timeout doubling.
    assert times == [1.0, 3.0, 7.0, 15.0, 31.0]
    assert t == 63.0 and sh.next_deadline() is None
    assert sh.sock(lsd).reqs == 0
    assert sh.connections()[0].state == "LISTEN" and len(sh.connections()) == 1
    # a late ACK now finds no request sock: RST
    peer.send(ACK, 1001, first.seq + 1, at=64.0)
    assert peer.recv_one().flags == "R"


def test_rst_kills_request_sock():
    sh, lsd, peer = listener()
    peer.send(SYN, 1000)
    peer.recv_one()
    peer.send(RST, 1001)
    assert sh.sock(lsd).reqs == 0 and len(sh.connections()) == 1


def test_full_accept_queue_drops_syn():
    sh, lsd, peer = listener(backlog=1)  # Linux admits backlog + 1 = 2
    handshake(peer, port=40001)
    handshake(peer, port=40002)
    assert len(sh.sock(lsd).accept_queue) == 2
    peer.port = 40003
    peer.send(SYN, 1000, mss=1460)
    assert peer.recv() == []  # SYN dropped: the accept queue is full
    assert sh.stats.drops[DropReason.TCP_LISTEN_OVERFLOW] == 1


def test_full_accept_queue_drops_final_ack_and_synack_timer_retries():
    sh, lsd, peer = listener(backlog=1)
    peer.port = 41000
    peer.send(SYN, 1000, mss=1460)
    sa = peer.recv_one()
    handshake(peer, port=41001)  # request queue full: answered with a cookie
    handshake(peer, port=41002)
    assert len(sh.sock(lsd).accept_queue) == 2
    peer.port = 41000
    peer.send(ACK, 1001, sa.seq + 1, at=0.1)
    assert peer.recv() == []  # the final ACK is dropped, the request sock kept
    assert sh.stats.listen_overflows == 1
    assert sh.sock(lsd).reqs == 1
    # The SYN-ACK timer resends; once accept() made room the next ACK succeeds.
    assert [s.flags for s in peer.advance(1.0)] == ["S."]
    sh.accept(lsd)
    peer.send(ACK, 1001, sa.seq + 1, at=1.1)
    sh.accept(lsd)
    assert sh.accept(lsd)[1] == (B, 41000)


def test_full_request_queue_sends_syncookie_and_cookie_ack_completes():
    # Linux inet_csk_reqsk_queue_is_full: full only with MORE requests than the
    # backlog, so listen(fd, 0) takes one (backlog/listen-zero-first-syn.pkt)
    sh, lsd, peer = listener(backlog=0)
    peer.port = 40001
    peer.send(SYN, 1000, mss=1460)
    peer.recv_one()
    peer.port = 40002
    peer.send(SYN, 5000, mss=1460, wscale=7, sack_perm=True, ts=(900, 0))
    cookie = peer.recv_one()
    assert cookie.flags == "S." and sh.stats.syncookies_sent == 1
    assert sh.sock(lsd).reqs == 1  # nothing stored for the cookie
    peer.send(ACK, 5001, cookie.seq + 1, ts=(901, cookie.ts[0]))
    sd, addr = sh.accept(lsd)
    assert addr == (B, 40002)
    sk = sh.sock(sd)
    assert sk.state is State.ESTABLISHED and sk.snd_wscale == 7 and sk.sack_ok
    # a forged cookie is refused with RST
    peer.port = 40003
    peer.send(ACK, 7001, 0xDEADBEEF)
    assert peer.recv_one().flags == "R"


def test_full_request_queue_without_cookies_drops():
    sh, lsd, peer = listener(backlog=0, syncookies=False)  # one request fits (Linux: >)
    peer.port = 40001
    peer.send(SYN, 1000)
    peer.recv_one()
    peer.port = 40002
    peer.send(SYN, 1000)
    assert peer.recv() == []
    assert sh.stats.drops[DropReason.TCP_REQQFULLDROP] == 1


def test_syn_fin_is_dropped_by_reason():
    sh, lsd, peer = listener()
    peer.send(SYN | FIN, 1000)
    assert peer.recv() == []
    assert sh.stats.drops[DropReason.TCP_FLAGS] == 1


def test_closing_listener_resets_unaccepted_children():
    sh, lsd, peer = listener()
    handshake(peer)
    sh.take_events()
    sh.close(lsd, 1.0)
    r = peer.recv_one()
    assert r.flags == "R."
    assert sh.h.listening == {} and sh.h.ehash == {} and sh.h.bhash == {}
    with pytest.raises(OSError) as e:
        sh.accept(lsd)
    assert e.value.errno == errno.EBADF


def test_listener_maxseg_is_announced_and_inherited():
    # Linux tcp_mss_clamp: a TCP_MAXSEG set on the listener bounds the MSS the
    # SYN-ACK announces, the peer's MSS we send by (tcp_parse_options' user_mss),
    # and the child's advmss (tcp_v4_syn_recv_sock); the window is whole 1000s.
    sh = make_shard()
    lsd = listen(sh, opts=((socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000),))
    peer = Peer(sh)
    peer.send(SYN, 1000, mss=1460, wscale=7, sack_perm=True)
    sa = peer.recv_one()
    assert sa.flags == "S." and sa.mss == 1000 and sa.window == 65000
    peer.send(ACK, 1001, sa.seq + 1)
    sd = sh.accept(lsd)[0]
    assert sh.sock(sd).adv_mss == 1000
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1000
    sh.send(sd, bytes(3000), 0.0)
    assert [len(s.payload) for s in peer.recv()] == [1000, 1000, 1000]


@pytest.mark.parametrize("backlog", [0, 2])
def test_request_queue_is_full_only_above_the_backlog(backlog):
    # Linux inet_csk_reqsk_queue_is_full (and sk_acceptq_is_full) compare with '>':
    # backlog + 1 requests are stored, the next SYN gets a cookie.
    sh, lsd, peer = listener(backlog=backlog)
    for i in range(backlog + 1):
        peer.port = 40001 + i
        peer.send(SYN, 1000, mss=1460, wscale=7, sack_perm=True)
        sa = peer.recv_one()
        assert sa.flags == "S." and sa.wscale is not None and sa.sack_perm  # not a cookie
    assert sh.sock(lsd).reqs == backlog + 1 and sh.stats.syncookies_sent == 0
    peer.port = 40100
    peer.send(SYN, 1000, mss=1460, wscale=7, sack_perm=True)
    assert peer.recv_one().flags == "S." and sh.stats.syncookies_sent == 1


def test_syncookies_2_answers_every_syn_with_a_cookie():
    # Linux tcp_syncookies = 2: cookies always, not only when the SYN queue is full
    # (syncookies/*.pkt pass on Linux 6.18 with it)
    sh, lsd, peer = listener(backlog=10, syncookies=2)
    peer.send(SYN, 1000, mss=1000, wscale=7, sack_perm=True)  # no timestamps
    sa = peer.recv_one()
    assert sa.flags == "S." and sh.stats.syncookies_sent == 1
    assert sa.wscale is None and not sa.sack_perm and sh.sock(lsd).reqs == 0
    peer.send(ACK, 1001, sa.seq + 1)
    sd, _ = sh.accept(lsd)
    assert sh.sock(sd).mss == 536  # the cookie's MSS table entry below 1000
