"""The delayed-ACK engine: Linux's ``icsk_ack`` state (quick-ack credit, the ato
estimator, pingpong mode), as ``tcp_event_data_recv``, ``tcp_send_delayed_ack``,
``tcp_delack_timer_handler`` and ``tcp_event_data_sent`` drive it.

Reading list: RFC 1122 §4.2.3.2 (delay an ACK at most 500 ms, ACK every second
full-sized segment), RFC 5681 §4.2 (ACK out-of-order data and a filled hole
at once), RFC 9293 §3.8.6.3.

Linux's rules, in the engine's terms (``TcpSock`` fields in the "delayed ACK"
block):

- ``quickack``: ACKs left to send at once.  The first data of a connection,
  and data after an idle gap longer than the RTO, grant up to 16
  (``tcp_incr_quickack``: half the receive window in segments, at least 2);
  every ACK that acknowledges new data uses one; when it runs out, ato
  deflates to 40 ms.  A duplicate (already received) segment means the peer
  retransmitted, so our ACK was lost or slow: quick-ack mode again, pingpong
  off (``tcp_enter_quickack_mode``).
- ``ato``: the delayed-ACK timeout, estimated from the data's inter-arrival
  time ``m`` (``tcp_event_data_recv``): back-to-back data pulls it towards
  40 ms, gaps shorter than ato pull it towards the gap, never above the RTO.
  A delayed ACK waits ato, at most 200 ms and, once ato is above 40 ms, at
  most max(SRTT, 40 ms) (``tcp_send_delayed_ack``).  When the timer fires
  with the ACK still owed, the application did not answer within ato: ato
  doubles (up to the RTO), or in pingpong mode pingpong ends and ato goes
  back to 40 ms (``tcp_delack_timer_handler``).
- ``pingpong``: data sent within ato of the last data received counts as a
  reply (Linux ``tcp_event_data_sent``; ``tcp_output.tcp_write_new`` checks
  it inline, once per transmit round); from the first one the connection is
  interactive and quick-ack mode no longer applies, so a request's ACK
  rides on its response.  A FIN received in ESTABLISHED enters it too.
  ``TCP_QUICKACK`` 1 ends it (and sends an owed ACK), 0 enters it.
"""

from __future__ import annotations

from .tcp_h import TcpSock

__all__ = ["TCP_ATO_MIN", "TCP_DELACK_MAX", "TCP_MAX_QUICKACKS", "tcp_event_data_recv",
           "tcp_incr_quickack", "tcp_enter_quickack_mode", "tcp_delack_timeout",
           "tcp_delack_timer_expired", "tcp_dec_quickack_mode",
           "in_pingpong_mode", "enter_pingpong_mode"]

#: Linux TCP_ATO_MIN / TCP_DELACK_MIN (HZ/25) and TCP_DELACK_MAX (HZ/5).
TCP_ATO_MIN = 0.040
TCP_DELACK_MAX = 0.200
#: Linux TCP_MAX_QUICKACKS.
TCP_MAX_QUICKACKS = 16
#: tcp_send_delayed_ack's bound when not interactive (HZ/2).
_MAX_ATO_BULK = 0.5
#: Linux TCP_PINGPONG_THRESH (tcp_pingpong_thresh's default): one reply makes
#: the connection interactive, so the count is kept at 0 or 1.
_PINGPONG_THRESH = 1


def tcp_incr_quickack(sk: TcpSock, max_quickacks: int) -> None:
    """Grant quick ACKs: half the receive window in segments, 2..``max_quickacks``
    (Linux ``tcp_incr_quickack``)."""
    mss = sk.rcv_mss or 536
    n = sk.rcv_wnd // (2 * mss)
    if n < 2:
        n = 2
    if n > max_quickacks:
        n = max_quickacks
    if n > sk.quickack:
        sk.quickack = n


def tcp_enter_quickack_mode(sk: TcpSock, max_quickacks: int = TCP_MAX_QUICKACKS) -> None:
    """ACK the next segments at once and leave pingpong mode (Linux
    ``tcp_enter_quickack_mode``)."""
    tcp_incr_quickack(sk, max_quickacks)
    sk.pingpong = 0
    sk.ato = TCP_ATO_MIN


def tcp_event_data_recv(sk: TcpSock, now: float) -> None:
    """In-order data arrived: update the ato estimator (Linux ``tcp_event_data_recv``)."""
    ato = sk.ato
    if not ato:
        # The first data: quick-ack mode for the connection's start.
        tcp_incr_quickack(sk, TCP_MAX_QUICKACKS)
        sk.ato = TCP_ATO_MIN
    else:
        m = now - sk.lrcvtime
        if m <= TCP_ATO_MIN / 2:
            sk.ato = ato / 2 + TCP_ATO_MIN / 2
        elif m < ato:
            ato = ato / 2 + m
            sk.ato = ato if ato < sk.rto else sk.rto
        elif m > sk.rto:
            # A gap longer than the RTO: the sender restarts; ACK it quickly.
            tcp_incr_quickack(sk, TCP_MAX_QUICKACKS)
    sk.lrcvtime = now


def tcp_dec_quickack_mode(sk: TcpSock) -> None:
    """An ACK of new data went out: one quick ACK used; the last one deflates ato
    (Linux ``tcp_dec_quickack_mode``, from ``tcp_event_ack_sent``)."""
    q = sk.quickack - 1
    sk.quickack = q if q > 0 else 0
    if q <= 0:
        sk.ato = TCP_ATO_MIN


def tcp_delack_timeout(sk: TcpSock) -> float:
    """How long an ACK may wait (Linux ``tcp_send_delayed_ack``): ato, bounded by
    max(SRTT, 40 ms) once ato is above 40 ms, and by 200 ms."""
    ato = sk.ato
    if ato <= TCP_ATO_MIN:
        return TCP_ATO_MIN
    max_ato = TCP_DELACK_MAX if sk.pingpong >= _PINGPONG_THRESH else _MAX_ATO_BULK
    srtt = sk.srtt
    if srtt:
        rtt = srtt if srtt > TCP_ATO_MIN else TCP_ATO_MIN
        if rtt < max_ato:
            max_ato = rtt
    if ato > max_ato:
        ato = max_ato
    return ato if ato < TCP_DELACK_MAX else TCP_DELACK_MAX


def tcp_delack_timer_expired(sk: TcpSock) -> None:
    """The delayed-ACK timer fired with an ACK owed: the application did not
    answer within ato (Linux ``tcp_delack_timer_handler``)."""
    if sk.pingpong < _PINGPONG_THRESH:
        ato = 2 * sk.ato
        sk.ato = ato if ato < sk.rto else sk.rto
    else:
        sk.pingpong = 0
        sk.ato = TCP_ATO_MIN


def in_pingpong_mode(sk: TcpSock) -> bool:
    """Linux ``inet_csk_in_pingpong_mode``."""
    return sk.pingpong >= _PINGPONG_THRESH


def enter_pingpong_mode(sk: TcpSock) -> None:
    """Linux ``inet_csk_enter_pingpong_mode``."""
    sk.pingpong = _PINGPONG_THRESH

