"""The system calls of a script, over ``shardstack.core.Shard``'s public socket API.

Each script fd maps to a shard descriptor.  A call is an object whose
``attempt(now)`` either finishes (an ``Outcome``: return value, errno, out
parameters) or answers ``None``: it would block.  On a non-blocking fd (or
with MSG_DONTWAIT) a would-block call finishes at once with EAGAIN or
EINPROGRESS, as the kernel's; on a blocking fd the executor keeps the call
pending and attempts it again whenever the engine's state changes, at the
virtual time it changes: that is the deterministic form of packetdrill's
second thread.  The semantics follow the shim's sockets (Linux's).
"""

from __future__ import annotations

import errno as E
import fcntl
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from shardstack.core import Shard
from shardstack.core.events import Connected, SocketError

from .script import Sym

SIOCINQ = 0x541B  # == FIONREAD
SIOCOUTQ = 0x5411  # == TIOCOUTQ
SIOCOUTQNSD = 0x894B
TCP_WINDOW_CLAMP = 10
_EXTRA = {"SOL_TCP": 6, "SOL_IP": 0, "SIOCINQ": SIOCINQ, "SIOCOUTQ": SIOCOUTQ,
          "FIONREAD": SIOCINQ, "SIOCOUTQNSD": SIOCOUTQNSD, "TCP_WINDOW_CLAMP": TCP_WINDOW_CLAMP,
          "POLLRDHUP": 0x2000, "TCP_NOTSENT_LOWAT": 25, "TCP_FASTOPEN": 23,
          "TCP_FASTOPEN_CONNECT": 30, "TCP_INQ": 36, "SO_ZEROCOPY": 60,
          "MSG_ZEROCOPY": 0x4000000, "MSG_FASTOPEN": 0x20000000, "TCP_THIN_LINEAR_TIMEOUTS": 16,
          "TCP_QUICKACK": 12, "TCP_DEFER_ACCEPT": 9, "TCP_SAVE_SYN": 27, "TCP_SAVED_SYN": 28,
          "TCP_REPAIR": 19, "TCP_ULP": 31, "TCP_TX_DELAY": 37, "SO_MAX_PACING_RATE": 47,
          "TCP_INFO": 11, "TCP_CC_INFO": 26, "SO_TIMESTAMPING": 37,
          "NULL": 0}


class Unknown(Exception):
    """A call, constant or argument the layer does not model: the script skips."""


def const(name: str) -> int:
    if name.lstrip("-").isdigit():
        return int(name)
    for mod in (_EXTRA, socket, select, fcntl, os, E):
        v = mod.get(name) if isinstance(mod, dict) else getattr(mod, name, None)
        if isinstance(v, int):
            return int(v)
    raise Unknown(f"constant {name}")


def value(arg: Any) -> Any:
    """An argument as a Python value: ints, OR-ed constants, lists, structs."""
    if isinstance(arg, Sym):
        v = 0
        for n in arg.names:
            v |= const(n)
        return v
    if isinstance(arg, list):
        return [value(a) for a in arg]
    if isinstance(arg, dict):
        return {k: value(v) for k, v in arg.items()}
    if isinstance(arg, tuple) and arg and arg[0] == "call":
        _, fn, inner = arg
        if fn in ("htons", "htonl", "ntohs", "ntohl"):
            return value(inner[0])
        raise Unknown(f"function {fn}() in an argument")
    return arg


@dataclass(slots=True)
class Outcome:
    ret: int
    errno: int = 0
    outs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class VSock:
    sd: int
    nonblock: bool = False
    connecting: bool = False
    #: Linux's SS_CONNECTING: a non-blocking connect() returned EINPROGRESS; the
    #: next connect() after the handshake returns 0 (SS_CONNECTED), later ones EISCONN.
    ss_connecting: bool = False
    listening: bool = False


class Layer:
    """The sockets of one script run."""

    def __init__(self, shard: Shard, local_ip: int, remote_ip: int,
                 bind_port: int = 8080, connect_port: int = 8080) -> None:
        self.shard = shard
        self.local_ip = local_ip
        self.remote_ip = remote_ip
        #: AF_INET6 in --ip_version=ipv6: the script's AF_INET sockets become IPv6
        #: ones, as packetdrill's socket_domain does.
        self.family = socket.AF_INET
        self.bind_port = bind_port
        self.connect_port = connect_port
        self.fds: dict[int, VSock] = {}
        self.connected: set[int] = set()  # sds whose handshake completed
        self.failed: dict[int, int] = {}  # sd -> errno of a failed handshake
        self.last_fd: int | None = None
        self.conn_fd: int | None = None  # the connection under test (tcp_info)

    # -- the engine's events ------------------------------------------------------------------

    def absorb(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, Connected):
                self.connected.add(ev.sd)
            elif isinstance(ev, SocketError):
                self.failed.setdefault(ev.sd, ev.errno)

    # -- dispatch -----------------------------------------------------------------------------

    def make(self, name: str, args: list[Any], expected_ret: Any) -> Call:
        fn = getattr(self, "sys_" + name, None)
        if fn is None:
            raise Unknown(f"system call {name}()")
        return fn(args, expected_ret)

    def vsock(self, fd: Any) -> VSock:
        fd = value(fd)
        self.last_fd = fd
        vs = self.fds.get(fd)
        if vs is None:
            return VSock(-1)  # the engine answers EBADF for it
        return vs

    def adopt(self, fd: Any, sd: int, **kw: Any) -> None:
        fd = value(fd)
        if not isinstance(fd, int):
            raise Unknown("a new descriptor's number must be given")
        self.fds[fd] = VSock(sd, **kw)
        self.last_fd = fd

    # -- the calls ----------------------------------------------------------------------------

    def sys_socket(self, args: list[Any], expected_ret: Any) -> Call:
        fam = value(args[0]) if args else ...
        if fam is not ... and fam != socket.AF_INET and not (
                fam == socket.AF_INET6 and self.family == socket.AF_INET6):
            raise Unknown("socket family other than AF_INET")
        typ = value(args[1])
        nonblock = bool(typ & socket.SOCK_NONBLOCK)
        if typ & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) != socket.SOCK_STREAM:
            raise Unknown("socket type other than SOCK_STREAM")

        def run(now: float) -> Outcome:
            sd = self.shard.socket(self.family)
            self.adopt(expected_ret, sd, nonblock=nonblock)
            return Outcome(value(expected_ret))
        return Call(run)

    def sys_bind(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        port = self.bind_port
        addr = self.local_ip
        sa = value(args[1]) if len(args) > 1 else ...
        if isinstance(sa, dict):
            port = sa.get("sin_port", port)
            a = sa.get("sin_addr", ...)
            if a == 0:
                addr = 0
            elif a is not ...:
                raise Unknown("bind() to an explicit address")
        return Call(lambda now: self._api(lambda: self.shard.bind(vs.sd, addr, port)))

    def sys_listen(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        backlog = value(args[1])

        def run(now: float) -> Outcome:
            out = self._api(lambda: self.shard.listen(vs.sd, backlog))
            if out.ret == 0:
                vs.listening = True
            return out
        return Call(run)

    def sys_accept(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])

        def run(now: float) -> Outcome | None:
            try:
                got = self.shard.accept(vs.sd)
            except OSError as e:
                return Outcome(-1, e.errno)
            if got is None:
                return Outcome(-1, E.EAGAIN) if vs.nonblock else None
            if expected_ret is ...:
                raise Unknown("accept() whose new descriptor number is not given")
            if value(expected_ret) == -1:  # the engine accepted where the script did not
                fd = max([*self.fds, 2]) + 1
                self.adopt(fd, got[0])
                return Outcome(fd)
            self.adopt(expected_ret, got[0])
            self.conn_fd = value(expected_ret)
            return Outcome(value(expected_ret))
        return Call(run)

    sys_accept4 = sys_accept

    def sys_connect(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        self.conn_fd = self.last_fd
        state = {"started": False}

        def run(now: float) -> Outcome | None:
            if not state["started"]:
                state["started"] = True
                if vs.ss_connecting and vs.sd in self.connected:
                    # __inet_stream_connect: SS_CONNECTING and established -> SS_CONNECTED
                    vs.ss_connecting = False
                    return Outcome(0)
                if vs.connecting and vs.sd not in self.connected and vs.sd not in self.failed:
                    if vs.nonblock or not vs.ss_connecting:
                        return Outcome(-1, E.EALREADY)
                    return None  # blocking now: inet_wait_for_connect
                try:
                    self.shard.connect(vs.sd, self.remote_ip, self.connect_port, now)
                except OSError as e:
                    vs.ss_connecting = False  # how a failed attempt ended: SS_UNCONNECTED
                    return Outcome(-1, e.errno)
                vs.connecting = True
                if vs.nonblock:
                    vs.ss_connecting = True
                    return Outcome(-1, E.EINPROGRESS)
            if vs.sd in self.connected:
                vs.ss_connecting = False
                return Outcome(0)
            if vs.sd in self.failed:
                self.failed.pop(vs.sd)
                return Outcome(-1, self._take_error(vs.sd))
            return None
        return Call(run)

    def _take_error(self, sd: int) -> int:
        """A blocking connect reports the error and consumes it (Linux sock_error)."""
        try:
            err = self.shard.getsockopt(sd, socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            return e.errno
        return err or E.ECONNREFUSED

    def _recv(self, vs: VSock, n: int, flags: int) -> Call:
        if flags & ~(socket.MSG_DONTWAIT | socket.MSG_OOB):
            raise Unknown(f"recv flags {flags:#x}")
        nonblock = vs.nonblock or bool(flags & socket.MSG_DONTWAIT)
        oob = flags & socket.MSG_OOB

        def run(now: float) -> Outcome | None:
            try:
                data = self.shard.recv(vs.sd, n, oob)
            except OSError as e:
                return Outcome(-1, e.errno)
            if data is None:
                return Outcome(-1, E.EAGAIN) if nonblock else None
            return Outcome(len(data), outs={"data": data})
        return Call(run)

    @staticmethod
    def _buffer(args: list[Any]) -> None:
        if len(args) > 1 and args[1] is not ... and not isinstance(args[1], bytes):
            raise Unknown("a buffer given as an address (only ... is modelled)")

    def sys_read(self, args: list[Any], expected_ret: Any) -> Call:
        self._buffer(args)
        return self._recv(self.vsock(args[0]), value(args[2]), 0)

    def sys_recv(self, args: list[Any], expected_ret: Any) -> Call:
        flags = value(args[3]) if len(args) > 3 else 0
        self._buffer(args)
        return self._recv(self.vsock(args[0]), value(args[2]), flags)

    def sys_recvfrom(self, args: list[Any], expected_ret: Any) -> Call:
        return self.sys_recv(args, expected_ret)

    def _send(self, vs: VSock, n: int, flags: int) -> Call:
        if flags & ~(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL | socket.MSG_OOB):
            raise Unknown(f"send flags {flags:#x}")
        nonblock = vs.nonblock or bool(flags & socket.MSG_DONTWAIT)
        oob = flags & socket.MSG_OOB
        state = {"sent": 0}

        def run(now: float) -> Outcome | None:
            while state["sent"] < n:
                try:
                    took = self.shard.send(vs.sd, bytes(n - state["sent"]), now, oob)
                except OSError as e:
                    if state["sent"]:
                        return Outcome(state["sent"])
                    return Outcome(-1, e.errno)
                if took == 0:
                    if nonblock:
                        return Outcome(state["sent"]) if state["sent"] else Outcome(-1, E.EAGAIN)
                    return None
                state["sent"] += took
            return Outcome(n)
        return Call(run)

    def sys_write(self, args: list[Any], expected_ret: Any) -> Call:
        self._buffer(args)
        return self._send(self.vsock(args[0]), value(args[2]), 0)

    def sys_send(self, args: list[Any], expected_ret: Any) -> Call:
        flags = value(args[3]) if len(args) > 3 else 0
        self._buffer(args)
        return self._send(self.vsock(args[0]), value(args[2]), flags)

    def sys_sendto(self, args: list[Any], expected_ret: Any) -> Call:
        if len(args) > 4 and value(args[4]) not in (..., 0):
            raise Unknown("sendto() with a destination address")
        return self.sys_send(args[:4], expected_ret)

    def _iov_len(self, msg: Any) -> int:
        if not isinstance(msg, dict) or not isinstance(msg.get("msg_iov"), list):
            raise Unknown("msghdr without msg_iov")
        for k, v in msg.items():
            if k in ("msg_control", "msg_controllen") and v not in (..., 0, []):
                raise Unknown("msghdr with control messages")
        total = 0
        for iov in msg["msg_iov"]:
            lens = [v for k, v in iov.items() if k in ("_1", "iov_len")] if isinstance(iov, dict) \
                else []
            if not lens or not isinstance(lens[0], int):
                raise Unknown("iovec without a length")
            total += lens[0]
        return total

    def sys_sendmsg(self, args: list[Any], expected_ret: Any) -> Call:
        msg = value(args[1])
        return self._send(self.vsock(args[0]), self._iov_len(msg), value(args[2]))

    def sys_recvmsg(self, args: list[Any], expected_ret: Any) -> Call:
        msg = value(args[1])
        return self._recv(self.vsock(args[0]), self._iov_len(msg), value(args[2]))

    def sys_writev(self, args: list[Any], expected_ret: Any) -> Call:
        return self._send(self.vsock(args[0]), self._iov_len({"msg_iov": value(args[1])}), 0)

    def sys_readv(self, args: list[Any], expected_ret: Any) -> Call:
        return self._recv(self.vsock(args[0]), self._iov_len({"msg_iov": value(args[1])}), 0)

    def sys_shutdown(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        how = value(args[1])
        return Call(lambda now: self._api(lambda: self.shard.shutdown(vs.sd, how, now)))

    def sys_close(self, args: list[Any], expected_ret: Any) -> Call:
        fd = value(args[0])
        vs = self.vsock(fd)

        def run(now: float) -> Outcome:
            out = self._api(lambda: self.shard.close(vs.sd, now))
            if out.ret == 0:
                self.fds.pop(fd, None)
            return out
        return Call(run)

    def sys_setsockopt(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        level, opt, val = value(args[1]), value(args[2]), value(args[3])
        if isinstance(val, list) and len(val) == 1 and isinstance(val[0], int):
            val = val[0]
        elif isinstance(val, dict) and ("l_onoff" in val or "onoff" in val):
            val = struct.pack("ii", val.get("l_onoff", val.get("onoff", 0)),
                              val.get("l_linger", val.get("linger", 0)))
        elif isinstance(val, bytes):
            pass
        elif not isinstance(val, int):
            raise Unknown(f"setsockopt value {val!r}")
        if level == socket.IPPROTO_TCP and opt == socket.TCP_CONGESTION and isinstance(val, bytes):
            val = val.decode()
        return Call(lambda now: self._api(lambda: self.shard.setsockopt(vs.sd, level, opt, val)))

    def sys_getsockopt(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        level, opt = value(args[1]), value(args[2])
        want = value(args[3]) if len(args) > 3 else ...
        if level == socket.IPPROTO_TCP and opt == _EXTRA["TCP_INFO"]:
            raise Unknown("getsockopt(TCP_INFO) with a struct (use %{ }% tcpi_ fields)")

        def run(now: float) -> Outcome:
            try:
                got = self.shard.getsockopt(vs.sd, level, opt)
            except OSError as e:
                return Outcome(-1, e.errno)
            if isinstance(want, dict) and isinstance(got, bytes) and len(got) >= 8:
                onoff, linger = struct.unpack("ii", got[:8])
                keys = ("l_onoff", "l_linger") if "l_onoff" in want else ("onoff", "linger")
                return Outcome(0, outs={"optval": dict(zip(keys, (onoff, linger), strict=True))})
            if isinstance(got, bytes) and not isinstance(want, bytes):
                raise Unknown("getsockopt returning a buffer")
            return Outcome(0, outs={"optval": [got] if isinstance(want, list) else got})
        return Call(run)

    def sys_fcntl(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        cmd = value(args[1])

        def run(now: float) -> Outcome:
            if vs.sd < 0:
                return Outcome(-1, E.EBADF)
            if cmd == fcntl.F_GETFL:
                return Outcome(os.O_RDWR | (os.O_NONBLOCK if vs.nonblock else 0))
            if cmd == fcntl.F_SETFL:
                vs.nonblock = bool(value(args[2]) & os.O_NONBLOCK)
                return Outcome(0)
            raise Unknown(f"fcntl command {cmd}")
        return Call(run)

    def sys_ioctl(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        req = value(args[1])
        if req not in (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD):
            raise Unknown(f"ioctl request {req:#x}")

        def run(now: float) -> Outcome:
            try:
                sk = self.shard.sock(vs.sd)
            except OSError as e:
                return Outcome(-1, e.errno)
            if vs.listening:
                return Outcome(-1, E.EINVAL)
            if req == SIOCINQ:
                n = getattr(sk, "rcvq_len", 0)
            elif req == SIOCOUTQ:
                n = getattr(sk, "sndq_len", 0)
            else:
                n = getattr(sk, "sndq_len", 0) - ((sk.snd_nxt - sk.snd_una) % 2**32)
                n = max(n, 0)
            return Outcome(0, outs={"optval": [n]})
        return Call(run)

    def sys_poll(self, args: list[Any], expected_ret: Any) -> Call:
        fds = value(args[0])
        timeout = value(args[2])
        if not isinstance(fds, list) or not all(isinstance(f, dict) for f in fds):
            raise Unknown("poll() without a pollfd list")
        state: dict[str, float] = {}

        def run(now: float) -> Outcome | None:
            state.setdefault("start", now)
            revents = [self.revents(f.get("fd", -1), f.get("events", 0)) for f in fds]
            ready = sum(1 for r in revents if r)
            outs = {"revents": revents}
            if ready or timeout == 0:
                return Outcome(ready, outs=outs)
            if timeout > 0 and now >= state["start"] + timeout / 1000 - 1e-9:
                return Outcome(0, outs=outs)
            return None
        call = Call(run)
        call.timeout = None if timeout < 0 else timeout / 1000
        return call

    def revents(self, fd: int, events: int) -> int:
        """What poll() reports for ``fd`` (Linux tcp_poll)."""
        vs = self.fds.get(fd)
        if vs is None:
            return select.POLLNVAL
        try:
            sk = self.shard.sock(vs.sd)
        except OSError:
            return select.POLLNVAL
        state = self.shard.state(vs.sd).name
        mask = 0
        if vs.listening:
            return (select.POLLIN | select.POLLRDNORM) & events if sk.accept_queue else 0
        err = getattr(sk, "err", 0)
        rd_shut = getattr(sk, "fin_rcvd", False) or getattr(sk, "rd_shut", False)
        wr_shut = getattr(sk, "shut_wr", False)
        if err:
            mask |= select.POLLERR
        if state == "CLOSED" and (vs.connecting or vs.sd in self.failed or err):
            rd_shut = wr_shut = True
        if state == "CLOSED" or (rd_shut and wr_shut):
            mask |= select.POLLHUP
        if rd_shut:
            mask |= select.POLLIN | select.POLLRDNORM | _EXTRA["POLLRDHUP"]
        if state not in ("SYN_SENT", "SYN_RECEIVED", "SYN_RECV"):
            if getattr(sk, "rcvq_len", 0):
                mask |= select.POLLIN | select.POLLRDNORM
            if wr_shut or getattr(sk, "sndq_len", 0) < getattr(sk, "sndbuf", 1):
                if state != "CLOSED" or wr_shut:
                    mask |= select.POLLOUT | select.POLLWRNORM
        return mask & (events | select.POLLERR | select.POLLHUP | select.POLLNVAL)

    def sys_getsockname(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        return Call(lambda now: self._api(lambda: self.shard.getsockname(vs.sd)))

    def sys_getpeername(self, args: list[Any], expected_ret: Any) -> Call:
        vs = self.vsock(args[0])
        return Call(lambda now: self._api(lambda: self.shard.getpeername(vs.sd)))

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _api(fn) -> Outcome:
        try:
            fn()
        except OSError as e:
            return Outcome(-1, e.errno)
        return Outcome(0)


class Call:
    """One system call in flight."""

    def __init__(self, run) -> None:
        self.run = run
        self.timeout: float | None = None

    def attempt(self, now: float) -> Outcome | None:
        return self.run(now)
