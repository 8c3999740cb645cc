"""`Trace`: one log line per frame through a device (smoltcp's Tracer).

Lines go to the `shardstack.netio.trace` logger (or any callable taking a
string), e.g.

    rx 60B 198.18.0.1:40000 > 198.18.0.2:80 tcp [S] csum-ok
    tx 98B 198.18.0.2 > 198.18.0.1 icmp type 0
    rx 42B arp 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff

Decoding reads only the header fields it prints and never raises: anything
it cannot decode is printed as its length and first bytes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable

from .device import RX_CSUM_VALID, RX_GSO, Device, DeviceWrapper, Frame

__all__ = ["Trace", "describe"]

_log = logging.getLogger("shardstack.netio.trace")
_TCP_FLAGS = "FSRPAUEC"


def _ip(v: int) -> str:
    return f"{v >> 24}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}"


def _mac(b: Frame) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _describe_ipv4(p: Frame, off: int) -> str:
    if len(p) < off + 20 or p[off] >> 4 != 4:
        return f"ip? {bytes(p[off:off + 8]).hex()}"
    ihl = (p[off] & 15) * 4
    proto = p[off + 9]
    src, dst = struct.unpack_from("!II", p, off + 12)
    l4 = off + ihl
    if proto == 6 and len(p) >= l4 + 14:
        sport, dport = struct.unpack_from("!HH", p, l4)
        fl = p[l4 + 13]
        flags = "".join(c for i, c in enumerate(_TCP_FLAGS) if fl & (1 << i))
        return f"{_ip(src)}:{sport} > {_ip(dst)}:{dport} tcp [{flags}]"
    if proto == 1 and len(p) >= l4 + 2:
        return f"{_ip(src)} > {_ip(dst)} icmp type {p[l4]} code {p[l4 + 1]}"
    return f"{_ip(src)} > {_ip(dst)} proto {proto}"


def describe(frame: Frame, l2: bool) -> str:
    """A one-line summary of a frame."""
    try:
        if not l2:
            return _describe_ipv4(frame, 0)
        if len(frame) < 14:
            return f"runt {bytes(frame).hex()}"
        etype = struct.unpack_from("!H", frame, 12)[0]
        if etype == 0x0800:
            return _describe_ipv4(frame, 14)
        head = f"{_mac(frame[6:12])} > {_mac(frame[0:6])}"
        if etype == 0x0806:
            return f"arp {head}"
        return f"ethertype 0x{etype:04x} {head}"
    except (IndexError, struct.error):  # describe() must never take the I/O loop down
        return f"? {bytes(frame[:16]).hex()}"


class Trace(DeviceWrapper):
    """Wrap `inner`; log one line per frame in both directions."""

    def __init__(self, inner: Device, sink: Callable[[str], None] | None = None) -> None:
        super().__init__(inner)
        self.sink = sink if sink is not None else _log.info

    def recv_batch(self, limit: int = 64) -> list[tuple[bytes, int]]:
        batch = self.inner.recv_batch(limit)
        for f, flags in batch:
            extra = (" csum-ok" if flags & RX_CSUM_VALID else "") + (" gso" if flags & RX_GSO else "")
            self.sink(f"rx {len(f)}B {describe(f, self.l2)}{extra}")
        return batch

    def send_batch(self, frames: Iterable[Frame]) -> int:
        frames = list(frames)
        for f in frames:
            self.sink(f"tx {len(f)}B {describe(f, self.l2)}")
        return self.inner.send_batch(frames)

    def send_gso(self, packet: Frame, mss: int) -> bool:
        self.sink(f"tx {len(packet)}B {describe(packet, self.l2)} gso mss {mss}")
        return self.inner.send_gso(packet, mss)

