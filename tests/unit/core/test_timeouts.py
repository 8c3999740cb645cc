"""Giving up on a peer, as Linux does (``tcp_write_timeout``): retransmissions end by
*time* (tcp_retries2 = 15 -> 924.6 s from the first retransmission, whatever the
RTO), TCP_USER_TIMEOUT (RFC 5482) replaces that time and bounds keepalive,
TCP_SYNCNT sets the SYN retries, TCP_LINGER2 the orphaned FIN-WAIT-2 wait.
Fake clocks throughout: a SimLink whose path goes silent, or a scripted Peer."""

from __future__ import annotations

import errno
import socket

import pytest
from core_helpers import ACK, SYN, B, Pair, Peer, connect_over, listen, make_shard, parse
from shardstack.core import Closed, SocketError, State
from shardstack.netio.simlink import LinkParams, SimLink

TCP = socket.IPPROTO_TCP
RTO_MIN, RTO_MAX = 0.2, 120.0


def backoff_total(boundary: int, base: float) -> float:
    """What ``boundary`` doublings of an RTO starting at ``base`` and capped at
    TCP_RTO_MAX add up to (tcp(7): tcp_retries2 = 15 is "924.6 seconds")."""
    return sum(min(base * 2 ** k, RTO_MAX) for k in range(boundary + 1))


def silent_peer(one_way: float, opts: tuple = (), data: bytes = b"hello"):
    """a connected to b over a path of ``one_way`` delay; ``opts`` set on a's socket;
    then the path goes dead, a sends ``data`` and the link runs until a's socket
    reports an error (at most 3000 s).  Returns (a, sd, send time, error time,
    errno, times of a's RTO retransmissions)."""
    a, b = make_shard(), make_shard(B)
    dead = [False]
    sent: list[float] = []

    def tap(now: float, direction: str, pkt: bytes) -> None:
        if direction == "ab" and parse(pkt).payload:
            sent.append(now)

    link = SimLink(a, b, params=LinkParams(delay=one_way, filter=lambda now, pkt: dead[0]),
                   tap=tap)
    c, _ = connect_over(link, a, b)
    link.run_for(0.1)
    for opt, value in opts:
        a.setsockopt(c, TCP, opt, value)
    a.take_events()
    dead[0] = True
    t_send = link.now
    assert a.send(c, data, t_send) == len(data)
    errs: list = []

    def failed() -> bool:
        errs.extend(e for e in a.take_events() if isinstance(e, SocketError))
        return bool(errs)

    assert link.run_until(failed, t_send + 3000.0)
    # The first resend is the tail loss probe (2 SRTT out): not a retransmission
    # timeout, and not what starts the clock (Linux stamps retrans_stamp on RTOs).
    tlp = a.stats.tlp_probes
    assert tlp == 1
    return a, c, t_send, link.now, errs[0].errno, sent[1 + tlp:]


# -- the tcp_retries2 rule is a time -----------------------------------------------------

@pytest.mark.parametrize("one_way, rto", [(0.001, RTO_MIN), (1 / 6, 1.0)])
def test_retransmissions_give_up_after_linux_time_not_a_count(one_way, rto):
    """ETIMEDOUT comes at the first RTO expiry at least tcp_model_timeout(15, 200 ms)
    = 924.6 s after the first retransmission: within one (backed-off) RTO of it,
    for an RTO of 200 ms and of 1 s alike."""
    a, c, t_send, t_err, err, sent = silent_peer(one_way)
    assert err == errno.ETIMEDOUT and a.state(c) is State.CLOSED
    assert a.stats.rto_fires == len(sent)
    first = sent[0]
    limit = backoff_total(15, RTO_MIN)
    assert limit == pytest.approx(924.6)
    assert first + limit <= t_err + 1e-6
    # the last retransmission came before the limit, and the timer that gave up
    # was that one's RTO (capped at 120 s): "within one RTO".
    assert sent[-1] < first + limit
    assert t_err - sent[-1] == pytest.approx(min(rto * 2 ** len(sent), RTO_MAX), abs=1e-3)
    assert t_err - (first + limit) <= RTO_MAX


def test_a_one_second_rto_retransmits_fewer_than_fifteen_times():
    """With a 1 s RTO the backoff reaches 120 s sooner: Linux gives up 966 s after
    the first retransmission, having sent 13, where counting to 15 would take 1206 s."""
    a, c, t_send, t_err, err, sent = silent_peer(1 / 6)
    assert a.sock(c).rto == pytest.approx(1.0)
    assert len(sent) == 13
    assert t_err - sent[0] == pytest.approx(966.0, abs=1e-3)
    assert t_err - sent[0] < backoff_total(15, 1.0) - 1.0  # the count rule's moment


def test_orphaned_socket_gives_up_after_tcp_orphan_retries():
    """close() with data a silent peer never acknowledges: the orphan lives for
    tcp_orphan_retries (8 while the RTO is below 120 s: 102.2 s), not 924.6 s."""
    a, b = make_shard(), make_shard(B)
    dead = [False]
    link = SimLink(a, b, params=LinkParams(delay=0.001, filter=lambda now, pkt: dead[0]))
    c, _ = connect_over(link, a, b)
    link.run_for(0.1)
    dead[0] = True
    t0 = link.now
    a.send(c, b"unacknowledged", t0)
    a.close(c, t0)
    a.take_events()
    box: list = []
    assert link.run_until(lambda: bool(box.extend(a.take_events()) or box), t0 + 1000.0)
    assert box == [Closed(c)]
    first = t0 + RTO_MIN
    assert first + backoff_total(8, RTO_MIN) <= link.now <= first + backoff_total(9, RTO_MIN)


# -- TCP_USER_TIMEOUT (RFC 5482) --------------------------------------------------------

def test_user_timeout_aborts_an_established_connection_after_five_seconds():
    a, c, t_send, t_err, err, sent = silent_peer(0.001, ((socket.TCP_USER_TIMEOUT, 5000),))
    assert err == errno.ETIMEDOUT and a.state(c) is State.CLOSED
    # Linux measures from the first retransmission and clamps the last RTO to it.
    assert t_err - sent[0] == pytest.approx(5.0, abs=1e-3)
    assert 5.0 <= t_err - t_send <= 5.0 + 2 * RTO_MIN + 1e-3  # the probe, then the RTO


def test_user_timeout_bounds_connect():
    """In SYN-SENT too (Linux since 2019): counted from the first SYN."""
    sh = make_shard()
    sd = sh.socket()
    sh.setsockopt(sd, TCP, socket.TCP_USER_TIMEOUT, 5000)
    sh.connect(sd, B, 80, 0.0)
    peer = Peer(sh)
    syns = [0.0] if peer.recv() else []
    syns += [t for t, _ in peer.run_timers()]
    # Linux 6.18 (measured on a veth): SYNs at 0, 1, 2, 3, 4 s (linear timeouts), ETIMEDOUT at 5 s
    assert syns == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert peer.now == pytest.approx(5.0)
    assert sh.take_events() == [SocketError(sd, errno.ETIMEDOUT)]


def test_user_timeout_bounds_keepalive_probing():
    """With TCP_USER_TIMEOUT the peer is dead once that long has passed since it was
    last heard from (and a probe went unanswered), not after TCP_KEEPCNT probes."""
    for ut, expect in ((15000, 15.0), (0, 10.0 + 9 * 1.0)):
        p = Pair()
        _, c, s = p.connect()
        sh = p.a
        sh.setsockopt(c, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sh.setsockopt(c, TCP, socket.TCP_KEEPIDLE, 10)
        sh.setsockopt(c, TCP, socket.TCP_KEEPINTVL, 1)
        if ut:
            sh.setsockopt(c, TCP, socket.TCP_USER_TIMEOUT, ut)
        sh.take_events()
        p.drop = lambda d, seg: True  # the peer vanishes
        t0 = sh.sock(c).rcv_tstamp
        p.advance(t0 + expect - 0.01)
        assert sh.state(c) is State.ESTABLISHED and sh.take_events() == []
        p.advance(t0 + expect + 1e-6)
        assert sh.take_events() == [SocketError(c, errno.ETIMEDOUT)]
        assert sh.stats.keepalive_probes == (5 if ut else 9)


@pytest.mark.parametrize("ut", [3000, 0])
def test_user_timeout_bounds_a_window_that_stays_shut(ut):
    """RFC 1122 §4.2.2.17: zero-window probing goes on while the peer answers; with
    TCP_USER_TIMEOUT the window must open within that time of the first probe."""
    p = Pair()
    # b never reads: its window closes
    _, c, _ = p.connect(backlog=4, opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    if ut:
        p.a.setsockopt(c, TCP, socket.TCP_USER_TIMEOUT, ut)
    p.a.take_events()
    p.a.send(c, bytes(100_000), 0.0)
    p.advance(0.05)  # the zero window's ACK is a delayed one (2 quick ACKs for a 4 KiB window)
    sk = p.a.sock(c)
    assert sk.snd_wnd == 0
    first_probe = sk.timers[5]
    events: list = []
    t = 0.0
    while t < 200.0 and not events:
        t = round(t + 0.05, 3)
        p.advance(t)
        events += [e for e in p.a.take_events() if isinstance(e, SocketError)]
    if ut:
        assert events == [SocketError(c, errno.ETIMEDOUT)]
        assert t == pytest.approx(first_probe + ut / 1000, abs=0.05)
    else:
        assert events == [] and p.a.state(c) is State.ESTABLISHED
        assert p.a.stats.zero_window_probes > 8  # answered probes never run out


def test_user_timeout_option_values():
    sh = make_shard()
    sd = sh.socket()
    assert sh.getsockopt(sd, TCP, socket.TCP_USER_TIMEOUT) == 0
    sh.setsockopt(sd, TCP, socket.TCP_USER_TIMEOUT, 30000)
    assert sh.getsockopt(sd, TCP, socket.TCP_USER_TIMEOUT) == 30000
    with pytest.raises(OSError) as e:
        sh.setsockopt(sd, TCP, socket.TCP_USER_TIMEOUT, -1)
    assert e.value.errno == errno.EINVAL
    sh.setsockopt(sd, TCP, socket.TCP_USER_TIMEOUT, 0)  # back to tcp_retries2
    assert sh.getsockopt(sd, TCP, socket.TCP_USER_TIMEOUT) == 0


# -- TCP_SYNCNT ---------------------------------------------------------------------------

def test_syncnt_two_gives_etimedout_after_one_plus_two_plus_four_seconds():
    # Linux 6.18 (measured on a veth): linear SYN timeouts, so retransmissions at
    # 1..5 s, but the give-up time is still that of 2 doubling ones (1 + 2 + 4 s).
    sh = make_shard()
    sd = sh.socket()
    assert sh.getsockopt(sd, TCP, socket.TCP_SYNCNT) == 6  # tcp_syn_retries
    sh.setsockopt(sd, TCP, socket.TCP_SYNCNT, 2)
    sh.connect(sd, B, 80, 0.0)
    peer = Peer(sh)
    assert peer.recv_one().flags == "S"
    assert [t for t, _ in peer.run_timers()] == [1.0, 2.0, 3.0, 4.0, 5.0] and peer.now == 7.0
    assert sh.take_events() == [SocketError(sd, errno.ETIMEDOUT)]
    assert sh.state(sd) is State.CLOSED


@pytest.mark.parametrize("bad", [0, 128, -1])
def test_syncnt_out_of_range_is_einval(bad):
    sh = make_shard()
    sd = sh.socket()
    with pytest.raises(OSError) as e:
        sh.setsockopt(sd, TCP, socket.TCP_SYNCNT, bad)
    assert e.value.errno == errno.EINVAL
    for good in (1, 127):
        sh.setsockopt(sd, TCP, socket.TCP_SYNCNT, good)
        assert sh.getsockopt(sd, TCP, socket.TCP_SYNCNT) == good


def test_syncnt_on_a_listener_sets_its_synack_retries():
    """Linux ``reqsk_timer_handler``: the listener's TCP_SYNCNT, else tcp_synack_retries."""
    sh = make_shard()
    lsd = listen(sh, opts=((TCP, socket.TCP_SYNCNT, 2),))
    peer = Peer(sh)
    peer.send(SYN, 1000)
    assert peer.recv_one().flags == "S."
    assert [t for t, _ in peer.run_timers()] == [1.0, 3.0] and peer.now == 7.0
    assert sh.sock(lsd).reqs == 0 and sh.stats.synack_timeouts == 1
    peer.send(ACK, 1001, 1, at=8.0)
    assert peer.recv_one().flags == "R"  # the request sock is gone


# -- TCP_LINGER2 --------------------------------------------------------------------------

def closed_at(p: Pair, c: int, until: float) -> float | None:
    """Run the pair in 0.1 s steps; when ``c``'s descriptor was released."""
    t = p.now
    while t < until:
        t = round(t + 0.1, 6)
        p.advance(t)
        if Closed(c) in p.a.take_events():
            return t
    return None


@pytest.mark.parametrize("linger2, expect", [(5, 5.0), (0, 60.0)])
def test_linger2_sets_the_orphaned_fin_wait2_timeout(linger2, expect):
    p = Pair()
    _, c, s = p.connect()
    if linger2:
        p.a.setsockopt(c, TCP, socket.TCP_LINGER2, linger2)
    assert p.a.getsockopt(c, TCP, socket.TCP_LINGER2) == expect
    p.a.take_events()
    p.a.close(c, 0.0)
    p.deliver()  # b acknowledges the FIN but never closes
    assert p.b.state(s) is State.CLOSE_WAIT
    assert p.a.sock(c).state is State.FIN_WAIT2
    t = closed_at(p, c, 100.0)
    assert t is not None and expect <= t <= expect + 0.1 + 1e-9
    assert p.a.h.ehash == {}


def test_negative_linger2_closes_fin_wait2_at_once():
    """TCP_LINGER2 < 0: no FIN-WAIT-2 wait; closing a socket already there resets."""
    p = Pair()
    _, c, s = p.connect()
    p.a.setsockopt(c, TCP, socket.TCP_LINGER2, -1)
    assert p.a.getsockopt(c, TCP, socket.TCP_LINGER2) == -1
    p.a.shutdown(c, socket.SHUT_WR, 0.0)
    p.deliver()
    assert p.a.state(c) is State.FIN_WAIT2  # not orphaned: waits for the peer
    p.a.close(c, 0.1)
    assert p.a.h.ehash == {}
    p.deliver()
    assert p.segs("ab")[-1].flags == "R."
    assert p.b.take_events()[-1] == SocketError(s, errno.EPIPE)


def test_linger2_is_clamped_to_tcp_fin_timeout_max():
    sh = make_shard()
    sd = sh.socket()
    assert sh.getsockopt(sd, TCP, socket.TCP_LINGER2) == 60  # tcp_fin_timeout
    sh.setsockopt(sd, TCP, socket.TCP_LINGER2, 500)
    assert sh.getsockopt(sd, TCP, socket.TCP_LINGER2) == 120


@pytest.mark.parametrize(("opt", "top"), [(socket.TCP_KEEPIDLE, 32767),
                                          (socket.TCP_KEEPINTVL, 32767),
                                          (socket.TCP_KEEPCNT, 127)])
def test_keepalive_options_out_of_range_are_einval(opt, top):
    """Linux's bounds: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL (s), MAX_TCP_KEEPCNT."""
    sh = make_shard()
    sd = sh.socket()
    for bad in (0, -1, top + 1):
        with pytest.raises(OSError) as e:
            sh.setsockopt(sd, TCP, opt, bad)
        assert e.value.errno == errno.EINVAL
    for good in (1, top):
        sh.setsockopt(sd, TCP, opt, good)
        assert sh.getsockopt(sd, TCP, opt) == good
