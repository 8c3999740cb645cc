"""TCP over IPv6 in the engine (core.tcp_ipv6, core.icmpv6): handshakes against a
scripted peer and between two shards over SimLink, RST, Packet Too Big, ICMPv6
errors, dual-stack listeners and IPV6_V6ONLY, SYN cookies, malformed input.

Addresses: fd00::1 (the shard, A6) and fd00::2 (the peer, B6), plus the IPv4
pair of core_helpers for the dual-stack cases; R6 is a router on the path.
"""

from __future__ import annotations

import errno
import random
import socket

import pytest
from core_helpers import A6, ACK, B6, FIN, RST, SYN, A, B, Bulk, Peer6, make_shard6, parse6
from shardstack.core import Connected, DropReason, Shard, SocketError, State
from shardstack.core.wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_PARAMPROB,
    ICMPV6_PKT_TOOBIG,
    ICMPV6_PORT_UNREACH,
    ICMPV6_TIME_EXCEED,
    build_echo_request6,
    build_icmpv6_error,
    parse_icmpv6,
)
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.ipv6 import (
    NEXTHDR_DEST,
    NEXTHDR_ROUTING,
    NEXTHDR_TCP,
    build_ipv6,
    parse_ipv6,
    str_to_ip6,
    v4_mapped,
)
from shardstack.core.wire.tcp import build_tcp_ipv4, build_tcp_ipv6, build_tcp_options, parse_tcp
from shardstack.netio.simlink import LinkParams, SimLink

R6 = str_to_ip6("fd00::fe")
V6 = socket.AF_INET6
IPV6 = socket.IPPROTO_IPV6
V6ONLY = socket.IPV6_V6ONLY
shard6 = make_shard6


def listen6(sh: Shard, port: int = 80, v6only: bool | None = None, addr: int = 0) -> int:
    lsd = sh.socket(V6)
    if v6only is not None:
        sh.setsockopt(lsd, IPV6, V6ONLY, int(v6only))
    sh.bind(lsd, addr, port)
    sh.listen(lsd, 8)
    return lsd


# -- passive open against a scripted peer -----------------------------------------------------


def test_passive_open_over_ipv6():
    sh = shard6()
    lsd = listen6(sh)
    peer = Peer6(sh)
    peer.send(SYN, 1000, mss=1440, wscale=7, sack_perm=True, ts=(10, 0))
    frames = sh.take_frames()
    assert len(frames) == 1
    ip, _ = parse_ipv6(frames[0])
    assert (ip.src, ip.dst, ip.hop_limit) == (A6, B6, 64)
    sa = parse6(frames[0])
    assert sa.flags == "S." and sa.ack == 1001 and sa.dport == 40000
    assert sa.mss == 1440  # RFC 8200 §8.3: MTU 1500 - 40 (IPv6) - 20 (TCP)
    assert sa.sack_perm and sa.ts is not None and sa.wscale is not None
    peer.send(ACK, 1001, sa.seq + 1, ts=(11, sa.ts[0]))
    acc = sh.accept(lsd)
    assert acc is not None
    sd, (raddr, rport) = acc
    assert (raddr, rport) == (B6, 40000)
    assert sh.getsockname(sd) == (A6, 80) and sh.getpeername(sd) == (B6, 40000)
    assert sh.state(sd) is State.ESTABLISHED
    assert sh.sock(sd).mss_cache == 1428  # 1440 less the timestamp option
    # Data both ways, in IPv6 frames.
    peer.send(ACK | 0x08, 1001, sa.seq + 1, payload=b"hello", ts=(12, sa.ts[0]))
    assert sh.recv(sd, 100) == b"hello"
    assert sh.send(sd, b"world", 0.0) == 5
    out = [s for s in peer.recv() if s.payload]
    assert out and out[-1].payload == b"world" and out[-1].seq == sa.seq + 1
    assert sh.stats.drops == {}


def test_syn_through_extension_headers_is_answered():
    """Hop-by-hop, destination options and a routing header with Segments Left 0
    in front of the SYN are skipped (RFC 8200 §4)."""
    sh = shard6()
    listen6(sh)
    peer = Peer6(sh)
    syn = peer.frame(SYN, 1000, mss=1440)
    tcp = parse_ipv6(syn)[1]
    pad = b"\x01\x04\0\0\0\0"
    chain = (bytes((NEXTHDR_DEST, 0)) + pad + bytes((NEXTHDR_ROUTING, 0)) + pad
             + bytes((NEXTHDR_TCP, 0, 0, 0, 0, 0, 0, 0)))
    sh.receive(build_ipv6(B6, A6, 0, chain + bytes(tcp)), 0.0)
    assert parse6(sh.take_frames()[0]).flags == "S."


def test_rst_for_a_closed_port_over_ipv6():
    sh = shard6()
    peer = Peer6(sh)
    peer.send(SYN, 1000, dport=81)
    rst = peer.recv_one()
    assert rst.flags == "R." and rst.seq == 0 and rst.ack == 1001
    assert (rst.src, rst.dst, rst.sport, rst.dport) == (A6, B6, 81, 40000)
    peer.send(ACK, 5, 77, dport=81)
    rst = peer.recv_one()
    assert rst.flags == "R" and rst.seq == 77
    assert sh.stats.drops[DropReason.NO_SOCKET] == 2


# -- between two shards over SimLink: handshakes both ways, bulk under loss --------------------


def _pair(loss: float = 0.0, seed: int = 1):
    a = shard6(A6)
    b = shard6(B6)
    link = SimLink(a, b, seed=seed, params=LinkParams(delay=0.005, loss=loss))
    return a, b, link


def _connect(a: Shard, b: Shard, link: SimLink) -> tuple[int, int]:
    lsd = listen6(b)
    c = a.socket(V6)
    a.connect(c, B6, 80, link.now)
    box: list = []

    def accepted() -> bool:
        r = b.accept(lsd)
        if r is not None:
            box.append(r)
        return bool(box)

    assert link.run_until(accepted, 30.0)
    return c, box[0][0]


def test_active_and_passive_open_between_two_shards():
    a, b, link = _pair()
    tap: list[bytes] = []
    link.tap = lambda now, d, pkt: tap.append(pkt)
    c, s = _connect(a, b, link)
    assert Connected(c) in a.take_events()
    assert a.getpeername(c) == (B6, 80) and b.getpeername(s)[0] == A6
    assert a.getsockname(c)[0] == A6 and 32768 <= a.getsockname(c)[1] <= 60999
    assert all(p[0] >> 4 == 6 for p in tap) and len(tap) >= 3
    assert a.sock(c).mss == 1440 and b.sock(s).mss == 1440


@pytest.mark.parametrize("seed", [1, 2])
def test_bulk_transfer_with_loss_both_ways(seed):
    a, b, link = _pair(loss=0.03, seed=seed)
    c, s = _connect(a, b, link)
    up = Bulk(link, a, c, b, s, 300_000)
    down = Bulk(link, b, s, a, c, 300_000)
    up.data = memoryview(random.Random(seed).randbytes(300_000))
    down.data = memoryview(random.Random(seed + 10).randbytes(300_000))
    got_up, got_down = bytearray(), bytearray()

    def step() -> bool:
        up.write()
        down.write()
        while chunk := b.recv(s, 1 << 20):
            got_up.extend(chunk)
        while chunk := a.recv(c, 1 << 20):
            got_down.extend(chunk)
        return len(got_up) == len(up.data) and len(got_down) == len(down.data)

    assert link.run_until(step, 300.0)
    assert bytes(got_up) == bytes(up.data) and bytes(got_down) == bytes(down.data)
    assert link.stats_ab.lost > 0 and link.stats_ba.lost > 0
    assert a.stats.retrans_segs > 0 and b.stats.retrans_segs > 0
    assert a.stats.drops[DropReason.ENGINE_EXCEPTION] == 0
    assert b.stats.drops[DropReason.ENGINE_EXCEPTION] == 0


def test_syncookies_over_ipv6():
    sh = shard6(syncookies=2)
    lsd = listen6(sh)
    peer = Peer6(sh)
    peer.send(SYN, 1000, mss=1440, wscale=7, sack_perm=True, ts=(10, 0))
    sa = peer.recv_one()
    assert sh.stats.syncookies_sent == 1 and not sh.h.ehash  # no request sock kept
    assert sa.mss == 1440
    peer.send(ACK, 1001, sa.seq + 1, ts=(11, sa.ts[0]))
    acc = sh.accept(lsd)
    assert acc is not None and acc[1] == (B6, 40000)
    sk = sh.sock(acc[0])
    assert sh.stats.syncookies_recv == 1
    assert sk.mss == 1440 and sk.wscale_ok and sk.sack_ok  # from MSS_TABLE6 and the TSval bits
    # A forged ACK (wrong cookie) is not accepted.
    peer2 = Peer6(sh, port=40001)
    peer2.send(ACK, 5001, 123456)
    assert sh.accept(lsd) is None
    assert [s.flags for s in peer2.recv()] == ["R"]


# -- Packet Too Big (RFC 8201) and other ICMPv6 errors -------------------------------------------


def _client():
    sh = shard6()
    sd = sh.socket(V6)
    sh.connect(sd, B6, 80, 0.0)
    syn_frame = sh.take_frames()[0]
    syn = parse6(syn_frame)
    # As Linux 6.18's SYN over IPv6 on a 1500-byte link (tests/unit/wire/test_wire_ipv6.py's
    # capture): MSS 1440, window 64800 (whole 1440-byte segments of 64 KiB).
    assert syn.mss == 1440 and syn.window == 64800
    return sh, sd, Peer6(sh, port=80), syn, syn_frame


def _established():
    sh, sd, peer, syn, _ = _client()
    peer.send(SYN | ACK, 5000, syn.seq + 1, dport=syn.sport, mss=1440, wscale=7, sack_perm=True,
              ts=(100, syn.ts[0]), at=0.01)
    assert len(peer.recv()) == 1
    assert sh.take_events() == [Connected(sd)]
    return sh, sd, peer, syn


def icmp6_from(src: int, itype: int, code: int, original: bytes, rest: int = 0) -> bytes:
    return build_icmpv6_error(src, A6, itype, code, original, rest)


DATA = random.Random(7).randbytes(10 * 1428)


def test_packet_too_big_lowers_the_mss_and_resends_the_flight():
    sh, sd, peer, syn = _established()
    assert sh.send(sd, DATA, 0.02) == len(DATA)
    flight = sh.take_frames()
    assert len(flight) == 10 and all(len(parse6(f).payload) == 1428 for f in flight)
    una = parse6(flight[0]).seq
    sh.receive(icmp6_from(R6, ICMPV6_PKT_TOOBIG, 0, flight[0], 1280), 0.05)
    sk = sh.sock(sd)
    assert sk.mss == 1220 and sk.mss_cache == 1208  # 1280 - 60, less the timestamps
    assert sh.stats.tcp_pmtu_reductions == 1 and sh.stats.icmp6_in_pkt_too_bigs == 1
    resent = [parse6(f) for f in sh.take_frames()]
    assert resent and resent[0].seq == una
    assert all(len(s.payload) <= 1208 for s in resent)
    for x, y in zip(resent, resent[1:], strict=False):
        assert y.seq == x.seq + len(x.payload)
    assert b"".join(s.payload for s in resent) == DATA[:sum(len(s.payload) for s in resent)]
    assert sh.take_events() == []


@pytest.mark.parametrize("mtu", [1279, 576, 0, 1500, 9000])
def test_packet_too_big_below_1280_or_not_lowering_is_ignored(mtu):
    sh, sd, peer, syn = _established()
    sh.send(sd, DATA, 0.02)
    flight = sh.take_frames()
    sh.receive(icmp6_from(R6, ICMPV6_PKT_TOOBIG, 0, flight[0], mtu), 0.05)
    assert sh.sock(sd).mss == 1440 and sh.stats.tcp_pmtu_reductions == 0
    assert sh.take_frames() == [] and sh.sock(sd).err_soft == 0


def test_packet_too_big_out_of_window_is_ignored():
    sh, sd, peer, syn = _established()
    sh.send(sd, DATA, 0.02)
    flight = sh.take_frames()
    forged = bytearray(flight[0])
    seq_at = 40 + 4
    forged[seq_at:seq_at + 4] = (parse6(flight[0]).seq + 10**6).to_bytes(4, "big")
    sh.receive(icmp6_from(R6, ICMPV6_PKT_TOOBIG, 0, bytes(forged), 1280), 0.05)
    assert sh.sock(sd).mss == 1440
    assert sh.stats.drops[DropReason.ICMP_ERR_OUT_OF_WINDOW] == 1


# What a Linux 6.18 connect() over IPv6 returned when its SYN was answered with
# each error (an AF_PACKET responder on a veth in namespaces we made).
@pytest.mark.parametrize(("itype", "code", "err"), [
    (ICMPV6_DEST_UNREACH, 0, errno.ENETUNREACH),  # no route
    (ICMPV6_DEST_UNREACH, 1, errno.EACCES),  # administratively prohibited
    (ICMPV6_DEST_UNREACH, 2, errno.EHOSTUNREACH),  # beyond scope of source address
    (ICMPV6_DEST_UNREACH, 3, errno.EHOSTUNREACH),  # address unreachable
    (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, errno.ECONNREFUSED),
    (ICMPV6_DEST_UNREACH, 5, errno.EACCES),  # source address failed policy
    (ICMPV6_DEST_UNREACH, 6, errno.EACCES),  # reject route
    (ICMPV6_DEST_UNREACH, 7, errno.EPROTO),  # unassigned code
    (ICMPV6_TIME_EXCEED, 0, errno.EHOSTUNREACH),
    (ICMPV6_PARAMPROB, 0, errno.EPROTO),
    (ICMPV6_PARAMPROB, 1, errno.EPROTO),
])
def test_error_during_syn_sent_fails_the_connect(itype, code, err):
    """Linux tcp_v6_err: in SYN-SENT any error ends the connect with
    icmpv6_err_convert's errno."""
    sh, sd, peer, syn, syn_frame = _client()
    sh.receive(icmp6_from(R6, itype, code, syn_frame), 0.1)
    assert SocketError(sd, err) in sh.take_events()
    assert sh.stats.tcp_icmp_aborts == 1
    with pytest.raises(OSError) as e:
        sh.connect(sd, B6, 80, 0.2)
    assert e.value.errno == err


def test_error_when_established_is_soft():
    sh, sd, peer, syn = _established()
    sh.send(sd, DATA[:100], 0.02)
    (f,) = sh.take_frames()
    sh.receive(icmp6_from(R6, ICMPV6_DEST_UNREACH, 3, f), 0.05)
    assert sh.state(sd) is State.ESTABLISHED and sh.sock(sd).err_soft == errno.EHOSTUNREACH
    assert sh.stats.tcp_icmp_soft_errors == 1


def test_icmpv6_checksum_and_quotes_checked():
    sh, sd, peer, syn, syn_frame = _client()
    bad = bytearray(icmp6_from(R6, ICMPV6_DEST_UNREACH, 4, syn_frame))
    bad[-1] ^= 0xFF
    sh.receive(bytes(bad), 0.1)
    assert sh.stats.icmp6_in_csum_errors == 1 and sh.state(sd) is State.SYN_SENT
    sh.receive(icmp6_from(R6, ICMPV6_DEST_UNREACH, 4, syn_frame[:44]), 0.1)
    assert sh.stats.drops[DropReason.ICMP_ERR_QUOTE] == 1
    # Quoting a packet from someone else, or to a port we have no socket on.
    other = build_tcp_ipv6(R6, B6, 1, 80, 0, 0, SYN, 0)
    sh.receive(icmp6_from(R6, ICMPV6_DEST_UNREACH, 4, other), 0.1)
    assert sh.stats.drops[DropReason.ICMP_ERR_NOT_OURS] == 1
    # Echo requests are netio's: counted and ignored here.
    sh.receive(build_echo_request6(R6, A6, 1, 1, b"x"), 0.1)
    assert sh.stats.icmp6_in_ignored == 1 and sh.take_frames() == []
    assert sh.state(sd) is State.SYN_SENT


# -- dual stack and IPV6_V6ONLY -----------------------------------------------------------------


def _v4_syn(sh: Shard, sport: int = 40000, dport: int = 80) -> None:
    opts = build_tcp_options(mss=1460)
    sh.receive(build_tcp_ipv4(B, A, sport, dport, 1000, 0, SYN, 65535, opts), 0.0)


def test_dual_stack_listener_accepts_ipv4_with_a_v4_mapped_peer():
    sh = shard6(addr4=A)
    lsd = listen6(sh)
    _v4_syn(sh)
    frames = sh.take_frames()
    assert len(frames) == 1
    ip, payload = parse_ipv4(frames[0])  # the answer to an IPv4 SYN is IPv4
    sa = parse_tcp(payload)
    assert sa.flags == SYN | ACK and sa.options.mss == 1460
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1001, sa.seq + 1, ACK, 65535), 0.0)
    acc = sh.accept(lsd)
    assert acc is not None
    sd, peer = acc
    assert peer == (v4_mapped(B), 40000)
    assert sh.getpeername(sd) == (v4_mapped(B), 40000)
    assert sh.getsockname(sd) == (v4_mapped(A), 80)
    assert sh.getsockname(lsd) == (0, 80)
    # The same listener takes IPv6 too.
    Peer6(sh).send(SYN, 7, mss=1440)
    assert parse6(sh.take_frames()[0]).flags == "S."


def test_v6only_listener_refuses_ipv4():
    sh = shard6(addr4=A)
    listen6(sh, v6only=True)
    _v4_syn(sh)
    (rst,) = sh.take_frames()
    assert parse_ipv4(rst)[0].src == A and parse_tcp(parse_ipv4(rst)[1]).flags == RST | ACK
    assert sh.stats.drops[DropReason.NO_SOCKET] == 1
    Peer6(sh).send(SYN, 7, mss=1440)
    assert parse6(sh.take_frames()[0]).flags == "S."


def test_bind_conflicts_across_families():
    sh = shard6(addr4=A)
    v4 = sh.socket()
    sh.bind(v4, 0, 80)
    sh.listen(v4, 8)
    dual = sh.socket(V6)
    with pytest.raises(OSError) as e:
        sh.bind(dual, 0, 80)  # '::' takes IPv4 too: overlaps 0.0.0.0
    assert e.value.errno == errno.EADDRINUSE
    only = sh.socket(V6)
    sh.setsockopt(only, IPV6, V6ONLY, 1)
    sh.bind(only, 0, 80)  # IPv6 only: no overlap
    sh.listen(only, 8)
    specific = sh.socket(V6)
    with pytest.raises(OSError) as e:
        sh.bind(specific, A6, 80)  # inside the V6ONLY wildcard
    assert e.value.errno == errno.EADDRINUSE
    # Both listeners answer their own family on the same port.
    _v4_syn(sh)
    assert parse_tcp(parse_ipv4(sh.take_frames()[0])[1]).flags == SYN | ACK
    Peer6(sh).send(SYN, 7)
    assert parse6(sh.take_frames()[0]).flags == "S."
    sh.close(only, 0.0)
    Peer6(sh, port=40001).send(SYN, 7)
    assert parse6(sh.take_frames()[0]).flags == "R."  # the IPv4 listener takes no IPv6


def test_socket_api_errors_as_linux():
    sh = shard6(addr4=A)
    v4 = sh.socket()
    with pytest.raises(OSError) as e:
        sh.bind(v4, A6, 80)
    assert e.value.errno == errno.EAFNOSUPPORT
    with pytest.raises(OSError) as e:
        sh.setsockopt(v4, IPV6, V6ONLY, 1)
    assert e.value.errno == errno.ENOPROTOOPT
    with pytest.raises(OSError) as e:
        sh.socket(socket.AF_UNIX)
    assert e.value.errno == errno.EAFNOSUPPORT
    s = sh.socket(V6)
    assert sh.getsockopt(s, IPV6, V6ONLY) == 0
    sh.bind(s, A6, 0)
    with pytest.raises(OSError) as e:
        sh.setsockopt(s, IPV6, V6ONLY, 1)  # too late once bound
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        sh.bind(sh.socket(V6), str_to_ip6("fd00::99"), 80)
    assert e.value.errno == errno.EADDRNOTAVAIL
    o = sh.socket(V6)
    sh.setsockopt(o, IPV6, V6ONLY, 1)
    assert sh.getsockopt(o, IPV6, V6ONLY) == 1
    with pytest.raises(OSError) as e:
        sh.bind(o, v4_mapped(A), 80)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        sh.connect(o, v4_mapped(B), 80, 0.0)
    assert e.value.errno == errno.ENETUNREACH
    for bad in (str_to_ip6("ff02::1"), 1, str_to_ip6("::198.18.0.2")):
        # multicast, ::1, IPv4-compatible: never sent, and never as IPv4
        with pytest.raises(OSError) as e:
            sh.connect(sh.socket(V6), bad, 80, 0.0)
        assert e.value.errno == errno.ENETUNREACH
    assert sh.take_frames() == []


def test_v4_mapped_connect_from_an_ipv6_socket_goes_out_as_ipv4():
    sh = shard6(addr4=A)
    s = sh.socket(V6)
    sh.connect(s, v4_mapped(B), 80, 0.0)
    (syn,) = sh.take_frames()
    ip, payload = parse_ipv4(syn)
    t = parse_tcp(payload)
    assert (ip.src, ip.dst, t.flags, t.options.mss) == (A, B, SYN, 1460)
    sh.receive(build_tcp_ipv4(B, A, 80, t.src_port, 9, t.seq + 1, SYN | ACK, 65535,
                              build_tcp_options(mss=1460)), 0.01)
    assert Connected(s) in sh.take_events()
    assert sh.getpeername(s) == (v4_mapped(B), 80)
    assert sh.getsockname(s) == (v4_mapped(A), t.src_port)


# -- malformed IPv6 --------------------------------------------------------------------------


def test_unknown_next_header_gets_a_parameter_problem():
    sh = shard6()
    pkt = build_ipv6(B6, A6, 253, b"experimental")
    sh.receive(pkt, 0.0)
    (err,) = sh.take_frames()
    ip, body = parse_ipv6(err)
    msg = parse_icmpv6(ip.src, ip.dst, body)
    assert (ip.src, ip.dst, msg.type, msg.code, msg.rest) == (A6, B6, ICMPV6_PARAMPROB, 1, 6)
    assert bytes(msg.body) == pkt
    assert sh.stats.drops[DropReason.IP_NOPROTO] == 1 and sh.stats.icmp6_out_parm_problems == 1
    # Rate limited: a flood gets at most the burst.
    for _ in range(200):
        sh.receive(pkt, 0.0)
    assert len(sh.take_frames()) <= 50
    assert sh.stats.drops[DropReason.ICMP_RATELIMIT] > 100


def test_routing_header_with_segments_left_is_refused_with_a_parameter_problem():
    sh = shard6()
    listen6(sh)
    tcp = parse_ipv6(Peer6(sh).frame(SYN, 1))[1]
    pkt = build_ipv6(B6, A6, NEXTHDR_ROUTING, bytes((NEXTHDR_TCP, 0, 0, 1, 0, 0, 0, 0)) + tcp)
    sh.receive(pkt, 0.0)
    (err,) = sh.take_frames()
    msg = parse_icmpv6(A6, B6, parse_ipv6(err)[1])
    assert (msg.type, msg.code, msg.rest) == (ICMPV6_PARAMPROB, 0, 42)
    assert sh.stats.drops[DropReason.IPV6_BAD_EXTHDR] == 1


def test_fragment_of_bad_length_gets_a_parameter_problem():
    """Linux ipv6_frag_rcv (observed on Linux 6.18): a non-last fragment whose
    data is not a multiple of 8 bytes is answered, pointing at Payload Length."""
    sh = shard6()
    sh.receive(build_ipv6(B6, A6, 44, bytes((6, 0, 0, 1, 0, 0, 0, 9)) + bytes(21)), 0.0)
    (err,) = sh.take_frames()
    msg = parse_icmpv6(A6, B6, parse_ipv6(err)[1])
    assert (msg.type, msg.code, msg.rest) == (ICMPV6_PARAMPROB, 0, 4)
    assert sh.stats.drops == {DropReason.IP_FRAGMENT: 1}


@pytest.mark.parametrize(("pkt", "reason"), [
    (build_ipv6(B6, A6, 44, bytes((6, 0, 0, 1, 0, 0, 0, 9)) + bytes(24)), DropReason.IP_FRAGMENT),
    (build_ipv6(B6, A6, 60, bytes((6, 0, 0x7E, 2, 0, 0, 1, 0)) + bytes(20)),
     DropReason.IPV6_BAD_EXTHDR),  # an option whose type says "discard silently"
    (build_ipv6(B6, A6 + 5, 6, bytes(20)), DropReason.IP_OTHERHOST),
    (build_ipv6(1, A6, 6, bytes(20)), DropReason.IPV6_BAD_SADDR),  # ::1 from the wire
    (build_ipv6(v4_mapped(B), A6, 6, bytes(20)), DropReason.IPV6_BAD_SADDR),
    (build_ipv6(str_to_ip6("ff02::1"), A6, 6, bytes(20)), DropReason.IPV6_BAD_SADDR),
    (build_ipv6(B6, A6, 6, bytes(20))[:50], DropReason.IP_HDR),
    (build_ipv6(B6, A6, 6, bytes(20)), DropReason.TCP_CSUM),
    (build_ipv6(B6, A6, 59, b"nothing"), DropReason.NOT_TCP),
], ids=lambda v: v.name if isinstance(v, DropReason) else "")
def test_malformed_or_unwanted_ipv6_is_counted(pkt, reason):
    sh = shard6()
    listen6(sh)
    sh.receive(pkt, 0.0)
    assert sh.stats.drops == {reason: 1}
    assert sh.take_frames() == []


def test_random_and_truncated_ipv6_never_raises():
    sh, sd, peer, syn = _established()
    good = peer.frame(ACK | FIN, 5001, syn.seq + 1, dport=syn.sport, payload=b"abc")
    rng = random.Random(3)
    for cut in range(len(good)):
        sh.receive(good[:cut], 0.1)
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        b[0] = 0x60 | (b[0] & 0x0F)
        sh.receive(bytes(b), 0.1, csum_ok=rng.random() < 0.5)
        sh.receive(bytes([0x60]) + rng.randbytes(rng.randint(0, 120)), 0.1)
    assert sh.stats.drops[DropReason.ENGINE_EXCEPTION] == 0


# -- the fast paths (header prediction, burst sends) over IPv6 change nothing but speed ------


def _transfer6(fast: bool, params: LinkParams, seed: int, **kw):
    from test_header_prediction import Mode, shard_state

    rnd = random.Random(seed)
    up, down = rnd.randbytes(200_000), rnd.randbytes(200_000)
    wire: list = []
    with Mode(fast):
        a = make_shard6(A6, **kw)
        b = make_shard6(B6, **kw)
        link = SimLink(a, b, seed=seed, params=params,
                       tap=lambda now, d, pkt: wire.append((now, d, bytes(pkt))))
        c, s = _connect(a, b, link)
        got = {c: bytearray(), s: bytearray()}
        sent = {c: 0, s: 0}

        def step() -> bool:
            for sh, sd, data in ((a, c, up), (b, s, down)):
                if sent[sd] < len(data):
                    sent[sd] += sh.send(sd, memoryview(data)[sent[sd]:sent[sd] + 65536],
                                        link.now)
            for sh, sd in ((a, c), (b, s)):
                while chunk := sh.recv(sd, 1 << 20):
                    got[sd].extend(chunk)
            return len(got[s]) == len(up) and len(got[c]) == len(down)

        for _ in range(100_000):
            if step() or link.now > 300:
                break
            link.run_for(0.002)
        assert bytes(got[s]) == up and bytes(got[c]) == down
        return wire, shard_state(a), shard_state(b)


@pytest.mark.parametrize(("seed", "params", "kw"), [
    (1, LinkParams(delay=0.005, loss=0.02), {}),
    (4, LinkParams(delay=0.004, loss=0.01, bandwidth=20e6, queue_bytes=40_000),
     {"tso_max": 65000, "tx_csum_offload": True}),
])
def test_ipv6_fast_paths_are_identical_on_the_wire(seed, params, kw, monkeypatch):
    from test_header_prediction import Spy

    spy = Spy(monkeypatch)
    fast = _transfer6(True, params, seed, **kw)
    hits = spy.take()
    assert hits[0] > 15 and hits[1] > 10  # IPv6 header prediction ran, and so did the rest
    slow = _transfer6(False, params, seed, **kw)
    assert len(fast[0]) == len(slow[0])
    for i, (x, y) in enumerate(zip(fast[0], slow[0], strict=True)):
        assert x == y, f"packet {i} differs"
    assert fast[1:] == slow[1:]
    assert all(p[2][0] >> 4 == 6 for p in fast[0])


def test_a_failing_ipv6_frame_resets_its_connection(monkeypatch, caplog):
    """The receive boundary (core.fault) finds an IPv6 frame's connection too: it
    is reset with an IPv6 RST and the log line names the IPv6 addresses."""
    from shardstack.core import tcp_input

    sh = shard6()
    lsd = listen6(sh)
    peer = Peer6(sh)
    peer.send(SYN, 1000, mss=1440)
    sa = peer.recv_one()
    peer.send(ACK, 1001, sa.seq + 1)
    sd, _ = sh.accept(lsd)
    victim = sh.sock(sd)
    real = tcp_input.tcp_data_queue

    def faulty(shard, sk, seg, now):
        if sk is victim:
            raise RuntimeError("injected fault")
        return real(shard, sk, seg, now)

    monkeypatch.setattr(tcp_input, "tcp_data_queue", faulty)
    peer.send(ACK | FIN, 1001, sa.seq + 1, payload=b"x" * 10)
    assert sh.stats.drops[DropReason.ENGINE_EXCEPTION] == 1
    assert sh.state(sd) is State.CLOSED
    assert [s.flags for s in peer.recv()] in (["R."], ["R"])
    msgs = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(msgs) == 1 and "fd00::2:40000" in msgs[0]


class NarrowPath:
    """Shard ``inner`` behind a router whose next hop has a 1280-byte MTU: a bigger
    packet towards it is dropped and answered with Packet Too Big (RFC 8201), as a
    router's ``icmp6_send`` does."""

    def __init__(self, inner: Shard, mtu: int = 1280) -> None:
        self.inner, self.mtu = inner, mtu
        self.ptb: list[bytes] = []
        self.too_big = 0

    def receive(self, packet: bytes, now: float) -> None:
        if len(packet) > self.mtu:
            self.too_big += 1
            self.ptb.append(build_icmpv6_error(R6, parse_ipv6(packet)[0].src, ICMPV6_PKT_TOOBIG,
                                               0, packet, self.mtu))
            return
        self.inner.receive(packet, now)

    def advance(self, now: float) -> None:
        self.inner.advance(now)

    def take_frames(self) -> list[bytes]:
        out, self.ptb = self.inner.take_frames() + self.ptb, []
        return out

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()


def test_bulk_through_a_1280_byte_path_learns_the_mtu():
    a = shard6(A6)
    b = shard6(B6)
    path = NarrowPath(b)
    link = SimLink(a, path, seed=3, params=LinkParams(delay=0.005, loss=0.01))
    c, s = _connect(a, b, link)
    data = random.Random(5).randbytes(200_000)
    bulk = Bulk(link, a, c, b, s, len(data))
    bulk.data = memoryview(data)
    got = bytearray()

    def step() -> bool:
        bulk.write()
        while chunk := b.recv(s, 1 << 20):
            got.extend(chunk)
        return len(got) == len(data)

    assert link.run_until(step, 120.0)
    assert bytes(got) == data
    assert path.too_big >= 1 and a.stats.tcp_pmtu_reductions == 1
    assert a.sock(c).mss == 1220  # 1280 - 60
    assert a.stats.icmp6_in_pkt_too_bigs == path.too_big


@pytest.mark.parametrize("src", [0, 1, v4_mapped(B), str_to_ip6("::198.18.0.2")])
def test_no_parameter_problem_to_addresses_off_the_wire(src):
    sh = shard6()
    sh.receive(build_ipv6(src, A6, 253, b"x" * 8), 0.0)
    sh.receive(build_ipv6(src, A6, NEXTHDR_ROUTING, bytes((6, 0, 0, 1, 0, 0, 0, 0)) + bytes(20)),
               0.0)
    assert sh.take_frames() == [] and sh.stats.icmp6_out_parm_problems == 0


def test_each_connection_keeps_one_flow_label():
    """RFC 6437 §3: a non-zero label per connection and direction, the same on every
    packet (SYN, SYN-ACK, data, bursts, ACKs), different for another connection."""
    a, b, link = _pair(loss=0.0)
    tap: list[bytes] = []
    link.tap = lambda now, d, pkt: tap.append(pkt)
    c1, s1 = _connect(a, b, link)
    a.send(c1, bytes(50_000), link.now)
    b.send(s1, bytes(20_000), link.now)
    link.run_for(1.0)
    c2 = a.socket(V6)
    a.connect(c2, B6, 80, link.now)
    link.run_for(1.0)
    labels: dict[tuple, set[int]] = {}
    for pkt in tap:
        ip, _ = parse_ipv6(pkt)
        seg = parse6(pkt)
        labels.setdefault((ip.src, seg.sport, seg.dport), set()).add(ip.flow_label)
    assert len(labels) == 4 and all(len(v) == 1 and 0 not in v for v in labels.values())
    assert len({next(iter(v)) for v in labels.values()}) == 4


# bind() then listen() of a first socket, then bind() of a second on the same port:
# what Linux 6.18 answered (python sockets in a namespace we made, fd00::1/64 and
# 198.18.0.1/24 on one interface, no SO_REUSEADDR).
_BIND_TABLE = [
    ((2, None, 0), (10, False, 0), errno.EADDRINUSE),  # 0.0.0.0, then dual-stack ::
    ((2, None, 0), (10, True, 0), None),  # 0.0.0.0, then V6ONLY ::
    ((10, True, 0), (10, None, A6), errno.EADDRINUSE),  # V6ONLY ::, then fd00::1
    ((2, None, 0), (10, None, A6), None),  # 0.0.0.0, then fd00::1
    ((10, None, A6), (2, None, 0), None),  # fd00::1, then 0.0.0.0
    ((10, False, 0), (2, None, A), errno.EADDRINUSE),  # dual-stack ::, then 198.18.0.1
    ((10, True, 0), (2, None, A), None),  # V6ONLY ::, then 198.18.0.1
]


@pytest.mark.parametrize(("first", "second", "err"), _BIND_TABLE)
def test_bind_conflicts_as_linux(first, second, err):
    sh = shard6(addr4=A)

    def sock(family, v6only, addr):
        sd = sh.socket(family)
        if v6only is not None:
            sh.setsockopt(sd, IPV6, V6ONLY, int(v6only))
        return sd, addr

    sd, addr = sock(*first)
    sh.bind(sd, addr, 80)
    sh.listen(sd, 8)
    sd2, addr2 = sock(*second)
    if err is None:
        sh.bind(sd2, addr2, 80)
        sh.listen(sd2, 8)
    else:
        with pytest.raises(OSError) as e:
            sh.bind(sd2, addr2, 80)
        assert e.value.errno == err


def test_trace_names_the_ipv6_functions():
    """With ShardConfig.trace, an IPv6 passive open records tcp_ipv6's names where
    their work is done, in order, and none of the IPv4-only ones."""
    sh = shard6(trace=True)
    lsd = listen6(sh)
    peer = Peer6(sh)
    sh.trace()
    peer.send(SYN, 1000, mss=1440)
    sa = peer.recv_one()
    peer.send(ACK, 1001, sa.seq + 1)
    assert sh.accept(lsd) is not None
    names = sh.trace()
    want = ["tcp_v6_rcv", "inet6_lookup_listener", "tcp_v6_do_rcv", "tcp_v6_conn_request",
            "tcp_conn_request", "tcp_v6_init_req", "tcp_v6_init_sequence",
            "tcp_v6_send_synack", "__tcp_v6_send_check", "ip6_xmit", "tcp_v6_rcv",
            "tcp_check_req", "tcp_v6_syn_recv_sock"]
    it = iter(names)
    assert all(w in it for w in want), names
    assert not {n for n in names if "v4" in n}, names
    c = shard6(B6, trace=True)
    c.connect(c.socket(V6), A6, 80, 0.0)
    assert "tcp_v6_connect" in c.trace()


@pytest.mark.parametrize("ts", [True, False])
def test_pure_acks_and_data_take_the_ipv6_fast_path(ts, monkeypatch):
    from test_header_prediction import Spy

    sh = shard6()
    lsd = listen6(sh)
    peer = Peer6(sh)
    peer.send(SYN, 1000, mss=1440, sack_perm=True, wscale=7, ts=(10, 0) if ts else None)
    sa = peer.recv_one()
    tso = (lambda v: {"ts": (v, sa.ts[0])}) if ts else (lambda v: {})
    peer.send(ACK, 1001, sa.seq + 1, **tso(11))
    sd, _ = sh.accept(lsd)
    spy = Spy(monkeypatch)
    sh.send(sd, bytes(4000), 0.01)
    out = peer.recv()
    assert out and out[-1].seq + len(out[-1].payload) == sa.seq + 1 + 4000
    peer.send(ACK, 1001, sa.seq + 1 + 4000, at=0.02, **tso(12))  # a pure ACK of new data
    peer.send(ACK, 1001, sa.seq + 1 + 4000, payload=b"d" * 100, at=0.03, **tso(13))  # data
    assert spy.take() == (2, 0)
    assert sh.sock(sd).snd_una == sa.seq + 1 + 4000 and sh.recv(sd, 200) == b"d" * 100
