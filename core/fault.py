"""The boundary around one frame (issue 11): a failure there is its connection's alone.

``Shard.receive``/``receive_batch`` and ``Shard.advance`` call the engine
once per frame or timer inside ``try``; what escapes is a bug in the engine,
never an expected condition (malformed input is parsed and counted, bad API
use raises OSError).  The boundary is the last line and hides nothing:

- the frame is counted under ``DropReason.ENGINE_EXCEPTION``;
- the connection it belonged to is ended as Linux ends one it cannot go on
  with (``tcp_abort``: RST to the peer, ECONNABORTED to the application), a
  request sock is dropped, a listener is left alone (its next SYN is another
  connection);
- a log line names the frame (addresses, ports, flags, the first bytes) and
  where it failed, at most one per second per shard (the rest are counted in
  ``Shard.faults_unlogged``), so a peer that can trigger the bug cannot
  also flood the log;
- every other frame of the batch and every other connection go on.

The fuzzer (tests/fuzz) requires the counter to stay zero: each cause is
still fixed where it lies.
"""

from __future__ import annotations

import errno
import logging
import traceback
from typing import TYPE_CHECKING

from . import inet_connection_sock, inet_hashtables, tcp, tcp_output
from .dropreason import DropReason
from .request_sock import RequestSock
from .sock import State, TcpSock
from .tcp_h import TimerKind
from .tcp_timer import TimerHeap
from .wire.errors import WireError
from .wire.ipv4 import ip_to_str, parse_ipv4
from .wire.ipv6 import ip6_to_str, parse_ipv6
from .wire.tcp import flags_to_str, parse_tcp

if TYPE_CHECKING:
    from .shard import Shard
    from .tcp_h import BytesLike

__all__ = ["tcp_rcv_failed", "tcp_timer_failed", "LOG_INTERVAL"]

log = logging.getLogger("shardstack.core")
#: At most one fault logged per this many seconds (of the shard's ``now``).
LOG_INTERVAL = 1.0


def tcp_rcv_failed(sh: Shard, pkt: BytesLike, exc: BaseException, now: float) -> None:
    """Handling ``pkt`` raised ``exc``: count it, end its connection, log it (rate limited)."""
    sh.stats.drop(DropReason.ENGINE_EXCEPTION)
    what = f"frame {len(pkt)} bytes {bytes(pkt[:48]).hex()}"
    sk: TcpSock | RequestSock | None = None
    try:
        if len(pkt) and pkt[0] >> 4 == 6:
            ip6, payload = parse_ipv6(pkt)
            src, dst, proto = ip6.src, ip6.dst, ip6.next_header
            fmt = ip6_to_str
        else:
            ip, payload = parse_ipv4(pkt)
            src, dst, proto = ip.src, ip.dst, ip.proto
            fmt = ip_to_str
        if proto == 6:
            seg = parse_tcp(payload)
            what = (f"TCP {fmt(src)}:{seg.src_port} > {fmt(dst)}:"
                    f"{seg.dst_port} [{flags_to_str(seg.flags)}] seq={seg.seq} ack={seg.ack} "
                    f"len={len(seg.payload)}")
            sk = sh.h.ehash.get((dst, seg.dst_port, src, seg.src_port))
    except WireError:
        pass  # it failed after parsing, so it parses; this is only for the message
    _abort(sh, sk, now)
    _log(sh, now, what, exc)


def tcp_timer_failed(sh: Shard, kind: int, sk: TcpSock | RequestSock, exc: BaseException,
                     now: float) -> None:
    """A timer handler raised: the same, for the connection the timer belongs to."""
    sh.stats.drop(DropReason.ENGINE_EXCEPTION)
    _abort(sh, sk, now)
    _log(sh, now, f"timer {TimerKind(kind).name} of {sk.laddr}:{sk.lport}>{sk.raddr}:{sk.rport}",
         exc)


def _abort(sh: Shard, sk: TcpSock | RequestSock | None, now: float) -> None:
    """End the connection (Linux ``tcp_abort``), whatever state the failure left it in."""
    if sk is None:
        return
    if isinstance(sk, RequestSock):
        inet_connection_sock.inet_csk_reqsk_queue_drop(sh.h, sk)
        return
    st = sk.state
    if st is State.LISTEN or st is State.CLOSED:
        return
    try:
        if st is not State.TIME_WAIT and st is not State.SYN_SENT:
            tcp_output.tcp_send_active_reset(sh, sk, now)
        tcp.tcp_done(sh, sk, errno.ECONNABORTED)
    except Exception:  # the state is too broken to close normally: take it out by hand
        TimerHeap.cancel_all(sk)
        inet_hashtables.inet_unhash(sh.h, sk)
        inet_hashtables.inet_put_port(sh.h, sk)
        sk.dead = True
        sh.socks.pop(sk.sd, None)


def _log(sh: Shard, now: float, what: str, exc: BaseException) -> None:
    if sh.fault_logged >= 0 and now - sh.fault_logged < LOG_INTERVAL:
        sh.faults_unlogged += 1
        return
    sh.fault_logged = now
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno} {tb[-1].name}" if tb else "?"
    log.error("engine fault on %s: %s: %s at %s (connection reset; %d more not logged)",
              what, type(exc).__name__, exc, where, sh.faults_unlogged)
    sh.faults_unlogged = 0
