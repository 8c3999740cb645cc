"""The worker-side half of the shim: shard sockets <-> AF_UNIX streams.

Each TCP connection an application owns is one AF_UNIX stream (app end A,
worker end W, see shardstack.shim.gateproto); each listening socket is an
AF_UNIX listener the app holds. This module moves bytes between a shard
descriptor and W, both ways, with the unix socket buffers as the only queues:

- shard -> app: `shard.recv` only while W accepts bytes; a full W (the app is
  not reading) stops the recv, the shard's receive queue fills and the TCP
  window shrinks, as a slow reader does to Linux (tcp_rcv_space_adjust).
- app -> shard: W is read only while the shard takes bytes; a full shard send
  buffer stops reading W, A's send buffer fills, and the app's send() blocks
  (or EAGAINs) as it would on a full tcp_sendmsg.

Why W is read with MSG_PEEK (SO_PEEK_OFF) and consumed lazily, one byte late:
the kernel gives an AF_UNIX stream socket ECONNRESET only when its peer
closes while still holding unread bytes from it (unix_release_sock). To make
a TCP RST surface as ECONNRESET in the app's recv()/send() (whatever C code
calls them), W keeps the last byte it has already forwarded unread when that
is cheap (it came in a small write, see _pump_up), and on RST closes W
without consuming it. A clean close consumes everything first, so the app
sees an ordinary EOF. An active open starts with such a byte (the filler
below); after that, a connection whose app last wrote a small message (a
request, a command) has one. The exact errno also goes as one MSG_OOB byte,
which the shim's getsockopt(SO_ERROR) reads.

Why the worker fills the app's socket on an active open: an event loop waits
for a connecting socket to become writable (asyncio's _sock_connect_cb), so
A must not be writable until the handshake ends. The shim passes A's fd along
with the connect request (SCM_RIGHTS); the worker shrinks A's SO_SNDBUF and
writes from A into W until EAGAIN, then answers. Because the worker itself
wrote the filler it knows its exact length and drains exactly that when the
handshake completes (Connected); it restores A's SO_SNDBUF then, and A turns
writable. On a refused or timed-out handshake it sends the errno out of band
and closes W with the filler unread.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shardstack.core.events import (
    Acceptable,
    Closed,
    Connected,
    Readable,
    SocketError,
    Writable,
)
from shardstack.core.sock import State
from shardstack.core.tcp_info import tcp_get_info
from shardstack.core.udp import UdpDatagram, UdpError
from shardstack.shim import gateproto as gp
from shardstack.udpgate import UdpGate

CHUNK = 256 * 1024  # bytes per recv/send on either side: few, large syscalls
FILLER = bytes(64 * 1024)
MAX_FILL_ROUNDS = 64  # bound on the filler loop (each send moves >= 1 skb)
MAX_PUMP_ROUNDS = 16  # chunks moved per wake-up before yielding to the loop
LAG_MAX = 512  # keep the last byte back only after reads this small (see _pump_up)
ACCEPT_RETRY = 0.005  # s: first retry when the app's listener backlog is full
ACCEPT_RETRY_MAX = 0.2
DEAD_MAX = 4096  # how many dead connections' errnos the "status" ctl op remembers
# s: how often a lingering close() looks at its orphan's state (an orphan
# reports no events): every 2 ms at first, backing off to every 20 ms.
LINGER_POLL = 0.002
LINGER_POLL_MAX = 0.02
# close() with SO_LINGER waits while the socket is in these states (sk_stream_wait_close).
LINGER_STATES = frozenset({State.FIN_WAIT1, State.CLOSING, State.LAST_ACK})
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
_UCRED_SIZE = 12
_CMSG_FD = socket.CMSG_SPACE(array.array("i").itemsize)

# A GateConn's phase, as the TCP state it waits on: connecting (SYN-SENT) or
# established. Module aliases because the pumps test it every round and an
# Enum class attribute lookup costs ~150 ns on 3.11 against ~30 ns for a
# global (timeit, `conn.state is not State.ESTABLISHED` vs `... is not _ESTABLISHED`).
_SYN_SENT = State.SYN_SENT
_ESTABLISHED = State.ESTABLISHED
_DRAINED = object()  # _read_w: W has nothing more now


class _NotOurs(OSError):
    """A connect whose flow the RETA gives to worker `owner` (EAGAIN: ask there)."""

    def __init__(self, owner: int) -> None:
        super().__init__(errno.EAGAIN, "another worker's flow")
        self.owner = owner


@dataclass(slots=True, eq=False)
class GateConn:
    """One TCP connection: shard descriptor `sd` <-> worker end `w` of the app's stream."""

    sd: int
    w: socket.socket
    token: int
    state: State = _ESTABLISHED
    app: socket.socket | None = None  # our dup of A while connecting (filler trick)
    app_sndbuf: int = 0
    filler: int = 0  # filler bytes sitting unread in w
    inp: memoryview | None = None  # read from w (peeked), not yet taken by the shard
    out: memoryview | None = None  # taken from the shard, not yet written to w
    unconsumed: int = 0  # bytes peeked and forwarded but still queued in w
    edge: bool = True  # the last read of W ended at the end of its queue (an skb edge)
    streaming: bool = False  # the last round moved more than LAG_MAX: read W without peeking
    reading: bool = False
    writing: bool = False
    app_eof: bool = False  # A shut down its write side (FIN sent or to send)
    peer_eof: bool = False  # the peer's FIN reached A (w shut down for writing)


@dataclass(slots=True, eq=False)
class GateListener:
    """A listener installed by the supervisor: shard listener `sd` -> app path."""

    bind_id: int
    sd: int
    path: str
    addr: int
    port: int
    backlog: int
    pending: deque = field(default_factory=deque)  # (child_sd, w) waiting for the app's backlog
    retry: Any = None
    delay: float = ACCEPT_RETRY


@dataclass(slots=True, eq=False)
class Client:
    """A connection on worker-<i>.sock before (and for ctl: after) its first request."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    ctl: bool = False


@dataclass(slots=True)
class GateStats:
    active_opens: int = 0
    passive_opens: int = 0
    refused: int = 0  # handshakes that failed (ECONNREFUSED/ETIMEDOUT)
    resets: int = 0  # connections that died with an errno
    backlog_full: int = 0  # times an app's listener backlog was full
    denied: int = 0  # clients turned away by SO_PEERCRED
    bytes_up: int = 0  # app -> shard
    bytes_down: int = 0  # shard -> app


class AppGate:
    """Serve apps' sockets on one worker (docs/architecture.md "Runtime")."""

    def __init__(self, shard: Any, loop: Any, run_dir: str, worker_id: int,
                 flush: Callable[[], None]) -> None:
        self.shard = shard
        self.loop = loop
        self.run_dir = run_dir
        self.wid = worker_id
        self.flush = flush
        self.uid = os.geteuid()
        self.stats = GateStats()
        self.conns: dict[int, GateConn] = {}  # by shard descriptor
        self.tokens: dict[int, GateConn] = {}
        self.listeners: dict[int, GateListener] = {}  # by bind_id
        #: (laddr, lport, raddr, rport) -> the worker the RETA steers that
        #: flow's replies to (set by the worker; None: one worker, all ours).
        self.owner_of: Callable[[int, int, int, int], int] | None = None
        self.lsds: dict[int, GateListener] = {}  # by shard descriptor
        # token -> errno of established connections that died (RST, timeout),
        # for the shim's "status" query when its recv() meets EOF (_died).
        self.dead: OrderedDict[int, int] = OrderedDict()
        # token -> shard descriptor of connections the app closed (or both
        # sides finished) and the gate let go, for a lingering close() (_linger).
        self.closed: OrderedDict[int, int] = OrderedDict()
        # token -> worker id of connections migrated to another worker
        # (shardstack.migrate): their ctl requests are redirected there.
        self.moved: OrderedDict[int, int] = OrderedDict()
        # Tokens also name W in the abstract namespace, which every process
        # of this network namespace shares: the pid makes them unique among
        # live workers (two stacks side by side, a test's stack and the next).
        self._next_token = (os.getpid() << 32) | 1
        self._buf = bytearray(CHUNK)
        self._mv = memoryview(self._buf)
        self._scratch = bytearray(CHUNK)
        self.path = os.path.join(run_dir, f"worker-{worker_id}.sock")
        self.server = self._open_server()
        # W of each connection the app shut down (SHUT_WR) while the peer has
        # not: registered with no events, so epoll reports only the HUP that
        # A's close() raises (a shut-down W stays readable at EOF, which a
        # reader could not tell from a close). Linux's close() after
        # shutdown() is still tcp_close: an abort under SO_LINGER {1, 0}, the
        # orphan's FIN-WAIT-2 timeout otherwise.
        self._hup = select.epoll()
        self._hup_conns: dict[int, GateConn] = {}
        loop.add_reader(self._hup.fileno(), self._on_hup)
        self.udp = UdpGate(shard, loop, run_dir, worker_id, flush)  # UDP sockets (udpgate.py)

    # -- UDP (supervisor -> worker ctl ops; shardstack/udpgate.py) ----------------

    def add_udp(self, **args: Any) -> dict[str, Any]:
        return self.udp.add_udp(**args)

    def connect_udp(self, **args: Any) -> dict[str, Any]:
        return self.udp.connect_udp(**args)

    def remove_udp(self, **args: Any) -> dict[str, Any]:
        return self.udp.remove_udp(**args)

    # -- worker-<i>.sock ------------------------------------------------------

    def _open_server(self) -> socket.socket:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(1024)
        self.loop.add_reader(s.fileno(), self._on_client)
        return s

    def _on_client(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the app sees its connect() hang up
            sock.setblocking(False)
            if not self._allowed(sock):
                self.stats.denied += 1
                _try_send(sock, gp.pack({"ok": False, "errno": errno.EACCES,
                                         "error": "not the stack's user"}))
                sock.close()
                continue
            c = Client(sock)
            self.loop.add_reader(sock.fileno(), self._on_client_data, c)

    def _allowed(self, sock: socket.socket) -> bool:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED_SIZE)
        uid = int.from_bytes(raw[4:8], "little")
        return uid == self.uid or uid == 0

    def _on_client_data(self, c: Client) -> None:
        try:
            data, anc, _flags, _ = c.sock.recvmsg(65536, _CMSG_FD, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                c.fds.extend(fds)
        if not data:
            self._drop_client(c)
            return
        c.buf += data
        try:
            msgs = gp.unpack_frames(c.buf)
        except gp.ProtoError:
            self._drop_client(c)
            return
        for msg in msgs:
            if c.ctl:
                _try_send(c.sock, gp.pack(self._ctl(msg)))
                continue
            op = msg.get("op")
            if op == "ctl":
                c.ctl = True
                _try_send(c.sock, gp.pack({"ok": True, "worker": self.wid}))
            elif op == "connect":
                self.loop.remove_reader(c.sock.fileno())
                self._active_open(c, msg)
                return
            elif op == "linger":
                self.loop.remove_reader(c.sock.fileno())
                self._linger(c, msg)
                return
            else:
                _try_send(c.sock, gp.pack(_err(errno.EOPNOTSUPP, f"unknown op {op!r}")))
        if c.ctl:
            self.flush()

    def _drop_client(self, c: Client) -> None:
        self.loop.remove_reader(c.sock.fileno())
        for fd in c.fds:
            os.close(fd)
        c.sock.close()

    # -- active open ----------------------------------------------------------

    def _active_open(self, c: Client, msg: dict[str, Any]) -> None:
        """tcp_v4_connect on the shard for the app, then the filler trick."""
        w = c.sock
        app = self._take_app_fd(c)
        shard = self.shard
        now = time.monotonic()
        try:
            if app is None:
                raise OSError(errno.EINVAL, "connect request without the socket's fd")
            # an AF_INET6 socket to an IPv6 peer (the shim sends v4-mapped
            # destinations as IPv4: the AF_INET socket they behave as)
            sd = shard.socket(socket.AF_INET6 if msg.get("v6") else socket.AF_INET)
        except OSError as e:
            _try_send(w, gp.pack(_err(e.errno or errno.EIO, e.strerror)))
            w.close()
            if app is not None:
                app.close()
            return
        try:
            for level, opt, value in msg.get("opts", ()):
                _setopt_quietly(shard, sd, level, opt, value)
            baddr, bport = msg.get("baddr", 0), int(msg.get("bport", 0))
            if bport:
                self._check_owner(msg, bport)
            if baddr or bport:
                shard.bind(sd, gp.ip_int(baddr or 0), bport)
            shard.connect(sd, gp.ip_int(msg["addr"]), int(msg["port"]), now)
            laddr, lport = shard.getsockname(sd)
        except (OSError, KeyError, ValueError, TypeError) as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            shard.close(sd, now)
            reply = _err(code, os.strerror(code))
            if isinstance(e, _NotOurs):
                reply["owner"] = e.owner  # the shim asks there (_check_owner)
            _try_send(w, gp.pack(reply))
            w.close()
            app.close()
            self.flush()
            return
        conn = GateConn(sd, w, self._token(), state=_SYN_SENT, app=app)
        w.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        self._fill(conn)
        self._add(conn)
        self.stats.active_opens += 1
        _try_send(w, gp.pack({"ok": True, "laddr": gp.ip_str(laddr), "lport": lport,
                              "worker": self.wid, "token": conn.token}))
        self.flush()

    def _check_owner(self, msg: dict[str, Any], bport: int) -> None:
        """A connect from a port the app bound: its 4-tuple is fixed, so is
        the worker the RETA steers its replies to. The shim chose us from its
        copy of the RETA, which a bucket move may have made stale: if the flow
        is another worker's, say whose (the shim asks there), rather than
        open a connection whose SYN-ACK goes elsewhere and is reset."""
        if self.owner_of is None:
            return
        raddr = gp.ip_int(msg["addr"])
        laddr = gp.ip_int(msg.get("baddr") or 0)
        if not laddr:  # the wildcard: the source address connect() will take
            addrs = self.shard.cfg.addrs6 if raddr > 0xFFFFFFFF else self.shard.cfg.addrs
            laddr = addrs[0] if addrs else 0
        owner = self.owner_of(laddr, bport, raddr, int(msg["port"]))
        if owner != self.wid:
            raise _NotOurs(owner)

    def _take_app_fd(self, c: Client) -> socket.socket | None:
        fds, c.fds = c.fds, []
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            return None
        try:
            s = socket.socket(fileno=fds[0])
        except OSError:
            os.close(fds[0])
            return None
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            s.close()
            return None
        return s

    def _fill(self, conn: GateConn) -> None:
        """Make A unwritable: smallest SO_SNDBUF, then write from A into W until EAGAIN."""
        app = conn.app
        conn.app_sndbuf = app.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # clamped to SOCK_MIN_SNDBUF
        n = 0
        for _ in range(MAX_FILL_ROUNDS):
            try:
                n += app.send(FILLER, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
        conn.filler = n

    def _connected(self, conn: GateConn) -> None:
        """Handshake done: drain the filler (keeping one byte unread, see the
        module docstring), give A its SO_SNDBUF back: A turns writable."""
        keep = 1 if conn.filler else 0
        self._discard(conn.w, conn.filler - keep)
        if keep:
            conn.w.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, keep)
        conn.unconsumed = keep
        conn.filler = 0
        app, conn.app = conn.app, None
        if app is not None:
            try:
                app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(conn.app_sndbuf // 2, 1))
            except OSError:
                pass
            app.close()
        conn.state = _ESTABLISHED
        self._start_reading(conn)
        self._pump_down(conn)

    def _discard(self, w: socket.socket, n: int) -> None:
        scratch = self._scratch
        while n > 0:
            try:
                got = w.recv_into(scratch, min(n, len(scratch)))
            except (BlockingIOError, InterruptedError, ConnectionError):
                return
            if not got:
                return
            n -= got

    # -- passive open ---------------------------------------------------------

    def add_listener(self, bind_id: int, addr: int | str, port: int, backlog: int, path: str,
                     opts: Iterable[Any] = (), v6: bool = False, v6only: bool = False,
                     **_extra: Any) -> dict[str, Any]:
        """Install a listener on this shard; accepted connections go to `path`.
        `v6`: an AF_INET6 listener (`::` takes IPv4 too, v4-mapped, unless
        `v6only`)."""
        if bind_id in self.listeners:
            return {}
        shard = self.shard
        sd = shard.socket(socket.AF_INET6 if v6 else socket.AF_INET)
        try:
            if v6:
                shard.setsockopt(sd, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            shard.setsockopt(sd, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for level, opt, value in opts:
                _setopt_quietly(shard, sd, level, opt, value)
            shard.bind(sd, gp.ip_int(addr or 0), int(port))
            shard.listen(sd, int(backlog))
        except OSError:
            shard.close(sd, time.monotonic())
            raise
        lst = GateListener(bind_id, sd, path, gp.ip_int(addr or 0), int(port), int(backlog))
        self.listeners[bind_id] = lst
        self.lsds[sd] = lst
        return {}

    def remove_listener(self, bind_id: int, **_extra: Any) -> dict[str, Any]:
        lst = self.listeners.pop(bind_id, None)
        if lst is None:
            return {}
        self.lsds.pop(lst.sd, None)
        now = time.monotonic()
        if lst.retry is not None:
            lst.retry.cancel()
        while lst.pending:
            child, w, _token = lst.pending.popleft()
            w.close()
            self._abort_sd(child, now)
        self.shard.close(lst.sd, now)
        self.flush()
        return {}

    def _on_acceptable(self, lst: GateListener) -> None:
        """inet_csk_accept for the app: one unix connect per accepted child."""
        shard = self.shard
        while not lst.pending:
            got = shard.accept(lst.sd)
            if got is None:
                return
            child, (raddr, rport) = got
            laddr, lport = shard.getsockname(child)
            token = self._token()
            name = gp.encode_conn_name(gp.ConnName(self.wid, token, gp.ip_str(laddr), lport,
                                                   gp.ip_str(raddr), rport))
            w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC)
            w.bind(name)
            w.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            lst.pending.append((child, w, token))
            self._connect_pending(lst)

    def _connect_pending(self, lst: GateListener) -> None:
        lst.retry = None
        now = time.monotonic()
        while lst.pending:
            child, w, token = lst.pending[0]
            try:
                w.connect(lst.path)
            except (BlockingIOError, InterruptedError):
                # The app's backlog is full: its accept queue is full. Stop
                # taking children from the shard, whose own queue then fills
                # and drops SYNs as Linux does (tcp_conn_request).
                self.stats.backlog_full += 1
                lst.retry = self.loop.call_later(lst.delay, self._retry_pending, lst)
                lst.delay = min(lst.delay * 2, ACCEPT_RETRY_MAX)
                return
            except OSError:
                lst.pending.popleft()  # the app closed its listener: refuse with RST
                w.close()
                self._abort_sd(child, now)
                continue
            lst.pending.popleft()
            lst.delay = ACCEPT_RETRY
            conn = GateConn(child, w, token)
            self._add(conn)
            self.stats.passive_opens += 1
            self._start_reading(conn)
            self._pump_down(conn)

    def _retry_pending(self, lst: GateListener) -> None:
        if self.listeners.get(lst.bind_id) is not lst:
            return
        self._connect_pending(lst)
        self._on_acceptable(lst)
        self.flush()

    # -- events from the shard ------------------------------------------------

    def on_events(self, events: Iterable[Any]) -> None:
        """Dispatch the shard's events for descriptors this gate owns."""
        conns, lsds = self.conns, self.lsds
        for e in events:
            kind = type(e)
            if kind is UdpDatagram or kind is UdpError:  # UDP sds are udpgate's own numbers
                self.udp.on_event(e)
                continue
            conn = conns.get(e.sd)
            if conn is not None:
                if kind is Readable:
                    self._pump_down(conn)
                elif kind is Writable:
                    self._pump_up(conn)
                elif kind is Connected:
                    self._connected(conn)
                elif kind is SocketError:
                    self._died(conn, e.errno)
                elif kind is Closed:
                    self._forget(conn)
                    self._stop_reading(conn)
                    self._want_write(conn, False)
                    conn.w.close()
            elif kind is Acceptable:
                lst = lsds.get(e.sd)
                if lst is not None:
                    self._on_acceptable(lst)
        self.flush()

    # -- the pumps ------------------------------------------------------------

    def _pump_down(self, conn: GateConn) -> None:
        """shard -> app until the shard is empty or W is full (tcp_recvmsg)."""
        if conn.state is not _ESTABLISHED or conn.peer_eof:
            return
        w, shard, sd = conn.w, self.shard, conn.sd
        out = conn.out
        try:
            for _ in range(MAX_PUMP_ROUNDS):
                if out is None:
                    data = shard.recv(sd, CHUNK)
                    if data is None:
                        break
                    if not data:
                        self._peer_fin(conn)
                        return
                    out = memoryview(data)
                try:
                    n = w.send(out)
                except (BlockingIOError, InterruptedError):
                    n = 0
                self.stats.bytes_down += n
                if n < len(out):
                    out = out[n:]
                    break
                out = None
        except (BrokenPipeError, ConnectionResetError):
            self._app_gone(conn)
            return
        conn.out = out
        self._want_write(conn, out is not None)

    def _pump_up(self, conn: GateConn) -> None:
        """app -> shard until W is empty or the shard's send buffer is full."""
        if conn.state is not _ESTABLISHED or conn.app_eof:
            return
        shard, sd, now = self.shard, conn.sd, time.monotonic()
        inp = conn.inp
        if inp is not None:
            k = shard.send(sd, inp, now)
            self.stats.bytes_up += k
            if k < len(inp):
                conn.inp = inp[k:]
                self._stop_reading(conn)
                return
            conn.inp = None
        if conn.streaming and conn.unconsumed == 0:
            self._pump_up_bulk(conn, now)
            return
        w, buf, mv = conn.w, self._buf, self._mv
        total, drained = 0, False
        for _ in range(MAX_PUMP_ROUNDS):
            n = self._read_w(conn, w.recv_into, buf, CHUNK, socket.MSG_PEEK)
            if n is _DRAINED:
                drained = True
                break
            if n is None:
                return
            if n == 0:
                self._consume(conn, False)
                self._app_fin(conn)
                return
            conn.unconsumed += n
            total += n
            k = shard.send(sd, mv[:n], now)
            self.stats.bytes_up += k
            if k < n:
                conn.inp = memoryview(bytes(mv[k:n]))
                self._stop_reading(conn)
                break
        else:
            self.loop.call_soon(self._resume_up, conn)  # fairness: yield, come back
        # Keep a byte back only when it sits in a small skb: a held skb stays
        # charged to A's send buffer, and A is writable only while that
        # charge is under a quarter of SO_SNDBUF (unix_writable). Small means:
        # this round found a little data after a round that ended at the end
        # of the queue (so these bytes are whole skbs of their own).
        keep = drained and conn.edge and total <= LAG_MAX
        conn.edge = drained
        conn.streaming = total > LAG_MAX
        self._consume(conn, keep)
        if conn.inp is None:
            self._start_reading(conn)

    def _pump_up_bulk(self, conn: GateConn, now: float) -> None:
        """`_pump_up` while the app streams (the last round moved more than
        LAG_MAX bytes and nothing is held back): plain reads that consume W as they
        go, each chunk handed to the shard as the bytes object it arrived in.

        One kernel copy per byte instead of peek + discard + a copy into the
        send queue; measured, those were a third of a bulk sender's worker
        time. No byte is kept back here: a stream's last write is large, and
        the ECONNRESET trick is only kept for small ones anyway.
        """
        w, shard, sd = conn.w, self.shard, conn.sd
        total, drained = 0, False
        for _ in range(MAX_PUMP_ROUNDS):
            data = self._read_w(conn, w.recv, CHUNK)
            if data is _DRAINED:
                drained = True
                break
            if data is None:
                return
            if not data:
                self._app_fin(conn)
                return
            total += len(data)
            k = shard.send(sd, data, now)
            self.stats.bytes_up += k
            if k < len(data):
                conn.inp = memoryview(data)[k:]
                self._stop_reading(conn)
                break
        else:
            self.loop.call_soon(self._resume_up, conn)  # fairness: yield, come back
        conn.edge = drained
        conn.streaming = total > LAG_MAX  # small again: back to peeking
        if conn.inp is None:
            self._start_reading(conn)

    def _read_w(self, conn: GateConn, read: Callable[..., Any], *args: Any) -> Any:
        """One read of W: what `read` returned, _DRAINED when W is empty, or
        None when the app is gone (then already handled)."""
        try:
            return read(*args)
        except (BlockingIOError, InterruptedError):
            return _DRAINED
        except ConnectionResetError:
            # A was closed with bytes of ours unread: Linux answers a
            # close() with unread receive data by RST (tcp_close).
            self._app_gone(conn)
            return None

    def _resume_up(self, conn: GateConn) -> None:
        if self.conns.get(conn.sd) is conn:
            self._pump_up(conn)
            self.flush()

    def _consume(self, conn: GateConn, keep: bool) -> None:
        """Dequeue forwarded bytes from W, all but the last one if `keep` (module docstring)."""
        n = conn.unconsumed - (1 if keep else 0)
        if n > 0:
            self._discard(conn.w, n)
            conn.unconsumed -= n

    def _on_w_readable(self, conn: GateConn) -> None:
        self._pump_up(conn)
        self.flush()

    def _on_w_writable(self, conn: GateConn) -> None:
        self._pump_down(conn)
        self.flush()

    def _start_reading(self, conn: GateConn) -> None:
        if not conn.reading and not conn.app_eof:
            conn.reading = True
            self.loop.add_reader(conn.w.fileno(), self._on_w_readable, conn)

    def _stop_reading(self, conn: GateConn) -> None:
        if conn.reading:
            conn.reading = False
            self.loop.remove_reader(conn.w.fileno())

    def _want_write(self, conn: GateConn, on: bool) -> None:
        if on and not conn.writing:
            conn.writing = True
            self.loop.add_writer(conn.w.fileno(), self._on_w_writable, conn)
        elif not on and conn.writing:
            conn.writing = False
            self.loop.remove_writer(conn.w.fileno())

    # -- ends of a connection -------------------------------------------------

    def _peer_fin(self, conn: GateConn) -> None:
        """The peer's FIN, after all its data: EOF for the app (shutdown SHUT_WR on W)."""
        conn.peer_eof = True
        conn.out = None
        self._want_write(conn, False)
        try:
            conn.w.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if conn.app_eof:
            self._finish(conn)

    def _app_fin(self, conn: GateConn) -> None:
        """EOF on W: the app shut down (FIN) or closed (FIN, or RST per SO_LINGER 0)."""
        conn.app_eof = True
        self._stop_reading(conn)
        now = time.monotonic()
        if _hung_up(conn.w):
            self._app_closed(conn, now)
            return
        self.shard.shutdown(conn.sd, socket.SHUT_WR, now)
        if conn.peer_eof:
            self._finish(conn)
        else:
            fd = conn.w.fileno()
            self._hup.register(fd, 0)
            self._hup_conns[fd] = conn

    def _app_closed(self, conn: GateConn, now: float) -> None:
        """A is closed, not just shut down: close() semantics (tcp_close)."""
        self._forget(conn)
        self._closed(conn)
        self._want_write(conn, False)
        conn.w.close()
        self.shard.close(conn.sd, now)

    def _on_hup(self) -> None:
        """A shut-down connection's A was closed (see ``_hup``)."""
        now = time.monotonic()
        for fd, _ev in self._hup.poll(0):
            conn = self._hup_conns.get(fd)
            if conn is None:
                self._hup.unregister(fd)
            elif self.conns.get(conn.sd) is conn:
                self._app_closed(conn, now)
        self.flush()

    def _finish(self, conn: GateConn) -> None:
        """Both directions done cleanly: release W (nothing unread) and the shard socket."""
        self._consume_all(conn)
        self._forget(conn)
        self._closed(conn)
        self._stop_reading(conn)
        self._want_write(conn, False)
        conn.w.close()
        self.shard.close(conn.sd, time.monotonic())

    def _consume_all(self, conn: GateConn) -> None:
        if conn.unconsumed:
            self._discard(conn.w, conn.unconsumed)
            conn.unconsumed = 0

    def _app_gone(self, conn: GateConn) -> None:
        """The app closed A with our bytes unread: abort, as tcp_close does (RST)."""
        self._forget(conn)
        self._stop_reading(conn)
        self._want_write(conn, False)
        conn.w.close()
        self._abort_sd(conn.sd, time.monotonic())

    def _died(self, conn: GateConn, err: int) -> None:
        """RST, refused or timed-out handshake, retransmission timeout.

        One OOB byte carries the errno for the shim's SO_ERROR; closing W with
        bytes of A's still unread makes the kernel report ECONNRESET on A
        (unix_release_sock) to whatever reads or writes it next.
        """
        if conn.state is _SYN_SENT:
            self.stats.refused += 1
        else:
            self.stats.resets += 1
            # Recorded before W closes, so it is there when the app's
            # recv() meets the EOF and asks (ctl "status").
            self.dead[conn.token] = err or errno.ECONNRESET
            if len(self.dead) > DEAD_MAX:
                self.dead.popitem(last=False)
        if 0 < err < 256:
            try:
                conn.w.send(bytes((err,)), socket.MSG_OOB | socket.MSG_DONTWAIT)
            except OSError:
                pass  # no OOB support or W full: ECONNRESET/EOF alone will do
        self._forget(conn)
        self._stop_reading(conn)
        self._want_write(conn, False)
        conn.w.close()
        if conn.app is not None:
            conn.app.close()
            conn.app = None
        self.shard.close(conn.sd, time.monotonic())

    def _abort_sd(self, sd: int, now: float) -> None:
        """Close with SO_LINGER {1, 0}: RST (tcp_disconnect)."""
        try:
            self.shard.setsockopt(sd, socket.SOL_SOCKET, socket.SO_LINGER, (1, 0))
        except (OSError, TypeError, ValueError):
            pass
        self.shard.close(sd, now)

    # -- bookkeeping ----------------------------------------------------------

    def _token(self) -> int:
        t = self._next_token
        self._next_token = t + 1
        return t

    def _add(self, conn: GateConn) -> None:
        self.conns[conn.sd] = conn
        self.tokens[conn.token] = conn

    def _forget(self, conn: GateConn) -> None:
        if self.conns.get(conn.sd) is conn:
            del self.conns[conn.sd]
        self.tokens.pop(conn.token, None)
        fd = conn.w.fileno()
        if self._hup_conns.get(fd) is conn:
            del self._hup_conns[fd]
            self._hup.unregister(fd)

    def _closed(self, conn: GateConn) -> None:
        """The gate lets go of a connection whose shard socket closes
        gracefully: remember it for a lingering close() that asks late."""
        self.closed[conn.token] = conn.sd
        if len(self.closed) > DEAD_MAX:
            self.closed.popitem(last=False)

    # -- options (the per-process ctl stream) ---------------------------------

    def _ctl(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "status":
            return self._status(msg.get("token", -1))
        conn = self.tokens.get(msg.get("token", -1))
        if conn is None:
            moved = self.moved.get(msg.get("token", -1))
            if moved is not None:  # migrated: the shim asks there (shim.stack.worker_call)
                return {"ok": True, "moved": moved}
            return _err(errno.EBADF, "no such connection on this worker")
        try:
            if op == "setsockopt":
                value = msg["value"]
                if isinstance(value, list):
                    value = tuple(value)
                self.shard.setsockopt(conn.sd, int(msg["level"]), int(msg["opt"]), value)
                return {"ok": True}
            if op == "getsockopt":
                level, opt = int(msg["level"]), int(msg["opt"])
                if level == socket.IPPROTO_TCP and opt == TCP_INFO:
                    # Not a shard option: a read of the control block (tcp_get_info).
                    info = tcp_get_info(self.shard.sock(conn.sd), time.monotonic())
                    return {"ok": True, "value": info}
                value = self.shard.getsockopt(conn.sd, level, opt)
                if isinstance(value, tuple):
                    value = list(value)
                return {"ok": True, "value": value}
        except OSError as e:
            return _err(e.errno or errno.EIO, e.strerror)
        except (KeyError, TypeError, ValueError) as e:
            return _err(errno.EINVAL, repr(e))
        return _err(errno.EOPNOTSUPP, f"unknown op {op!r}")

    def _status(self, token: Any) -> dict[str, Any]:
        """How connection `token` ended: the errno it died of (once), or 0.

        The app's end cannot carry it: the OOB byte _died sends is dropped by
        the very read that returns EOF (a non-OOB read skips the mark), and
        the kernel's own ECONNRESET needs a byte of A's held unread in W,
        which a connection whose app never wrote, or last wrote a lot, has not.
        """
        if not isinstance(token, int):
            return {"ok": True, "errno": 0, "alive": False}
        if token in self.tokens or token in self.dead:  # ours, or adopted (migrated in)
            return {"ok": True, "errno": self.dead.pop(token, 0), "alive": token in self.tokens}
        if token in self.moved:
            return {"ok": True, "moved": self.moved[token]}
        if token >> 32 != self._next_token >> 32:
            # A token of this worker's previous process (tokens carry the pid,
            # _token): its connections died with it, unannounced, as a host
            # that lost its state; the peer gets RST on its next segment
            # (Linux's answer to a segment for no socket). Report the reset.
            return {"ok": True, "errno": errno.ECONNRESET, "alive": False}
        err = self.dead.pop(token, 0)
        return {"ok": True, "errno": err, "alive": token in self.tokens}

    # -- SO_LINGER: a close() that waits (the "linger" request) -----------------

    def _linger(self, c: Client, msg: dict[str, Any]) -> None:
        """`{"op": "linger", token, timeout}`, sent by the shim right after it
        closed A with SO_LINGER {1, N > 0}: answer `{ok, done, state}` once the
        connection has left FIN-WAIT-1/CLOSING/LAST-ACK, i.e. everything the
        app sent and its FIN are acknowledged (done), or after `timeout`
        seconds (not done), then hang up. Linux's close() blocks the same
        way (tcp_close -> sk_stream_wait_close), and carries on with the
        close in the background after the timeout, as the shard does.

        On its own stream (one per lingering close), so the per-process ctl
        stream stays free meanwhile. The wait only applies to the last
        close of A: if A is still open elsewhere (a dup, a forked child), W
        sees no hang-up and the answer comes at once, as Linux closes only
        the file's last reference.
        """
        for fd in c.fds:
            os.close(fd)
        c.fds = []
        token = msg.get("token")
        try:
            timeout = min(max(float(msg.get("timeout", 0)), 0.0), 3600.0)
        except (TypeError, ValueError):
            timeout = 0.0
        conn = self.tokens.get(token) if isinstance(token, int) else None
        if conn is not None:
            sd = conn.sd
            if conn.state is not _ESTABLISHED or not _hung_up(conn.w):
                # Still connecting (close in SYN-SENT does not wait), or A is
                # open elsewhere: this was not the last close.
                self._linger_reply(c, sd, True)
                return
        else:
            sd = self.closed.get(token, -1) if isinstance(token, int) else -1
        self._linger_poll(c, sd, time.monotonic() + timeout, LINGER_POLL)

    def _linger_poll(self, c: Client, sd: int, deadline: float, delay: float) -> None:
        done = self._linger_done(sd)
        now = time.monotonic()
        if done or now >= deadline:
            self._linger_reply(c, sd, done)
            return
        self.loop.call_later(min(delay, deadline - now), self._linger_poll, c, sd, deadline,
                             min(delay * 1.5, LINGER_POLL_MAX))

    def _linger_done(self, sd: int) -> bool:
        """The close is over as far as a lingering close() cares: the app's
        FIN is queued (the gate saw A's EOF) and acknowledged."""
        conn = self.conns.get(sd)
        if conn is not None and not conn.app_eof:
            return False  # A's last bytes and its EOF are still on their way up
        sk = self._shard_sock(sd)
        return sk is None or sk.state not in LINGER_STATES

    def _linger_reply(self, c: Client, sd: int, done: bool) -> None:
        sk = self._shard_sock(sd)
        state = str(sk.state) if sk is not None else str(State.CLOSED)
        _try_send(c.sock, gp.pack({"ok": True, "done": done, "state": state}))
        c.sock.close()

    def _shard_sock(self, sd: int) -> Any:
        try:
            return self.shard.sock(sd)
        except OSError:
            return None  # released (Closed): nothing left to wait for

    # -- migration (shardstack.migrate) ---------------------------------------------

    def export_conns(self, sds: set[int], to: int) -> tuple[list[dict[str, Any]],
                                                             list[socket.socket]]:
        """Let go of the connections on shard descriptors `sds` (the engine
        exported them): their state as plain values and the sockets to hand
        over (W, and A's dup while connecting). Entries name sockets by index."""
        out: list[dict[str, Any]] = []
        socks: list[socket.socket] = []
        for sd in sorted(sds):
            conn = self.conns.get(sd)
            if conn is None:
                continue
            self._stop_reading(conn)
            self._want_write(conn, False)
            self._forget(conn)  # also out of the hang-up watch (_hup)
            self._remember_moved(conn.token, to)
            e = {"sd": sd, "token": conn.token, "state": conn.state.name, "w": len(socks),
                 "app": -1, "app_sndbuf": conn.app_sndbuf, "filler": conn.filler,
                 "inp": bytes(conn.inp) if conn.inp is not None else None,
                 "out": bytes(conn.out) if conn.out is not None else None,
                 "unconsumed": conn.unconsumed, "edge": conn.edge, "streaming": conn.streaming,
                 "app_eof": conn.app_eof, "peer_eof": conn.peer_eof}
            socks.append(conn.w)
            if conn.app is not None:
                e["app"] = len(socks)
                socks.append(conn.app)
            out.append(e)
        for lst in self.listeners.values():  # accepted, not yet connected to the app
            keep: deque = deque()
            for child, w, token in lst.pending:
                if child in sds:
                    out.append({"sd": child, "pending": lst.bind_id, "token": token,
                                "w": len(socks)})
                    socks.append(w)
                    self._remember_moved(token, to)
                else:
                    keep.append((child, w, token))
            lst.pending = keep
        return out, socks

    def _remember_moved(self, token: int, to: int) -> None:
        self.moved[token] = to
        self.moved.move_to_end(token)
        if len(self.moved) > DEAD_MAX:
            self.moved.popitem(last=False)

    def import_conns(self, entries: list[dict[str, Any]], socks: list[socket.socket],
                     sdmap: dict[int, int]) -> int:
        """Take over exported connections (export_conns' entries, the sockets
        received, old sd -> new sd from Shard.migrate_in); returns how many."""
        now = time.monotonic()
        taken = 0
        kick: list[GateConn] = []
        for e in entries:
            w = socks[e["w"]]
            new = sdmap.get(e["sd"])
            app = socks[e["app"]] if e.get("app", -1) >= 0 else None
            if new is None:  # the engine did not carry it: the app sees a reset
                w.close()
                if app is not None:
                    app.close()
                continue
            self.moved.pop(e["token"], None)
            taken += 1
            if "pending" in e:
                lst = self.listeners.get(e["pending"])
                if lst is None:
                    w.close()
                    self._abort_sd(new, now)
                    continue
                lst.pending.append((new, w, e["token"]))
                self._connect_pending(lst)
                continue
            conn = GateConn(new, w, e["token"], state=State[e["state"]], app=app,
                            app_sndbuf=e["app_sndbuf"], filler=e["filler"],
                            inp=memoryview(e["inp"]) if e["inp"] is not None else None,
                            out=memoryview(e["out"]) if e["out"] is not None else None,
                            unconsumed=e["unconsumed"], edge=e["edge"],
                            streaming=e["streaming"], app_eof=e["app_eof"],
                            peer_eof=e["peer_eof"])
            self._add(conn)
            if conn.app_eof and not conn.peer_eof:  # shut down by the app: watch for its close
                fd = w.fileno()
                self._hup.register(fd, 0)
                self._hup_conns[fd] = conn
            kick.append(conn)
        for conn in kick:
            if self.conns.get(conn.sd) is not conn or conn.state is not _ESTABLISHED:
                continue
            if conn.out is not None:
                self._want_write(conn, True)
            self._pump_down(conn)
            if self.conns.get(conn.sd) is conn:
                self._pump_up(conn)
            if self.conns.get(conn.sd) is conn and conn.inp is None:
                self._start_reading(conn)
        for lst in list(self.listeners.values()):  # children that came in accept queues
            self._on_acceptable(lst)
        return taken

    def connections(self) -> list[dict[str, Any]]:
        return [{"sd": c.sd, "token": c.token, "state": str(c.state),
                 "unconsumed": c.unconsumed, "reading": c.reading, "writing": c.writing,
                 "app_eof": c.app_eof, "peer_eof": c.peer_eof,
                 "inp": len(c.inp) if c.inp is not None else None,
                 "out": len(c.out) if c.out is not None else None}
                for c in self.conns.values()]

    def close(self) -> None:
        """Worker shutdown: drop every app stream and our endpoint."""
        self.udp.close()
        self.loop.remove_reader(self._hup.fileno())
        self._hup.close()
        self.loop.remove_reader(self.server.fileno())
        self.server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for conn in list(self.conns.values()):
            self._stop_reading(conn)
            self._want_write(conn, False)
            conn.w.close()
        self.conns.clear()
        self.tokens.clear()


def _hung_up(w: socket.socket) -> bool:
    """True when the app closed its end (both directions shut), not just SHUT_WR."""
    p = select.poll()
    p.register(w.fileno(), select.POLLIN)
    for _fd, ev in p.poll(0):
        return bool(ev & select.POLLHUP)
    return False


def _setopt_quietly(shard: Any, sd: int, level: int, opt: int, value: Any) -> None:
    """Replay an option the app set before connect/listen; an option the
    engine does not model is not the app's error here (Linux accepted it)."""
    if isinstance(value, list):
        value = tuple(value)
    try:
        shard.setsockopt(sd, level, opt, value)
    except (OSError, TypeError, ValueError):
        pass


def _err(code: int, text: str | None = None) -> dict[str, Any]:
    return {"ok": False, "errno": code, "error": text or os.strerror(code)}


def _try_send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass
