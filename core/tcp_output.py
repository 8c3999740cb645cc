"""Sending segments (Linux ``net/ipv4/tcp_output.c``).

Reading list: RFC 9293 §3.8.6 (window management, SWS avoidance), RFC 896 /
RFC 9293 §3.7.4 (Nagle), RFC 1122 §4.2.3.2 and RFC 9293 §3.8.6.3 (delayed
ACK), RFC 7323 (window scale, timestamps), RFC 2018 (SACK blocks), RFC 6298
(retransmission timer), RFC 9293 §3.8.6.1 (zero-window probing).

The send buffer is a deque of ``memoryview`` chunks whose first byte is
SND.UNA; a segment's payload is a slice of one chunk when it fits (no copy
until ``build_tcp_ipv4`` writes the frame) and a join of slices otherwise.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from . import (
    tcp_chrono,
    tcp_delack,
    tcp_ecn,
    tcp_input,
    tcp_ipv6,
    tcp_mtup,
    tcp_pacing,
    tcp_recovery,
)
from .tcp_h import (
    HALF,
    MASK,
    TCP_CLOSE_WAIT,
    TCP_FIN_WAIT1,
    TCP_LAST_ACK,
    TCP_MIN_SND_MSS,
    TCP_RTO_MAX,
    TCPOLEN_TSTAMP_ALIGNED,
    TX_LOG_STRIDE,
    V4_ADDR_MAX,
    RequestSock,
    State,
    TcpSegment,
    TcpSock,
    TimerKind,
)
from .wire.checksum import sum16
from .wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    build_tcp_ipv4,
    build_tcp_ipv6,
    build_tcp_options,
)

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["tcp_transmit", "tcp_send_ack", "tcp_send_reset", "tcp_send_active_reset",
           "tcp_write_xmit", "tcp_xmit_retransmit_queue", "tcp_current_mss", "tcp_retransmit_skb", "tcp_send_syn", "tcp_make_synack",
           "tcp_select_window", "tcp_syn_window", "tcp_reqsk_window", "tcp_send_probe", "tcp_rto",
           "tcp_build_frame"]

_TS_OPT = struct.Struct("!III")
_TS_WORD = 0x0101080A  # NOP, NOP, kind 8, length 10
#: IPv4 header (no options) + TCP header + NOP,NOP,TS: what established segments carry.
_pack_ts_hdr = struct.Struct("!BBHHHBBHIIHHIIBBHHHIII").pack
#: The same for IPv6 (RFC 8200 §3; addresses as 64-bit halves): 72 bytes.
_pack_ts_hdr6 = struct.Struct("!IHBBQQQQHHIIBBHHHIII").pack
#: IPv6 header alone, and TCP + NOP,NOP,TS alone (a burst packs the first once).
_pack_ip6 = struct.Struct("!IHBBQQQQ").pack
_pack_tcp_ts = struct.Struct("!HHIIBBHHHIII").pack
_M64 = (1 << 64) - 1
_RETRANSMIT = TimerKind.RETRANSMIT
_DELACK = TimerKind.DELACK
_PERSIST = TimerKind.PERSIST
_TLP = TimerKind.TLP



def tcp_set_mss(sk: TcpSock, mss: int) -> None:
    """Set the send MSS (Linux ``tcp_sync_mss`` / ``__tcp_mtu_to_mss``), the only writer
    of ``mss``/``mss_cache``.

    ``mss`` is the clamp before options (the peer's MSS option, our MTU,
    TCP_MAXSEG, the path MTU): raised to ``tcp_min_snd_mss`` first, then the
    timestamp option's room comes off, as Linux does, so ``mss_cache`` is at
    least 36 whatever the peer announced.
    """
    if mss < TCP_MIN_SND_MSS:
        mss = TCP_MIN_SND_MSS
    sk.mss = mss
    sk.mss_cache = mss - (TCPOLEN_TSTAMP_ALIGNED if sk.ts_ok else 0)
    if sk.mtup_enabled:
        tcp_mtup.tcp_mtup_clamp(sk)  # PLPMTUD: no larger than search_low

def tcp_current_mss(sk: TcpSock) -> int:
    """Payload per segment after this moment's options (Linux ``tcp_current_mss``).

    ``mss_cache`` already leaves room for timestamps; SACK blocks we are about
    to report (out-of-order data, a D-SACK) take 4 + 8 bytes per block more,
    and a full segment carrying them must still fit the MTU.
    """
    mss = sk.mss_cache
    if (sk.ofo or sk.dsack) and sk.sack_ok:
        n = (len(sk.sack_blocks) if sk.ofo else 0) + (1 if sk.dsack else 0)
        limit = 3 if sk.ts_ok else 4
        mss -= 4 + 8 * (n if n < limit else limit)
    return mss


def tcp_rto(sk: TcpSock) -> float:
    """The current RTO with exponential backoff (RFC 6298 (5.5)), capped at TCP_RTO_MAX."""
    rto = sk.rto * (1 << sk.backoff) if sk.backoff < 16 else TCP_RTO_MAX
    return rto if rto < TCP_RTO_MAX else TCP_RTO_MAX


def tcp_select_window(sk: TcpSock) -> int:
    """The window field of every non-SYN segment we send, and record the right
    edge it advertises (Linux ``tcp_select_window``).  Every established-state
    segment (data, pure ACK, window update, delayed ACK, probe, RST) gets its
    window field here, so the rules below hold for all of them.

    Never move the right edge left (RFC 9293 §3.8.6.2.2 "shrinking the window
    is strongly discouraged"; a peer that has filled the old edge would see
    its later segments, even pure ACKs, fall outside our window): when free
    space fell below what was offered, keep offering the old edge, rounded
    *up* to the scale granularity (RFC 7323 §2.4 and its Appendix F: the
    field cannot express an edge between multiples of 2**Rcv.Wind.Shift, and
    rounding down is what retracts it).  Memory stays bounded the way Linux
    bounds it: the window offered from free space never exceeds the buffer,
    and the receive path drops in-window data only past a hard limit a little
    above it (``tcp_input`` ``_rmem_ok``, Linux ``tcp_try_rmem_schedule``).

    Receiver SWS avoidance (RFC 9293 §3.8.6.2.2): a window from free space
    smaller than min(space/2, MSS) is not offered; zero is (if nothing was
    promised).  The space is the buffer, or TCP_WINDOW_CLAMP when smaller,
    which also bounds every window offered (Linux ``window_clamp``; a right
    edge promised before a smaller clamp was set is still kept).
    """
    ws = sk.rcv_wscale
    rcvbuf = sk.rcvbuf
    free = rcvbuf - sk.rcvq_len - sk.ofo_len
    cap = 65535 << ws
    clamp = sk.window_clamp
    if clamp:
        if clamp < rcvbuf:
            rcvbuf = clamp
        if clamp < cap:
            cap = clamp
    if free < (rcvbuf >> 1) and free < sk.rcv_mss:
        free = 0
    new = free if free < cap else cap
    new = (new >> ws) << ws
    cur = (sk.rcv_wup + sk.rcv_wnd - sk.rcv_nxt) & MASK
    if cur & HALF:
        cur = 0  # RCV.NXT is past the old edge (an overlong segment was taken whole)
    if new < cur:
        new = ((cur + (1 << ws) - 1) >> ws) << ws
        if new > 65535 << ws:
            new = 65535 << ws
    sk.rcv_wnd = new
    sk.rcv_wup = sk.rcv_nxt
    return new >> ws


def tcp_syn_window(wnd: int) -> int:
    """The window field of a SYN or SYN-ACK: never scaled (RFC 7323 §2.2), so
    at most 65535; what is recorded in ``rcv_wnd`` is never less than this."""
    return wnd if wnd < 65535 else 65535


def tcp_reqsk_window(wnd: int, ws: int) -> int:
    """The scaled window field of a non-SYN segment sent from a request sock:
    the edge the SYN-ACK offered, rounded up (never retracted, as in
    :func:`tcp_select_window`)."""
    field = (wnd + (1 << ws) - 1) >> ws
    return field if field < 65535 else 65535


def _options(sk: TcpSock, now: float) -> bytes:
    """Options of a non-SYN segment: timestamps (RFC 7323 §3) and SACK blocks (RFC 2018).

    A pending D-SACK (RFC 2883 §4) goes first and is reported once.
    """
    if (sk.ofo or sk.dsack) and sk.sack_ok:
        ts = ((int(now * 1000) + sk.ts_off) & MASK, sk.ts_recent) if sk.ts_ok else None
        limit = 3 if ts else 4
        blocks = [(b[0], b[1]) for b in sk.sack_blocks[:limit]] if sk.ofo else []
        if sk.dsack:
            blocks = [sk.dsack] + blocks[:limit - 1]
            sk.dsack = None
        return build_tcp_options(ts=ts, sack_blocks=blocks)
    if sk.ts_ok:
        return _TS_OPT.pack(_TS_WORD, (int(now * 1000) + sk.ts_off) & MASK, sk.ts_recent)
    return b""


def tcp_transmit(sh: Shard, sk: TcpSock, seq: int, flags: int, payload: bytes | memoryview, now: float,
                 csum_partial: bool = False, win: int = -1) -> None:
    """Build one segment for ``sk`` and queue the frame (Linux ``__tcp_transmit_skb``).

    ``csum_partial``: leave only the pseudo-header sum in the TCP checksum
    field for the device to complete (``ShardConfig.tx_csum_offload``, Linux
    ``tcp_v4_send_check`` on a CHECKSUM_PARTIAL skb); the payload is not read.
    ``win``: the window field when the caller selected it already for this
    burst (``tcp_write_new``: nothing on the receive side changes between its
    segments, and ``tcp_select_window`` would answer the same again); -1
    selects it here.

    The established case (timestamps, no SACK blocks to report) is packed
    here in one go: IPv4 + TCP + NOP,NOP,TS as one 52-byte struct, both
    checksums summed from the field values (as ``wire.tcp.build_tcp_ipv4``
    does), so no option bytes are built and re-read per segment.  The parts
    of both sums that never change on a connection (addresses, ports, the
    option word) are summed once and kept folded in ``tx_csum``/``tx_ipsum``.
    """
    ack = sk.rcv_nxt if flags & ACK else 0
    if win < 0:
        win = tcp_select_window(sk)
    plen = len(payload)
    tos = 0
    if sk.ecn_flags:  # ECT(0) on new data, CWR, ECE (RFC 3168 §6.1; tcp_ecn_send)
        flags, tos = tcp_ecn.tcp_ecn_send(sk, seq, flags, plen)
    urg = 0
    if sk.urg_mode:
        urg = _urgent_pointer(sk, seq)
        if urg:
            flags |= URG
    if sk.ts_ok and not ((sk.ofo or sk.dsack) and sk.sack_ok):
        tsval = (int(now * 1000) + sk.ts_off) & MASK
        tsecr = sk.ts_recent
        total = 52 + plen
        base = sk.tx_csum
        if not base:
            base = _tx_csum_init(sk)
        if csum_partial:
            # Folded, uncomplemented (wire.checksum.pseudo_header_sum); never 0.
            t_field = (sk.laddr + sk.raddr + 38 + plen) % 0xFFFF or 0xFFFF
        else:
            # Pseudo-header (proto 6, TCP length 32 + plen) + header words (data
            # offset 8 words: 0x8000 | flags) + the TS option words.
            t_sum = base + plen + seq + ack + (0x8000 | flags) + win + tsval + tsecr + urg
            if plen:
                t_sum += sum16(payload)
            t_field = -t_sum % 0xFFFF
        raddr = sk.raddr
        if raddr <= 0xFFFFFFFF:
            hdr = _pack_ts_hdr(0x45, tos, total, 0, 0x4000, 64, 6,
                               -(sk.tx_ipsum + total + tos) % 0xFFFF, sk.laddr, raddr, sk.lport,
                               sk.rport, seq, ack, 0x80, flags, win, t_field, urg, _TS_WORD,
                               tsval, tsecr)
        else:
            # IPv6 (tcp_h.V4_ADDR_MAX): no header checksum; the TCP sums above
            # hold as they are (128-bit addresses sum like 32-bit ones). ECN
            # bits sit in the Traffic Class (RFC 3168 §5, RFC 8200 §7).
            laddr = sk.laddr
            hdr = _pack_ts_hdr6(0x60000000 | tos << 20 | sk.flowlabel, 32 + plen, 6, 64,
                                laddr >> 64, laddr & _M64, raddr >> 64, raddr & _M64, sk.lport,
                                sk.rport, seq, ack, 0x80, flags, win, t_field, urg, _TS_WORD,
                                tsval, tsecr)
        frame = b"".join((hdr, payload)) if plen else hdr
    else:
        frame = tcp_build_frame(sk.laddr, sk.raddr, sk.lport, sk.rport, seq, ack, flags,
                                win, _options(sk, now), payload, csum_partial, urg, tos,
                                sk.flowlabel)
    sh.frames.append(frame)
    sh.stats.segs_out += 1
    sk.segs_out += 1
    if plen:
        sk.data_segs_out += 1
        if plen < sk.seg_min:
            sk.seg_min = plen
    if flags & ACK:
        # Every ACK-bearing segment acknowledges all received data (Linux tcp_event_ack_sent).
        if sk.quickack and sk.unacked_rcv:
            tcp_delack.tcp_dec_quickack_mode(sk)
        sk.unacked_rcv = 0
        sk.ack_now = False
        sk.timers[_DELACK] = None


def tcp_build_frame(laddr: int, raddr: int, lport: int, rport: int, seq: int, ack: int,
                    flags: int, win: int, options: bytes = b"",
                    payload: bytes | bytearray | memoryview = b"", csum_partial: bool = False,
                    urgent: int = 0, tos: int = 0, flowlabel: int = 0) -> bytes:
    """One TCP segment in an IPv4 or IPv6 packet, by the peer's address family
    (``tcp_h.V4_ADDR_MAX``): the only place the network header differs
    (Linux ``ip_queue_xmit`` / ``inet6_csk_xmit``, ``tcp_v4_send_check`` /
    ``tcp_v6_send_check``).  ``flowlabel``: IPv6's (RFC 6437)."""
    if raddr > V4_ADDR_MAX:
        return build_tcp_ipv6(laddr, raddr, lport, rport, seq, ack, flags, win, options,
                              payload, traffic_class=tos, flow_label=flowlabel,
                              csum_partial=csum_partial,
                              urgent=urgent)
    return build_tcp_ipv4(laddr, raddr, lport, rport, seq, ack, flags, win, options, payload,
                          tos=tos, csum_partial=csum_partial, urgent=urgent)


def _urgent_pointer(sk: TcpSock, seq: int) -> int:
    """The urgent pointer for a segment starting at ``seq`` (0: no URG), as Linux
    ``__tcp_transmit_skb``: SND.UP - SEG.SEQ while SND.UP is ahead of it, 0xFFFF
    when that does not fit in 16 bits (RFC 6093 §4), and urgent mode ends once
    SND.UNA has reached SND.UP."""
    d = (sk.snd_up - seq) & MASK
    if 0 < d < HALF:
        if d <= 0xFFFF:
            return d
        return 0xFFFF if 0 < ((seq + 0xFFFF - sk.snd_nxt) & MASK) < HALF else 0
    if ((sk.snd_una - sk.snd_up) & MASK) < HALF:
        sk.urg_mode = False
    return 0


def _tx_csum_init(sk: TcpSock) -> int:
    """Fold the per-connection constant parts of both checksums once (the
    4-tuple is fixed before the first segment with timestamps is sent)."""
    sk.tx_ipsum = (0xC506 + sk.laddr + sk.raddr) % 0xFFFF
    base = (sk.laddr + sk.raddr + 38 + sk.lport + sk.rport + _TS_WORD) % 0xFFFF or 0xFFFF
    sk.tx_csum = base
    return base


def tcp_send_ack(sh: Shard, sk: TcpSock, now: float) -> None:
    if sh.tracing:
        sh.tr("tcp_send_ack")
    tcp_transmit(sh, sk, sk.snd_nxt, ACK, b"", now)


def tcp_send_probe(sh: Shard, sk: TcpSock, now: float) -> None:
    """Zero-window or keepalive probe: an old sequence number elicits an ACK.

    Linux ``tcp_xmit_probe_skb``.
    """
    tcp_transmit(sh, sk, (sk.snd_una - 1) & MASK, ACK, b"", now)


def tcp_send_active_reset(sh: Shard, sk: TcpSock, now: float) -> None:
    """RST for abort (close with unread data, SO_LINGER 0), RFC 9293 §3.10.4 ABORT."""
    sh.stats.out_rsts += 1
    tcp_transmit(sh, sk, sk.snd_nxt, RST | ACK, b"", now)


def tcp_send_reset(sh: Shard, laddr: int, lport: int, raddr: int, rport: int, seg: TcpSegment) -> None:
    """RST in answer to ``seg`` sent to no socket (Linux ``tcp_v4_send_reset``, RFC 9293 §3.10.7.1).

    Never answer an RST.  If the segment carried an ACK, the RST takes its
    sequence from it; otherwise it is seq 0 and ACKs everything the segment occupied.
    """
    flags = seg.flags
    if flags & RST:
        return
    sh.stats.out_rsts += 1
    sh.stats.segs_out += 1
    if flags & ACK:
        frame = tcp_build_frame(laddr, raddr, lport, rport, seg.ack, 0, RST, 0)
    else:
        end = (seg.seq + len(seg.payload) + (1 if flags & SYN else 0)
               + (1 if flags & FIN else 0)) & MASK
        frame = tcp_build_frame(laddr, raddr, lport, rport, 0, end, RST | ACK, 0)
    sh.frames.append(frame)


def tcp_send_syn(sh: Shard, sk: TcpSock, now: float) -> None:
    """The SYN of an active open (Linux ``tcp_connect`` / ``tcp_syn_options``)."""
    ts = ((int(now * 1000) + sk.ts_off) & MASK, 0) if sh.cfg.timestamps else None
    opts = build_tcp_options(mss=sk.adv_mss, wscale=sk.rcv_wscale if sh.cfg.window_scaling
                             else None, sack_perm=sh.cfg.sack, ts=ts)
    flags = SYN | tcp_ecn.tcp_ecn_send_syn(sh, sk)
    sh.frames.append(tcp_build_frame(sk.laddr, sk.raddr, sk.lport, sk.rport, sk.iss, 0, flags,
                                     tcp_syn_window(sk.rcv_wnd), opts, flowlabel=sk.flowlabel))
    sh.stats.segs_out += 1
    sk.segs_out += 1


def tcp_send_synack_sock(sh: Shard, sk: TcpSock, now: float) -> None:
    """SYN-ACK from a full socket: simultaneous open (RFC 9293 §3.5 figure 8)."""
    ts = ((int(now * 1000) + sk.ts_off) & MASK, sk.ts_recent) if sk.ts_ok else None
    opts = build_tcp_options(mss=sk.adv_mss, wscale=sk.rcv_wscale if sk.wscale_ok else None,
                             sack_perm=sk.sack_ok, ts=ts)
    flags = SYN | ACK | tcp_ecn.tcp_ecn_make_synack(bool(sk.ecn_flags & tcp_ecn.TCP_ECN_OK))
    sh.frames.append(tcp_build_frame(sk.laddr, sk.raddr, sk.lport, sk.rport, sk.iss,
                                     sk.rcv_nxt, flags, tcp_syn_window(sk.rcv_wnd), opts,
                                     flowlabel=sk.flowlabel))
    sh.stats.segs_out += 1
    sk.segs_out += 1


def tcp_make_synack(sh: Shard, req: RequestSock, now: float) -> bytes:
    """The SYN-ACK for a request sock; options only those the peer offered (RFC 7323 §2.2, §3.2)."""
    if sh.tracing:
        sh.tr("tcp_make_synack")
    ts = ((int(now * 1000) + req.ts_off) & MASK, req.ts_recent) if req.ts_ok else None
    user_mss = req.listener.user_mss  # Linux tcp_mss_clamp: TCP_MAXSEG set on the listener
    route_mss = sh.adv_mss6 if req.raddr > V4_ADDR_MAX else sh.adv_mss
    mss = user_mss if 0 < user_mss < route_mss else route_mss
    opts = build_tcp_options(mss=mss, wscale=req.rcv_wscale if req.wscale_ok else None,
                             sack_perm=req.sack_ok, ts=ts)
    v6 = req.raddr > V4_ADDR_MAX
    if sh.tracing:
        sh.tr("__tcp_v6_send_check" if v6 else "__tcp_v4_send_check")
    flags = SYN | ACK | tcp_ecn.tcp_ecn_make_synack(req.ecn_ok)
    # IPv6: the flow label the connection will keep (tcp_v6_syn_recv_sock).
    label = tcp_ipv6.ip6_make_flowlabel(sh.key, req.laddr, req.lport, req.raddr,
                                        req.rport) if v6 else 0
    return tcp_build_frame(req.laddr, req.raddr, req.lport, req.rport, req.iss,
                           (req.irs + 1) & MASK, flags, tcp_syn_window(req.rcv_wnd), opts,
                           flowlabel=label)


def _sndq_slice(sk: TcpSock, off: int, size: int) -> bytes | memoryview:
    """``size`` bytes of the send queue starting ``off`` bytes after SND.UNA.

    A view into one chunk when the range fits in it (the common case: apps
    write large buffers); otherwise one join of the pieces.
    """
    off += sk.sndq_head_off
    q = sk.sndq
    count = len(q)
    i = 0
    while i < count:
        chunk = q[i]
        n = len(chunk)
        if off < n:
            break
        off -= n
        i += 1
    else:
        return b""
    if off + size <= n:
        return chunk[off:off + size]
    parts = [chunk[off:]]
    got = n - off
    i += 1
    while got < size and i < count:
        chunk = q[i]
        need = size - got
        if len(chunk) >= need:
            parts.append(chunk[:need])
            break
        parts.append(chunk)
        got += len(chunk)
        i += 1
    return b"".join(parts)


def tcp_write_xmit(sh: Shard, sk: TcpSock, now: float) -> None:
    """Send what the windows allow (Linux ``tcp_write_xmit``).

    Segments are MSS-sized (or up to ``tso_max`` when set), limited by the
    peer's window, the congestion window, sender SWS avoidance and Nagle; a FIN
    rides on the last data segment when the send side is shut down.  In loss
    recovery retransmissions go first (``tcp_xmit_retransmit_queue``).
    """
    if sk.in_recovery or sk.in_loss:
        tcp_xmit_retransmit_queue(sh, sk, now)
        return
    tcp_write_new(sh, sk, now, -1)


def _chrono_note(sk: TcpSock, mss: int, now: float) -> None:
    """After a transmit round with data queued (Linux ``tcp_write_xmit`` and
    ``tcp_cwnd_validate``'s chrono calls): busy; rwnd-limited when unsent data
    waits for the peer's window while the congestion window has room for it;
    sndbuf-limited when everything queued is sent, the congestion window has
    room, and the application is blocked on a full send buffer.

    Runs after every transmit round: the tests are ordered so that the
    common cases (all of it sent; unsent data the peer's window has room
    for) read no more than they need."""
    una = sk.snd_una
    nxt = sk.snd_nxt
    in_flight = (nxt - una) & MASK
    left = sk.sndq_len - in_flight
    if left > 0:
        wnd_room = (una + sk.snd_wnd - nxt) & MASK
        if wnd_room & HALF:
            wnd_room = 0
        need = left if left < mss else mss
        if wnd_room < need:
            cc = sk.cc
            if cc is not None and cc.cwnd * sk.mss_cache - in_flight >= need:
                if sk.chrono_type < tcp_chrono.CHRONO_RWND_LIMITED:
                    tcp_chrono.tcp_chrono_start(sk, tcp_chrono.CHRONO_RWND_LIMITED, now)
                return
    elif sk.write_blocked:
        cc = sk.cc
        if cc is not None and cc.cwnd * sk.mss_cache - in_flight > 0:
            tcp_chrono.tcp_chrono_start(sk, tcp_chrono.CHRONO_SNDBUF_LIMITED, now)
            return
    ctype = sk.chrono_type
    if ctype == tcp_chrono.CHRONO_RWND_LIMITED:
        tcp_chrono.tcp_chrono_stop(sk, tcp_chrono.CHRONO_RWND_LIMITED, now)
    elif not ctype:
        # tcp_chrono_start(BUSY) from no condition timed: no interval to close
        # (inline: every request/response flight starts here).
        sk.chrono_type = tcp_chrono.CHRONO_BUSY
        sk.chrono_start = now


def tcp_write_new(sh: Shard, sk: TcpSock, now: float, quota: int) -> int:
    """New data from SND.NXT; ``quota`` >= 0 caps the bytes (recovery), else cwnd does.

    Returns the bytes sent.
    """
    if sk.mtup_enabled and quota < 0:
        tcp_mtup.tcp_mtu_probe(sh, sk, now)  # PLPMTUD (RFC 4821 §7.4): maybe one probe first
    sack_opts = (sk.ofo or sk.dsack) and sk.sack_ok
    mss = tcp_current_mss(sk) if sack_opts else sk.mss_cache
    tso = sh.cfg.tso_max
    pace = sk.pacing_needed  # internal pacing (tcp_pacing): one departure per round
    if tso <= mss:
        maxseg = mss
    elif pace:
        maxseg = tcp_pacing.tcp_tso_autosize(sk, mss, tso)  # about 1 ms of the rate
    else:
        maxseg = (tso // mss) * mss
    burst = XMIT_BURST and sk.ts_ok and not sack_opts
    if sk.urg_mode or sk.ecn_flags & tcp_ecn.TCP_ECN_QUEUE_CWR:
        # Each segment's urgent pointer is its own (tcp_transmit), and a CWR owed
        # goes on one plain segment (tcp_ecn_send): no burst, no GSO.
        maxseg = mss
        burst = False
    cc = sk.cc
    una = sk.snd_una
    sent = 0
    win = -1
    sndq = sk.sndq
    idle = sk.snd_max == una  # nothing in flight (the rate sampler starts a new flight)
    if idle and sk.lsndtime >= 0 and now - sk.lsndtime > sk.rto and cc:
        # RFC 5681 §4.1: after an idle period longer than the RTO, restart from IW.
        cc.on_idle_restart(now, now - sk.lsndtime, sk.rto)
    while True:
        if pace and tcp_pacing.tcp_pacing_check(sh, sk, now):
            break  # the next departure is later: the pacing timer sends it
        nxt = sk.snd_nxt
        sent_off = (nxt - una) & MASK
        avail = sk.sndq_len - sent_off
        if avail <= 0:
            if sk.shut_wr and avail == 0 and not (sk.fin_sent and nxt != sk.fin_seq):
                _send_fin(sh, sk, nxt, now)
                sent += 1
            break
        in_flight = sent_off
        if quota < 0:
            assert cc is not None  # data to send: synchronized (tcp_init_transfer)
            cwnd_room = cc.cwnd * sk.mss_cache - in_flight
            if sk.dupacks:
                # RFC 3042 limited transmit: the first two dup ACKs each allow one
                # new segment beyond cwnd, to keep the ACK clock for fast retransmit.
                cwnd_room += min(sk.dupacks, 2) * mss
        else:
            left = quota - sent
            cwnd_room = -(-left // mss) * mss if left > 0 else 0  # whole segments (Linux PRR)
        wnd_room = ((una + sk.snd_wnd - nxt) & MASK)
        if wnd_room & HALF:
            wnd_room = 0
        if burst and maxseg < avail and maxseg <= wnd_room and maxseg <= cwnd_room:
            # Full segments that are not the last of the queue: the loop below
            # would send each with flags ACK alone and no SWS/Nagle question, so
            # they go out as one burst (``_xmit_burst``), the rest below.
            count = (avail - 1) // maxseg
            if count > wnd_room // maxseg:
                count = wnd_room // maxseg
            if count > cwnd_room // maxseg:
                count = cwnd_room // maxseg
            if pace:
                count = 1
            win = _xmit_burst(sh, sk, nxt, sent_off, count, maxseg, mss, win, now)
            took = count * maxseg
            sent += took
            if pace:
                tcp_pacing.tcp_update_skb_after_send(sk, took, now)
            if took == wnd_room or took >= cwnd_room:
                break  # no room left: the next round would stop (data in flight, no persist)
            continue
        size = avail
        if size > maxseg:
            size = maxseg
        if size > wnd_room:
            size = wnd_room
        if size > cwnd_room:
            size = cwnd_room
        if size <= 0:
            if wnd_room == 0 and in_flight == 0:
                _arm_persist(sh, sk, now)
            break
        if size < mss:
            if size < avail:
                # Window or cwnd cut the segment short: sender SWS avoidance
                # (RFC 9293 §3.8.6.2.1): send only if it is at least half the
                # largest window the peer offered, or nothing is in flight.
                if size == cwnd_room or (in_flight and size < (sk.max_window >> 1)):
                    if in_flight == 0 and sk.snd_wnd == 0:
                        _arm_persist(sh, sk, now)
                    break
            elif (in_flight and not sk.nodelay and not sk.shut_wr and not sk.urg_mode
                  and 0 < ((sk.snd_sml - una) & MASK) < HALF
                  and ((nxt - sk.snd_sml) & MASK) < HALF):
                # Nagle (RFC 9293 §3.7.4) in Minshall's variant, as Linux
                # (tcp_nagle_check, tcp_minshall_check): hold a small segment only
                # while an earlier small one (ending at snd_sml, in (una, nxt]) is
                # unacknowledged, so a bulk write's tail goes at once.
                break
            elif sk.cork and not sk.shut_wr and not sk.urg_mode:
                # TCP_CORK (Linux tcp_nagle_check, TCP_NAGLE_CORK): the partial
                # tail waits whatever is in flight; with nothing in flight the
                # probe timer bounds the wait (tcp_check_probe_timer).
                if in_flight == 0:
                    _arm_persist(sh, sk, now)
                break
            sk.snd_sml = (nxt + size) & MASK
        last = size == avail
        flags = ACK | PSH if last else ACK
        fin = last and sk.shut_wr
        if fin:
            flags |= FIN
        # The payload: a view into the first chunk when it holds the range (the
        # common case: applications write large buffers), else ``_sndq_slice``.
        chunk = sndq[0]
        off = sk.sndq_head_off + sent_off
        payload: bytes | memoryview
        if off + size <= len(chunk):
            payload = chunk[off:off + size]
        else:
            payload = _sndq_slice(sk, sent_off, size)
        if size > mss:
            # A super-segment goes to the device's GSO, which marks it NEEDS_CSUM
            # anyway: with tx_csum_offload its 64 KiB payload is never summed here.
            tcp_transmit(sh, sk, nxt, flags, payload, now, sh.cfg.tx_csum_offload, win)
            sh.gso_marks.append((len(sh.frames) - 1, mss))
            extra = (size - 1) // mss  # the segments GSO makes of it (tcp_skb_pcount)
            sk.segs_out += extra
            sk.data_segs_out += extra
        else:
            tcp_transmit(sh, sk, nxt, flags, payload, now, False, win)
        if pace:
            tcp_pacing.tcp_update_skb_after_send(sk, size, now)
        # The window field of the whole burst: the receive side cannot change
        # while we send, so tcp_select_window would only repeat itself.
        win = sk.rcv_wnd >> sk.rcv_wscale
        sent += size
        end = (nxt + size) & MASK
        if fin:
            sk.fin_sent = True
            sk.fin_seq = end
            end = (end + 1) & MASK
        if not sk.ts_ok and sk.rtt_seq < 0 and sk.snd_max == nxt:
            sk.rtt_seq = end
            sk.rtt_time = now
        sk.snd_nxt = end
        if ((end - sk.snd_max) & MASK) < HALF:
            sk.snd_max = end
        if last and (fin or not pace):
            # The queue is all sent: the next round would only find nothing
            # available and no FIN owed (a paced socket goes round for the
            # pacing check, which may arm its timer).
            break
    if sk.sndq_len and quota < 0:
        _chrono_note(sk, mss, now)  # tcp_chrono: busy / rwnd- / sndbuf-limited
    if sent:
        sk.lsndtime = now
        if not sk.pingpong and sk.ato and now - sk.lrcvtime < sk.ato:
            # A reply (Linux tcp_event_data_sent): interactive from the first;
            # once there, the count has nothing more to decide.
            tcp_delack.enter_pingpong_mode(sk)
        _tx_log_add(sk, una, idle, now)
        timers = sk.timers
        rtx = timers[_RETRANSMIT]
        if (rtx is None or timers[_TLP] is not None) and sk.snd_max != una:
            # Linux tcp_event_new_data_sent: the RTO restarts from new data
            # while a loss probe is pending (one timer serves both there).
            rto = sk.rto  # tcp_rto(sk) without the call when there is no backoff
            if sk.backoff or rto > TCP_RTO_MAX:
                rto = tcp_rto(sk)
            rtx = now + rto
            timers[_RETRANSMIT] = rtx
            q = sk.timer_q[_RETRANSMIT]
            if q is None or q > rtx:  # TimerHeap.arm's lazy rule, without the call
                sh.timers.arm(sk, _RETRANSMIT, rtx)
        if sk.sack_ok and quota < 0 and rtx is not None:
            # RFC 8985 §7.2: (re)start the probe timer on new data, from the
            # newest segment (Linux tcp_write_xmit), never past the RTO.
            tcp_recovery.tcp_schedule_loss_probe(sh, sk, now, rtx - now)
    return sent


def _tx_log_add(sk: TcpSock, una: int, idle: bool, now: float) -> None:
    """Record a transmission burst that ended at SND.NXT in ``tx_log``: its
    send time for RACK (RFC 8985 §6.2 orders by it) and the rate sampler's
    snapshot (Linux ``tcp_rate_skb_sent``: what every skb of the burst would
    carry).  ``idle``: nothing was in flight before it, so a new flight, and
    the sampler's send and delivery clocks, start now.  One entry per burst,
    not per segment; acknowledged bursts are dropped here."""
    if idle:
        sk.first_tx_mstamp = sk.delivered_mstamp = now
    if sk.rtx_log:
        # After a retransmission recorded at this instant: just after it (RACK's order).
        now = tcp_recovery.tcp_rack_new_data_time(sk, now)
    app = sk.app_limited
    if app and 0 < ((sk.delivered - app) & MASK) < HALF:
        sk.app_limited = 0  # the app-limited bubble is delivered and gone (tcp_rate_gen)
    log = sk.tx_log
    end = sk.snd_nxt
    if log:
        if log[-5] == now:
            # The same moment: the same burst, for RACK one send time.  (ACKs
            # handled in between, in one batch, leave its older snapshot: a
            # sample over a slightly longer interval, never a faster one.)
            log[-6] = end
            return
        if log[-6] == una:  # all of it acknowledged (request/response)
            log[:] = (end, now, sk.delivered, sk.delivered_mstamp, sk.first_tx_mstamp,
                      1 if sk.app_limited else 0)
            return
        i = 0
        n = len(log)
        while i < n and ((una - log[i]) & MASK) < HALF:
            i += TX_LOG_STRIDE
        # The latest-delivered data's send time (Linux first_tx_mstamp), as the
        # burst holding SND.UNA - 1 says: the in-order path samples once a round
        # trip (tcp_input), so no ACK may have recorded it.
        if i and (i >= n or log[i - TX_LOG_STRIDE] == una):
            t = log[i - TX_LOG_STRIDE + 1]
        else:
            t = log[i + 1] if i < n else 0.0
        if t > sk.first_tx_mstamp:
            sk.first_tx_mstamp = t
        if i:
            del log[:i]
    log += (end, now, sk.delivered, sk.delivered_mstamp, sk.first_tx_mstamp,
            1 if sk.app_limited else 0)


#: Module switch for ``_xmit_burst`` (tests turn it off to compare with per-segment sends).
XMIT_BURST = True


def _xmit_burst(sh: Shard, sk: TcpSock, nxt: int, sent_off: int, count: int, size: int, mss: int,
                win: int, now: float) -> int:
    """Send ``count`` segments of ``size`` bytes from ``nxt`` (``sent_off``
    bytes past SND.UNA), flags ACK, timestamps on, no SACK blocks: exactly
    what ``count`` calls of :func:`tcp_transmit` would queue, with what does
    not change between them (ACK, window, timestamps, lengths, both
    checksums' constant parts) computed once.  ``size`` > ``mss`` makes
    GSO super-segments.  Returns the window field used."""
    if win < 0:
        win = tcp_select_window(sk)
    ack = sk.rcv_nxt
    tsval = (int(now * 1000) + sk.ts_off) & MASK
    tsecr = sk.ts_recent
    total = 52 + size
    base = sk.tx_csum or _tx_csum_init(sk)
    flags = ACK
    tos = 0
    if sk.ecn_flags:  # new data: ECT(0), ECE if owed (the caller kept a queued CWR out)
        flags, tos = tcp_ecn.tcp_ecn_send(sk, nxt, flags, size)
    ipsum = -(sk.tx_ipsum + total + tos) % 0xFFFF
    src = sk.laddr
    dst = sk.raddr
    gso = size > mss
    partial = gso and sh.cfg.tx_csum_offload
    if partial:
        t_field = (src + dst + 38 + size) % 0xFFFF or 0xFFFF
    t_base = base + size + ack + (0x8000 | flags) + win + tsval + tsecr
    sport = sk.lport
    dport = sk.rport
    frames = sh.frames
    append = frames.append
    chunk = sk.sndq[0]
    n = len(chunk)
    off = sk.sndq_head_off + sent_off
    seq = nxt
    if dst <= 0xFFFFFFFF:
        for _ in range(count):
            end = off + size
            payload = chunk[off:end] if end <= n else _sndq_slice(sk, sent_off, size)
            if not partial:
                t_field = -(t_base + seq + sum16(payload)) % 0xFFFF
            append(b"".join((_pack_ts_hdr(0x45, tos, total, 0, 0x4000, 64, 6, ipsum, src, dst,
                                          sport, dport, seq, ack, 0x80, flags, win, t_field, 0,
                                          _TS_WORD, tsval, tsecr), payload)))
            if gso:
                sh.gso_marks.append((len(frames) - 1, mss))
            seq = (seq + size) & MASK
            sent_off += size
            off = end
    else:
        # IPv6: the network header is the same for the whole burst (tcp_h.V4_ADDR_MAX).
        ip6 = _pack_ip6(0x60000000 | tos << 20 | sk.flowlabel, 32 + size, 6, 64, src >> 64,
                        src & _M64, dst >> 64,
                        dst & _M64)
        for _ in range(count):
            end = off + size
            payload = chunk[off:end] if end <= n else _sndq_slice(sk, sent_off, size)
            if not partial:
                t_field = -(t_base + seq + sum16(payload)) % 0xFFFF
            append(b"".join((ip6, _pack_tcp_ts(sport, dport, seq, ack, 0x80, flags, win, t_field,
                                               0, _TS_WORD, tsval, tsecr), payload)))
            if gso:
                sh.gso_marks.append((len(frames) - 1, mss))
            seq = (seq + size) & MASK
            sent_off += size
            off = end
    sh.stats.segs_out += count
    if size < sk.seg_min:
        sk.seg_min = size
    pcount = count * ((size - 1) // mss + 1)
    sk.segs_out += pcount
    sk.data_segs_out += pcount
    if sk.quickack and sk.unacked_rcv:
        tcp_delack.tcp_dec_quickack_mode(sk)
    sk.unacked_rcv = 0  # tcp_event_ack_sent
    sk.ack_now = False
    sk.timers[_DELACK] = None
    sk.snd_nxt = seq
    if ((seq - sk.snd_max) & MASK) < HALF:
        sk.snd_max = seq
    return win


def tcp_xmit_retransmit_queue(sh: Shard, sk: TcpSock, now: float) -> None:
    """Loss recovery transmission (Linux ``tcp_xmit_retransmit_queue``, RFC 6675 §5 NextSeg).

    Lost holes first, in sequence order, then new data; in fast recovery as
    much as PRR's ``prr_quota`` allows, after an RTO as much as cwnd - pipe.
    A retransmission never covers SACKed data (it stops at the next SACKed
    block) nor cumulatively acknowledged data (it starts at or after SND.UNA).
    """
    cc = sk.cc
    assert cc is not None  # recovering: synchronized (tcp_init_transfer)
    recovery = sk.in_recovery
    if recovery:
        quota = sk.prr_quota
    else:
        quota = cc.cwnd * sk.mss_cache - tcp_input.tcp_pipe(sk)
    mss = tcp_current_mss(sk)
    una = sk.snd_una
    pace = sk.pacing_needed
    for _ in range(4096):  # bounded: one segment per round
        if quota <= 0:
            break
        if pace and tcp_pacing.tcp_pacing_check(sh, sk, now):
            break  # retransmissions are paced too (Linux tcp_xmit_retransmit_queue)
        again = False
        hole = _next_relost(sk, mss) if sk.relost else None
        if hole is not None:
            again = True
        else:
            hole = _next_hole(sk, mss)
            if hole is None:
                break
        seq, size = hole
        end = tcp_retransmit_skb(sh, sk, seq, now, size)
        n = (end - seq) & MASK
        if n == 0:
            break
        if pace:
            tcp_pacing.tcp_update_skb_after_send(sk, n, now)
        if not again:
            sk.retrans_hi = end
        # RACK: when it left (RFC 8985 §6.2), after new data sent at this instant.
        sk.rtx_log.append([seq, end, sk.snd_max, tcp_recovery.tcp_rack_sent_time(sk, now)])
        quota -= n
        sk.prr_out += n
        if seq == una:
            # The head went again: give it a full RTO (Linux tcp_xmit_retransmit_queue).
            sh.timers.arm(sk, _RETRANSMIT, now + tcp_rto(sk))
    if quota > 0:
        n = tcp_write_new(sh, sk, now, quota)
        quota -= n
        sk.prr_out += n
    if recovery:
        sk.prr_quota = quota if quota > 0 else 0


def _next_relost(sk: TcpSock, mss: int) -> tuple[int, int] | None:
    """The first un-SACKed, unacknowledged piece of a retransmission found lost."""
    una = sk.snd_una
    q = sk.relost
    while q:
        s, e = q[0]
        if ((s - una) & MASK) & HALF:
            s = una
        if not 0 < ((e - s) & MASK) < HALF:
            del q[0]
            continue
        end_off = (e - una) & MASK
        start = (s - una) & MASK
        sacked = sk.sacked
        for k in range(tcp_input.sacked_from(sk, una, start), len(sacked)):
            b = sacked[k]
            lo = (b[0] - una) & MASK
            if lo >= end_off:
                break
            hi = (b[1] - una) & MASK
            if hi <= start:
                continue
            if lo <= start:
                start = hi
                continue
            end_off = lo
            break
        if start >= end_off:
            del q[0]
            continue
        size = end_off - start
        if size > mss:
            size = mss
        seq = (una + start) & MASK
        nxt = (seq + size) & MASK
        if nxt == e or ((e - nxt) & MASK) & HALF:
            del q[0]
        else:
            q[0] = [nxt, e]
        return seq, size
    return None


def _next_hole(sk: TcpSock, mss: int) -> tuple[int, int] | None:
    """RFC 6675 NextSeg rule (1): the first un-SACKed, lost, not yet retransmitted range.

    Returns (seq, size) with size <= mss and the range ending before the next
    SACKed block and before ``lost_hi``; None when there is none.
    """
    una = sk.snd_una
    lost = (sk.lost_hi - una) & MASK
    if lost == 0 or lost & HALF:
        return None
    start = (sk.retrans_hi - una) & MASK
    if start & HALF:
        start = 0
    if start >= lost:
        return None
    end = lost
    sacked = sk.sacked
    for k in range(tcp_input.sacked_from(sk, una, start), len(sacked)):
        b = sacked[k]
        lo = (b[0] - una) & MASK
        if lo >= end:
            break
        hi = (b[1] - una) & MASK
        if hi <= start:
            continue
        if lo <= start:
            start = hi  # inside a SACKed block: skip past it
            if start >= end:
                return None
            continue
        end = lo  # the hole ends where SACKed data begins
        break
    size = end - start
    return (una + start) & MASK, size if size < mss else mss


def _send_fin(sh: Shard, sk: TcpSock, seq: int, now: float) -> None:
    tcp_transmit(sh, sk, seq, FIN | ACK, b"", now)
    sk.fin_sent = True
    sk.fin_seq = seq
    end = (seq + 1) & MASK
    sk.snd_nxt = end
    if ((end - sk.snd_max) & MASK) < HALF:
        sk.snd_max = end


def _arm_persist(sh: Shard, sk: TcpSock, now: float) -> None:
    """Zero window with data waiting and nothing in flight (RFC 9293 §3.8.6.1)."""
    if sk.timers[_PERSIST] is None:
        sh.timers.arm(sk, _PERSIST, now + tcp_rto(sk))


def tcp_retransmit_skb(sh: Shard, sk: TcpSock, seq: int, now: float, limit: int = 0) -> int:
    """Retransmit one segment (at most ``limit`` bytes if given) starting at ``seq``;
    returns the sequence after it."""
    mss = tcp_current_mss(sk)
    if 0 < limit < mss:
        mss = limit
    off = (seq - sk.snd_una) & MASK
    avail = sk.sndq_len - off
    if avail <= 0:
        if sk.fin_sent and seq == sk.fin_seq:
            sh.stats.retrans_segs += 1
            sk.total_retrans += 1
            if sk.undo_active:
                sk.undo_retrans += 1
            tcp_transmit(sh, sk, seq, FIN | ACK, b"", now)
            return (seq + 1) & MASK
        return seq
    sh.stats.retrans_segs += 1
    sk.total_retrans += 1
    if sk.undo_active:
        sk.undo_retrans += 1
    size = avail if avail < mss else mss
    sk.bytes_retrans += size  # Linux tcp_retransmit_skb: tp->bytes_retrans
    flags = ACK | PSH if size == avail else ACK
    if size == avail and sk.fin_sent:
        flags |= FIN
    tcp_transmit(sh, sk, seq, flags, _sndq_slice(sk, off, size), now)
    return (seq + size + (1 if flags & FIN else 0)) & MASK


def tcp_fin_state(sk: TcpSock) -> State:
    """The state after queueing our FIN (RFC 9293 §3.10.4 CLOSE)."""
    return TCP_LAST_ACK if sk.state is TCP_CLOSE_WAIT else TCP_FIN_WAIT1
