"""ICMP for IPv4 (RFC 792): echo request/reply, and the error messages.

Reading list: RFC 792 (formats), RFC 1122 §3.2.2 (host requirements: echo
replies carry the request's data; errors quote the offending header), RFC
1812 §4.3.2.3 (quote as much as fits in 576 bytes, as Linux ``icmp_send``
does), RFC 1191 (the next-hop MTU in "fragmentation needed"), RFC 5927
(what a quoted header may be trusted for).

The netio process answers echo requests itself (Linux ``icmp_echo``), so the
helpers here turn a parsed request straight into the reply bytes.  An error
message (destination unreachable, time exceeded, parameter problem) quotes
the IPv4 header of the packet that caused it and at least 8 bytes of its
payload (RFC 792 p.5): ``parse_icmp_quote`` reads that quote, enough for the
transport to find its socket (ports) and check the sequence number.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .checksum import sum16
from .errors import WireError
from .ipv4 import PROTO_ICMP, Ipv4Header, build_ipv4

__all__ = [
    "IcmpMessage",
    "parse_icmp",
    "build_icmp",
    "build_echo_request",
    "build_echo_reply",
    "echo_reply_for",
    "echo_reply_ipv4",
    "build_dest_unreachable",
    "build_icmp_error",
    "IcmpQuote",
    "parse_icmp_quote",
    "ICMP_ECHO_REPLY",
    "ICMP_DEST_UNREACH",
    "ICMP_SOURCE_QUENCH",
    "ICMP_REDIRECT",
    "ICMP_ECHO",
    "ICMP_TIME_EXCEEDED",
    "ICMP_PARAMETERPROB",
    "ICMP_ERROR_TYPES",
    "ICMP_NET_UNREACH",
    "ICMP_HOST_UNREACH",
    "ICMP_PROT_UNREACH",
    "ICMP_PORT_UNREACH",
    "ICMP_FRAG_NEEDED",
    "ICMP_PKT_FILTERED",
    "ICMP_HEADER_LEN",
]

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
#: The error messages a transport may act on (they quote one of its packets).
ICMP_ERROR_TYPES = frozenset({ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB})

# Codes of ICMP_DEST_UNREACH (RFC 792 p.4).
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMP_PKT_FILTERED = 13  # "communication administratively prohibited" (RFC 1812 §5.2.7.1)

ICMP_HEADER_LEN = 8
# RFC 1812 §4.3.2.3: an error message is at most 576 bytes of IP datagram.
_ERROR_QUOTE_MAX = 576 - 20 - ICMP_HEADER_LEN

_HDR = struct.Struct("!BBHHH")
# The quoted packet: version/IHL, flags/fragment offset, protocol, source,
# destination (IPv4 offsets 0, 6, 9, 12, 16), then the first 8 bytes of its
# payload read as TCP's source port, destination port and sequence number.
_QUOTE_IP = struct.Struct("!B5xHxB2xII")
_QUOTE_L4 = struct.Struct("!HHI")
_unpack_hdr = _HDR.unpack_from
_pack_hdr = _HDR.pack
_from_bytes = int.from_bytes
_new = tuple.__new__


class IcmpMessage(NamedTuple):
    """An ICMP message; ``payload`` is a view into the received buffer.

    ``ident`` and ``seq`` are the two 16-bit halves of the rest-of-header
    word: identifier and sequence number for echo (RFC 792 p.14), zero and
    the next-hop MTU for "fragmentation needed" (RFC 1191 §4).
    """

    type: int
    code: int
    ident: int
    seq: int
    payload: memoryview


def parse_icmp(buf: bytes | bytearray | memoryview) -> IcmpMessage:
    """Parse an ICMP message (the IPv4 payload), verifying its checksum."""
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < ICMP_HEADER_LEN:
        raise WireError("truncated", f"{n} bytes")
    # The checksum covers the whole message (RFC 792 p.14); Linux drops a bad
    # one in ``icmp_rcv`` (``csum_error``).
    value = _from_bytes(mv, "big")
    if n & 1:
        value <<= 8
    if value % 0xFFFF or not value:
        raise WireError("checksum")
    itype, code, _csum, ident, seq = _unpack_hdr(mv, 0)
    return _new(IcmpMessage, (itype, code, ident, seq, mv[ICMP_HEADER_LEN:]))


class IcmpQuote(NamedTuple):
    """What an ICMP error says about the packet that caused it (one we sent).

    ``sport``, ``dport`` and ``seq`` are the first 8 bytes of its transport
    header: ports and sequence number for TCP (for UDP ``seq`` holds the
    length and checksum).
    """

    src: int
    dst: int
    proto: int
    sport: int
    dport: int
    seq: int


def parse_icmp_quote(buf: bytes | bytearray | memoryview) -> IcmpQuote:
    """Read the quote of an ICMP error: the payload after its 8-byte header.

    The quoted IPv4 header must be whole, with at least 8 bytes after it
    (RFC 792 p.5, RFC 1122 §3.2.2; Linux ``icmp_unreach`` and
    ``icmp_socket_deliver`` drop shorter ones as InErrors).  A quoted
    non-first fragment carries no transport header and is refused.  The
    quoted checksum is not checked: routers quote the header as they saw it.
    """
    n = len(buf)
    if n < 20:
        raise WireError("quote_truncated", f"{n} bytes")
    vihl, frag, proto, src, dst = _QUOTE_IP.unpack_from(buf, 0)
    if vihl >> 4 != 4:
        raise WireError("quote_version", f"version {vihl >> 4}")
    ihl = (vihl & 0x0F) << 2
    if ihl < 20:
        raise WireError("quote_ihl", f"IHL {ihl >> 2}")
    if n < ihl + 8:
        raise WireError("quote_truncated", f"{n} bytes for a {ihl}-byte header + 8")
    if frag & 0x1FFF:
        raise WireError("quote_fragment")
    sport, dport, seq = _QUOTE_L4.unpack_from(buf, ihl)
    return _new(IcmpQuote, (src, dst, proto, sport, dport, seq))


def build_icmp(
    itype: int, code: int, ident: int, seq: int, payload: bytes | bytearray | memoryview = b""
) -> bytes:
    """An ICMP message with its checksum filled."""
    s = (itype << 8) + code + ident + seq + sum16(payload)
    csum = -s % 0xFFFF if s else 0xFFFF
    return b"".join((_pack_hdr(itype, code, csum, ident, seq), payload))


def build_echo_request(ident: int, seq: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """An echo request (type 8, what ``ping`` sends)."""
    return build_icmp(ICMP_ECHO, 0, ident, seq, payload)


def build_echo_reply(ident: int, seq: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """An echo reply (type 0)."""
    return build_icmp(ICMP_ECHO_REPLY, 0, ident, seq, payload)


def echo_reply_for(request: IcmpMessage) -> bytes:
    """The reply to an echo request: same identifier, sequence and data.

    RFC 1122 §3.2.2.6: "the data received in the ICMP Echo Request MUST be
    entirely included in the resulting Echo Reply".
    """
    if request.type != ICMP_ECHO or request.code != 0:
        raise ValueError(f"not an echo request: type {request.type} code {request.code}")
    return build_icmp(ICMP_ECHO_REPLY, 0, request.ident, request.seq, request.payload)


def echo_reply_ipv4(ip: Ipv4Header, request: IcmpMessage, ttl: int = 64, ident: int = 0) -> bytes:
    """A whole IPv4 packet answering ``request`` (addresses swapped, same TOS).

    Like Linux ``icmp_reply``: the reply keeps the request's TOS, and is
    sent without DF.
    """
    return build_ipv4(ip.dst, ip.src, PROTO_ICMP, echo_reply_for(request), ttl=ttl,
                      ident=ident, tos=ip.tos, df=False)


def build_dest_unreachable(
    code: int, original: bytes | bytearray | memoryview, next_hop_mtu: int = 0
) -> bytes:
    """A destination-unreachable message quoting ``original`` (an IPv4 packet).

    The quote is the original header and as much data as keeps the error
    within 576 bytes (RFC 1812 §4.3.2.3; RFC 1122 §3.2.2 asks for 8 bytes at
    least).  ``next_hop_mtu`` goes in the low half for ICMP_FRAG_NEEDED.
    """
    return build_icmp_error(ICMP_DEST_UNREACH, code, original, next_hop_mtu)


def build_icmp_error(
    itype: int, code: int, original: bytes | bytearray | memoryview, rest: int = 0
) -> bytes:
    """An error message of type ``itype`` quoting ``original`` (an IPv4 packet)
    as far as RFC 1812 §4.3.2.3 allows; ``rest`` is the low 16 bits of the
    rest-of-header word (the next-hop MTU of "fragmentation needed")."""
    return build_icmp(itype, code, 0, rest, original[:_ERROR_QUOTE_MAX])
