"""Receive-buffer auto-tuning (Linux ``tcp_init_buffer_space``, ``tcp_rcv_space_adjust``).

Why: a fixed receive buffer caps a connection at buffer / RTT whatever the
path could carry. Linux starts each socket at ``tcp_rmem[1]`` (128 KiB) and,
once per receiver-side RTT, sizes the buffer from what the application
actually *read* during the last RTT (Dynamic Right-Sizing, Fisk and Feng,
"Dynamic right-sizing in TCP", 2001): twice that, for loss recovery, plus a
cushion of 16 segments, plus headroom for a sender still doubling its rate;
never past ``tcp_rmem[2]``, and never when the application fixed the size
with SO_RCVBUF. An application that does not drain does not grow the buffer,
so the window is opened by what is consumed, not by what arrives.

The receiver needs its own RTT estimate (it may send nothing but ACKs):
``tcp_rcv_rtt_measure_ts`` from the timestamp echo of in-sequence data
(RFC 7323 §4.1's TSecr, as Linux), else ``tcp_rcv_rtt_measure``, one sample
per window of data (the time for RCV.NXT to pass the edge offered a window
ago, an upper bound). Both feed ``tcp_rcv_rtt_update`` (Linux's
``rcv_rtt_est``: an EWMA of 1/8 for timestamp samples, the minimum for
per-window ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tcp_h import HALF, MASK, TcpSock

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["TCP_RMEM", "TCP_INIT_CWND", "initial_rcvbuf", "tcp_init_buffer_space",
           "tcp_rcv_space_adjust", "tcp_rcv_rtt_sample", "tcp_rcv_rtt_update",
           "tcp_rcv_rtt_measure", "tcp_rcv_rtt_measure_ts"]

#: net.ipv4.tcp_rmem: min, default (a new socket's buffer), max (what auto-tuning
#: may reach), bytes; the values the issue names (Linux 6.18's max is 32 MiB).
TCP_RMEM = (4096, 131072, 6 * 1024 * 1024)
#: Linux TCP_INIT_CWND: the sender's first flight, the first RTT's guess of what is read.
TCP_INIT_CWND = 10


def initial_rcvbuf(fixed: int, rmem: tuple[int, int, int]) -> tuple[int, bool]:
    """A new socket's (buffer, locked): a fixed size (ShardConfig.rcvbuf, like
    SO_RCVBUF) is locked; otherwise tcp_rmem[1], free to grow."""
    return (fixed, True) if fixed else (rmem[1], False)


def tcp_init_buffer_space(sh: Shard, sk: TcpSock, now: float) -> None:
    """At ESTABLISHED the first measurement window starts (Linux ``tcp_init_buffer_space``).

    The space the application is assumed to read per RTT starts at what the
    sender can send in its first RTT: ten of our segments, at most the window
    offered.
    """
    if sh.tracing:
        sh.tr("tcp_init_buffer_space")
    space = TCP_INIT_CWND * sk.adv_mss
    if 0 < sk.rcv_wnd < space:
        space = sk.rcv_wnd
    sk.rcvq_space = space
    sk.copied_seq = (sk.rcv_nxt - sk.rcvq_len) & MASK
    sk.rcvq_space_seq = sk.copied_seq
    sk.rcvq_space_time = now


def tcp_rcv_rtt_update(sk: TcpSock, sample: float, win_dep: bool) -> None:
    """Linux ``tcp_rcv_rtt_update``: a timestamp sample moves the estimate by 1/8
    of the difference; a per-window sample (an upper bound) only lowers it."""
    est = sk.rcv_rtt_est
    if est == 0.0:
        sk.rcv_rtt_est = sample
    elif win_dep:
        if sample < est:
            sk.rcv_rtt_est = sample
    else:
        sk.rcv_rtt_est = est + (sample - est) / 8


def tcp_rcv_rtt_measure(sk: TcpSock, now: float) -> None:
    """One sample per window of data: how long RCV.NXT took to pass the right
    edge offered when the measurement started (Linux ``tcp_rcv_rtt_measure``,
    called for in-order data with or without timestamps). The caller checks
    that RCV.NXT passed ``rcv_rtt_seq`` (or no measurement runs yet)."""
    if sk.rcv_rtt_time:
        d = now - sk.rcv_rtt_time
        tcp_rcv_rtt_update(sk, d if d > 1e-6 else 1e-6, True)
    sk.rcv_rtt_seq = (sk.rcv_nxt + sk.rcv_wnd) & MASK
    sk.rcv_rtt_time = now


def tcp_rcv_rtt_measure_ts(sk: TcpSock, tsecr: int, seglen: int, now: float) -> None:
    """A full-sized segment echoing a TSval not measured yet: now minus when we
    sent that TSval (Linux ``tcp_rcv_rtt_measure_ts``, RFC 7323 §4.1). Our
    TSval clock is ms (``tcp_output``), so an echo of this very tick (a
    sub-ms RTT) gives no sample, as Linux's delta 0."""
    sk.rcv_rtt_last_tsecr = tsecr
    if seglen >= sk.rcv_mss:
        delta = ((int(now * 1000) + sk.ts_off) - tsecr) & MASK
        if 0 < delta < HALF:
            tcp_rcv_rtt_update(sk, delta / 1000.0, False)


def tcp_rcv_rtt_sample(sk: TcpSock, tsecr: int | None, seglen: int, now: float) -> None:
    """Both receiver RTT measurements for one in-order data segment (the
    receive paths call this only when one of them is due)."""
    if tsecr and tsecr != sk.rcv_rtt_last_tsecr:
        tcp_rcv_rtt_measure_ts(sk, tsecr, seglen, now)
    if not sk.rcv_rtt_time or ((sk.rcv_nxt - sk.rcv_rtt_seq) & MASK) < HALF:
        tcp_rcv_rtt_measure(sk, now)


def tcp_rcv_space_adjust(sh: Shard, sk: TcpSock, now: float) -> None:
    """After the application read (Linux ``tcp_rcv_space_adjust``).

    Once per receiver RTT: if the application read more in the last RTT than
    the space measured before, the buffer becomes twice what it read plus 16
    segments (room to recover a loss), plus twice the growth over the last RTT
    (a sender in slow start doubles per RTT, and the window we offer now is
    filled during the next one); at most tcp_rmem[2], never smaller, never
    with a fixed (SO_RCVBUF) buffer. The window follows the buffer
    (``tcp_output.tcp_select_window`` offers its free space).
    """
    rtt = sk.rcv_rtt_est
    if rtt == 0.0 or now - sk.rcvq_space_time < rtt:
        return
    if sh.tracing:
        sh.tr("tcp_rcv_space_adjust")
    copied = (sk.copied_seq - sk.rcvq_space_seq) & MASK
    space = sk.rcvq_space
    if copied > space:
        if not sk.rcvbuf_locked:
            rcvwin = 2 * copied + 16 * sk.adv_mss
            rcvwin += 2 * (rcvwin * (copied - space) // (space or 1))
            rmem_max = sh.cfg.tcp_rmem[2]
            rcvbuf = rcvwin if rcvwin < rmem_max else rmem_max
            if rcvbuf > sk.rcvbuf:
                sk.rcvbuf = rcvbuf
        sk.rcvq_space = copied
    sk.rcvq_space_seq = sk.copied_seq
    sk.rcvq_space_time = now
