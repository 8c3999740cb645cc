"""IPv6 entry points of TCP (Linux ``net/ipv6/tcp_ipv6.c``, ``inet6_hashtables.c``).

Reading list: RFC 8200 (IPv6; §8.1 the checksum pseudo-header, §8.3 the
MSS: the MTU less 60 bytes of headers, at least 1220 on a 1280 link), RFC
4291 §2.5.5.2 (IPv4-mapped addresses: an AF_INET6 socket's IPv4 peers),
RFC 3493 §5.3 (IPV6_V6ONLY), RFC 4443 and RFC 8201 (ICMPv6 errors, Packet
Too Big), RFC 6528 (ISNs), RFC 4987 §3.6 (SYN cookies).

Only the network layer differs from IPv4: the header, the pseudo-header,
the lookups and the MSS.  Everything from the TCP header on is the shared
protocol code (tcp_input, tcp_output, tcp_timer, tcp_minisocks), as in
Linux; where a shared function needs the family it reads it from the peer's
address (``tcp_h.V4_ADDR_MAX``: IPv6 wire addresses are all above 32 bits,
packets from ``::/96`` are refused below).  Sockets of both families share
one ehash and one listening table (``inet_hashtables``): an AF_INET6
listener on ``::`` without IPV6_V6ONLY is keyed like ``0.0.0.0`` and takes
IPv4 SYNs too, whose children keep 32-bit addresses and are shown v4-mapped
by the Shard API (Linux's dual stack).

``tcp_v6_rcv`` mirrors ``tcp_ipv4.tcp_v4_rcv`` (Linux keeps two copies too),
header prediction included: an IPv6 packet whose Next Header is TCP and
whose TCP header is an established connection's (data offset 5, or 8 with
the aligned timestamp option; ACK and at most PSH) is read with one struct
unpack and offered to ``tcp_input.tcp_rcv_established_fast``; the checks are
``parse_ipv6``'s and ``parse_tcp``'s for that layout.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from typing import TYPE_CHECKING

from . import (
    icmpv6,
    inet_connection_sock,
    inet_hashtables,
    tcp,
    tcp_ecn,
    tcp_input,
    tcp_ipv4,
    tcp_minisocks,
    tcp_output,
    udp,
)
from .dropreason import WIRE_REASONS, DropReason
from .icmpv6 import Icmpv6Err, icmpv6_err_convert
from .tcp_h import (
    AF_INET6,
    MASK,
    TCP_CLOSED,
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    TCP_V6_HDRS,
    V4_ADDR_MAX,
    BytesLike,
    RequestSock,
    State,
    TcpSegment,
    TcpSock,
    os_error,
)
from .wire.checksum import verify_tcp_checksum
from .wire.errors import WireError
from .wire.icmpv6 import ICMPV6_PKT_TOOBIG
from .wire.ipv6 import (
    IPV6_MIN_MTU,
    NEXTHDR_ICMP,
    NEXTHDR_NONE,
    NEXTHDR_TCP,
    NEXTHDR_UDP,
    PARAMPROB_NEXTHDR,
    Ipv6ParamProblem,
    is_multicast6,
    parse_ipv6,
)
from .wire.tcp import SYN, parse_tcp

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["tcp_v6_rcv", "tcp_v6_do_rcv", "tcp_v6_connect", "tcp_v6_syn_recv_sock",
           "tcp_v6_err", "tcp_v6_mtu_reduced", "inet6_lookup_listener", "tuple6",
           "ipv6_addr_usable", "ip6_make_flowlabel"]

_IP6_REASONS = WIRE_REASONS["ipv6"]
# Header prediction: IPv6 header (no extension headers), TCP header, and the
# aligned timestamp option, in one unpack (72 bytes; 60 without the option).
_unpack_hp6 = struct.Struct("!IHBBQQQQHHIIHHHHIII").unpack_from
_unpack_hp6_60 = struct.Struct("!IHBBQQQQHHIIHHHH").unpack_from
_NO_TS = (0, 0, 0)
_TS_WORD = 0x0101080A
_ANY6 = inet_hashtables.ANY6


def tuple6(laddr: int, lport: int, raddr: int, rport: int) -> bytes:
    """The 36 bytes of an IPv6 4-tuple, for keyed hashes (ISN, port offset)."""
    return b"".join((laddr.to_bytes(16, "big"), lport.to_bytes(2, "big"),
                     raddr.to_bytes(16, "big"), rport.to_bytes(2, "big")))


def ip6_make_flowlabel(key: bytes, laddr: int, lport: int, raddr: int, rport: int) -> int:
    """A connection's flow label (RFC 6437 §3: non-zero, uniformly distributed,
    the same for all its packets; Linux ``ip6_make_flowlabel`` hashes the flow
    too): 20 bits of a keyed hash of the 4-tuple, never 0."""
    h = hashlib.blake2s(tuple6(laddr, lport, raddr, rport), key=key, digest_size=4,
                        person=b"flowlbl").digest()
    return (int.from_bytes(h, "big") & 0xFFFFF) or 1


def ipv6_addr_usable(addr: int) -> bool:
    """An address a peer may have on the wire: not in ``::/96`` (unspecified,
    loopback, IPv4-compatible, RFC 4291 §2.5.2/§2.5.3/§2.5.5.1), not
    IPv4-mapped (§2.5.5.2: never on the wire), not multicast."""
    return addr > V4_ADDR_MAX and addr >> 32 != 0xFFFF and addr >> 120 != 0xFF


# -- receive ------------------------------------------------------------------------------

def tcp_v6_rcv(sh: Shard, pkt: BytesLike, now: float, csum_ok: bool) -> None:
    """One inbound IPv6 packet (Linux ``ipv6_rcv`` + ``ip6_input`` + ``tcp_v6_rcv``);
    never raises.

    Header checks and extension headers (``parse_ipv6``), the destination
    (one of ours), the source (usable, ``ipv6_addr_usable``), then the upper
    layer: TCP here, ICMPv6 to ``icmpv6_rcv``, No Next Header dropped
    silently, anything else a Parameter Problem (code 1) as Linux
    ``ip6_protocol_deliver_rcu`` sends.
    """
    stats = sh.stats
    n = len(pkt)
    looked_up = False
    hit: TcpSock | RequestSock | None = None
    if (n >= 60 and pkt[6] == 6 and pkt[53] & 0xF7 == 0x10 and not sh.tracing
            and tcp_input.HEADER_PREDICTION):
        (vtf, plen, _nh, _hlim, s_hi, s_lo, d_hi, d_lo, sport, dport, seq, ack, offflags,
         window, tsum, urg, tsword, tsval, tsecr) = (
            _unpack_hp6(pkt) if n >= 72 else _unpack_hp6_60(pkt) + _NO_TS)
        hp = offflags & 0xF0F7  # data offset and flags but PSH (Linux TCP_HP_BITS)
        total = 40 + plen
        if (vtf >> 28 == 6 and (hp == 0x8010 or hp == 0x5010)
                and ((offflags >> 10) & 0x3C) <= plen and total <= n):
            src = s_hi << 64 | s_lo
            dst = d_hi << 64 | d_lo
            # A hit means dst is ours and src a peer we accepted (a usable address).
            hit = sk = sh.h.ehash.get((dst, dport, src, sport))
            looked_up = True
            # An ECN connection's data whose mark means news (RFC 3168 §6.1.3) takes
            # the slow path, where tcp_ecn sees it (the Traffic Class's low two bits).
            if (sk is not None and sk.state is TCP_ESTABLISHED
                    and not (sk.ecn_flags and tcp_ecn.tcp_ecn_mark_is_news(
                        sk, (vtf >> 20) & 0xFF, plen - ((offflags >> 10) & 0x3C)))):
                if hp == 0x8010:
                    off = 72
                else:
                    off = 60  # no options: the words read as TS were payload
                    tsval = None
                    tsecr = 0
                if off == 60 or tsword == _TS_WORD:
                    if csum_ok:
                        csum = None
                    else:
                        csum = (src + dst + 6 + plen + sport + dport + seq + ack + offflags
                                + window + tsum + urg)
                        if tsval is not None:
                            csum += _TS_WORD + tsval + tsecr
                    if tcp_input.tcp_rcv_established_fast(sh, sk, pkt, off, total, seq, ack,
                                                          window, tsval, tsecr, csum, now):
                        stats.segs_in += 1
                        return
    try:
        ip, payload = parse_ipv6(pkt)
    except Ipv6ParamProblem as e:
        stats.drop(_IP6_REASONS.get(e.reason, DropReason.IPV6_BAD_EXTHDR))
        dst = int.from_bytes(pkt[24:40], "big")
        if not (e.unless_multicast and is_multicast6(dst)):
            icmpv6.icmpv6_param_prob(sh, pkt, e.code, e.pointer)
        return
    except WireError as e:
        stats.drop(_IP6_REASONS.get(e.reason, DropReason.IP_HDR))
        return
    src = ip.src
    dst = ip.dst
    if dst not in sh.addr_set:
        stats.drop(DropReason.IP_OTHERHOST)
        return
    if not ipv6_addr_usable(src):
        stats.drop(DropReason.IPV6_BAD_SADDR)
        return
    nh = ip.next_header
    if nh != NEXTHDR_TCP:
        if nh == NEXTHDR_ICMP:
            err = icmpv6.icmpv6_rcv(sh, ip, payload, bool(csum_ok))
            if err is not None:
                tcp_v6_err(sh, err, now)
            return
        if nh == NEXTHDR_UDP:
            udp.udpv6_rcv(sh, ip, payload, pkt, bool(csum_ok))
            return
        if nh == NEXTHDR_NONE:
            stats.drop(DropReason.NOT_TCP)  # RFC 8200 §4.7: nothing follows
            return
        stats.drop(DropReason.IP_NOPROTO)
        icmpv6.icmpv6_param_prob(sh, pkt, PARAMPROB_NEXTHDR, ip.nexthdr_off)
        return
    if not csum_ok and not verify_tcp_checksum(src, dst, payload):
        stats.drop(DropReason.TCP_CSUM)
        return
    try:
        seg = parse_tcp(payload, ip.traffic_class & 3)
    except WireError as e:
        stats.drop(tcp_ipv4.tcp_hdr_reason(payload, e.reason))
        return
    stats.segs_in += 1
    sk = hit if looked_up else sh.h.ehash.get((dst, seg.dst_port, src, seg.src_port))
    if sh.tracing:
        sh.tr("tcp_v6_rcv")
        sh.tr("__inet6_lookup_skb")
        sh.tr("__inet6_lookup_established")
    tcp_ipv4.tcp_rcv_sock(sh, sk, seg, src, dst, now, inet6_lookup_listener, tcp_v6_do_rcv)


def inet6_lookup_listener(sh: Shard, daddr: int, dport: int, saddr: int,
                          sport: int) -> TcpSock | None:
    """The listener for an IPv6 segment (Linux ``inet6_lookup_listener``): bound
    to the address, else a V6ONLY one on ``::``, else a dual-stack one on
    ``::`` (keyed like ``0.0.0.0``, so an IPv4 socket there is skipped)."""
    if sh.tracing:
        sh.tr("inet6_lookup_listener")
    h = sh.h
    lst = h.listening
    sk = lst.get((daddr, dport))
    if sk is None:
        sk = lst.get((_ANY6, dport))
        if sk is None:
            sk = lst.get((0, dport))
            if sk is not None and sk.family != AF_INET6:
                return None
    if sk is not None and h.reuseport:
        return inet_hashtables.reuseport_select_sock(h, sk, saddr, sport)
    return sk


def tcp_v6_do_rcv(sh: Shard, sk: TcpSock, seg: TcpSegment, src: int, dst: int, now: float,
                  isn: int | None = None) -> None:
    """A segment for a listener, IPv6 (Linux ``tcp_v6_do_rcv`` in LISTEN): as
    ``tcp_ipv4.tcp_v4_do_rcv``, SYN cookies checked on a bare ACK."""
    if sh.tracing:
        sh.tr("tcp_v6_do_rcv")
    if tcp_ipv4.tcp_listen_rst_or_ack(sh, sk, seg, src, dst, now):
        return
    if not seg.flags & SYN:
        sh.stats.drop(DropReason.TCP_FLAGS)
        return
    if sh.tracing:
        sh.tr("tcp_v6_conn_request")
    tcp_ipv4.tcp_conn_request(sh, sk, seg, src, dst, now, isn)


def tcp_v6_syn_recv_sock(sh: Shard, listener: TcpSock, req: RequestSock, seg: TcpSegment,
                         now: float) -> TcpSock | None:
    """The child of an IPv6 request sock (Linux ``tcp_v6_syn_recv_sock``): as
    ``tcp_v4_syn_recv_sock`` with the IPv6 route MSS (MTU - 60)."""
    if sh.tracing:
        sh.tr("tcp_v6_syn_recv_sock")
    if inet_connection_sock.sk_acceptq_is_full(listener):
        return None
    child = tcp_minisocks.tcp_create_openreq_child(sh, listener, req, seg, now)
    mss = req.mss
    if child.user_mss and child.user_mss < mss:
        mss = child.user_mss
    tcp_output.tcp_set_mss(child, mss)
    user_mss = child.user_mss
    child.adv_mss = user_mss if 0 < user_mss < sh.adv_mss6 else sh.adv_mss6
    tcp_input.tcp_initialize_rcv_mss(sh, child)
    tcp_minisocks.tcp_child_inherit_port(sh, listener, child)
    tcp_minisocks.tcp_child_hash(sh, child, req)
    child.flowlabel = ip6_make_flowlabel(sh.key, child.laddr, child.lport, child.raddr,
                                         child.rport)
    return child


# -- active open ------------------------------------------------------------------------

def tcp_v6_connect(sh: Shard, sk: TcpSock, raddr: int, rport: int, now: float) -> None:
    """connect() to an IPv6 peer (Linux ``tcp_v6_connect``); the v4-mapped case
    is the Shard's (it calls ``tcp_v4_connect``, as Linux does)."""
    if sh.tracing:
        sh.tr("tcp_v6_connect")
    st = sk.state
    if st is TCP_SYN_SENT:
        raise os_error(errno.EALREADY)
    if sk.dead and st is TCP_CLOSED and sk.cc is None:
        # A failed connect, reported then reset (tcp_v4_connect says why).
        err = sk.err or errno.ECONNABORTED
        sk.err = 0
        tcp_ipv4.tcp_disconnect(sh, sk)
        raise os_error(err)
    if st is not TCP_CLOSED or sk.dead:
        raise os_error(errno.EISCONN)
    if not 0 < rport < 65536 or raddr == 0:
        raise os_error(errno.EINVAL if rport >= 65536 else errno.ECONNREFUSED)
    if not ipv6_addr_usable(raddr):
        # Loopback, ::/96, multicast: no route from this stack (Linux:
        # ENETUNREACH for multicast and unroutable destinations).
        raise os_error(errno.ENETUNREACH)
    cfg = sh.cfg
    if sk.laddr == 0:
        if not cfg.addrs6:
            raise os_error(errno.ENETUNREACH)
        sk.laddr = cfg.addrs6[0]  # the one route: our first IPv6 address
    elif sk.laddr <= V4_ADDR_MAX:
        raise os_error(errno.ENETUNREACH)  # bound to a (v4-mapped) IPv4 address
    sk.raddr = raddr
    sk.rport = rport
    if sk.bound:
        if not inet_hashtables.inet_ehash_insert(sh.h, sk):
            sk.raddr = sk.rport = 0
            raise os_error(errno.EADDRNOTAVAIL)
    else:
        lo, hi = cfg.ephemeral_range
        h = hashlib.blake2s(tuple6(sk.laddr, 0, raddr, rport), key=sh.key,
                            digest_size=4).digest()
        sh.connects += 1
        offset = int.from_bytes(h, "big") + sh.connects
        if not inet_hashtables.inet_hash_connect(sh.h, sk, lo, hi, offset, cfg.port_filter):
            sk.raddr = sk.rport = 0
            raise os_error(errno.EADDRNOTAVAIL)
    sk.iss, sk.ts_off = tcp_ipv4.secure_tcp_seq(sh.key, sk.laddr, sk.lport, raddr, rport, now)
    sk.flowlabel = ip6_make_flowlabel(sh.key, sk.laddr, sk.lport, raddr, rport)
    tcp_ipv4.tcp_connect(sh, sk, now)


# -- ICMPv6 errors (Linux tcp_v6_err) -----------------------------------------------------

_SYN_STATES = (State.SYN_SENT, State.SYN_RECV)


def tcp_v6_err(sh: Shard, e: Icmpv6Err, now: float) -> None:
    """An ICMPv6 error quoting one of our segments (Linux ``tcp_v6_err``); never raises.

    As ``tcp_v4_err``: the established hash only, the quoted sequence within
    [SND.UNA, SND.NXT] (RFC 5927 §4.1).  Packet Too Big lowers the path MTU
    (``tcp_v6_mtu_reduced``); an MTU below 1280 is ignored (RFC 8201 §4:
    a node must not reduce below the IPv6 minimum; Linux ``goto out``).
    Other errors convert as ``icmpv6_err_convert``: a handshake in progress
    fails with the errno, a synchronized connection keeps it as its soft
    error (RFC 1122 §4.2.3.9), a request sock is dropped on a fatal one.
    """
    stats = sh.stats
    q = e.quote
    if q.proto == NEXTHDR_UDP:
        err, fatal = icmpv6_err_convert(e.type, e.code)
        udp.udpv6_err(sh, e, fatal, err)  # __udp6_lib_err
        return
    if q.proto != NEXTHDR_TCP:
        stats.icmp6_in_errors += 1
        stats.drop(DropReason.ICMP_ERR_NOT_TCP)
        return
    sk = sh.h.ehash.get((q.src, q.sport, q.dst, q.dport))
    if sk is None:
        stats.icmp6_in_errors += 1
        stats.drop(DropReason.ICMP_ERR_NOT_OURS)
        return
    err, fatal = icmpv6_err_convert(e.type, e.code)
    if isinstance(sk, RequestSock):
        tcp_ipv4.tcp_req_err(sh, sk, q.seq, fatal)
        return
    st = sk.state
    if st is TCP_TIME_WAIT or st is TCP_CLOSED:
        return
    if ((q.seq - sk.snd_una) & MASK) > ((sk.snd_max - sk.snd_una) & MASK):
        stats.tcp_out_of_window_icmps += 1
        stats.drop(DropReason.ICMP_ERR_OUT_OF_WINDOW)
        return
    if e.type == ICMPV6_PKT_TOOBIG:
        if e.info < IPV6_MIN_MTU:
            return
        tcp_v6_mtu_reduced(sh, sk, e.info, now)
        return
    if st in _SYN_STATES:
        stats.tcp_icmp_aborts += 1
        tcp.tcp_done(sh, sk, err)
        return
    stats.tcp_icmp_soft_errors += 1
    sk.err_soft = err


def tcp_v6_mtu_reduced(sh: Shard, sk: TcpSock, mtu: int, now: float) -> None:
    """Packet Too Big for one of our segments (Linux ``tcp_v6_mtu_reduced``, RFC 8201).

    The MTU is at least 1280 (checked by the caller); a reduction that would
    not lower the MSS is ignored ("drop requests trying to increase our
    current mss"), else the MSS shrinks to MTU - 60 and the flight is resent
    at the new size (``tcp_ipv4.tcp_simple_retransmit``).
    """
    if sh.tracing:
        sh.tr("tcp_v6_mtu_reduced")
    if sk.cc is None:
        return  # only a SYN was sent: nothing of ours is too big
    if mtu - TCP_V6_HDRS >= sk.mss:
        return
    if not tcp_ipv4.tcp_sync_mss(sk, mtu):
        return
    sh.stats.tcp_pmtu_reductions += 1
    tcp_ipv4.tcp_simple_retransmit(sh, sk, now)

