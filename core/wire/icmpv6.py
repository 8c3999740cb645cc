"""ICMPv6 (RFC 4443) and Neighbor Discovery's NS/NA (RFC 4861), parse and build.

Reading list: RFC 4443 §2.1 (message format), §2.3 (the checksum covers an
IPv6 pseudo-header, RFC 8200 §8.1), §2.4 (error messages quote as much of
the offending packet as fits in the minimum MTU, 1280 bytes), §3 (errors:
destination unreachable, packet too big, time exceeded, parameter problem),
§4 (echo); RFC 4861 §4.3/§4.4 (NS/NA formats), §4.6.1 (link-layer address
options), §7.1.1/§7.1.2 (what a receiver must check).

Addresses are ints (the 128-bit value, see ipv6.py); link-layer addresses
are 6-byte ``bytes`` (Ethernet, as in ethernet.py).  Unlike ICMP for IPv4,
the checksum includes the pseudo-header, so parsers and builders take the
IPv6 source and destination.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .checksum import sum16
from .errors import WireError
from .ipv6 import (
    IPV6_HEADER_LEN,
    IPV6_MIN_MTU,
    NEXTHDR_ICMP,
    Ipv6Header,
    build_ipv6,
    is_multicast6,
    skip_exthdr,
)

__all__ = [
    "Icmpv6Message",
    "parse_icmpv6",
    "build_icmpv6",
    "icmpv6_packet",
    "build_echo_request6",
    "echo_reply6_for",
    "build_icmpv6_error",
    "Icmpv6Quote",
    "parse_icmpv6_quote",
    "NdpMessage",
    "parse_ndp",
    "build_neigh_solicit",
    "build_neigh_advert",
    "solicited_node_multicast",
    "multicast_mac",
    "ICMPV6_DEST_UNREACH",
    "ICMPV6_PKT_TOOBIG",
    "ICMPV6_TIME_EXCEED",
    "ICMPV6_PARAMPROB",
    "ICMPV6_ECHO_REQUEST",
    "ICMPV6_ECHO_REPLY",
    "NDISC_NEIGHBOUR_SOLICITATION",
    "NDISC_NEIGHBOUR_ADVERTISEMENT",
    "ICMPV6_ERROR_TYPES",
    "ICMPV6_NOROUTE",
    "ICMPV6_ADM_PROHIBITED",
    "ICMPV6_NOT_NEIGHBOUR",
    "ICMPV6_ADDR_UNREACH",
    "ICMPV6_PORT_UNREACH",
    "ICMPV6_POLICY_FAIL",
    "ICMPV6_REJECT_ROUTE",
    "ICMPV6_HEADER_LEN",
    "ND_OPT_SOURCE_LL_ADDR",
    "ND_OPT_TARGET_LL_ADDR",
    "NA_ROUTER",
    "NA_SOLICITED",
    "NA_OVERRIDE",
    "NDISC_HOP_LIMIT",
    "ALL_NODES",
]

# Types (RFC 4443 §2.1, RFC 4861 §4; Linux <linux/icmpv6.h> names).
ICMPV6_DEST_UNREACH = 1
ICMPV6_PKT_TOOBIG = 2
ICMPV6_TIME_EXCEED = 3
ICMPV6_PARAMPROB = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
NDISC_ROUTER_SOLICITATION = 133
NDISC_ROUTER_ADVERTISEMENT = 134
NDISC_NEIGHBOUR_SOLICITATION = 135
NDISC_NEIGHBOUR_ADVERTISEMENT = 136
NDISC_REDIRECT = 137
#: Error messages (types 0..127, RFC 4443 §2.1) a transport may act on.
ICMPV6_ERROR_TYPES = frozenset({ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED,
                                ICMPV6_PARAMPROB})

# Destination Unreachable codes (RFC 4443 §3.1).
ICMPV6_NOROUTE = 0
ICMPV6_ADM_PROHIBITED = 1
ICMPV6_NOT_NEIGHBOUR = 2  # "beyond scope of source address"
ICMPV6_ADDR_UNREACH = 3
ICMPV6_PORT_UNREACH = 4
ICMPV6_POLICY_FAIL = 5
ICMPV6_REJECT_ROUTE = 6

# Neighbor Discovery option types (RFC 4861 §4.6).
ND_OPT_SOURCE_LL_ADDR = 1
ND_OPT_TARGET_LL_ADDR = 2
# Neighbor Advertisement flags, in the top bits of the reserved word (§4.4).
NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000
#: RFC 4861 §7.1.1: ND messages arrive with Hop Limit 255 (never forwarded).
NDISC_HOP_LIMIT = 255
#: ff02::1, the all-nodes multicast address (RFC 4291 §2.7.1).
ALL_NODES = 0xFF02 << 112 | 1

ICMPV6_HEADER_LEN = 8
# RFC 4443 §2.4(c): the error packet must not exceed the minimum MTU.
_ERROR_QUOTE_MAX = IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMPV6_HEADER_LEN
_SOLICITED_NODE = 0xFF02_0000_0000_0000_0000_0001_FF00_0000  # ff02::1:ff00:0/104

_HDR = struct.Struct("!BBHI")
_unpack_hdr = _HDR.unpack_from
_pack_hdr = _HDR.pack
_QUOTE_L4 = struct.Struct("!HHI")
_new = tuple.__new__
_from_bytes = int.from_bytes


class Icmpv6Message(NamedTuple):
    """An ICMPv6 message; ``body`` (after the 8-byte header) is a view.

    ``rest`` is the 32-bit word after the checksum: identifier << 16 |
    sequence for echo (``ident``/``seq``), the MTU of Packet Too Big, the
    pointer of Parameter Problem, NA's flags; 0 (unused) otherwise.
    """

    type: int
    code: int
    rest: int
    body: memoryview

    @property
    def ident(self) -> int:
        return self.rest >> 16

    @property
    def seq(self) -> int:
        return self.rest & 0xFFFF


def _csum(src: int, dst: int, length: int, value: int) -> int:
    # Pseudo-header (RFC 8200 §8.1): src, dst, upper-layer length, next header.
    return src + dst + length + NEXTHDR_ICMP + value


def parse_icmpv6(src: int, dst: int, buf: bytes | bytearray | memoryview,
                 verify: bool = True) -> Icmpv6Message:
    """Parse an ICMPv6 message (the upper-layer payload of ``src`` -> ``dst``).

    The checksum (over the pseudo-header and the whole message) is verified
    unless ``verify`` is False (the device vouched for it); Linux
    ``icmpv6_rcv`` drops a bad one (ICMP6_MIB_CSUMERRORS).
    """
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < ICMPV6_HEADER_LEN:
        raise WireError("truncated", f"{n} bytes")
    if verify:
        value = _from_bytes(mv, "big")
        if n & 1:
            value <<= 8
        if _csum(src, dst, n, value) % 0xFFFF:
            raise WireError("checksum")
    itype, code, _c, rest = _unpack_hdr(mv, 0)
    return _new(Icmpv6Message, (itype, code, rest, mv[ICMPV6_HEADER_LEN:]))


def build_icmpv6(src: int, dst: int, itype: int, code: int, rest: int = 0,
                 body: bytes | bytearray | memoryview = b"") -> bytes:
    """An ICMPv6 message (no IPv6 header) with its checksum for ``src`` -> ``dst``."""
    n = ICMPV6_HEADER_LEN + len(body)
    s = _csum(src, dst, n, (itype << 8) + code + rest + sum16(body))
    return b"".join((_pack_hdr(itype, code, -s % 0xFFFF, rest), body))


def icmpv6_packet(src: int, dst: int, itype: int, code: int, rest: int = 0,
                  body: bytes | bytearray | memoryview = b"", hop_limit: int = 64) -> bytes:
    """A whole IPv6 packet carrying one ICMPv6 message."""
    return build_ipv6(src, dst, NEXTHDR_ICMP, build_icmpv6(src, dst, itype, code, rest, body),
                      hop_limit=hop_limit)


def build_echo_request6(src: int, dst: int, ident: int, seq: int,
                        data: bytes | bytearray | memoryview = b"", hop_limit: int = 64) -> bytes:
    """A whole IPv6 packet: an echo request (type 128, what ``ping -6`` sends)."""
    return icmpv6_packet(src, dst, ICMPV6_ECHO_REQUEST, 0, (ident << 16) | seq, data, hop_limit)


def echo_reply6_for(ip: Ipv6Header, request: Icmpv6Message, hop_limit: int = 64) -> bytes:
    """The whole IPv6 packet answering an echo request (RFC 4443 §4.2).

    Identifier, sequence and data copied; source is the address the request
    was sent to (the caller must refuse requests to a multicast group it
    would answer from another address; Linux ``icmpv6_echo_reply``).
    """
    if request.type != ICMPV6_ECHO_REQUEST or request.code != 0:
        raise ValueError(f"not an echo request: type {request.type} code {request.code}")
    return icmpv6_packet(ip.dst, ip.src, ICMPV6_ECHO_REPLY, 0, request.rest, request.body,
                         hop_limit)


def build_icmpv6_error(src: int, dst: int, itype: int, code: int,
                       original: bytes | bytearray | memoryview, rest: int = 0,
                       hop_limit: int = 64) -> bytes:
    """A whole IPv6 packet: error ``itype``/``code`` quoting ``original``.

    The quote is as much of the offending packet as keeps the error within
    1280 bytes (RFC 4443 §2.4(c)).  ``rest``: the MTU (Packet Too Big) or
    pointer (Parameter Problem).
    """
    return icmpv6_packet(src, dst, itype, code, rest, original[:_ERROR_QUOTE_MAX], hop_limit)


class Icmpv6Quote(NamedTuple):
    """What an ICMPv6 error says about the packet that caused it.

    ``proto`` is the quoted upper-layer protocol after its extension headers;
    ``sport``/``dport``/``seq`` its first 8 bytes (TCP ports and sequence).
    """

    src: int
    dst: int
    proto: int
    sport: int
    dport: int
    seq: int


def parse_icmpv6_quote(body: bytes | bytearray | memoryview) -> Icmpv6Quote:
    """Read the quoted packet of an ICMPv6 error (its body).

    The quoted IPv6 header must be whole; its extension headers are stepped
    over (Linux ``icmpv6_notify`` -> ``ipv6_skip_exthdr``), and 8 bytes of
    the upper-layer header must follow.  A quoted non-first fragment carries
    no upper header and is refused.
    """
    mv = body if type(body) is memoryview else memoryview(body)
    n = len(mv)
    if n < IPV6_HEADER_LEN:
        raise WireError("quote_truncated", f"{n} bytes")
    if mv[0] >> 4 != 6:
        raise WireError("quote_version", f"version {mv[0] >> 4}")
    src = _from_bytes(mv[8:24], "big")
    dst = _from_bytes(mv[24:40], "big")
    proto, off, _nh = skip_exthdr(mv, mv[6], IPV6_HEADER_LEN, n, check=False)
    if n < off + 8:
        raise WireError("quote_truncated", f"{n} bytes, upper header at {off}")
    sport, dport, seq = _QUOTE_L4.unpack_from(mv, off)
    return _new(Icmpv6Quote, (src, dst, proto, sport, dport, seq))


class NdpMessage(NamedTuple):
    """A Neighbor Solicitation or Advertisement (RFC 4861 §4.3, §4.4).

    ``flags`` is NA's R/S/O bits (``NA_ROUTER`` ...; 0 for NS).
    ``src_lladdr``/``tgt_lladdr`` are the options' link-layer addresses
    (6-byte ``bytes``) or None when absent.
    """

    type: int
    target: int
    flags: int
    src_lladdr: bytes | None
    tgt_lladdr: bytes | None


def parse_ndp(ip: Ipv6Header, msg: Icmpv6Message) -> NdpMessage:
    """Validate a received NS or NA (RFC 4861 §7.1.1, §7.1.2; Linux ``ndisc_rcv``).

    Checked: Hop Limit 255, code 0, at least 24 bytes, every option's length
    non-zero and within the message, a non-multicast target; for NS from
    the unspecified address no source link-layer option and a
    solicited-node multicast destination; for NA to a multicast destination
    the Solicited flag clear.  A link-layer option shorter than 6 bytes of
    address is refused.  Unknown options are skipped (§7.1.1 note).
    """
    if ip.hop_limit != NDISC_HOP_LIMIT:
        raise WireError("ndp_hop_limit", str(ip.hop_limit))
    if msg.type not in (NDISC_NEIGHBOUR_SOLICITATION, NDISC_NEIGHBOUR_ADVERTISEMENT):
        raise WireError("ndp_type", str(msg.type))
    if msg.code != 0:
        raise WireError("ndp_code", str(msg.code))
    body = msg.body
    if len(body) < 16:
        raise WireError("ndp_truncated", f"{len(body) + ICMPV6_HEADER_LEN} bytes")
    target = _from_bytes(body[:16], "big")
    if is_multicast6(target):
        raise WireError("ndp_target_multicast")
    src_ll = tgt_ll = None
    off = 16
    n = len(body)
    while off < n:
        if off + 2 > n:
            raise WireError("ndp_option_len", f"at {off}")
        otype, olen = body[off], body[off + 1] << 3
        if olen == 0 or off + olen > n:
            raise WireError("ndp_option_len", f"{olen} at {off}")
        if otype in (ND_OPT_SOURCE_LL_ADDR, ND_OPT_TARGET_LL_ADDR):
            if olen < 8:
                raise WireError("ndp_option_len", f"link-layer option of {olen}")
            mac = bytes(body[off + 2:off + 8])
            if otype == ND_OPT_SOURCE_LL_ADDR:
                src_ll = mac
            else:
                tgt_ll = mac
        off += olen
    flags = 0
    if msg.type == NDISC_NEIGHBOUR_SOLICITATION:
        if ip.src == 0:
            if src_ll is not None:
                raise WireError("ndp_unspecified_slla")
            if ip.dst >> 24 != _SOLICITED_NODE >> 24:
                raise WireError("ndp_dad_not_solicited_node")
    else:
        flags = msg.rest & (NA_ROUTER | NA_SOLICITED | NA_OVERRIDE)
        if flags & NA_SOLICITED and is_multicast6(ip.dst):
            raise WireError("ndp_na_solicited_multicast")
    return _new(NdpMessage, (msg.type, target, flags, src_ll, tgt_ll))


def _lladdr_option(otype: int, mac: bytes) -> bytes:
    if len(mac) != 6:
        raise ValueError(f"not a 6-byte link-layer address: {mac!r}")
    return bytes((otype, 1)) + mac


def build_neigh_solicit(src: int, dst: int, target: int, src_lladdr: bytes | None) -> bytes:
    """A whole IPv6 packet: Neighbor Solicitation for ``target`` (Hop Limit 255).

    ``dst`` is ``solicited_node_multicast(target)`` to resolve, or the
    target itself for unicast reachability probes (NUD); ``src_lladdr`` is
    our MAC (None when ``src`` is :: for duplicate address detection,
    RFC 4861 §4.3).
    """
    body = target.to_bytes(16, "big")
    if src_lladdr is not None:
        body += _lladdr_option(ND_OPT_SOURCE_LL_ADDR, src_lladdr)
    return icmpv6_packet(src, dst, NDISC_NEIGHBOUR_SOLICITATION, 0, 0, body, NDISC_HOP_LIMIT)


def build_neigh_advert(src: int, dst: int, target: int, flags: int,
                       tgt_lladdr: bytes | None) -> bytes:
    """A whole IPv6 packet: Neighbor Advertisement for ``target`` (Hop Limit 255).

    ``flags``: ``NA_SOLICITED`` when answering an NS (then ``dst`` is the
    soliciter; to ``ALL_NODES`` when it came from ::), ``NA_OVERRIDE`` for our
    own address, ``NA_ROUTER`` never for a host.
    """
    body = target.to_bytes(16, "big")
    if tgt_lladdr is not None:
        body += _lladdr_option(ND_OPT_TARGET_LL_ADDR, tgt_lladdr)
    return icmpv6_packet(src, dst, NDISC_NEIGHBOUR_ADVERTISEMENT, 0, flags, body,
                         NDISC_HOP_LIMIT)


def solicited_node_multicast(addr: int) -> int:
    """ff02::1:ffXX:XXXX for ``addr`` (RFC 4291 §2.7.1: its low 24 bits)."""
    return _SOLICITED_NODE | (addr & 0xFFFFFF)


def multicast_mac(group: int) -> bytes:
    """The Ethernet address of an IPv6 multicast group: 33:33 + its low 32 bits (RFC 2464 §7)."""
    return b"\x33\x33" + (group & 0xFFFFFFFF).to_bytes(4, "big")
