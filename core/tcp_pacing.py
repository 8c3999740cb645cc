"""Pacing: the rate, the departure schedule and the super-segment size (Linux
``tcp_update_pacing_rate`` in tcp_input.c; ``tcp_pacing_check``,
``tcp_update_skb_after_send``, ``tcp_tso_autosize`` and the pacing timer in
tcp_output.c).

Why: a sender that releases a whole congestion window at once builds a queue
at the bottleneck and loses packets in bursts; spreading the window over the
round trip avoids both.  Linux computes a pacing rate on every ACK,

    rate = ratio * cwnd * MSS / SRTT

with ratio ``tcp_pacing_ss_ratio`` (200 %) while cwnd is below half of
ssthresh (slow start: the rate must keep up with a window that doubles per
round trip) and ``tcp_pacing_ca_ratio`` (120 %) after, capped by
SO_MAX_PACING_RATE.  The rate is always computed and reported (TCP_INFO,
``ss -ti``); it is *enforced* by the fq qdisc, or, without one, by TCP itself
when the socket needs pacing (``sk_pacing_status`` SK_PACING_NEEDED: set by
SO_MAX_PACING_RATE, or by a congestion control that asks for it, as BBR
does).  CUBIC on a default qdisc is not paced by Linux; nor is it here unless
SO_MAX_PACING_RATE is set or ``ShardConfig.pacing`` is on (the engine's
stand-in for "fq or a pacing congestion control").

Linux's internal pacing is earliest-departure-time (EDT): every transmission
moves ``tcp_wstamp_ns`` (``TcpSock.wstamp``) on by its length over the rate;
``tcp_write_xmit`` stops when that time is in the future and arms the pacing
timer for it (here ``TimerKind.PACING``, a deadline the caller's loop keeps).
The first ten data segments leave unpaced (the initial window, as Linux), and
a sender late by up to half a segment's time keeps that credit.

The schedule's granularity: a departure due within ``TCP_PACING_SLACK`` goes
now rather than through a timer.  The worker's loop timer has millisecond
resolution, so waiting for a departure a few microseconds away would cost a
loop turn (and up to a millisecond) per super-segment; departures stay
spaced by the rate on average because ``wstamp`` advances from where it was,
not from now.

Super-segments (``tcp_tso_autosize``): a GSO super-segment leaves the
device as one burst, so a paced sender sizes it by the rate: about 1 ms of
it (``sk_pacing_shift`` 10: rate / 1024 bytes), plus a share of the 64 KiB
GSO limit that halves for every doubling of the minimum RTT above 512 µs
(``tcp_tso_rtt_log`` 9), at least ``tcp_min_tso_segs`` (2) segments.  On a
sub-millisecond path that is the full 64 KiB, so pacing costs clean-link
throughput nothing there.  Linux autosizes every flow; the engine only
paced ones: its cost is per segment (a Python round per super-segment, not
a few hundred nanoseconds), and an unpaced flow gains nothing from smaller
bursts that the device would not space out anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import tcp_output
from .tcp_h import (
    HALF,
    MASK,
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
    TCP_LAST_ACK,
    TcpSock,
    TimerKind,
)

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["TCP_PACING_SS_RATIO", "TCP_PACING_CA_RATIO", "NO_PACING_RATE", "TCP_PACING_SLACK",
           "tcp_update_pacing_rate", "tcp_pacing_rate", "tcp_pacing_check", "tcp_update_skb_after_send",
           "tcp_tso_autosize", "tcp_pace_kick", "tcp_set_max_pacing_rate", "tcp_init_pacing"]

#: net.ipv4.tcp_pacing_ss_ratio / tcp_pacing_ca_ratio, percent.
TCP_PACING_SS_RATIO = 200
TCP_PACING_CA_RATIO = 120
#: ~0UL: "no limit" (sk_max_pacing_rate's default; TCP_INFO reports it as is).
NO_PACING_RATE = 0xFFFFFFFFFFFFFFFF
#: A departure due this soon goes now (see the module docstring), seconds.
TCP_PACING_SLACK = 0.0002
#: sk_pacing_shift: a super-segment carries about 2**-10 s of the rate.
SK_PACING_SHIFT = 10
#: net.ipv4.tcp_min_tso_segs and tcp_tso_rtt_log.
TCP_MIN_TSO_SEGS = 2
TCP_TSO_RTT_LOG = 9
#: Linux paces only after this many data segments (tcp_update_skb_after_send).
_UNPACED_SEGS = 10
#: The smallest SRTT the rate is computed from: Linux keeps srtt_us in 1/8 µs
#: units and divides by it only when non-zero, so no SRTT yet (or a round trip
#: faster than that, as between two shards in one process) gives the rate of
#: a 1/8 µs round trip: unlimited in practice, and finite.
_MIN_SRTT = 0.125e-6
_PACING = TimerKind.PACING
_SENDING = (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, TCP_CLOSING, TCP_LAST_ACK)


def tcp_update_pacing_rate(sh: Shard, sk: TcpSock) -> None:
    """``sk.pacing_rate`` from the congestion window and SRTT (Linux
    ``tcp_update_pacing_rate``), after every ACK of a paced socket and at
    ESTABLISHED.  An unpaced socket's rate is only read (TCP_INFO,
    ``ss -i``): ``tcp_pacing_rate`` computes it then, from the same state
    the last ACK left, which saves the ACK path the work."""
    if sh.tracing:
        sh.tr("tcp_update_pacing_rate")
    if sk.cc is not None:
        sk.pacing_rate = tcp_pacing_rate(sk)


def tcp_pacing_rate(sk: TcpSock) -> int:
    """ratio * max(cwnd, segments out) * MSS / SRTT, at most
    SO_MAX_PACING_RATE, bytes/s (~0 before congestion control exists)."""
    cc = sk.cc
    if cc is None:
        return NO_PACING_RATE
    cwnd = cc.cwnd
    mss = sk.mss_cache
    out = (sk.snd_nxt - sk.snd_una) & MASK
    if out & HALF:
        out = 0
    segs = -(-out // mss) if out else 0
    if segs > cwnd:
        cwnd = segs
    ratio = TCP_PACING_SS_RATIO if cwnd < cc.ssthresh // 2 else TCP_PACING_CA_RATIO
    srtt = sk.srtt
    if srtt < _MIN_SRTT:
        srtt = _MIN_SRTT
    rate = int(mss * cwnd * ratio / (100 * srtt))
    cap = sk.max_pacing_rate
    return rate if rate < cap else cap


def tcp_init_pacing(sh: Shard, sk: TcpSock) -> None:
    """At ESTABLISHED: pace in the engine if the shard is configured to
    (``ShardConfig.pacing``), and the first rate, from the handshake's RTT."""
    if sh.cfg.pacing:
        sk.pacing_needed = True
    sk.rate_round_end = sk.snd_nxt
    tcp_update_pacing_rate(sh, sk)


def tcp_set_max_pacing_rate(sk: TcpSock, rate: int) -> None:
    """SO_MAX_PACING_RATE (Linux ``sk_setsockopt``): any value but ~0 switches
    internal pacing on (SK_PACING_NONE -> SK_PACING_NEEDED); the current rate
    drops to the cap at once."""
    if rate != NO_PACING_RATE:
        sk.pacing_needed = True
    sk.max_pacing_rate = rate
    sk.pacing_rate = tcp_pacing_rate(sk) if sk.cc is not None else rate


def tcp_pacing_check(sh: Shard, sk: TcpSock, now: float) -> bool:
    """Must the next segment wait?  (Linux ``tcp_pacing_check``.)  True when its
    departure time lies beyond ``now`` (and the slack); the pacing timer is
    then armed for it."""
    due = sk.wstamp
    if due <= now + TCP_PACING_SLACK:
        return False
    if sk.timers[_PACING] is None:
        sh.timers.arm(sk, _PACING, due)
    return True


def tcp_update_skb_after_send(sk: TcpSock, nbytes: int, now: float) -> None:
    """Move the next departure on by ``nbytes`` of the pacing rate (Linux
    ``tcp_update_skb_after_send``, with ``__tcp_transmit_skb``'s clamp of
    ``tcp_wstamp_ns`` to the clock).  A sender running late (the timer fired
    after the departure was due) keeps up to half the segment's time as
    credit, so the average rate holds."""
    prior = sk.wstamp
    if prior < now:
        sk.wstamp = now
    rate = sk.pacing_rate
    if not rate or rate == NO_PACING_RATE or sk.data_segs_out < _UNPACED_SEGS:
        return
    t = nbytes / rate
    late = sk.wstamp - prior
    if late > 0.0:
        t -= late if late < t / 2 else t / 2
    sk.wstamp += t


def tcp_tso_autosize(sk: TcpSock, mss: int, gso_max: int) -> int:
    """Bytes per super-segment (a multiple of ``mss``, at most ``gso_max``) for
    the current pacing rate and minimum RTT (Linux ``tcp_tso_autosize``)."""
    rate = sk.pacing_rate
    nbytes = rate >> SK_PACING_SHIFT if rate != NO_PACING_RATE else gso_max
    shift = int(sk.min_rtt * 1e6) >> TCP_TSO_RTT_LOG
    if shift < 32:
        nbytes += gso_max >> shift
    if nbytes > gso_max:
        nbytes = gso_max
    segs = nbytes // mss
    if segs < TCP_MIN_TSO_SEGS:
        segs = TCP_MIN_TSO_SEGS
    return segs * mss


def tcp_pace_kick(sh: Shard, sk: TcpSock, now: float) -> None:
    """The pacing timer fired (Linux ``tcp_pace_kick``, which runs
    ``tcp_tsq_handler`` -> ``tcp_write_xmit``): send what is due now."""
    if sk.state in _SENDING and (sk.sndq_len or sk.in_recovery or sk.in_loss):
        tcp_output.tcp_write_xmit(sh, sk, now)
