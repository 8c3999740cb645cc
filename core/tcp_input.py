"""Receiving segments (Linux ``net/ipv4/tcp_input.c``).

Reading list: RFC 9293 §3.10.7 (SEGMENT ARRIVES), RFC 5961 (blind RST/SYN/data
injection: challenge ACKs), RFC 7323 (PAWS, timestamps, window scale), RFC
2018 (SACK), RFC 2883 (D-SACK), RFC 5681 / RFC 6582 (fast retransmit,
NewReno), RFC 6675 (SACK loss recovery, pipe), RFC 6937 (PRR), RFC 8985
(RACK-TLP), RFC 6298 (RTO), RFC 1122 §4.2.3.2 (delayed ACK).

The fast path (Linux's "header prediction", ``tcp_rcv_established_fast``,
see the essay above it): in ESTABLISHED, a segment with only ACK/PSH set,
exactly the next expected sequence number, nothing out of order, SACKed or
in recovery and an acceptable timestamp needs neither RFC 5961 checks nor
out-of-order handling: its ACK goes straight to ``_clean_rtx_queue`` and its
data to the receive queue.  Everything else takes the slow path through
``tcp_validate_incoming`` in RFC 793's step order, with the same effects.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from . import (
    tcp,
    tcp_delack,
    tcp_ecn,
    tcp_minisocks,
    tcp_mtup,
    tcp_output,
    tcp_pacing,
    tcp_rate,
    tcp_rcvbuf,
    tcp_recovery,
)
from .dropreason import DropReason
from .events import Connected, Readable
from .tcp_cong import CaState
from .tcp_h import (
    HALF,
    MASK,
    TCP_CLOSE_WAIT,
    TCP_CLOSED,
    TCP_CLOSING,
    TCP_ESTABLISHED,
    TCP_FASTRETRANS_THRESH,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TCP_RTO_MIN,
    TCP_SKB_OVERHEAD,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    TCP_URG_NOTYET,
    TCP_URG_VALID,
    BytesLike,
    TcpSegment,
    TcpSock,
    TimerKind,
)
from .wire.checksum import sum16
from .wire.tcp import ACK, ECE, FIN, RST, SYN, URG, TcpOptions

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["tcp_rcv_established", "tcp_rcv_state_process", "tcp_rcv_synsent_state_process",
           "tcp_validate_incoming", "tcp_ack", "tcp_data_queue", "tcp_rtt_estimator",
           "tcp_ack_update_rtt", "tcp_init_transfer", "tcp_send_challenge_ack"]

#: PAWS: a ts_recent older than 24 days is not trusted (RFC 7323 §5.5).
PAWS_24DAYS = 24 * 86400.0
#: Linux TCP_PAWS_WINDOW: a timestamp this many ticks older than TS.Recent still
#: passes PAWS (segments sent in adjacent ms ticks may swap places on the way).
TCP_PAWS_WINDOW = 1
#: Linux sysctl_tcp_invalid_ratelimit: at most one out-of-window ACK per 500 ms.
OOW_RATELIMIT = 0.5
_RETRANSMIT = TimerKind.RETRANSMIT
_DELACK = TimerKind.DELACK
#: tcp_delack's 40 ms floor and the back-to-back inter-arrival bound, for the fast path.
_ATO_MIN = tcp_delack.TCP_ATO_MIN
_ATO_HALF = tcp_delack.TCP_ATO_MIN / 2
_PERSIST = TimerKind.PERSIST
_KEEPALIVE = TimerKind.KEEPALIVE
_REO = TimerKind.REO
_CA_CWR = CaState.CWR  # ECN's reduction (tcp_ecn)
_TLP = TimerKind.TLP
_DATA_STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2)
_NO_DATA = memoryview(b"")


# -- RTT / RTO (RFC 6298) ------------------------------------------------------------------

def tcp_rtt_estimator(sk: TcpSock, rtt: float) -> None:
    """RFC 6298 (2.2)/(2.3): SRTT and RTTVAR with alpha 1/8, beta 1/4."""
    if sk.srtt == 0.0:
        sk.srtt = rtt
        sk.rttvar = rtt / 2
    else:
        sk.rttvar += (abs(sk.srtt - rtt) - sk.rttvar) * 0.25
        sk.srtt += (rtt - sk.srtt) * 0.125


def tcp_set_rto(sk: TcpSock) -> None:
    """RTO = SRTT + max(4 RTTVAR, RTO_MIN): Linux folds its 200 ms floor into the
    variance term (``tcp_set_rto``) rather than RFC 6298 (2.4)'s 1 s floor."""
    var = 4 * sk.rttvar
    sk.rto = sk.srtt + (var if var > TCP_RTO_MIN else TCP_RTO_MIN)
    if sk.rto > 120.0:
        sk.rto = 120.0


def tcp_ack_update_rtt(sh: Shard, sk: TcpSock, rtt: float, now: float) -> None:
    if sh.tracing:
        sh.tr("tcp_ack_update_rtt")
        if rtt >= 0:
            sh.tr("tcp_update_rtt_min")
            sh.tr("tcp_rtt_estimator")
            sh.tr("tcp_set_rto")
    if rtt < 0:
        return
    # tcp_update_rtt_min: the path's minimum over the last tcp_min_rtt_wlen (300 s),
    # for RACK's reordering window and TCP_INFO (win_minmax).
    sk.min_rtt = sk.rtt_min.update(now, rtt)
    # tcp_rtt_estimator and tcp_set_rto inline: this runs for nearly every ACK.
    srtt = sk.srtt
    if srtt == 0.0:
        sk.srtt = srtt = rtt
        sk.rttvar = rttvar = rtt / 2
    else:
        sk.rttvar = rttvar = sk.rttvar + (abs(srtt - rtt) - sk.rttvar) * 0.25
        sk.srtt = srtt = srtt + (rtt - srtt) * 0.125
    var = 4 * rttvar
    rto = srtt + (var if var > TCP_RTO_MIN else TCP_RTO_MIN)
    sk.rto = rto if rto < 120.0 else 120.0


# -- challenge ACKs (RFC 5961) --------------------------------------------------------------

def tcp_send_challenge_ack(sh: Shard, sk: TcpSock, now: float) -> None:
    """RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate limited per socket (RFC 5961 §7)."""
    if sh.tracing:
        sh.tr("tcp_send_challenge_ack")
    _send_oow_ack(sh, sk, now)
    sh.stats.challenge_acks += 1


def _send_oow_ack(sh: Shard, sk: TcpSock, now: float) -> None:
    """ACK an out-of-window segment, at most once per 500 ms (Linux ``tcp_oow_rate_limited``)."""
    if sk.last_oow_ack >= 0 and now - sk.last_oow_ack < OOW_RATELIMIT:
        return
    sk.last_oow_ack = now
    tcp_output.tcp_send_ack(sh, sk, now)


def tcp_segs_in(sk: TcpSock, plen: int) -> None:
    """Count a segment received by a full socket (Linux ``tcp_segs_in``, RFC 4898
    tcpEStatsPerfSegsIn).  A GRO super-frame counts as the segments it was made
    of (Linux uses gso_segs; we divide by the segment size the peer uses, which
    is our send MSS on a symmetric path)."""
    if plen:
        m = sk.mss_cache
        segs = 1 if plen <= m else (plen - 1) // m + 1
        sk.segs_in += segs
        sk.data_segs_in += segs
    else:
        sk.segs_in += 1


def _segs(nbytes: int, mss: int) -> int:
    """Bytes as a segment count (Linux's pcount), at least one."""
    return (nbytes - 1) // mss + 1 if nbytes > mss else 1


# -- the ACK (RFC 9293 §3.10.7.4 "fifth, check the ACK field") -------------------------------

def tcp_ack(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> bool:
    """Process SEG.ACK; False means the segment must be dropped (ACK of unsent data).

    RFC 5961 §5.2: an ACK beyond SND.MAX, or older than SND.UNA - MAX.SNDWND,
    is answered with a challenge ACK / dropped instead of being trusted.
    """
    if sh.tracing:
        sh.tr("tcp_ack")
    ack = seg.ack
    una = sk.snd_una
    d = (ack - una) & MASK
    if d & HALF:  # ack before snd_una
        if ((una - ack) & MASK) > sk.max_window:
            sh.stats.drop(DropReason.TCP_TOO_OLD_ACK)
            tcp_send_challenge_ack(sh, sk, now)
            return False
        if sk.sack_ok and seg.options.sack_blocks and sk.cc is not None:
            # A reordered older ACK may still carry news in its SACK blocks (Linux
            # tcp_ack "old ack" path tags them too).
            _sacktag(sh, sk, seg.options.sack_blocks)
        return True  # old duplicate: ignore the ACK, keep the data
    if d > ((sk.snd_max - una) & MASK):
        sh.stats.drop(DropReason.TCP_ACK_UNSENT_DATA)
        tcp_send_challenge_ack(sh, sk, now)
        return False
    # Window update (RFC 9293 §3.10.7.4: from a segment newer than the last one
    # used) -- and, as Linux's tcp_may_update_window, from any ACK that advances
    # SND.UNA: the offered window is relative to SEG.ACK, so moving SND.UNA while
    # keeping an older SND.WND would place our idea of the peer's right edge
    # beyond what it ever offered (a retransmission carrying a newer ACK has an
    # older SEG.SEQ), and we would send data it must drop.
    wnd = seg.window << sk.snd_wscale
    seq = seg.seq
    wl1 = sk.snd_wl1
    if sh.tracing:
        sh.tr("tcp_ack_update_window")
    window_changed = False
    if d or (((seq - wl1) & MASK) < HALF
             and (seq != wl1 or ((ack - sk.snd_wl2) & MASK) < HALF)):
        if wnd != sk.snd_wnd:
            window_changed = True
            sk.snd_wnd = wnd
            if wnd > sk.max_window:
                sk.max_window = wnd
        sk.snd_wl1 = seq
        sk.snd_wl2 = ack
    sk.probes = 0  # the peer answers: keepalive / zero-window probing start over
    sk.err_soft = 0  # something got through: forget a soft ICMP error (Linux tcp_ack)
    if sh.tracing:
        sh.tr("tcp_ecn_rcv_ecn_echo")
    ece = seg.flags & ECE and sk.ecn_flags
    if ece:  # RFC 3168 §6.1.2: reduce before this ACK grows anything (tcp_ecn)
        prior_delivered = sk.delivered
        tcp_ecn.tcp_ecn_rcv_ecn_echo(sh, sk, now)
    if d == 0:
        newly_sacked = 0
        if sk.sack_ok and seg.options.sack_blocks:
            prior = sk.sacked_bytes
            _sacktag(sh, sk, seg.options.sack_blocks)
            newly_sacked = sk.sacked_bytes - prior
        # RFC 5681 §2 duplicate ACK; with SACK, RFC 6675 §2's: an ACK that SACKs
        # new data (it may carry data or a window update; a duplicated ACK, which
        # SACKs nothing new, does not count).
        if sk.sack_ok:
            dup = newly_sacked > 0
        else:
            dup = (sk.snd_max != una and not seg.payload and not seg.flags & (SYN | FIN)
                   and not window_changed and sk.state is not TCP_SYN_RECV)
        if newly_sacked > 0:
            _rate_sample(sh, sk, tcp_rate.tcp_rate_sack_end(sk, seg.options.sack_blocks), now)
        if sk.tlp_high_seq >= 0:
            tcp_recovery.tcp_process_tlp_ack(sh, sk, ack, False, bool(seg.payload) or window_changed,
                                             newly_sacked > 0, now)
        if sk.cc is not None and (dup or sk.in_recovery or sk.in_loss):
            tcp_fastretrans_alert(sh, sk, 0, newly_sacked, dup, now)
        elif window_changed and sk.snd_wnd:
            _window_opened(sh, sk, now)
        if ece:
            tcp_ecn.tcp_ecn_delivered_ce(sh, sk, sk.delivered - prior_delivered)
        return True
    ts = seg.options.ts
    _clean_rtx_queue(sh, sk, ack, ts[1] if ts is not None else 0, seg.options.sack_blocks, d, now)
    if ece:
        tcp_ecn.tcp_ecn_delivered_ce(sh, sk, sk.delivered - prior_delivered)
    return True


def _window_opened(sh: Shard, sk: TcpSock, now: float) -> None:
    if sk.timers[_PERSIST] is not None:
        sk.timers[_PERSIST] = None
        sk.probes = 0
        sk.probes_tstamp = None
        sk.backoff = 0


def _clean_rtx_queue(sh: Shard, sk: TcpSock, ack: int, tsecr: int, blocks: tuple[tuple[int, int], ...], acked: int,
                     now: float) -> None:
    """New data acknowledged (``acked`` bytes of sequence space up to ``ack``):
    free it, sample RTT (``tsecr``: the echoed timestamp, 0 if none), feed
    congestion control and loss recovery (``blocks``: the ACK's SACK blocks),
    re-arm the RTO (Linux ``tcp_clean_rtx_queue`` and what ``tcp_ack`` does after it).

    The common case (nothing SACKed, not recovering) is the first branch below
    and is what header prediction runs for every ACK of a bulk transfer.
    """
    una = sk.snd_una
    in_flight_before = (sk.snd_nxt - una) & MASK
    if in_flight_before & HALF:
        in_flight_before = 0
    sacked = sk.sacked
    if sacked:
        # A hole filled below SACKed data by its original transmission: reordering.
        j = bisect.bisect_left(sacked, acked, key=lambda b: (b[0] - una) & MASK)
        if tcp_recovery.tcp_rack_check_reordering(sk, 0, acked, [((b[0] - una) & MASK, (b[1] - una) & MASK)
                                                  for b in sacked[:j]]):
            sk.reord_events += 1
    data = acked
    if sk.fin_sent and ack == ((sk.fin_seq + 1) & MASK):
        data -= 1
    if una == sk.iss and sk.state is TCP_SYN_RECV:  # this ACK also covers our SYN
        data -= 1
    qlen = sk.sndq_len
    if data > qlen:
        data = qlen
    if data > 0:
        # Free the acknowledged bytes from the send queue's head (chunk 0 starts
        # at SND.UNA, ``sndq_head_off`` of it already gone).
        sk.sndq_len = qlen - data
        off = sk.sndq_head_off + data
        q = sk.sndq
        while q:
            first = len(q[0])
            if off < first:
                break
            off -= first
            q.popleft()
        sk.sndq_head_off = off
    sk.snd_una = ack
    if sk.mtup_probe_size:
        tcp_mtup.tcp_mtup_acked(sh, sk, ack)  # did the PLPMTUD probe get through?
    if ((ack - sk.snd_nxt) & MASK) < HALF:
        sk.snd_nxt = sk.snd_max = ack  # defensive: SND.NXT never lags the peer
        sk.seg_min = 65535  # nothing in flight: the next flight sets it
    # RTT sample: timestamps (RFC 7323 §4.1) or Karn's timed segment (RFC 6298 (3)).
    rtt = None
    if tsecr and sk.ts_ok:
        if sk.in_loss and ((tsecr - sk.rto_ts) & MASK) & HALF:
            # The echo predates our RTO retransmission: the peer got the original
            # and its ACK was lost, so this "RTT" is mostly the RTO wait (RFC 3522's
            # observation; Karn's rule in timestamp form).  No sample.
            rtt = None
            if sk.undo_active and ((tsecr - sk.loss_tsval) & MASK) & HALF:
                # Older than the episode's first retransmission: this ACK was sent
                # for an original transmission (Eifel detection, RFC 3522 §3.2;
                # Linux tcp_packet_delayed): the RTO may have been spurious.
                sk.loss_orig_acked = True
        else:
            rtt = (((int(now * 1000) + sk.ts_off) - tsecr) & MASK) / 1000.0
            if rtt > 60.0:
                rtt = None
    elif sk.rtt_seq >= 0 and ((ack - sk.rtt_seq) & MASK) < HALF:
        rtt = now - sk.rtt_time
        sk.rtt_seq = -1
    if rtt is not None:
        tcp_ack_update_rtt(sh, sk, rtt, now)
    sk.backoff = 0
    sk.retries = 0
    sk.probes = 0
    cc = sk.cc
    mss = sk.mss_cache
    if cc is not None and not (sacked or sk.in_recovery or sk.in_loss
                               or (blocks and sk.sack_ok)):
        sk.retrans_stamp = None
        sk.dupacks = 0
        sk.delivered += (data - 1) // mss + 1 if data > mss else 1
        if cc.ca_state is not _CA_CWR:
            cc.on_ack(acked / mss, rtt, now, in_flight_before / mss)
        else:
            tcp_ecn.tcp_cwr_ack(sk, acked, rtt, now)  # ECN's reduction (RFC 3168 §6.1.2)
        # tcp_rate: the delivery clock moves on every ACK; on this path a full
        # sample is taken once a round trip (when the data sent at the last one
        # is acknowledged), on every ACK only for a paced socket.
        sk.delivered_mstamp = now
        if sk.pacing_needed or ((ack - sk.rate_round_end) & MASK) < HALF:
            _rate_sample(sh, sk, ack, now)
    elif cc is not None:
        prior = sk.sacked_bytes
        latest = _fresh_end(sk, una, ack, acked)
        if sacked:
            _sack_prune(sh, sk)
        # Segments delivered by the cumulative ACK that were not SACKed before
        # (those were counted when SACKed; Linux tcp_clean_rtx_queue).
        fresh = data - (prior - sk.sacked_bytes)
        if fresh > 0 or data <= 0:
            sk.delivered += _segs(fresh, mss)
        if blocks and sk.sack_ok:
            before = sk.sacked_bytes
            _sacktag(sh, sk, blocks)
            if sk.sacked_bytes > before:
                end = tcp_rate.tcp_rate_sack_end(sk, blocks)
                if ((end - una) & MASK) > ((latest - una) & MASK):
                    latest = end  # sent later than the cumulatively acked part
        _rate_sample(sh, sk, latest, now)
        # RFC 6937 DeliveredData = change in SND.UNA + change in SACKed bytes.
        tcp_fastretrans_alert(sh, sk, acked, acked + sk.sacked_bytes - prior, False, now,
                              rtt, in_flight_before)
        if not sk.in_recovery and not sk.in_loss:
            sk.retrans_stamp = None  # no retransmission outstanding (Linux tcp_retrans_stamp_cleanup)
    else:
        sk.retrans_stamp = None
        sk.dupacks = 0
        sk.delivered += _segs(data, mss)
    if sk.tlp_high_seq >= 0:
        tcp_recovery.tcp_process_tlp_ack(sh, sk, ack, True, True, False, now)
    timers = sk.timers
    if ack == sk.snd_max:
        timers[_RETRANSMIT] = None
        timers[_TLP] = None
        ctype = sk.chrono_type
        if ctype and not sk.sndq_len:
            # All acknowledged: tcp_chrono_stop(BUSY) with nothing queued closes the
            # timed interval and stops the clock (inline: once per flight).
            sk.chrono_stat[ctype - 1] += now - sk.chrono_start
            sk.chrono_type = 0
            sk.chrono_start = now
    else:
        rto = sk.rto  # tcp_rto(sk) with the backoff just cleared
        # RFC 6298 (5.3), lazily as Linux's inet_csk_reset_xmit_timer: the heap is
        # touched only when the deadline moves earlier than its queued entry
        # (``tcp_timer.TimerHeap.arm``'s rule, checked here without the call).
        deadline = now + rto
        timers[_RETRANSMIT] = deadline
        queued = sk.timer_q[_RETRANSMIT]
        if queued is None or queued > deadline:
            sh.timers.arm(sk, _RETRANSMIT, deadline)
        if sk.sack_ok and not sk.in_recovery and not sk.in_loss:
            tcp_recovery.tcp_schedule_loss_probe(sh, sk, now, rto)
    if sk.snd_wnd and timers[_PERSIST] is not None:
        _window_opened(sh, sk, now)
    if sk.write_blocked:
        tcp.tcp_check_writable(sh, sk)


def _rate_sample(sh: Shard, sk: TcpSock, end: int, now: float) -> None:
    """After an ACK delivered data (the latest sent of it ending before ``end``):
    one delivery-rate sample (tcp_rate), then, on a paced socket, the pacing
    rate from the updated window and SRTT (Linux tcp_ack -> tcp_rate_gen,
    tcp_cong_control -> tcp_update_pacing_rate; an unpaced socket's rate is
    computed when read, tcp_pacing.tcp_pacing_rate)."""
    tcp_rate.tcp_rate_gen(sk, end, now)
    if sk.pacing_needed:
        tcp_pacing.tcp_update_pacing_rate(sh, sk)


def _fresh_end(sk: TcpSock, una: int, ack: int, acked: int) -> int:
    """Where the data a cumulative ACK from ``una`` to ``ack`` newly delivers
    ends: ``ack``, unless SACKed data (delivered before) ends the range, then
    the start of that SACKed run (``una``: nothing new).  Before the scoreboard
    is pruned (Linux skips SACKed skbs in ``tcp_rate_skb_delivered``)."""
    sacked = sk.sacked
    if not sacked:
        return ack
    j = bisect.bisect_left(sacked, acked, key=lambda b: (b[0] - una) & MASK)
    if j:
        b = sacked[j - 1]
        if ((b[1] - una) & MASK) >= acked:
            return b[0]
    return ack


def _sacktag(sh: Shard, sk: TcpSock, blocks: tuple[tuple[int, int], ...]) -> None:
    """Merge the peer's SACK blocks into the scoreboard (RFC 2018 §3, RFC 6675 §4).

    Linux ``tcp_sacktag_write_queue``.  Blocks outside (SND.UNA, SND.MAX] are
    ignored; a first block below SND.UNA or inside the second one is a D-SACK
    (RFC 2883 §4) and only counted.
    """
    una = sk.snd_una
    span = (sk.snd_max - una) & MASK
    first = blocks[0]
    if ((first[0] - una) & MASK) & HALF or (
            len(blocks) > 1 and ((first[0] - blocks[1][0]) & MASK) < HALF
            and ((blocks[1][1] - first[1]) & MASK) < HALF):
        sh.stats.dsacks_recv += 1
        sk.dsack_dups += _segs((first[1] - first[0]) & MASK, sk.mss_cache)  # Linux tcp_check_dsack
        # RFC 8985 §6.2.4: a D-SACK means we retransmitted needlessly, likely
        # because of reordering: widen RACK's reordering window (once per RTT).
        if sk.reo_wnd_mult < 16 and sh.now >= sk.reo_wnd_bumped + sk.srtt:
            sk.reo_wnd_mult += 1
            sk.reo_wnd_bumped = sh.now
            sk.reo_wnd_persist = 16
        if sk.tlp_high_seq >= 0:
            tcp_recovery.tcp_tlp_dsack(sk, first[0], first[1])
        if sk.undo_active and ((first[0] - sk.undo_marker) & MASK) < HALF:
            sk.undo_retrans -= 1
            if sk.undo_retrans <= 0 and not sk.in_recovery and not sk.in_loss:
                tcp_try_undo_dsack(sh, sk)
    sacked = sk.sacked
    # Only blocks that cover whole segments count (Linux tcp_match_skb_to_sack
    # marks an skb only when a block covers all of it): a block narrower than
    # the smallest segment of this flight, unless it ends at SND.MAX (a short
    # tail), is ignored.  A peer SACKing single bytes can then neither split
    # our retransmissions nor grow the scoreboard past one entry per segment
    # in flight (CVE-2019-11477's class); with the MSS floor, that bounds it.
    thr = sk.mss_cache if sk.mss_cache < sk.seg_min else sk.seg_min
    new = []
    for left, right in blocks:
        lo = (left - una) & MASK
        hi = (right - una) & MASK
        if lo < hi <= span and (hi - lo >= thr or hi == span):
            new.append((lo, hi))
    if not new:
        return
    sk.rack_sacked_new = [((una + lo) & MASK, (una + hi) & MASK) for lo, hi in new]
    reordered = False
    for lo, hi in new:
        i, j = _sacked_span(sacked, una, lo, hi)
        if tcp_recovery.tcp_rack_check_reordering(
                sk, lo, hi, [((b[0] - una) & MASK, (b[1] - una) & MASK) for b in sacked[i:j]]):
            reordered = True
    if reordered:
        sk.reord_events += 1  # once per ACK, as Linux tcp_check_sack_reordering
    total = sk.sacked_bytes
    before = total
    for lo, hi in new:
        # The blocks [lo, hi] touches merge with it into one: O(log n) to find
        # them, a slice replacement to merge (the scoreboard stays sorted by
        # offset from SND.UNA, disjoint, with gaps between entries).
        i, j = _sacked_span(sacked, una, lo, hi)
        if i == j and len(sacked) >= TCP_SACK_MAX_ENTRIES:
            # A new entry past the cap: ignored (it merges with nothing).  Each
            # scoreboard walk per ACK (pipe, NextSeg, RACK) is then bounded;
            # a receiver with this many separate holes in one window is better
            # served by the RTO anyway.
            sh.stats.sack_capped += 1
            continue
        if i < j:
            lo0 = (sacked[i][0] - una) & MASK
            hi0 = (sacked[j - 1][1] - una) & MASK
            for b in sacked[i:j]:
                total -= (b[1] - b[0]) & MASK
            if lo0 < lo:
                lo = lo0
            if hi0 > hi:
                hi = hi0
        sacked[i:j] = [[(una + lo) & MASK, (una + hi) & MASK]]
        total += hi - lo
    if total > before:
        sk.delivered += _segs(total - before, sk.mss_cache)  # newly SACKed
    sk.sacked_bytes = total


def tcp_try_undo_loss(sh: Shard, sk: TcpSock, now: float) -> None:
    """A spurious RTO (Linux ``tcp_try_undo_loss``; RFC 4015's response to an Eifel
    detection): new data was acknowledged by an ACK that the original
    transmission triggered, so nothing was lost: restore cwnd and ssthresh,
    leave Loss, forget the lost marks, and go on with new data."""
    if sh.tracing:
        sh.tr("tcp_try_undo_loss")
    cc = sk.cc
    assert cc is not None  # in Loss: synchronized
    cc.undo()
    sk.undo_active = False
    sk.in_loss = False
    una = sk.snd_una
    sk.lost_hi = sk.retrans_hi = una
    sk.rtx_log.clear()
    sk.relost.clear()
    sk.dupacks = 0
    sh.stats.rto_undos += 1
    tcp_output.tcp_write_xmit(sh, sk, now)


#: Most disjoint ranges the SACK scoreboard keeps (see ``_sacktag``).
TCP_SACK_MAX_ENTRIES = 256


def _sacked_span(sacked: list[list[int]], una: int, lo: int, hi: int) -> tuple[int, int]:
    """Indices [i, j) of the scoreboard entries that overlap or touch [lo, hi]
    (offsets from SND.UNA), by bisection."""
    i = bisect.bisect_left(sacked, lo, key=lambda b: (b[1] - una) & MASK)
    j = bisect.bisect_right(sacked, hi, lo=i, key=lambda b: (b[0] - una) & MASK)
    return i, j


def sacked_from(sk: TcpSock, una: int, off: int) -> int:
    """Index of the first scoreboard entry ending after offset ``off`` from SND.UNA."""
    return bisect.bisect_right(sk.sacked, off, key=lambda b: (b[1] - una) & MASK)


def tcp_try_undo_dsack(sh: Shard, sk: TcpSock) -> None:
    """Every retransmission of the last episode came back as a D-SACK: the
    receiver had it all, the reduction was spurious (RFC 2883 §5, Linux
    ``tcp_try_undo_dsack``); restore cwnd and ssthresh."""
    sk.undo_active = False
    if sk.cc is not None:
        sk.cc.undo()
        sh.stats.dsack_undos += 1


def _sack_prune(sh: Shard, sk: TcpSock) -> None:
    """Forget SACKed ranges the cumulative ACK now covers.

    An ACK that stops exactly where SACKed data begins means the receiver
    dropped what it had SACKed (reneging, RFC 2018 §8; Linux
    ``tcp_check_sack_reneging``): the scoreboard is cleared so the data is
    sent again.
    """
    una = sk.snd_una
    sacked = sk.sacked
    # The blocks that end at or before SND.UNA are a prefix (the scoreboard is
    # sorted and disjoint): found by bisection, dropped with one slice.
    k = bisect.bisect_left(sacked, 1, key=lambda b: 0 if ((b[1] - una) & MASK) - 1 & HALF else 1)
    total = sk.sacked_bytes
    for i in range(k):
        b = sacked[i]
        total -= (b[1] - b[0]) & MASK
    if k:
        del sacked[:k]
    if sacked:
        first = sacked[0]
        if ((first[0] - una) & MASK) & HALF:  # straddles SND.UNA: trim it
            total -= (una - first[0]) & MASK
            first[0] = una
        if first[0] == una:
            sh.stats.sack_reneging += 1
            sacked.clear()
            total = 0
    sk.sacked_bytes = total


# -- loss recovery (Linux tcp_fastretrans_alert; RFC 6675, RFC 6937, RFC 6582) --------------
#
# The sender's view of its flight is the RFC 6675 scoreboard: ``sacked`` (what
# the peer SACKed), ``lost_hi`` (un-SACKed data below it is lost: IsLost) and
# ``retrans_hi`` (HighRxt: un-SACKed data below it was retransmitted).  From
# them ``tcp_pipe`` computes RFC 6675's pipe.  Fast recovery sends what
# Proportional Rate Reduction allows (``prr_quota``, RFC 6937), so cwnd comes
# down smoothly to ssthresh instead of being inflated by every dup ACK; after
# an RTO (``in_loss``) everything outstanding and un-SACKed is lost and slow
# start from one segment resends it hole by hole.  SND.NXT is never rewound:
# retransmissions are chosen by NextSeg (``tcp_output.tcp_xmit_retransmit_queue``)
# and never cover cumulatively acknowledged or SACKed data.  Without SACK the
# same machinery runs NewReno (RFC 6582): dup ACKs stand in for SACKed
# segments (``reno_sacked``) and each partial ACK marks the next segment lost.



def tcp_unsacked_below(sk: TcpSock, una: int, top: int) -> int:
    """Bytes in [una, top) that the peer has not SACKed.

    Bisection finds the blocks that start below ``top``; the SACKed bytes are
    then summed over the shorter side (below, or above with ``sacked_bytes``
    as the total): the lost boundary sits near the top of the scoreboard
    (RFC 6675 IsLost) and HighRxt near the bottom early in recovery, so each
    call of ``tcp_pipe`` walks a few blocks, not a full scoreboard.
    """
    off = (top - una) & MASK
    if off & HALF or off == 0:
        return 0
    blocks = sk.sacked
    n = len(blocks)
    if not n:
        return off
    k = bisect.bisect_left(blocks, off, key=lambda b: (b[0] - una) & MASK)  # start < off
    if k <= n - k:
        got = 0
        for i in range(k):
            b = blocks[i]
            lo = (b[0] - una) & MASK
            hi = (b[1] - una) & MASK
            got += (hi if hi < off else off) - lo
        return off - got
    above = 0
    for i in range(k, n):
        b = blocks[i]
        above += (b[1] - b[0]) & MASK
    if k:
        hi = (blocks[k - 1][1] - una) & MASK
        if hi > off:
            above += hi - off
    return off - (sk.sacked_bytes - above)


def tcp_pipe(sk: TcpSock) -> int:
    """RFC 6675 §4 pipe, in bytes: un-SACKed data not deemed lost, plus retransmissions."""
    una = sk.snd_una
    flight = (sk.snd_max - una) & MASK
    if flight & HALF:
        return 0
    pipe = flight - (sk.sacked_bytes if sk.sack_ok else sk.reno_sacked)
    if 0 < ((sk.lost_hi - una) & MASK) < HALF:
        pipe -= tcp_unsacked_below(sk, una, sk.lost_hi)
    if 0 < ((sk.retrans_hi - una) & MASK) < HALF:
        pipe += tcp_unsacked_below(sk, una, sk.retrans_hi)
    for s, e in sk.relost:
        # A retransmission found lost again has left the network (RACK, RFC
        # 8985 §6.2; Linux drops it from retrans_out): counting it would hold
        # PRR's quota at zero with a small ssthresh, and only the RTO would
        # resend it.
        if ((s - una) & MASK) & HALF:
            s = una
        pipe -= tcp_unsacked_below(sk, una, e) - tcp_unsacked_below(sk, una, s)
    return pipe if pipe > 0 else 0


def _lost_boundary(sk: TcpSock) -> int:
    """The highest L such that IsLost(S) holds for every un-SACKed S < L (RFC 6675 §4).

    IsLost(S): DupThresh discontiguous SACKed ranges, or more than
    (DupThresh - 1) * SMSS SACKed bytes, above S.  Walking the scoreboard down
    from the top, L is the start of the block where either count is reached.
    """
    limit = (TCP_FASTRETRANS_THRESH - 1) * sk.mss_cache
    got = 0
    blocks = sk.sacked
    for i in range(len(blocks) - 1, -1, -1):
        b = blocks[i]
        got += (b[1] - b[0]) & MASK
        if got > limit or len(blocks) - i >= TCP_FASTRETRANS_THRESH:
            return b[0]
    return sk.snd_una


def tcp_mark_lost(sk: TcpSock, seq: int) -> None:
    if 0 < ((seq - sk.lost_hi) & MASK) < HALF:
        sk.lost_hi = seq


def tcp_fastretrans_alert(sh: Shard, sk: TcpSock, acked: int, delivered: int, dup: bool,
                          now: float, rtt: float | None = None, flight: int = 0) -> None:
    """What an ACK means for loss recovery (Linux ``tcp_fastretrans_alert``).

    ``acked``: bytes SND.UNA advanced; ``delivered``: RFC 6937 DeliveredData;
    ``dup``: a duplicate ACK (RFC 5681 / RFC 6675 §2); ``flight``: bytes in
    flight before the ACK.  With SACK, RACK (RFC 8985) first learns what the
    ACK delivered (``tcp_rack_advance``), then marks losses by send time
    (``tcp_rack_detect_loss``) alongside RFC 6675's IsLost.
    """
    cc = sk.cc
    assert cc is not None  # every caller checked: a synchronized socket
    mss = sk.mss_cache
    una = sk.snd_una
    rack = sk.sack_ok
    if rack:
        tcp_recovery.tcp_rack_advance(sk, (una - acked) & MASK, now)
    if sk.in_loss:
        if sk.loss_orig_acked:
            sk.loss_orig_acked = False
            if acked and sk.undo_active:
                tcp_try_undo_loss(sh, sk, now)
                return
        if sk.frto and tcp_recovery.tcp_process_frto(sh, sk, acked, delivered, dup, now, rtt, flight):
            return
        if acked and ((una - sk.recover) & MASK) < HALF:
            # Everything outstanding at the RTO is acked: back to Open (RFC 6582 §4 / Linux).
            sk.in_loss = False
            sk.lost_hi = sk.retrans_hi = una
            tcp_recovery.tcp_rack_keep_in_flight(sk, False)
            sk.dupacks = 0
            cc.on_ack(acked / mss, rtt, now, flight / mss)
            cc.on_recovery_exit(now)
            if sk.undo_active and sk.undo_retrans <= 0:
                tcp_try_undo_dsack(sh, sk)
            return
        if acked:
            cc.on_ack(acked / mss, rtt, now, flight / mss)  # slow start from the loss window
        if sk.sacked:
            tcp_mark_lost(sk, _lost_boundary(sk))
        if rack:
            lost_to = tcp_recovery.tcp_rack_detect_loss(sh, sk, now)
            if lost_to is not None:
                tcp_mark_lost(sk, lost_to)
        tcp_output.tcp_write_xmit(sh, sk, now)
        return
    if sk.in_recovery:
        if acked and ((una - sk.recover) & MASK) < HALF:
            # RFC 6582 §3.2 step 5 / RFC 6675 §5: full acknowledgment ends recovery;
            # RFC 6937: cwnd = ssthresh.
            sk.in_recovery = False
            sk.dupacks = 0
            sk.reno_sacked = 0
            sk.lost_hi = sk.retrans_hi = una
            tcp_recovery.tcp_rack_keep_in_flight(sk, False)
            sk.timers[_REO] = None
            cc.on_recovery_exit(now)
            if sk.undo_active and sk.undo_retrans <= 0:
                tcp_try_undo_dsack(sh, sk)
            return
        lost_before = sk.lost_hi
        relost_before = len(sk.relost)
        if rack:
            tcp_mark_lost(sk, _lost_boundary(sk))
            lost_to = tcp_recovery.tcp_rack_detect_loss(sh, sk, now)
            if lost_to is not None:
                tcp_mark_lost(sk, lost_to)
        else:
            if dup:
                sk.dupacks += 1
                _reno_add_sack(sk)
                delivered = mss
            if acked:
                # RFC 6582 §3.2 step 5: a partial ACK; the first unacknowledged
                # segment is lost too, and the dup ACKs it covered are used up.
                sh.stats.partial_acks += 1
                sk.reno_sacked = max(sk.reno_sacked - acked, 0)
                tcp_mark_lost(sk, (una + mss) & MASK)
        if acked and ((sk.retrans_hi - una) & MASK) & HALF:
            sk.retrans_hi = una
        # PRR's slow-start bound may add a segment only on an ACK that advanced
        # SND.UNA and found nothing newly lost (Linux tcp_cwnd_reduction).
        tcp_cwnd_reduction(sk, delivered, bool(acked) and sk.lost_hi == lost_before
                           and len(sk.relost) == relost_before)
        tcp_output.tcp_write_xmit(sh, sk, now)
        return
    # Open / Disorder.
    if acked:
        sk.dupacks = 0
        cc.on_ack(acked / mss, rtt, now, flight / mss)
    if dup:
        sk.dupacks += 1
        cc.on_dup_ack()
    enter = False
    if sk.dupacks:
        in_flight = ((sk.snd_max - una) & MASK) / mss
        dupthresh = TCP_FASTRETRANS_THRESH
        if not rack and in_flight < 4 and sk.sndq_len <= ((sk.snd_nxt - una) & MASK):
            # RFC 5827 early retransmit: with fewer than 4 segments outstanding and
            # nothing new to send, three dup ACKs can never come.  Not with SACK:
            # RACK's reordering window covers it there (Linux dropped early
            # retransmit for RACK; rack/rack-reorder-timer.pkt).
            dupthresh = max(int(in_flight + 0.999) - 1, 1)
        enter = sk.dupacks >= dupthresh
    lost_to = None
    if sk.sacked and rack:
        # RFC 8985 §6.2: data sent before the latest-sent delivered segment, and
        # not delivered within a reordering window of it, is lost; the REO
        # timer covers what is still inside its window.
        lost_to = tcp_recovery.tcp_rack_detect_loss(sh, sk, now)
        if not enter:
            # RFC 6675 §5: IsLost(HighACK + 1) also starts recovery.
            enter = lost_to is not None or 0 < ((_lost_boundary(sk) - una) & MASK) < HALF
    if enter:
        tcp_enter_recovery(sh, sk, now, lost_to, delivered=delivered)
        return
    if dup:
        # RFC 3042 limited transmit: each of the first two dup ACKs may send new data.
        tcp_output.tcp_write_xmit(sh, sk, now)


def _reno_add_sack(sk: TcpSock) -> None:
    """Without SACK each dup ACK means one more segment left the network (Linux
    ``tcp_add_reno_sack``), never more than what is outstanding beyond the hole."""
    room = ((sk.snd_max - sk.snd_una) & MASK) - sk.mss_cache
    n = sk.reno_sacked + sk.mss_cache
    sk.reno_sacked = n if n < room else max(room, 0)


def tcp_enter_recovery(sh: Shard, sk: TcpSock, now: float, lost_to: int | None = None,
                       delivered: int = 0) -> None:
    """Fast retransmit + fast recovery (RFC 6675 §5 steps 4.1-4.3, RFC 6937 init).

    ``lost_to``: RACK found everything un-SACKed below it lost.  ``delivered``:
    the DeliveredData of the ACK that started recovery, which PRR counts like
    any later one (Linux runs tcp_cwnd_reduction on that ACK too): with a
    small window it lets a new segment go with the fast retransmit, so an ACK
    still comes back if the retransmission or its ACK is lost.
    """
    if sk.mtup_probe_size and tcp_mtup.tcp_mtup_probe_failed(sh, sk, now):
        return  # the lost PLPMTUD probe was too big, no congestion (tcp_mtup)
    if sh.tracing:
        sh.tr("tcp_enter_recovery")
    una = sk.snd_una
    mss = sk.mss_cache
    flight = (sk.snd_max - una) & MASK
    cc = sk.cc
    assert cc is not None  # dup ACKs or RACK: synchronized
    cc.on_loss(now, flight / mss)
    sk.in_recovery = True
    if sk.retrans_stamp is None:
        sk.retrans_stamp = now  # the fast retransmission below starts the episode
    sk.recover = sk.snd_max  # RecoveryPoint = HighData
    sk.rtt_seq = -1  # Karn: no RTT from retransmitted data
    sk.retrans_hi = una
    sk.lost_hi = una
    if sk.sack_ok:
        tcp_mark_lost(sk, _lost_boundary(sk))
    else:
        sk.reno_sacked = 0
        for _ in range(min(sk.dupacks, 64)):
            _reno_add_sack(sk)
    tcp_mark_lost(sk, (una + mss) & MASK)  # (4.3): the first segment is lost
    if lost_to is not None:
        tcp_mark_lost(sk, lost_to)
    sk.timers[_TLP] = None
    sk.tlp_high_seq = -1  # the episode is fast recovery's now (Linux tcp_init_cwnd_reduction)
    sk.prr_delivered = 0
    sk.prr_out = 0
    sk.recover_fs = flight if flight > 0 else 1
    tcp_recovery.tcp_rack_keep_in_flight(sk, True)  # not resent while still on their way
    sh.stats.fast_retrans += 1
    sk.recoveries += 1
    sk.undo_active = True  # Linux tcp_init_undo
    sk.undo_marker = una
    sk.undo_retrans = 0
    tcp_ecn.tcp_ecn_queue_cwr(sk)
    if sk.reo_wnd_persist:
        sk.reo_wnd_persist -= 1
        if not sk.reo_wnd_persist:
            sk.reo_wnd_mult = 1  # RFC 8985 §6.2.4: back to 1 after 16 recoveries
    tcp_cwnd_reduction(sk, delivered)
    if sk.prr_quota <= 0:
        sk.prr_quota = mss  # RFC 6937 §3.1: the fast retransmit itself always goes
    tcp_output.tcp_write_xmit(sh, sk, now)


def tcp_cwnd_reduction(sk: TcpSock, delivered: int, ssrb: bool = False) -> None:
    """RFC 6937 §3.1 on each ACK in recovery (Linux ``tcp_cwnd_reduction``): how much
    may be sent (``prr_quota``).

    While pipe exceeds ssthresh, send in proportion to what was delivered
    (ssthresh / RecoverFS); below it, send what was delivered and not yet
    sent again (PRR-CRB), one segment more only when ``ssrb`` (PRR-SSRB, as
    Linux 6.x: an ACK that advanced SND.UNA and marked nothing newly lost),
    never beyond ssthresh.
    """
    cc = sk.cc
    assert cc is not None  # in recovery or Loss: synchronized
    mss = sk.mss_cache
    if delivered > 0:
        sk.prr_delivered += delivered
    pipe = tcp_pipe(sk)
    ssthresh = cc.ssthresh * mss
    if pipe > ssthresh:
        sndcnt = -(-sk.prr_delivered * ssthresh // sk.recover_fs) - sk.prr_out
    else:
        limit = sk.prr_delivered - sk.prr_out
        if delivered > limit:
            limit = delivered
        if ssrb:
            limit += mss
        room = ssthresh - pipe
        sndcnt = room if room < limit else limit
    sk.prr_quota = sndcnt if sndcnt > 0 else 0
    w = (pipe + sk.prr_quota) // mss
    cc.cwnd = w if w > 1 else 1  # Linux: snd_cwnd = in_flight + sndcnt


# -- receiving data (RFC 9293 §3.10.7.4 "seventh, process the segment text") ---------------

def tcp_data_queue(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> None:
    """Queue in-order data, keep out-of-order data for later, handle the FIN."""
    if sh.tracing:
        sh.tr("tcp_data_queue")
    data = seg.payload
    n = len(data)
    fin = seg.flags & FIN
    if n == 0 and not fin:
        return
    if n and sk.ecn_flags:
        tcp_ecn.tcp_ecn_rcv_data(sk, seg)  # CWR and CE (RFC 3168 §6.1.3)
    seq = seg.seq
    if seg.flags & SYN:
        seq = (seq + 1) & MASK
    rcv_nxt = sk.rcv_nxt
    quick = False
    if seq != rcv_nxt:
        d = (seq - rcv_nxt) & MASK
        if d & HALF:
            # Starts before RCV.NXT: a retransmission overlapping what we have.
            behind = (rcv_nxt - seq) & MASK
            if behind >= n and not (fin and behind == n):
                sh.stats.drop(DropReason.TCP_OLD_DATA)
                sk.ack_now = True  # RFC 9293: ACK a duplicate so the peer resyncs
                if n:
                    _dsack_set(sh, sk, seq, (seq + n) & MASK)
                    sh.stats.delayed_ack_lost += 1
                    tcp_delack.tcp_enter_quickack_mode(sk)  # Linux tcp_data_queue
                return
            if behind:
                _dsack_set(sh, sk, seq, rcv_nxt)
            data = data[behind:]
            n = len(data)
            seq = rcv_nxt
        else:
            _ofo_insert(sh, sk, seq, data, fin, now)
            return
    # In order.
    rwin = (sk.rcv_wup + sk.rcv_wnd - rcv_nxt) & MASK
    if n and (rwin == 0 or rwin & HALF):
        # Linux tcp_data_queue: zero window, in-order data is dropped and ACKed.
        sh.stats.drop(DropReason.TCP_ZEROWINDOW)
        sk.ack_now = True
        return
    if n and not _rmem_ok(sh, sk, n, seq):
        sh.stats.drop(DropReason.PROTO_MEM)
        sk.ack_now = True
        return
    if n:
        if n > sk.rcv_mss:
            sk.rcv_mss = n if n < sk.adv_mss else sk.adv_mss
        sk.rcvq.append(bytes(data))
        sk.rcvq_len += n
        sk.rcv_nxt = rcv_nxt = (rcv_nxt + n) & MASK
        sk.unacked_rcv += n
        ts = seg.options.ts
        tsecr = ts[1] if ts is not None else 0
        if (tsecr != sk.rcv_rtt_last_tsecr or not sk.rcv_rtt_time
                or ((rcv_nxt - sk.rcv_rtt_seq) & MASK) < HALF):
            tcp_rcvbuf.tcp_rcv_rtt_sample(sk, tsecr, n, now)  # receiver RTT, for auto-tuning
        tcp_delack.tcp_event_data_recv(sk, now)
        if sk.quickack and not sk.pingpong:
            quick = True  # quick-ack mode (Linux tcp_in_quickack_mode)
    if sk.ofo or sk.ofo_fin is not None:
        fin = _ofo_drain(sh, sk) or fin
        sk.ack_now = True
    if fin and not sk.fin_rcvd and tcp_fin(sh, sk, now):
        quick = False  # pingpong: no quick ACK for the data the FIN came with
    if quick:
        sk.ack_now = True
    if sk.rcvq_len or sk.fin_rcvd:
        tcp.emit_readable(sh, sk)


def tcp_rmem_alloc(sk: TcpSock) -> int:
    """Receive memory a connection holds, charged as Linux charges ``sk_rmem_alloc``:
    payload plus a per-segment overhead (``TCP_SKB_OVERHEAD``, our truesize), for
    the receive queue and the out-of-order queue alike."""
    return (sk.rcvq_len + sk.ofo_len
            + TCP_SKB_OVERHEAD * (len(sk.rcvq) + len(sk.ofo)))


#: How long a shard's memory total is reused before it is summed again.
TCP_MEM_SAMPLE = 0.01


def tcp_memory_allocated(sh: Shard, now: float) -> int:
    """The shard's queued TCP memory (Linux ``tcp_memory_allocated``): receive
    memory as charged, plus send queues.  Summed over the sockets at most every
    ``TCP_MEM_SAMPLE`` seconds; the pressure flag follows it (Linux
    ``tcp_enter_memory_pressure`` above tcp_mem[1], leaving it below tcp_mem[0])."""
    if now - sh.mem_sampled < TCP_MEM_SAMPLE and sh.mem_sampled >= 0:
        return sh.mem_allocated
    total = 0
    for s in sh.socks.values():
        if s.rcvq_len or s.ofo or s.sndq_len:
            total += tcp_rmem_alloc(s) + s.sndq_len
    sh.mem_allocated = total
    sh.mem_sampled = now
    low, pressure, _high = sh.cfg.tcp_mem
    if total > pressure and pressure:
        if not sh.mem_pressure:
            sh.mem_pressure = True
            sh.stats.tcp_mem_pressures += 1
    elif total <= low:
        sh.mem_pressure = False
    return total


def _rmem_ok(sh: Shard, sk: TcpSock, n: int, seq: int) -> bool:
    """May a segment of ``n`` bytes be queued?  (Linux ``tcp_try_rmem_schedule``.)

    The window never retracts (``tcp_output.tcp_select_window``), so data up
    to the promised edge normally fits the buffer; rounding a kept edge up
    to the scale granularity can promise a little more, which this slack
    absorbs.  Memory is charged per segment (truesize), so a peer sending
    tiny segments reaches the limit long before the window is full: then the
    queues are collapsed and, if that is not enough, out-of-order data is
    pruned (``tcp_prune_queue``).  Past that, in-window data is dropped
    (Linux TCPRcvQDrop): the peer resends it once the reader catches up.
    """
    high = sh.cfg.tcp_mem[2]
    if high:
        total = tcp_memory_allocated(sh, sh.now)
        if total > high:
            # Over the hard limit: nothing more is queued (Linux
            # sk_rmem_schedule fails); out-of-order data goes first.
            if sk.ofo:
                tcp_prune_queue(sh, sk, 0, sk.rcv_nxt)
            sh.stats.drop(DropReason.TCP_MEM)
            return False
        if sh.mem_pressure and seq != sk.rcv_nxt:
            # Under pressure: out-of-order data is neither kept nor taken
            # (tcp_prune_ofo_queue under tcp_under_memory_pressure).
            if sk.ofo:
                tcp_prune_queue(sh, sk, 0, sk.rcv_nxt)
            return False
    limit = sk.rcvbuf + (sk.rcvbuf >> 3) + (1 << sk.rcv_wscale)
    need = n + TCP_SKB_OVERHEAD
    if tcp_rmem_alloc(sk) + need <= limit:
        return True
    tcp_prune_queue(sh, sk, limit - need, seq)
    return tcp_rmem_alloc(sk) + need <= limit


def tcp_prune_queue(sh: Shard, sk: TcpSock, target: int, seq: int) -> None:
    """Bring receive memory to ``target`` (Linux ``tcp_prune_queue``): collapse the
    receive queue into one buffer and runs of adjacent out-of-order segments into
    one each (``tcp_collapse``, ``tcp_collapse_ofo_queue``); if that is not
    enough, drop out-of-order data from the highest sequence down
    (``tcp_prune_ofo_queue``: the newest data is the cheapest for the peer to
    resend, and keeping the low end lets the hole fill).  Data below ``seq``
    (the segment that wants the room) is never dropped for it: a segment
    above everything queued is itself the one to drop (Linux 5.17+).  Pruning
    frees an eighth of the buffer beyond the need, so a stream of segments
    past the budget does not pay a prune each."""
    sh.stats.prune_called += 1
    if len(sk.rcvq) > 1:
        _collapse_rcvq(sk)
        sh.stats.rcv_collapsed += 1
    if tcp_rmem_alloc(sk) <= target:
        return
    ofo = sk.ofo
    if len(ofo) > 1 and sk.ofo_collapsed != len(ofo):
        # Only when the queue changed since the last try found nothing to join.
        if _collapse_ofo(sk):
            sh.stats.rcv_collapsed += 1
        sk.ofo_collapsed = len(ofo)
        if tcp_rmem_alloc(sk) <= target:
            return
    if not ofo:
        return
    goal = target - (sk.rcvbuf >> 3)
    base = sk.rcv_nxt
    off = (seq - base) & MASK
    dropped = 0
    while ofo and tcp_rmem_alloc(sk) > goal and ((ofo[-1][0] - base) & MASK) > off:
        e = ofo.pop()
        sk.ofo_len -= len(e[2])
        dropped += 1
    if not dropped:
        return
    sh.stats.ofo_pruned += 1
    sh.stats.ofo_drop += dropped
    sk.ofo_collapsed = -1
    if sk.ofo_fin is not None and (not ofo or ((sk.ofo_fin - ofo[-1][1]) & MASK) != 0):
        sk.ofo_fin = None  # its segment was pruned: the peer sends the FIN again
    # Linux tcp_sack_reset: the blocks may name pruned data (RFC 2018 §8 allows
    # the receiver to renege); the next out-of-order segment starts them anew.
    sk.sack_blocks.clear()


def _collapse_rcvq(sk: TcpSock) -> None:
    q = sk.rcvq
    off = sk.rcvq_off
    first = q.popleft()
    parts = [first[off:] if off else first]
    parts.extend(q)
    q.clear()
    q.append(b"".join(parts))
    sk.rcvq_off = 0


def _collapse_ofo(sk: TcpSock) -> bool:
    """Join runs of out-of-order segments that touch; True if any were joined."""
    ofo = sk.ofo
    out: list[list] = []
    joined = False
    run: list[bytes] = []
    for e in ofo:
        if out and out[-1][1] == e[0]:
            run.append(e[2])
            out[-1][1] = e[1]
            joined = True
            continue
        if len(run) > 1:
            out[-1][2] = b"".join(run)
        out.append([e[0], e[1], e[2]])
        run = [e[2]]
    if len(run) > 1:
        out[-1][2] = b"".join(run)
    if joined:
        ofo[:] = out
    return joined


def _ofo_insert(sh: Shard, sk: TcpSock, seq: int, data: bytes | memoryview, fin: int,
                now: float) -> None:
    """Keep a segment that arrived ahead of a hole (Linux ``tcp_data_queue_ofo``).

    ``sk.ofo`` holds disjoint ``[start, end, bytes]`` ranges sorted by offset
    from RCV.NXT (the order never changes while RCV.NXT moves: every range
    lies within the window ahead of it).  The place of a new segment is found
    by bisection, O(log n) comparisons; it is trimmed against its neighbours
    and swallows the ranges it covers.  The SACK blocks are kept as Linux
    keeps them (``tcp_sack_new_ofo_skb``), so an ACK costs the same however
    long the queue.  An early FIN is remembered by its sequence number.
    """
    n = len(data)
    rwin = (sk.rcv_wup + sk.rcv_wnd - sk.rcv_nxt) & MASK
    lo_off = (seq - sk.rcv_nxt) & MASK
    sk.ack_now = True  # RFC 5681 §4.2: ACK out-of-order data at once (dup ACK + SACK)
    if lo_off >= rwin or rwin & HALF:
        sh.stats.drop(DropReason.TCP_ZEROWINDOW)
        return
    if not _rmem_ok(sh, sk, n, seq):
        sh.stats.drop(DropReason.PROTO_MEM)
        return
    sk.rcv_ooopack += _segs(n, sk.mss_cache)  # Linux tcp_data_queue_ofo (gso_segs)
    hi_off = lo_off + n
    if fin:
        sk.ofo_fin = (seq + n) & MASK
    if sk.sack_ok:
        tcp_sack_new_ofo_skb(sk, seq, (seq + n) & MASK)
    ofo = sk.ofo
    base = sk.rcv_nxt

    def off(e: list) -> int:
        return (e[0] - base) & MASK

    i = bisect.bisect_right(ofo, lo_off, key=off)  # a range starting at lo_off precedes
    if i > 0:  # trim against the predecessor
        p = ofo[i - 1]
        p_end = off(p) + len(p[2])
        if p_end >= hi_off:
            _dsack_set(sh, sk, seq, (seq + n) & MASK)
            return  # nothing new
        if p_end > lo_off:
            data = data[p_end - lo_off:]
            lo_off = p_end
    j = i
    while j < len(ofo):  # swallow covered successors, trim at the next
        s_off = off(ofo[j])
        if s_off >= hi_off:
            break
        s_end = s_off + len(ofo[j][2])
        if s_end <= hi_off:
            sk.ofo_len -= len(ofo[j][2])
            j += 1
            continue
        data = data[:s_off - lo_off]
        hi_off = s_off
        break
    if j > i:
        del ofo[i:j]
    if not data:
        return
    ofo.insert(i, [(base + lo_off) & MASK, (base + hi_off) & MASK, bytes(data)])
    sk.ofo_len += len(data)
    sh.stats.ofo_queued += 1


def tcp_sack_new_ofo_skb(sk: TcpSock, seq: int, end: int) -> None:
    """Record [seq, end) in the SACK blocks to report (RFC 2018 §4, Linux
    ``tcp_sack_new_ofo_skb``): a block it touches grows and moves to the front,
    then absorbs any other block it now reaches; else a new block goes in front
    and the oldest of more than four is forgotten."""
    blocks = sk.sack_blocks
    for i, b in enumerate(blocks):
        # Touching or overlapping: !after(seq, b.end) && !after(b.start, end).
        if ((b[1] - seq) & MASK) < HALF and ((end - b[0]) & MASK) < HALF:
            if ((seq - b[0]) & MASK) & HALF:
                b[0] = seq
            if 0 < ((end - b[1]) & MASK) < HALF:
                b[1] = end
            if i:
                del blocks[i]
                blocks.insert(0, b)
            _sack_maybe_coalesce(blocks)
            return
    blocks.insert(0, [seq, end])
    if len(blocks) > 4:
        del blocks[4:]


def _sack_maybe_coalesce(blocks: list[list[int]]) -> None:
    """Linux ``tcp_sack_maybe_coalesce``: the first block absorbs the others it reaches."""
    first = blocks[0]
    i = 1
    while i < len(blocks):
        b = blocks[i]
        if ((first[1] - b[0]) & MASK) < HALF and ((b[1] - first[0]) & MASK) < HALF:
            if ((b[0] - first[0]) & MASK) & HALF:
                first[0] = b[0]
            if 0 < ((b[1] - first[1]) & MASK) < HALF:
                first[1] = b[1]
            del blocks[i]
            continue
        i += 1


def _sack_remove(sk: TcpSock) -> None:
    """Blocks RCV.NXT reached are acknowledged now (Linux ``tcp_sack_remove``)."""
    nxt = sk.rcv_nxt
    blocks = sk.sack_blocks
    if not sk.ofo:
        blocks.clear()
        return
    blocks[:] = [b for b in blocks if ((nxt - b[0]) & MASK) & HALF]


def _dsack_set(sh: Shard, sk: TcpSock, start: int, end: int) -> None:
    """Report a duplicate segment in the next ACK's first SACK block (RFC 2883 §4,
    Linux ``tcp_dsack_set``)."""
    if sk.sack_ok:
        sk.dsack = (start, end)
        sh.stats.dsacks_sent += 1


def _dsack_extend(sh: Shard, sk: TcpSock, start: int, end: int) -> None:
    """Add [start, end) to the pending D-SACK block, or set it (Linux ``tcp_dsack_extend``)."""
    d = sk.dsack
    if d is None:
        _dsack_set(sh, sk, start, end)
        return
    if ((start - d[1]) & MASK) & HALF or start == d[1]:
        if ((end - d[0]) & MASK) < HALF:  # touches or overlaps: one block
            lo = start if ((start - d[0]) & MASK) & HALF else d[0]
            hi = end if ((d[1] - end) & MASK) & HALF else d[1]
            sk.dsack = (lo, hi)


def _ofo_drain(sh: Shard, sk: TcpSock) -> int:
    """Move now-contiguous out-of-order data to the receive queue; returns FIN if it is due.

    Queued data that the in-order segment just received repeated (it started
    below the RCV.NXT that segment brought) is reported in a D-SACK block
    (RFC 2883 §4.1.1; Linux ``tcp_ofo_queue``, ``tcp_dsack_extend``).
    """
    ofo = sk.ofo
    high = sk.rcv_nxt  # what the in-order data reached: below it, queued data was repeated
    k = 0
    for e in ofo:  # the ranges RCV.NXT reached, taken off in one slice below
        off = (e[0] - sk.rcv_nxt) & MASK
        if 0 < off < HALF:
            break
        k += 1
        data = e[2]
        sk.ofo_len -= len(data)
        if ((e[0] - high) & MASK) & HALF:
            end = (e[0] + len(data)) & MASK
            _dsack_extend(sh, sk, e[0], end if ((end - high) & MASK) & HALF else high)
        if off:  # starts before rcv_nxt: trim the part we already have
            behind = (sk.rcv_nxt - e[0]) & MASK
            data = data[behind:] if behind < len(data) else b""
        if data:
            sk.rcvq.append(data)
            sk.rcvq_len += len(data)
            sk.rcv_nxt = (sk.rcv_nxt + len(data)) & MASK
    if k:
        del ofo[:k]
    if sk.sack_blocks:
        _sack_remove(sk)
    if sk.ofo_fin is not None and sk.ofo_fin == sk.rcv_nxt and not ofo:
        sk.ofo_fin = None
        return FIN
    return 0


def tcp_fin(sh: Shard, sk: TcpSock, now: float) -> bool:
    """The peer's FIN, in order (RFC 9293 §3.10.7.4 "eighth, check the FIN bit").

    True when it moved us to CLOSE-WAIT: Linux enters pingpong mode there
    (``inet_csk_enter_pingpong_mode``), so the FIN's ACK is a delayed one
    (40 ms, the same timer as data), not a quick ACK.  The delayed-ACK
    engine starts with the first data (``icsk_ack.ato`` set by
    ``tcp_event_data_recv``); a FIN before any data is ACKed at once (ato 0).
    Linux 6.18 (veth pair): a bare FIN 200 ms after 10 bytes of data is ACKed
    after 40 ms; a bare FIN on a connection without data at once.
    """
    sk.rcv_nxt = rcv_nxt = (sk.rcv_nxt + 1) & MASK
    sk.fin_rcvd = True
    if sk.ofo:
        # Out-of-order data lies after the FIN: it is not data (Linux tcp_fin
        # purges the queue and resets the SACK blocks).
        sk.ofo.clear()
        sk.ofo_len = 0
        sk.sack_blocks.clear()
    sk.ofo_fin = None
    st = sk.state
    if st is TCP_ESTABLISHED or st is TCP_SYN_RECV:
        tcp.tcp_set_state(sh, sk, TCP_CLOSE_WAIT)
        tcp_delack.enter_pingpong_mode(sk)
        if (rcv_nxt - sk.irs) & MASK > 2:  # data came before or with it
            sk.unacked_rcv += 1  # the delayed-ACK timer acknowledges the FIN
        else:
            sk.ack_now = True
        tcp.emit_readable(sh, sk)
        return True
    sk.ack_now = True
    if st is TCP_FIN_WAIT1:
        tcp.tcp_set_state(sh, sk, TCP_CLOSING)
    elif st is TCP_FIN_WAIT2:
        tcp_output.tcp_send_ack(sh, sk, now)
        tcp_minisocks.tcp_time_wait(sh, sk, now)
    tcp.emit_readable(sh, sk)
    return False


def tcp_ack_snd_check(sh: Shard, sk: TcpSock, now: float) -> None:
    """ACK now or arm the delayed-ACK timer (Linux ``__tcp_ack_snd_check``).

    ACK at once for out-of-order data, a FIN, quick-ack mode (connection
    start) and when more than one full segment is unacknowledged (RFC 1122
    §4.2.3.2 "every second full-sized segment"); else wait at most 40 ms.
    """
    if sh.tracing:
        sh.tr("tcp_ack_snd_check")
    if sk.ack_now or sk.unacked_rcv > sk.rcv_mss:
        if sk.state is not TCP_CLOSED and sk.state is not TCP_TIME_WAIT:
            tcp_output.tcp_send_ack(sh, sk, now)
        return
    if sk.unacked_rcv and sk.timers[_DELACK] is None:
        sh.timers.arm(sk, _DELACK, now + tcp_delack.tcp_delack_timeout(sk))


def tcp_data_snd_check(sh: Shard, sk: TcpSock, now: float) -> None:
    if sh.tracing:
        sh.tr("tcp_data_snd_check")
    if sk.sndq_len or (sk.shut_wr and not sk.fin_sent):
        tcp_output.tcp_write_xmit(sh, sk, now)


# -- header prediction (Linux tcp_rcv_established's fast path) ---------------------------------
#
# Van Jacobson's observation (RFC 1323 era, kept by Linux as "header
# prediction"): on an established connection nearly every segment is either a
# pure ACK for new data or the next in-order data segment, from a peer whose
# window did not change.  Linux folds the header length, the ACK flag and the
# expected window into one word (``pred_flags``) and compares it with the
# segment's fourth header word; a match plus SEG.SEQ == RCV.NXT, an ACK no
# further than SND.NXT and an acceptable timestamp skip RFC 793's step-by-step
# checks (``tcp_validate_incoming``), and the ACK and data take their light
# paths.  Linux turns the prediction off (pred_flags 0) while anything is
# unusual: out-of-order data queued, a zero receive window, urgent data,
# memory pressure, or loss recovery.
#
# Here ``tcp_ipv4.tcp_v4_rcv`` reads the raw IPv4 + TCP header (one struct
# unpack, no Repr objects), checks the layout (no IP options, data offset 5 or
# 8 with Linux's aligned NOP,NOP,TS: ``tcp_fast_parse_options``), ACK with at
# most PSH besides (no SYN/FIN/RST/URG/ECE/CWR), finds the socket and hands the
# fields to :func:`tcp_rcv_established_fast`, which first *predicts* without
# touching any state and returns False when the segment needs the slow path:
#
# * state ESTABLISHED, SEG.SEQ == RCV.NXT, no out-of-order data or early FIN;
# * timestamps exactly as negotiated, and TSval not older than TS.Recent
#   (RFC 7323 §5.3 PAWS; an older one goes to the slow path, which rejects it
#   or applies ``_disordered_ack``);
# * SND.UNA <= SEG.ACK <= SND.MAX (old or unsent ACKs: RFC 5961 §5.2 checks
#   in ``tcp_ack``); nothing SACKed on our scoreboard, not in recovery or Loss;
# * a pure ACK acknowledges new data (duplicate ACKs and pure window updates
#   go through ``tcp_ack``'s duplicate-ACK logic); a data segment either
#   acknowledges new data or keeps the window (Linux's pred_flags window);
# * data: a non-zero receive window and room under the memory limit
#   (``_rmem_ok``), then the TCP checksum when the device did not vouch for it
#   (Linux checks it here too, ``tcp_checksum_complete``).
#
# Then it does exactly what ``tcp_rcv_state_process`` would, in its order
# (TS.Recent per RFC 7323 §4.3, ``tcp_ack``'s window update and
# ``_clean_rtx_queue``, the in-order append of ``tcp_data_queue``,
# ``tcp_data_snd_check``, ``tcp_ack_snd_check``), skipping only the checks the
# prediction already settled.  tests/unit/core/test_header_prediction.py runs
# scripted exchanges with ``HEADER_PREDICTION`` off and on and requires the
# same frames, events and socket state.

#: Module switch for the fast path (tests turn it off to compare with the slow path).
HEADER_PREDICTION = True


def tcp_rcv_established(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> None:
    """ESTABLISHED receive of a parsed segment: the slow path (Linux ``tcp_rcv_established``
    after header prediction failed); see :func:`tcp_rcv_established_fast`."""
    tcp_rcv_state_process(sh, sk, seg, now)


def tcp_rcv_established_fast(sh: Shard, sk: TcpSock, pkt: BytesLike,
                             off: int, end: int, seq: int, ack: int, window: int,
                             tsval: int | None, tsecr: int, csum: int | None,
                             now: float) -> bool:
    """Header prediction for one segment of an ESTABLISHED socket; False (and no
    state touched) when it must take the slow path.  See the essay above.

    ``pkt[off:end]`` is the payload; ``tsval`` is None without a timestamp
    option; ``csum`` is None when the checksum is known good, else the sum of
    the pseudo-header and TCP header words, to complete with the payload's.
    """
    # -- predict ---------------------------------------------------------------------
    if sk.ts_ok:
        if tsval is None or ((tsval - sk.ts_recent) & MASK) & HALF:
            return False
    elif tsval is not None:
        return False
    if (seq != sk.rcv_nxt or sk.ofo or sk.ofo_fin is not None or sk.sacked
            or sk.in_recovery or sk.in_loss):
        return False
    una = sk.snd_una
    acked = (ack - una) & MASK
    if acked > ((sk.snd_max - una) & MASK):
        return False
    wnd = window << sk.snd_wscale
    n = end - off
    if n:
        if not acked and wnd != sk.snd_wnd:
            return False
        rwin = (sk.rcv_wup + sk.rcv_wnd - seq) & MASK
        rcvbuf = sk.rcvbuf
        if (rwin == 0 or rwin & HALF
                or sk.rcvq_len + n + TCP_SKB_OVERHEAD * (len(sk.rcvq) + 1)
                > rcvbuf + (rcvbuf >> 3) + (1 << sk.rcv_wscale)):
            return False
        data = pkt[off:end]
        if csum is not None and (csum + sum16(data)) % 0xFFFF:
            return False
    else:
        if not acked or (csum is not None and csum % 0xFFFF):
            return False
        data = None
    # -- the slow path's effects, in its order -------------------------------------------
    if tsval is not None:
        wup = sk.rcv_wup
        if seq == wup or ((seq - wup) & MASK) & HALF:
            sk.ts_recent = tsval  # RFC 7323 §4.3: SEG.SEQ <= Last.ACK.sent
            sk.ts_recent_stamp = now
    sk.rcv_tstamp = now
    # tcp_ack: the window (RFC 9293 §3.10.7.4; any ACK advancing SND.UNA, as Linux
    # tcp_may_update_window), then what was acknowledged.
    if acked or (((seq - sk.snd_wl1) & MASK) < HALF
                 and (seq != sk.snd_wl1 or ((ack - sk.snd_wl2) & MASK) < HALF)):
        if wnd != sk.snd_wnd:
            sk.snd_wnd = wnd
            if wnd > sk.max_window:
                sk.max_window = wnd
        sk.snd_wl1 = seq
        sk.snd_wl2 = ack
    sk.probes = 0
    sk.err_soft = 0
    if data is None:
        sk.segs_in += 1  # tcp_segs_in (Linux counts in tcp_v4_rcv; here once predicted)
        _clean_rtx_queue(sh, sk, ack, tsecr, (), acked, now)
        if sk.sndq_len:
            tcp_output.tcp_write_new(sh, sk, now, -1)  # tcp_write_xmit outside recovery (predicted)
        if sk.ack_now or sk.unacked_rcv > sk.rcv_mss:
            tcp_output.tcp_transmit(sh, sk, sk.snd_nxt, ACK, b"", now)  # tcp_send_ack
        elif sk.unacked_rcv and sk.timers[_DELACK] is None:
            sh.timers.arm(sk, _DELACK, now + tcp_delack.tcp_delack_timeout(sk))
        return True
    m = sk.mss_cache  # tcp_segs_in: a GRO super-frame counts as the segments it was
    segs = 1 if n <= m else (n - 1) // m + 1
    sk.segs_in += segs
    sk.data_segs_in += segs
    if acked:
        _clean_rtx_queue(sh, sk, ack, tsecr, (), acked, now)
    # tcp_data_queue's in-order case (Linux tcp_rcv_established "direct copy").
    rcv_mss = sk.rcv_mss
    if n > rcv_mss:
        sk.rcv_mss = rcv_mss = n if n < sk.adv_mss else sk.adv_mss
    sk.rcvq.append(data if type(data) is bytes else bytes(data))
    sk.rcvq_len += n
    sk.rcv_nxt = rcv_nxt = (seq + n) & MASK
    # The receiver's RTT for auto-tuning: at most once per echoed tick and per window.
    if (tsecr != sk.rcv_rtt_last_tsecr or not sk.rcv_rtt_time
            or ((rcv_nxt - sk.rcv_rtt_seq) & MASK) < HALF):
        tcp_rcvbuf.tcp_rcv_rtt_sample(sk, tsecr, n, now)
    unacked = sk.unacked_rcv + n
    sk.unacked_rcv = unacked
    ato = sk.ato
    if ato and now - sk.lrcvtime <= _ATO_HALF:
        sk.ato = ato * 0.5 + _ATO_HALF  # tcp_event_data_recv's back-to-back case, inline
        sk.lrcvtime = now
    else:
        tcp_delack.tcp_event_data_recv(sk, now)
    if sk.quickack and not sk.pingpong:
        sk.ack_now = True  # quick-ack mode (Linux tcp_in_quickack_mode)
    if not sk.readable_signalled and sk.parent is None and not sk.orphan:
        sk.readable_signalled = True
        sh.events.append(Readable(sk.sd))
    if sk.sndq_len:
        tcp_output.tcp_write_new(sh, sk, now, -1)
        unacked = sk.unacked_rcv  # our data carried the ACK
    if sk.ack_now or unacked > rcv_mss:
        tcp_output.tcp_transmit(sh, sk, sk.snd_nxt, ACK, b"", now)  # tcp_send_ack
    elif unacked:
        # __tcp_ack_snd_check: delay it (RFC 1122 §4.2.3.2); the heap is touched
        # only when no earlier entry is queued (TimerHeap.arm's rule).
        timers = sk.timers
        if timers[_DELACK] is None:
            ato = sk.ato
            deadline = now + (_ATO_MIN if ato <= _ATO_MIN else tcp_delack.tcp_delack_timeout(sk))
            timers[_DELACK] = deadline
            q = sk.timer_q[_DELACK]
            if q is None or q > deadline:
                sh.timers.arm(sk, _DELACK, deadline)
    return True


# -- the slow path: RFC 9293 §3.10.7.4 in order --------------------------------------------

def _disordered_ack(sk: TcpSock, seg: TcpSegment, tsval: int) -> bool:
    """A reordered duplicate ACK is not an old duplicate (Linux ``tcp_disordered_ack``).

    Pure ACKs overtake each other on the way; PAWS would discard the late one
    and, with it, its SACK blocks.  A pure duplicate ACK at RCV.NXT that does
    not move the window and is at most an RTO older than TS.Recent is kept
    (RFC 7323 §5.3 leaves this to the implementation).
    """
    return (not seg.payload and not seg.flags & (SYN | FIN) and seg.seq == sk.rcv_nxt
            and seg.ack == sk.snd_una and seg.window << sk.snd_wscale == sk.snd_wnd
            and ((sk.ts_recent - tsval) & MASK) <= sk.rto * 1000)


def _oow_ack_allowed(sk: TcpSock, seg: TcpSegment, ahead: int) -> bool:
    """May the ACK of a segment that starts ``ahead`` bytes past RCV.NXT, beyond
    our window, still be used?

    RFC 9293 §3.10.7.4: with RCV.WND zero "no segments will be acceptable, but
    special allowance should be made to accept valid ACKs, URGs, and RSTs".  A
    peer that filled a window we offered keeps sending pure ACKs at that old
    edge; discarding their ACK field would leave our own sending side blind.
    Only for an ACK without SYN/RST, from a sender no further ahead than a
    window we could ever have offered, that acknowledges new data or is the
    newest window information (RFC 5961 §5.2 checks follow in ``tcp_ack``).
    """
    flags = seg.flags
    if flags & (SYN | RST) or not flags & ACK or sk.cc is None:
        return False
    if ahead > (65535 << sk.rcv_wscale):
        return False
    d = (seg.ack - sk.snd_una) & MASK
    if d & HALF or d > ((sk.snd_max - sk.snd_una) & MASK):
        return False
    return (d > 0 or (seg.window << sk.snd_wscale) != sk.snd_wnd
            or bool(sk.sack_ok and seg.options.sack_blocks))


def tcp_validate_incoming(sh: Shard, sk: TcpSock, seg: TcpSegment,
                          now: float) -> TcpSegment | None:
    """Steps 1-4 of SEGMENT ARRIVES for synchronized states.

    Returns the segment to go on with, or None when it was dropped.  A
    segment whose text lies beyond the window but whose ACK is acceptable
    comes back stripped to a pure ACK (see :func:`_oow_ack_allowed`).
    """
    if sh.tracing:
        sh.tr("tcp_validate_incoming")
    flags = seg.flags
    ts = seg.options.ts
    # PAWS (RFC 7323 §5.3): a timestamp older than TS.Recent marks an old duplicate;
    # as Linux (tcp_paws_check), one tick older is reordering, not age.
    if (sk.ts_ok and ts is not None and not flags & RST
            and TCP_PAWS_WINDOW < ((sk.ts_recent - ts[0]) & MASK) < HALF
            and now - sk.ts_recent_stamp < PAWS_24DAYS and not _disordered_ack(sk, seg, ts[0])):
        sh.stats.drop(DropReason.TCP_PAWS)
        _send_oow_ack(sh, sk, now)
        return None
    # Step 1: sequence number (Linux tcp_sequence: overlaps the window at all).
    seq = seg.seq
    n = len(seg.payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
    end = (seq + n) & MASK
    rwin = (sk.rcv_wup + sk.rcv_wnd - sk.rcv_nxt) & MASK
    if rwin & HALF:
        rwin = 0
    ahead = (seq - sk.rcv_nxt) & MASK
    if ((end - sk.rcv_wup) & MASK) & HALF or (ahead < HALF and ahead > rwin):
        if ahead < HALF and _oow_ack_allowed(sk, seg, ahead):
            # RFC 9293 §3.10.7.4 step 1: "special allowance should be made to
            # accept valid ACKs" when the text cannot be.  The text (and FIN)
            # is dropped and answered; the ACK and window go on to step 5.
            if n:
                sh.stats.drop(DropReason.TCP_INVALID_SEQUENCE)
                sk.ack_now = True  # a data segment cannot start an ACK loop
            else:
                _send_oow_ack(sh, sk, now)
            sh.stats.oow_acks_accepted += 1
            return seg._replace(payload=_NO_DATA, flags=flags & ~FIN)
        if not flags & RST:
            if seg.payload and not flags & SYN and ((end - sk.rcv_nxt) & MASK) & HALF:
                # A retransmission of data we have: the peer lost our ACK.  Data
                # segments cannot form an ACK loop, so answer each one (Linux
                # tcp_oow_rate_limited exempts them) and name it with a D-SACK
                # (RFC 2883 §4.1.1; Linux tcp_send_dupack).
                _dsack_set(sh, sk, seq, end)
                sh.stats.delayed_ack_lost += 1
                tcp_delack.tcp_enter_quickack_mode(sk)  # Linux tcp_send_dupack
                tcp_output.tcp_send_ack(sh, sk, now)
            else:
                _send_oow_ack(sh, sk, now)
        sh.stats.drop(DropReason.TCP_INVALID_SEQUENCE)
        return None
    # Step 2: RST (RFC 5961 §3.2): exact match resets, in-window gets a challenge ACK.
    if flags & RST:
        if seq == sk.rcv_nxt:
            sh.stats.drop(DropReason.TCP_RESET)
            tcp.tcp_reset(sh, sk)
        else:
            sh.stats.drop(DropReason.TCP_RFC5961_RST)
            tcp_send_challenge_ack(sh, sk, now)
        return None
    # Timestamps: remember the peer's clock (RFC 7323 §4.3).
    if sk.ts_ok and ts is not None and (seq == sk.rcv_wup or ((seq - sk.rcv_wup) & MASK) & HALF):
        if ((ts[0] - sk.ts_recent) & MASK) < HALF:
            sk.ts_recent = ts[0]
            sk.ts_recent_stamp = now
    # Step 4: SYN in a synchronized state (RFC 5961 §4.2): challenge ACK.  The one
    # exception is the peer's SYN-ACK completing a simultaneous open (Linux does the same).
    if flags & SYN:
        if (sk.state is TCP_SYN_RECV and flags & ACK and seq == sk.irs
                and seg.ack == sk.snd_nxt):
            return seg
        sh.stats.drop(DropReason.TCP_INVALID_SYN)
        tcp_send_challenge_ack(sh, sk, now)
        return None
    return seg


def tcp_rcv_state_process(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> None:
    """SEGMENT ARRIVES for every state but LISTEN and TIME-WAIT (RFC 9293 §3.10.7)."""
    if sh.tracing:
        sh.tr("tcp_rcv_state_process")
    st = sk.state
    if st is TCP_SYN_SENT:
        tcp_rcv_synsent_state_process(sh, sk, seg, now)
        return
    if st is TCP_CLOSED:
        sh.stats.drop(DropReason.TCP_CLOSE)
        return
    checked = tcp_validate_incoming(sh, sk, seg, now)
    if checked is None:
        return
    seg = checked
    sk.rcv_tstamp = now
    flags = seg.flags
    if not flags & ACK:
        sh.stats.drop(DropReason.TCP_FLAGS_NOACK)
        return
    if st is TCP_SYN_RECV:
        ack = seg.ack
        if ((ack - sk.iss - 1) & MASK) > ((sk.snd_nxt - sk.iss - 1) & MASK):
            # RFC 9293 §3.10.7.4: unacceptable ACK in SYN-RECEIVED -> RST.
            tcp_output.tcp_send_reset(sh, sk.laddr, sk.lport, sk.raddr, sk.rport, seg)
            sh.stats.drop(DropReason.TCP_ACK_UNSENT_DATA)
            return
    if not tcp_ack(sh, sk, seg, now):
        return
    if st is TCP_SYN_RECV:
        tcp_synrecv_established(sh, sk, seg, now)
        st = sk.state
    fin_acked = sk.fin_sent and sk.snd_una == ((sk.fin_seq + 1) & MASK)
    if st is TCP_FIN_WAIT1 and fin_acked:
        tcp.tcp_set_state(sh, sk, TCP_FIN_WAIT2)
        st = TCP_FIN_WAIT2
        if sk.orphan:
            if sk.linger2 < 0:
                tcp.tcp_done(sh, sk)  # TCP_LINGER2 < 0: no FIN-WAIT-2 wait (Linux TCPAbortOnData)
                return
            sh.timers.arm(sk, _KEEPALIVE, now + tcp.tcp_fin_time(sk))
    elif st is TCP_CLOSING and fin_acked:
        tcp_minisocks.tcp_time_wait(sh, sk, now)
        return
    elif st is TCP_LAST_ACK and fin_acked:
        tcp.tcp_done(sh, sk)
        return
    if flags & URG or sh.tracing:
        tcp_urg(sh, sk, seg)  # RFC 9293 §3.10.7.4 sixth step, before the text
    if st in _DATA_STATES:
        if sk.orphan and st is not TCP_ESTABLISHED and seg.payload and \
                0 < ((seg.seq + len(seg.payload) - sk.rcv_nxt) & MASK) < HALF:
            # Linux: new data for a socket nobody will read after close() -> RST.
            tcp_output.tcp_send_active_reset(sh, sk, now)
            tcp.tcp_done(sh, sk)
            return
        tcp_data_queue(sh, sk, seg, now)
    elif flags & FIN or seg.payload:
        sk.ack_now = True  # a retransmitted FIN (CLOSE-WAIT, CLOSING, LAST-ACK): re-ACK
    if sk.state is TCP_CLOSED or sk.state is TCP_TIME_WAIT:
        return
    tcp_data_snd_check(sh, sk, now)
    tcp_ack_snd_check(sh, sk, now)


def tcp_urg(sh: Shard, sk: TcpSock, seg: TcpSegment) -> None:
    """Check the URG bit (RFC 9293 §3.10.7.4 sixth step; Linux ``tcp_urg``): note
    a new urgent pointer, and keep the urgent byte when this segment carries it.
    Header prediction declines URG segments, so only this path sees them."""
    if sh.tracing:
        sh.tr("tcp_urg")
    if seg.flags & URG:
        tcp_check_urg(sk, seg)
    if sk.urg_data & TCP_URG_NOTYET:
        seq = seg.seq
        if seg.flags & SYN:
            seq = (seq + 1) & MASK
        off = (sk.urg_seq - seq) & MASK
        if off < len(seg.payload):
            sk.urg_data = TCP_URG_VALID | seg.payload[off]


def tcp_check_urg(sk: TcpSock, seg: TcpSegment) -> None:
    """A segment with URG: the urgent byte is SEG.SEQ + SEG.UP - 1 (the BSD
    reading Linux keeps, tcp_stdurg off; RFC 6093 §2).  Only a pointer past
    everything received and past the urgent byte already known counts (Linux
    ``tcp_check_urg``); only the latest urgent byte is kept."""
    ptr = seg.urgent
    if ptr:
        ptr -= 1
    ptr = (seg.seq + ptr) & MASK
    copied = sk.copied_seq
    if 0 < ((copied - ptr) & MASK) < HALF:
        return  # the reader is past it
    if ((ptr - sk.rcv_nxt) & MASK) & HALF:
        return  # received already: an old pointer repeated
    if sk.urg_data and not 0 < ((ptr - sk.urg_seq) & MASK) < HALF:
        return  # not beyond the urgent byte we know
    if (sk.urg_data and sk.urg_seq == copied and not sk.oobinline
            and copied != sk.rcv_nxt):
        # The reader sits on the old urgent byte: it leaves the stream unread.
        tcp.tcp_urg_skip(sk)
    sk.urg_data = TCP_URG_NOTYET
    sk.urg_seq = ptr


def tcp_synrecv_established(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> None:
    """SYN-RECEIVED -> ESTABLISHED on an acceptable ACK (Linux ``tcp_rcv_state_process``)."""
    tcp_init_transfer(sh, sk, now)
    tcp.tcp_set_state(sh, sk, TCP_ESTABLISHED)
    if sh.tracing:
        sh.tr("sock_def_wakeup")
    if sk.parent is None and not sk.orphan:
        sh.events.append(Connected(sk.sd))  # simultaneous open completes like a connect()
    sk.delivered += 1  # the SYN-ACK: tcp_ack does not see it (Linux tcp_rcv_state_process)
    sk.snd_wnd = seg.window << sk.snd_wscale
    sk.snd_wl1 = seg.seq
    sk.snd_wl2 = seg.ack
    if sk.snd_wnd > sk.max_window:
        sk.max_window = sk.snd_wnd
    sk.timers[_RETRANSMIT] = None
    sk.retrans_stamp = None
    tcp_pacing.tcp_init_pacing(sh, sk)
    tcp_initialize_rcv_mss(sh, sk)


def tcp_init_transfer(sh: Shard, sk: TcpSock, now: float) -> None:
    """Congestion control and keepalive at the start of ESTABLISHED (Linux
    ``tcp_init_transfer``)."""
    if sh.tracing:
        sh.tr("tcp_init_congestion_control")
    cc = sk.cc = sh.new_cc(sk)
    if sh.tracing and cc.name == "cubic":
        sh.tr("bictcp_init")  # the algorithm's own init (tcp_cubic; Reno has none)
    cc.init(sk.mss_cache, now)
    tcp_mtup.tcp_mtup_init(sh, sk, now)  # PLPMTUD (RFC 4821)
    tcp_rcvbuf.tcp_init_buffer_space(sh, sk, now)
    sk.rcv_tstamp = now
    if sk.keepalive:
        sh.timers.arm(sk, _KEEPALIVE, now + sk.keepidle)


def tcp_initialize_rcv_mss(sh: Shard, sk: TcpSock) -> None:
    """First guess of the peer's segment size, for delayed ACKs: our send MSS,
    at most 536 (Linux ``tcp_initialize_rcv_mss``)."""
    if sh.tracing:
        sh.tr("tcp_initialize_rcv_mss")
    sk.rcv_mss = min(sk.mss_cache, 536)


def tcp_rcv_synsent_state_process(sh: Shard, sk: TcpSock, seg: TcpSegment, now: float) -> None:
    """SYN-SENT (RFC 9293 §3.10.7.3), including simultaneous open."""
    if sh.tracing:
        sh.tr("tcp_rcv_synsent_state_process")
    flags = seg.flags
    if flags & ACK:
        ack = seg.ack
        if ((ack - sk.iss - 1) & MASK) >= ((sk.snd_max - sk.iss) & MASK):
            # ACK outside (ISS, SND.NXT]: RST unless it is one (RFC 9293 §3.10.7.3 first).
            sh.stats.drop(DropReason.TCP_SYNSENT_BAD)
            tcp_output.tcp_send_reset(sh, sk.laddr, sk.lport, sk.raddr, sk.rport, seg)
            return
    if flags & RST:
        if flags & ACK:
            sh.stats.drop(DropReason.TCP_RESET)
            tcp.tcp_reset(sh, sk)  # ECONNREFUSED
        else:
            sh.stats.drop(DropReason.TCP_SYNSENT_BAD)
        return
    if not flags & SYN:
        sh.stats.drop(DropReason.TCP_SYNSENT_BAD)
        return
    _syn_options(sh, sk, seg.options, now)
    sk.irs = seg.seq
    sk.rcv_nxt = sk.rcv_wup = (seg.seq + 1) & MASK
    if flags & ACK:
        tcp_ecn.tcp_ecn_rcv_synack(sk, flags)
    else:
        tcp_ecn.tcp_ecn_rcv_syn(sk, flags)
    if flags & ACK:
        sk.snd_una = seg.ack
        sk.delivered += 1  # our SYN (Linux: tcp_ack's tcp_clean_rtx_queue)
        sk.snd_wnd = seg.window  # RFC 7323 §2.2: never scaled in a SYN
        sk.max_window = sk.snd_wnd
        sk.snd_wl1 = seg.seq
        sk.snd_wl2 = seg.ack
        if sk.syn_retries == 0:  # Karn: only an unretransmitted SYN gives an RTT
            tcp_ack_update_rtt(sh, sk, now - sk.rtt_time, now)
        sk.rtt_seq = -1
        tcp_finish_connect(sh, sk, now)
        if seg.payload or flags & FIN:
            tcp_data_queue(sh, sk, seg, now)
        tcp_output.tcp_send_ack(sh, sk, now)
        tcp_data_snd_check(sh, sk, now)
        return
    # Simultaneous open (RFC 9293 §3.5 figure 8): SYN-RECEIVED, answer SYN-ACK.
    tcp.tcp_set_state(sh, sk, TCP_SYN_RECV)
    sk.snd_wnd = seg.window
    sk.snd_wl1 = seg.seq
    sk.snd_wl2 = sk.iss
    tcp_output.tcp_send_synack_sock(sh, sk, now)


def _syn_options(sh: Shard, sk: TcpSock, opts: TcpOptions, now: float) -> None:
    """Negotiate from the peer's SYN options (Linux ``tcp_parse_options`` + ``tcp_sync_mss``)."""
    cfg = sh.cfg
    peer_mss = opts.mss or 536
    mss = min(peer_mss, sk.adv_mss)
    wscale = opts.wscale if cfg.window_scaling else None
    sk.wscale_ok = wscale is not None
    if wscale is not None:
        sk.snd_wscale = wscale
    else:
        sk.snd_wscale = 0
        sk.rcv_wscale = 0
    sk.sack_ok = cfg.sack and opts.sack_perm
    ts = opts.ts if cfg.timestamps else None
    sk.ts_ok = ts is not None
    if ts is not None:
        sk.ts_recent = ts[0]
        sk.ts_recent_stamp = now
    tcp_output.tcp_set_mss(sk, mss)
    tcp_initialize_rcv_mss(sh, sk)


def tcp_finish_connect(sh: Shard, sk: TcpSock, now: float) -> None:
    if sh.tracing:
        sh.tr("tcp_finish_connect")
    tcp.tcp_set_state(sh, sk, TCP_ESTABLISHED)
    sk.timers[_RETRANSMIT] = None
    sk.syn_retries = 0
    sk.retrans_stamp = None
    sk.backoff = 0
    tcp_init_transfer(sh, sk, now)
    tcp_pacing.tcp_init_pacing(sh, sk)
    sh.stats.active_opens_done += 1
    if not sk.orphan:
        sh.events.append(Connected(sk.sd))
