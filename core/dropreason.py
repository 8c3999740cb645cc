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
    #: Handling the frame raised (an engine bug): its connection was reset and
    #: the fault logged, rate limited (core.fault).  Never expected to count.
    ENGINE_EXCEPTION = "ENGINE_EXCEPTION"
    # Malformed input, one reason per class (issue 11); Linux folds most of
    # these into TCP_HDR / IP_INHDR, we keep them apart so a probe shows up.
    TCP_DOFF_SHORT = "TCP_DOFF_SHORT"  # data offset < 5
    TCP_DOFF_OVERRUN = "TCP_DOFF_OVERRUN"  # data offset beyond the packet
    TCP_OPTLEN_SHORT = "TCP_OPTLEN_SHORT"  # an option length of 0 or 1, or none
    TCP_OPT_OVERRUN = "TCP_OPT_OVERRUN"  # an option running past the header
    IP_OPTIONS = "IP_OPTIONS"  # malformed IP options (Linux ip_options_compile: IP_INHDR)
    IP_SOURCE_ROUTE = "IP_SOURCE_ROUTE"  # LSRR/SSRR: accept_source_route = 0
    ICMP_ERR_OUT_OF_WINDOW = "ICMP_ERR_OUT_OF_WINDOW"  # quoted seq outside SND.UNA..SND.NXT
    ICMP_RATELIMIT = "ICMP_RATELIMIT"  # errors past the shard's ICMP error budget
    TCP_MEM = "TCP_MEM"  # the shard's tcp_mem hard limit: a new connection refused
    TCP_CONN_LIMIT = "TCP_CONN_LIMIT"  # the shard's connection cap: a new connection refused
    # -- IPv6 (issue 14; core.wire.ipv6 / icmpv6, core.tcp_ipv6, netio's NDP).
    # Truncated/version/payload length use IP_HDR, fragments IP_FRAGMENT.
    IPV6_BAD_EXTHDR = "IPV6_BAD_EXTHDR"  # a malformed or unprocessable extension header
    IP_NOPROTO = "IP_NOPROTO"  # an upper-layer protocol (Next Header) we do not handle
    IPV6_BAD_SADDR = "IPV6_BAD_SADDR"  # multicast, loopback, unspecified or ::/96 source
    IPV6_NDISC_HOP_LIMIT = "IPV6_NDISC_HOP_LIMIT"  # NS/NA with a Hop Limit other than 255
    IPV6_NDISC_BAD_CODE = "IPV6_NDISC_BAD_CODE"  # NS/NA with a non-zero code
    IPV6_NDISC_BAD_OPTIONS = "IPV6_NDISC_BAD_OPTIONS"  # truncated NS/NA, bad option lengths
    IPV6_NDISC_NS_OTHERHOST = "IPV6_NDISC_NS_OTHERHOST"  # an NS for an address not ours

    # -- Device side (netio's Dispatcher, the worker's RX and TX): frames that
    # never reach a Shard. Linux's names where Linux drops the same frame for
    # the same reason (include/net/dropreason-core.h); the checks shared with
    # the engine (IP_HDR, IP_CSUM, IP_FRAGMENT, IP_OTHERHOST, NOT_TCP,
    # TCP_HDR) use the members above.
    PKT_TOO_SMALL = "PKT_TOO_SMALL"  # shorter than its link-layer header (a runt)
    OTHERHOST = "OTHERHOST"  # L2 unicast to another MAC (PACKET_OTHERHOST)
    UNHANDLED_PROTO = "UNHANDLED_PROTO"  # an ethertype that is neither IPv4 nor ARP
    ICMP_CSUM = "ICMP_CSUM"
    ICMP_HDR = "ICMP_HDR"  # shorter than an ICMP header
    ICMP_TYPE = "ICMP_TYPE"  # an ICMP message we neither answer nor hand on (not echo/error)
    ICMP_ERR_QUOTE = "ICMP_ERR_QUOTE"  # an ICMP error whose quoted header is unusable
    ICMP_ERR_NOT_TCP = "ICMP_ERR_NOT_TCP"  # an ICMP error quoting something other than TCP
    ICMP_ERR_NOT_OURS = "ICMP_ERR_NOT_OURS"  # an ICMP error quoting a packet we did not send
    ARP_HDR = "ARP_HDR"  # truncated, or not Ethernet/IPv4 ARP, or an unknown op
    ARP_NOT_FOR_US = "ARP_NOT_FOR_US"  # asks for or answers another address
    ARP_REPLY_IGNORED = "ARP_REPLY_IGNORED"  # unsolicited, inside locktime, or unusable sender
    NEIGH_QUEUEFULL = "NEIGH_QUEUEFULL"  # a frame pushed out of an unresolved neighbour's queue
    NEIGH_FAILED = "NEIGH_FAILED"  # frames queued on a neighbour that failed to resolve
    DEV_TX = "DEV_TX"  # the device refused the frame or its queue was full


#: core.wire WireError.reason -> drop reason, per layer (anything else: the layer's HDR).
WIRE_REASONS = {
    "ip": {"checksum": DropReason.IP_CSUM, "fragment": DropReason.IP_FRAGMENT},
    "tcp": {"bad_flags": DropReason.TCP_FLAGS, "option_len": DropReason.TCP_OPTIONS},
    # core.wire.ipv6.parse_ipv6 (anything else, truncated/version/payload_len: IP_HDR).
    "ipv6": {"fragment": DropReason.IP_FRAGMENT, "src_multicast": DropReason.IPV6_BAD_SADDR,
             **{r: DropReason.IPV6_BAD_EXTHDR for r in (
                 "exthdr_truncated", "exthdr_chain", "exthdr_option_len",
                 "exthdr_option_discard", "exthdr_option_unknown", "exthdr_too_many_options",
                 "exthdr_routing", "exthdr_padding")},
             "fragment_len": DropReason.IP_FRAGMENT,
             "exthdr_hop_not_first": DropReason.IP_NOPROTO},
    # core.wire.icmpv6.parse_ndp (anything else: IPV6_NDISC_BAD_OPTIONS).
    "ndp": {"ndp_hop_limit": DropReason.IPV6_NDISC_HOP_LIMIT,
            "ndp_code": DropReason.IPV6_NDISC_BAD_CODE},
}
