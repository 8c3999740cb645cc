"""ARP for IPv4 over Ethernet (RFC 826), what netio answers in AF_PACKET mode.

Only the one shape the stack needs is accepted, as Linux ``arp_process``
does: hardware type Ethernet, protocol IPv4, address lengths 6 and 4, and
operation request or reply.  Addresses: MACs are 6-byte ``bytes``, IPv4
addresses are ints (the project convention).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import WireError

__all__ = [
    "ArpPacket",
    "parse_arp",
    "build_arp",
    "build_arp_request",
    "build_arp_reply",
    "ARPOP_REQUEST",
    "ARPOP_REPLY",
    "ARPHRD_ETHER",
    "ARP_LEN",
]

ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARP_LEN = 28
_PTYPE_IPV4 = 0x0800
_ZERO_MAC = b"\x00" * 6

# htype, ptype, hlen, plen, op, sha, spa, tha, tpa (RFC 826 "Packet format")
_ARP = struct.Struct("!HHBBH6sI6sI")
_unpack = _ARP.unpack_from
_pack = _ARP.pack
_new = tuple.__new__


class ArpPacket(NamedTuple):
    """An ARP request or reply for IPv4 over Ethernet."""

    op: int
    sender_mac: bytes
    sender_ip: int
    target_mac: bytes
    target_ip: int


def parse_arp(buf: bytes | bytearray | memoryview) -> ArpPacket:
    """Parse an ARP packet (the Ethernet payload; trailing padding ignored)."""
    n = len(buf)
    if n < ARP_LEN:
        raise WireError("truncated", f"{n} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _unpack(buf, 0)
    if htype != ARPHRD_ETHER:
        raise WireError("hardware_type", str(htype))
    if ptype != _PTYPE_IPV4:
        raise WireError("protocol_type", f"{ptype:#06x}")
    if hlen != 6 or plen != 4:
        raise WireError("address_len", f"{hlen}/{plen}")
    if op != ARPOP_REQUEST and op != ARPOP_REPLY:
        raise WireError("op", str(op))
    return _new(ArpPacket, (op, sha, spa, tha, tpa))


def build_arp(op: int, sender_mac: bytes, sender_ip: int, target_mac: bytes, target_ip: int) -> bytes:
    """A 28-byte ARP packet for IPv4 over Ethernet."""
    if len(sender_mac) != 6 or len(target_mac) != 6:
        raise ValueError("MAC addresses must be 6 bytes")
    return _pack(ARPHRD_ETHER, _PTYPE_IPV4, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)


def build_arp_request(sender_mac: bytes, sender_ip: int, target_ip: int) -> bytes:
    """Who has ``target_ip``?  (The target MAC is unknown, so zero, RFC 826.)"""
    return build_arp(ARPOP_REQUEST, sender_mac, sender_ip, _ZERO_MAC, target_ip)


def build_arp_reply(request: ArpPacket, my_mac: bytes) -> bytes:
    """Answer ``request`` for the address it asks about with ``my_mac``.

    RFC 826 "Packet Reception": swap sender and target, put our hardware
    address in the sender field, and set the opcode to reply.
    """
    if request.op != ARPOP_REQUEST:
        raise ValueError(f"not an ARP request: op {request.op}")
    return build_arp(ARPOP_REPLY, my_mac, request.target_ip, request.sender_mac, request.sender_ip)
