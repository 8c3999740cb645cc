"""Request socks becoming sockets, and TIME-WAIT (Linux ``net/ipv4/tcp_minisocks.c``).

Why TIME-WAIT (RFC 9293 §3.6.1, RFC 1337): the side that closes first keeps
the 4-tuple for 2*MSL so that (1) a lost final ACK can be re-sent when the
peer retransmits its FIN, and (2) old duplicates of this connection cannot be
taken for data of a new incarnation.  Like Linux we hold it for 60 s, let an
RST end it early (Linux's default, ``net.ipv4.tcp_rfc1337 = 0``), and let a
new SYN whose sequence number (or timestamp) is beyond the old connection's
recycle it at once (RFC 6191), with an ISN beyond the old SND.NXT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import (
    inet_connection_sock,
    inet_hashtables,
    tcp,
    tcp_ecn,
    tcp_input,
    tcp_ipv4,
    tcp_ipv6,
    tcp_output,
)
from .dropreason import DropReason
from .tcp_h import (
    HALF,
    MASK,
    TCP_SYN_RECV,
    TCP_TIME_WAIT,
    TCP_TIMEWAIT_LEN,
    V4_ADDR_MAX,
    RequestSock,
    TcpSegment,
    TcpSock,
    TimerKind,
)
from .wire.tcp import ACK, FIN, RST, SYN, build_tcp_options

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["tcp_time_wait", "tcp_timewait_state_process", "tcp_check_req",
           "tcp_create_openreq_child", "TW_SYN", "TW_ACK", "TW_DROP"]

TW_DROP, TW_ACK, TW_SYN = 0, 1, 2


def tcp_time_wait(sh: Shard, sk: TcpSock, now: float) -> None:
    """Enter TIME-WAIT: keep only the 4-tuple, the port and the TIME-WAIT timer."""
    tcp.tcp_set_state(sh, sk, TCP_TIME_WAIT)
    timers = sk.timers
    for i in range(len(timers)):
        timers[i] = None
    sh.timers.arm(sk, TimerKind.TIME_WAIT, now + TCP_TIMEWAIT_LEN)
    sk.sndq.clear()
    sk.sndq_len = 0
    if sk.orphan:
        tcp.sk_release(sh, sk)


def tcp_timewait_state_process(sh: Shard, tw: TcpSock, seg: TcpSegment, now: float) -> int:
    """A segment for a TIME-WAIT socket; returns TW_SYN when a new SYN may reuse the tuple."""
    flags = seg.flags
    ts = seg.options.ts
    # PAWS against the connection's TS.Recent (RFC 7323 §5.3, Linux tcp_paws_reject):
    # an RST is let through once TS.Recent is older than TCP_PAWS_MSL.
    paws_reject = (tw.ts_ok and ts is not None and tw.ts_recent != 0
                   and 0 < ((tw.ts_recent - ts[0]) & MASK) < HALF
                   and not (flags & RST and now - tw.ts_recent_stamp >= TCP_PAWS_MSL))
    if flags & RST:
        if not paws_reject and seg.seq == tw.rcv_nxt:
            sh.stats.drop(DropReason.TCP_RESET)
            tcp.tcp_done(sh, tw)  # TIME-WAIT assassination, as Linux with tcp_rfc1337 = 0
        else:
            # Linux kills a TIME-WAIT socket only with an RST at exactly RCV.NXT
            # (RFC 5961 §3.2's rule); a blind one is dropped.
            sh.stats.drop(DropReason.TCP_PAWS if paws_reject
                          else DropReason.TCP_INVALID_SEQUENCE)
        return TW_DROP
    if paws_reject:
        # An old duplicate: ACK it (rate limited) and keep the full 2*MSL
        # (Linux LINUX_MIB_PAWS_TW_REJECTED).
        sh.stats.drop(DropReason.TCP_PAWS)
        sh.timers.arm(tw, TimerKind.TIME_WAIT, now + TCP_TIMEWAIT_LEN)
        _tw_ack(sh, tw, now)
        return TW_ACK
    if flags & SYN and not flags & ACK:
        newer_seq = 0 < ((seg.seq - tw.rcv_nxt) & MASK) < HALF
        newer_ts = tw.ts_ok and ts is not None and 0 < ((ts[0] - tw.ts_recent) & MASK) < HALF
        if newer_seq or newer_ts:
            sh.stats.tw_recycled += 1
            tcp.tcp_done(sh, tw)
            return TW_SYN
    if flags & FIN and ((seg.seq + len(seg.payload) + 1) & MASK) == tw.rcv_nxt:
        # The peer lost our final ACK: ACK its retransmitted FIN, restart the clock.
        tcp_output.tcp_send_ack(sh, tw, now)
        sh.timers.arm(tw, TimerKind.TIME_WAIT, now + TCP_TIMEWAIT_LEN)
        return TW_ACK
    if seg.payload or flags & (SYN | FIN):
        _tw_ack(sh, tw, now)
        sh.stats.drop(DropReason.TCP_TIMEWAIT)
        return TW_ACK
    sh.stats.drop(DropReason.TCP_TIMEWAIT)
    return TW_DROP


#: Linux TCP_PAWS_MSL: after this long without a timestamp, an RST is not PAWS-checked.
TCP_PAWS_MSL = 60.0


def _tw_ack(sh: Shard, tw: TcpSock, now: float) -> None:
    """ACK an out-of-window segment in TIME-WAIT, at most once per 500 ms (Linux
    ``tcp_timewait_check_oow_rate_limit``): a peer cannot make a TIME-WAIT socket
    answer every packet it sends."""
    if tw.last_oow_ack >= 0 and now - tw.last_oow_ack < tcp_input.OOW_RATELIMIT:
        return
    tw.last_oow_ack = now
    tcp_output.tcp_send_ack(sh, tw, now)


def tcp_check_req(sh: Shard, req: RequestSock, seg: TcpSegment, now: float) -> TcpSock | None:
    """A segment for a request sock (Linux ``tcp_check_req``); the child on success."""
    if sh.tracing:
        sh.tr("tcp_check_req")
        sh.tr("tcp_parse_options")
    flags = seg.flags
    ts = seg.options.ts
    if sh.tracing:
        sh.tr("tcp_paws_reject")
    paws_reject = (req.ts_ok and ts is not None and not flags & RST
                   and ((ts[0] - req.ts_recent) & MASK) & HALF)
    if seg.seq == req.irs and flags & (SYN | ACK | RST) == SYN and not paws_reject:
        # A retransmitted SYN: our SYN-ACK was lost; send it again (RFC 9293 §3.10.7.2).
        tcp_ipv4.tcp_v4_send_synack(sh, req, now)
        return None
    if flags & ACK and seg.ack != ((req.iss + 1) & MASK):
        # Not our SYN-ACK being acknowledged: the listener answers with RST.
        sh.stats.drop(DropReason.TCP_ACK_UNSENT_DATA)
        tcp_output.tcp_send_reset(sh, req.laddr, req.lport, req.raddr, req.rport, seg)
        return None
    if sh.tracing:
        sh.tr("tcp_in_window")
    rcv_nxt = (req.irs + 1) & MASK
    off = (seg.seq - rcv_nxt) & MASK
    in_window = off <= req.rcv_wnd or ((seg.seq + len(seg.payload) - rcv_nxt) & MASK) == 0
    if paws_reject or not in_window:
        if not flags & RST:
            _req_send_ack(sh, req, now)
        sh.stats.drop(DropReason.TCP_PAWS if paws_reject else DropReason.TCP_INVALID_SEQUENCE)
        return None
    if flags & RST:
        sh.stats.drop(DropReason.TCP_RESET)
        inet_connection_sock.inet_csk_reqsk_queue_drop(sh.h, req)
        return None
    if flags & SYN:
        # RFC 5961 §4.2 would challenge; for an embryonic connection Linux resets it.
        sh.stats.drop(DropReason.TCP_INVALID_SYN)
        tcp_output.tcp_send_reset(sh, req.laddr, req.lport, req.raddr, req.rport, seg)
        inet_connection_sock.inet_csk_reqsk_queue_drop(sh.h, req)
        return None
    if not flags & ACK:
        sh.stats.drop(DropReason.TCP_FLAGS_NOACK)
        return None
    if ts is not None and req.ts_ok and ((ts[0] - req.ts_recent) & MASK) < HALF:
        req.ts_recent = ts[0]
    listener = req.listener
    if req.raddr > V4_ADDR_MAX:
        child = tcp_ipv6.tcp_v6_syn_recv_sock(sh, listener, req, seg, now)
    else:
        child = tcp_ipv4.tcp_v4_syn_recv_sock(sh, listener, req, seg, now)
    if child is None:
        # Accept queue full (Linux listen_overflow with tcp_abort_on_overflow = 0):
        # drop this ACK and let the SYN-ACK timer make the peer try again.
        sh.stats.drop(DropReason.TCP_LISTEN_OVERFLOW)
        sh.stats.listen_overflows += 1
        return None
    if sh.tracing:
        sh.tr("tcp_synack_rtt_meas")
    if req.num_retrans == 0:  # Karn: no sample from a retransmitted SYN-ACK
        if sh.tracing:
            sh.tr("skb_mstamp_us_delta")
        tcp_input.tcp_ack_update_rtt(sh, child, now - req.synack_time, now)
    inet_connection_sock.inet_csk_complete_hashdance(sh.h, listener, req, child)
    return child


def _req_send_ack(sh: Shard, req: RequestSock, now: float) -> None:
    ts = ((int(now * 1000) + req.ts_off) & MASK, req.ts_recent) if req.ts_ok else None
    opts = build_tcp_options(ts=ts) if ts else b""
    sh.frames.append(tcp_output.tcp_build_frame(
        req.laddr, req.raddr, req.lport, req.rport, (req.iss + 1) & MASK, (req.irs + 1) & MASK,
        ACK, tcp_output.tcp_reqsk_window(req.rcv_wnd, req.rcv_wscale), opts))
    sh.stats.segs_out += 1


def tcp_create_openreq_child(sh: Shard, listener: TcpSock, req: RequestSock, seg: TcpSegment,
                             now: float) -> TcpSock:
    """A full socket from a request sock and the final ACK (Linux ``tcp_create_openreq_child``)."""
    if sh.tracing:
        sh.tr("tcp_create_openreq_child")
        sh.tr("inet_csk_clone_lock")
        sh.tr("sk_clone_lock")
        sh.tr("sk_prot_alloc")
    sk = sh.new_sock()
    # Inherited socket options, spelled out: a getattr/setattr loop costs ~1.5 µs
    # per handshake.
    sk.reuseaddr = listener.reuseaddr
    sk.reuseport = listener.reuseport
    sk.nodelay = listener.nodelay
    sk.keepalive = listener.keepalive
    sk.keepidle = listener.keepidle
    sk.keepintvl = listener.keepintvl
    sk.keepcnt = listener.keepcnt
    sk.linger = listener.linger
    sk.user_mss = listener.user_mss
    sk.rcvbuf = listener.rcvbuf
    sk.rcvbuf_locked = listener.rcvbuf_locked
    sk.sndbuf = listener.sndbuf
    sk.cc_name = listener.cc_name
    # Linux clones the listener (sk_clone_lock), so per-socket TCP settings carry over.
    sk.user_timeout = listener.user_timeout
    sk.syn_count = listener.syn_count
    sk.linger2 = listener.linger2
    sk.window_clamp = listener.window_clamp
    sk.family = listener.family  # an AF_INET6 listener's IPv4 children are v4-mapped
    sk.v6only = listener.v6only
    tcp.tcp_set_state(sh, sk, TCP_SYN_RECV)
    sk.laddr, sk.lport, sk.raddr, sk.rport = req.laddr, req.lport, req.raddr, req.rport
    sk.parent = listener
    sk.iss = req.iss
    sk.snd_una = sk.snd_nxt = sk.snd_max = sk.snd_sml = (req.iss + 1) & MASK
    sk.snd_wl1 = req.irs
    sk.snd_wl2 = sk.snd_una
    sk.irs = req.irs
    sk.rcv_nxt = sk.rcv_wup = (req.irs + 1) & MASK
    sk.rcv_wnd = req.rcv_wnd
    sk.wscale_ok = req.wscale_ok
    sk.snd_wscale = req.snd_wscale
    sk.rcv_wscale = req.rcv_wscale
    sk.sack_ok = req.sack_ok
    sk.ts_ok = req.ts_ok
    sk.ts_recent = req.ts_recent
    sk.ts_recent_stamp = now
    sk.ts_off = req.ts_off
    tcp_ecn.tcp_ecn_openreq_child(sk, req)
    sk.segs_in = 1  # the SYN (Linux tcp_create_openreq_child; the final ACK is not counted)
    if sh.tracing:
        sh.tr("tcp_init_xmit_timers")
    return sk


def tcp_child_inherit_port(sh: Shard, listener: TcpSock, child: TcpSock) -> None:
    """Linux ``__inet_inherit_port``: the child shares the listener's bind bucket."""
    if sh.tracing:
        sh.tr("__inet_inherit_port")
    tb = sh.h.bhash[listener.lport]
    inet_hashtables.inet_bind_hash(sh.h, child, tb, listener.lport)


def tcp_child_hash(sh: Shard, child: TcpSock, req: RequestSock) -> None:
    """The child takes the request sock's place in ehash (Linux ``inet_ehash_nolisten``)."""
    inet_hashtables.inet_ehash_nolisten(sh.h, child, req)
