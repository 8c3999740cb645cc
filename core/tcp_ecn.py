"""Explicit Congestion Notification for TCP (RFC 3168 §6.1; Linux's ``tcp_ecn_*``).

Reading list: RFC 3168 §5 (the IP header's ECN field: Not-ECT, ECT(1),
ECT(0), CE), §6.1.1 (negotiation: a SYN with ECE and CWR, a SYN-ACK with ECE
alone), §6.1.2 (the sender's response: reduce once per window, CWR on the
next new data), §6.1.3 (the receiver: ECE on every ACK from a CE mark until
a CWR arrives), §6.1.4-6.1.5 (no ECT on pure ACKs, retransmissions or window
probes), §6.1.1.1 (a retransmitted SYN gives up asking).

The engine's other modules call in at a few points, each named after the
Linux function it mirrors:

========================================  =====================================
Linux                                     here
========================================  =====================================
``tcp_ecn_send_syn`` (tcp_output.c)       :func:`tcp_ecn_send_syn`
``tcp_ecn_create_request``                :func:`tcp_ecn_create_request`
``tcp_ecn_make_synack``                   :func:`tcp_ecn_make_synack`
``tcp_ecn_rcv_synack`` / ``_rcv_syn``     :func:`tcp_ecn_rcv_synack`, :func:`tcp_ecn_rcv_syn`
``tcp_ecn_send`` (every segment)          :func:`tcp_ecn_send`
``tcp_ecn_accept_cwr`` + ``_check_ce``    :func:`tcp_ecn_rcv_data`
``tcp_ecn_rcv_ecn_echo`` + enter_cwr      :func:`tcp_ecn_rcv_ecn_echo`
``tcp_cwnd_reduction`` in CWR / end       :func:`tcp_cwr_ack`
``tcp_ecn_queue_cwr``                     :func:`tcp_ecn_queue_cwr`
========================================  =====================================

``ShardConfig.ecn`` is ``net.ipv4.tcp_ecn``: 0 off, 1 ask on our SYNs and
accept, 2 (Linux's default) accept when the peer asks but never ask.  The
socket's state is ``TcpSock.ecn_flags`` with Linux's bits.  The sender's
reduction is Linux's CWR congestion state (``CaState.CWR``): ssthresh from
the algorithm as on a loss, then cwnd brought down to it by Proportional
Rate Reduction (RFC 6937) as ACKs come back, no growth meanwhile; it ends
once something beyond SND.NXT-at-entry is acknowledged (so the CWR flag
reached the receiver), with cwnd = ssthresh.  A loss or RTO meanwhile turns
it into recovery / Loss, whose reduction stands in for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import tcp_delack
from .tcp_cong import CaState
from .tcp_h import HALF, MASK, RequestSock, TcpSegment, TcpSock
from .wire.tcp import CWR, ECE

if TYPE_CHECKING:
    from .shard import Shard

__all__ = [
    "TCP_ECN_OK", "TCP_ECN_QUEUE_CWR", "TCP_ECN_DEMAND_CWR", "TCP_ECN_SEEN",
    "INET_ECN_NOT_ECT", "INET_ECN_ECT_1", "INET_ECN_ECT_0", "INET_ECN_CE", "INET_ECN_MASK",
    "TCP_ECN_DEFAULT",
    "tcp_ecn_send_syn", "tcp_ecn_create_request", "tcp_ecn_make_synack", "tcp_ecn_rcv_synack",
    "tcp_ecn_rcv_syn", "tcp_ecn_openreq_child", "tcp_ecn_send", "tcp_ecn_rcv_data",
    "tcp_ecn_mark_is_news",
    "tcp_ecn_rcv_ecn_echo", "tcp_ecn_delivered_ce", "tcp_cwr_ack", "tcp_ecn_queue_cwr",
]

#: ``TcpSock.ecn_flags`` (Linux ``TCP_ECN_*``): negotiated; CWR owed on the next
#: new data; ECE owed on every ACK until a CWR arrives; an ECT/CE mark was seen.
TCP_ECN_OK = 1
TCP_ECN_QUEUE_CWR = 2
TCP_ECN_DEMAND_CWR = 4
TCP_ECN_SEEN = 8

#: The IP header's ECN field (RFC 3168 §5; Linux ``INET_ECN_*``).
INET_ECN_NOT_ECT = 0
INET_ECN_ECT_1 = 1
INET_ECN_ECT_0 = 2
INET_ECN_CE = 3
INET_ECN_MASK = 3

#: net.ipv4.tcp_ecn's default: accept ECN when asked, never ask.
TCP_ECN_DEFAULT = 2

_ECE_CWR = ECE | CWR
_CA_CWR = CaState.CWR
_CA_OPEN = CaState.OPEN


# -- negotiation (RFC 3168 §6.1.1) -------------------------------------------------------------

def tcp_ecn_send_syn(sh: Shard, sk: TcpSock) -> int:
    """The ECN flags of our SYN (Linux ``tcp_ecn_send_syn``): ECE|CWR with
    tcp_ecn = 1.  A retransmitted SYN goes without them (RFC 3168 §6.1.1.1,
    Linux ``tcp_ecn_clear_syn`` with tcp_ecn_fallback on): a middlebox may be
    dropping ECN-setup SYNs; the SYN-ACK then lacks ECE and ECN stays off."""
    if sh.cfg.ecn != 1:
        sk.ecn_flags = 0
        return 0
    if sk.syn_retries == 0:
        sk.ecn_flags = TCP_ECN_OK  # until the SYN-ACK says otherwise
    return _ECE_CWR if sk.syn_retries == 0 else 0


def tcp_ecn_rcv_synack(sk: TcpSock, flags: int) -> None:
    """SYN-ACK (Linux ``tcp_ecn_rcv_synack``): ECN only if it carries ECE without CWR."""
    if sk.ecn_flags & TCP_ECN_OK and (not flags & ECE or flags & CWR):
        sk.ecn_flags &= ~TCP_ECN_OK


def tcp_ecn_rcv_syn(sk: TcpSock, flags: int) -> None:
    """A SYN in SYN-SENT, simultaneous open (Linux ``tcp_ecn_rcv_syn``): ECN only
    if the peer's SYN asked for it too."""
    if sk.ecn_flags & TCP_ECN_OK and (flags & _ECE_CWR) != _ECE_CWR:
        sk.ecn_flags &= ~TCP_ECN_OK


def tcp_ecn_create_request(sh: Shard, req: RequestSock, seg: TcpSegment) -> None:
    """A SYN for a listener (Linux ``tcp_ecn_create_request``): accept ECN when it
    asks with ECE|CWR and tcp_ecn is on (1 or 2).  A SYN that itself carries
    an ECT mark is refused ECN, as Linux does (RFC 3168 §6.1.1: SYNs are sent
    Not-ECT, so ECT there means the path or peer rewrites the field)."""
    if sh.tracing:
        sh.tr("tcp_ecn_create_request")
    if (seg.flags & _ECE_CWR) == _ECE_CWR and sh.cfg.ecn and seg.ecn == INET_ECN_NOT_ECT:
        req.ecn_ok = True


def tcp_ecn_make_synack(ecn_ok: bool) -> int:
    """The SYN-ACK's ECN flag (Linux ``tcp_ecn_make_synack`` / ``tcp_ecn_send_synack``): ECE."""
    return ECE if ecn_ok else 0


def tcp_ecn_openreq_child(sk: TcpSock, req: RequestSock) -> None:
    """The child of a request sock (Linux ``tcp_ecn_openreq_child``)."""
    sk.ecn_flags = TCP_ECN_OK if req.ecn_ok else 0


# -- every segment we send (RFC 3168 §6.1.2-6.1.5) -------------------------------------------

def tcp_ecn_send(sk: TcpSock, seq: int, flags: int, plen: int) -> tuple[int, int]:
    """(flags, IP ECN field) of a non-SYN segment on an ECN connection (Linux ``tcp_ecn_send``).

    New data goes ECT(0), and the first of it after a reduction carries CWR
    (§6.1.2); pure ACKs, FINs without data, window probes and retransmissions
    (anything starting before SND.NXT) go Not-ECT (§6.1.4, §6.1.5).  Every
    segment carries ECE while the receiver side owes it (§6.1.3).  Only
    called when ``ecn_flags`` is non-zero.
    """
    ecn = sk.ecn_flags
    tos = INET_ECN_NOT_ECT
    if plen and ((seq - sk.snd_nxt) & MASK) < HALF:
        tos = INET_ECN_ECT_0
        if ecn & TCP_ECN_QUEUE_CWR:
            sk.ecn_flags = ecn = ecn & ~TCP_ECN_QUEUE_CWR
            flags |= CWR
    if ecn & TCP_ECN_DEMAND_CWR:
        flags |= ECE
    return flags, tos


# -- receiving data (RFC 3168 §6.1.3) -----------------------------------------------------------

def tcp_ecn_rcv_data(sk: TcpSock, seg: TcpSegment) -> None:
    """A data segment on an ECN connection (Linux ``tcp_ecn_accept_cwr`` then
    ``__tcp_ecn_check_ce``, both from ``tcp_data_queue``).

    CWR: the sender has reduced, stop echoing, and ACK at once (its window
    may be one segment).  Then the segment's own mark: CE starts echoing
    (ECE on every ACK until a CWR) and enters quick-ACK mode, so the echo is
    not held back by the delayed-ACK timer; ECT just records that marks
    flow; Not-ECT after marks were seen (a retransmission) also ACKs quickly.
    """
    if seg.flags & CWR:
        sk.ecn_flags &= ~TCP_ECN_DEMAND_CWR
        sk.ack_now = True
    mark = seg.ecn
    if mark == INET_ECN_CE:
        if not sk.ecn_flags & TCP_ECN_DEMAND_CWR:
            _enter_quickack(sk)
            sk.ecn_flags |= TCP_ECN_DEMAND_CWR
        sk.ecn_flags |= TCP_ECN_SEEN
    elif mark:
        sk.ecn_flags |= TCP_ECN_SEEN
    elif sk.ecn_flags & TCP_ECN_SEEN:
        _enter_quickack(sk)


def tcp_ecn_mark_is_news(sk: TcpSock, tos: int, plen: int) -> bool:
    """Would :func:`tcp_ecn_rcv_data` change anything for this packet (IPv4 TOS
    or IPv6 Traffic Class ``tos``, ``plen`` bytes of TCP payload)?  Header
    prediction asks, for ECN connections only, and leaves such segments to
    the slow path: data marked CE, the first ECT data, Not-ECT data once
    marks were seen.  Pure ACKs carry no news for the receiver side."""
    if plen <= 0:
        return False
    mark = tos & INET_ECN_MASK
    if mark == INET_ECN_CE:
        return True
    return not mark if sk.ecn_flags & TCP_ECN_SEEN else bool(mark)


def _enter_quickack(sk: TcpSock) -> None:
    """Linux ``tcp_enter_quickack_mode(sk, 2)``: ACK at once (at least the next two
    data segments), out of pingpong mode; the sender's window may be tiny."""
    tcp_delack.tcp_enter_quickack_mode(sk, 2)


# -- the sender's response (RFC 3168 §6.1.2; Linux's CWR state) ------------------------------

def tcp_ecn_rcv_ecn_echo(sh: Shard, sk: TcpSock, now: float) -> None:
    """An ACK with ECE on an ECN connection (Linux ``tcp_ecn_rcv_ecn_echo`` true,
    then ``tcp_try_to_open`` -> ``tcp_enter_cwr``): reduce, unless a reduction
    (CWR, recovery, Loss) is already under way -- once per window of data.

    Called before the ACK is processed, so that it grows nothing; the ACK's
    delivered data then counts toward the reduction (``tcp_cwr_ack``).
    """
    cc = sk.cc
    if cc is None or sk.in_recovery or sk.in_loss or cc.ca_state >= _CA_CWR:
        return
    mss = sk.mss_cache
    flight = (sk.snd_nxt - sk.snd_una) & MASK
    if flight & HALF:
        flight = 0
    # tcp_init_cwnd_reduction: ssthresh from the algorithm, as on a loss.
    sk.ecn_high_seq = sk.snd_nxt
    sk.ecn_prior_cwnd = cc.cwnd
    sk.ecn_prr_delivered = 0
    cc.ssthresh = cc.ssthresh_on_loss(now, flight / mss)
    cc.cwnd_frac = cc.cwnd_cnt = 0.0
    cc.ca_state = _CA_CWR
    sk.undo_active = False  # Linux tcp_enter_cwr: undo_marker = 0, no undo past this
    sk.ecn_flags |= TCP_ECN_QUEUE_CWR
    if sh.tracing:
        sh.tr("tcp_enter_cwr")


def tcp_ecn_delivered_ce(sh: Shard, sk: TcpSock, delivered: int) -> None:
    """Segments an ECE-bearing ACK delivered (Linux ``tcp_count_delivered`` with
    ece_ack: ``delivered_ce``, TcpExtTCPDeliveredCE)."""
    if delivered > 0:
        sk.delivered_ce += delivered
        sh.stats.tcp_delivered_ce += delivered


def tcp_cwr_ack(sk: TcpSock, acked: int, rtt: float | None, now: float) -> None:
    """An ACK advancing SND.UNA by ``acked`` bytes in the CWR state (Linux
    ``tcp_cong_control``'s ``tcp_cwnd_reduction``, and the CWR exit of
    ``tcp_fastretrans_alert``).

    Once SND.UNA is past SND.NXT-at-entry the CWR flag has arrived: cwnd =
    ssthresh, back to Open (``tcp_end_cwnd_reduction``).  Until then, RFC
    6937 PRR in segments, as Linux: while the flight exceeds ssthresh, send
    ssthresh/prior_cwnd of what was delivered; below it, catch up but no
    faster than slow start, never above ssthresh.
    """
    cc = sk.cc
    assert cc is not None  # only in the CWR state, which needs a congestion control
    cc.on_ack(0, rtt, now)  # the RTT sample only: no growth in a reduction
    una = sk.snd_una
    past = (una - sk.ecn_high_seq) & MASK
    if past and past < HALF:
        cc.cwnd = cc.ssthresh
        cc.ca_state = _CA_OPEN
        return
    mss = sk.mss_cache
    newly = (acked + mss - 1) // mss
    if newly <= 0:
        return
    sk.ecn_prr_delivered += newly
    flight = (sk.snd_nxt - una) & MASK
    in_flight = 0 if flight & HALF else (flight + mss - 1) // mss
    prr_out = (((sk.snd_nxt - sk.ecn_high_seq) & MASK) + mss - 1) // mss
    ssthresh = cc.ssthresh
    delta = ssthresh - in_flight
    prior = sk.ecn_prior_cwnd or 1
    if delta < 0:
        sndcnt = -(-ssthresh * sk.ecn_prr_delivered // prior) - prr_out
    else:
        sndcnt = sk.ecn_prr_delivered - prr_out
        if sndcnt < newly:
            sndcnt = newly
        sndcnt += 1
        if sndcnt > delta:
            sndcnt = delta
    if sndcnt < (0 if prr_out else 1):
        sndcnt = 0 if prr_out else 1
    cwnd = in_flight + sndcnt
    cc.cwnd = cwnd if cwnd > 1 else 1


def tcp_ecn_queue_cwr(sk: TcpSock) -> None:
    """Any window reduction (recovery, RTO) owes the peer a CWR on the next new
    data too (Linux ``tcp_ecn_queue_cwr`` from ``tcp_init_cwnd_reduction`` and
    ``tcp_enter_loss``): it stops echoing, and later ECEs mean new marks."""
    if sk.ecn_flags & TCP_ECN_OK:
        sk.ecn_flags |= TCP_ECN_QUEUE_CWR
