"""Socket lookup tables (Linux ``net/ipv4/inet_hashtables.c``).

- ``ehash``: 4-tuple (laddr, lport, raddr, rport) -> established socket, request
  sock (NEW-SYN-RECV) or TIME-WAIT socket, as Linux keeps all three in one table.
- ``listening``: (laddr, lport) -> listener; laddr 0 is INADDR_ANY, and also
  an AF_INET6 socket bound to ``::`` that takes both families (Linux's
  dual-stack listener); one with IPV6_V6ONLY is keyed ``(ANY6, lport)``
  (``inet_listen_key``), so it can share the port with an IPv4 wildcard one.
- ``bhash``: port -> :class:`BindBucket` with its owners (bound sockets).

The bind table works without a Shard (``trace`` may stay None) so the
supervisor can be the single authority for bind() with the same code.  Owners
only need ``laddr``, ``reuseaddr``, ``reuseport`` and ``state`` attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .tcp_h import RequestSock, State, TcpSock

__all__ = ["BindOwner", "BindBucket", "InetHashinfo", "inet_bind_bucket_create", "inet_bind_hash",
           "inet_put_port", "inet_ehash_insert", "inet_ehash_nolisten", "inet_hash", "__inet_hash",
           "inet_unhash"]


class BindOwner(Protocol):
    """What the bind table reads of an owner: a ``TcpSock``, or the supervisor's
    ``GlobalBind`` (one bind table for every shard, docs/architecture.md)."""

    laddr: int
    lport: int
    raddr: int
    rport: int
    reuseaddr: bool
    reuseport: bool
    bound: bool
    bind_by_connect: bool
    state: State


#: The owners a table holds: ``TcpSock`` in a shard, ``GlobalBind`` in the supervisor.
OwnerT = TypeVar("OwnerT", bound=BindOwner)
#: ehash key: (laddr, lport, raddr, rport); listening key: (laddr, lport).
Tuple4 = tuple[int, int, int, int]
#: The listening-key address of an IPV6_V6ONLY socket bound to ``::``: no
#: address of either family (they are at most 128 bits).
ANY6 = 1 << 128


def inet_listen_key(sk: BindOwner) -> tuple[int, int]:
    """A listener's key in ``listening``: (laddr, lport), but ``(ANY6, lport)``
    for an IPV6_V6ONLY socket on the IPv6 wildcard (issue 14)."""
    if sk.laddr == 0 and getattr(sk, "v6only", False):
        return ANY6, sk.lport
    return sk.laddr, sk.lport


@dataclass(slots=True, eq=False)
class BindBucket(Generic[OwnerT]):
    """Linux ``inet_bind_bucket``: one per bound port."""

    port: int
    # Insertion-ordered set (dict of owner -> None): a listener's port keeps every
    # child and TIME-WAIT socket, so removal must not scan a list (crr workloads).
    owners: dict[OwnerT, None] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class InetHashinfo(Generic[OwnerT]):
    """Linux ``inet_hashinfo`` for one shard (or the supervisor's bind table)."""

    ehash: dict[Tuple4, TcpSock | RequestSock] = field(default_factory=dict)
    listening: dict[tuple[int, int], OwnerT] = field(default_factory=dict)
    bhash: dict[int, BindBucket[OwnerT]] = field(default_factory=dict)
    #: SO_REUSEPORT groups with more than one listener, by listening key; the
    #: group's first member is the one in ``listening`` (Linux ``sock_reuseport``).
    reuseport: dict[tuple[int, int], list[OwnerT]] = field(default_factory=dict)
    trace: list[str] | None = None

    def tr(self, name: str) -> None:
        if self.trace is not None:
            self.trace.append(name)


def inet_bind_bucket_create(h: InetHashinfo[OwnerT], port: int) -> BindBucket[OwnerT]:
    if h.trace is not None:
        h.tr("inet_bind_bucket_create")
    tb: BindBucket[OwnerT] = BindBucket(port)
    h.bhash[port] = tb
    return tb


def inet_bind_hash(h: InetHashinfo[OwnerT], sk: OwnerT, tb: BindBucket[OwnerT], port: int) -> None:
    """Make ``sk`` an owner of ``tb`` (Linux ``inet_bind_hash`` / ``sk_add_bind_node``)."""
    if h.trace is not None:
        h.tr("inet_bind_hash")
    sk.lport = port
    sk.bound = True
    tb.owners[sk] = None
    if h.trace is not None:
        h.tr("sk_add_bind_node")


def inet_put_port(h: InetHashinfo[OwnerT], sk: OwnerT) -> None:
    """Release ``sk``'s port; the bucket goes with its last owner."""
    if not sk.bound:
        return
    sk.bound = False
    tb = h.bhash.get(sk.lport)
    if tb is None:
        return
    owners = tb.owners
    if sk not in owners:
        return
    del owners[sk]
    if not owners:
        del h.bhash[sk.lport]


def inet_ehash_insert(h: InetHashinfo[TcpSock], sk: TcpSock | RequestSock,
                      osk: RequestSock | None = None) -> bool:
    """Insert by 4-tuple, replacing ``osk`` (the request sock) if given.

    Returns False when another socket already owns the 4-tuple.
    """
    if h.trace is not None:
        h.tr("inet_ehash_insert")
    key = (sk.laddr, sk.lport, sk.raddr, sk.rport)
    cur = h.ehash.get(key)
    if cur is not None and cur is not osk:
        return False
    if h.trace is not None:
        if cur is not None:
            h.tr("sk_nulls_del_node_init_rcu")  # the request sock's entry goes...
        h.tr("__sk_nulls_add_node_rcu")  # ...and this one takes the chain
    h.ehash[key] = sk
    return True


def inet_ehash_nolisten(h: InetHashinfo[TcpSock], sk: TcpSock, osk: RequestSock | None = None) -> bool:
    if h.trace is not None:
        h.tr("inet_ehash_nolisten")
    return inet_ehash_insert(h, sk, osk)


def inet_hash(h: InetHashinfo[OwnerT], sk: OwnerT) -> None:
    """Hash a listener (Linux ``inet_hash``)."""
    if h.trace is not None:
        h.tr("inet_hash")
    __inet_hash(h, sk)


def __inet_hash(h: InetHashinfo[OwnerT], sk: OwnerT) -> None:
    """Add a listener to the listening hash."""
    if h.trace is not None:
        h.tr("__inet_hash")
    key = inet_listen_key(sk)
    cur = h.listening.get(key)
    if cur is not None and cur is not sk:
        # A second listener on the same address and port: bind() let it in, so
        # both set SO_REUSEPORT.  It joins the group; it replaces no one
        # (Linux reuseport_add_sock).
        group = h.reuseport.setdefault(key, [cur])
        if sk not in group:
            group.append(sk)
        return
    h.listening[key] = sk


def reuseport_select_sock(h: InetHashinfo[OwnerT], head: OwnerT, saddr: int,
                          sport: int) -> OwnerT:
    """The group member a flow goes to (Linux ``reuseport_select_sock``): by a hash
    of the peer's address and port, so one flow always meets the same listener."""
    group = h.reuseport.get(inet_listen_key(head))
    if not group:
        return head
    return group[(saddr * 31 + sport) % len(group)]


def inet_unhash(h: InetHashinfo[OwnerT], sk: OwnerT) -> None:
    """Remove ``sk`` from whichever lookup table holds it."""
    key = (sk.laddr, sk.lport, sk.raddr, sk.rport)
    if h.ehash.get(key) is sk:
        del h.ehash[key]
    lkey = inet_listen_key(sk)
    group = h.reuseport.get(lkey)
    if group is not None and sk in group:
        # Leaving a SO_REUSEPORT group: the others keep listening (Linux
        # reuseport_detach_sock).
        group.remove(sk)
        if h.listening.get(lkey) is sk:
            h.listening[lkey] = group[0]
        if len(group) == 1:
            del h.reuseport[lkey]
        return
    if h.listening.get(lkey) is sk:
        del h.listening[lkey]


def inet_hash_connect(h: InetHashinfo[TcpSock], sk: TcpSock, lo: int, hi: int, offset: int,
                      port_filter: Callable[[int, int, int, int], bool] | None = None) -> bool:
    """Pick a local port for connect() and insert into ehash (Linux ``__inet_hash_connect``).

    RFC 6056 algorithm 3: start at a per-destination ``offset`` (a keyed hash of
    the addresses, computed by the caller) and walk the range.  A port already
    bound only through connect() may be shared as long as the 4-tuple is free
    (Linux ``fastreuse == -1`` buckets + ``__inet_check_established``).
    ``port_filter(laddr, lport, raddr, rport)`` lets the runtime keep only ports
    whose replies hash to this shard.  Returns False when no port is left.
    """
    if h.trace is not None:
        h.tr("__inet_hash_connect")
    n = hi - lo + 1
    ehash = h.ehash
    # Even ports first, then odd ones (Linux since 4.6): bind(port 0) takes
    # odd ones first (inet_csk_find_open_port), so the two rarely meet. Here
    # that matters more than in one kernel: bind(0) is answered by the
    # supervisor's table, which does not see the shards' connect() ports.
    start = (offset & ~1) % n
    for parity in (0, 1):
        for i in range(parity, n, 2):
            port = lo + (start + i) % n
            if port_filter is not None and not port_filter(sk.laddr, port, sk.raddr, sk.rport):
                continue
            tb = h.bhash.get(port)
            if tb is not None:
                if not all(o.bind_by_connect for o in tb.owners):
                    continue
                if (sk.laddr, port, sk.raddr, sk.rport) in ehash:
                    continue
            else:
                tb = inet_bind_bucket_create(h, port)
            inet_bind_hash(h, sk, tb, port)
            sk.bind_by_connect = True
            inet_ehash_insert(h, sk)
            return True
    return False
