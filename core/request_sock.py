"""Request socks: a half-open passive connection (Linux ``request_sock``, ``TCP_NEW_SYN_RECV``).

A SYN to a listener does not create a full socket: it creates this small
record, hashed into ehash under its 4-tuple, which answers with a SYN-ACK and
is retransmitted by its own SYN-ACK timer.  The final ACK turns it into a full
:class:`~shardstack.core.sock.TcpSock` (``tcp_check_req``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .sock import State, TcpSock

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["RequestSock", "inet_reqsk_alloc"]


@dataclass(slots=True, eq=False)
class RequestSock:
    laddr: int
    lport: int
    raddr: int
    rport: int
    listener: TcpSock
    state: Literal[State.NEW_SYN_RECV] = State.NEW_SYN_RECV  # Linux TCP_NEW_SYN_RECV
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
    ecn_ok: bool = False  # the SYN asked for ECN and we accept (tcp_ecn_create_request)
    num_retrans: int = 0
    synack_time: float = 0.0
    dead: bool = False
    timers: list[float | None] = field(default_factory=lambda: [None] * 9)
    timer_seq: list[int] = field(default_factory=lambda: [0] * 9)  # representative heap entry
    timer_q: list[float | None] = field(default_factory=lambda: [None] * 9)  # its deadline


def inet_reqsk_alloc(sh: Shard, listener: TcpSock, laddr: int, lport: int, raddr: int,
                     rport: int) -> RequestSock:
    if sh.tracing:
        sh.tr("inet_reqsk_alloc")
        sh.tr("reqsk_alloc")
    return RequestSock(laddr, lport, raddr, rport, listener)
