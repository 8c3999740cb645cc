"""`Pcap`: record every frame through a device to a pcap file (smoltcp's PcapWriter).

The classic libpcap format (https://wiki.wireshark.org/Development/LibpcapFileFormat),
microsecond timestamps, host byte order as libpcap writes it. The link type
follows the device: LINKTYPE_RAW (101, bare IPv4) for TUN, LINKTYPE_ETHERNET
(1) for AF_PACKET. Both directions go to the same file, in the order they
cross the wrapper. Frames with an offloaded (partial) checksum are written as
they are, so Wireshark will flag their TCP checksum, as it does on a host
capture with offloads on.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from .device import Device, DeviceWrapper

__all__ = ["Pcap", "LINKTYPE_RAW", "LINKTYPE_ETHERNET"]

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4
SNAPLEN = 262144
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class Pcap(DeviceWrapper):
    """Wrap `inner`; write RX and TX frames to `path` (or an open binary file)."""

    def __init__(
        self,
        inner: Device,
        path: str | BinaryIO,
        clock: Callable[[], float] = time.time,
        rx: bool = True,
        tx: bool = True,
    ) -> None:
        super().__init__(inner)
        self.clock = clock
        self.rx, self.tx = rx, tx
        self._own = isinstance(path, str)
        self.file: BinaryIO = open(path, "wb") if isinstance(path, str) else path
        linktype = LINKTYPE_ETHERNET if inner.l2 else LINKTYPE_RAW
        self.file.write(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, linktype))
        self.file.flush()

    def _write(self, frames) -> None:
        t = self.clock()
        sec = int(t)
        usec = int((t - sec) * 1e6)
        w = self.file.write
        for f in frames:
            n = len(f)
            cap = min(n, SNAPLEN)
            w(_RECORD.pack(sec, usec, cap, n))
            w(f[:cap] if cap < n else f)
        self.file.flush()

    def recv_batch(self, limit: int = 64) -> list[tuple[bytes, int]]:
        batch = self.inner.recv_batch(limit)
        if batch and self.rx:
            self._write([f for f, _ in batch])
        return batch

    def send_batch(self, frames) -> int:
        frames = list(frames)
        if frames and self.tx:
            self._write(frames)
        return self.inner.send_batch(frames)

    def send_gso(self, packet, mss: int) -> bool:
        if self.tx:
            self._write([packet])
        return self.inner.send_gso(packet, mss)

    def close(self) -> None:
        if self._own:
            self.file.close()
        self.inner.close()
