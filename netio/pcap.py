"""`Pcap`: record every frame through a device to a pcap file (smoltcp's PcapWriter).

The classic libpcap format (https://wiki.wireshark.org/Development/LibpcapFileFormat),
microsecond timestamps, host byte order as libpcap writes it. The link type
follows the device: LINKTYPE_RAW (101, bare IPv4) for TUN, LINKTYPE_ETHERNET
(1) for AF_PACKET. Both directions go to the same file, in the order they
cross the wrapper. Frames with an offloaded (partial) checksum are written as
they are, so Wireshark will flag their TCP checksum, as it does on a host
capture with offloads on.

One capture for a whole `shardstack serve` (`--pcap`): netio and every worker
write the same file. `create_capture` writes its global header once (the
supervisor), and each process's `Pcap` writes through a `SharedPcapFile`,
which turns each of its batches into one O_APPEND write(2).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from .device import Device, DeviceWrapper, Frame

__all__ = ["Pcap", "SharedPcapFile", "create_capture", "LINKTYPE_RAW", "LINKTYPE_ETHERNET"]

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4
SNAPLEN = 262144
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


def global_header(l2: bool) -> bytes:
    """The file's 24-byte global header: version 2.4, our snaplen, the link type."""
    linktype = LINKTYPE_ETHERNET if l2 else LINKTYPE_RAW
    return _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, linktype)


def create_capture(path: str, l2: bool) -> None:
    """Create (truncate) a shared capture with its global header (the supervisor)."""
    with open(path, "wb") as f:
        f.write(global_header(l2))


class SharedPcapFile:
    """The file object `Pcap` writes to when every process shares one capture.

    The file already has its global header (`create_capture`); each process
    opens it O_APPEND and this object turns each of Pcap's batches (records
    written, then flush()) into ONE write(2), which the kernel appends whole,
    so records of different processes never interleave. The header Pcap
    writes on construction is swallowed: the file already has one.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.buf = bytearray()
        self._header_seen = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self._header_seen:
            self._header_seen = True
            return len(data)
        self.buf += data
        return len(data)

    def flush(self) -> None:
        if self.buf:
            os.write(self.fd, self.buf)
            self.buf.clear()

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


class Pcap(DeviceWrapper):
    """Wrap `inner`; write RX and TX frames to `path` (or an open binary file)."""

    def __init__(
        self,
        inner: Device,
        path: str | BinaryIO | SharedPcapFile,
        clock: Callable[[], float] = time.time,
        rx: bool = True,
        tx: bool = True,
    ) -> None:
        super().__init__(inner)
        self.clock = clock
        self.rx, self.tx = rx, tx
        self._own = isinstance(path, str)
        self.file: BinaryIO | SharedPcapFile = open(path, "wb") if isinstance(path, str) else path
        self.file.write(global_header(inner.l2))
        self.file.flush()

    def _write(self, frames: Iterable[Frame]) -> None:
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

    def send_batch(self, frames: Iterable[Frame]) -> int:
        frames = list(frames)
        if frames and self.tx:
            self._write(frames)
        return self.inner.send_batch(frames)

    def send_gso(self, packet: Frame, mss: int) -> bool:
        if self.tx:
            self._write([packet])
        return self.inner.send_gso(packet, mss)

    def close(self) -> None:
        if self._own:
            self.file.close()
        self.inner.close()
