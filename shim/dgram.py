"""UDP sockets on the stack: the shim's half (shardstack/udpgate.py is the worker's).

An AF_INET SOCK_DGRAM `ShimSocket` stays a kernel socket until bind(),
connect() or a first sendto() puts it in the stack's scope (shim/scope.py,
as for TCP). Then its fd becomes an AF_UNIX SOCK_DGRAM socket bound at
`<run-dir>/u/<pid>-<n>.sock` (0600), the supervisor's `udp_bind` gives it
a port (EADDRINUSE, EADDRNOTAVAIL as Linux's rules; an unbound sendto
autobinds an ephemeral port, as `inet_autobind`), and every worker learns
it. Datagrams keep their boundaries: each is one unix datagram with an
8-byte header (address, port, kind; udpgate.HDR).

- sendto/send/sendmsg: header (destination) + payload to a worker's
  `worker-<i>.udp`; EMSGSIZE past the MTU, EDESTADDRREQ unconnected, EACCES
  for broadcast without SO_BROADCAST (the stack sends no broadcast at all:
  with SO_BROADCAST it is ENETUNREACH).
- recvfrom/recv/recv_into/recvfrom_into/recvmsg: one unix datagram, the
  header stripped, the source as the address; a kind-1 header is an error
  (ECONNREFUSED after ICMP port unreachable on a connected socket) and is
  raised once, as Linux's `sock_error`.
- connect: the supervisor tells every worker (`udp_connect`): the shard
  then takes only the peer's datagrams for it (others get ICMP port
  unreachable) and reports its ICMP errors.

`select`/`selectors`/asyncio wait on the unix fd, which is readable when a
datagram waits, like a kernel UDP socket.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket as _socket_mod
import struct
from dataclasses import dataclass
from typing import Any

from shardstack.shim import scope
from shardstack.shim.stack import Stack

HDR = struct.Struct("!4sHBx")  # udpgate.HDR
HDR6 = struct.Struct("!16sHBx")  # udpgate.HDR6: an AF_INET6 socket's (v4-mapped IPv4 peers)
KIND_DATA, KIND_ERROR = 0, 1
_COUNTER = itertools.count(1)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(slots=True, eq=False)
class UdpState:
    bind_id: int
    laddr: str
    lport: int
    path: str
    owner_pid: int
    raddr: str = ""
    rport: int = 0
    worker: int = 0
    v6: bool = False  # an AF_INET6 socket: 20-byte headers, 4-tuple names

    def name(self, host: str, port: int) -> tuple:
        return (host, port, 0, 0) if self.v6 else (host, port)


def _unix_at() -> Any:
    from shardstack.shim.sock import _unix_at

    return _unix_at


def _csock() -> Any:
    from shardstack.shim.sock import _csocket

    return _csocket


def dest_on_stack(stack: Stack, host: str, bound: bool) -> tuple[bool, str]:
    """Whether a datagram to `host` goes through the stack (connect's scope)."""
    view = stack.view()
    if view is None:
        return False, host
    where, dst = scope.connect_scope(host, view, bound)
    return where == scope.STACK, dst


def bind(s: Any, stack: Stack, host: str, port: int,
         v6args: dict[str, Any] | None = None) -> UdpState:
    """Bind `s` on the stack (the scope said so) and swap its fd. `v6args`
    ({"v6": True, "v6only": ...}): an AF_INET6 socket."""
    v6args = v6args or {}
    pre = s._pre or {}
    run_dir = stack.run_dir
    udir = run_dir / "u"
    os.makedirs(udir, mode=0o700, exist_ok=True)
    path = str(udir / f"{os.getpid()}-{next(_COUNTER)}.sock")
    u = _unix_at()(path, _socket_mod.SOCK_DGRAM)
    try:
        rcvbuf = pre.get((_socket_mod.SOL_SOCKET, _socket_mod.SO_RCVBUF))
        u.setsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_RCVBUF,
                     int(rcvbuf) if rcvbuf else 212992)  # net.core.rmem_default
        r = stack.call("udp_bind", addr=host, port=port, path=path,
                       reuseaddr=bool(pre.get((_socket_mod.SOL_SOCKET, _socket_mod.SO_REUSEADDR))),
                       reuseport=bool(pre.get((_socket_mod.SOL_SOCKET, _socket_mod.SO_REUSEPORT))),
                       **v6args)
    except BaseException:
        u.close()
        _unlink(path)
        raise
    s._swap_fd(u)
    view = stack.view()
    workers = view.workers if view is not None else 1
    return UdpState(int(r["bind_id"]), str(r["addr"]), int(r["port"]), path, os.getpid(),
                    worker=int(r["port"]) % max(1, workers), v6=bool(v6args.get("v6")))


def connect(s: Any, stack: Stack, st: UdpState, host: str, port: int) -> None:
    stack.call("udp_connect", bind_id=st.bind_id, addr=host, port=port)
    st.raddr, st.rport = host, port


def sendto(s: Any, st: UdpState, data: Any, addr: tuple[str, int] | None) -> int:
    from shardstack.shim.stack import get_stack

    stack = get_stack()
    if addr is None:
        if not st.rport:
            raise OSError(errno.EDESTADDRREQ, os.strerror(errno.EDESTADDRREQ))
        host, port = st.raddr, st.rport
    else:
        host, port = addr
    view = stack.view() if stack is not None else None
    mv = memoryview(data).cast("B")
    if st.v6:
        ip6 = ipaddress.IPv6Address(host)
        over = 28 if ip6.ipv4_mapped is not None else 48  # IPv4 or IPv6 + UDP headers
        if view is not None and len(mv) + over > view.mtu:
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
        if ip6.is_multicast:
            raise OSError(errno.ENETUNREACH, "shardstack sends no multicast")
        return _send(s, stack, st, HDR6.pack(ip6.packed, port, KIND_DATA) + bytes(mv), len(mv))
    if view is not None and len(mv) + 28 > view.mtu:
        raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))
    ip = ipaddress.IPv4Address(host)
    if ip == _BROADCAST or (view is not None and _is_subnet_broadcast(view, ip)):
        if not (s._pre or {}).get((_socket_mod.SOL_SOCKET, _socket_mod.SO_BROADCAST)):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        raise OSError(errno.ENETUNREACH, "shardstack sends no broadcast")
    return _send(s, stack, st, HDR.pack(ip.packed, port, KIND_DATA) + bytes(mv), len(mv))


def _send(s: Any, stack: Any, st: UdpState, msg: bytes, n: int) -> int:
    # The object's AF_INET face would parse a unix address: send through a
    # transient AF_UNIX object on the same fd (the fd's O_NONBLOCK holds).
    tmp = _csock()(_socket_mod.AF_UNIX, _socket_mod.SOCK_DGRAM, 0, s.fileno())
    try:
        if s.gettimeout() is not None and s.gettimeout() > 0:
            tmp.settimeout(s.gettimeout())
        tmp.sendto(msg, str(stack.run_dir / f"worker-{st.worker}.udp"))
    finally:
        tmp.detach()
    return n


def _is_subnet_broadcast(view: Any, ip: ipaddress.IPv4Address) -> bool:
    return any(ip == n.broadcast_address and n.prefixlen < 31 for n in view.nets)


def recvfrom(s: Any, st: UdpState, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
    data, addr, _mflags = recvmsg(s, st, bufsize, flags)
    return data, addr


def recvmsg(s: Any, st: UdpState, bufsize: int, flags: int = 0) -> tuple[bytes, Any, int]:
    """(data, address, msg_flags): MSG_TRUNC when the datagram was longer."""
    hdr = HDR6 if st.v6 else HDR
    raw, _anc, mflags, _addr = _csock().recvmsg(s, bufsize + hdr.size, 0, flags)
    if len(raw) < hdr.size:
        return b"", None, mflags
    a, port, kind = hdr.unpack_from(raw)
    if kind == KIND_ERROR:
        raise OSError(port, os.strerror(port))
    if st.v6:
        from shardstack.shim import gateproto as gp

        return raw[hdr.size:], (gp.ip_str(int.from_bytes(a, "big"), True), port, 0, 0), mflags
    return raw[hdr.size:], (str(ipaddress.IPv4Address(a)), port), mflags


def close(st: UdpState) -> None:
    from shardstack.shim.stack import get_stack

    stack = get_stack()
    if stack is not None and st.owner_pid == os.getpid():
        try:
            stack.call("release", bind_id=st.bind_id)
        except OSError:
            pass
        _unlink(st.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
