"""Network devices: one small interface, three backends (TUN, AF_PACKET, loopback).

The interface is smoltcp's `phy::Device` made batch-shaped, because in Python
the per-call cost dominates:

    dev.recv_batch(limit)  -> list[(frame, flags)]   never blocks; [] when idle
    dev.send_batch(frames) -> int                    frames written (rest dropped)
    dev.send_gso(packet, mss) -> bool                one TCP super-segment, the
                                                     kernel segments it (GSO)
    dev.fileno()  dev.close()  dev.poll(now)  dev.next_deadline()

`frame` is a bytes-like object holding an IPv4 packet (`dev.l2 is False`) or
an Ethernet frame (`dev.l2 is True`). `flags` carries what the kernel told us
through the virtio-net header (include/uapi/linux/virtio_net.h):

* RX_CSUM_VALID: the TCP checksum need not be verified. Set for
  VIRTIO_NET_HDR_F_DATA_VALID (checked by the NIC or kernel) and for
  VIRTIO_NET_HDR_F_NEEDS_CSUM (the sender is local and offloaded the
  checksum; the field then holds only the pseudo-header sum, RX_CSUM_PARTIAL).
* RX_GSO: a TCP super-segment (GSO/GRO, up to 64 KiB) delivered as one frame.

Without the virtio-net header (`--no-offload`) an AF_PACKET receiver still
needs the checksum state: a local sender (a veth peer with its default
offloads) leaves CHECKSUM_PARTIAL frames whose TCP checksum field holds only
the pseudo-header sum, indistinguishable from corruption. PACKET_AUXDATA
(packet(7)) adds a `tpacket_auxdata` control message to every recvmsg, whose
tp_status says TP_STATUS_CSUMNOTREADY (partial) or TP_STATUS_CSUM_VALID;
`aux_rx_flags` turns it into the same flags. It costs a recvmsg instead of a
recv per frame (one small list and tuple more), paid only without vnet_hdr.

Reading follows asyncio's selector pattern: try the syscall, and treat exactly
BlockingIOError as "nothing more now" (EINTR is retried by Python, PEP 475).
No recvmmsg: read until EAGAIN or until `limit` frames.

Sharing for TX. Workers write their own frames (DESIGN.md §1). For TUN we use
fd passing: one process opens the device (`TunDevice`) and hands the same open
file to workers, either inherited (`pass_fds`) or over an AF_UNIX socket with
SCM_RIGHTS (`send_device` / `recv_device`); the receiver wraps it with
`TunDevice.from_fd` and only writes. A multi-queue TUN was rejected because
the kernel would also steer *received* packets to the workers' queues, which
nobody reads. For AF_PACKET each worker opens its own send-only socket
(`PacketDevice(ifname, rx=False)`), which never receives.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Self

from shardstack.core.wire.checksum import pseudo_header_sum

__all__ = [
    "RX_CSUM_VALID",
    "RX_CSUM_PARTIAL",
    "RX_GSO",
    "Device",
    "TunDevice",
    "PacketDevice",
    "LoopbackDevice",
    "send_device",
    "recv_device",
    "partial_tcp_checksum",
    "aux_rx_flags",
    "vnet_rx_flags",
    "innermost",
    "Frame",
]

#: What a device sends and hands out: bytes, or a view of a buffer.
Frame = bytes | bytearray | memoryview

# Per-frame flags handed to callers.
RX_CSUM_VALID = 0x1
RX_CSUM_PARTIAL = 0x2
RX_GSO = 0x4

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1

# <linux/if_packet.h>
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 0x8  # skb CHECKSUM_PARTIAL: the field is the pseudo-header sum
TP_STATUS_CSUM_VALID = 0x80  # checksum verified (skb_csum_unnecessary)
# struct tpacket_auxdata: tp_status, tp_len, tp_snaplen (u32), tp_mac, tp_net,
# tp_vlan_tci, tp_vlan_tpid (u16): 20 bytes.
AUX_SPACE = socket.CMSG_SPACE(20)
ETH_P_ALL = 0x0003

# <linux/virtio_net.h>: the legacy 10-byte header, little-endian on this
# host (tun/packet use the host's byte order for legacy virtio).
VNET_HDR = struct.Struct("<BBHHHH")  # flags gso_type hdr_len gso_size csum_start csum_offset
VNET_HDR_LEN = VNET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
_ZERO_VNET = bytes(VNET_HDR_LEN)

# Errors that drop one frame on TX (counted by the caller) rather than fail
# the device: a full queue, a frame the kernel rejects, a link that is down.
TX_DROP_ERRNOS = frozenset(
    {errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EMSGSIZE, errno.EIO, errno.ENETDOWN,
     errno.ENXIO}
)  # fmt: skip

ETH_HLEN = 14
TCP_CSUM_OFFSET = 16
MAX_FRAME = 65535 + ETH_HLEN + VNET_HDR_LEN + 64  # a 64 KiB super-frame plus headers
DEFAULT_BATCH = 64


def _read_frames(read: Callable[[], bytes], limit: int, vnet: bool) -> list[tuple[bytes, int]]:
    """Up to `limit` frames from a non-blocking `read()`, until EAGAIN; with the
    virtio-net header, strip it and turn it into RX flags (runts are skipped)."""
    out: list[tuple[bytes, int]] = []
    while len(out) < limit:
        try:
            data = read()
        except BlockingIOError:
            break
        if vnet:
            if len(data) <= VNET_HDR_LEN:
                continue
            out.append((data[VNET_HDR_LEN:], vnet_rx_flags(data)))
        else:
            out.append((data, 0))
    return out


class Device:
    """Base class: the batch interface and the no-op timer hooks wrappers override."""

    l2: bool = False
    mtu: int = 1500
    name: str = ""

    def recv_batch(self, limit: int = DEFAULT_BATCH) -> list[tuple[bytes, int]]:
        raise NotImplementedError

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        raise NotImplementedError

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        """Send one TCP/IPv4 packet larger than the MTU, segmented at `mss`.

        Devices without offload segment nothing: this is only valid when the
        device reports `gso = True`.
        """
        raise OSError(95, "device has no GSO")  # EOPNOTSUPP

    gso: bool = False

    def fileno(self) -> int:
        return -1

    def poll(self, now: float | None = None) -> None:
        """Release anything a wrapper holds back (delayed frames)."""

    def next_deadline(self) -> float | None:
        """When `poll` next has work; None when nothing is pending."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def partial_tcp_checksum(packet: bytearray, l3: int = 0) -> tuple[int, int]:
    """Prepare a TCP/IPv4 packet for checksum offload (NEEDS_CSUM), in place.

    The kernel adds the one's-complement sum from `csum_start` to the end and
    folds it into the field, so the field must hold the *uncomplemented*
    pseudo-header sum over the whole (super-)segment length (what Linux's
    `tcp_v4_send_check` stores for CHECKSUM_PARTIAL). Returns (csum_start,
    header_len) for the virtio header.
    """
    l4, src, dst = _l4_addrs(packet, l3)
    tcp_len = len(packet) - l4
    partial = pseudo_header_sum(src, dst, 6, tcp_len)
    packet[l4 + TCP_CSUM_OFFSET : l4 + TCP_CSUM_OFFSET + 2] = partial.to_bytes(2, "big")
    doff = (packet[l4 + 12] >> 4) * 4
    return l4, l4 + doff


def _l4_addrs(packet: Frame, l3: int) -> tuple[int, int, int]:
    """(TCP's offset, source, destination) of the IPv4 or IPv6 packet at
    `l3`. IPv6: TCP right after the 40-byte header (the engine sends no
    extension headers); the pseudo-header sum takes 128-bit addresses."""
    if packet[l3] >> 4 == 6:
        return (l3 + 40, int.from_bytes(packet[l3 + 8:l3 + 24], "big"),
                int.from_bytes(packet[l3 + 24:l3 + 40], "big"))
    return (l3 + (packet[l3] & 0x0F) * 4, int.from_bytes(packet[l3 + 12:l3 + 16], "big"),
            int.from_bytes(packet[l3 + 16:l3 + 20], "big"))


def _gso_type(packet: Frame, l3: int) -> int:
    return VIRTIO_NET_HDR_GSO_TCPV6 if packet[l3] >> 4 == 6 else VIRTIO_NET_HDR_GSO_TCPV4


def _gso_header(packet: bytearray, mss: int, l3: int) -> bytes:
    csum_start, hdr_len = partial_tcp_checksum(packet, l3)
    gso_type = _gso_type(packet, l3) if len(packet) - hdr_len > mss else VIRTIO_NET_HDR_GSO_NONE
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        mss = 0
    return VNET_HDR.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, mss, csum_start, TCP_CSUM_OFFSET
    )


def _gso_parts(packet: Frame, mss: int, l3: int, base: int = 0) -> tuple[bytes, bytearray, memoryview]:
    """`_gso_header` without copying the payload: (virtio header, a copy of
    the headers up to the end of TCP with the partial checksum in it, the
    payload as a view), for one writev/sendmsg. `base`: bytes the caller
    sends before `packet` (an Ethernet header kept apart)."""
    mv = memoryview(packet)
    l4, src, dst = _l4_addrs(mv, l3)
    end = l4 + (mv[l4 + 12] >> 4) * 4
    head = bytearray(mv[:end])
    partial = pseudo_header_sum(src, dst, 6, len(mv) - l4)
    head[l4 + TCP_CSUM_OFFSET:l4 + TCP_CSUM_OFFSET + 2] = partial.to_bytes(2, "big")
    if len(mv) - end > mss:
        gso_type = _gso_type(mv, l3)
    else:
        gso_type, mss = VIRTIO_NET_HDR_GSO_NONE, 0
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, base + end, mss, base + l4,
                         TCP_CSUM_OFFSET)
    return vnet, head, mv[end:]


def _grow_rcvbuf(sock: socket.socket, size: int = 4 << 20) -> None:
    """A packet socket's queue is our RX ring: the default (~200 KiB) holds
    three 64 KiB GRO super-frames. Past net.core.rmem_max only as root."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def vnet_rx_flags(hdr: bytes | memoryview) -> int:
    """Flags of one frame from its virtio-net header (the frame's first
    VNET_HDR_LEN bytes, as TUN and PACKET_VNET_HDR sockets deliver them)."""
    vflags = hdr[0]
    flags = 0
    if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        flags = RX_CSUM_VALID | RX_CSUM_PARTIAL
    elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
        flags = RX_CSUM_VALID
    if hdr[1] & ~VIRTIO_NET_HDR_GSO_ECN:
        flags |= RX_GSO
    return flags


def aux_rx_flags(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Flags of one frame from its PACKET_AUXDATA control message (recvmsg's
    ancillary data; tp_status is a host-order u32, both bits in its low byte)."""
    for level, kind, data in ancdata:
        if kind == PACKET_AUXDATA and level == SOL_PACKET and len(data) >= 4:
            status = int.from_bytes(data[:4], sys.byteorder)
            if status & TP_STATUS_CSUMNOTREADY:
                return RX_CSUM_VALID | RX_CSUM_PARTIAL
            if status & TP_STATUS_CSUM_VALID:
                return RX_CSUM_VALID
            return 0
    return 0


def _ifreq_ioctl(name: str, request: int, fmt: str, *values: int | bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16s" + fmt, name.encode(), *values)
        req += bytes(40 - len(req))
        return fcntl.ioctl(s.fileno(), request, req)


def set_mtu(name: str, mtu: int) -> None:
    _ifreq_ioctl(name, SIOCSIFMTU, "i", mtu)


def get_mtu(name: str) -> int:
    mtu: int = struct.unpack_from("i", _ifreq_ioctl(name, SIOCGIFMTU, "i", 0), 16)[0]
    return mtu


def get_mac(name: str) -> bytes:
    """The interface's hardware address (SIOCGIFHWADDR, in this netns)."""
    raw = _ifreq_ioctl(name, SIOCGIFHWADDR, "H6s", 0, bytes(6))
    return raw[18:24]


SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_MULTICAST = 0


def join_multicast(sock: socket.socket, ifname: str, macs: Iterable[bytes]) -> None:
    """Have the interface accept these Ethernet multicast addresses and this
    packet socket receive them (packet(7) PACKET_ADD_MEMBERSHIP,
    PACKET_MR_MULTICAST): IPv6 NDP's solicited-node groups 33:33:ff:xx:xx:xx
    (RFC 4861 §7.2.1, RFC 2464 §7), as the kernel's own IPv6 joins them."""
    index = socket.if_nametoindex(ifname)
    for mac in macs:
        mreq = struct.pack("iHH8s", index, PACKET_MR_MULTICAST, 6, bytes(mac))  # packet_mreq
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)


def set_up(name: str) -> None:
    raw = _ifreq_ioctl(name, SIOCGIFFLAGS, "H", 0)
    flags = struct.unpack_from("H", raw, 16)[0]
    if not flags & IFF_UP:
        _ifreq_ioctl(name, SIOCSIFFLAGS, "H", flags | IFF_UP)


class DeviceWrapper(Device):
    """A device around another (smoltcp's phy wrappers): takes the inner
    device's shape and passes everything through; subclasses override the
    directions they act on."""

    def __init__(self, inner: Device) -> None:
        self.inner = inner
        self.l2, self.mtu, self.name, self.gso = inner.l2, inner.mtu, inner.name, inner.gso

    def recv_batch(self, limit: int = DEFAULT_BATCH) -> list[tuple[bytes, int]]:
        return self.inner.recv_batch(limit)

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        return self.inner.send_batch(frames)

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        return self.inner.send_gso(packet, mss)

    def poll(self, now: float | None = None) -> None:
        self.inner.poll(now)

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def fileno(self) -> int:
        return self.inner.fileno()

    def close(self) -> None:
        self.inner.close()


def innermost(dev: Device) -> Device:
    """The device under every wrapper."""
    while isinstance(dev, DeviceWrapper):
        dev = dev.inner
    return dev


class TunDevice(Device):
    """An L3 TUN device (IFF_TUN | IFF_NO_PI): frames are bare IPv4 packets.

    Opening attaches to the named device or creates it (as `ip tuntap add`
    would; `persist=True` keeps it after close, TUNSETPERSIST). With
    `vnet_hdr=True` every read and write carries a virtio-net header and
    TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4) lets the kernel hand over TCP
    super-segments of up to 64 KiB with partial checksums, and take ours.
    """

    l2 = False

    def __init__(
        self,
        name: str = "ss0",
        mtu: int | None = 1500,
        vnet_hdr: bool = False,
        up: bool = True,
        persist: bool = False,
        _fd: int | None = None,
    ) -> None:
        self.vnet_hdr = vnet_hdr
        self.gso = vnet_hdr
        if _fd is not None:
            self.fd = _fd
            self.name = name
            self.mtu = mtu or 1500
            return
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            self.name = ifr[:16].rstrip(b"\0").decode()
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            if mtu is not None:
                set_mtu(self.name, mtu)
            self.mtu = get_mtu(self.name)
            if up:
                set_up(self.name)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    @classmethod
    def from_fd(cls, fd: int, name: str, mtu: int, vnet_hdr: bool) -> TunDevice:
        """Wrap a TUN fd opened elsewhere (inherited or received by SCM_RIGHTS)."""
        return cls(name, mtu, vnet_hdr=vnet_hdr, _fd=fd)

    def fileno(self) -> int:
        return self.fd

    def recv_batch(self, limit: int = DEFAULT_BATCH) -> list[tuple[bytes, int]]:
        return _read_frames(partial(os.read, self.fd, MAX_FRAME), limit, self.vnet_hdr)

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        sent = 0
        fd = self.fd
        if self.vnet_hdr:
            writev = os.writev
            for frame in frames:
                try:
                    writev(fd, (_ZERO_VNET, frame))
                except OSError as e:
                    if e.errno not in TX_DROP_ERRNOS:
                        raise
                    continue
                sent += 1
        else:
            write = os.write
            for frame in frames:
                try:
                    write(fd, frame)
                except OSError as e:
                    if e.errno not in TX_DROP_ERRNOS:
                        raise
                    continue
                sent += 1
        return sent

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        if not self.vnet_hdr:
            raise OSError(95, "TUN opened without vnet_hdr: no GSO")
        vnet, head, payload = _gso_parts(packet, mss, 0)  # the payload is not copied
        try:
            os.writev(self.fd, (vnet, head, payload))
        except OSError as e:
            if e.errno not in TX_DROP_ERRNOS:
                raise
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PacketDevice(Device):
    """An L2 device: an AF_PACKET socket on an existing interface (veth, NIC).

    PACKET_VNET_HDR is on, so the kernel delivers GSO/GRO super-frames whole
    with their checksum state, and `send_gso` hands a 64 KiB super-segment to
    the kernel in one write. PACKET_IGNORE_OUTGOING keeps our own (and the
    workers') transmissions out of the receive path. With `rx=False` the
    socket is bound to protocol 0 and never receives (a worker's TX socket).
    """

    l2 = True

    def __init__(self, ifname: str, rx: bool = True, vnet_hdr: bool = True,
                 sock: socket.socket | None = None) -> None:
        # `sock`: an already bound and configured packet socket (a member of
        # the direct-RX fanout group, netio/fanout.py), adopted as is.
        proto = ETH_P_ALL if rx else 0
        adopted = sock is not None
        if sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        try:
            if vnet_hdr and not adopted:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            if rx and not adopted:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                _grow_rcvbuf(sock)
            if rx and not vnet_hdr:
                # the checksum state without the virtio header (module docstring);
                # fanout members have it already (netio/fanout.py)
                sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            if not adopted:
                sock.bind((ifname, proto))
            sock.setblocking(False)
            self.mtu = get_mtu(ifname)
            self.mac = get_mac(ifname)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.name = ifname
        self.vnet_hdr = vnet_hdr
        self.gso = vnet_hdr
        self.auxdata = rx and not vnet_hdr

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_batch(self, limit: int = DEFAULT_BATCH) -> list[tuple[bytes, int]]:
        if self.auxdata:
            return self._recv_batch_aux(limit)
        return _read_frames(partial(self.sock.recv, MAX_FRAME), limit, self.vnet_hdr)

    def _recv_batch_aux(self, limit: int) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        recvmsg = self.sock.recvmsg
        while len(out) < limit:
            try:
                data, anc, _flags, _addr = recvmsg(MAX_FRAME, AUX_SPACE)
            except BlockingIOError:
                break
            out.append((data, aux_rx_flags(anc)))
        return out

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        sent = 0
        if self.vnet_hdr:
            sendmsg = self.sock.sendmsg
            for frame in frames:
                try:
                    sendmsg((_ZERO_VNET, frame))
                except OSError as e:
                    if e.errno not in TX_DROP_ERRNOS:
                        raise
                    continue
                sent += 1
        else:
            send = self.sock.send
            for frame in frames:
                try:
                    send(frame)
                except OSError as e:
                    if e.errno not in TX_DROP_ERRNOS:
                        raise
                    continue
                sent += 1
        return sent

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int,
                 eth: bytes | None = None) -> bool:
        """`eth`: the Ethernet header, when `packet` is the bare IPv4 packet
        (no copy of either is made; the kernel gathers them)."""
        if not self.vnet_hdr:
            raise OSError(95, "packet socket without vnet_hdr: no GSO")
        parts: tuple[bytes | bytearray | memoryview, ...]
        if eth is None:
            parts = _gso_parts(packet, mss, ETH_HLEN)
        else:
            vnet, head, payload = _gso_parts(packet, mss, 0, len(eth))
            parts = (vnet, eth, head, payload)
        try:
            self.sock.sendmsg(parts)
        except OSError as e:
            if e.errno not in TX_DROP_ERRNOS:
                raise
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class LoopbackDevice(Device):
    """An in-memory device for tests (smoltcp's `Loopback`).

    Frames sent on it are received from it, unless it is one end of a
    `pair()`, where frames sent on one end arrive at the other. `inject`
    queues a received frame with flags; `sent` keeps a copy of everything
    transmitted when `record=True`. The RX queue holds at most `capacity`
    frames; overflow is counted in `dropped` (a full NIC ring).
    """

    def __init__(
        self, l2: bool = False, mtu: int = 1500, capacity: int = 4096, record: bool = False
    ) -> None:
        self.l2 = l2
        self.mtu = mtu
        self.name = "lo-mem"
        self.capacity = capacity
        self.rxq: collections.deque[tuple[bytes, int]] = collections.deque()
        self.peer: LoopbackDevice = self
        self.record = record
        self.sent: list[bytes] = []
        self.gso_sent: list[tuple[bytes, int]] = []
        self.dropped = 0
        self.gso = True

    @classmethod
    def pair(cls, l2: bool = False, mtu: int = 1500, capacity: int = 4096,
             record: bool = False) -> tuple[LoopbackDevice, LoopbackDevice]:
        a, b = cls(l2, mtu, capacity, record), cls(l2, mtu, capacity, record)
        a.peer, b.peer = b, a
        return a, b

    def inject(self, frame: bytes, flags: int = 0) -> bool:
        if len(self.rxq) >= self.capacity:
            self.dropped += 1
            return False
        self.rxq.append((bytes(frame), flags))
        return True

    def recv_batch(self, limit: int = DEFAULT_BATCH) -> list[tuple[bytes, int]]:
        q = self.rxq
        n = min(limit, len(q))
        return [q.popleft() for _ in range(n)]

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        sent = 0
        peer = self.peer
        for frame in frames:
            frame = bytes(frame)
            if self.record:
                self.sent.append(frame)
            if peer.inject(frame):
                sent += 1
        return sent

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        pkt = bytes(packet)
        if self.record:
            self.gso_sent.append((pkt, mss))
        return self.peer.inject(pkt, RX_CSUM_VALID | RX_GSO)


def send_device(sock: socket.socket, dev: TunDevice) -> None:
    """Pass a TUN device's fd to another process over a connected AF_UNIX socket.

    The metadata travels with it so the receiver frames writes the same way.
    """
    meta = f"{dev.name},{dev.mtu},{int(dev.vnet_hdr)}".encode()
    socket.send_fds(sock, [meta], [dev.fd])


def recv_device(sock: socket.socket) -> TunDevice:
    """The other end of `send_device`: a TunDevice sharing the sender's open file."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, 256, 1)
    if not fds:
        raise OSError(22, "no fd received")  # EINVAL
    name, mtu, vnet = msg.decode().split(",")
    return TunDevice.from_fd(fds[0], name, int(mtu), vnet == "1")


def frames_only(batch: Sequence[tuple[bytes, int]]) -> list[bytes]:
    """The frames of a received batch, without their flags."""
    return [f for f, _ in batch]
