"""IPv4 entry points of TCP (Linux ``net/ipv4/tcp_ipv4.c``).

``tcp_v4_rcv`` takes one IPv4 packet: validate (IP header, TCP checksum
unless the device vouched for it, TCP header), look the 4-tuple up (ehash:
established, request or TIME-WAIT socket; then the listening hash) and hand
the segment to the state machine.  Segments for no socket get an RST
(RFC 9293 §3.10.7.1), never in answer to an RST.

ISNs follow RFC 6528: ``ISN = M + F(4-tuple, secret)`` with M a 4 µs clock
taken from ``now`` and F a keyed BLAKE2s of the 4-tuple (Linux uses SipHash).
The same hash gives each connection its timestamp offset (Linux
``secure_tcp_ts_off``), so TSvals do not reveal uptime.

ICMP errors about our segments come through ``tcp_v4_err`` (RFC 1122
§4.2.3.9, RFC 5927 §4.1, RFC 1191): "fragmentation needed" lowers the
connection's MSS and resends the flight in the new size; other errors abort
a handshake in progress, or are kept as the soft error a later timeout
reports.  A socket whose connect() failed may connect() again
(``tcp_v4_connect``, Linux ``__inet_stream_connect`` + ``tcp_disconnect``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import (
    icmp,
    inet_connection_sock,
    inet_hashtables,
    request_sock,
    syncookies,
    tcp,
    tcp_ecn,
    tcp_input,
    tcp_ipv6,
    tcp_minisocks,
    tcp_output,
    udp,
)
from .dropreason import WIRE_REASONS, DropReason
from .events import Acceptable
from .icmp import ICMP_ERR_CONVERT, IP_RT_MIN_PMTU, NR_ICMP_UNREACH, IcmpErr
from .tcp_h import (
    MASK,
    TCP_CLOSED,
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    TCP_TIMEOUT_INIT,
    V4_ADDR_MAX,
    BytesLike,
    RequestSock,
    State,
    TcpSegment,
    TcpSock,
    TimerKind,
    os_error,
)
from .wire.checksum import verify_tcp_checksum
from .wire.errors import WireError
from .wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    ICMP_HOST_UNREACH,
    ICMP_NET_UNREACH,
    ICMP_PARAMETERPROB,
    ICMP_TIME_EXCEEDED,
)
from .wire.ipv4 import parse_ipv4
from .wire.tcp import ACK, RST, SYN, parse_tcp

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["tcp_v4_rcv", "tcp_v4_connect", "tcp_v4_conn_request", "tcp_v4_syn_recv_sock",
           "tcp_v4_send_synack", "secure_tcp_seq", "tcp_select_initial_window", "tcp_v4_err",
           "tcp_v4_mtu_reduced", "tcp_simple_retransmit", "tcp_disconnect",
           "tcp_conn_request", "cookie_check"]

#: A family's listener lookup (daddr, dport, saddr, sport) and its LISTEN-state
#: receive (segment, src, dst, now, ISN), for ``tcp_rcv_sock``.
LookupListener = Callable[["Shard", int, int, int, int], "TcpSock | None"]
DoRcv = Callable[["Shard", TcpSock, TcpSegment, int, int, float, "int | None"], None]

_TUPLE = struct.Struct("!IHIH")
_IP_REASONS = WIRE_REASONS["ip"]
# Header prediction reads the raw headers itself (Linux compares raw header
# words too): IPv4 without options, the fixed TCP header and the aligned
# timestamp option (NOP, NOP, kind 8, length 10 and the two values) that
# follows it, in one unpack.  The layouts are core.wire's (RFC 791 §3.1, RFC
# 9293 §3.1, RFC 7323 §3 and Appendix A); the checks are ``parse_ipv4``'s and
# ``parse_tcp``'s for these layouts, so what passes them parses identically.
_unpack_hp = struct.Struct("!BBHHHBBHIIHHIIHHHHIII").unpack_from
_unpack_hp40 = struct.Struct("!BBHHHBBHIIHHIIHHHH").unpack_from  # shorter than 52 bytes
_NO_TS = (0, 0, 0)
_TS_WORD = 0x0101080A
_TCP_REASONS = WIRE_REASONS["tcp"]


def secure_tcp_seq(key: bytes, laddr: int, lport: int, raddr: int, rport: int,
                   now: float) -> tuple[int, int]:
    """(ISN, timestamp offset) for a 4-tuple (RFC 6528 §3, Linux ``secure_tcp_seq``;
    ``secure_tcpv6_seq`` over 128-bit addresses when the peer is IPv6)."""
    if raddr > V4_ADDR_MAX:
        data = tcp_ipv6.tuple6(laddr, lport, raddr, rport)
    else:
        data = _TUPLE.pack(laddr, lport, raddr, rport)
    h = hashlib.blake2s(data, key=key, digest_size=8).digest()
    f = int.from_bytes(h[:4], "big")
    m = int(now * 250000)  # RFC 6528: a timer ticking every 4 microseconds
    return (f + m) & MASK, int.from_bytes(h[4:], "big")


def tcp_select_initial_window(rcvbuf: int, window_scaling: bool, window_clamp: int = 0,
                              mss: int = 0, rmem_max: int = 0) -> tuple[int, int]:
    """(window to offer in the SYN, our window-scale shift) (Linux ``tcp_select_initial_window``).

    The shift is the smallest that lets the whole receive buffer be offered
    (RFC 7323 §2.3, at most 14), and, for a buffer that auto-tuning may grow
    (``rmem_max``: tcp_rmem[2]; 0 for a fixed one), the largest it may grow
    to, as Linux scales for tcp_rmem[2]: the shift is fixed at the SYN.
    With TCP_WINDOW_CLAMP, the whole clamp (Linux bounds the space by
    ``window_clamp`` first), which also bounds the window offered.  The
    window is at most the 64 KiB Linux starts from (its default tcp_rmem[1]
    of 128 KiB, half of it window) and, as Linux quantizes it, rounded down
    to whole segments of ``mss`` (our MSS less the timestamp option when that
    is on): 64240 for 1460, 65160 for 1448; the SYN's field cannot say more
    than 65535 (RFC 7323 §2.2: unscaled).
    """
    space = rcvbuf if not window_clamp or window_clamp > rcvbuf else window_clamp
    ws = 0
    if window_scaling:
        rest = space
        if rmem_max > rest:
            rest = rmem_max if not window_clamp or window_clamp > rmem_max else window_clamp
        # The smallest shift that brings ``rest`` within 16 bits: its bit length
        # past 16 (the halving loop's answer without the loop), at most 14.
        ws = rest.bit_length() - 16
        if ws < 0:
            ws = 0
        elif ws > 14:
            ws = 14
    if space > 65536:
        space = 65536
    if space > mss > 0:
        space -= space % mss
    return min(space, 65535), ws


def _rmem_max(sh: Shard, sk: TcpSock) -> int:
    """What the buffer may grow to, for the window scale: tcp_rmem[2], or 0 when fixed."""
    return 0 if sk.rcvbuf_locked else sh.cfg.tcp_rmem[2]


# -- receive ------------------------------------------------------------------------------

def tcp_v4_rcv(sh: Shard, pkt: BytesLike, now: float,
               csum_ok: bool) -> None:
    """One inbound IPv4 packet (Linux ``ip_local_deliver`` + ``tcp_v4_rcv``); never raises.

    First header prediction (``tcp_input`` "header prediction"): a packet laid
    out as an established connection's segments are (IPv4 without options,
    TCP data offset 5, or 8 with the aligned timestamp option, ACK and at most
    PSH) is read with one struct unpack and, if its socket is ESTABLISHED,
    offered to ``tcp_rcv_established_fast``.  Everything it declines, and
    every other packet, takes the general path below: full parse, checks in
    ``ip_rcv_core`` order, lookup, state machine.
    """
    stats = sh.stats
    n = len(pkt)
    looked_up = False  # header prediction made the ehash lookup already
    hit: TcpSock | RequestSock | None = None
    # Two byte reads first (IPv4 without options; then the TCP flags byte: ACK
    # and at most PSH), so SYNs, FINs and RSTs are not unpacked twice.
    if (n >= 40 and pkt[0] == 0x45 and pkt[33] & 0xF7 == 0x10 and not sh.tracing
            and tcp_input.HEADER_PREDICTION):
        (vihl, tos, total, ident, frag, ttl, proto, ipsum, src, dst, sport, dport, seq, ack,
         offflags, window, tsum, urg, tsword, tsval, tsecr) = (
            _unpack_hp(pkt) if n >= 52 else _unpack_hp40(pkt) + _NO_TS)
        hp = offflags & 0xF0F7  # data offset and flags but PSH (Linux TCP_HP_BITS)
        if (proto == 6 and (hp == 0x8010 or hp == 0x5010) and not frag & 0x3FFF
                and 20 + ((offflags >> 10) & 0x3C) <= total <= n):
            hit = sk = sh.h.ehash.get((dst, dport, src, sport))  # dst is ours if this hits
            looked_up = True
            # An ECN connection's data whose mark means news (RFC 3168 §6.1.3: CE,
            # the first ECT, Not-ECT after ECT) takes the slow path, where tcp_ecn sees it.
            if (sk is not None and sk.state is TCP_ESTABLISHED
                    and not (0x4506 + tos + total + ident + frag + (ttl << 8) + ipsum + src
                             + dst) % 0xFFFF
                    and not (sk.ecn_flags and tcp_ecn.tcp_ecn_mark_is_news(
                        sk, tos, total - 20 - ((offflags >> 10) & 0x3C)))):
                if hp == 0x8010:
                    off = 52
                else:
                    off = 40  # no options: the words read as TS were payload
                    tsval = None
                    tsecr = 0
                if off == 40 or tsword == _TS_WORD:
                    if csum_ok:
                        csum = None
                    else:
                        # Pseudo-header + TCP header words; the payload's sum is
                        # added only once the prediction holds (tcp_checksum_complete).
                        csum = (src + dst + 6 + total - 20 + sport + dport + seq + ack
                                + offflags + window + tsum + urg)
                        if tsval is not None:
                            csum += _TS_WORD + tsval + tsecr
                    if tcp_input.tcp_rcv_established_fast(sh, sk, pkt, off, total, seq, ack, window,
                                                 tsval, tsecr, csum, now):
                        stats.segs_in += 1
                        return
    if n and pkt[0] >> 4 == 6:
        # An IPv6 packet (the version nibble; the glue takes both ethertypes).
        tcp_ipv6.tcp_v6_rcv(sh, pkt, now, csum_ok)
        return
    try:
        ip, payload = parse_ipv4(pkt)
    except WireError as e:
        stats.drop(_IP_REASONS.get(e.reason, DropReason.IP_HDR))
        return
    if ip.header_len > 20:
        bad = ip_options_reason(pkt, ip.header_len)
        if bad is not None:
            stats.drop(bad)
            return
    if ip.proto != 6:
        if ip.proto == udp.PROTO_UDP and ip.dst in sh.addr_set:
            udp.udp_rcv(sh, ip, payload, pkt, bool(csum_ok))  # ip_local_deliver's UDP
            return
        if ip.proto == 1 and ip.dst in sh.addr_set:
            # ip_local_deliver's other protocol: ICMP errors about our segments.
            err = icmp.icmp_rcv(sh, ip, payload)
            if err is not None:
                tcp_v4_err(sh, err, now)
            return
        stats.drop(DropReason.NOT_TCP)
        return
    src = ip.src
    dst = ip.dst
    if dst not in sh.addr_set:
        stats.drop(DropReason.IP_OTHERHOST)
        return
    if not csum_ok and not verify_tcp_checksum(src, dst, payload):
        stats.drop(DropReason.TCP_CSUM)
        return
    try:
        seg = parse_tcp(payload, ip.tos & 3)
    except WireError as e:
        stats.drop(tcp_hdr_reason(payload, e.reason))
        return
    stats.segs_in += 1
    sk = hit if looked_up else sh.h.ehash.get((dst, seg.dst_port, src, seg.src_port))
    if sh.tracing:
        sh.tr("tcp_v4_rcv")
        sh.tr("__inet_lookup_skb")
        sh.tr("__inet_lookup")
        sh.tr("__inet_lookup_established")
    tcp_rcv_sock(sh, sk, seg, src, dst, now, _lookup_listener, tcp_v4_do_rcv)


def tcp_rcv_sock(sh: Shard, sk: TcpSock | RequestSock | None, seg: TcpSegment, src: int,
                 dst: int, now: float, lookup_listener: LookupListener, do_rcv: DoRcv) -> None:
    """A parsed segment and what the established-table lookup found: the part
    of ``tcp_v4_rcv`` and ``tcp_v6_rcv`` (Linux writes it twice) that does not
    depend on the family, given the family's listener lookup and ``do_rcv``."""
    if sk is not None:
        if sk.state is TCP_ESTABLISHED:
            tcp_input.tcp_segs_in(sk, len(seg.payload))
            tcp_input.tcp_rcv_established(sh, sk, seg, now)
            return
        if isinstance(sk, RequestSock):  # NEW-SYN-RECV
            child = tcp_minisocks.tcp_check_req(sh, sk, seg, now)
            if child is not None:
                tcp_child_process(sh, sk.listener, child, seg, now)
            return
        if sk.state is TCP_TIME_WAIT:
            if tcp_minisocks.tcp_timewait_state_process(sh, sk, seg, now) != tcp_minisocks.TW_SYN:
                return
            # RFC 6191 / Linux TCP_TW_SYN: a new incarnation; its ISN lies beyond the old one.
            isn = (sk.snd_nxt + 65535 + 2) & MASK
            listener = lookup_listener(sh, dst, seg.dst_port, src, seg.src_port)
            if listener is not None:
                do_rcv(sh, listener, seg, src, dst, now, isn)
                return
        else:
            tcp_input.tcp_segs_in(sk, len(seg.payload))
            tcp_input.tcp_rcv_state_process(sh, sk, seg, now)
            return
    listener = lookup_listener(sh, dst, seg.dst_port, src, seg.src_port)
    if listener is None:
        sh.stats.drop(DropReason.NO_SOCKET)
        tcp_output.tcp_send_reset(sh, dst, seg.dst_port, src, seg.src_port, seg)
        return
    do_rcv(sh, listener, seg, src, dst, now, None)


#: Fixed option lengths parse_tcp enforces (MSS, window scale, SACK permitted, timestamps).
_TCPOPT_LEN = {2: 4, 3: 3, 4: 2, 8: 10}
_IPOPT_LSRR = 131
_IPOPT_SSRR = 137


def ip_options_reason(pkt: BytesLike, hl: int) -> DropReason | None:
    """Why a packet's IP options make it unacceptable, or None (RFC 791 §3.1; Linux
    ``ip_options_compile``, and ``accept_source_route = 0``: a source-routed
    packet is dropped).  Other options are legal and ignored."""
    i = 20
    while i < hl:
        kind = pkt[i]
        if kind == 0:  # end of list
            return None
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= hl or pkt[i + 1] < 2 or i + pkt[i + 1] > hl:
            return DropReason.IP_OPTIONS
        if kind == _IPOPT_LSRR or kind == _IPOPT_SSRR:
            return DropReason.IP_SOURCE_ROUTE
        i += pkt[i + 1]
    return None


def tcp_hdr_reason(seg: BytesLike, reason: str) -> DropReason:
    """The drop reason for a TCP header ``parse_tcp`` refused, one per class of
    malformation (``reason`` is its WireError's)."""
    r = _TCP_REASONS.get(reason)
    if r is not None and reason != "option_len":
        return r
    if reason == "data_offset":
        return DropReason.TCP_DOFF_SHORT if seg[12] >> 4 < 5 else DropReason.TCP_DOFF_OVERRUN
    if reason != "option_len":
        return DropReason.TCP_HDR
    hl = (seg[12] >> 4) << 2
    i = 20
    while i < hl:
        kind = seg[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= hl or seg[i + 1] < 2:
            return DropReason.TCP_OPTLEN_SHORT
        if i + seg[i + 1] > hl:
            return DropReason.TCP_OPT_OVERRUN
        want = _TCPOPT_LEN.get(kind)
        if (want is not None and seg[i + 1] != want) or (
                kind == 5 and (seg[i + 1] < 10 or (seg[i + 1] - 2) & 7)):
            break  # a known option with the wrong length (parse_tcp's order)
        i += seg[i + 1]
    return DropReason.TCP_OPTIONS


def _lookup_listener(sh: Shard, daddr: int, dport: int, saddr: int,
                     sport: int) -> TcpSock | None:
    if sh.tracing:
        sh.tr("__inet_lookup_listener")
    h = sh.h
    lst = h.listening
    sk = lst.get((daddr, dport))
    if sk is None:
        sk = lst.get((0, dport))
    if sk is not None and h.reuseport:
        return inet_hashtables.reuseport_select_sock(h, sk, saddr, sport)
    return sk


def tcp_v4_do_rcv(sh: Shard, sk: TcpSock, seg: TcpSegment, src: int, dst: int, now: float,
                  isn: int | None = None) -> None:
    """A segment for a listener: RFC 9293 §3.10.7.2 (LISTEN state)."""
    if sh.tracing:
        sh.tr("tcp_v4_do_rcv")
    if tcp_listen_rst_or_ack(sh, sk, seg, src, dst, now):
        return
    if sh.tracing:
        sh.tr("tcp_rcv_state_process")
    if not seg.flags & SYN:
        sh.stats.drop(DropReason.TCP_FLAGS)
        return
    tcp_v4_conn_request(sh, sk, seg, src, dst, now, isn)


def tcp_listen_rst_or_ack(sh: Shard, sk: TcpSock, seg: TcpSegment, src: int, dst: int,
                          now: float) -> bool:
    """A listener's RST (dropped) or ACK (a SYN cookie's, else answered with a
    RST), for both families (RFC 9293 §3.10.7.2 first and second checks);
    False when the segment is neither and goes on to the SYN check."""
    flags = seg.flags
    if flags & RST:
        sh.stats.drop(DropReason.TCP_RESET)
        return True
    if flags & ACK:
        if (not flags & SYN and sh.cfg.syncookies and not tcp_synq_no_recent_overflow(sk, now)
                and cookie_check(sh, sk, seg, src, dst, now)):
            return True
        # "Any acknowledgment is bad if it arrives on a connection still in the LISTEN state."
        sh.stats.drop(DropReason.TCP_FLAGS)
        tcp_output.tcp_send_reset(sh, dst, seg.dst_port, src, seg.src_port, seg)
        return True
    return False


def tcp_conn_allowed(sh: Shard, now: float) -> bool:
    """May this shard take one more connection?  Not past its connection cap
    (``ShardConfig.max_connections``: TCP_CONN_LIMIT) nor above the tcp_mem
    hard limit (TCP_MEM).  Counted when not."""
    cap = sh.cfg.max_connections
    if cap and len(sh.h.ehash) >= cap:
        sh.stats.drop(DropReason.TCP_CONN_LIMIT)
        return False
    high = sh.cfg.tcp_mem[2]
    if high and tcp_input.tcp_memory_allocated(sh, now) > high:
        sh.stats.drop(DropReason.TCP_MEM)
        return False
    return True


def tcp_v4_conn_request(sh: Shard, sk: TcpSock, seg: TcpSegment, src: int, dst: int, now: float,
                        isn: int | None = None) -> None:
    """A SYN for a listener (Linux ``tcp_v4_conn_request``)."""
    if sh.tracing:
        sh.tr("tcp_v4_conn_request")
    tcp_conn_request(sh, sk, seg, src, dst, now, isn)


def tcp_conn_request(sh: Shard, sk: TcpSock, seg: TcpSegment, src: int, dst: int, now: float,
                     isn: int | None = None) -> None:
    """A SYN for a listener, either family (Linux ``tcp_conn_request``; the
    family's parts, ``route_req``/``init_seq``/``cookie_init_seq``, chosen by
    the peer's address: ``tcp_h.V4_ADDR_MAX``).

    Backlog like Linux: a full accept queue drops the SYN; a full request
    queue switches to SYN cookies (RFC 4987 §3.6) or, with cookies off, drops;
    ``syncookies = 2`` (tcp_syncookies = 2) answers every SYN with a cookie.
    """
    v6 = src > V4_ADDR_MAX
    if sh.tracing:
        sh.tr("tcp_conn_request")
    if not tcp_conn_allowed(sh, now):
        return
    want_cookie = False
    if ((sh.cfg.syncookies == 2 and isn is None)
            or inet_connection_sock.inet_csk_reqsk_queue_is_full(sk)):
        if not sh.cfg.syncookies:
            sh.stats.drop(DropReason.TCP_REQQFULLDROP)
            return
        want_cookie = True
    if inet_connection_sock.sk_acceptq_is_full(sk):
        sh.stats.drop(DropReason.TCP_LISTEN_OVERFLOW)
        sh.stats.listen_overflows += 1
        return
    req = request_sock.inet_reqsk_alloc(sh, sk, dst, seg.dst_port, src, seg.src_port)
    if sh.tracing:
        sh.tr("tcp_parse_options")
    opts = seg.options
    cfg = sh.cfg
    if sh.tracing:
        sh.tr("tcp_openreq_init")
    req.irs = seg.seq
    # Linux tcp_mss_clamp: the listener's TCP_MAXSEG bounds the MSS we announce, and
    # the peer's that we send by (tcp_parse_options' user_mss).
    user_mss = sk.user_mss
    route_mss = sh.adv_mss6 if v6 else sh.adv_mss  # the MTU less 60 (IPv6) or 40 bytes
    adv_mss = user_mss if 0 < user_mss < route_mss else route_mss
    req.mss = min(opts.mss or 536, adv_mss)
    wscale = opts.wscale if cfg.window_scaling else None
    req.wscale_ok = wscale is not None
    req.sack_ok = cfg.sack and opts.sack_perm
    ts = opts.ts if cfg.timestamps else None
    req.ts_ok = ts is not None
    if ts is not None:
        req.ts_recent = ts[0]
    # Linux tcp_openreq_init_rwin: whole segments of our MSS less the timestamp option.
    req.rcv_wnd, ws = tcp_select_initial_window(sk.rcvbuf, req.wscale_ok, sk.window_clamp,
                                                adv_mss - (12 if req.ts_ok else 0),
                                                _rmem_max(sh, sk))
    if wscale is not None:
        req.snd_wscale = wscale
        req.rcv_wscale = ws
    if sh.tracing:
        # the addresses: inet_reqsk_alloc took them
        sh.tr("tcp_v6_init_req" if v6 else "tcp_v4_init_req")
        sh.tr("tcp_v6_init_sequence" if v6 else "tcp_v4_init_sequence")
    iss, req.ts_off = secure_tcp_seq(sh.key, dst, seg.dst_port, src, seg.src_port, now)
    tcp_ecn.tcp_ecn_create_request(sh, req, seg)
    if want_cookie:
        if v6:
            iss, idx = syncookies.cookie_v6_init_sequence(sh.secret, src, dst, seg.src_port,
                                                          seg.dst_port, seg.seq, req.mss, now)
            req.mss = syncookies.MSS_TABLE6[idx]
        else:
            iss, idx = syncookies.cookie_v4_init_sequence(sh.secret, src, dst, seg.src_port,
                                                          seg.dst_port, seg.seq, req.mss, now)
            req.mss = syncookies.MSS_TABLE[idx]
        if req.ts_ok:
            # The SYN's options ride in the low TSval bits (Linux cookie_init_timestamp).
            tsnow = (int(now * 1000) + req.ts_off) & MASK
            tsval = syncookies.cookie_init_timestamp(
                tsnow, opts.wscale if req.wscale_ok else None, req.sack_ok, req.ecn_ok)
            req.ts_off = (tsval - int(now * 1000)) & MASK
        else:
            req.wscale_ok = req.sack_ok = req.ecn_ok = False  # no room to remember them
            req.snd_wscale = req.rcv_wscale = 0
        sh.stats.syncookies_sent += 1
        sk.synq_overflow = now  # Linux tcp_synq_overflow
    elif isn is not None:
        iss = isn
    req.iss = iss
    if not want_cookie:
        inet_csk_reqsk_queue_hash_add(sh, sk, req, now)
    tcp_v4_send_synack(sh, req, now)
    sh.stats.passive_opens += 1


def inet_csk_reqsk_queue_hash_add(sh: Shard, sk: TcpSock, req: RequestSock, now: float) -> None:
    if sh.tracing:
        sh.tr("inet_csk_reqsk_queue_hash_add")
        sh.tr("reqsk_queue_hash_req")
    inet_hashtables.inet_ehash_insert(sh.h, req)
    sh.timers.arm(req, TimerKind.SYNACK, now + TCP_TIMEOUT_INIT)
    if sh.tracing:
        sh.tr("inet_csk_reqsk_queue_added")
    sk.reqs += 1


def tcp_v4_send_synack(sh: Shard, req: RequestSock, now: float) -> None:
    """Send (or resend) a request sock's SYN-ACK; an IPv6 one is
    ``tcp_v6_send_synack``'s work, which differs only in the framing."""
    v6 = req.raddr > V4_ADDR_MAX
    if sh.tracing:
        sh.tr("tcp_v6_send_synack" if v6 else "tcp_v4_send_synack")
    frame = tcp_output.tcp_make_synack(sh, req, now)
    if sh.tracing:
        sh.tr("ip6_xmit" if v6 else "ip_build_and_send_pkt")
    sh.frames.append(frame)
    sh.stats.segs_out += 1
    if req.num_retrans == 0:
        req.synack_time = now


#: Linux TCP_SYNCOOKIE_VALID: how long after the SYN queue overflowed a bare ACK
#: may be a cookie's (MAX_SYNCOOKIE_AGE periods of 60 s there).
TCP_SYNCOOKIE_VALID = 120.0


def tcp_synq_no_recent_overflow(listener: TcpSock, now: float) -> bool:
    """No cookie was sent lately (Linux ``tcp_synq_no_recent_overflow``): then a bare
    ACK to a listener is not a cookie's, and is not worth two keyed hashes (and a
    forger's 4 / 2**24 odds per try)."""
    last = listener.synq_overflow
    return last < 0 or now - last > TCP_SYNCOOKIE_VALID


def cookie_check(sh: Shard, listener: TcpSock, seg: TcpSegment, src: int, dst: int,
                  now: float) -> bool:
    """Final ACK for a SYN-ACK we sent as a cookie (Linux ``cookie_v4_check``,
    ``cookie_v6_check`` for an IPv6 peer)."""
    check = syncookies.cookie_v6_check if src > V4_ADDR_MAX else syncookies.cookie_v4_check
    mss = check(sh.secret, src, dst, seg.src_port, seg.dst_port,
                (seg.seq - 1) & MASK, (seg.ack - 1) & MASK, now)
    if mss is None:
        return False
    if inet_connection_sock.sk_acceptq_is_full(listener):
        sh.stats.drop(DropReason.TCP_LISTEN_OVERFLOW)
        return True
    if not tcp_conn_allowed(sh, now):
        return True
    req = request_sock.inet_reqsk_alloc(sh, listener, dst, seg.dst_port, src, seg.src_port)
    req.irs = (seg.seq - 1) & MASK
    req.iss = (seg.ack - 1) & MASK
    req.mss = mss
    req.rcv_wnd, ws = tcp_select_initial_window(listener.rcvbuf, True,
                                                listener.window_clamp, mss,  # cookie_v4_check
                                                _rmem_max(sh, listener))
    ts = seg.options.ts
    if ts is not None and sh.cfg.timestamps:
        o = syncookies.cookie_timestamp_decode(ts[1])
        req.ts_ok = True
        req.ts_recent = ts[0]
        _, off = secure_tcp_seq(sh.key, dst, seg.dst_port, src, seg.src_port, now)
        req.ts_off = off
        if o.wscale is not None and sh.cfg.window_scaling:
            req.wscale_ok = True
            req.snd_wscale = o.wscale
            req.rcv_wscale = ws
        req.sack_ok = o.sack_perm and sh.cfg.sack
        req.ecn_ok = o.ecn and sh.cfg.ecn != 0  # Linux cookie_ecn_ok
    if not req.wscale_ok:
        req.rcv_wnd = min(req.rcv_wnd, 65535)
    req.num_retrans = 1  # no RTT sample from a cookie
    listener.reqs += 1
    inet_hashtables.inet_ehash_insert(sh.h, req)
    sh.stats.syncookies_recv += 1
    child = tcp_minisocks.tcp_check_req(sh, req, seg, now)
    if child is None:
        return True
    tcp_child_process(sh, listener, child, seg, now)
    return True


def tcp_v4_syn_recv_sock(sh: Shard, listener: TcpSock, req: RequestSock, seg: TcpSegment,
                         now: float) -> TcpSock | None:
    """The child socket (Linux ``tcp_v4_syn_recv_sock``); None if the accept queue is full."""
    if sh.tracing:
        sh.tr("tcp_v4_syn_recv_sock")
    if inet_connection_sock.sk_acceptq_is_full(listener):
        return None
    child = tcp_minisocks.tcp_create_openreq_child(sh, listener, req, seg, now)
    # The send MSS: the peer's option, bounded by our MTU (req.mss) and TCP_MAXSEG.
    if sh.tracing:
        sh.tr("tcp_sync_mss")
    mss = req.mss
    if child.user_mss and child.user_mss < mss:
        mss = child.user_mss
    tcp_output.tcp_set_mss(child, mss)
    # The MSS we announce: the route's (our MTU's) advmss, bounded by TCP_MAXSEG
    # (Linux tcp_mss_clamp), as the SYN-ACK announced it.
    if sh.tracing:
        sh.tr("dst_metric_advmss")
        sh.tr("ipv4_default_advmss")
    user_mss = child.user_mss
    child.adv_mss = user_mss if 0 < user_mss < sh.adv_mss else sh.adv_mss
    tcp_input.tcp_initialize_rcv_mss(sh, child)
    tcp_minisocks.tcp_child_inherit_port(sh, listener, child)
    tcp_minisocks.tcp_child_hash(sh, child, req)
    return child


def tcp_child_process(sh: Shard, listener: TcpSock, child: TcpSock, seg: TcpSegment, now: float) -> None:
    """Run the final ACK through the child, then wake the listener (``tcp_child_process``)."""
    if sh.tracing:
        sh.tr("tcp_child_process")
    tcp_input.tcp_rcv_state_process(sh, child, seg, now)
    # The listener's sk_data_ready: wake accept() when its queue became non-empty.
    if sh.tracing:
        sh.tr("sock_def_readable")
    if len(listener.accept_queue) == 1 and not listener.orphan:
        if sh.tracing:
            sh.tr("wake_up_interruptible_sync_poll")
        sh.events.append(Acceptable(listener.sd))


# -- ICMP errors (Linux tcp_v4_err) ------------------------------------------------------

_SYN_STATES = (State.SYN_SENT, State.SYN_RECV)
_EMSGSIZE = errno.EMSGSIZE


def tcp_v4_err(sh: Shard, e: IcmpErr, now: float) -> None:
    """An ICMP error quoting one of our segments (Linux ``tcp_v4_err``); never raises.

    Lookup as Linux: the established hash only (connections, request socks,
    TIME-WAIT); a listener sends nothing an error could quote but SYN-ACKs,
    and those belong to request socks.  Then RFC 5927 §4.1: the quoted
    sequence number must lie in [SND.UNA, SND.NXT], else the message is
    spoofed or stale (``tcp_out_of_window_icmps``, Linux OutOfWindowIcmps).
    """
    stats = sh.stats
    q = e.quote
    if q.proto == udp.PROTO_UDP:
        udp.udp_err(sh, e)  # __udp4_lib_err
        return
    if q.proto != 6:
        stats.icmp_in_errors += 1  # no other transport here: nothing to tell
        stats.drop(DropReason.ICMP_ERR_NOT_TCP)
        return
    sk = sh.h.ehash.get((q.src, q.sport, q.dst, q.dport))
    if sk is None:
        stats.icmp_in_errors += 1  # Linux: ICMP_MIB_INERRORS, -ENOENT
        stats.drop(DropReason.ICMP_ERR_NOT_OURS)
        return
    if isinstance(sk, RequestSock):  # NEW-SYN-RECV
        # Only errors saying the peer cannot be reached end a half-open
        # connection; port unreachable in answer to a SYN-ACK proves nothing.
        itype, code = e.type, e.code
        tcp_req_err(sh, sk, q.seq, itype == ICMP_PARAMETERPROB or itype == ICMP_TIME_EXCEEDED
                    or (itype == ICMP_DEST_UNREACH
                        and code in (ICMP_NET_UNREACH, ICMP_HOST_UNREACH)))
        return
    st = sk.state
    if st is TCP_TIME_WAIT or st is TCP_CLOSED:
        return
    if ((q.seq - sk.snd_una) & MASK) > ((sk.snd_max - sk.snd_una) & MASK):
        stats.tcp_out_of_window_icmps += 1
        stats.drop(DropReason.ICMP_ERR_OUT_OF_WINDOW)
        return
    itype, code = e.type, e.code
    if itype == ICMP_DEST_UNREACH:
        if code > NR_ICMP_UNREACH:
            return
        if code == ICMP_FRAG_NEEDED:
            # RFC 1191: path MTU discovery.  SYNs and SYN-ACKs are far below
            # any MTU, so only a synchronized connection has something to shrink.
            tcp_v4_mtu_reduced(sh, sk, e.info, now)
            return
        err = ICMP_ERR_CONVERT[code][0]
    elif itype == ICMP_TIME_EXCEEDED:
        err = errno.EHOSTUNREACH
    else:
        err = errno.EPROTO  # parameter problem
    if st in _SYN_STATES:
        # A connect in progress fails at once with the error (Linux
        # tcp_done_with_error); the connect() caller gets this errno.
        stats.tcp_icmp_aborts += 1
        tcp.tcp_done(sh, sk, err)
        return
    # RFC 1122 §4.2.3.9: once synchronized, every ICMP error is soft ("keep
    # trying until we time out"); only the timeout reports it, in place of
    # ETIMEDOUT (Linux sk_err_soft; IP_RECVERR, which would raise it now, is
    # not modelled).
    stats.tcp_icmp_soft_errors += 1
    sk.err_soft = err


def tcp_req_err(sh: Shard, req: RequestSock, seq: int, abort: bool) -> None:
    """An error quoting a request sock's SYN-ACK (Linux ``tcp_req_err``)."""
    if seq != req.iss:
        sh.stats.tcp_out_of_window_icmps += 1
        sh.stats.drop(DropReason.ICMP_ERR_OUT_OF_WINDOW)
        return
    if abort:
        # Dropped silently (Linux inet_csk_reqsk_queue_drop): the listener has
        # no one to tell, and accept() never returns network errors (POSIX).
        inet_connection_sock.inet_csk_reqsk_queue_drop(sh.h, req)
        sh.stats.tcp_icmp_aborts += 1


def tcp_v4_mtu_reduced(sh: Shard, sk: TcpSock, mtu: int, now: float) -> None:
    """"Fragmentation needed" for one of our segments (Linux ``tcp_v4_mtu_reduced``).

    Our segments carry DF, so a router on the path dropped one and told us
    its next-hop MTU (RFC 1191 §4).  The path MTU is raised to
    ``IP_RT_MIN_PMTU`` if lower (then DF cannot be honoured in Linux and the
    route is locked; we keep DF and remember EMSGSIZE as the soft error, as
    Linux does), never raised by such a message (RFC 1191 §3: "MUST NOT
    increase"), and the flight is resent at the new size
    (``tcp_simple_retransmit``): every segment in it was too large.
    """
    if sk.cc is None:
        return  # not synchronized: nothing but a SYN was sent
    if mtu < IP_RT_MIN_PMTU:
        sk.err_soft = _EMSGSIZE
        mtu = IP_RT_MIN_PMTU
    if not tcp_sync_mss(sk, mtu):
        return
    sh.stats.tcp_pmtu_reductions += 1
    tcp_simple_retransmit(sh, sk, now)


def tcp_sync_mss(sk: TcpSock, pmtu: int) -> bool:
    """Fit the send MSS to a smaller path MTU (Linux ``tcp_sync_mss``,
    ``tcp_mtu_to_mss``); True if it shrank.

    ``sk.mss`` is already the smallest of the peer's MSS option, our MTU and
    TCP_MAXSEG, so the path MTU can only lower it further.  ``mss_cache``
    keeps the room timestamps take in every segment.
    """
    mss = pmtu - (60 if sk.raddr > V4_ADDR_MAX else 40)  # IP + TCP headers, no options
    if mss >= sk.mss:
        return False
    tcp_output.tcp_set_mss(sk, mss)
    return True


def tcp_simple_retransmit(sh: Shard, sk: TcpSock, now: float, lost_to: int | None = None) -> None:
    """Resend the whole flight at the current MSS (Linux ``tcp_simple_retransmit``,
    which lives in tcp_input.c).  ``lost_to``: only what lies below it is too big
    (a lost PLPMTUD probe at SND.UNA, ``tcp_mtup``); Linux marks lost only the
    segments longer than the MSS.

    Everything in flight un-SACKed is marked lost, and the sender enters the
    Loss state without touching cwnd or ssthresh: the network holds no more
    data than before, only in smaller units.  Retransmissions then go out
    hole by hole through ``tcp_xmit_retransmit_queue`` as after an RTO, but
    the window is not collapsed and no undo is armed (nothing was spurious).
    """
    una = sk.snd_una
    if sk.snd_max == una:
        return
    if not sk.in_loss:
        sk.in_loss = True
        sk.in_recovery = False
        sk.recover = sk.snd_max
        sk.undo_active = False
        sk.dupacks = 0
        sk.reno_sacked = 0
        sk.timers[TimerKind.TLP] = None
        sk.timers[TimerKind.REO] = None
        sk.rtt_seq = -1  # Karn (RFC 6298 (3)): no samples from what is resent
        sk.rto_ts = (int(now * 1000) + sk.ts_off) & MASK
    sk.lost_hi = sk.snd_max if lost_to is None else lost_to
    sk.retrans_hi = una
    sk.rtx_log.clear()
    sk.relost.clear()
    tcp_output.tcp_xmit_retransmit_queue(sh, sk, now)


# -- active open ------------------------------------------------------------------------

def tcp_v4_connect(sh: Shard, sk: TcpSock, raddr: int, rport: int, now: float) -> None:
    """connect(): pick the source, a port, an ISN; send the SYN (Linux ``tcp_v4_connect``)."""
    if sh.tracing:
        sh.tr("tcp_v4_connect")
    st = sk.state
    if st is TCP_SYN_SENT:
        raise os_error(errno.EALREADY)
    if sk.dead and st is TCP_CLOSED and sk.cc is None:
        # The last connect failed (RST, timeout, ICMP) before the connection
        # was ever established.  Linux's socket is then still "connecting" in
        # CLOSE: connect() reports how it ended (the pending error, or
        # ECONNABORTED once SO_ERROR/recv took it) and disconnects it, so the
        # next connect() starts afresh (``__inet_stream_connect`` sock_error,
        # ``tcp_disconnect``).  One that was established stays EISCONN.
        err = sk.err or errno.ECONNABORTED
        sk.err = 0
        tcp_disconnect(sh, sk)
        raise os_error(err)
    if st is not TCP_CLOSED or sk.dead:
        raise os_error(errno.EISCONN)
    if not 0 < rport < 65536 or raddr == 0:
        raise os_error(errno.EINVAL if rport >= 65536 else errno.ECONNREFUSED)
    cfg = sh.cfg
    if sk.laddr == 0:
        sk.laddr = cfg.addrs[0]  # the one route: our first address
    sk.raddr = raddr
    sk.rport = rport
    if sk.bound:
        if not inet_hashtables.inet_ehash_insert(sh.h, sk):
            sk.raddr = sk.rport = 0
            raise os_error(errno.EADDRNOTAVAIL)
    else:
        lo, hi = cfg.ephemeral_range
        h = hashlib.blake2s(_TUPLE.pack(sk.laddr, 0, raddr, rport), key=sh.key,
                            digest_size=4).digest()
        sh.connects += 1
        offset = int.from_bytes(h, "big") + sh.connects
        if not inet_hashtables.inet_hash_connect(sh.h, sk, lo, hi, offset, cfg.port_filter):
            sk.raddr = sk.rport = 0
            raise os_error(errno.EADDRNOTAVAIL)
    sk.iss, sk.ts_off = secure_tcp_seq(sh.key, sk.laddr, sk.lport, raddr, rport, now)
    tcp_connect(sh, sk, now)


def tcp_connect(sh: Shard, sk: TcpSock, now: float) -> None:
    """Initialise the send side and send the SYN (Linux ``tcp_connect``, ``tcp_connect_init``)."""
    if sh.tracing:
        sh.tr("tcp_connect")
    cfg = sh.cfg
    route_mss = sh.adv_mss6 if sk.raddr > V4_ADDR_MAX else sh.adv_mss
    sk.adv_mss = route_mss if not sk.user_mss else min(sk.user_mss, route_mss)
    # Linux tcp_connect_init: whole segments of our MSS; the timestamp option is
    # taken off only with a remembered ts_recent, never for a fresh SYN (Linux 6.18
    # on a veth: 64240 with and without timestamps).
    sk.rcv_wnd, sk.rcv_wscale = tcp_select_initial_window(sk.rcvbuf, cfg.window_scaling,
                                                           sk.window_clamp, sk.adv_mss,
                                                           _rmem_max(sh, sk))
    sk.snd_una = sk.snd_sml = sk.iss  # snd_sml from the ISN: no small segment yet (Minshall)
    sk.snd_nxt = sk.snd_max = (sk.iss + 1) & MASK
    sk.rtt_time = now
    tcp.tcp_set_state(sh, sk, TCP_SYN_SENT)
    tcp_output.tcp_send_syn(sh, sk, now)
    sh.timers.arm(sk, TimerKind.RETRANSMIT, now + TCP_TIMEOUT_INIT)
    sh.stats.active_opens += 1


def _reset_fields() -> tuple[str, ...]:
    """TcpSock fields ``tcp_disconnect`` puts back to their defaults: all but
    the descriptor, the state (CLOSED already), the timer slots (their heap
    entries must stay stale) and the socket options, which are the fields declared between ``rport`` and
    ``bound`` (the dataclass's "socket options" section)."""
    names = [f.name for f in dataclasses.fields(TcpSock)]
    keep = set(names[names.index("rport") + 1:names.index("bound")])
    # ``state`` too: only a CLOSED socket is disconnected, and states change in
    # ``tcp.tcp_set_state`` alone.
    keep |= {"sd", "state", "timers", "timer_seq", "timer_q"}
    return tuple(n for n in names if n not in keep)


_RESET_FIELDS = _reset_fields()


def tcp_disconnect(sh: Shard, sk: TcpSock) -> None:
    """A socket whose connect failed back to a fresh CLOSED one (Linux ``tcp_disconnect``,
    which lives in tcp.c).

    Options set by the application stay.  The port: ``tcp_done`` released
    it; a port the application bound itself comes back (Linux keeps it,
    SOCK_BINDPORT_LOCK), with its address; an ephemeral one is gone and the
    source address is forgotten (Linux ``inet_reset_saddr``).  If someone
    else took the bound port in between, the socket ends up unbound.
    """
    user_port = 0 if sk.bind_by_connect else sk.lport
    laddr = sk.laddr if user_port else 0
    fresh = TcpSock(sk.sd, rcvbuf=sk.rcvbuf, sndbuf=sk.sndbuf, adv_mss=sh.adv_mss)
    for name in _RESET_FIELDS:
        setattr(sk, name, getattr(fresh, name))
    sk.laddr = laddr
    if user_port:
        lo, hi = sh.cfg.ephemeral_range
        try:
            inet_connection_sock.inet_csk_get_port(sh.h, sk, user_port, lo, hi)
        except OSError:
            sk.lport = 0
