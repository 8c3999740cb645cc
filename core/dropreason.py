"""Named drop reasons (Linux ``enum skb_drop_reason``, include/net/dropreason-core.h).

Every segment the engine discards is counted under exactly one reason in
``Shard.stats.drops``; nothing is dropped silently.
"""

from __future__ import annotations

import enum

__all__ = ["DropReason", "WIRE_REASONS"]


class DropReason(enum.Enum):
    IP_HDR = "IP_HDR"  # truncated, bad version/IHL/total length
    IP_CSUM = "IP_CSUM"
    IP_FRAGMENT = "IP_FRAGMENT"  # we never reassemble; TCP peers honour DF/PMTU
    NOT_TCP = "NOT_TCP"
    IP_OTHERHOST = "IP_OTHERHOST"  # destination is not one of our addresses
    TCP_CSUM = "TCP_CSUM"
    TCP_HDR = "TCP_HDR"  # truncated header or bad data offset
    TCP_OPTIONS = "TCP_OPTIONS"  # option list overruns / wrong lengths
    TCP_FLAGS = "TCP_FLAGS"  # SYN+FIN, SYN+RST
    NO_SOCKET = "NO_SOCKET"
    TCP_INVALID_SEQUENCE = "TCP_INVALID_SEQUENCE"
    TCP_RESET = "TCP_RESET"  # RST consumed (it is a drop for accounting, as in Linux)
    TCP_RFC5961_RST = "TCP_RFC5961_RST"  # in-window RST answered with a challenge ACK
    TCP_INVALID_SYN = "TCP_INVALID_SYN"  # SYN in a synchronized state (RFC 5961 §4)
    TCP_PAWS = "TCP_PAWS"
    TCP_ACK_UNSENT_DATA = "TCP_ACK_UNSENT_DATA"
    TCP_TOO_OLD_ACK = "TCP_TOO_OLD_ACK"
    TCP_FLAGS_NOACK = "TCP_FLAGS_NOACK"  # no ACK bit in a synchronized state
    TCP_LISTEN_OVERFLOW = "TCP_LISTEN_OVERFLOW"  # accept queue full
    TCP_REQQFULLDROP = "TCP_REQQFULLDROP"  # request queue full and no syncookies
    TCP_CLOSE = "TCP_CLOSE"  # segment for a socket that is going away
    TCP_OLD_DATA = "TCP_OLD_DATA"  # entirely duplicate data
    TCP_ZEROWINDOW = "TCP_ZEROWINDOW"  # data beyond our window
    PROTO_MEM = "PROTO_MEM"  # in-window data past the receive-memory hard limit (TCPRcvQDrop)
    TCP_SYNSENT_BAD = "TCP_SYNSENT_BAD"  # unacceptable segment in SYN-SENT
    TCP_TIMEWAIT = "TCP_TIMEWAIT"


#: core.wire WireError.reason -> drop reason, per layer (anything else: the layer's HDR).
WIRE_REASONS = {
    "ip": {"checksum": DropReason.IP_CSUM, "fragment": DropReason.IP_FRAGMENT},
    "tcp": {"bad_flags": DropReason.TCP_FLAGS, "option_len": DropReason.TCP_OPTIONS},
}
