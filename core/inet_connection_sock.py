"""Bind, listen and accept (Linux ``net/ipv4/inet_connection_sock.c``).

Bind conflicts follow Linux ``inet_bind_conflict`` (SO_REUSEADDR: two
sockets may share a port when neither is listening; SO_REUSEPORT: always
sharable between reuseport sockets of the same user) and
``inet_rcv_saddr_equal`` (INADDR_ANY overlaps every address).  The accept
queue counts like Linux: ``sk_acceptq_is_full`` is ``len > backlog``, so a
backlog of N admits N + 1 connections.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from . import inet_hashtables, tcp
from .inet_hashtables import BindBucket, BindOwner, InetHashinfo, OwnerT
from .tcp_h import (
    AF_INET,
    AF_INET6,
    TCP_LISTEN,
    V4_ADDR_MAX,
    RequestSock,
    TcpSock,
    TimerKind,
    os_error,
)

if TYPE_CHECKING:
    from .shard import Shard


__all__ = ["EPHEMERAL_LO", "EPHEMERAL_HI", "SOMAXCONN", "inet_csk_get_port",
           "inet_csk_bind_conflict", "inet_csk_listen_start", "sk_acceptq_is_full",
           "inet_csk_reqsk_queue_is_full", "inet_csk_reqsk_queue_add",
           "inet_csk_complete_hashdance", "inet_csk_reqsk_queue_drop", "inet_csk_accept"]

#: net.ipv4.ip_local_port_range default.
EPHEMERAL_LO = 32768
EPHEMERAL_HI = 60999
#: net.core.somaxconn default since Linux 5.4.
SOMAXCONN = 4096


def inet_rcv_saddr_equal(a: int, b: int) -> bool:
    return a == b or a == 0 or b == 0


def inet_addr_families(sk: BindOwner) -> int:
    """Which families' packets ``sk`` can take, as bits (1: IPv4, 2: IPv6):
    by its bound address, or for a wildcard by its family and IPV6_V6ONLY
    (issue 14; ``tcp_h.V4_ADDR_MAX`` tells the address families apart)."""
    a = sk.laddr
    if a:
        return 2 if a > V4_ADDR_MAX else 1
    if getattr(sk, "family", AF_INET) != AF_INET6:
        return 1
    return 2 if getattr(sk, "v6only", False) else 3


def inet_sk_saddr_equal(sk: BindOwner, sk2: BindOwner) -> bool:
    """Two sockets' bound addresses overlap (Linux ``inet_rcv_saddr_equal`` with
    ``ipv6_rcv_saddr_equal``): equal or a wildcard, in a family both take.
    So ``0.0.0.0`` and a dual-stack ``::`` conflict, ``0.0.0.0`` and a V6ONLY
    ``::`` do not, nor an IPv4 wildcard and a specific IPv6 address, in either
    order (checked on Linux 6.18: tests/unit/core/test_ipv6.py)."""
    return (inet_rcv_saddr_equal(sk.laddr, sk2.laddr)
            and bool(inet_addr_families(sk) & inet_addr_families(sk2)))


def inet_csk_bind_conflict(sk: OwnerT, tb: BindBucket[OwnerT], h: InetHashinfo[OwnerT] | None = None) -> bool:
    """True when ``sk`` may not share ``tb``'s port (Linux ``inet_bind_conflict``, relax)."""
    if h is not None:
        h.tr("inet_csk_bind_conflict")
    for sk2 in tb.owners:
        if sk2 is sk or not inet_sk_saddr_equal(sk, sk2):
            continue
        if sk.reuseaddr and sk2.reuseaddr and sk2.state is not TCP_LISTEN:
            continue  # TIME-WAIT children inherit reuseaddr from their listener
        if sk.reuseport and sk2.reuseport:
            continue  # same user: the whole stack runs as one uid
        return True
    return False


def inet_csk_get_port(h: InetHashinfo[OwnerT], sk: OwnerT, port: int, lo: int = EPHEMERAL_LO,
                      hi: int = EPHEMERAL_HI, offset: int = 0) -> None:
    """Bind ``sk`` to ``port`` (0: any free ephemeral port); OSError(EADDRINUSE) on conflict.

    Called again by listen() for an already bound socket, which re-checks the
    conflict now that the socket is LISTEN (two SO_REUSEADDR sockets may bind
    the same port but only one may listen, as on Linux).
    """
    h.tr("inet_csk_get_port")
    if port == 0:
        port = _find_open_port(h, sk, lo, hi, offset)
    else:
        h.tr("have_snum")
    tb = h.bhash.get(port)
    if tb is not None:
        h.tr("tb_found")
        if inet_csk_bind_conflict(sk, tb, h):
            raise os_error(errno.EADDRINUSE)
    h.tr("tb_not_found")  # Linux falls through this label from tb_found too
    if tb is None:
        tb = inet_hashtables.inet_bind_bucket_create(h, port)
    if sk.bound:  # listen() re-check of our own port
        return
    h.tr("success")
    inet_hashtables.inet_bind_hash(h, sk, tb, port)


def _find_open_port(h: InetHashinfo[OwnerT], sk: OwnerT, lo: int, hi: int, offset: int) -> int:
    """Linux ``inet_csk_find_open_port``: odd ports first (even ones go to connect())."""
    n = hi - lo + 1
    for parity in (1, 0):
        for i in range(n):
            port = lo + (offset + i) % n
            if port & 1 != parity:
                continue
            tb = h.bhash.get(port)
            if tb is None or not inet_csk_bind_conflict(sk, tb):
                return port
    raise os_error(errno.EADDRINUSE)


def inet_csk_listen_start(sh: Shard, sk: TcpSock, backlog: int) -> None:
    """LISTEN: re-check the port, then hash into the listening table."""
    h = sh.h
    h.tr("inet_csk_listen_start")
    reqsk_queue_alloc(h, sk)
    sk.backlog = min(max(backlog, 0), SOMAXCONN)
    inet_csk_delack_init(h, sk)
    prev = sk.state
    tcp.tcp_set_state(sh, sk, TCP_LISTEN)
    try:
        inet_csk_get_port(h, sk, sk.lport)
    except OSError:
        tcp.tcp_set_state(sh, sk, prev)
        raise
    inet_hashtables.inet_hash(h, sk)


def reqsk_queue_alloc(h: InetHashinfo[TcpSock], sk: TcpSock) -> None:
    """A listener's queues start empty: the accept queue and the count of request
    socks (Linux ``reqsk_queue_alloc``)."""
    h.tr("reqsk_queue_alloc")
    sk.accept_queue.clear()
    sk.reqs = 0


def inet_csk_delack_init(h: InetHashinfo[TcpSock], sk: TcpSock) -> None:
    """No delayed ACK pending (Linux ``inet_csk_delack_init``)."""
    h.tr("inet_csk_delack_init")
    sk.unacked_rcv = 0
    sk.ack_now = False
    sk.timers[TimerKind.DELACK] = None


def sk_acceptq_is_full(sk: TcpSock) -> bool:
    return len(sk.accept_queue) > sk.backlog


def inet_csk_reqsk_queue_is_full(sk: TcpSock) -> bool:
    return sk.reqs > sk.backlog


def inet_csk_reqsk_queue_add(h: InetHashinfo[TcpSock], listener: TcpSock, child: TcpSock) -> None:
    tracing = h.trace is not None  # once per handshake: keep the no-trace case call-free
    if tracing:
        h.tr("inet_csk_reqsk_queue_add")
    listener.accept_queue.append(child)
    if tracing:
        h.tr("sk_acceptq_added")


def inet_csk_complete_hashdance(h: InetHashinfo[TcpSock], listener: TcpSock, req: RequestSock,
                                child: TcpSock) -> None:
    """The request sock is done: drop it from the request queue, queue the child."""
    if h.trace is not None:
        h.tr("inet_csk_complete_hashdance")
    inet_csk_reqsk_queue_drop(h, req)
    inet_csk_reqsk_queue_add(h, listener, child)


def inet_csk_reqsk_queue_drop(h: InetHashinfo[TcpSock], req: RequestSock) -> None:
    """Unhash a request sock and take it off its listener's request queue (Linux
    ``inet_csk_reqsk_queue_drop``): it became a socket (whose entry replaced
    its own in ehash) or it is given up."""
    tracing = h.trace is not None
    if tracing:
        h.tr("inet_csk_reqsk_queue_drop")
    key = (req.laddr, req.lport, req.raddr, req.rport)
    if h.ehash.get(key) is req:
        del h.ehash[key]
    if not req.dead:
        req.dead = True
        if tracing:
            h.tr("reqsk_queue_removed")
        req.listener.reqs -= 1
    req.timers[TimerKind.SYNACK] = None


def inet_csk_accept(listener: TcpSock) -> TcpSock | None:
    """Pop the oldest established child, or None (EAGAIN for a non-blocking accept)."""
    if listener.state is not TCP_LISTEN:
        raise os_error(errno.EINVAL)
    q = listener.accept_queue
    return q.popleft() if q else None
