"""Strict mode's watch for TCP sockets that reach the kernel behind the shim's back.

The shim sees every socket made through `socket.socket`. C code that calls
socket(2) itself (a libuv loop the import hook did not reach, pycurl, grpc,
a ctypes call) does not pass through Python at all: no audit hook fires for
it. So under `shardstack run` (strict mode) a daemon thread looks at the
process's own file descriptors, which is where such a socket must end up:

- every `socket:[inode]` in /proc/self/fd not already settled;
- an AF_INET/AF_INET6 SOCK_STREAM one is asked, on its own fd (getsockopt,
  getsockname, getpeername: no parsing of the netns-wide /proc/net/tcp),
  whether it listens (SO_ACCEPTCONN) or is connected;
- the scope rules that the shim applies at bind()/connect() (shim.scope)
  decide whether that address belonged on the stack: a kernel listener on
  0.0.0.0 or a stack address, or a kernel connection to a destination the
  stack routes, is a leak. (A `::` listener counts as 0.0.0.0 unless
  IPV6_V6ONLY; real IPv6 addresses are kernel-only and never leaks.)

A leak is reported once per socket, loudly, on stderr: pid, command line,
the address, the fd, and the Python call path (every thread's stack when it
was found: the C call that made it left no Python frame of its own, but the
code that drove it is on a stack). With `--kernel-sockets exit`
(SHARDSTACK_SHIM_KERNEL_SOCKETS=exit) the process is then ended with exit
status 3: the program refused to run off the stack.

Cost: one listdir and one readlink per fd each interval (1 s by default,
SHARDSTACK_SHIM_WATCH=seconds, 0 turns it off); sockets whose answer cannot
change (AF_UNIX, UDP, listeners, connected sockets) are remembered by inode
and not asked again. The scan holds a lock that fork() takes first
(os.register_at_fork), so a child never inherits it held, and the child
starts its own watcher.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from shardstack.shim import scope

ENV_WATCH = "SHARDSTACK_SHIM_WATCH"
ENV_ACTION = "SHARDSTACK_SHIM_KERNEL_SOCKETS"
DEFAULT_INTERVAL = 1.0
ACTIONS = ("warn", "exit")
EXIT_STATUS = 3

_csocket = socket._socket.socket if hasattr(socket, "_socket") else socket.socket
SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)


@dataclass(slots=True, frozen=True)
class Leak:
    fd: int
    inode: int
    what: str  # "listens on" / "is connected to"
    addr: tuple[str, int]
    local: tuple[str, int]

    def describe(self) -> str:
        where = f"{self.addr[0]}:{self.addr[1]}"
        if self.what == "listens on":
            return f"listens on {where} through the KERNEL, not the stack"
        return (f"is connected to {where} (from {self.local[0]}:{self.local[1]}) through "
                "the KERNEL, not the stack")


def _v4(family: int, host: str, v6only: bool, view: scope.StackView | None = None) -> str | None:
    """The address, as the scope reads it, that an address of `family` stands
    for: IPv4 text (v4-mapped ones unwrapped), or when the stack has IPv6 the
    IPv6 text (`::` then is the stack's own wildcard); None otherwise."""
    if family == socket.AF_INET:
        return host
    host = host.split("%", 1)[0]
    if host.lower().startswith("::ffff:") and "." in host:
        return host[7:]
    if view is not None and view.addrs6:
        return host
    if host == "::":
        return None if v6only else "0.0.0.0"
    return None


def check_fd(fd: int, view: scope.StackView) -> tuple[Leak | None, bool]:
    """(a leak or None, settled): whether kernel socket `fd` is a TCP
    listener or connection that the scope puts on the stack. `settled`:
    the answer cannot change any more (not TCP, listening, or connected)."""
    try:
        tmp = _csocket(fileno=fd)
    except OSError:
        return None, False  # closed meanwhile, or not a socket after all
    try:
        return _check(tmp, fd, view)
    except OSError:
        return None, False
    finally:
        tmp.detach()


def _check(s: Any, fd: int, view: scope.StackView) -> tuple[Leak | None, bool]:
    family = s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None, True
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) & 0xF != socket.SOCK_STREAM:
        return None, True
    ino = os.fstat(fd).st_ino
    v6only = family == socket.AF_INET6 and bool(
        s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    local = s.getsockname()
    lhost = _v4(family, local[0], v6only, view)
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        if lhost is not None and scope.bind_scope(lhost, view)[0] == scope.STACK:
            return Leak(fd, ino, "listens on", (local[0], local[1]), (local[0], local[1])), True
        return None, True
    try:
        peer = s.getpeername()
    except OSError:
        return None, False  # not connected (yet): look again next time
    rhost = _v4(family, peer[0], v6only, view)
    if rhost is not None and scope.connect_scope(rhost, view)[0] == scope.STACK:
        return Leak(fd, ino, "is connected to", (peer[0], peer[1]), (local[0], local[1])), True
    return None, True


def socket_fds() -> list[tuple[int, int]]:
    """(fd, inode) of every socket this process has open."""
    out = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.append((int(name), int(link[8:-1])))
    return out


def call_path() -> str:
    """Every thread's Python stack, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"  thread {names.get(ident, ident)}:\n{stack}")
    return "".join(parts)


def report(leak: Leak, action: str) -> str:
    cmd = " ".join(sys.argv) or sys.executable
    text = (
        f"\nshardstack shim: STRICT: pid {os.getpid()} ({cmd}) {leak.describe()} "
        f"(fd {leak.fd}, socket inode {leak.inode}).\n"
        "  It was made by C code, not through socket.socket, so the shim could not put it on\n"
        "  the stack: clients of the stack cannot reach it / its traffic bypasses the stack.\n"
        "  Fix: create the socket in Python (socket.socket) and pass it with sock=, or use\n"
        "  asyncio's own loop. docs/shim.md, \"What goes on the stack\".\n"
        f"  Python call path when it was found (pid {os.getpid()}):\n{call_path()}")
    if action == "exit":
        text += (f"shardstack shim: STRICT: ending pid {os.getpid()} with status {EXIT_STATUS} "
                 "(--kernel-sockets exit)\n")
    return text


class Watcher:
    """The daemon thread (module docstring). `scan()` is also callable directly."""

    def __init__(self, interval: float, action: str = "warn") -> None:
        self.interval = interval
        self.action = action if action in ACTIONS else "warn"
        self.lock = threading.Lock()
        self.settled: set[int] = set()
        self.reported: list[Leak] = []
        self._view: scope.StackView | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        t = threading.Thread(target=self._run, name="shardstack-kernelwatch", daemon=True)
        self._thread = t
        t.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()

    def view(self) -> scope.StackView | None:
        """The stack's view, from a hello of our own (the shim's Stack may never
        have needed one in a program whose sockets are all made in C; and its
        lock is not ours to hold across a fork)."""
        if self._view is None:
            from shardstack.shim.stack import get_stack

            from shardstack.control import call

            stack = get_stack()
            if stack is None:
                return None
            try:
                reply = call(stack.run_dir / "control.sock", "hello", timeout=5.0)
            except OSError:
                return None  # no stack (yet): nothing is in its scope
            self._view = scope.StackView.from_hello(reply, stack.loopback)
        return self._view

    def scan(self) -> list[Leak]:
        """Look once; report (and act on) new leaks; return them."""
        view = self.view()
        if view is None:
            return []
        found = []
        with self.lock:
            for fd, ino in socket_fds():
                if ino in self.settled:
                    continue
                leak, settled = check_fd(fd, view)
                if settled:
                    self.settled.add(ino)
                if leak is not None:
                    found.append(leak)
        for leak in found:
            self.reported.append(leak)
            sys.stderr.write(report(leak, self.action))
            sys.stderr.flush()
        if found and self.action == "exit":
            os._exit(EXIT_STATUS)
        return found

    # fork: the child must not inherit the lock held, and needs its own thread.
    def before_fork(self) -> None:
        self.lock.acquire()

    def after_fork_parent(self) -> None:
        self.lock.release()

    def after_fork_child(self) -> None:
        self.lock = threading.Lock()  # inherited sockets stay settled: reported once
        if not self._stop.is_set():
            self.start()


_WATCHER: Watcher | None = None


def start_from_env(env: dict[str, str] | None = None) -> Watcher | None:
    """Start the process's watcher once (strict mode calls this)."""
    global _WATCHER
    env = os.environ if env is None else env
    if _WATCHER is not None:
        return _WATCHER
    try:
        interval = float(env.get(ENV_WATCH) or DEFAULT_INTERVAL)
    except ValueError:
        interval = DEFAULT_INTERVAL
    if interval <= 0:
        return None
    w = Watcher(interval, env.get(ENV_ACTION) or "warn")
    os.register_at_fork(before=w.before_fork, after_in_parent=w.after_fork_parent,
                        after_in_child=w.after_fork_child)
    w.start()
    _WATCHER = w
    return w


def get_watcher() -> Watcher | None:
    return _WATCHER
