"""What the engine's modules share (the role of Linux ``include/net/tcp.h``).

Every constant that more than one module needs is defined here once, with
the sequence-space idiom and the types engine signatures use.  Engine
modules import each other at the top as module objects (``from . import
tcp_output``) and take names from here; this module imports only the leaf
modules that define the types (``sock``, ``request_sock``, ``wire.tcp``).
``Shard`` is imported for the type checker only: ``shard`` imports every
engine module, so a module that names ``Shard`` in a signature does so under
``TYPE_CHECKING`` (annotations are strings: ``from __future__ import
annotations``).

Sequence space (RFC 9293 §3.4): sequence numbers are ints in 0..2**32-1 and
compare on the circle.  Linux writes ``before(a, b)`` / ``after(a, b)``; the
engine writes the same test inline, in one idiom, on the forward distance
``d = (a - b) & MASK`` (how far ``a`` lies past ``b``):

==========================  ==========================================
Linux                       here (``d = (a - b) & MASK``)
==========================  ==========================================
``a + n``                   ``(a + n) & MASK``
``before(a, b)``            ``d & HALF``         (non-zero: a before b)
``!before(a, b)``           ``d < HALF``         (a at or after b)
``after(a, b)``             ``0 < d < HALF``
``between(x, lo, hi)``      ``(x - lo) & MASK <= (hi - lo) & MASK``
==========================  ==========================================

Why inline and not helper functions: a call costs more than the test.
Measured on the development machine (CPython 3.11, best of 5 x 2e6):
``before(a, b)`` as a function 109 ns, inline 62 ns; ``after`` 112 ns vs
70 ns.  The fast path makes about ten such tests per segment, which would
cost 0.4 µs of its 4 µs.  So the inline idiom is the one way, everywhere in
core/, including cold paths; no helper functions exist to be used instead.
Half the space away counts as "before" (RFC 1982 leaves it undefined).
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, Final

from .request_sock import RequestSock
from .sock import State, TcpSock
from .wire.tcp import TcpSegment

if TYPE_CHECKING:
    from .shard import Shard

__all__ = [
    "MASK", "HALF", "V4_ADDR_MAX", "AF_INET", "AF_INET6", "TCP_V6_HDRS", "State", "TcpSock", "RequestSock", "TcpSegment", "Shard",
    "TCP_RTO_MIN", "TCP_RTO_MAX", "TCP_TIMEOUT_INIT", "TCP_DELACK", "TCP_SYN_RETRIES",
    "TCP_SYNACK_RETRIES", "TCP_RETRIES1", "TCP_RETRIES2", "TCP_ORPHAN_RETRIES",
    "MAX_TCP_KEEPCNT", "MAX_TCP_KEEPIDLE", "MAX_TCP_KEEPINTVL", "MAX_TCP_SYNCNT", "TCP_FIN_TIMEOUT", "TCP_FIN_TIMEOUT_MAX", "TCP_TIMEWAIT_LEN",
    "TCP_FASTRETRANS_THRESH", "TCP_MIN_SND_MSS", "TCP_SKB_OVERHEAD", "TCPOLEN_TSTAMP_ALIGNED", "TX_LOG_STRIDE", "NOT_IMPLEMENTED", "os_error", "TimerKind", "BytesLike",
    "SockOptValue", "TCP_URG_VALID", "TCP_URG_NOTYET", "TCP_URG_READ",
    "TCP_CLOSED", "TCP_LISTEN", "TCP_SYN_SENT", "TCP_SYN_RECV", "TCP_ESTABLISHED", "TCP_FIN_WAIT1",
    "TCP_FIN_WAIT2", "TCP_CLOSE_WAIT", "TCP_CLOSING", "TCP_LAST_ACK", "TCP_TIME_WAIT",
]

#: A packet or an application's buffer: anything with the buffer protocol we accept.
BytesLike = bytes | bytearray | memoryview
#: A socket option's value as setsockopt(2) takes it: an int, the option's bytes,
#: a name (TCP_CONGESTION) or SO_LINGER's (onoff, seconds).
SockOptValue = int | bytes | bytearray | str | tuple[int, int]

#: ``TcpSock.urg_data`` flags (Linux TCP_URG_*), or'ed with the urgent byte:
#: the byte is here, the pointer is known but the byte not yet received, the
#: application took it with recv(MSG_OOB).
TCP_URG_VALID = 0x100
TCP_URG_NOTYET = 0x200
TCP_URG_READ = 0x400

#: Sequence numbers are 32 bits: arithmetic is modulo MASK + 1.
MASK = 0xFFFFFFFF
#: Half the sequence space: a forward distance with this bit set means "before".
HALF = 0x80000000

# -- address families (issue 14; docs/architecture.md "Conventions") ---------------------------

#: An address (an ``int``) above this is an IPv6 one.  Wire addresses in
#: ``::/96`` (unspecified, loopback, IPv4-compatible) are refused on IPv6
#: input and as IPv6 destinations, so every IPv6 address a connection holds
#: is above it and every IPv4 one at or below it: a connection's family is
#: ``raddr > V4_ADDR_MAX``, and one table keys both families without overlap.
V4_ADDR_MAX: Final = 0xFFFFFFFF
#: socket.AF_INET / AF_INET6 (Linux's values), what ``TcpSock.family`` holds.
AF_INET: Final = 2
AF_INET6: Final = 10
#: IPv6 + TCP headers without options: the MSS is the MTU less this (IPv4: 40).
TCP_V6_HDRS: Final = 60



# -- states as plain names ---------------------------------------------------------------------

# ``State.X`` is an EnumType attribute lookup (~70 ns) on paths run once per
# segment: engine modules compare ``sk.state is TCP_X`` against these instead.
# ``Final``: the type checker reads ``sk.state is TCP_ESTABLISHED`` as "not a
# RequestSock" (whose state is always NEW-SYN-RECV).
TCP_CLOSED: Final = State.CLOSED
TCP_LISTEN: Final = State.LISTEN
TCP_SYN_SENT: Final = State.SYN_SENT
TCP_SYN_RECV: Final = State.SYN_RECV
TCP_ESTABLISHED: Final = State.ESTABLISHED
TCP_FIN_WAIT1: Final = State.FIN_WAIT1
TCP_FIN_WAIT2: Final = State.FIN_WAIT2
TCP_CLOSE_WAIT: Final = State.CLOSE_WAIT
TCP_CLOSING: Final = State.CLOSING
TCP_LAST_ACK: Final = State.LAST_ACK
TCP_TIME_WAIT: Final = State.TIME_WAIT


def os_error(code: int) -> OSError:
    """The OSError a system call fails with: ``code`` and its message, as the kernel's errno."""
    return OSError(code, os.strerror(code))


# -- timers (Linux include/net/tcp.h; RFC 6298) -----------------------------------------------


class TimerKind(enum.IntEnum):
    """The timers a socket has (Linux ``ICSK_TIME_*``, include/net/inet_connection_sock.h):
    an index into ``sk.timers`` (see ``tcp_timer``)."""

    RETRANSMIT = 0  # icsk_retransmit_timer (also SYN retries)
    DELACK = 1  # icsk_delack_timer
    KEEPALIVE = 2  # sk_timer: keepalive, and the orphaned FIN-WAIT-2 timeout
    TIME_WAIT = 3  # inet_twsk timer
    SYNACK = 4  # reqsk_timer
    PERSIST = 5  # zero-window probe timer
    REO = 6  # RACK reordering window (RFC 8985 §6.2; Linux ICSK_TIME_REO_TIMEOUT)
    TLP = 7  # tail loss probe (RFC 8985 §7; Linux ICSK_TIME_LOSS_PROBE)
    PACING = 8  # the next paced departure (Linux tcp_sock.pacing_timer; tcp_pacing)


#: Values per ``TcpSock.tx_log`` entry: end, send time, and the rate sampler's
#: snapshot (delivered, delivered_mstamp, first_tx_mstamp, app-limited).
TX_LOG_STRIDE = 6

#: Linux TCP_RTO_MIN (200 ms) and TCP_RTO_MAX (120 s).
TCP_RTO_MIN = 0.2
TCP_RTO_MAX = 120.0
#: RFC 6298 (2.1) / Linux TCP_TIMEOUT_INIT: the RTO before any RTT sample.
TCP_TIMEOUT_INIT = 1.0
#: Delayed-ACK timeout (Linux TCP_DELACK_MIN / TCP_ATO_MIN, 40 ms).
TCP_DELACK = 0.040
#: net.ipv4 sysctl defaults: tcp_syn_retries, tcp_synack_retries, tcp_retries1/2,
#: and tcp_orphan_retries' effective value (0 means 8 while the peer seems alive).
TCP_SYN_RETRIES = 6
TCP_SYNACK_RETRIES = 5
TCP_RETRIES1 = 3
TCP_RETRIES2 = 15
TCP_ORPHAN_RETRIES = 8
#: net.ipv4.tcp_syn_linear_timeouts (Linux 6.18 default 4): the first four SYN
#: retransmissions keep the initial RTO (1 s) instead of doubling it, and the
#: SYN retry count (TCP_SYNCNT / tcp_syn_retries) is extended by as many.
TCP_SYN_LINEAR_TIMEOUTS = 4
#: TCP_SYNCNT's upper bound (Linux MAX_TCP_SYNCNT).
MAX_TCP_SYNCNT = 127
#: Keepalive options' upper bounds (Linux MAX_TCP_KEEPIDLE/KEEPINTVL in s, MAX_TCP_KEEPCNT).
MAX_TCP_KEEPIDLE = 32767
MAX_TCP_KEEPINTVL = 32767
MAX_TCP_KEEPCNT = 127
#: net.ipv4.tcp_fin_timeout: how long an orphaned FIN-WAIT-2 socket waits for the FIN.
TCP_FIN_TIMEOUT = 60.0
#: TCP_LINGER2's upper bound (Linux TCP_FIN_TIMEOUT_MAX).
TCP_FIN_TIMEOUT_MAX = 120.0
#: Linux net.ipv4.tcp_min_snd_mss: the send MSS (before options) is never below
#: 48, so a peer announcing MSS 1..47 cannot make us send 8-byte segments or,
#: with timestamps, none at all (CVE-2019-11479).
TCP_MIN_SND_MSS = 48
#: Receive memory charged per queued segment besides its payload (our truesize:
#: the queue entry, the bytes object's header and the sequence numbers, ~180
#: bytes in CPython, rounded up; Linux charges sk_buff truesize, ~768 for a
#: small segment).  A peer sending 1-byte segments fills the buffer's budget
#: after rcvbuf / 257 of them, not rcvbuf.
TCP_SKB_OVERHEAD = 256
#: Bytes the timestamp option takes in every segment (RFC 7323 §3, aligned).
TCPOLEN_TSTAMP_ALIGNED = 12
#: Linux TCP_TIMEWAIT_LEN: 60 s (the RFC's 2*MSL with MSL = 30 s).
TCP_TIMEWAIT_LEN = 60.0
#: RFC 6675 DupThresh (Linux TCP_FASTRETRANS_THRESH).
TCP_FASTRETRANS_THRESH = 3

# -- the trace (ShardConfig.trace) --------------------------------------------------------------

#: Names in the reference call graph (callgraph.md: bind, listen, passive open)
#: whose work the engine does not do, so the trace never emits them: a name in
#: the trace is a claim that the function's work was done there.  The trace
#: test (tests/unit/core/test_trace.py) requires these absent and every other
#: reference name present, in order; docs/architecture.md lists them from here.
NOT_IMPLEMENTED = frozenset({
    # The system-call and file layer: the Shard's socket API stands in for it.
    "sys_bind", "fput_light", "sys_listen",
    # Routing, IP options and the IP output path: one route, no IP options sent,
    # and the caller takes the frames (Shard.take_frames) and sends them.
    "tcp_v4_save_options", "tcp_v4_route_req", "inet_csk_route_req", "flowi4_init_output",
    "ip_route_output_flow", "inet_sk_rx_dst_set", "inet_csk_route_child_sock",
    "inet_sk_rebuild_header", "dst_mtu", "ipv4_mtu", "ip_local_out", "__ip_local_out",
    "dst_output", "ip_output",
    # Congestion control of a child: created at ESTABLISHED (tcp_init_transfer).
    "tcp_ca_openreq_child", "tcp_assign_congestion_control", "tcp_set_ca_state",
    "bictcp_state", "tcp_in_ack_event",
    # Not built: saved SYNs, receive-side steering, per-protocol use counts,
    # MSS from the route's MTU, MSS bounded by the window, the old initial-buffer fixup and send-buffer
    # growth (the receive buffer auto-tunes: tcp_rcvbuf), the metrics cache,
    # and a fast-path switch (tcp_v4_rcv predicts for every ESTABLISHED socket).
    "tcp_reqsk_record_syn", "tcp_move_syn",
    "sock_rps_save_rxhash", "sock_prot_inuse_add", "tcp_mtu_to_mss",
    "tcp_bound_to_half_wnd",
    "tcp_fixup_rcvbuf", "tcp_sndbuf_expand", "tcp_full_space", "tcp_init_metrics",
    "tcp_fast_path_on",
})
