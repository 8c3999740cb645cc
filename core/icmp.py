"""ICMP input (Linux ``net/ipv4/icmp.c``: ``icmp_rcv``, ``icmp_unreach``).

Reading list: RFC 792 (formats), RFC 1122 §3.2.2 and §4.2.3.9 (what a host
and its TCP do with each error), RFC 1191 (path MTU discovery), RFC 5927
(ICMP attacks on TCP: check the quoted sequence number), RFC 6633 (Source
Quench is deprecated: ignore it), RFC 6069 (not modelled: no RTO revert).

The engine sees ICMP only for its own addresses (echo is netio's, answered
before a frame ever reaches a shard).  ``icmp_rcv`` verifies the message,
counts it by type, and turns an error that quotes one of our packets into an
:class:`IcmpErr` for the transport's error handler (``tcp_ipv4.tcp_v4_err``,
Linux ``icmp_socket_deliver`` → ``err_handler``).  Malformed messages are
counted (``icmp_in_errors``, ``icmp_in_csum_errors``) and dropped; nothing
here raises.

Counters on ``ShardStats`` (Linux ICMP MIB names): ``icmp_in_msgs`` (every
ICMP message for us), ``icmp_in_errors`` (malformed, or quoting no socket of
ours), ``icmp_in_csum_errors``, ``icmp_in_dest_unreachs``,
``icmp_in_time_excds``, ``icmp_in_parm_probs``, ``icmp_in_ignored`` (Source
Quench, Redirect, and informational types).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .dropreason import DropReason
from .wire.errors import WireError
from .wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_PARAMETERPROB,
    ICMP_TIME_EXCEEDED,
    IcmpMessage,
    IcmpQuote,
    parse_icmp,
    parse_icmp_quote,
)
from .wire.ipv4 import Ipv4Header

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["IcmpErr", "TokenBucket", "icmp_rcv", "icmp_unreach", "ICMP_ERR_CONVERT", "NR_ICMP_UNREACH",
           "IP_RT_MIN_PMTU"]

#: Highest destination-unreachable code with a meaning (ICMP_PREC_CUTOFF).
NR_ICMP_UNREACH = 15

#: net.ipv4.route.min_pmtu: a reported MTU below this is raised to it
#: (512 bytes of data + 20 IP + 20 TCP; Linux ``ip_rt_min_pmtu``).
IP_RT_MIN_PMTU = 552
#: ICMP errors a shard acts on per second, and the burst it allows (a token
#: bucket).  Each error that reaches a connection costs a lookup and may
#: resend a flight (fragmentation needed): a flood of well-formed errors is
#: cut here, counted as ICMP_RATELIMIT.  Linux bounds what it *sends*
#: (icmp_msgs_per_sec = 1000); we bound what we take the same way.
ICMP_ERR_RATE = 1000.0
ICMP_ERR_BURST = 100.0

#: Destination-unreachable code -> (errno, fatal), as Linux's
#: ``icmp_err_convert``.  ``fatal`` is RFC 1122 §3.2.2.1's hard/soft split
#: (net, host and source-route failures are transient); TCP itself treats
#: every error as soft once synchronized (RFC 1122 §4.2.3.9), so it is here
#: for other transports and for reference.
ICMP_ERR_CONVERT: tuple[tuple[int, bool], ...] = (
    (errno.ENETUNREACH, False),   # 0 net unreachable
    (errno.EHOSTUNREACH, False),  # 1 host unreachable
    (errno.ENOPROTOOPT, True),    # 2 protocol unreachable
    (errno.ECONNREFUSED, True),   # 3 port unreachable
    (errno.EMSGSIZE, False),      # 4 fragmentation needed and DF set
    (errno.EOPNOTSUPP, False),    # 5 source route failed
    (errno.ENETUNREACH, True),    # 6 destination network unknown
    (errno.EHOSTDOWN, True),      # 7 destination host unknown
    (errno.ENONET, True),         # 8 source host isolated
    (errno.ENETUNREACH, True),    # 9 network administratively prohibited
    (errno.EHOSTUNREACH, True),   # 10 host administratively prohibited
    (errno.ENETUNREACH, False),   # 11 network unreachable for TOS
    (errno.EHOSTUNREACH, False),  # 12 host unreachable for TOS
    (errno.EHOSTUNREACH, True),   # 13 communication administratively prohibited
    (errno.EHOSTUNREACH, True),   # 14 host precedence violation
    (errno.EHOSTUNREACH, True),   # 15 precedence cutoff in effect
)


class IcmpErr(NamedTuple):
    """An ICMP error about one of our packets, for the transport's handler.

    ``info`` is the next-hop MTU of "fragmentation needed" (RFC 1191 §4; 0
    from a router older than RFC 1191), else 0.  ``sender`` is who reported
    it (a router, or the destination itself).
    """

    type: int
    code: int
    info: int
    sender: int
    quote: IcmpQuote


def icmp_rcv(sh: Shard, ip: Ipv4Header, payload: bytes | bytearray | memoryview
             ) -> IcmpErr | None:
    """One ICMP message addressed to us (Linux ``icmp_rcv``); never raises.

    Returns the error for the transport, or None when there is nothing to
    deliver (informational, ignored or malformed: counted either way).
    """
    stats = sh.stats
    stats.icmp_in_msgs += 1
    try:
        msg = parse_icmp(payload)  # the checksum covers the whole message (RFC 792)
    except WireError as e:
        stats.icmp_in_errors += 1
        if e.reason == "checksum":
            stats.icmp_in_csum_errors += 1
            stats.drop(DropReason.ICMP_CSUM)
        else:
            stats.drop(DropReason.ICMP_HDR)
        return None
    t = msg.type
    if t == ICMP_DEST_UNREACH:
        stats.icmp_in_dest_unreachs += 1
    elif t == ICMP_TIME_EXCEEDED:
        stats.icmp_in_time_excds += 1
    elif t == ICMP_PARAMETERPROB:
        stats.icmp_in_parm_probs += 1
    else:
        # Source Quench: RFC 6633 §3 "hosts MUST silently discard".  Redirect:
        # the engine has one route (its peer or gateway); nothing to redirect.
        # Echo and the other informational types are netio's business.
        stats.icmp_in_ignored += 1
        return None
    if not icmp_err_allowed(sh):
        stats.drop(DropReason.ICMP_RATELIMIT)
        return None
    return icmp_unreach(sh, ip, msg)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (the ICMP rate
    limits: Linux ``icmp_global_allow``'s shape)."""

    rate: float
    burst: float
    tokens: float
    t: float

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then take one token if there is one."""
        tokens = self.tokens + (now - self.t) * self.rate
        self.t = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


def icmp_err_allowed(sh: Shard) -> bool:
    """Take a token from the shard's ICMP error bucket (``ICMP_ERR_RATE``)."""
    return sh.icmp_bucket.take(sh.now)


def icmp_unreach(sh: Shard, ip: Ipv4Header, msg: IcmpMessage) -> IcmpErr | None:
    """An error message: read the quote (Linux ``icmp_unreach``)."""
    try:
        quote = parse_icmp_quote(msg.payload)
    except WireError:
        sh.stats.icmp_in_errors += 1
        sh.stats.drop(DropReason.ICMP_ERR_QUOTE)
        return None
    if quote.src not in sh.addr_set:
        # Not about a packet we sent: nothing of ours to tell (Linux finds no
        # socket and counts InErrors).
        sh.stats.icmp_in_errors += 1
        sh.stats.drop(DropReason.ICMP_ERR_NOT_OURS)
        return None
    # The rest-of-header word: "unused" and the next-hop MTU (RFC 1191 §4)
    # for fragmentation needed; meaningless for the other errors we act on.
    info = msg.seq if msg.type == ICMP_DEST_UNREACH else 0
    return IcmpErr(msg.type, msg.code, info, ip.src, quote)
