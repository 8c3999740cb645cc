"""IPv4 header parse/build (RFC 791), the receive checks of Linux ``ip_rcv_core``.

Reading list: RFC 791 (format), RFC 1122 §3.2.1 (what a host must check),
RFC 6864 (the ID field of atomic datagrams).

shardstack does not reassemble: a fragment is reported as
``WireError("fragment")`` so the caller counts and drops it.  Our own packets
carry DF, and TCP's MSS keeps peers below the MTU.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from .checksum import sum16
from .errors import WireError

__all__ = [
    "Ipv4Header",
    "parse_ipv4",
    "build_ipv4",
    "header_checksum",
    "ip_to_str",
    "str_to_ip",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "IPV4_HEADER_LEN",
    "FLAG_DF",
    "FLAG_MF",
]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

IPV4_HEADER_LEN = 20
# The 3-bit flags field as it appears in ``Ipv4Header.flags`` (RFC 791 §3.1).
FLAG_DF = 0x2
FLAG_MF = 0x1

# version/IHL, TOS, total length, ID, flags/fragment offset, TTL, proto, checksum, src, dst
_HDR = struct.Struct("!BBHHHBBHII")
_unpack_hdr = _HDR.unpack_from
_pack_hdr = _HDR.pack
_from_bytes = int.from_bytes
_new = tuple.__new__


class Ipv4Header(NamedTuple):
    """The fields of an IPv4 header that the stack uses (options are skipped).

    Immutable and without ``__dict__``, like a frozen slotted dataclass, but a
    NamedTuple: building one costs a quarter as much, once per packet.
    """

    src: int
    dst: int
    proto: int
    ttl: int
    ident: int
    tos: int
    flags: int
    frag_offset: int
    header_len: int
    total_len: int


def parse_ipv4(buf: bytes | bytearray | memoryview) -> tuple[Ipv4Header, memoryview]:
    """Check an IPv4 header and return it with its payload (a view, no copy).

    The order of checks follows Linux ``ip_rcv_core``: length, version/IHL,
    total length, header checksum; then fragments, which Linux would hand to
    ``ip_defrag`` and we refuse.  Link-layer padding past ``total_len`` is
    trimmed (RFC 1122 §3.2.1.1 lets the link add it; Linux ``pskb_trim_rcsum``).
    """
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < 20:
        raise WireError("truncated", f"{n} bytes")
    vihl, tos, total_len, ident, frag, ttl, proto, _csum, src, dst = _unpack_hdr(mv, 0)
    if vihl >> 4 != 4:
        raise WireError("version", str(vihl >> 4))
    hl = (vihl & 0x0F) << 2
    if hl < 20:
        raise WireError("ihl", str(hl))
    if total_len > n:
        raise WireError("total_len", f"{total_len} > {n}")
    if total_len < hl:
        raise WireError("total_len", f"{total_len} < header {hl}")
    # A header holding its own checksum sums to 0xFFFF, i.e. 0 mod 0xFFFF
    # (it cannot be all zero: the version nibble is 4).  Without options the
    # words are already unpacked, and summing them beats re-reading bytes.
    if hl == 20:
        bad = ((vihl << 8) + tos + total_len + ident + frag + (ttl << 8) + proto + _csum
               + src + dst) % 0xFFFF
    else:
        bad = _from_bytes(mv[:hl], "big") % 0xFFFF
    if bad:
        raise WireError("checksum")
    if frag & 0x3FFF:
        # MF set or a non-zero offset: part of a fragmented datagram.
        raise WireError("fragment")
    hdr = _new(Ipv4Header, (src, dst, proto, ttl, ident, tos, frag >> 13, 0, hl, total_len))
    return hdr, mv[hl:total_len]


def build_ipv4(
    src: int,
    dst: int,
    proto: int,
    payload: bytes | bytearray | memoryview,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = True,
) -> bytes:
    """A whole IPv4 packet: a 20-byte header (no options) before ``payload``."""
    total = 20 + len(payload)
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet too long: {total}")
    frag = 0x4000 if df else 0
    # Sum the header words directly (32-bit fields are congruent to the sum
    # of their halves, see checksum.py), so the header is packed only once.
    s = 0x4500 + tos + total + ident + frag + (ttl << 8) + proto + src + dst
    csum = -s % 0xFFFF
    return b"".join((_pack_hdr(0x45, tos, total, ident, frag, ttl, proto, csum, src, dst), payload))


def header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum field value for ``header`` (whose own field must be zero)."""
    value = sum16(header)
    return -value % 0xFFFF if value else 0xFFFF


def ip_to_str(addr: int) -> str:
    """Dotted quad for an address held as an int (``0xC6120001`` -> ``198.18.0.1``)."""
    if not 0 <= addr <= 0xFFFFFFFF:
        raise ValueError(f"not an IPv4 address: {addr!r}")
    return f"{addr >> 24}.{(addr >> 16) & 0xFF}.{(addr >> 8) & 0xFF}.{addr & 0xFF}"


def str_to_ip(text: str) -> int:
    """The int form of a dotted-quad address; ValueError if it is not one."""
    return int(ipaddress.IPv4Address(text))
