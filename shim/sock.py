"""`ShimSocket`: a `socket.socket` that runs TCP on shardstack when it should.

Every AF_INET/SOCK_STREAM socket starts life as an ordinary kernel socket.
At connect(), bind() or listen() the scope rules (shim.scope) decide; a
socket that goes on the stack swaps its file descriptor, in place (dup2, so
the number the app may already hold stays valid), for an AF_UNIX stream:

- connected: one stream to the owning worker (gateproto explains the bytes);
- listening: an AF_UNIX listener the workers connect accepted connections to.

The object keeps reporting AF_INET/SOCK_STREAM and TCP addresses, and the
address- and option-shaped methods are overridden. The data methods
(recv/recv_into/recvmsg/send/sendall/sendmsg, hence makefile and sendfile)
are the C methods on the real fd behind thin wrappers that only look at the
end of the stream, so the data path costs what a unix socket costs and
select, selectors, asyncio and ssl see a real descriptor.

Errnos are the kernel's: the supervisor's bind table answers EADDRINUSE /
EADDRNOTAVAIL / EINVAL; the worker's handshake outcome arrives as the
ECONNREFUSED / ETIMEDOUT errno (gateproto); a reset connection's recv/send
raise ECONNRESET, from the kernel itself when the worker held a byte back,
else from the wrappers (_at_end); a second connect() raises EALREADY /
EISCONN, but after a failed handshake the socket is unconnected again and
may connect anew, as on Linux (_unconnect); getpeername() on an unconnected
socket ENOTCONN.
"""

from __future__ import annotations

import array
import errno
import ipaddress
import operator
import os
import select
import socket as _socket_mod
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from shardstack.shim import gateproto as gp
from shardstack.shim import scope
from shardstack.shim.stack import Stack, get_stack, read_frame

kernel_socket = _socket_mod.socket  # the class as the interpreter defined it
_csocket = _socket_mod._socket.socket if hasattr(_socket_mod, "_socket") else None

AF_INET, AF_UNIX, SOCK_STREAM = _socket_mod.AF_INET, _socket_mod.AF_UNIX, _socket_mod.SOCK_STREAM
AF_INET6 = _socket_mod.AF_INET6
IPPROTO_IPV6 = _socket_mod.IPPROTO_IPV6
IPV6_V6ONLY = _socket_mod.IPV6_V6ONLY
_FACES = (AF_INET, AF_INET6)
SOL_SOCKET, IPPROTO_TCP = _socket_mod.SOL_SOCKET, _socket_mod.IPPROTO_TCP
SO_DOMAIN = getattr(_socket_mod, "SO_DOMAIN", 39)
SO_PROTOCOL = getattr(_socket_mod, "SO_PROTOCOL", 38)
TCP_INFO = getattr(_socket_mod, "TCP_INFO", 11)
GATE_TIMEOUT = 10.0  # s: a local worker answers a connect request at once
TCP_CA_NAME_MAX = 16  # bytes of TCP_CONGESTION's value (Linux include/net/tcp.h)
OWNER_RETRIES = 4  # connect requests sent on after a worker named the flow's owner

# Kinds and states of a stack socket.
BOUND, LISTENER, ACTIVE, PASSIVE = "bound", "listener", "active", "passive"
CONNECTING, ESTABLISHED, FAILED = "connecting", "established", "failed"

# Linux's answers for options nobody set yet (tcp_init_sock, sock_init_data).
_DEFAULTS = {
    (IPPROTO_TCP, _socket_mod.TCP_NODELAY): 0,
    (IPPROTO_TCP, _socket_mod.TCP_MAXSEG): 536,
    (IPPROTO_TCP, _socket_mod.TCP_KEEPIDLE): 7200,
    (IPPROTO_TCP, _socket_mod.TCP_KEEPINTVL): 75,
    (IPPROTO_TCP, _socket_mod.TCP_KEEPCNT): 9,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_USER_TIMEOUT", 18)): 0,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_SYNCNT", 7)): 6,  # net.ipv4.tcp_syn_retries
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_LINGER2", 8)): 60,  # net.ipv4.tcp_fin_timeout
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_WINDOW_CLAMP", 10)): 0,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_CORK", 3)): 0,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_DEFER_ACCEPT", 9)): 0,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_QUICKACK", 12)): 1,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_FASTOPEN", 23)): 0,
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_NOTSENT_LOWAT", 25)): 0,  # 0: the sysctl's
    # The engine's default (core.tcp_cong.DEFAULT), a TCP_CA_NAME_MAX buffer.
    (IPPROTO_TCP, getattr(_socket_mod, "TCP_CONGESTION", 13)): b"cubic".ljust(TCP_CA_NAME_MAX, b"\0"),
    (_socket_mod.IPPROTO_IP, _socket_mod.IP_TOS): 0,
    (_socket_mod.IPPROTO_IP, _socket_mod.IP_TTL): 64,  # net.ipv4.ip_default_ttl
    (SOL_SOCKET, _socket_mod.SO_KEEPALIVE): 0,
    (SOL_SOCKET, _socket_mod.SO_REUSEADDR): 0,
    (SOL_SOCKET, _socket_mod.SO_REUSEPORT): 0,
    (SOL_SOCKET, _socket_mod.SO_OOBINLINE): 0,
    (IPPROTO_IPV6, IPV6_V6ONLY): 0,  # net.ipv6.bindv6only's default
}
_LINGER = struct.Struct("ii")
_TCP_LINGER2 = getattr(_socket_mod, "TCP_LINGER2", 8)
# Options the engine may change on a connection (the MSS from the path, the
# clamp from the buffer and the window scale): asked of the worker.
_FROM_ENGINE = frozenset({(IPPROTO_TCP, _socket_mod.TCP_MAXSEG),
                          (IPPROTO_TCP, getattr(_socket_mod, "TCP_WINDOW_CLAMP", 10)),
                          (IPPROTO_TCP, getattr(_socket_mod, "TCP_CONGESTION", 13))})
# Levels whose values a kernel TCP socket checks exactly as Linux would check
# ours (do_tcp_setsockopt, do_ip_setsockopt, sk_setsockopt); not the names of
# congestion controls (the engine has its own) nor IPV6_V6ONLY (state-bound).
_KERNEL_CHECKED = frozenset({IPPROTO_TCP, _socket_mod.IPPROTO_IP, SOL_SOCKET})
_ENGINE_CHECKED = frozenset({(IPPROTO_TCP, getattr(_socket_mod, "TCP_CONGESTION", 13))})
# What an unconnected AF_UNIX stream answers a read or write with (not EBADF
# of a closed fd, EAGAIN or EINTR, which TCP gives alike).
_UNIX_UNCONNECTED = frozenset({errno.EINVAL, errno.ENOTCONN, errno.EOPNOTSUPP, errno.EPIPE})
# Options kept off the unix fd: SO_OOBINLINE would put the gate's status
# byte in the data stream; the buffer sizes are the filler's while connecting.
_LOCAL_ONLY = {(SOL_SOCKET, _socket_mod.SO_OOBINLINE), (SOL_SOCKET, _socket_mod.SO_LINGER)}


@dataclass(slots=True, eq=False)
class StackState:
    """What the shim knows of one stack socket; shared by its dup()s."""

    kind: str
    laddr: str = "0.0.0.0"
    lport: int = 0
    raddr: str = ""
    rport: int = 0
    bind_id: int | None = None
    worker: int = -1
    token: int = -1
    status: str = ESTABLISHED
    err: int = 0  # a connection error not yet reported by SO_ERROR/connect
    path: str = ""  # a listener's AF_UNIX path
    owner_pid: int = 0
    ended: bool = False  # the end of the stream (EOF or its errno) was reported
    connect_failed: bool = False  # the handshake itself failed: connect() may be retried
    #: Linux SS_CONNECTING: connect() returned EINPROGRESS; the first connect()
    #: after the handshake returns 0 (SS_CONNECTED), the ones after it EISCONN.
    ss_connecting: bool = False

    @property
    def sockname(self) -> tuple[str, int]:
        return (self.laddr, self.lport)

    @property
    def peername(self) -> tuple[str, int]:
        return (self.raddr, self.rport)


# Stack state by the unix socket's inode, so a bare fd (socket(fileno=),
# fromfd, ssl's re-wrap, a forked child) finds its TCP identity again.
_REGISTRY: dict[int, StackState] = {}
_REG_LOCK = threading.Lock()


def _register(fd: int, st: StackState) -> None:
    with _REG_LOCK:
        _REGISTRY[os.fstat(fd).st_ino] = st


def _unregister(fd: int) -> None:
    try:
        ino = os.fstat(fd).st_ino
    except OSError:
        return
    with _REG_LOCK:
        _REGISTRY.pop(ino, None)


def recover_state(fd: int) -> StackState | None:
    """The StackState of an AF_UNIX fd created by the shim or the appgate."""
    tmp = _csocket(AF_UNIX, SOCK_STREAM, 0, fd)
    try:
        try:
            peer = tmp.getpeername()
        except OSError:
            peer = None
    finally:
        tmp.detach()
    if isinstance(peer, (bytes, str)) and peer:
        try:
            n = gp.decode_conn_name(peer)
        except gp.ProtoError:
            pass
        else:
            laddr, raddr = n.laddr, n.raddr
            if laddr == raddr and _loopback_mode():
                laddr = raddr = "127.0.0.1"  # --loopback: a connection to ourselves
            return StackState(PASSIVE, laddr, n.lport, raddr, n.rport,
                              worker=n.worker, token=n.token)
    with _REG_LOCK:
        st = _REGISTRY.get(os.fstat(fd).st_ino)
    return st if st is not None else _state_from_name(fd)


def _state_from_name(fd: int) -> StackState | None:
    """A bound or listening stack socket that reached another process
    (multiprocessing spawn), where the registry does not follow: its path
    spells the bind (gateproto.listener_file). The process holds no claim on
    the bind yet: its listen() adopts it."""
    tmp = _csocket(AF_UNIX, SOCK_STREAM, 0, fd)
    try:
        try:
            name = tmp.getsockname()
            listening = tmp.getsockopt(SOL_SOCKET, _socket_mod.SO_ACCEPTCONN)
        except OSError:
            return None
    finally:
        tmp.detach()
    parsed = gp.parse_listener_path(name) if isinstance(name, str) and name else None
    if parsed is None:
        return None
    return StackState(LISTENER if listening else BOUND, parsed[1], parsed[2],
                      bind_id=parsed[0], path=name)


def view_addr(shown: str) -> str:
    """The stack address behind a name the app sees (127.x under --loopback
    stands for the stack's first address)."""
    if _is_loopback(shown):
        stack = get_stack()
        view = stack.view() if stack is not None else None
        if view is not None:
            return view.primary
    return shown


def _unix_at(path: str, kind: int = SOCK_STREAM) -> kernel_socket:
    """An AF_UNIX socket bound at `path` in the run directory, mode 0600: only
    the stack's user may connect. A bound TCP socket's fd is one bound at its
    listener's path (gateproto.listener_file), which spells the bind; a UDP
    socket's is a SOCK_DGRAM one (shim/dgram.py)."""
    u = kernel_socket(AF_UNIX, kind | _socket_mod.SOCK_CLOEXEC)
    try:
        try:
            os.unlink(path)  # left by a process that died
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            u.bind(path)
        finally:
            os.umask(old)
    except BaseException:
        u.close()
        raise
    return u


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _release_bind(stack: Stack, bind_id: int) -> None:
    try:
        stack.call("release", bind_id=bind_id)
    except OSError:
        pass


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def _loopback_mode() -> bool:
    stack = get_stack()
    return stack is not None and stack.loopback


def _check_address(family: int, address: Any) -> None:
    """Raise what CPython raises for a malformed destination (TypeError,
    OverflowError, gaierror), for a TCP send that ignores it or a UDP one
    the stack takes: a kernel UDP socket's connect() parses it as sendto()
    would and sends nothing."""
    with kernel_socket(family, _socket_mod.SOCK_DGRAM | _socket_mod.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(address)
        except _socket_mod.gaierror:
            raise
        except OSError:
            pass  # well-formed; the route is not what is checked here


def _check_sendmsg_args(family: int, buffers: list, ancdata: list, flags: int) -> None:
    """sendmsg()'s own argument errors (TypeError for a buffer or an
    ancillary item of the wrong shape): the same call on an unconnected
    kernel UDP socket, which then fails EDESTADDRREQ without sending."""
    with kernel_socket(family, _socket_mod.SOCK_DGRAM | _socket_mod.SOCK_CLOEXEC) as probe:
        try:
            probe.sendmsg(buffers, ancdata, flags)
        except OSError as e:
            if e.errno not in (errno.EDESTADDRREQ, errno.EINVAL, errno.ENOTCONN):
                raise


def _ca_name(name: bytes) -> bytes:
    """TCP_CONGESTION's value as Linux copies it: a TCP_CA_NAME_MAX buffer."""
    return name.rstrip(b"\0").ljust(TCP_CA_NAME_MAX, b"\0")


def _udp_dest(parsed: tuple[str, int]) -> tuple[str, int]:
    """A datagram's destination as the stack sees it: under --loopback,
    127.x is the stack's own address (as a TCP connect's, `_connect`)."""
    if _is_loopback(parsed[0]) and _loopback_mode():
        view = get_stack().view()
        if view is not None:
            return view.primary, parsed[1]
    return parsed


def _fd_domain(fd: int) -> int:
    tmp = _csocket(AF_UNIX, SOCK_STREAM, 0, fd)
    try:
        return tmp.getsockopt(SOL_SOCKET, SO_DOMAIN)
    finally:
        tmp.detach()


def _face(family: int, host: str, port: int) -> tuple:
    """A TCP address as the socket's family shows it: AF_INET6 sockets see
    IPv6 ones as they are, IPv4 ones (a dual-stack `::` listener's peers,
    `::ffff:a.b.c.d` destinations) v4-mapped, in the 4-tuple (host, port,
    flowinfo, scope_id)."""
    if family == AF_INET6:
        if ":" in host:
            return (host, port, 0, 0)
        return ("::" if host == "0.0.0.0" else "::ffff:" + host, port, 0, 0)
    return (host, port)


def _parse_addr(family: int, address: Any, v6: bool = False,
                v6only: bool = False) -> tuple[str, int] | None:
    """(host, port) of an address the stack could serve, else None (the
    kernel method then runs, and raises its own errors if malformed). The
    host is IPv4 text, or with `v6` (the stack has IPv6) an IPv6 address's
    text, `::` the dual-stack wildcard; v4-mapped addresses are IPv4 (not on
    an IPv6-only socket)."""
    if family == AF_INET:
        return _parse_inet(address)
    if not isinstance(address, tuple) or not 2 <= len(address) <= 4:
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        return None
    if host in ("", "::"):
        if v6:
            return "::", port  # both families unless IPV6_V6ONLY (the stack's bind)
        # no IPv6 on the stack: the dual-stack wildcard's IPv4 half is the stack's
        return None if v6only else ("0.0.0.0", port)
    try:
        ip6 = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip6.ipv4_mapped is not None:
        return None if v6only else (str(ip6.ipv4_mapped), port)
    return (str(ip6), port) if v6 else None


def _parse_inet(address: Any) -> tuple[str, int] | None:
    """(host, port) of an AF_INET address tuple, or None to let the kernel
    method raise its own TypeError/OverflowError for a malformed one."""
    if not isinstance(address, tuple) or len(address) != 2:
        return None
    host, port = address
    if not isinstance(host, (str, bytes)) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        return None
    if isinstance(host, bytes):
        host = host.decode("idna")
    if host == "<broadcast>":
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if host == "":
            return host, port
        try:
            host = _socket_mod.gethostbyname(host)
        except OSError:
            return None
    return host, port


def _check_denied(stack: Stack | None, view: Any, parsed: tuple[str, int] | None) -> None:
    """No usable stack: normally sockets go to the kernel. But when the stack
    exists and is not ours (SO_PEERCRED said EACCES), or in strict mode
    (`shardstack run`: the program was meant to run on the stack), a
    non-loopback address fails instead of silently leaving by the kernel."""
    if stack is None or view is not None or parsed is None:
        return
    if not (stack.denied or stack.strict):
        return
    try:
        if ipaddress.ip_address(parsed[0] or "0.0.0.0").is_loopback:
            return
    except ValueError:
        return
    if stack.denied:
        raise _oserror(errno.EACCES, "this shardstack belongs to another user")
    raise _oserror(errno.ENETUNREACH, f"shardstack not reachable in {stack.run_dir}")


def _oserror(code: int, text: str | None = None) -> OSError:
    """The exception class Python maps `code` to, as a failed syscall raises."""
    return OSError(code, text or os.strerror(code))


class ShimSocket(kernel_socket):
    """socket.socket, with AF_INET/SOCK_STREAM sockets on shardstack (module docstring)."""

    __slots__ = ("_ss", "_pre", "_cand", "_owner", "_us", "_dgram", "_disconnected")

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: int | None = None) -> None:
        st = None
        if fileno is not None and family in _FACES and (type == -1 or type & 0xF == SOCK_STREAM):
            # A stack fd wrapped again (accept, dup, fromfd, ssl): it is
            # AF_UNIX underneath but must keep its TCP face.
            try:
                if _fd_domain(fileno) == AF_UNIX:
                    st = recover_state(fileno)
            except OSError:
                pass  # not a socket: let socket.__init__ raise its own error
        super().__init__(family, type, proto, fileno)
        self._ss = st
        self._owner = False  # this object made the stack state (and unregisters it)
        self._pre = None  # options set while still a kernel socket, to replay
        self._cand = self.family in _FACES and self.type == SOCK_STREAM
        self._us = None  # a UDP socket on the stack (shim/dgram.py)
        self._dgram = self.family in _FACES and self.type == _socket_mod.SOCK_DGRAM
        # A stack connect() failed on this socket: like Linux's, it may connect
        # again but never listen (inet_listen: EINVAL).
        self._disconnected = False

    # -- helpers --------------------------------------------------------------

    def _stack(self) -> Stack | None:
        return get_stack() if self._cand else None

    def _swap_fd(self, new: kernel_socket) -> None:
        """Put `new`'s socket under our fd number, keeping flags and timeout."""
        inheritable = self.get_inheritable()
        timeout = self.gettimeout()
        os.dup2(new.fileno(), self.fileno(), inheritable=inheritable)
        new.close()
        self.settimeout(timeout)  # O_NONBLOCK lives on the open file, not the fd

    def _refresh(self) -> None:
        """Learn how a pending handshake ended, without blocking (see gateproto)."""
        st = self._ss
        if st is None or st.status != CONNECTING:
            return
        p = select.poll()
        p.register(self.fileno(), select.POLLOUT | select.POLLPRI)
        ev = 0
        for _fd, e in p.poll(0):
            ev = e
        if ev & select.POLLPRI:
            self._take_oob(st)
        elif ev & (select.POLLOUT | select.POLLHUP | select.POLLERR):
            err = kernel_socket.getsockopt(self, SOL_SOCKET, _socket_mod.SO_ERROR)
            if err:
                st.status, st.err = FAILED, err
            else:
                st.status = ESTABLISHED
        st.connect_failed = st.status == FAILED

    def _take_oob(self, st: StackState) -> None:
        try:
            b = kernel_socket.recv(self, 1, _socket_mod.MSG_OOB | _socket_mod.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno == errno.EINVAL:
                return  # no OOB byte after all: a read passed over it, nothing to report
            st.status, st.err = FAILED, e.errno or errno.ECONNRESET
            return
        if b:
            st.status, st.err = FAILED, b[0] or errno.ECONNRESET
            # The kernel's own ECONNRESET (the worker closed W with bytes
            # unread) is superseded by the exact errno we just read.
            kernel_socket.getsockopt(self, SOL_SOCKET, _socket_mod.SO_ERROR)

    def _pop_error(self) -> int:
        st = self._ss
        if st is None:
            return 0
        self._refresh()
        if st.status == ESTABLISHED:
            p = select.poll()
            p.register(self.fileno(), select.POLLPRI)
            if p.poll(0):
                self._take_oob(st)
        err, st.err = st.err, 0
        if err and st.kind in (ACTIVE, PASSIVE):
            st.ended = True  # reported here: recv() then just sees EOF, as on Linux
        return err

    def _record(self, level: int, opt: int, value: Any) -> None:
        if self._pre is None:
            self._pre = {}
        self._pre[(level, opt)] = value

    def _opts_list(self) -> list[list[Any]]:
        out = []
        for (level, opt), value in (self._pre or {}).items():
            if (level == IPPROTO_TCP and opt in gp.TCP_FORWARDED) or (
                    level == SOL_SOCKET and opt in gp.SOL_FORWARDED):
                out.append([level, opt, _wire_value(opt, value)])
        return out

    # -- bind / listen / accept -----------------------------------------------

    def bind(self, address: Any) -> None:
        if self._dgram:
            return self._udp_bind(address)
        stack = self._stack()
        parsed = (self._parse(address) if stack is not None and self._ss is None
                  else None)
        view = stack.view() if parsed is not None else None
        _check_denied(stack, view, parsed)
        where, host = scope.bind_scope(parsed[0], view) if parsed else (scope.KERNEL, "")
        if where == scope.KERNEL:
            return super().bind(address)
        pre = self._pre or {}
        extra = {}
        if scope.is_v6(host):  # an AF_INET6 socket on the stack's IPv6 side
            extra = {"v6": True, "v6only": bool(pre.get((IPPROTO_IPV6, IPV6_V6ONLY)))}
        r = stack.call("bind", addr=host, port=parsed[1],
                       reuseaddr=bool(pre.get((SOL_SOCKET, _socket_mod.SO_REUSEADDR))),
                       reuseport=bool(pre.get((SOL_SOCKET, _socket_mod.SO_REUSEPORT))),
                       **extra)
        # --loopback: a socket bound to 127.x keeps showing it (scope maps it
        # to the stack's address underneath).
        shown = parsed[0] if _is_loopback(parsed[0]) else str(r["addr"])
        st = StackState(BOUND, shown, int(r["port"]), bind_id=int(r["bind_id"]),
                        owner_pid=os.getpid())
        st.path = str(stack.run_dir / "l" / gp.listener_file(st.bind_id, str(r["addr"]),
                                                            st.lport))
        try:
            self._swap_fd(_unix_at(st.path))
        except BaseException:
            _release_bind(stack, st.bind_id)
            raise
        self._ss = st
        self._owner = True
        _register(self.fileno(), st)

    def listen(self, backlog: int = min(_socket_mod.SOMAXCONN, 128)) -> None:
        if self._disconnected:
            raise _oserror(errno.EINVAL)
        st = self._ss
        if st is None and self._unbound_candidate():
            # listen() on an unbound socket binds the wildcard, any port (inet_autobind)
            self.bind(("::", 0) if self.family == AF_INET6 else ("0.0.0.0", 0))
            st = self._ss
        if st is None:
            return super().listen(backlog)
        if st.kind not in (BOUND, LISTENER):
            raise _oserror(errno.EINVAL)
        stack = get_stack()
        backlog = max(0, min(int(backlog), _socket_mod.SOMAXCONN))
        # The bound fd is the AF_UNIX socket at the listener's path: it
        # listens in place, so every process holding the fd (fork, spawn)
        # shares one accept queue, as with a kernel socket; a second listen()
        # sets a new backlog.
        super().listen(backlog)
        if st.kind == LISTENER and st.owner_pid == os.getpid():
            return
        self._claimed_call(stack, st, "listen", bind_id=st.bind_id, backlog=backlog,
                           path=st.path, opts=self._opts_list())
        st.kind = LISTENER
        self._owner = True

    def shutdown(self, how: int) -> None:
        st = self._ss
        if st is None or self._us is not None:
            return super().shutdown(how)
        if st.kind == LISTENER and how in (_socket_mod.SHUT_RD, _socket_mod.SHUT_RDWR):
            return self._unlisten(st)
        if st.kind in (BOUND, LISTENER):
            if how not in (_socket_mod.SHUT_RD, _socket_mod.SHUT_WR, _socket_mod.SHUT_RDWR):
                raise _oserror(errno.EINVAL)
            if st.kind == BOUND:
                raise _oserror(errno.ENOTCONN)  # inet_shutdown of a TCP_CLOSE socket
            return None  # SHUT_WR of a listener: nothing to shut (inet_shutdown)
        return super().shutdown(how)

    def _unlisten(self, st: StackState) -> None:
        """shutdown(SHUT_RD) of a listening socket: as Linux, it stops listening
        and keeps its port; accept() callers, blocked ones too, get EINVAL, and
        listen() may start it again."""
        kernel_socket.shutdown(self, _socket_mod.SHUT_RDWR)  # wakes accept(): EINVAL
        stack = get_stack()
        if stack is not None and st.bind_id is not None:
            self._claimed_call(stack, st, "unlisten", bind_id=st.bind_id)
        if self._owner:
            _unregister(self.fileno())
        # A fresh socket at the path for a later listen(): the shut-down one
        # refuses connections for good (unix_stream_connect: RCV_SHUTDOWN),
        # and closing it resets what waited in its queue, as Linux does.
        self._swap_fd(_unix_at(st.path))
        st.kind = BOUND
        _register(self.fileno(), st)
        self._owner = True

    def _claimed_call(self, stack: Stack, st: StackState, op: str, **args: Any) -> Any:
        """A control call on our bind; a bind made in another process (the fd
        came by multiprocessing spawn) is adopted first, as the kernel's socket
        is shared by every process holding the fd."""
        try:
            return stack.call(op, **args)
        except OSError as e:
            if e.errno != errno.EBADF or st.owner_pid == os.getpid():
                raise
        stack.call("adopt", bind_id=st.bind_id)
        st.owner_pid = os.getpid()  # our claim now: close() gives it back
        self._owner = True
        return stack.call(op, **args)

    def _parse(self, address: Any) -> tuple[str, int] | None:
        if self.family != AF_INET6:
            return _parse_addr(self.family, address)
        stack = self._stack()
        view = stack.view() if stack is not None else None
        v6only = bool((self._pre or {}).get((IPPROTO_IPV6, IPV6_V6ONLY)))
        return _parse_addr(self.family, address, bool(view and view.addrs6), v6only)

    def _unbound_candidate(self) -> bool:
        stack = self._stack()
        if stack is None or stack.view() is None:
            return False
        return super().getsockname()[1] == 0  # not bound on the kernel either

    def accept(self) -> tuple[ShimSocket, Any]:
        st = self._ss
        if st is None or st.kind != LISTENER:
            return super().accept()
        fd, _garbage = super()._accept()  # an AF_INET parse of a unix address: ignored
        # The plain class, as socket.accept does: a subclass (ssl.SSLSocket,
        # when ssl was imported after install) has no public constructor.
        sock = ShimSocket(self.family, SOCK_STREAM, self.proto, fileno=fd)
        if _socket_mod.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)  # as socket.accept does (issue #7995)
        if sock._ss is None:
            sock.close()
            raise _oserror(errno.EPROTO, "accepted a connection that is not shardstack's")
        if self._pre:
            # The child is a clone of the listener (sk_clone_lock): the engine's
            # copy has its options already, and so reads the app's.
            sock._pre = dict(self._pre)
        return sock, _face(self.family, *sock._ss.peername)

    # -- connect --------------------------------------------------------------

    def connect(self, address: Any) -> None:
        err = self._connect(address, raising=True)
        if err:
            raise _oserror(err)

    def connect_ex(self, address: Any) -> int:
        try:
            return self._connect(address, raising=False)
        except TimeoutError as e:
            if e.errno is None:
                return errno.EWOULDBLOCK  # what CPython's connect_ex returns on a timeout
            return e.errno
        except OSError as e:
            if e.errno is None:
                raise
            return e.errno

    def _connect(self, address: Any, raising: bool) -> int:
        if self._dgram:
            return self._udp_connect(address, raising)
        st = self._ss
        if st is not None and st.kind in (ACTIVE, PASSIVE):
            return self._reconnect(st)
        if st is not None and st.kind == LISTENER:
            return errno.EISCONN  # __inet_stream_connect: not TCP_CLOSE
        stack = self._stack()
        parsed = self._parse(address) if stack is not None else None
        view = stack.view() if parsed is not None else None
        _check_denied(stack, view, parsed)
        bound = st is not None and st.kind == BOUND
        where, dst = (scope.connect_scope(parsed[0], view, bound) if parsed
                      else (scope.KERNEL, ""))
        if where == scope.KERNEL:
            if bound:
                raise _oserror(errno.EADDRNOTAVAIL)  # bound on the stack, kernel destination
            if raising:
                super().connect(address)
                return 0
            return super().connect_ex(address)
        self._stack_connect(stack, view, dst, parsed[1])
        if _is_loopback(parsed[0]):
            # --loopback: to the app, a connection to 127.x is from and to
            # loopback addresses, as on Linux (the stack sees its own address).
            st = self._ss
            st.raddr = parsed[0]
            if st.laddr == view.primary:
                st.laddr = "127.0.0.1"
        return self._wait_connected(self._ss)

    def _reconnect(self, st: StackState) -> int:
        """connect() again on a stack connection (__inet_stream_connect)."""
        self._refresh()
        if st.status == CONNECTING:
            if self.gettimeout() is not None:
                return errno.EALREADY  # CPython's timeout mode is a non-blocking fd
            return self._wait_connected(st)  # blocking now: inet_wait_for_connect
        if st.status == FAILED and st.connect_failed:
            # A non-blocking connect that failed: report how (ECONNABORTED
            # once SO_ERROR took the errno) and disconnect, so the next
            # connect() starts afresh (Linux's sock_error path).
            err, st.err = st.err, 0
            self._unconnect(st)
            return err or errno.ECONNABORTED
        if st.status == FAILED and st.err:
            err, st.err = st.err, 0
            return err
        if st.ss_connecting and st.status == ESTABLISHED:
            st.ss_connecting = False  # __inet_stream_connect: SS_CONNECTING -> SS_CONNECTED
            return 0
        return errno.EISCONN

    def _stack_connect(self, stack: Stack, view: scope.StackView, dst: str, port: int) -> None:
        st = self._ss
        v6 = scope.is_v6(dst)
        laddr, lport = (st.laddr, st.lport) if st is not None else ("::" if v6 else "0.0.0.0", 0)
        if _is_loopback(laddr):
            laddr = view.primary  # bound to 127.x under --loopback (bind)
        worker = self._worker_for(stack, view, laddr, lport, dst, port)
        req = {"op": "connect", "addr": dst, "port": port, "opts": self._opts_list()}
        if v6:
            req["v6"] = True  # an AF_INET6 socket on the shard
        if st is not None:
            req.update(baddr=laddr, bport=lport, bind_id=st.bind_id)
        for _attempt in range(OWNER_RETRIES):
            a, reply = self._connect_request(stack, worker, req)
            if reply.get("ok"):
                break
            a.close()
            owner = reply.get("owner")
            if not isinstance(owner, int):
                raise _oserror(int(reply.get("errno") or errno.EIO), reply.get("error"))
            # Our RETA was stale (a bucket moved): the worker named the flow's
            # owner. Ask there, and learn the table anew for the next connect.
            worker = owner
            stack.forget_view()
        else:
            raise _oserror(errno.EAGAIN, "the stack's RETA kept moving under this connect")
        if st is not None and self._owner:
            _unregister(self.fileno())  # the bound fd's inode goes with it
        if st is not None and st.path:
            _unlink(st.path)  # a connection has no listener path
            st.path = ""
        self._swap_fd(a)
        if st is None:
            st = StackState(ACTIVE)
            self._ss = st
        st.kind, st.status = ACTIVE, CONNECTING
        st.laddr, st.lport = str(reply["laddr"]), int(reply["lport"])
        st.raddr, st.rport = dst, port
        st.worker, st.token = int(reply["worker"]), int(reply["token"])
        _register(self.fileno(), st)
        self._owner = True

    @staticmethod
    def _connect_request(stack: Stack, worker: int, req: dict[str, Any]
                         ) -> tuple[kernel_socket, dict[str, Any]]:
        """One connect request to `worker`: our new stream to it, and its reply."""
        a = kernel_socket(AF_UNIX, SOCK_STREAM | _socket_mod.SOCK_CLOEXEC)
        try:
            a.settimeout(GATE_TIMEOUT)
            try:
                a.connect(stack.worker_path(worker))
            except (FileNotFoundError, ConnectionRefusedError):
                raise _oserror(errno.ENETUNREACH, "shardstack is not running") from None
            # Our own fd rides along: the worker fills our send buffer with it.
            fds = array.array("i", [a.fileno()])
            a.sendmsg([gp.pack(req)], [(SOL_SOCKET, _socket_mod.SCM_RIGHTS, fds)])
            return a, read_frame(a, bytearray())
        except BaseException:
            a.close()
            raise

    def _worker_for(self, stack: Stack, view: scope.StackView, laddr: str, lport: int,
                    raddr: str, rport: int) -> int:
        if lport and view.reta:
            from shardstack.netio import rss

            if scope.is_v6(raddr):
                h = rss.flow_hash6(gp.ip_int(raddr),
                                   gp.ip_int(laddr if laddr != "::" else view.primary6),
                                   rport, lport)
            else:
                h = rss.Toeplitz(rss.SYMMETRIC_KEY).hash_tuple(
                    gp.ip_int(raddr), gp.ip_int(laddr if laddr != "0.0.0.0" else view.primary),
                    rport, lport)
            return view.reta[h & rss.RETA_MASK]
        return scope.pick_worker(view, os.getpid(), stack.next_counter())

    def _wait_connected(self, st: StackState) -> int:
        timeout = self.gettimeout()
        # Linux SS_CONNECTING: CPython connects a non-blocking fd unless the socket
        # is blocking without a timeout, and with a timeout only polls for the end
        # (SO_ERROR), so the kernel socket stays SS_CONNECTING: the next connect()
        # says 0 once (a kernel socket with settimeout(5): [0, EISCONN]; blocking:
        # [EISCONN, EISCONN]).
        st.ss_connecting = timeout is not None
        if timeout == 0.0:
            return errno.EINPROGRESS
        p = select.poll()
        p.register(self.fileno(), select.POLLOUT | select.POLLPRI)
        if not p.poll(None if timeout is None else max(0, int(timeout * 1000))):
            raise TimeoutError("timed out")  # Python's message for a connect timeout
        self._refresh()
        if st.status == FAILED:
            err, st.err = st.err, 0
            self._unconnect(st)  # a blocking connect that failed leaves it unconnected
            return err or errno.ECONNREFUSED
        return 0

    def _unconnect(self, st: StackState) -> None:
        """Back to an unconnected socket after a failed handshake (Linux
        ``tcp_disconnect``): the stream to the worker gives way to a fresh
        kernel socket (options set before are applied again), a port the app
        bound stays bound (the supervisor's bind is ours until close), an
        ephemeral one went with the worker's socket. connect() may follow."""
        if self._owner:
            _unregister(self.fileno())
        self._disconnected = True
        self._swap_fd(kernel_socket(self.family, SOCK_STREAM | _socket_mod.SOCK_CLOEXEC))
        for (level, opt), value in (self._pre or {}).items():
            try:
                kernel_socket.setsockopt(self, level, opt, value)
            except (OSError, TypeError, ValueError):
                pass  # an option only the stack side knows
        if st.bind_id is not None:
            self._ss = StackState(BOUND, st.laddr, st.lport, bind_id=st.bind_id,
                                  owner_pid=st.owner_pid)
        else:
            self._ss = None
            self._owner = False

    # -- data: the C methods, plus how the stream ended ------------------------
    #
    # The bytes move in C on the unix fd; these wrappers only look at the
    # end of the stream. A reset shows to the kernel's unix socket as EOF
    # unless the worker could hold a byte of ours unread (appgate), so on EOF
    # we ask how the connection ended (_end_errno) and raise its errno once,
    # as tcp_recvmsg reports sk_err once and then 0. recvfrom/recvmsg report
    # no address, as TCP's do (the unix peer name is not the TCP peer).

    # -- UDP on the stack (shim/dgram.py) --------------------------------------

    def _udp_stack(self, host: str, for_bind: bool) -> tuple[Stack | None, str]:
        """(the stack, the address on it) if `host` is in its scope, else (None, host)."""
        stack = get_stack()
        if stack is None:
            return None, host
        view = stack.view()
        _check_denied(stack, view, (host, 0))
        if view is None:
            return None, host
        if for_bind:
            where, h = scope.bind_scope(host, view)
        else:
            where, h = scope.connect_scope(host, view)
        return (stack, h) if where == scope.STACK else (None, host)

    def _udp_parse(self, address: Any) -> tuple[str, int] | None:
        """(host, port) of a UDP address the stack could serve: IPv4 text on
        AF_INET; on AF_INET6 (only when the stack has IPv6) the IPv6 text,
        `::ffff:a.b.c.d` for IPv4 peers (the stack's AF_INET6 socket takes
        them v4-mapped, as Linux's)."""
        if self.family == AF_INET:
            return _parse_inet(address)
        stack = get_stack()
        view = stack.view() if stack is not None else None
        if view is None or not view.addrs6 or not isinstance(address, tuple) \
                or not 2 <= len(address) <= 4:
            return None
        host, port = address[0], address[1]
        if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            return None
        try:
            return gp.ip_str(host.split("%", 1)[0] or "::"), port
        except ValueError:
            return None

    @staticmethod
    def _udp_scope_host(host: str) -> str:
        """The address the scope judges: a v4-mapped one as IPv4."""
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host

    def _udp_bind(self, address: Any) -> None:
        parsed = self._udp_parse(address) if self._us is None else None
        if parsed is not None and self.family == AF_INET6 and "." in parsed[0]:
            parsed = None  # bound to a v4-mapped address: the kernel's
        stack, host = self._udp_stack(parsed[0] or "0.0.0.0", True) if parsed else (None, "")
        if stack is None:
            return super().bind(address)
        from shardstack.shim import dgram

        self._us = dgram.bind(self, stack, host, parsed[1], self._udp_v6_args())

    def _udp_v6_args(self) -> dict[str, Any]:
        if self.family != AF_INET6:
            return {}
        return {"v6": True, "v6only": bool((self._pre or {}).get((IPPROTO_IPV6, IPV6_V6ONLY)))}

    def _udp_autobind(self, host: str) -> Any:
        """The stack's UDP socket for a datagram to `host`, bound on first use
        (inet_autobind), or None: the kernel's."""
        if self._us is not None:
            return self._us
        if super().getsockname()[1] != 0:
            return None  # bound on the kernel already
        stack, _ = self._udp_stack(self._udp_scope_host(host), False)
        if stack is None:
            return None
        from shardstack.shim import dgram

        wild = "::" if self.family == AF_INET6 else "0.0.0.0"
        self._us = dgram.bind(self, stack, wild, 0, self._udp_v6_args())
        return self._us

    def _udp_connect(self, address: Any, raising: bool) -> int:
        parsed = self._udp_parse(address)
        us = self._udp_autobind(parsed[0]) if parsed else self._us
        if us is None:
            if raising:
                super().connect(address)
                return 0
            return super().connect_ex(address)
        from shardstack.shim import dgram

        dgram.connect(self, get_stack(), us, *_udp_dest(parsed))
        return 0

    def sendto(self, data: Any, *args: Any) -> int:
        if self._us is not None:
            self._check_open()
            if len(args) not in (1, 2):
                raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        if not self._dgram:
            if self._ss is not None and len(args) in (1, 2):
                # TCP ignores a destination (tcp_sendmsg reads no msg_name): the
                # unix stream underneath would refuse one with EISCONN.
                _check_address(self.family, args[-1])
                return self.send(data, *args[:-1])
            return super().sendto(data, *args)
        addr = args[-1]
        parsed = self._udp_parse(addr)
        us = self._udp_autobind(parsed[0]) if parsed else self._us
        if us is None:
            return super().sendto(data, *args)
        if parsed is None:
            _check_address(self.family, addr)  # malformed: CPython's own error
        from shardstack.shim import dgram

        return dgram.sendto(self, us, data, _udp_dest(parsed) if parsed else parsed)

    def _udp_recvmsg(self, bufsize: int, flags: int, fn: str) -> tuple[bytes, Any, int]:
        """A datagram off the stack: (data, address, msg_flags), after the
        argument checks CPython makes (TypeError, ValueError)."""
        from shardstack.shim import dgram

        bufsize, flags = operator.index(bufsize), operator.index(flags)
        if bufsize < 0:
            raise ValueError(f"negative buffersize in {fn}")
        self._check_open()
        return dgram.recvmsg(self, self._us, bufsize, flags)

    def _udp_recvfrom(self, bufsize: int, flags: int, fn: str = "recvfrom") -> tuple[bytes, Any]:
        data, addr, _mflags = self._udp_recvmsg(bufsize, flags, fn)
        return data, addr

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._us is not None:
            return self._udp_recvfrom(bufsize, flags, "recv")[0]
        try:
            data = _csocket.recv(self, bufsize, flags)
        except ConnectionResetError:
            self._reported()
            raise
        except OSError as e:
            raise self._unconnected(e, False) from None
        if not data and bufsize and self._ss is not None:
            self._at_end()
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._us is not None:
            return self.recvfrom_into(buffer, nbytes, flags)[0]
        try:
            n = _csocket.recv_into(self, buffer, nbytes, flags)
        except ConnectionResetError:
            self._reported()
            raise
        except OSError as e:
            raise self._unconnected(e, False) from None
        if not n and self._ss is not None and (nbytes or memoryview(buffer).nbytes):
            self._at_end()
        return n

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        if self._us is not None:
            return self._udp_recvfrom(bufsize, flags)
        if self._ss is None:
            return _csocket.recvfrom(self, bufsize, flags)
        return self.recv(bufsize, flags), None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        if self._us is not None:
            mv = memoryview(buffer).cast("B")
            nbytes = operator.index(nbytes)
            if nbytes < 0:
                raise ValueError("negative buffersize in recvfrom_into")
            if nbytes > len(mv):
                raise ValueError("nbytes is greater than the length of the buffer")
            data, addr = self._udp_recvfrom(nbytes or len(mv), flags, "recvfrom_into")
            mv[:len(data)] = data
            return len(data), addr
        if self._ss is None:
            return _csocket.recvfrom_into(self, buffer, nbytes, flags)
        return self.recv_into(buffer, nbytes, flags), None

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple:
        if self._us is not None:
            if operator.index(ancbufsize) < 0 or operator.index(bufsize) < 0:
                raise ValueError("negative buffer size in recvmsg()")
            data, addr, mflags = self._udp_recvmsg(bufsize, flags, "recvmsg")
            return data, [], mflags, addr
        try:
            data, anc, mflags, addr = _csocket.recvmsg(self, bufsize, ancbufsize, flags)
        except OSError as e:
            raise self._unconnected(e, False) from None
        if self._ss is None:
            return data, anc, mflags, addr
        if not data and bufsize:
            self._at_end()
        return data, anc, mflags, None

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple:
        if self._us is not None:
            views = [memoryview(b).cast("B") for b in buffers]
            if any(v.readonly for v in views):
                raise TypeError("recvmsg_into() argument 1 must be an iterable of "
                                "single-segment read-write buffers")
            if operator.index(ancbufsize) < 0:
                raise ValueError("negative buffer size in recvmsg_into()")
            data, addr, mflags = self._udp_recvmsg(sum(len(v) for v in views), flags,
                                                   "recvmsg_into")
            at = 0
            for v in views:  # scatter, as readv does
                part = data[at:at + len(v)]
                v[:len(part)] = part
                at += len(part)
            return len(data), [], mflags, addr
        try:
            n, anc, mflags, addr = _csocket.recvmsg_into(self, buffers, ancbufsize, flags)
        except OSError as e:
            raise self._unconnected(e, False) from None
        if self._ss is None:
            return n, anc, mflags, addr
        if not n:
            self._at_end()
        return n, anc, mflags, None

    def send(self, data: Any, flags: int = 0) -> int:
        if self._us is not None:
            from shardstack.shim import dgram

            self._check_open()
            return dgram.sendto(self, self._us, data, None)
        try:
            return _csocket.send(self, data, flags)
        except BrokenPipeError:
            self._at_end(broken=True)
            raise
        except OSError as e:
            raise self._unconnected(e, True) from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._us is not None:
            self.send(data, flags)
            return
        try:
            _csocket.sendall(self, data, flags)
        except BrokenPipeError:
            self._at_end(broken=True)
            raise
        except OSError as e:
            raise self._unconnected(e, True) from None

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        if self._dgram and self._us is None and address is not None:
            parsed = self._udp_parse(address)
            if parsed is not None:
                self._udp_autobind(parsed[0])  # on the stack if the scope says so
        if self._dgram and self._us is not None:
            self._check_open()
            buffers, ancdata = list(buffers), list(ancdata)
            _check_sendmsg_args(self.family, buffers, ancdata, flags)
            data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            if address is None:
                return self.send(data)
            return self.sendto(data, address)
        try:
            if address is not None and self._ss is not None:
                _check_address(self.family, address)
            if address is None or self._ss is not None:
                return _csocket.sendmsg(self, buffers, ancdata, flags)  # TCP: no msg_name
            return _csocket.sendmsg(self, buffers, ancdata, flags, address)
        except BrokenPipeError:
            self._at_end(broken=True)
            raise
        except OSError as e:
            raise self._unconnected(e, True) from None

    def _unconnected(self, e: OSError, sending: bool) -> OSError:
        """A bound or listening stack socket's fd is an unconnected AF_UNIX
        socket, whose errnos differ from TCP's: send EPIPE, recv ENOTCONN, as
        tcp_sendmsg/tcp_recvmsg answer a socket with no connection."""
        st = self._ss
        if st is None or st.kind not in (BOUND, LISTENER) or e.errno not in _UNIX_UNCONNECTED:
            return e
        return _oserror(errno.EPIPE if sending else errno.ENOTCONN)

    def _reported(self) -> None:
        """The kernel itself raised ECONNRESET (appgate held a byte back): that was the report."""
        if self._ss is not None:
            self._ss.ended = True

    def _at_end(self, broken: bool = False) -> None:
        """The unix stream ended (EOF, or EPIPE on send): raise the TCP
        connection's errno if it died, once; return for a clean end."""
        st = self._ss
        if st is None or st.kind not in (ACTIVE, PASSIVE) or st.ended:
            return
        if st.status == CONNECTING:
            self._refresh()
        err, final = self._end_errno(st, broken)
        # A clean end is final only once the connection is gone: after the
        # peer's FIN, or an EPIPE of our own SHUT_WR, a later RST is still
        # reported once, as tcp_recvmsg reports sk_err after EOF.
        st.ended = final or bool(err)
        if err:
            raise _oserror(err)

    def _end_errno(self, st: StackState, broken: bool) -> tuple[int, bool]:
        """The errno to report at the stream's end (0: a clean end), and
        whether nothing can follow it (the connection is gone)."""
        if st.status == FAILED and st.err:
            err, st.err = st.err, 0
            return err, True
        p = select.poll()
        p.register(self.fileno(), select.POLLIN | select.POLLPRI)
        ev = 0
        for _fd, e in p.poll(0):
            ev = e
        if ev & select.POLLPRI:
            self._take_oob(st)  # the worker's errno byte, if no read passed it yet
            if st.err:
                err, st.err = st.err, 0
                return err, True
        if not (ev & select.POLLHUP or broken):
            # Only the worker's write side is shut: the peer's FIN, a clean EOF.
            return 0, False
        # The worker's end is closed: a reset or timeout, unless the app shut
        # its own side down first and both FINs went through. Ask the worker.
        stack = get_stack()
        if stack is None or st.worker < 0:
            return 0, True
        req = {"op": "status", "token": st.token}
        try:
            r = stack.worker_call(st.worker, req)
        except OSError:
            # A cached ctl stream to a worker that has since died breaks here;
            # ask its replacement once (docs/howto.md "When a worker dies").
            try:
                r = stack.worker_call(st.worker, req)
            except OSError:
                # W is closed and no worker answers for it: the worker holding
                # the connection died (and is not back yet). Its TCP state is
                # gone; the peer will be reset: so is the app.
                return errno.ECONNRESET, True
        return int(r.get("errno") or 0), not r.get("alive", False)

    # -- names ----------------------------------------------------------------

    def _check_open(self) -> None:
        """What the kernel answers a closed fd; the names and options a stack
        socket keeps here would outlive it."""
        if self.fileno() < 0:
            raise _oserror(errno.EBADF)

    def getsockname(self) -> Any:
        if self._us is not None:
            self._check_open()
            return self._us.name(self._us.laddr, self._us.lport)
        st = self._ss
        if st is None:
            return super().getsockname()
        self._check_open()
        return _face(self.family, *st.sockname)

    def getpeername(self) -> Any:
        if self._us is not None:
            self._check_open()
            if not self._us.rport:
                raise _oserror(errno.ENOTCONN)
            return self._us.name(self._us.raddr, self._us.rport)
        st = self._ss
        if st is None:
            return super().getpeername()
        self._check_open()
        if st.kind in (ACTIVE, PASSIVE):
            self._refresh()
            if st.status == ESTABLISHED or st.kind == PASSIVE:
                return _face(self.family, *st.peername)
        raise _oserror(errno.ENOTCONN)

    # -- options --------------------------------------------------------------

    def setsockopt(self, level: int, opt: int, value: Any, optlen: int | None = None) -> None:
        if self._us is not None and level != SOL_SOCKET:
            if level == _socket_mod.IPPROTO_IP and opt in _MULTICAST_OPTS:
                # The stack has no multicast: say so rather than never deliver.
                raise _oserror(errno.ENOPROTOOPT, "shardstack: no multicast on the stack")
            self._record(level, opt, value)  # other IP options of a stack UDP socket: remembered
            return
        st = self._ss
        if st is None:
            if optlen is None:
                super().setsockopt(level, opt, value)
            else:
                super().setsockopt(level, opt, value, optlen)
            if self._cand or self._dgram:
                self._record(level, opt, value)
            return
        self._check_open()
        self._kernel_check(level, opt, value, optlen)
        self._record(level, opt, value)
        if (level, opt) in _LOCAL_ONLY:
            pass
        elif level == SOL_SOCKET and opt in (_socket_mod.SO_RCVBUF, _socket_mod.SO_SNDBUF):
            if not (st.kind == ACTIVE and st.status == CONNECTING):
                super().setsockopt(level, opt, value)  # the unix buffers are the TCP buffers' bound
        elif level == SOL_SOCKET and opt not in gp.SOL_FORWARDED:
            if optlen is None:
                super().setsockopt(level, opt, value)
            else:
                super().setsockopt(level, opt, value, optlen)
        forwarded = (level == IPPROTO_TCP and opt in gp.TCP_FORWARDED) or (
            level == SOL_SOCKET and opt in gp.SOL_FORWARDED)
        if forwarded and st.kind in (ACTIVE, PASSIVE) and st.status != FAILED:
            get_stack().worker_call(st.worker, {"op": "setsockopt", "token": st.token,
                                                "level": level, "opt": opt,
                                                "value": _wire_value(opt, value)})

    def _kernel_check(self, level: int, opt: int, value: Any, optlen: int | None) -> None:
        """Refuse what Linux refuses (a value out of range, a short buffer, a
        str) with its errno or TypeError: the same call on a fresh kernel TCP
        socket of our family is the check. Only the value is judged there; the
        stack applies it."""
        if level not in _KERNEL_CHECKED or (level, opt) in _ENGINE_CHECKED:
            return
        try:
            probe = kernel_socket(self.family, SOCK_STREAM | _socket_mod.SOCK_CLOEXEC)
        except OSError:
            return  # out of fds: no check rather than a setsockopt that fails oddly
        with probe:
            try:
                if optlen is None:
                    probe.setsockopt(level, opt, value)
                else:
                    probe.setsockopt(level, opt, value, optlen)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES):  # a privilege, not a value
                    raise

    def getsockopt(self, level: int, opt: int, buflen: int | None = None) -> Any:
        if self._us is not None:
            return self._udp_getsockopt(level, opt, buflen)
        st = self._ss
        if st is None:
            if buflen is None:
                return super().getsockopt(level, opt)
            return super().getsockopt(level, opt, buflen)
        if buflen is not None and not 0 <= buflen <= 1024:
            raise OSError("getsockopt buflen out of range")  # CPython's own check, no errno
        self._check_open()
        if level == IPPROTO_TCP and opt == TCP_INFO:
            value = self._tcp_info(st)
        else:
            value = self._stack_getsockopt(st, level, opt)
        if not buflen:
            # No buffer: CPython asks the kernel for one int, and the kernel
            # copies that much of a larger value (TCP_INFO: state, ca_state,
            # retransmits, probes; SO_LINGER: l_onoff).
            if isinstance(value, bytes):
                return int.from_bytes(value[:4].ljust(4, b"\0"), sys.byteorder, signed=True)
            return value
        if isinstance(value, bytes):
            return value[:buflen]  # the kernel copies min(len, size)
        return struct.pack("i", int(value))[:buflen]

    def _udp_getsockopt(self, level: int, opt: int, buflen: int | None) -> Any:
        """A stack UDP socket's options: what a kernel UDP socket answers for
        its identity, what was set for the rest (the unix fd for buffers)."""
        if level == SOL_SOCKET:
            if opt == SO_DOMAIN:
                return self.family
            if opt == SO_PROTOCOL:
                return _socket_mod.IPPROTO_UDP
        elif (level, opt) in (self._pre or {}):
            return self._pre[(level, opt)]
        else:
            raise _oserror(errno.ENOPROTOOPT)
        if buflen is None:
            return super().getsockopt(level, opt)
        return super().getsockopt(level, opt, buflen)

    def _tcp_info(self, st: StackState) -> bytes:
        """TCP_INFO: the worker's `tcp_get_info` for a connection; a
        listener's accept queue from its unix listener; Linux's answer for
        a closed socket otherwise (bound only, failed, or already let go by
        the worker). As long as the running kernel's struct tcp_info."""
        from shardstack.core import tcp_info

        info = None
        if st.kind == LISTENER:
            queued, backlog = _unix_listen_queue(self.fileno()) or (0, 0)
            info = tcp_info.tcp_listen_info(queued, backlog)
        elif st.kind in (ACTIVE, PASSIVE) and st.worker >= 0:
            stack = get_stack()
            try:
                if stack is not None:
                    r = stack.worker_call(st.worker, {"op": "getsockopt", "token": st.token,
                                                      "level": IPPROTO_TCP, "opt": TCP_INFO})
                    info = bytes(r["value"])
            except (OSError, KeyError, TypeError):
                info = None  # EBADF: the worker let the connection go (closed, reset)
        if info is None:
            from shardstack.core.sock import TcpSock

            info = tcp_info.tcp_get_info(TcpSock(0), 0.0)
        n = _kernel_tcp_info_len()
        return info[:n].ljust(n, b"\0")

    def _stack_getsockopt(self, st: StackState, level: int, opt: int) -> Any:
        if level == SOL_SOCKET:
            if opt == _socket_mod.SO_ERROR:
                return self._pop_error()
            if opt == _socket_mod.SO_TYPE:
                return int(SOCK_STREAM)
            if opt == SO_DOMAIN:
                return int(self.family)
            if opt == SO_PROTOCOL:
                return int(_socket_mod.IPPROTO_TCP)
            if opt == _socket_mod.SO_ACCEPTCONN:
                return int(st.kind == LISTENER)
            if opt == _socket_mod.SO_LINGER:
                v = (self._pre or {}).get((level, opt), b"\0" * 8)
                return v if isinstance(v, bytes) else _LINGER.pack(*v)
            if opt in (_socket_mod.SO_RCVBUF, _socket_mod.SO_SNDBUF):
                asked = (self._pre or {}).get((level, opt))
                if asked is not None:
                    return _kernel_readback(self.family, level, opt, asked)
                if not (st.kind == ACTIVE and st.status == CONNECTING):
                    return super().getsockopt(level, opt)
        if ((level, opt) in _FROM_ENGINE
                and st.kind in (ACTIVE, PASSIVE) and st.status == ESTABLISHED):
            try:
                r = get_stack().worker_call(st.worker, {"op": "getsockopt", "token": st.token,
                                                        "level": level, "opt": opt})
                v = r["value"]
                return _ca_name(v) if isinstance(v, bytes) else v
            except OSError:
                pass
        if (level, opt) in (self._pre or {}):
            v = self._pre[(level, opt)]
            if (level, opt) == (IPPROTO_TCP, _TCP_LINGER2) and isinstance(v, int):
                # Linux (do_tcp_getsockopt): 0 reads as tcp_fin_timeout,
                # negative as -1, more than TCP_FIN_TIMEOUT_MAX as 120.
                return -1 if v < 0 else min(v, 120) if v else 60
            if (level, opt) == (_socket_mod.IPPROTO_IP, _socket_mod.IP_TTL) and v == -1:
                return 64  # -1: back to net.ipv4.ip_default_ttl
            if isinstance(v, str):
                v = v.encode()
            if (level, opt) == (IPPROTO_TCP, _socket_mod.TCP_CONGESTION) and isinstance(v, bytes):
                return _ca_name(v)
            return int(bool(v)) if opt in _BOOLEAN.get(level, ()) else v
        if (level, opt) in _DEFAULTS:
            return _DEFAULTS[(level, opt)]
        if level == SOL_SOCKET:
            return super().getsockopt(level, opt)
        raise _oserror(errno.ENOPROTOOPT)

    # -- lifetime -------------------------------------------------------------

    def _real_close(self, _ss: Any = kernel_socket) -> None:
        if self._us is not None and self.fileno() >= 0:
            from shardstack.shim import dgram

            dgram.close(self._us)
        st = self._ss
        linger = 0
        if st is not None and self.fileno() >= 0:
            linger = self._linger_time(st)
            if self._owner and st.kind in (BOUND, LISTENER) and st.owner_pid == os.getpid():
                self._release(st)
            if self._owner:
                # Only the creating object forgets the fd: dup()s and fromfd()s
                # closing must not strand the original (inode numbers of
                # sockets do not come back soon: get_next_ino).
                _unregister(self.fileno())
        super()._real_close()
        if linger:
            _linger_wait(st, linger)

    def _linger_time(self, st: StackState) -> int:
        """Seconds close() waits for the FIN to be acknowledged: SO_LINGER
        {1, N > 0} on an established connection, else 0. Linux waits in
        tcp_close (sk_stream_wait_close) whether or not the fd is
        non-blocking (measured on 6.18); {1, 0} is an abort, no wait."""
        if st.kind not in (ACTIVE, PASSIVE) or st.worker < 0:
            return 0
        v = (self._pre or {}).get((SOL_SOCKET, _socket_mod.SO_LINGER))
        if isinstance(v, (bytes, bytearray)) and len(v) >= _LINGER.size:
            v = _LINGER.unpack_from(v)
        if not isinstance(v, (tuple, list)) or len(v) != 2 or not v[0] or int(v[1]) <= 0:
            return 0
        self._refresh()
        return int(v[1]) if st.status == ESTABLISHED else 0

    def _release(self, st: StackState) -> None:
        stack = get_stack()
        freed = True
        if stack is not None and st.bind_id is not None:
            try:
                freed = bool(stack.call("release", bind_id=st.bind_id).get("freed", True))
            except OSError:
                pass  # the stack is gone or already released it: nothing to give back
        if st.path and freed:
            _unlink(st.path)  # not while another process still listens there
        st.bind_id = None

    def dup(self) -> ShimSocket:
        s = super().dup()
        if s._ss is None and self._ss is not None:
            s._ss = self._ss
        s._pre = dict(self._pre) if self._pre else None
        s._disconnected = self._disconnected
        return s

    def __getstate__(self) -> Any:
        raise TypeError(f"cannot pickle {self.__class__.__name__!r} object")


def closed_elsewhere(sock: ShimSocket, ino: int) -> None:
    """C code (libuv, given the fd with `sock=`) closed a stack socket's fd
    itself: do what `close()` does besides closing the fd (give a bind back,
    forget the registry entry of inode `ino`), then let go of the number,
    which may already belong to someone else. No lingering wait: the fd is
    gone already."""
    st = sock._ss
    if st is not None and sock._owner:
        if st.kind in (BOUND, LISTENER) and st.owner_pid == os.getpid():
            sock._release(st)
        with _REG_LOCK:
            _REGISTRY.pop(ino, None)
    sock.detach()


def _kernel_readback(family: int, level: int, opt: int, value: Any) -> Any:
    """What Linux reads back after this set (SO_RCVBUF: doubled, clamped to
    rmem_max and the minimum), from a fresh kernel TCP socket."""
    with kernel_socket(family, SOCK_STREAM | _socket_mod.SOCK_CLOEXEC) as probe:
        probe.setsockopt(level, opt, value)
        return probe.getsockopt(level, opt)


def _linger_wait(st: StackState, secs: int) -> None:
    """A lingering close(), after the fd is closed: ask the worker, on a
    stream of its own, to answer once the FIN is acknowledged (gateproto
    "linger"), and wait for that at most `secs` seconds. Running out of time
    is no error: Linux's close() then returns 0 and the close goes on in the
    background, as the shard's does."""
    stack = get_stack()
    if stack is None:
        return
    deadline = time.monotonic() + secs
    a = kernel_socket(AF_UNIX, SOCK_STREAM | _socket_mod.SOCK_CLOEXEC)
    try:
        a.settimeout(secs)
        a.connect(stack.worker_path(st.worker))
        a.sendall(gp.pack({"op": "linger", "token": st.token, "timeout": secs}))
        a.settimeout(max(deadline - time.monotonic(), 0.001))
        read_frame(a, bytearray())
    except (OSError, gp.ProtoError):
        pass  # timed out, or the worker is gone: nothing left to wait for
    finally:
        a.close()


_TCP_INFO_LEN: int | None = None


def _kernel_tcp_info_len() -> int:
    """sizeof(struct tcp_info) of the running kernel (it grows with new
    kernels): a stack socket's TCP_INFO is that long, as a kernel socket's
    is, zero-filled past the fields the engine knows."""
    global _TCP_INFO_LEN
    if _TCP_INFO_LEN is None:
        from shardstack.core.tcp_info import TCP_INFO_LEN

        n = TCP_INFO_LEN
        try:
            with kernel_socket(AF_INET, SOCK_STREAM) as k:
                n = len(k.getsockopt(IPPROTO_TCP, TCP_INFO, 1024))
        except OSError:
            pass
        _TCP_INFO_LEN = n
    return _TCP_INFO_LEN


# sock_diag (linux/sock_diag.h, linux/unix_diag.h): the one interface that
# reports how many connections wait in a unix listener's queue.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = 16  # family, type, state, pad, ino, cookie[2]


def _unix_listen_queue(fd: int) -> tuple[int, int] | None:
    """(connections waiting to be accepted, backlog) of the unix listener
    `fd`, which is a stack listener's accept queue; None if unavailable."""
    try:
        ino = os.fstat(fd).st_ino
        req = _UNIX_DIAG_REQ.pack(AF_UNIX, 0, 0, 1 << _TCP_LISTEN, ino, _UDIAG_SHOW_RQLEN,
                                  0xFFFFFFFF, 0xFFFFFFFF)
        msg = _NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req
        with kernel_socket(_socket_mod.AF_NETLINK, _socket_mod.SOCK_DGRAM,
                           _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.send(msg)
            reply = nl.recv(8192)
    except (OSError, AttributeError):
        return None
    if len(reply) < _NLMSG.size:
        return None
    length, kind = _NLMSG.unpack_from(reply)[:2]
    if kind == _NLMSG_ERROR:
        return None
    end = min(length, len(reply))
    off = _NLMSG.size + _UNIX_DIAG_MSG
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", reply, off)
        if alen < 4:
            return None
        if atype == _UNIX_DIAG_RQLEN and alen >= 12:
            rq, wq = struct.unpack_from("=II", reply, off + 4)
            return rq, wq
        off += (alen + 3) & ~3
    return None


_MULTICAST_OPTS = {getattr(_socket_mod, n) for n in (
    "IP_ADD_MEMBERSHIP", "IP_DROP_MEMBERSHIP", "IP_ADD_SOURCE_MEMBERSHIP",
    "IP_DROP_SOURCE_MEMBERSHIP", "IP_MULTICAST_IF") if hasattr(_socket_mod, n)}

_BOOLEAN = {
    IPPROTO_TCP: {_socket_mod.TCP_NODELAY},
    SOL_SOCKET: {_socket_mod.SO_KEEPALIVE, _socket_mod.SO_REUSEADDR, _socket_mod.SO_REUSEPORT},
}


def _wire_value(opt: int, value: Any) -> Any:
    """An option value as msgpack can carry it (SO_LINGER: [onoff, seconds])."""
    if isinstance(value, (bytes, bytearray)):
        if opt == _socket_mod.SO_LINGER and len(value) >= _LINGER.size:
            return list(_LINGER.unpack_from(value))
        return bytes(value)
    return value


_NO_STATE = object()


def ssl_socket_class() -> type:
    """An ssl.SSLSocket that keeps the TCP face of a stack socket it wraps.

    `ssl` imported before install() (asyncio imports it) built SSLSocket on
    the kernel's socket class, whose getpeername() would parse the unix
    address as AF_INET. install() points SSLContext.sslsocket_class here.
    """
    import ssl

    class ShimSSLSocket(ssl.SSLSocket):
        def _shim_state(self) -> StackState | None:
            st = self.__dict__.get("_shim_st", _NO_STATE)
            if st is _NO_STATE:
                st = None
                if self.family in _FACES and self.fileno() >= 0:
                    try:
                        if _fd_domain(self.fileno()) == AF_UNIX:
                            st = recover_state(self.fileno())
                    except OSError:
                        st = None
                self.__dict__["_shim_st"] = st
            return st

        def getsockname(self) -> Any:
            st = self._shim_state()
            return super().getsockname() if st is None else _face(self.family, *st.sockname)

        def getpeername(self) -> Any:
            st = self._shim_state()
            if st is None:
                return super().getpeername()
            if st.kind in (ACTIVE, PASSIVE):
                return _face(self.family, *st.peername)
            raise _oserror(errno.ENOTCONN)

    return ShimSSLSocket
