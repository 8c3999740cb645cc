"""Request socks: a half-open passive connection (Linux ``request_sock``, ``TCP_NEW_SYN_RECV``).

A SYN to a listener does not create a full socket: it creates this small
record, hashed into ehash under its 4-tuple, which answers with a SYN-ACK and
is retransmitted by its own SYN-ACK timer.  The final ACK turns it into a full
:class:`~shardstack.core.sock.TcpSock` (``tcp_check_req``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sock import State

__all__ = ["RequestSock", "inet_reqsk_alloc", "TCP_SYNACK_RETRIES"]

#: net.ipv4.tcp_synack_retries default.
TCP_SYNACK_RETRIES = 5


@dataclass(slots=True, eq=False)
class RequestSock:
    laddr: int
    lport: int
    raddr: int
    rport: int
    listener: Any
    state: State = State.NEW_SYN_RECV
    iss: int = 0
    irs: int = 0
    mss: int = 536  # peer's MSS option (clamped)
    wscale_ok: bool = False
    snd_wscale: int = 0
    rcv_wscale: int = 0
    rcv_wnd: int = 0
    sack_ok: bool = False
    ts_ok: bool = False
    ts_recent: int = 0
    ts_off: int = 0
    num_retrans: int = 0
    synack_time: float = 0.0
    acked: bool = False  # final ACK seen but the accept queue was full
    dead: bool = False
    timers: list = field(default_factory=lambda: [None] * 8)
    timer_seq: list = field(default_factory=lambda: [0] * 8)  # representative heap entry (tcp_timer)
    timer_q: list = field(default_factory=lambda: [None] * 8)  # its deadline (tcp_timer)


def inet_reqsk_alloc(sh: Any, listener: Any, laddr: int, lport: int, raddr: int,
                     rport: int) -> RequestSock:
    if sh.tracing:
        sh.tr("inet_reqsk_alloc")
        sh.tr("reqsk_alloc")
    return RequestSock(laddr, lport, raddr, rport, listener)
