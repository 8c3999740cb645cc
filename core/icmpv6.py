"""ICMPv6 input and the errors the engine sends (Linux ``net/ipv6/icmp.c``).

Reading list: RFC 4443 §2.4 (rules for errors: never about an error, rate
limited, at most 1280 bytes), §3 (the error types and codes), RFC 8201
(path MTU discovery for IPv6: Packet Too Big, never below 1280), RFC 5927
§4.1 (check the quoted sequence number), RFC 1122 §4.2.3.9 (TCP's soft
and hard errors, which apply unchanged).

As for IPv4 (``core.icmp``), the engine sees ICMPv6 for its own addresses
only; echo and Neighbor Discovery are netio's (answered before a frame
reaches a shard), so here they are counted and ignored.  ``icmpv6_rcv``
verifies the message (checksum over the pseudo-header, RFC 4443 §2.3),
counts it by type, and turns an error quoting one of our packets into an
:class:`Icmpv6Err` for ``tcp_ipv6.tcp_v6_err`` (Linux ``icmpv6_notify`` ->
the protocol's ``err_handler``).  Nothing here raises.

``icmpv6_param_prob`` answers a packet whose IPv6 headers we cannot process
with a Parameter Problem (RFC 8200 §4, Linux ``icmpv6_param_prob_reason``),
from a token bucket (Linux bounds what it sends: ``icmp_msgs_per_sec``).

Counters on ``ShardStats`` (Linux Icmp6 MIB names): ``icmp6_in_msgs``,
``icmp6_in_errors``, ``icmp6_in_csum_errors``, ``icmp6_in_dest_unreachs``,
``icmp6_in_pkt_too_bigs``, ``icmp6_in_time_excds``, ``icmp6_in_parm_problems``,
``icmp6_in_ignored`` (informational and ND), ``icmp6_out_parm_problems``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, NamedTuple

from . import icmp
from .dropreason import DropReason
from .tcp_h import V4_ADDR_MAX
from .wire.errors import WireError
from .wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_PARAMPROB,
    ICMPV6_PKT_TOOBIG,
    ICMPV6_TIME_EXCEED,
    Icmpv6Quote,
    build_icmpv6_error,
    parse_icmpv6,
    parse_icmpv6_quote,
)
from .wire.ipv6 import NEXTHDR_ICMP, Ipv6Header

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["Icmpv6Err", "icmpv6_rcv", "icmpv6_err_convert", "icmpv6_param_prob",
           "ICMPV6_OUT_RATE", "ICMPV6_OUT_BURST"]

#: Destination Unreachable code -> (errno, fatal), Linux ``tab_unreach`` in
#: net/ipv6/icmp.c (RFC 4443 §3.1 codes 0..6).
_TAB_UNREACH: tuple[tuple[int, bool], ...] = (
    (errno.ENETUNREACH, False),   # 0 no route to destination
    (errno.EACCES, True),         # 1 administratively prohibited
    (errno.EHOSTUNREACH, False),  # 2 beyond scope of source address
    (errno.EHOSTUNREACH, False),  # 3 address unreachable
    (errno.ECONNREFUSED, True),   # 4 port unreachable
    (errno.EACCES, True),         # 5 source address failed ingress/egress policy
    (errno.EACCES, True),         # 6 reject route to destination
)

#: Errors we send per second, and the burst (Linux net.ipv4.icmp_msgs_per_sec
#: and icmp_msgs_burst, which bound ICMPv6 too).
ICMPV6_OUT_RATE = 1000.0
ICMPV6_OUT_BURST = 50.0


def icmpv6_err_convert(itype: int, code: int) -> tuple[int, bool]:
    """(errno, fatal) for an ICMPv6 error, as Linux ``icmpv6_err_convert``."""
    if itype == ICMPV6_DEST_UNREACH:
        if code < len(_TAB_UNREACH):
            return _TAB_UNREACH[code]
        return errno.EPROTO, True
    if itype == ICMPV6_PKT_TOOBIG:
        return errno.EMSGSIZE, False
    if itype == ICMPV6_PARAMPROB:
        return errno.EPROTO, True
    if itype == ICMPV6_TIME_EXCEED:
        return errno.EHOSTUNREACH, False
    return errno.EPROTO, False


class Icmpv6Err(NamedTuple):
    """An ICMPv6 error about one of our packets, for the transport.

    ``info`` is the 32-bit word after the checksum: the MTU of Packet Too
    Big (RFC 4443 §3.2), the pointer of Parameter Problem, else 0.
    """

    type: int
    code: int
    info: int
    sender: int
    quote: Icmpv6Quote


def icmpv6_rcv(sh: Shard, ip: Ipv6Header, payload: bytes | bytearray | memoryview,
               csum_ok: bool) -> Icmpv6Err | None:
    """One ICMPv6 message addressed to us (Linux ``icmpv6_rcv``); never raises."""
    stats = sh.stats
    stats.icmp6_in_msgs += 1
    try:
        msg = parse_icmpv6(ip.src, ip.dst, payload, verify=not csum_ok)
    except WireError as e:
        stats.icmp6_in_errors += 1
        if e.reason == "checksum":
            stats.icmp6_in_csum_errors += 1
            stats.drop(DropReason.ICMP_CSUM)
        else:
            stats.drop(DropReason.ICMP_HDR)
        return None
    t = msg.type
    if t == ICMPV6_DEST_UNREACH:
        stats.icmp6_in_dest_unreachs += 1
    elif t == ICMPV6_PKT_TOOBIG:
        stats.icmp6_in_pkt_too_bigs += 1
    elif t == ICMPV6_TIME_EXCEED:
        stats.icmp6_in_time_excds += 1
    elif t == ICMPV6_PARAMPROB:
        stats.icmp6_in_parm_problems += 1
    else:
        # Echo, ND, MLD and unknown informational types (RFC 4443 §2.4(b):
        # those are passed up or ignored; netio answers what needs an answer).
        stats.icmp6_in_ignored += 1
        return None
    if not icmp.icmp_err_allowed(sh):  # the same bucket as ICMP for IPv4
        stats.drop(DropReason.ICMP_RATELIMIT)
        return None
    try:
        quote = parse_icmpv6_quote(msg.body)
    except WireError:
        stats.icmp6_in_errors += 1
        stats.drop(DropReason.ICMP_ERR_QUOTE)
        return None
    if quote.src not in sh.addr_set:
        stats.icmp6_in_errors += 1
        stats.drop(DropReason.ICMP_ERR_NOT_OURS)
        return None
    return Icmpv6Err(t, msg.code, msg.rest, ip.src, quote)


def _out_allowed(sh: Shard) -> bool:
    """A token from the shard's bucket for errors we send (``ICMPV6_OUT_RATE``)."""
    return sh.icmp6_out_bucket.take(sh.now)

def icmpv6_param_prob(sh: Shard, pkt: bytes | bytearray | memoryview, code: int,
                      pointer: int) -> None:
    """Answer ``pkt`` (an IPv6 packet to one of our addresses) with a Parameter
    Problem (RFC 4443 §3.4), as Linux ``icmpv6_param_prob_reason``.

    Not sent (RFC 4443 §2.4(e)) in answer to an ICMPv6 error, to a packet from
    an address no one on the wire has (``::``, ``::1``, ``::/96``, v4-mapped; a
    multicast source never parses), or past the rate limit (ICMP_RATELIMIT).
    """
    src = int.from_bytes(pkt[8:24], "big")
    dst = int.from_bytes(pkt[24:40], "big")
    if src <= V4_ADDR_MAX or src >> 32 == 0xFFFF or dst not in sh.addr_set:
        return  # from ::, ::1, ::/96 or v4-mapped: no one to answer on the wire
    if pkt[6] == NEXTHDR_ICMP and len(pkt) > 40 and pkt[40] < 128:
        return  # never an error about an error (RFC 4443 §2.4(e.1))
    if not _out_allowed(sh):
        sh.stats.drop(DropReason.ICMP_RATELIMIT)
        return
    sh.frames.append(build_icmpv6_error(dst, src, ICMPV6_PARAMPROB, code, pkt, pointer))
    sh.stats.icmp6_out_parm_problems += 1
