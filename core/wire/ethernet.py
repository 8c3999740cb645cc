"""Ethernet II framing (IEEE 802.3 clause 3, the DIX type field), for AF_PACKET.

Only Ethernet II is accepted: a type/length field below 0x0600 is an 802.3
length (LLC/SNAP frames), which no IPv4 host traffic uses.  VLAN tags are
reported as their ethertype (0x8100) and not looked inside.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import WireError

__all__ = [
    "EthernetFrame",
    "parse_ethernet",
    "build_ethernet",
    "mac_to_str",
    "str_to_mac",
    "ETH_P_IP",
    "ETH_P_ARP",
    "ETH_P_IPV6",
    "ETH_P_8021Q",
    "ETH_HLEN",
    "ETH_ZLEN",
    "ETH_ALEN",
    "BROADCAST_MAC",
    "ZERO_MAC",
]

# Ethertypes, named as in Linux <linux/if_ether.h>.
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD

ETH_ALEN = 6
ETH_HLEN = 14
# The shortest frame without its FCS; shorter ones are padded by the sender.
ETH_ZLEN = 60
# The smallest type value; below it the field is an 802.3 length.
_ETH_P_802_3_MIN = 0x0600

BROADCAST_MAC = b"\xff" * ETH_ALEN
ZERO_MAC = b"\x00" * ETH_ALEN

_unpack_type = struct.Struct("!H").unpack_from
_new = tuple.__new__


class EthernetFrame(NamedTuple):
    """An Ethernet II frame; MACs are 6-byte ``bytes``, payload is a view.

    The payload keeps any padding up to 60 bytes: the IPv4 parser trims it
    by the IP total length.
    """

    dst: bytes
    src: bytes
    ethertype: int
    payload: memoryview


def parse_ethernet(buf: bytes | bytearray | memoryview) -> EthernetFrame:
    """Split an Ethernet II frame (no FCS, as AF_PACKET delivers it)."""
    mv = buf if type(buf) is memoryview else memoryview(buf)
    n = len(mv)
    if n < ETH_HLEN:
        raise WireError("truncated", f"{n} bytes")
    ethertype = _unpack_type(mv, 12)[0]
    if ethertype < _ETH_P_802_3_MIN:
        raise WireError("not_ethernet_ii", f"type/length {ethertype:#06x}")
    return _new(EthernetFrame, (bytes(mv[0:6]), bytes(mv[6:12]), ethertype, mv[ETH_HLEN:]))


def build_ethernet(
    dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray | memoryview,
    pad: bool = False,
) -> bytes:
    """An Ethernet II frame; with ``pad`` it is zero-filled to ``ETH_ZLEN``.

    Padding is optional because Linux pads short frames itself on send.
    """
    if len(dst) != ETH_ALEN or len(src) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")
    frame = b"".join((dst, src, ethertype.to_bytes(2, "big"), payload))
    if pad and len(frame) < ETH_ZLEN:
        frame += bytes(ETH_ZLEN - len(frame))
    return frame


def mac_to_str(mac: bytes | bytearray | memoryview) -> str:
    """``02:00:00:00:00:01`` form."""
    if len(mac) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")
    return bytes(mac).hex(":")


def str_to_mac(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (or with ``-``); ValueError otherwise."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)
