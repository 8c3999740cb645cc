"""All TCP timers of a shard in one heap (Linux ``tcp_timer.c``).

Timers are data, not callbacks (smoltcp ``Timer``): each socket holds one
deadline per :class:`TimerKind` in ``sk.timers``; the shard keeps a single heap
of ``(deadline, seq, kind, sock)`` entries.  Each (sock, kind) has at most one
*live* heap entry, named by its ``seq`` in ``sk.timer_seq``; other entries are
dead and dropped when they surface.  Cancelling just clears the deadline
(lazy cancel).  Re-arming *later* (the common case: every ACK pushes the
retransmit deadline forward) does not touch the heap: the live entry surfaces
at the old deadline, sees the later one and re-queues itself once.  Only
arming *earlier* pushes a new entry.
"""

from __future__ import annotations

import enum
import heapq
from typing import Any

__all__ = ["TimerKind", "TimerHeap", "tcp_timer_handler"]


class TimerKind(enum.IntEnum):
    RETRANSMIT = 0  # icsk_retransmit_timer (also SYN retries)
    DELACK = 1  # icsk_delack_timer
    KEEPALIVE = 2  # sk_timer: keepalive, and the orphaned FIN-WAIT-2 timeout
    TIME_WAIT = 3  # inet_twsk timer
    SYNACK = 4  # reqsk_timer
    PERSIST = 5  # zero-window probe timer


class TimerHeap:
    """One heap for every timer of every socket (and request sock) of a shard.

    A timer owner needs two 6-slot lists: ``timers`` (deadline or None) and
    ``timer_seq`` (the seq of its live heap entry).
    """

    __slots__ = ("heap", "count")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, Any]] = []
        self.count = 0

    def arm(self, sk: Any, kind: int, deadline: float) -> None:
        """Set (or move) ``sk``'s timer ``kind`` to fire at ``deadline``."""
        timers = sk.timers
        old = timers[kind]
        timers[kind] = deadline
        if old is None or deadline < old:
            self.count += 1
            sk.timer_seq[kind] = self.count
            heapq.heappush(self.heap, (deadline, self.count, kind, sk))

    @staticmethod
    def cancel(sk: Any, kind: int) -> None:
        sk.timers[kind] = None

    @staticmethod
    def cancel_all(sk: Any) -> None:
        timers = sk.timers
        for i in range(len(timers)):
            timers[i] = None

    def _settle(self, now: float | None) -> tuple[int, Any] | float | None:
        """Drop dead entries and re-queue moved ones at the top of the heap.

        With ``now``: pop and return the first timer due by then as (kind, sock).
        Without: return the earliest live deadline.
        """
        heap = self.heap
        while heap:
            deadline, seq, kind, sk = heap[0]
            if now is not None and deadline > now:
                return None
            if sk.timer_seq[kind] != seq:
                heapq.heappop(heap)  # dead: superseded by an earlier arm
                continue
            cur = sk.timers[kind]
            if cur is None:
                heapq.heappop(heap)  # cancelled
                continue
            if cur > deadline:  # moved later: re-queue once, at the real deadline
                self.count += 1
                sk.timer_seq[kind] = self.count
                heapq.heapreplace(heap, (cur, self.count, kind, sk))
                continue
            if now is None:
                return deadline
            heapq.heappop(heap)
            sk.timers[kind] = None
            return kind, sk
        return None

    def pop_due(self, now: float) -> tuple[int, Any] | None:
        """The next timer due at ``now`` as (kind, sock), its slot cleared; else None."""
        return self._settle(now)  # type: ignore[return-value]

    def next_deadline(self) -> float | None:
        return self._settle(None)  # type: ignore[return-value]


# -- what each timer does (Linux tcp_timer.c handlers) ------------------------------------

#: net.ipv4.tcp_syn_retries / tcp_synack_retries / tcp_retries2 defaults.
TCP_SYN_RETRIES = 6
TCP_SYNACK_RETRIES = 5
TCP_RETRIES2 = 15


def tcp_timer_handler(sh: Any, kind: int, sk: Any, now: float) -> None:
    """Run the expired timer ``kind`` of ``sk`` (a TcpSock or a RequestSock)."""
    if kind == TimerKind.SYNACK:
        reqsk_timer_handler(sh, sk, now)
    elif kind == TimerKind.RETRANSMIT:
        tcp_retransmit_timer(sh, sk, now)
    elif kind == TimerKind.DELACK:
        tcp_delack_timer(sh, sk, now)
    elif kind == TimerKind.PERSIST:
        tcp_probe_timer(sh, sk, now)
    elif kind == TimerKind.KEEPALIVE:
        tcp_keepalive_timer(sh, sk, now)
    elif kind == TimerKind.TIME_WAIT:
        from .tcp import tcp_done
        tcp_done(sh, sk)


def reqsk_timer_handler(sh: Any, req: Any, now: float) -> None:
    """Resend the SYN-ACK with exponential backoff; give up after 5 retries (63 s)."""
    if req.dead:
        return
    if req.num_retrans >= TCP_SYNACK_RETRIES:
        from .tcp_minisocks import _req_drop
        _req_drop(sh, req)
        sh.stats.synack_timeouts += 1
        return
    from .tcp_ipv4 import tcp_v4_send_synack
    req.num_retrans += 1
    sh.stats.retrans_segs += 1
    tcp_v4_send_synack(sh, req, now)
    sh.timers.arm(req, TimerKind.SYNACK, now + (1.0 * (1 << req.num_retrans)))


def tcp_retransmit_timer(sh: Any, sk: Any, now: float) -> None:
    """RTO expiry (RFC 6298 (5.4)-(5.7)): resend the oldest segment, back off, collapse cwnd."""
    import errno

    from .sock import State
    from .tcp import tcp_done
    from .tcp_output import tcp_retransmit_skb, tcp_rto, tcp_send_syn, tcp_send_synack_sock
    st = sk.state
    if st is State.SYN_SENT or (st is State.SYN_RECV and sk.parent is None):
        limit = TCP_SYN_RETRIES if st is State.SYN_SENT else TCP_SYNACK_RETRIES
        if sk.syn_retries >= limit:
            tcp_done(sh, sk, errno.ETIMEDOUT)
            return
        sk.syn_retries += 1
        sk.backoff += 1
        sh.stats.retrans_segs += 1
        if st is State.SYN_SENT:
            tcp_send_syn(sh, sk, now)
        else:
            tcp_send_synack_sock(sh, sk, now)
        sh.timers.arm(sk, TimerKind.RETRANSMIT, now + tcp_rto(sk))
        return
    if sk.snd_una == sk.snd_max:
        return
    if sk.retries >= TCP_RETRIES2:
        tcp_done(sh, sk, errno.ETIMEDOUT)
        return
    sk.retries += 1
    mss = sk.mss_cache
    if sk.cc is not None:
        sk.cc.on_rto(now, ((sk.snd_nxt - sk.snd_una) & 0xFFFFFFFF) / mss)
    sk.in_recovery = False
    sk.dupacks = 0
    sk.rtt_seq = -1  # Karn (RFC 6298 (3)): no RTT samples from retransmitted data
    # Go back N: everything after the first segment is resent as the ACKs clock it out.
    sk.snd_nxt = tcp_retransmit_skb(sh, sk, sk.snd_una, now)
    sk.retrans_hi = sk.snd_nxt
    sk.backoff += 1  # RFC 6298 (5.5)
    sh.stats.rto_fires += 1
    sh.timers.arm(sk, TimerKind.RETRANSMIT, now + tcp_rto(sk))


def tcp_delack_timer(sh: Any, sk: Any, now: float) -> None:
    from .sock import State
    from .tcp_output import tcp_send_ack
    if sk.state is State.CLOSED or sk.state is State.TIME_WAIT:
        return
    if sk.unacked_rcv or sk.ack_now:
        sh.stats.delayed_acks += 1
        tcp_send_ack(sh, sk, now)


def tcp_probe_timer(sh: Any, sk: Any, now: float) -> None:
    """Zero-window probe (RFC 9293 §3.8.6.1; Linux ``tcp_probe_timer``)."""
    import errno

    from .tcp import tcp_done
    from .tcp_output import tcp_rto, tcp_send_probe, tcp_write_xmit
    pending = sk.sndq_len - ((sk.snd_nxt - sk.snd_una) & 0xFFFFFFFF)
    if sk.snd_max != sk.snd_una or pending <= 0:
        sk.probes = 0
        return
    if sk.snd_wnd:
        tcp_write_xmit(sh, sk, now)
        return
    if sk.probes >= TCP_RETRIES2:
        tcp_done(sh, sk, errno.ETIMEDOUT)
        return
    sk.probes += 1
    sk.backoff += 1
    sh.stats.zero_window_probes += 1
    tcp_send_probe(sh, sk, now)
    sh.timers.arm(sk, TimerKind.PERSIST, now + tcp_rto(sk))


def tcp_keepalive_timer(sh: Any, sk: Any, now: float) -> None:
    """Keepalive (RFC 1122 §4.2.3.6), and the orphaned FIN-WAIT-2 timeout (same timer in Linux)."""
    import errno

    from .sock import State
    from .tcp import tcp_done
    from .tcp_output import tcp_send_active_reset, tcp_send_probe
    st = sk.state
    if st is State.FIN_WAIT2 and sk.orphan:
        tcp_done(sh, sk)
        return
    if not sk.keepalive or st not in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT1,
                                      State.FIN_WAIT2):
        return
    if sk.snd_max != sk.snd_una or sk.sndq_len:
        # Data in flight: the retransmit timer watches the peer.
        sh.timers.arm(sk, TimerKind.KEEPALIVE, now + sk.keepidle)
        return
    idle = now - sk.rcv_tstamp
    if idle < sk.keepidle and sk.probes == 0:
        sh.timers.arm(sk, TimerKind.KEEPALIVE, sk.rcv_tstamp + sk.keepidle)
        return
    if sk.probes >= sk.keepcnt:
        tcp_send_active_reset(sh, sk, now)
        tcp_done(sh, sk, errno.ETIMEDOUT)
        return
    sk.probes += 1
    sh.stats.keepalive_probes += 1
    tcp_send_probe(sh, sk, now)
    sh.timers.arm(sk, TimerKind.KEEPALIVE, now + sk.keepintvl)
