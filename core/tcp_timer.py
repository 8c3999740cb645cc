"""All TCP timers of a shard in one heap (Linux ``tcp_timer.c``).

Timers are data, not callbacks (smoltcp ``Timer``): each socket holds one
deadline per :class:`TimerKind` in ``sk.timers`` (None: idle); the shard keeps
a single heap of ``(deadline, seq, kind, sock)`` entries.  Deadlines are
absolute times on the caller's clock (a worker passes ``time.monotonic()``,
one CLOCK_MONOTONIC for every process of a host), so ``tcp_migrate`` moves
them to another shard or process unchanged and they fire there at the same
instant; ``timer_seq``/``timer_q`` belong to this heap and are re-made.

Lazy deletion with a generation counter.  Each (sock, kind) has at most one
*representative* heap entry: its ``seq`` is ``sk.timer_seq[kind]`` and its
deadline ``sk.timer_q[kind]`` (None: no entry queued).  Every other entry of
that (sock, kind) is stale and is dropped when it surfaces.  The invariant is
``timer_q[kind] <= timers[kind]`` whenever both are set, so a representative
never surfaces after its timer is due:

* cancelling only clears ``timers[kind]`` (callers may also write None into
  the list directly, which is what the per-segment fast path does); the entry
  stays, so a later re-arm costs nothing;
* re-arming at or *after* the queued deadline (the common case: every ACK
  pushes the retransmit deadline forward, every request/response round trip
  cancels and re-arms it) touches nothing; the entry surfaces at the old
  deadline, sees the later one and re-queues itself once;
* only arming *earlier* than the queued entry pushes a new one (the old one
  becomes stale).

So a long-lived connection keeps at most one entry per timer kind no matter
how many round trips it makes.  Stale entries (earlier re-arms) and entries of
cancelled timers on dead sockets are bounded by compaction: when the heap
outgrows twice its size after the last compaction (and at least
``COMPACT_MIN``), it is rebuilt from the representatives whose timer is
still armed, O(n) every n pushes, so amortised O(1).
"""

from __future__ import annotations

import errno
import heapq
from typing import TYPE_CHECKING, overload

from . import (
    inet_connection_sock,
    tcp,
    tcp_delack,
    tcp_ecn,
    tcp_ipv4,
    tcp_mtup,
    tcp_output,
    tcp_pacing,
    tcp_recovery,
)
from .tcp_h import (
    MASK,
    TCP_ORPHAN_RETRIES,
    TCP_RETRIES1,
    TCP_RETRIES2,
    TCP_RTO_MAX,
    TCP_RTO_MIN,
    TCP_SYN_RECV,
    TCP_SYN_RETRIES,
    TCP_SYN_SENT,
    TCP_SYNACK_RETRIES,
    TCP_TIMEOUT_INIT,
    RequestSock,
    State,
    TcpSock,
    TimerKind,
)

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["TimerKind", "TimerHeap", "tcp_timer_handler", "tcp_enter_loss", "tcp_write_timeout",
           "tcp_model_timeout", "retransmits_timed_out"]

#: What owns timers: a socket, or a request sock (its SYN-ACK timer).
TimerOwner = TcpSock | RequestSock



class TimerHeap:
    """One heap for every timer of every socket (and request sock) of a shard.

    A timer owner needs three lists of one slot per TimerKind: ``timers`` (deadline or None),
    ``timer_seq`` (the seq of its representative heap entry) and ``timer_q``
    (that entry's deadline, or None when none is queued).
    """

    __slots__ = ("heap", "count", "limit")

    #: Never compact a heap smaller than this.
    COMPACT_MIN = 64

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, TimerOwner]] = []
        self.count = 0
        self.limit = self.COMPACT_MIN

    def arm(self, sk: TimerOwner, kind: int, deadline: float) -> None:
        """Set (or move) ``sk``'s timer ``kind`` to fire at ``deadline``."""
        sk.timers[kind] = deadline
        q = sk.timer_q[kind]
        if q is not None and q <= deadline:
            return  # the queued entry surfaces first and re-queues itself
        self.count += 1
        sk.timer_seq[kind] = self.count
        sk.timer_q[kind] = deadline
        heap = self.heap
        heapq.heappush(heap, (deadline, self.count, kind, sk))
        if len(heap) > self.limit:
            self.compact()

    @staticmethod
    def cancel(sk: TimerOwner, kind: int) -> None:
        sk.timers[kind] = None

    @staticmethod
    def cancel_all(sk: TimerOwner) -> None:
        timers = sk.timers
        for i in range(len(timers)):
            timers[i] = None

    def compact(self) -> None:
        """Rebuild the heap from the representatives of armed timers."""
        keep = []
        for e in self.heap:
            sk = e[3]
            kind = e[2]
            if sk.timer_seq[kind] != e[1]:
                continue  # stale
            if sk.timers[kind] is None:
                sk.timer_q[kind] = None  # cancelled: forget the entry
                continue
            keep.append(e)
        heapq.heapify(keep)
        self.heap = keep
        self.limit = max(self.COMPACT_MIN, 2 * len(keep))

    def __len__(self) -> int:
        return len(self.heap)

    @overload
    def _settle(self, now: float) -> tuple[int, TimerOwner] | None: ...

    @overload
    def _settle(self, now: None) -> float | None: ...

    def _settle(self, now: float | None) -> tuple[int, TimerOwner] | float | None:
        """Drop stale entries and re-queue moved ones at the top of the heap.

        With ``now``: pop and return the first timer due by then as (kind, sock).
        Without: return the earliest armed deadline.
        """
        heap = self.heap
        while heap:
            deadline, seq, kind, sk = heap[0]
            if now is not None and deadline > now:
                return None
            if sk.timer_seq[kind] != seq:
                heapq.heappop(heap)  # stale: superseded by an earlier arm
                continue
            cur = sk.timers[kind]
            if cur is None:
                heapq.heappop(heap)  # cancelled
                sk.timer_q[kind] = None
                continue
            if cur > deadline:  # moved later: re-queue once, at the real deadline
                self.count += 1
                sk.timer_seq[kind] = self.count
                sk.timer_q[kind] = cur
                heapq.heapreplace(heap, (cur, self.count, kind, sk))
                continue
            if now is None:
                return deadline
            heapq.heappop(heap)
            sk.timers[kind] = None
            sk.timer_q[kind] = None
            return kind, sk
        return None

    def pop_due(self, now: float) -> tuple[int, TimerOwner] | None:
        """The next timer due at ``now`` as (kind, sock), its slot cleared; else None."""
        return self._settle(now)

    def next_deadline(self) -> float | None:
        return self._settle(None)


# -- what each timer does (Linux tcp_timer.c handlers) ------------------------------------

def tcp_timer_handler(sh: Shard, kind: int, sk: TimerOwner, now: float) -> None:
    """Run the expired timer ``kind`` of ``sk`` (a TcpSock or a RequestSock)."""
    if isinstance(sk, RequestSock):
        reqsk_timer_handler(sh, sk, now)  # a request sock has only the SYN-ACK timer
    elif kind == TimerKind.RETRANSMIT:
        tcp_retransmit_timer(sh, sk, now)
    elif kind == TimerKind.DELACK:
        tcp_delack_timer(sh, sk, now)
    elif kind == TimerKind.PERSIST:
        tcp_probe_timer(sh, sk, now)
    elif kind == TimerKind.KEEPALIVE:
        tcp_keepalive_timer(sh, sk, now)
    elif kind == TimerKind.TIME_WAIT:
        tcp.tcp_done(sh, sk)
    elif kind == TimerKind.REO:
        tcp_recovery.tcp_rack_reo_timeout(sh, sk, now)
    elif kind == TimerKind.TLP:
        tcp_recovery.tcp_send_loss_probe(sh, sk, now)
    elif kind == TimerKind.PACING:
        tcp_pacing.tcp_pace_kick(sh, sk, now)


def reqsk_timer_handler(sh: Shard, req: RequestSock, now: float) -> None:
    """Resend the SYN-ACK with exponential backoff; give up after tcp_synack_retries
    (5: 63 s), or the listener's TCP_SYNCNT (Linux ``reqsk_timer_handler``)."""
    if req.dead:
        return
    limit = req.listener.syn_count or TCP_SYNACK_RETRIES
    if req.num_retrans >= limit:
        inet_connection_sock.inet_csk_reqsk_queue_drop(sh.h, req)
        sh.stats.synack_timeouts += 1
        return
    req.num_retrans += 1
    sh.stats.retrans_segs += 1
    tcp_ipv4.tcp_v4_send_synack(sh, req, now)
    sh.timers.arm(req, TimerKind.SYNACK, now + (1.0 * (1 << req.num_retrans)))


# -- giving up (Linux tcp_write_timeout) -----------------------------------------------------
#
# Linux gives up on a connection by *time*, not by counting retransmissions:
# tcp_retries2 = 15 means "as long as 15 retransmissions would take if the RTO
# started at TCP_RTO_MIN (200 ms) and doubled up to TCP_RTO_MAX (120 s)",
# 924.6 s, measured from the first retransmission of the episode
# (``retrans_stamp``), checked each time the retransmission timer fires.  A
# connection with a 1 s RTO therefore retransmits fewer than 15 times, and one
# whose RTO is far below 200 ms more.  TCP_USER_TIMEOUT (RFC 5482) replaces
# that duration with the user's.  SYNs keep the count (tcp_syn_retries = 6:
# retries 1, 3, ..., 63 s after the first SYN, ETIMEDOUT at 1 + 2 + ... + 64 =
# 127 s), which the same model with a 1 s base reproduces exactly.

def _ms(t: float) -> int:
    """Seconds to whole milliseconds: Linux's clock for these comparisons."""
    return int(round(t * 1000.0))


def tcp_model_timeout(boundary: int, rto_base: float) -> float:
    """How long ``boundary`` retransmissions last when the RTO starts at
    ``rto_base`` and doubles up to TCP_RTO_MAX (Linux ``tcp_model_timeout``).

    ``tcp_model_timeout(15, 0.2)`` is 924.6 s; ``(6, 1.0)`` 127 s.
    """
    base = _ms(rto_base)
    rto_max = _ms(TCP_RTO_MAX)
    thresh = (rto_max // base).bit_length() - 1  # ilog2: doublings before the cap
    if boundary <= thresh:
        return ((2 << boundary) - 1) * base / 1000.0
    return (((2 << thresh) - 1) * base + (boundary - thresh) * rto_max) / 1000.0


def retransmits_timed_out(sk: TcpSock, boundary: int, timeout: float, now: float) -> bool:
    """Has the episode of retransmissions lasted ``timeout`` seconds (0: as long
    as ``boundary`` backed-off retransmissions would)?  Linux
    ``retransmits_timed_out``: false before the first retransmission."""
    syn = sk.state is TCP_SYN_SENT or sk.state is TCP_SYN_RECV
    if not (sk.syn_retries if syn else sk.retries) or sk.retrans_stamp is None:
        return False
    if not timeout:
        timeout = tcp_model_timeout(boundary, TCP_TIMEOUT_INIT if syn else TCP_RTO_MIN)
    return _ms(now - sk.retrans_stamp) >= _ms(timeout)


def tcp_orphan_retries(sk: TcpSock, alive: bool) -> int:
    """Retries for a socket nobody holds any more (Linux ``tcp_orphan_retries``,
    sysctl 0): 8 (~100 s at a 200 ms RTO) while the peer seems alive, else none."""
    return TCP_ORPHAN_RETRIES if alive else 0


def tcp_write_err(sh: Shard, sk: TcpSock) -> None:
    """Give up: the error is a soft error an ICMP reported, else ETIMEDOUT
    (Linux ``tcp_write_err``)."""
    tcp.tcp_done(sh, sk, sk.err_soft or errno.ETIMEDOUT)


def tcp_write_timeout(sh: Shard, sk: TcpSock, now: float) -> bool:
    """Decide, as the retransmission timer fires, whether to give up (Linux
    ``tcp_write_timeout``); if so the socket is closed with the error.

    SYN-SENT / SYN-RECEIVED: after TCP_SYNCNT (default tcp_syn_retries = 6)
    retransmissions (SYN-SENT: plus tcp_syn_linear_timeouts, Linux 6.18), or
    once as long has passed as that many backed-off ones would take (1+2+4...:
    127 s for 6, the rule that ends a connect first; Linux 6.18 on a veth
    with tcp_syn_retries 6: SYNs at 0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 69 s,
    ETIMEDOUT with the timer after it; TCP_SYNCNT 1: SYNs at 0, 1, 2 s,
    ETIMEDOUT at 3 s; TCP_SYNCNT 2: 0..5 s, ETIMEDOUT at 7 s).  Otherwise: when the episode has lasted TCP_USER_TIMEOUT,
    or, without it, tcp_model_timeout(tcp_retries2) = 924.6 s (orphans:
    tcp_orphan_retries, 102.2 s).  Past tcp_retries1 (3 s) Linux only asks
    routing for another path (``__dst_negative_advice``): we have one route.
    """
    st = sk.state
    if st is TCP_SYN_SENT or st is TCP_SYN_RECV:
        retry_until = sk.syn_count or TCP_SYN_RETRIES
        limit = retry_until + sh.cfg.syn_linear_timeouts if st is TCP_SYN_SENT else retry_until
        expired = sk.syn_retries >= limit
    else:
        if retransmits_timed_out(sk, TCP_RETRIES1, 0.0, now):
            tcp_mtup.tcp_mtu_probing(sh, sk, now)  # black-hole detection (RFC 4821)
            if sh.tracing:
                sh.tr("__dst_negative_advice")
        retry_until = TCP_RETRIES2
        if sk.orphan:
            retry_until = tcp_orphan_retries(sk, tcp_output.tcp_rto(sk) < TCP_RTO_MAX)
        expired = False
    if not expired:
        expired = retransmits_timed_out(sk, retry_until, sk.user_timeout / 1000.0, now)
    if expired:
        tcp_write_err(sh, sk)
    return expired


def tcp_clamp_rto_to_user_timeout(sk: TcpSock, rto: float, now: float) -> float:
    """Never wait past TCP_USER_TIMEOUT: the last timer fires when it ends
    (Linux ``tcp_clamp_rto_to_user_timeout``)."""
    ut = sk.user_timeout
    if not ut or sk.retrans_stamp is None:
        return rto
    remaining = ut / 1000.0 - (now - sk.retrans_stamp)
    if remaining <= 0:
        return 0.001  # Linux: one jiffy
    return rto if rto < remaining else remaining


def tcp_retransmit_timer(sh: Shard, sk: TcpSock, now: float) -> None:
    """RTO expiry (RFC 6298 (5.4)-(5.7)): give up (``tcp_write_timeout``) or resend
    the oldest segment, back off, collapse cwnd (Linux ``tcp_retransmit_timer``)."""
    st = sk.state
    if st is TCP_SYN_SENT or (st is TCP_SYN_RECV and sk.parent is None):
        if sk.retrans_stamp is None:
            sk.retrans_stamp = sk.rtt_time  # Linux tcp_connect stamps the first SYN
        if tcp_write_timeout(sh, sk, now):
            return
        sk.syn_retries += 1
        if st is not TCP_SYN_SENT or sk.syn_retries > sh.cfg.syn_linear_timeouts:
            sk.backoff += 1  # else the linear timer (Linux tcp_syn_linear_timeouts)
        sh.stats.retrans_segs += 1
        if st is TCP_SYN_SENT:
            tcp_output.tcp_send_syn(sh, sk, now)
        else:
            tcp_output.tcp_send_synack_sock(sh, sk, now)
        sh.timers.arm(sk, TimerKind.RETRANSMIT,
                      now + tcp_clamp_rto_to_user_timeout(sk, tcp_output.tcp_rto(sk), now))
        return
    if sk.snd_una == sk.snd_max:
        return
    if tcp_write_timeout(sh, sk, now):
        return
    if sk.retrans_stamp is None:
        sk.retrans_stamp = now  # Linux: stamped by the first retransmission
    sk.retries += 1
    tcp_enter_loss(sh, sk, now)
    sh.timers.arm(sk, TimerKind.RETRANSMIT,
                  now + tcp_clamp_rto_to_user_timeout(sk, tcp_output.tcp_rto(sk), now))


def tcp_enter_loss(sh: Shard, sk: TcpSock, now: float) -> None:
    """RTO: collapse cwnd and resend the lost flight (RFC 6298 (5.4)-(5.6); Linux
    ``tcp_enter_loss``).

    Everything outstanding and not SACKed is deemed lost; the SACK scoreboard
    is kept (as Linux does; reneging is detected on ACK), so SACKed data is
    never resent.  SND.NXT stays put: slow start from one segment refills the
    holes through ``tcp_xmit_retransmit_queue`` as ACKs come back, then new
    data follows.  Until the data outstanding now is acknowledged, dup ACKs
    start no fast recovery (RFC 6582 §4).
    """
    una = sk.snd_una
    first = not sk.in_loss
    sk.backoff += 1  # RFC 6298 (5.5)
    sk.rtos += 1
    sh.stats.rto_fires += 1
    if sk.cc is None:  # a FIN before ESTABLISHED: nothing to recover but the FIN
        tcp_output.tcp_retransmit_skb(sh, sk, una, now)
        return
    sk.cc.on_rto(now, ((sk.snd_max - una) & MASK) / sk.mss_cache)
    tcp_ecn.tcp_ecn_queue_cwr(sk)
    if sk.mtup_probe_size:
        tcp_mtup.tcp_mtup_lost(sh, sk)
    new_recovery = not sk.in_recovery and first
    sk.in_recovery = False
    sk.in_loss = True
    sk.timers[TimerKind.TLP] = None
    sk.timers[TimerKind.REO] = None
    sk.tlp_high_seq = -1  # Linux tcp_retransmit_timer: the probe's episode is over
    sk.recover = sk.snd_max
    sk.dupacks = 0
    sk.reno_sacked = 0
    sk.rtt_seq = -1  # Karn (RFC 6298 (3)): no RTT samples from retransmitted data
    sk.lost_hi = sk.snd_max
    sk.retrans_hi = una
    sk.rto_ts = (int(now * 1000) + sk.ts_off) & MASK  # TSval of the resend below
    if first:
        sk.undo_active = True  # a first RTO may prove spurious too (Linux tcp_init_undo)
        sk.undo_marker = una
        sk.undo_retrans = 0
        sk.loss_tsval = sk.rto_ts  # Linux retrans_stamp, as a TSval (tcp_packet_delayed)
        sk.loss_orig_acked = False
    sk.rtx_log.clear()
    sk.relost.clear()
    tcp_output.tcp_xmit_retransmit_queue(sh, sk, now)
    tcp_recovery.tcp_frto_start(sh, sk, new_recovery)


def tcp_delack_timer(sh: Shard, sk: TcpSock, now: float) -> None:
    if sk.state is State.CLOSED or sk.state is State.TIME_WAIT:
        return
    if sk.unacked_rcv or sk.ack_now:
        sh.stats.delayed_acks += 1
        tcp_delack.tcp_delack_timer_expired(sk)  # ato inflates, or pingpong ends
        tcp_output.tcp_send_ack(sh, sk, now)


def tcp_probe_timer(sh: Shard, sk: TcpSock, now: float) -> None:
    """Zero-window probe (RFC 9293 §3.8.6.1; Linux ``tcp_probe_timer``).

    RFC 1122 §4.2.2.17 keeps probing for as long as the peer answers, which
    resets the count; TCP_USER_TIMEOUT (RFC 5482) bounds a window that stays
    shut since the first probe even so, and an orphan gets tcp_orphan_retries.
    """
    pending = sk.sndq_len - ((sk.snd_nxt - sk.snd_una) & MASK)
    if sk.snd_max != sk.snd_una or pending <= 0:
        sk.probes = 0
        sk.probes_tstamp = None
        return
    if sk.snd_wnd:
        # Open window: data held back with nothing in flight (TCP_CORK). Linux
        # tcp_write_wakeup sends it regardless of the cork.
        cork = sk.cork
        sk.cork = False
        tcp_output.tcp_write_xmit(sh, sk, now)
        sk.cork = cork
        return
    ut = sk.user_timeout
    if sk.probes_tstamp is None:
        sk.probes_tstamp = now
    elif ut and _ms(now - sk.probes_tstamp) >= ut:
        tcp_write_err(sh, sk)
        return
    max_probes = TCP_RETRIES2
    if sk.orphan:
        alive = tcp_output.tcp_rto(sk) < TCP_RTO_MAX
        max_probes = tcp_orphan_retries(sk, alive)
        if not alive and sk.backoff >= max_probes:
            tcp_write_err(sh, sk)
            return
    if sk.probes >= max_probes:
        tcp_write_err(sh, sk)
        return
    sk.probes += 1
    sk.backoff += 1
    sh.stats.zero_window_probes += 1
    tcp_output.tcp_send_probe(sh, sk, now)
    when = tcp_output.tcp_rto(sk)
    if ut:  # Linux tcp_clamp_probe0_to_user_timeout
        remaining = ut / 1000.0 - (now - sk.probes_tstamp)
        when = min(when, max(remaining, 0.001))
    sh.timers.arm(sk, TimerKind.PERSIST, now + when)


def tcp_keepalive_timer(sh: Shard, sk: TcpSock, now: float) -> None:
    """Keepalive (RFC 1122 §4.2.3.6), and the orphaned FIN-WAIT-2 timeout (same timer in Linux).

    The peer is declared dead after TCP_KEEPCNT unanswered probes, or, with
    TCP_USER_TIMEOUT set, once that long has passed since it was last heard
    from and at least one probe went unanswered (Linux ``tcp_keepalive_timer``).
    """
    st = sk.state
    if st is State.FIN_WAIT2 and sk.orphan:
        tcp.tcp_done(sh, sk)
        return
    if not sk.keepalive or st not in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT1,
                                      State.FIN_WAIT2):
        return
    if sk.snd_max != sk.snd_una or sk.sndq_len:
        # Data in flight: the retransmit timer watches the peer.
        sh.timers.arm(sk, TimerKind.KEEPALIVE, now + sk.keepidle)
        return
    idle = now - sk.rcv_tstamp
    due = sk.rcv_tstamp + sk.keepidle
    # Compare the deadline, not the idle time: now - rcv_tstamp < keepidle can
    # hold while rcv_tstamp + keepidle <= now (float rounding), and re-arming
    # for a deadline not after now made Shard.advance spin forever.
    if due > now and sk.probes == 0:
        sh.timers.arm(sk, TimerKind.KEEPALIVE, due)
        return
    ut = sk.user_timeout
    if (sk.probes > 0 and _ms(idle) >= ut) if ut else sk.probes >= sk.keepcnt:
        tcp_output.tcp_send_active_reset(sh, sk, now)
        tcp_write_err(sh, sk)
        return
    sk.probes += 1
    sh.stats.keepalive_probes += 1
    tcp_output.tcp_send_probe(sh, sk, now)
    sh.timers.arm(sk, TimerKind.KEEPALIVE, now + sk.keepintvl)
