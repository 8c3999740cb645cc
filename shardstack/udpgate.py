"""The worker-side half of the shim's UDP sockets (core/udp.py <-> apps).

An app's UDP socket on the stack is an AF_UNIX SOCK_DGRAM socket bound at
`<run-dir>/u/<name>.sock` (the shim makes it, mode 0600). The supervisor's
`udp_bind` gives it a port and tells every worker (`add_udp`): every shard
holds every UDP socket, as listeners, so whichever worker RSS hands a
datagram to delivers it. Datagram boundaries are the unix datagrams':

- shard -> app: `UdpDatagram` events become one unix datagram each, sent to
  the app's path: an 8-byte header (source address, source port, kind 0)
  and the payload; `UdpError` (ECONNREFUSED after ICMP port unreachable on
  a connected socket) is a header of kind 1 whose port field holds the
  errno. A full app buffer drops the datagram, as a full UDP receive queue
  does (Linux RcvbufErrors).
- app -> shard: the app sends to this worker's `worker-<i>.udp` (mode 0600)
  an 8-byte header (destination address, destination port, kind 0) and
  the payload; the sender's path says which socket it is. Unknown senders
  are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardstack.core import udp

HDR = struct.Struct("!4sHBx")  # address, port, kind; the shim's twin: shim/dgram.py
# An AF_INET6 socket's header (issue 14): a 16-byte address, IPv4 peers
# v4-mapped (the shard's AF_INET6 UDP socket sees them so).
HDR6 = struct.Struct("!16sHBx")
KIND_DATA, KIND_ERROR = 0, 1
MAX_DGRAM = 65535


@dataclass(slots=True)
class UdpGateStats:
    to_apps: int = 0  # datagrams handed to apps
    from_apps: int = 0  # datagrams apps sent
    app_full: int = 0  # dropped: the app's receive buffer was full
    refused: int = 0  # errors (ECONNREFUSED...) handed to apps
    bad_from_apps: int = 0  # from an unknown socket, short, or refused by the shard


class UdpGate:
    def __init__(self, shard: Any, loop: Any, run_dir: str, worker_id: int,
                 flush: Callable[[], None]) -> None:
        self.shard = shard
        self.loop = loop
        self.flush = flush
        self.stats = UdpGateStats()
        self.path = os.path.join(run_dir, f"worker-{worker_id}.udp")
        self.by_bind: dict[int, int] = {}  # bind_id -> UDP sd
        self.by_path: dict[str, int] = {}  # app socket path -> sd
        self.paths: dict[int, str] = {}  # sd -> app socket path
        self.v6: set[int] = set()  # AF_INET6 sds: 20-byte headers
        self._next_sd = 1
        self.sock = self._open()

    def _open(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the stack's user only (DESIGN.md §2)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.loop.add_reader(s.fileno(), self._from_apps)
        return s

    # -- supervisor -> worker ----------------------------------------------------

    def add_udp(self, bind_id: int, addr: str, port: int, path: str, v6: bool = False,
                v6only: bool = False, **_extra: Any) -> dict[str, Any]:
        if bind_id in self.by_bind:
            return {}
        sd = self._next_sd
        self._next_sd += 1
        if v6:
            udp.udp_bind(self.shard, sd, int(ipaddress.IPv6Address(addr)), int(port),
                         socket.AF_INET6, v6only)
            self.v6.add(sd)
        else:
            udp.udp_bind(self.shard, sd, int(ipaddress.IPv4Address(addr)), int(port))
        self.by_bind[bind_id] = sd
        self.by_path[path] = sd
        self.paths[sd] = path
        return {}

    def connect_udp(self, bind_id: int, addr: str, port: int, **_extra: Any) -> dict[str, Any]:
        sd = self.by_bind.get(bind_id)
        if sd is None:
            raise OSError(errno.EBADF, "unknown UDP bind")
        udp.udp_connect(self.shard, sd, int(ipaddress.ip_address(addr)), int(port))
        return {}

    def remove_udp(self, bind_id: int, **_extra: Any) -> dict[str, Any]:
        sd = self.by_bind.pop(bind_id, None)
        if sd is not None:
            udp.udp_close(self.shard, sd)
            self.by_path.pop(self.paths.pop(sd, ""), None)
            self.v6.discard(sd)
        return {}

    # -- shard -> app -------------------------------------------------------------------

    def on_event(self, ev: Any) -> None:
        """A UdpDatagram or UdpError from the shard."""
        v6 = ev.sd in self.v6
        if type(ev) is udp.UdpDatagram:
            if v6:
                self._to_app(ev.sd, HDR6.pack(ev.src.to_bytes(16, "big"), ev.sport, KIND_DATA)
                             + ev.data)
            else:
                self._to_app(ev.sd, HDR.pack(ev.src.to_bytes(4, "big"), ev.sport, KIND_DATA)
                             + ev.data)
        else:
            self.stats.refused += 1
            self._to_app(ev.sd, (HDR6 if v6 else HDR).pack(bytes(16 if v6 else 4), ev.errno,
                                                            KIND_ERROR))

    def _to_app(self, sd: int, msg: bytes) -> None:
        path = self.paths.get(sd)
        if path is None:
            return
        try:
            self.sock.sendto(msg, path)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            self.stats.app_full += 1  # full, or the app closed it meanwhile
            return
        except OSError:
            self.stats.app_full += 1
            return
        self.stats.to_apps += 1

    # -- app -> shard ----------------------------------------------------------------------

    def _from_apps(self) -> None:
        sent = False
        for _ in range(256):  # bounded: let TCP and timers run too
            try:
                msg, sender = self.sock.recvfrom(MAX_DGRAM + HDR6.size)
            except (BlockingIOError, InterruptedError):
                break
            sd = self.by_path.get(sender) if isinstance(sender, str) else None
            hdr = HDR6 if sd in self.v6 else HDR
            if sd is None or len(msg) < hdr.size:
                self.stats.bad_from_apps += 1
                continue
            raw, dport, kind = hdr.unpack_from(msg)
            try:
                udp.udp_sendmsg(self.shard, sd, int.from_bytes(raw, "big"), dport,
                                bytes(msg[hdr.size:]))
            except OSError:
                self.stats.bad_from_apps += 1
                continue
            self.stats.from_apps += 1
            sent = True
        if sent:
            self.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
