"""IPv6 header parse/build (RFC 8200), the receive checks of Linux ``ipv6_rcv``.

Reading list: RFC 8200 §3 (header), §4 (extension headers: order, how a
host walks them, what an unrecognised one costs), §4.4 (routing header:
Segments Left), §4.5 (fragment header), §8.1 (the upper-layer checksum's
pseudo-header), RFC 4291 §2.5.5.2 (IPv4-mapped addresses), RFC 5095
(type 0 routing headers are not processed).

Addresses are ``int``: the 128-bit big-endian value (``int.from_bytes(b,
"big")``), as IPv4's are the 32-bit one.  Both families' addresses can thus
be summed into an Internet checksum as plain ints (see checksum.py): a
128-bit int is congruent mod 0xFFFF to the sum of its eight 16-bit words.

Extension headers are walked as a host does (RFC 8200 §4): hop-by-hop
options (only first), destination options, and routing headers with
Segments Left 0 are skipped, after their options were checked as
``ip6_parse_tlv`` does (an unrecognised option's two high bits say skip,
discard, or discard and answer with a Parameter Problem).  shardstack does
not reassemble: a fragment header raises ``WireError("fragment")``.  An
upper-layer protocol the caller does not handle is the caller's to refuse;
``Ipv6Header.nexthdr_off`` is the offset of the Next Header field that named
it, the pointer of the Parameter Problem Linux then sends
(``ip6_protocol_deliver_rcu``: code 1, "unrecognized Next Header").

When a check calls for a Parameter Problem (RFC 4443 §3.4) the parser raises
``Ipv6ParamProblem``, a ``WireError`` carrying the ICMPv6 code and pointer.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from .errors import WireError

__all__ = [
    "Ipv6Header",
    "Ipv6ParamProblem",
    "parse_ipv6",
    "build_ipv6",
    "skip_exthdr",
    "ip6_to_str",
    "str_to_ip6",
    "v4_mapped",
    "is_v4_mapped",
    "v4_of_mapped",
    "is_multicast6",
    "IPV6_HEADER_LEN",
    "IPV6_MIN_MTU",
    "IPV6_ANY",
    "IPV6_LOOPBACK",
    "NEXTHDR_HOP",
    "NEXTHDR_TCP",
    "NEXTHDR_UDP",
    "NEXTHDR_ROUTING",
    "NEXTHDR_FRAGMENT",
    "NEXTHDR_ICMP",
    "NEXTHDR_NONE",
    "NEXTHDR_DEST",
    "MAX_EXTHDRS",
    "PARAMPROB_HEADER",
    "PARAMPROB_NEXTHDR",
    "PARAMPROB_OPTION",
]

IPV6_HEADER_LEN = 40
#: RFC 8200 §5: every link carries 1280-byte packets; no path MTU is lower.
IPV6_MIN_MTU = 1280
IPV6_ANY = 0
IPV6_LOOPBACK = 1

# Next Header values (IANA "Assigned Internet Protocol Numbers"; Linux
# <net/ipv6.h> NEXTHDR_* names).
NEXTHDR_HOP = 0
NEXTHDR_TCP = 6
NEXTHDR_UDP = 17
NEXTHDR_ROUTING = 43
NEXTHDR_FRAGMENT = 44
NEXTHDR_ESP = 50
NEXTHDR_AUTH = 51
NEXTHDR_ICMP = 58
NEXTHDR_NONE = 59
NEXTHDR_DEST = 60
NEXTHDR_MOBILITY = 135

# ICMPv6 Parameter Problem codes (RFC 4443 §3.4).
PARAMPROB_HEADER = 0  # erroneous header field
PARAMPROB_NEXTHDR = 1  # unrecognized Next Header type
PARAMPROB_OPTION = 2  # unrecognized IPv6 option

#: At most this many extension headers before the upper layer.  RFC 8200
#: §4.1 allows each header once (destination options twice), so a legitimate
#: chain has at most six.  Linux 6.18 (a veth in namespaces we made) answered
#: a SYN behind 12 eight-byte destination-options headers and dropped one
#: behind 13 silently; we cap the chain there, so a 64 KiB packet of empty
#: headers costs a few steps.
MAX_EXTHDRS = 12
#: Options per hop-by-hop/destination options header (Linux's sysctl default).
MAX_TLV_OPTS = 8

_V4_MAPPED_PREFIX = 0xFFFF << 32

# version/class/flow word, payload length, next header, hop limit, src, dst
# (each address as two 64-bit halves).
_HDR = struct.Struct("!IHBBQQQQ")
_unpack_hdr = _HDR.unpack_from
_pack_hdr = _HDR.pack
_new = tuple.__new__
_from_bytes = int.from_bytes
_M64 = (1 << 64) - 1


class Ipv6Header(NamedTuple):
    """An IPv6 header with its extension headers walked.

    ``next_header`` is the upper-layer protocol (after any skipped extension
    headers), ``header_len`` the bytes before its header (40 + extension
    headers), ``nexthdr_off`` the offset of the Next Header field that named
    it (6 without extension headers), ``payload_len`` the header's Payload
    Length field.
    """

    src: int
    dst: int
    next_header: int
    hop_limit: int
    traffic_class: int
    flow_label: int
    payload_len: int
    header_len: int
    nexthdr_off: int


class Ipv6ParamProblem(WireError):
    """A check that RFC 8200 answers with an ICMPv6 Parameter Problem.

    ``code`` is the RFC 4443 §3.4 code, ``pointer`` the offset in the packet
    of the offending octet.  ``icmp`` is False where the RFC says to answer
    only when the destination was not multicast and it was (the caller
    checks the destination: option type bits 11, RFC 8200 §4.2).
    """

    __slots__ = ("code", "pointer", "unless_multicast")

    def __init__(self, reason: str, code: int, pointer: int, unless_multicast: bool = False) -> None:
        super().__init__(reason, f"code {code} pointer {pointer}")
        self.code = code
        self.pointer = pointer
        self.unless_multicast = unless_multicast


def _walk_tlv(mv: memoryview, start: int, end: int) -> None:
    """Check the options of a hop-by-hop or destination options header.

    RFC 8200 §4.2 (Linux ``ip6_parse_tlv``): Pad1 and PadN are skipped; any
    other option is unrecognised here, and the two high bits of its type say
    what to do: 00 skip, 01 discard, 10 discard and send a Parameter Problem
    (code 2, pointing at the type), 11 the same unless the destination was
    multicast.  Dropped silently, as Linux's ``bad`` label (checked against
    Linux 6.18): an option running past its header, more than 8 options, a
    run of more than 7 padding bytes, PadN with non-zero contents (RFC 8504
    §5.3's advice, which Linux follows).
    """
    off = start
    count = 0
    padlen = 0
    while off < end:
        otype = mv[off]
        if otype == 0:  # Pad1
            off += 1
            padlen += 1
            if padlen > 7:
                raise WireError("exthdr_padding")
            continue
        if off + 1 >= end:
            raise WireError("exthdr_option_len", f"at {off}")
        olen = mv[off + 1]
        if off + 2 + olen > end:
            raise WireError("exthdr_option_len", f"{olen} at {off}")
        if otype == 1:  # PadN
            padlen += olen + 2
            if padlen > 7 or any(mv[off + 2:off + 2 + olen]):
                raise WireError("exthdr_padding")
        else:
            padlen = 0
            count += 1
            if count > MAX_TLV_OPTS:
                raise WireError("exthdr_too_many_options")
            action = otype >> 6
            if action == 1:
                raise WireError("exthdr_option_discard", f"type {otype:#x}")
            if action == 2:
                raise Ipv6ParamProblem("exthdr_option_unknown", PARAMPROB_OPTION, off)
            if action == 3:
                raise Ipv6ParamProblem("exthdr_option_unknown", PARAMPROB_OPTION, off,
                                       unless_multicast=True)
        off += 2 + olen


def skip_exthdr(mv: memoryview, nexthdr: int, off: int, end: int,
                check: bool = True) -> tuple[int, int, int]:
    """Walk the extension headers from ``off`` (whose type is ``nexthdr``).

    Returns ``(upper protocol, its offset, offset of the Next Header field
    naming it)``.  With ``check`` (a packet for us) the headers are processed
    as RFC 8200 §4 asks; without it (a quote inside an ICMPv6 error, Linux
    ``ipv6_skip_exthdr``) they are only stepped over.  Raises WireError.
    """
    nh_field = 6
    hops = 0
    while nexthdr in (NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_DEST, NEXTHDR_FRAGMENT):
        hops += 1
        if hops > MAX_EXTHDRS:
            raise WireError("exthdr_chain", f"more than {MAX_EXTHDRS} extension headers")
        if nexthdr == NEXTHDR_HOP and check and off != IPV6_HEADER_LEN:
            # Hop-by-hop is allowed first only (RFC 8200 §4.1); elsewhere Linux
            # has no handler for it: "unrecognized Next Header".
            raise Ipv6ParamProblem("exthdr_hop_not_first", PARAMPROB_NEXTHDR, nh_field)
        if off + 8 > end:
            raise WireError("exthdr_truncated", f"at {off}")
        if nexthdr == NEXTHDR_FRAGMENT:
            frag = mv[off + 2] << 8 | mv[off + 3]
            if check and frag & 0xFFF9:
                # Part of a fragmented packet: no reassembly here.  A non-last
                # fragment whose data is not a multiple of 8 bytes gets the
                # Parameter Problem Linux's ipv6_frag_rcv sends (RFC 8200
                # §4.5), pointing at the Payload Length.
                if frag & 1 and (end - off - 8) & 7:
                    raise Ipv6ParamProblem("fragment_len", PARAMPROB_HEADER, 4)
                raise WireError("fragment")
            if frag & 0xFFF8:
                # A quoted non-first fragment carries no upper-layer header.
                raise WireError("quote_fragment")
            # An atomic fragment (offset 0, M clear): processed in isolation
            # (RFC 6946 §4), as Linux does.
            hlen = 8
        else:
            hlen = (mv[off + 1] + 1) << 3
            if off + hlen > end:
                raise WireError("exthdr_truncated", f"{hlen} bytes at {off}")
            if check:
                if nexthdr == NEXTHDR_ROUTING:
                    if mv[off + 3]:
                        # Segments Left > 0: we would have to forward, and we
                        # recognise no routing type as a host (RFC 8200 §4.4;
                        # type 0 is deprecated, RFC 5095): Parameter Problem
                        # code 0 pointing at the Routing Type.
                        raise Ipv6ParamProblem("exthdr_routing", PARAMPROB_HEADER, off + 2)
                else:
                    _walk_tlv(mv, off + 2, off + hlen)
        nh_field = off
        nexthdr = mv[off]
        off += hlen
    return nexthdr, off, nh_field


def parse_ipv6(buf: bytes | bytearray | memoryview) -> tuple[Ipv6Header, memoryview]:
    """Check an IPv6 header, walk its extension headers, return header and payload.

    The checks follow Linux ``ip6_rcv_core``: length, version, Payload Length
    against the buffer (link padding past it is trimmed, ``pskb_trim_rcsum``),
    a multicast source (RFC 4291 §2.7) refused; then the extension headers
    (``skip_exthdr``).  The payload returned is the upper-layer message (a
    view, no copy).  A Payload Length of 0 is an empty payload: jumbograms
    (RFC 2675) are not supported, their hop-by-hop option is unrecognised.
    """
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < IPV6_HEADER_LEN:
        raise WireError("truncated", f"{n} bytes")
    vtf, plen, nexthdr, hlim, s_hi, s_lo, d_hi, d_lo = _unpack_hdr(mv, 0)
    if vtf >> 28 != 6:
        raise WireError("version", str(vtf >> 28))
    end = IPV6_HEADER_LEN + plen
    if end > n:
        raise WireError("payload_len", f"{plen} > {n - IPV6_HEADER_LEN}")
    if s_hi >> 56 == 0xFF:
        raise WireError("src_multicast")
    src = (s_hi << 64) | s_lo
    dst = (d_hi << 64) | d_lo
    if nexthdr in (NEXTHDR_TCP, NEXTHDR_UDP, NEXTHDR_ICMP):
        off, nh_field = IPV6_HEADER_LEN, 6
    else:
        nexthdr, off, nh_field = skip_exthdr(mv, nexthdr, IPV6_HEADER_LEN, end)
    hdr = _new(Ipv6Header, (src, dst, nexthdr, hlim, (vtf >> 20) & 0xFF, vtf & 0xFFFFF,
                            plen, off, nh_field))
    return hdr, mv[off:end]


def build_ipv6(
    src: int,
    dst: int,
    next_header: int,
    payload: bytes | bytearray | memoryview,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A whole IPv6 packet: a 40-byte header (no extension headers) before ``payload``."""
    plen = len(payload)
    if plen > 0xFFFF:
        raise ValueError(f"IPv6 payload too long: {plen}")
    hdr = _pack_hdr((6 << 28) | (traffic_class << 20) | flow_label, plen, next_header, hop_limit,
                    src >> 64, src & _M64, dst >> 64, dst & _M64)
    return b"".join((hdr, payload))


def ip6_to_str(addr: int) -> str:
    """RFC 5952 text for an address held as an int (``::ffff:198.18.0.1`` for mapped ones).

    RFC 5952 §5: an IPv4-mapped address ends in dotted decimal (Python before
    3.13 writes it in hex).
    """
    if addr >> 32 == 0xFFFF:
        a = addr & 0xFFFFFFFF
        return f"::ffff:{a >> 24}.{(a >> 16) & 0xFF}.{(a >> 8) & 0xFF}.{a & 0xFF}"
    return str(ipaddress.IPv6Address(addr))


def str_to_ip6(text: str) -> int:
    """The int form of an IPv6 address in text; ValueError if it is not one."""
    return int(ipaddress.IPv6Address(text))


def v4_mapped(addr4: int) -> int:
    """``::ffff:a.b.c.d`` for an IPv4 address (RFC 4291 §2.5.5.2)."""
    return _V4_MAPPED_PREFIX | addr4


def is_v4_mapped(addr: int) -> bool:
    """True for an IPv4-mapped IPv6 address."""
    return addr >> 32 == 0xFFFF


def v4_of_mapped(addr: int) -> int:
    """The IPv4 address inside a v4-mapped one."""
    return addr & 0xFFFFFFFF


def is_multicast6(addr: int) -> bool:
    """ff00::/8 (RFC 4291 §2.7)."""
    return addr >> 120 == 0xFF
