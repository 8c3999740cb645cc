"""Loss detection by time: RACK and the tail loss probe (Linux ``net/ipv4/tcp_recovery.c``).

Reading list: RFC 8985 (RACK-TLP).  RFC 6675's scoreboard and PRR, which
this complements, stay with the ACK processing in ``tcp_input``
(``tcp_fastretrans_alert``); the retransmissions themselves go out through
``tcp_output.tcp_xmit_retransmit_queue``.  Linux keeps ``tcp_schedule_loss_probe``
and ``tcp_send_loss_probe`` in tcp_output.c; they live here beside RACK,
whose other half they are (RFC 8985 §7).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from . import tcp_input, tcp_output
from .tcp_h import (
    HALF,
    MASK,
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_ESTABLISHED,
    TCP_FASTRETRANS_THRESH,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TX_LOG_STRIDE,
    TcpSock,
    TimerKind,
)

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["tcp_rack_sent_time", "tcp_rack_new_data_time", "tcp_rack_keep_in_flight", "tcp_rack_advance", "tcp_rack_detect_loss", "tcp_rack_reo_timeout",
           "tcp_schedule_loss_probe", "tcp_send_loss_probe", "tcp_process_tlp_ack", "tcp_tlp_dsack",
           "tcp_frto_start", "tcp_process_frto"]

#: States in which data we sent may still be outstanding.
_SENDING_STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_LAST_ACK)
#: States a tail loss probe may be sent in (Linux tcp_send_loss_probe).
_PROBE_STATES = (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_CLOSING)
_RETRANSMIT = TimerKind.RETRANSMIT
_REO = TimerKind.REO
_TLP = TimerKind.TLP
#: net.ipv4.tcp_max_reordering: the largest reordering degree recorded, segments.
TCP_MAX_REORDERING = 300
#: A tail loss probe that would come after the RTO goes this much before it instead.
_TLP_RTO_MARGIN = 0.005
#: Added to 2 SRTT when more than one segment is in flight (Linux
#: TCP_TIMEOUT_MIN, two jiffies at HZ=1000).
_TLP_MIN = 0.002


# -- RACK: loss detection by transmission time (RFC 8985 §6.2; Linux tcp_recovery.c) --------
#
# RFC 6675 calls a hole lost when enough data *above it in sequence* was
# SACKed.  RACK asks instead whether data *sent after it* was delivered: a
# segment is lost once a segment transmitted later has been delivered and a
# reordering window has passed since.  The difference matters for
# retransmissions, which are sent after data above them: a lost retransmission
# is found as soon as anything sent later (a later retransmission, new data)
# arrives, instead of waiting for the RTO, and un-retransmitted data sent
# before a delivered retransmission is found lost without DupThresh SACKs.
#
# Send times without per-segment state: original data leaves in sequence
# order, so one (end, time, ...) entry per transmission burst (``tx_log``,
# written by ``tcp_output.tcp_write_new``; the rest of the entry is the rate
# sampler's, tcp_rate) orders all of it; retransmissions are logged
# with their time in ``rtx_log`` [start, end, SND.MAX then, time] (few, and
# only during recovery).  Lost original data is a sequence prefix above
# ``lost_hi``; lost retransmissions go to ``relost`` and are sent again first.

def _tx_time(sk: TcpSock, seq: int) -> float:
    """When the original transmission of the byte before ``seq`` left (-1: unknown)."""
    log = sk.tx_log
    top = sk.snd_max
    want = (top - seq) & MASK  # distances back from SND.MAX: older is larger
    t = -1.0
    for i in range(len(log) - TX_LOG_STRIDE, -1, -TX_LOG_STRIDE):
        if ((top - log[i]) & MASK) > want:
            break
        t = log[i + 1]
    return t


#: How much later than original data sent at the same instant a retransmission
#: is taken to have left (see ``tcp_rack_sent_time``): far above float noise
#: and ``_RACK_EPS``, far below any RTT.
_RACK_AFTER = 1e-6


def tcp_rack_sent_time(sk: TcpSock, now: float) -> float:
    """The send time RACK records for a retransmission going out at ``now``.

    RFC 8985 §6.2 orders segments sent at the same time by sequence, which
    holds for original data but not for a retransmission: one ACK may send
    new data and the next, processed at the same instant, retransmit a hole
    below it.  The new data then reaches the peer first, and its SACK would
    make the retransmission look sent earlier and already overdue: it was
    resent again, needlessly (the peer answers with a D-SACK).  When new data
    already left at this instant, the retransmission is recorded as just
    after it (Linux's clock, refreshed per ACK, rarely ties); new data after
    a retransmission at the same instant, after that (``tcp_rack_new_data_time``).
    """
    log = sk.tx_log
    if log:
        t = log[1 - TX_LOG_STRIDE]  # the newest burst's send time
        if t >= now:
            return t + _RACK_AFTER
    return now


def tcp_rack_new_data_time(sk: TcpSock, now: float) -> float:
    """The send time RACK records for new data going out at ``now``: after a
    retransmission recorded at this instant (``tcp_rack_sent_time``), just
    after it, so that every transmission's recorded time follows the order
    they left in."""
    t = sk.rtx_log[-1][3]
    if t >= now:
        return t + _RACK_AFTER
    return now


def tcp_rack_keep_in_flight(sk: TcpSock, entering: bool) -> None:
    """Retransmissions still on their way outlive their recovery episode, as
    Linux's retransmitted skbs keep TCPCB_SACKED_RETRANS until acknowledged
    or marked lost again.

    The log keeps what lies above SND.UNA (RACK can still find them lost:
    ``relost``); ``entering`` a new recovery, HighRxt moves over the lowest
    holes they cover, so NextSeg does not send a hole again that was resent
    moments ago, in the same batch of ACKs that ended the last episode (the
    lossy bench's 50 ms download: 45 of 58 retransmissions D-SACKed).
    """
    una = sk.snd_una
    log = [e for e in sk.rtx_log if 0 < ((e[1] - una) & MASK) < HALF]
    sk.rtx_log = log
    if sk.relost:
        sk.relost = [r for r in sk.relost if 0 < ((r[1] - una) & MASK) < HALF]
    if not entering or not log:
        return
    hi = 0  # offset from SND.UNA below which every un-SACKed byte was resent
    below = tcp_input.tcp_unsacked_below
    for s, e in sorted(((e[0] - una) & MASK, (e[1] - una) & MASK) for e in log):
        if s & HALF:
            s = 0
        if s > hi and below(sk, una, (una + s) & MASK) > below(sk, una, (una + hi) & MASK):
            break  # an un-SACKed gap nobody resent: NextSeg starts there
        if e > hi:
            hi = e
    sk.retrans_hi = (una + hi) & MASK


def _rack_update(sk: TcpSock, t: float, end: int, now: float) -> None:
    """RFC 8985 §6.2 step 2: remember the latest-sent delivered data (RACK_sent_after)."""
    x = sk.rack_xmit
    if t > x or (t == x and 0 < ((end - sk.rack_end) & MASK) < HALF):
        sk.rack_xmit = t
        sk.rack_end = end
        sk.rack_rtt = now - t


def _rack_fack(sk: TcpSock) -> int:
    """RACK.fack: the highest sequence delivered, never behind SND.UNA."""
    una = sk.snd_una
    f = sk.rack_fack
    if 0 < ((f - una) & MASK) <= ((sk.snd_max - una) & MASK):
        return f
    return una


def tcp_rack_advance(sk: TcpSock, prior_una: int, now: float) -> None:
    """RFC 8985 §6.2 steps 1-2 for one ACK (Linux ``tcp_rack_advance``).

    Original data: the highest byte delivered was sent last (its original
    send time is a lower bound if it was retransmitted too, so never too
    eager).  Retransmissions delivered by now leave ``rtx_log``; one delivered
    sooner than min_RTT after it was sent cannot be what arrived (the original
    did), so its time is not used (RFC 8985 step 2, ambiguity).
    """
    una = sk.snd_una
    top = sk.sacked[-1][1] if sk.sacked else una
    if top != prior_una:
        t = _tx_time(sk, top)
        if t >= 0:
            _rack_update(sk, t, top, now)
    log = sk.rtx_log
    new = sk.rack_sacked_new
    if new:
        sk.rack_sacked_new = []
    if log and (new or prior_una != una):
        # Only this ACK can have delivered a retransmission still logged: by
        # moving SND.UNA past it, or by a SACK block that touches it (then
        # checked against the whole scoreboard).  O(R) cheap tests for R
        # logged retransmissions, and a bisection for the few touched.
        min_rtt = sk.min_rtt or sk.srtt  # windowed (tcp_update_rtt_min); before any sample, SRTT
        new_offs = [((s - una) & MASK, (e - una) & MASK) for s, e in new]
        keep = []
        starts: list[int] | None = None
        ends: list[int] = []
        for ent in log:
            eo = (ent[1] - una) & MASK
            if eo == 0 or eo & HALF:
                delivered = True
            else:
                delivered = False
                so = (ent[0] - una) & MASK
                if not so & HALF:
                    for lo, hi in new_offs:
                        if lo < eo and so < hi:  # touched: is it inside one SACKed range?
                            if starts is None:
                                starts = [(b[0] - una) & MASK for b in sk.sacked]
                                ends = [(b[1] - una) & MASK for b in sk.sacked]
                            k = bisect.bisect_right(starts, so) - 1
                            delivered = k >= 0 and eo <= ends[k]
                            break
            if delivered:
                if now - ent[3] >= min_rtt:
                    _rack_update(sk, ent[3], ent[1], now)
            else:
                keep.append(ent)
        if len(keep) != len(log):
            sk.rtx_log = keep
    f = _rack_fack(sk)
    if 0 < ((top - f) & MASK) < HALF:
        sk.rack_fack = top
    elif f == una:
        sk.rack_fack = una


def _rack_reo_wnd(sk: TcpSock) -> float:
    """RFC 8985 §6.2.4 (Linux ``tcp_rack_reo_wnd``): until reordering has been
    seen, none in recovery or once DupThresh segments are SACKed; otherwise
    min(reo_wnd_mult * min_RTT / 4, SRTT)."""
    if not sk.reord_seen and (sk.in_recovery or sk.in_loss
                              or sk.sacked_bytes >= TCP_FASTRETRANS_THRESH * sk.mss_cache):
        return 0.0
    reo = sk.reo_wnd_mult * (sk.min_rtt or sk.srtt) / 4  # Linux tcp_min_rtt(): windowed
    if sk.srtt and reo > sk.srtt:
        reo = sk.srtt
    return reo


#: Float slack when comparing times that were computed by different sums.
_RACK_EPS = 1e-9


def tcp_rack_detect_loss(sh: Shard, sk: TcpSock, now: float) -> int | None:
    """RFC 8985 §6.2 step 5 (Linux ``tcp_rack_detect_loss``): whatever was sent
    before RACK.segment and has waited RACK.rtt + reo_wnd since it left is lost.

    Lost retransmissions move from ``rtx_log`` to ``relost``; for original data
    the new lost boundary is returned (None: nothing newly lost).  The REO
    timer is armed for the latest-sent data still inside its window (RFC 8985:
    the maximum remaining time), or cancelled.
    """
    xmit = sk.rack_xmit
    if xmit < 0:
        return None
    wait = sk.rack_rtt + _rack_reo_wnd(sk) - now  # lost once send time + wait <= 0
    rack_end = sk.rack_end
    una = sk.snd_una
    timeout = 0.0
    log = sk.rtx_log
    if log and (sk.in_recovery or sk.in_loss):
        keep = []
        relost = []
        for ent in log:
            t = ent[3]
            if t < xmit or (t == xmit and 0 < ((rack_end - ent[1]) & MASK) < HALF):
                left = t + wait
                if left <= _RACK_EPS:
                    relost.append([ent[0], ent[1]])
                    continue
                if left > timeout:
                    timeout = left
            keep.append(ent)
        if relost:
            sk.rtx_log = keep
            sk.relost.extend(relost)
            sh.stats.lost_retransmits += len(relost)
    lost = (sk.lost_hi - una) & MASK
    if lost > ((sk.snd_max - una) & MASK):
        lost = 0  # behind SND.UNA (or never set): nothing marked yet
    start = lost
    tx = sk.tx_log
    rack_off = (rack_end - una) & MASK
    prev = 0  # where the burst begins (offset from SND.UNA)
    for i in range(0, len(tx), TX_LOG_STRIDE):
        end = (tx[i] - una) & MASK
        if end & HALF or end <= lost:
            prev = 0 if end & HALF else end
            continue  # acknowledged, or already lost
        t = tx[i + 1]
        if t > xmit:
            break
        if t == xmit:  # RACK.segment's own burst: by sequence up to it
            if rack_off & HALF or rack_off <= lost:
                break
            if rack_off < end:
                end = rack_off
        left = t + wait
        if left <= _RACK_EPS:
            lost = end  # bursts leave in time order: every earlier one is lost too
        elif left > timeout and _unsacked_in(sk, prev if prev > lost else lost, end):
            timeout = left
        if t == xmit:
            break
        prev = end
    if timeout > 0:
        sh.timers.arm(sk, _REO, now + timeout)
    else:
        sk.timers[_REO] = None
    if lost > start and _unsacked_in(sk, start, lost):
        return (una + lost) & MASK
    return None


def _unsacked_in(sk: TcpSock, lo: int, hi: int) -> bool:
    """Is any byte of [lo, hi) (offsets from SND.UNA) not SACKed?"""
    una = sk.snd_una
    sacked = sk.sacked
    for k in range(tcp_input.sacked_from(sk, una, lo), len(sacked)):
        b = sacked[k]
        a = (b[0] - una) & MASK
        if a > lo:
            break
        e = (b[1] - una) & MASK
        if e > lo:
            lo = e
    return lo < hi


def tcp_rack_reo_timeout(sh: Shard, sk: TcpSock, now: float) -> None:
    """The reordering window of data sent before RACK.segment passed: run RACK's
    loss detection again and repair what it finds (Linux ``tcp_rack_reo_timeout``)."""
    if (sk.cc is None or not sk.sack_ok or sk.snd_una == sk.snd_max
            or not (sk.sacked or sk.rtx_log)
            or sk.state not in _SENDING_STATES):
        return
    relost = len(sk.relost)
    lost_to = tcp_rack_detect_loss(sh, sk, now)
    if not sk.in_recovery and not sk.in_loss:
        if lost_to is None:
            return
        sh.stats.rack_reo_timeouts += 1
        # Linux tcp_rack_reo_timeout counts one segment delivered for PRR here.
        tcp_input.tcp_enter_recovery(sh, sk, now, lost_to, delivered=sk.mss_cache)
        return
    if lost_to is None and len(sk.relost) == relost:
        return
    sh.stats.rack_reo_timeouts += 1
    if lost_to is not None:
        tcp_input.tcp_mark_lost(sk, lost_to)
    if sk.in_recovery:
        tcp_input.tcp_cwnd_reduction(sk, 0, True)  # room for what was newly marked
    tcp_output.tcp_write_xmit(sh, sk, now)


def tcp_rack_check_reordering(sk: TcpSock, lo: int, hi: int, old: list[tuple[int, int]]) -> bool:
    """RFC 8985 §6.2 step 3: data never retransmitted, newly delivered below
    RACK.fack, arrived out of order.  ``lo``/``hi`` bound what this ACK
    delivered (offsets from SND.UNA); ``old`` are the SACKed offsets before it.
    True (and RACK.reordering_seen set) when it did."""
    una = sk.snd_una
    fack = (_rack_fack(sk) - una) & MASK
    if sk.in_recovery or sk.in_loss:
        rtx = (sk.retrans_hi - una) & MASK  # below it: retransmitted this episode
        if rtx & HALF:
            rtx = 0
        if lo < rtx:
            lo = rtx
    if hi > fack:
        hi = fack
    if lo >= hi:
        return False
    n = hi - lo
    for a, b in old:
        if b <= lo or a >= hi:
            continue
        n -= (b if b < hi else hi) - (a if a > lo else lo)
    if n > 0:
        sk.reord_seen = True
        # The degree of reordering, in segments (Linux tcp_check_sack_reordering:
        # how far below the highest delivered byte this data arrived, capped
        # by tcp_max_reordering); TCP_INFO reports it as tcpi_reordering.
        mss = sk.mss_cache
        degree = (fack - lo + mss - 1) // mss
        if degree > sk.reordering:
            sk.reordering = degree if degree < TCP_MAX_REORDERING else TCP_MAX_REORDERING
        return True
    return False


def _delivered(sk: TcpSock, una: int, s: int, e: int) -> bool:
    """[s, e) cumulatively acknowledged or inside one SACKed block."""
    eo = (e - una) & MASK
    if eo == 0 or eo & HALF:
        return True
    so = (s - una) & MASK
    if so & HALF:
        return False
    sacked = sk.sacked
    i = tcp_input.sacked_from(sk, una, so)  # the only entry that can hold [s, e)
    return i < len(sacked) and ((sacked[i][0] - una) & MASK) <= so \
        and eo <= ((sacked[i][1] - una) & MASK)


# -- the tail loss probe (RFC 8985 §7) --------------------------------------------------

def tcp_schedule_loss_probe(sh: Shard, sk: TcpSock, now: float, rto: float) -> None:
    """Arm the tail loss probe 2 SRTT after the newest transmission (RFC 8985
    §7.2; Linux ``tcp_schedule_loss_probe``, called on each ACK and after new
    data): plus a delayed-ACK allowance (Linux's TCP_RTO_MIN) when a single
    segment is in flight, else Linux's two-jiffy timer floor, and never
    later than the RTO (``rto``: how far away it is)."""
    srtt = sk.srtt
    if not srtt:
        return
    pto = 2 * srtt
    if ((sk.snd_max - sk.snd_una) & MASK) <= sk.mss_cache:
        pto += 0.2  # RFC 8985 §7.2 WCDelAckT
    else:
        pto += _TLP_MIN  # Linux TCP_TIMEOUT_MIN
    if pto >= rto:
        # Never later than the RTO, but not dropped either: Linux arms the probe
        # at min(PTO, RTO) in the RTO's place, so a one- or two-segment flight
        # whose last segment (or ACK) is lost gets a probe, not a timeout that
        # collapses cwnd to one -- at small windows the common case.  The
        # probe goes just before the RTO and re-arms it.
        pto = rto - (_TLP_RTO_MARGIN if rto > 2 * _TLP_RTO_MARGIN else rto / 2)
        if pto < 2 * srtt:
            return
    deadline = now + pto
    sk.timers[_TLP] = deadline  # a later deadline too: from the newest segment
    q = sk.timer_q[_TLP]
    if q is None or q > deadline:  # TimerHeap.arm's lazy rule, without the call
        sh.timers.arm(sk, _TLP, deadline)


def tcp_send_loss_probe(sh: Shard, sk: TcpSock, now: float) -> None:
    """Tail loss probe (RFC 8985 §7.3; Linux ``tcp_send_loss_probe``).

    The last segments of a flight were sent and no ACK came for two RTTs:
    rather than wait for the RTO, send one segment (new data if the windows
    allow, else the last segment again, unless the peer SACKed it) so that
    its ACK's SACK blocks reveal the loss and fast recovery repairs it.
    """
    if (sk.in_recovery or sk.in_loss or sk.snd_una == sk.snd_max or sk.cc is None
            or sk.state not in _PROBE_STATES):
        return
    if sk.tlp_high_seq >= 0:
        # RFC 8985 §7.3: one probe per episode.  Until its ACK says what
        # happened (tcp_process_tlp_ack), the RTO is next (Linux re-arms it).
        sh.timers.arm(sk, _RETRANSMIT, now + tcp_output.tcp_rto(sk))
        return
    mss = tcp_output.tcp_current_mss(sk)
    sent = tcp_output.tcp_write_new(sh, sk, now, mss)
    if not sent:
        top = sk.snd_max
        seq = (top - mss) & MASK
        if ((seq - sk.snd_una) & MASK) & HALF:
            seq = sk.snd_una
        if sk.sacked and ((sk.sacked[-1][1] - seq) & MASK) < HALF \
                and sk.sacked[-1][1] != seq:
            # The tail (or part of it) is SACKed: probe only below it.
            lo = sk.sacked[-1][0]
            if ((lo - seq) & MASK) & HALF or lo == seq:
                return
            top = lo
        end = tcp_output.tcp_retransmit_skb(sh, sk, seq, now, (top - seq) & MASK)
        if end == seq:
            return
        # RACK (RFC 8985 §6.2) learns the probe's send time: if it is delivered,
        # holes sent before it are lost once a reordering window has passed.
        # (Probes acknowledged on the fast path are dropped here, so the log
        # stays bounded between recoveries.)
        una = sk.snd_una
        log = [e for e in sk.rtx_log if 0 < ((e[1] - una) & MASK) < HALF]
        log.append([seq, end, sk.snd_max, tcp_rack_sent_time(sk, now)])
        sk.rtx_log = log
    sk.tlp_high_seq = sk.snd_max  # RFC 8985 §7.3: TLPRxtOut, TLPHighRxt = SND.NXT
    sk.tlp_retrans = not sent
    sh.stats.tlp_probes += 1
    sh.timers.arm(sk, _RETRANSMIT, now + tcp_output.tcp_rto(sk))


def tcp_tlp_dsack(sk: TcpSock, start: int, end: int) -> None:
    """A D-SACK of the probe's range (Linux FLAG_DSACK_TLP): the original and
    the probe both arrived, nothing was lost; the episode ends without a
    congestion response (RFC 8985 §7.4.1)."""
    if sk.tlp_retrans and end == sk.tlp_high_seq:
        sk.tlp_high_seq = -1


def tcp_process_tlp_ack(sh: Shard, sk: TcpSock, ack: int, advanced: bool, not_dup: bool,
                        sacked: bool, now: float) -> None:
    """RFC 8985 §7.4.2 (Linux ``tcp_process_tlp_ack``): what the ACKs at and
    beyond the probe say.  A probe of new data, or a pure duplicate ACK (both
    copies arrived), ends the episode; an ACK beyond TLPHighRxt means the
    probe repaired a loss: one congestion window reduction, as fast recovery
    would have made (``advanced``: SND.UNA moved; ``not_dup``: it carried
    data or a window update; ``sacked``: it SACKed new data)."""
    high = sk.tlp_high_seq
    if ((ack - high) & MASK) & HALF:
        return  # below TLPHighRxt: not yet
    if not sk.tlp_retrans:
        sk.tlp_high_seq = -1
    elif ack != high:
        sk.tlp_high_seq = -1
        cc = sk.cc
        if cc is not None and not sk.in_recovery and not sk.in_loss:
            if sh.tracing:
                sh.tr("tcp_process_tlp_ack")
            # tcp_init_cwnd_reduction + CWR + tcp_end_cwnd_reduction: ssthresh
            # as on a loss, cwnd down to it, back to Open (the undo state kept,
            # a later D-SACK may still show it spurious).
            cc.on_loss(now, ((sk.snd_max - sk.snd_una) & MASK) / sk.mss_cache)
            cc.on_recovery_exit(now)
            sh.stats.tlp_recoveries += 1
    elif not (advanced or not_dup or sacked):
        sk.tlp_high_seq = -1


# -- F-RTO: was the RTO spurious? (RFC 5682 §3.1, SACK-enhanced §4; Linux tcp_process_loss) ----
#
# After an RTO the head segment goes again with cwnd 1.  If the timer fired
# only because the path stalled (a delay spike, not a loss), the originals are
# still on their way, and resending the whole window behind them would be
# needless.  F-RTO does not retransmit more on the first ACK that advances
# SND.UNA: it sends new data instead (step 2b).  The ACKs that follow tell
# the two cases apart: one that acknowledges (cumulatively or selectively)
# data that was never retransmitted means the originals arrived: the RTO was
# spurious and its reduction is undone (step 3b); a duplicate ACK or a SACK of
# only the new data means they did not: conventional recovery goes on (3a).
# Timestamps (Eifel, tcp_input's loss_orig_acked) find the same only when the
# ACK echoes an original's TSval; F-RTO also finds a stall whose first ACK is
# for the retransmission, and works without timestamps.

def _frto_delivered(sk: TcpSock) -> int:
    """Bytes in [retransmitted head's end, recovery point) that are delivered:
    cumulatively acknowledged or SACKed (F-RTO's never-retransmitted data)."""
    una = sk.snd_una
    lo = sk.retrans_hi
    hi = sk.recover
    span = (hi - lo) & MASK
    if span & HALF or span == 0:
        return 0
    acked = (una - lo) & MASK
    if acked & HALF:
        acked = 0
    if acked >= span:
        return span
    start = una if acked else lo
    unsacked = tcp_input.tcp_unsacked_below(sk, una, hi) - tcp_input.tcp_unsacked_below(sk, una, start)
    return span - unsacked


def tcp_frto_start(sh: Shard, sk: TcpSock, new_recovery: bool) -> None:
    """RFC 5682 §3.1 step 1 (Linux ``tcp_enter_loss``, tcp_frto sysctl): F-RTO
    for this RTO unless it interrupts a fast recovery (then loss is already
    known; a repeated timeout of the same data still qualifies, §3.2)."""
    sk.frto = bool(sh.cfg.frto) and (new_recovery or sk.retries > 1)
    if sk.frto:
        sk.frto_sacked = _frto_delivered(sk)


def tcp_process_frto(sh: Shard, sk: TcpSock, acked: int, delivered: int, dup: bool,
                     now: float, rtt: float | None, flight: int) -> bool:
    """One ACK in Loss with F-RTO on (RFC 5682 §3.1 steps 2-3; Linux
    ``tcp_process_loss``).  True when it was handled here: the RTO undone, or
    new data sent in place of retransmissions."""
    una = sk.snd_una
    got = _frto_delivered(sk)
    orig = got > sk.frto_sacked  # never-retransmitted data newly delivered
    sk.frto_sacked = got
    if orig:
        # Step 3b: the originals arrived; the RTO was spurious.
        sk.frto = False
        sh.stats.spurious_rtos += 1
        tcp_input.tcp_try_undo_loss(sh, sk, now)
        return True
    if 0 < ((sk.snd_max - sk.recover) & MASK) < HALF:
        # New data went out (step 2b done): a duplicate ACK or a SACK (of the
        # new data, orig was not) shows the loss was real (step 3a).
        if dup or delivered > acked:
            sk.frto = False
        return False
    if not acked or ((una - sk.recover) & MASK) < HALF:
        return False  # nothing advanced, or everything is acknowledged (step 2a)
    # Step 2b: the first ACK advancing SND.UNA: new data instead of the next
    # retransmissions, if there is any and the peer's window has room.
    sk.recover = sk.snd_max
    sk.frto_sacked = _frto_delivered(sk)
    unsent = sk.sndq_len - ((sk.snd_nxt - una) & MASK)
    room = (una + sk.snd_wnd - sk.snd_nxt) & MASK
    cc = sk.cc
    if unsent <= 0 or room == 0 or room & HALF or cc is None:
        sk.frto = False
        return False
    mss = sk.mss_cache
    cc.on_ack(acked / mss, rtt, now, flight / mss)
    quota = cc.cwnd * mss - tcp_input.tcp_pipe(sk)
    if quota < mss:
        quota = mss  # RFC 5682 step 2b: up to two new segments; at least one
    tcp_output.tcp_write_new(sh, sk, now, quota)
    return True
