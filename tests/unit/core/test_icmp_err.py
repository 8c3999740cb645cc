"""ICMP errors reaching TCP (core.icmp, tcp_ipv4.tcp_v4_err), PMTU discovery, and
connect() again after a failed connect -- against a scripted peer and router.

The shard is A (the client, port chosen at connect), the peer B:80; a router R
on the path reports errors about the shard's segments by quoting them
(RFC 792 p.5), as a Linux router's ``icmp_send`` does.
"""

from __future__ import annotations

import errno
import random
import socket

import pytest
from core_helpers import ACK, RST, SYN, A, B, Peer, listen, make_shard, parse
from shardstack.core import Connected, DropReason, SocketError, State
from shardstack.core.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_FRAG_NEEDED,
    ICMP_HOST_UNREACH,
    ICMP_NET_UNREACH,
    ICMP_PARAMETERPROB,
    ICMP_PKT_FILTERED,
    ICMP_PORT_UNREACH,
    ICMP_PROT_UNREACH,
    ICMP_SOURCE_QUENCH,
    ICMP_TIME_EXCEEDED,
    build_icmp,
    build_icmp_error,
)
from shardstack.core.wire.ipv4 import PROTO_ICMP, build_ipv4, parse_ipv4, str_to_ip
from shardstack.core.wire.tcp import build_tcp_ipv4

R = str_to_ip("198.18.0.254")  # the router that reports
DATA = random.Random(7).randbytes(10 * 1448)


def icmp_from(src: int, itype: int, code: int, original: bytes, rest: int = 0) -> bytes:
    """A whole IPv4 packet: ``src`` tells A about ``original`` (one of A's packets)."""
    return build_ipv4(src, A, PROTO_ICMP, build_icmp_error(itype, code, original, rest),
                      df=False)


def connecting():
    """A socket in SYN-SENT; returns (shard, sd, peer, raw SYN frame)."""
    sh = make_shard()
    sd = sh.socket()
    sh.connect(sd, B, 80, 0.0)
    frames = sh.take_frames()
    assert len(frames) == 1
    peer = Peer(sh, port=80)
    return sh, sd, peer, frames[0]


def established():
    """A connected client socket (timestamps, SACK, MSS 1460); (shard, sd, peer, syn)."""
    sh, sd, peer, syn_frame = connecting()
    syn = parse(syn_frame)
    peer.send(SYN | ACK, 5000, syn.seq + 1, dport=syn.sport, mss=1460, wscale=7,
              sack_perm=True, ts=(100, syn.ts[0]), at=0.01)
    assert len(peer.recv()) == 1  # our ACK
    assert sh.take_events() == [Connected(sd)]
    return sh, sd, peer, syn


def send_flight(sh, sd, now=0.02):
    """Write DATA; returns the raw frames of the first flight (cwnd 10)."""
    assert sh.send(sd, DATA, now) == len(DATA)
    frames = sh.take_frames()
    assert len(frames) == 10 and all(len(parse(f).payload) == 1448 for f in frames)
    return frames


# -- fragmentation needed (RFC 1191) -------------------------------------------------------


def test_frag_needed_shrinks_mss_and_resends_the_flight_in_the_new_size():
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    una = parse(flight[0]).seq
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, flight[0], 1000), 0.05)
    sk = sh.sock(sd)
    assert sk.mss == 960 and sk.mss_cache == 948  # 1000 - 40, minus the timestamp option
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 948
    assert sh.stats.tcp_pmtu_reductions == 1 and sh.stats.icmp_in_dest_unreachs == 1
    resent = sh.take_frames()
    assert resent, "the flight was not resent"
    segs = [parse(f) for f in resent]
    # The flight again from SND.UNA, contiguous, no segment above the new MTU, DF kept.
    assert segs[0].seq == una
    for a, b in zip(segs, segs[1:], strict=False):
        assert b.seq == a.seq + len(a.payload)
    assert all(len(f) <= 1000 and len(s.payload) <= 948 for f, s in zip(resent, segs, strict=True))
    assert all(parse_ipv4(f)[0].flags & 0x2 for f in resent)
    assert b"".join(s.payload for s in segs) == DATA[:sum(len(s.payload) for s in segs)]
    assert sh.stats.retrans_segs >= len(resent)
    assert sh.take_events() == []  # nothing for the application to see


def test_after_frag_needed_the_whole_stream_arrives_in_small_segments():
    """Drive it to the end: the peer acks what arrives in order; every segment after
    the ICMP fits the 1000-byte path and the stream is intact."""
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, flight[1], 1000), 0.05)
    got = bytearray()
    base = parse(flight[0]).seq
    t = 0.05
    tsval = 200
    for _ in range(200):  # bounded: 15 KB in 948-byte segments
        frames = sh.take_frames()
        if not frames and len(got) == len(DATA):
            break
        for f in frames:
            assert len(f) <= 1000, "a segment larger than the path MTU after the ICMP"
            s = parse(f)
            off = s.seq - base
            if off == len(got) and s.payload:
                got += s.payload
        t += 0.01
        tsval += 1
        peer.send(ACK, 5001, base + len(got), dport=syn.sport, ts=(tsval, 0), at=t)
    assert bytes(got) == DATA
    assert sh.sock(sd).snd_una == base + len(DATA)
    assert sh.state(sd) is State.ESTABLISHED


def test_frag_needed_never_raises_the_mtu_and_clamps_to_min_pmtu():
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, flight[0], 1200), 0.05)
    assert sh.sock(sd).mss == 1160
    sh.take_frames()
    # A larger MTU later: ignored (RFC 1191 §3), nothing resent.
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, flight[0], 1400), 0.06)
    assert sh.sock(sd).mss == 1160 and sh.take_frames() == []
    # Below net.ipv4.route.min_pmtu (552): clamped, and EMSGSIZE kept as the soft error.
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, flight[0], 300), 0.07)
    sk = sh.sock(sd)
    assert sk.mss == 512 and sk.mss_cache == 500 and sk.err_soft == errno.EMSGSIZE
    assert sh.stats.tcp_pmtu_reductions == 2
    assert all(len(f) <= 552 for f in sh.take_frames())


def test_quoted_seq_outside_the_window_is_ignored():
    """RFC 5927 §4.1: SND.UNA <= SEG.SEQ <= SND.NXT, else spoofed or stale."""
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    s = parse(flight[0])
    for seq in (s.seq - 1, s.seq + len(DATA) + 1, s.seq + 0x40000000):
        forged = build_tcp_ipv4(A, B, s.sport, 80, seq, s.ack, ACK, 1000, payload=b"x" * 1448)
        sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, forged, 600), 0.05)
        sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, forged), 0.05)
    sk = sh.sock(sd)
    assert sh.stats.tcp_out_of_window_icmps == 6
    assert sk.mss == 1460 and sk.err_soft == 0 and sh.stats.tcp_pmtu_reductions == 0
    assert sh.take_frames() == [] and sh.take_events() == []
    # ...while SND.NXT itself is still inside (Linux ``between``, both ends included).
    at_nxt = build_tcp_ipv4(A, B, s.sport, 80, sk.snd_nxt, s.ack, ACK, 1000)
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, at_nxt), 0.05)
    assert sk.err_soft == errno.EHOSTUNREACH


def test_out_of_window_error_does_not_abort_a_connect():
    sh, sd, peer, syn_frame = connecting()
    s = parse(syn_frame)
    forged = build_tcp_ipv4(A, B, s.sport, 80, s.seq + 5, 0, SYN, 65535)
    sh.receive(icmp_from(B, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, forged), 0.01)
    assert sh.state(sd) is State.SYN_SENT and sh.take_events() == []
    assert sh.stats.tcp_out_of_window_icmps == 1 and sh.stats.tcp_icmp_aborts == 0


# -- hard errors during the handshake --------------------------------------------------------


@pytest.mark.parametrize(("itype", "code", "err"), [
    (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, errno.ECONNREFUSED),
    (ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, errno.EHOSTUNREACH),
    (ICMP_DEST_UNREACH, ICMP_NET_UNREACH, errno.ENETUNREACH),
    (ICMP_DEST_UNREACH, ICMP_PROT_UNREACH, errno.ENOPROTOOPT),
    (ICMP_DEST_UNREACH, ICMP_PKT_FILTERED, errno.EHOSTUNREACH),
    (ICMP_TIME_EXCEEDED, 0, errno.EHOSTUNREACH),
    (ICMP_PARAMETERPROB, 0, errno.EPROTO),
])
def test_error_during_syn_sent_fails_the_connect(itype, code, err):
    sh, sd, peer, syn_frame = connecting()
    sh.receive(icmp_from(R, itype, code, syn_frame), 0.01)
    assert sh.take_events() == [SocketError(sd, err)]
    assert sh.state(sd) is State.CLOSED
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_ERROR) == err
    assert sh.h.ehash == {} and sh.h.bhash == {}  # the ephemeral port is free again
    assert sh.stats.tcp_icmp_aborts == 1 and sh.next_deadline() is None


def test_port_unreachable_through_receive_batch():
    sh, sd, peer, syn_frame = connecting()
    other = build_ipv4(R, A, PROTO_ICMP, build_icmp(ICMP_ECHO, 0, 1, 1, b"ping"))
    sh.receive_batch([other, icmp_from(B, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, syn_frame)],
                     0.01)
    assert sh.take_events() == [SocketError(sd, errno.ECONNREFUSED)]
    assert sh.stats.icmp_in_msgs == 2 and sh.stats.icmp_in_ignored == 1
    assert sh.stats.drops[DropReason.NOT_TCP] == 0


# -- soft errors once established --------------------------------------------------------


def _run_until_dead(sh, sd, limit: float = 4000.0):
    """Fire timers until the socket is closed (bounded in count and time)."""
    events = []
    for _ in range(1000):
        d = sh.next_deadline()
        if d is None or d > limit or sh.state(sd) is State.CLOSED:
            break
        sh.advance(d)
        sh.take_frames()
        events += sh.take_events()
    assert sh.state(sd) is State.CLOSED, "the connection never timed out"
    return events


def test_soft_error_in_established_becomes_the_timeout_errno():
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, flight[3]), 0.05)
    assert sh.state(sd) is State.ESTABLISHED and sh.take_events() == []
    assert sh.sock(sd).err_soft == errno.EHOSTUNREACH and sh.stats.tcp_icmp_soft_errors == 1
    # The peer is gone: RTOs until the stack gives up, with the ICMP's errno.
    events = _run_until_dead(sh, sd)
    assert events == [SocketError(sd, errno.EHOSTUNREACH)]
    with pytest.raises(OSError) as e:
        sh.recv(sd, 100)
    assert e.value.errno == errno.EHOSTUNREACH


def test_soft_error_is_forgotten_when_the_peer_acks_again():
    """Linux tcp_ack clears sk_err_soft: a later plain timeout is ETIMEDOUT."""
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    sh.receive(icmp_from(R, ICMP_TIME_EXCEEDED, 0, flight[0]), 0.05)
    assert sh.sock(sd).err_soft == errno.EHOSTUNREACH
    first = parse(flight[0])
    peer.send(ACK, 5001, first.seq + 1448, dport=syn.sport, ts=(150, first.ts[0]), at=0.06)
    assert sh.sock(sd).err_soft == 0
    assert _run_until_dead(sh, sd) == [SocketError(sd, errno.ETIMEDOUT)]


# -- request socks -------------------------------------------------------------------------


def _half_open():
    sh = make_shard()
    lsd = listen(sh, backlog=8)
    peer = Peer(sh)
    peer.send(SYN, 7000, mss=1460)
    frames = sh.take_frames()
    assert len(frames) == 1 and parse(frames[0]).flags == "S."
    return sh, lsd, peer, frames[0]


def test_unreachable_peer_drops_the_request_sock():
    sh, lsd, peer, synack = _half_open()
    listener = sh.sock(lsd)
    assert listener.reqs == 1
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, synack), 0.1)
    assert listener.reqs == 0 and sh.h.ehash == {}
    assert sh.stats.tcp_icmp_aborts == 1 and sh.take_events() == []
    sh.advance(5.0)
    assert sh.take_frames() == []  # no SYN-ACK retransmission for a dropped request


def test_request_sock_kept_for_wrong_isn_or_port_unreachable():
    sh, lsd, peer, synack = _half_open()
    s = parse(synack)
    wrong = build_tcp_ipv4(A, B, 80, s.dport, s.seq + 1, s.ack, SYN | ACK, 65535)
    sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, wrong), 0.1)
    assert sh.stats.tcp_out_of_window_icmps == 1
    # Port unreachable in answer to a SYN-ACK is no reason to give up (Linux tcp_req_err).
    sh.receive(icmp_from(B, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, synack), 0.1)
    assert sh.sock(lsd).reqs == 1 and len(sh.h.ehash) == 1
    assert sh.stats.tcp_icmp_aborts == 0


# -- malformed, ignored, unmatched ---------------------------------------------------------


def test_malformed_icmp_is_counted_and_dropped():
    sh, sd, peer, syn_frame = connecting()
    good = build_icmp_error(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, syn_frame)
    bad_csum = bytearray(good)
    bad_csum[2] ^= 0xFF
    short_quote = build_icmp_error(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, syn_frame[:24])
    bad_ihl = bytearray(syn_frame)
    bad_ihl[0] = 0x44
    bad_version = bytearray(syn_frame)
    bad_version[0] = 0x65
    frag = bytearray(syn_frame)
    frag[6:8] = b"\x00\x10"  # a non-first fragment quotes no TCP header
    cases = [
        bytes(bad_csum),
        good[:6],  # shorter than an ICMP header
        short_quote,
        build_icmp_error(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, bytes(bad_ihl)),
        build_icmp_error(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, bytes(bad_version)),
        build_icmp_error(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, bytes(frag)),
    ]
    for msg in cases:
        sh.receive(build_ipv4(R, A, PROTO_ICMP, msg), 0.01)
    st = sh.stats
    assert st.icmp_in_msgs == len(cases) and st.icmp_in_errors == len(cases)
    assert st.icmp_in_csum_errors == 1
    assert sh.state(sd) is State.SYN_SENT and sh.take_events() == [] and sh.take_frames() == []


def test_errors_for_no_socket_or_not_ours_are_counted():
    sh, sd, peer, syn_frame = connecting()
    s = parse(syn_frame)
    nobody = build_tcp_ipv4(A, B, s.sport + 1, 80, s.seq, 0, SYN, 65535)
    not_ours = build_tcp_ipv4(B, A, 80, s.sport, s.seq, 0, SYN, 65535)
    udp = build_ipv4(A, B, 17, b"\x00\x35\x00\x35\x00\x08\x00\x00")
    for original in (nobody, not_ours, udp):
        sh.receive(icmp_from(R, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, original), 0.01)
    assert sh.stats.icmp_in_errors == 3 and sh.state(sd) is State.SYN_SENT
    # ICMP for an address that is not ours is not ours to read.
    other = build_ipv4(R, B, PROTO_ICMP, build_icmp_error(ICMP_DEST_UNREACH, 3, syn_frame))
    sh.receive(other, 0.01)
    assert sh.stats.icmp_in_msgs == 3 and sh.stats.drops[DropReason.NOT_TCP] == 1


def test_source_quench_and_redirect_are_ignored():
    sh, sd, peer, syn = established()
    flight = send_flight(sh, sd)
    sh.receive(icmp_from(R, ICMP_SOURCE_QUENCH, 0, flight[0]), 0.05)
    sh.receive(icmp_from(R, 5, 1, flight[0], 0x0101), 0.05)  # redirect for host
    assert sh.stats.icmp_in_ignored == 2 and sh.sock(sd).err_soft == 0
    assert sh.take_frames() == [] and sh.sock(sd).cc.cwnd == 10  # RFC 6633: no slow-down


def test_random_icmp_never_raises():
    sh, sd, peer, syn_frame = connecting()
    rng = random.Random(11)
    for i in range(400):
        n = rng.randrange(0, 80)
        body = bytearray(rng.randbytes(n))
        if n >= 8 and i % 2:
            body[0] = rng.choice((3, 11, 12))
            body[8:8 + min(len(syn_frame), n - 8)] = syn_frame[:n - 8]
            body[2:4] = b"\0\0"
            body = bytearray(build_icmp(body[0], body[1], 0, 0, bytes(body[8:])))
        sh.receive(build_ipv4(R, A, PROTO_ICMP, bytes(body)), 0.01)
    assert sh.stats.icmp_in_msgs == 400


# -- connect() again after a failed connect --------------------------------------------------


def _refuse(sh, sd, peer):
    syn = parse(sh.take_frames()[0])
    peer.send(RST | ACK, 0, syn.seq + 1, dport=syn.sport)
    assert sh.take_events() == [SocketError(sd, errno.ECONNREFUSED)]
    return syn


def test_connect_again_after_refusal_reports_then_starts_afresh():
    """Linux, non-blocking: the next connect() reports how the last one ended (the
    pending error, or ECONNABORTED once read), then the socket can connect again."""
    sh = make_shard()
    sd = sh.socket()
    peer = Peer(sh, port=80)
    sh.connect(sd, B, 80, 0.0)
    _refuse(sh, sd, peer)
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    with pytest.raises(OSError) as e:
        sh.connect(sd, B, 80, 0.1)
    assert e.value.errno == errno.ECONNABORTED
    sh.connect(sd, B, 80, 0.2)
    syn = parse(sh.take_frames()[0])
    assert syn.flags == "S" and sh.state(sd) is State.SYN_SENT
    peer.send(SYN | ACK, 9000, syn.seq + 1, dport=syn.sport, mss=1460, at=0.3)
    assert sh.state(sd) is State.ESTABLISHED and sh.take_events() == [Connected(sd)]
    assert sh.send(sd, b"hello", 0.3) == 5


def test_connect_again_with_the_error_still_pending():
    sh, sd, peer, syn_frame = connecting()
    sh.receive(icmp_from(B, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, syn_frame), 0.01)
    sh.take_events()
    with pytest.raises(OSError) as e:
        sh.connect(sd, B, 80, 0.1)
    assert e.value.errno == errno.ECONNREFUSED
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_ERROR) == 0
    sh.connect(sd, B, 80, 0.2)
    assert sh.state(sd) is State.SYN_SENT and len(sh.take_frames()) == 1


def test_connect_again_keeps_an_explicitly_bound_port():
    sh = make_shard()
    sd = sh.socket()
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sh.bind(sd, 0, 5555)
    peer = Peer(sh, port=80)
    sh.connect(sd, B, 80, 0.0)
    _refuse(sh, sd, peer)
    with pytest.raises(OSError):
        sh.connect(sd, B, 80, 0.1)  # ECONNREFUSED, and back to CLOSED
    assert sh.state(sd) is State.CLOSED and sh.getsockname(sd)[1] == 5555
    assert 5555 in sh.h.bhash  # still ours: nobody else may bind it meanwhile
    other = sh.socket()
    with pytest.raises(OSError) as e:
        sh.bind(other, 0, 5555)
    assert e.value.errno == errno.EADDRINUSE
    sh.connect(sd, B, 80, 0.2)
    assert parse(sh.take_frames()[0]).sport == 5555
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # options stay


def test_connect_after_an_established_connection_died_is_eisconn():
    sh, sd, peer, syn = established()
    peer.send(RST, 5001, dport=syn.sport, at=0.05)
    assert sh.take_events() == [SocketError(sd, errno.ECONNRESET)]
    with pytest.raises(OSError) as e:
        sh.connect(sd, B, 80, 0.1)
    assert e.value.errno == errno.EISCONN
