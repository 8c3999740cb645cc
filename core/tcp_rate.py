"""Delivery-rate estimation (Linux ``net/ipv4/tcp_rate.c``).

Reading list: draft-cheng-iccrg-delivery-rate-estimation (the algorithm Linux
implements), RFC 9293 for the sequence space.

Why: "how fast does the path deliver my data?" is what ``ss -ti`` answers as
``delivery_rate`` and TCP_INFO as ``tcpi_delivery_rate``, and what pacing and
model-based congestion control build on.  One sample per ACK: the data
delivered (ACKed or SACKed, ``TcpSock.delivered``) between the moment the
latest-sent newly delivered data left and now, over the longer of the send
phase and the ACK phase of that window (ACK compression can make the ACK
phase shorter than the send phase, and the shorter one would overstate the
rate; draft §3.3).

Per-segment state without per-segment objects: Linux snapshots
``delivered``, ``delivered_mstamp``, ``first_tx_mstamp`` and the app-limited
flag into every skb it sends (``tcp_rate_skb_sent``).  Those values only
change when an ACK arrives or the flight empties, so every segment of one
transmission burst shares them: they ride in the burst's entry of
``TcpSock.tx_log`` beside the send time RACK already keeps there (written by
``tcp_output.tcp_write_new``; ``TX_LOG_STRIDE`` values per entry).  On an ACK
the entry of the latest-sent newly delivered byte gives the sample
(``tcp_rate_skb_delivered`` + ``tcp_rate_gen`` in one call).

Cost: the in-order ACK path (header prediction) takes a full sample once a
round trip, when the data sent at the last sample is acknowledged
(``rate_round_end``), and otherwise only moves the delivery clock; the
send time of the latest delivered data, which Linux records per ACK, is then
read off ``tx_log`` at the next transmission (``tcp_output._tx_log_add``).
The SACK and recovery path, and paced sockets, sample every ACK as Linux.

Approximations, stated: the latest-sent newly delivered data is taken to be
the highest newly delivered byte (original data leaves in sequence order;
RFC 2018 §4 puts the block holding the segment that triggered the ACK
first).  A retransmission carries its original burst's snapshot, so a sample
taken in recovery spans from the original transmission: a longer interval,
a lower (safe) rate, never an overestimate; Linux re-snapshots each
retransmitted skb.

App-limited (draft §3.4, ``tcp_rate_check_app_limited``): when the
application leaves less than a segment unsent while the congestion window has
room, the samples of the data sent from then on, until it is delivered, are
marked app-limited: they measure the application, not the path, and replace
the kept sample only if they are higher.
"""

from __future__ import annotations

from . import tcp_input
from .tcp_h import HALF, MASK, TX_LOG_STRIDE, TcpSock

__all__ = ["tcp_rate_gen", "tcp_rate_check_app_limited", "tcp_delivery_rate",
           "tcp_rate_sack_end"]


def tcp_rate_gen(sk: TcpSock, end: int, now: float) -> None:
    """One rate sample for an ACK whose latest-sent newly delivered data ends
    before ``end`` (Linux ``tcp_rate_skb_delivered`` for that skb, then
    ``tcp_rate_gen``).  ``sk.delivered`` already counts this ACK's segments.

    Keeps the sample in ``rate_delivered`` / ``rate_interval`` /
    ``rate_app_limited`` unless it is invalid (shorter than the minimum RTT:
    the draft's §3.3 guard against an interval that cannot be a round trip)
    or app-limited and lower than the one kept.
    """
    log = sk.tx_log
    n = len(log)
    i = 0
    if n > TX_LOG_STRIDE:
        # Several bursts: the first that ends at or after ``end``.  (One burst,
        # the request/response case, is the newest and ends at SND.MAX.)
        top = sk.snd_max
        back = (top - end) & MASK  # how far before SND.MAX the data ends
        while i < n and ((top - log[i]) & MASK) > back:
            i += TX_LOG_STRIDE
    delivered = sk.delivered
    if sk.app_limited and 0 < ((delivered - sk.app_limited) & MASK) < HALF:
        sk.app_limited = 0  # the app-limited bubble is delivered and gone
    sk.delivered_mstamp = now
    sk.rate_round_end = sk.snd_nxt  # the in-order path's next sample (tcp_input)
    if i >= n:
        return  # no snapshot (the SYN; data sent before the log began)
    sent_at = log[i + 1]
    # The send phase: from the first send of the window this data belongs to
    # up to this data's send; the ACK phase: from the delivery that started
    # it until now.
    snd = sent_at - log[i + 4]
    ack = now - log[i + 3]
    sk.first_tx_mstamp = sent_at
    interval = snd if snd > ack else ack
    if interval <= 0.0 or interval < sk.min_rtt:
        return
    segs = delivered - log[i + 2]
    app = log[i + 5]
    if not app or segs * sk.rate_interval >= sk.rate_delivered * interval:
        sk.rate_delivered = segs
        sk.rate_interval = interval
        sk.rate_app_limited = bool(app)


def tcp_rate_sack_end(sk: TcpSock, blocks: tuple[tuple[int, int], ...]) -> int:
    """The right edge of the ACK's first SACK block that lies in (SND.UNA,
    SND.MAX] (RFC 2018 §4: the block holding the segment that triggered the
    ACK comes first; a D-SACK block below SND.UNA is skipped); SND.UNA if none."""
    una = sk.snd_una
    span = (sk.snd_max - una) & MASK
    for _left, right in blocks:
        d = (right - una) & MASK
        if 0 < d <= span:
            return right
    return una


def tcp_rate_check_app_limited(sk: TcpSock) -> None:
    """Is the sender application-limited?  (Linux ``tcp_rate_check_app_limited``,
    called as the application writes.)  Less than a segment unsent, the
    congestion window not full, no lost data waiting for retransmission: then
    the data in flight and what is sent next measure the application.  On
    every send() of a request/response flow: kept to a few tests."""
    cc = sk.cc
    if cc is None:
        return
    mss = sk.mss_cache
    sent = (sk.snd_nxt - sk.snd_una) & MASK
    if sk.sndq_len - sent >= mss:
        return
    if sk.in_recovery or sk.in_loss:
        d = (sk.lost_hi - sk.retrans_hi) & MASK
        if 0 < d < HALF:
            return  # lost data not yet retransmitted (Linux lost_out > retrans_out)
        sent = tcp_input.tcp_pipe(sk)
    elif sk.sacked:
        sent -= sk.sacked_bytes
    if sent >= cc.cwnd * mss:
        return
    sk.app_limited = ((sk.delivered + (sent + mss - 1) // mss) & MASK) or 1


def tcp_delivery_rate(sk: TcpSock) -> int:
    """The kept sample as bytes per second (Linux ``tcp_compute_delivery_rate``):
    segments times the MSS over the interval; 0 before the first sample."""
    if sk.rate_interval <= 0.0:
        return 0
    return int(sk.rate_delivered * sk.mss_cache / sk.rate_interval)
