"""The shim's per-process link to a running stack.

One `Stack` per process (fork-safe: every channel remembers the pid that
opened it and a child opens its own). It holds:

- the supervisor's `control.sock` connection (hello, bind, listen, release).
  It stays open for the life of the process because bind_ids belong to the
  connection: when the process dies, the supervisor releases its binds, as
  the kernel releases a dead process's ports;
- one "ctl" stream per worker (`worker-<i>.sock`) for setsockopt/getsockopt
  on established connections.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

from shardstack.shim import gateproto as gp
from shardstack.shim.scope import StackView

ENV_ENABLE = "SHARDSTACK_SHIM"
ENV_RUN_DIR = "SHARDSTACK_RUN_DIR"
ENV_LOOPBACK = "SHARDSTACK_SHIM_LOOPBACK"
ENV_STRICT = "SHARDSTACK_SHIM_STRICT"
CALL_TIMEOUT = 10.0
HELLO_RETRY_WAIT = 1.0  # s: how long a refusal may take to arrive
MOVED_HOPS = 4  # redirects followed for a migrated connection (worker_call)


class Stack:
    """Lazily connected; `view()` is None when no stack answers."""

    def __init__(self, run_dir: str | os.PathLike[str], loopback: bool = False,
                 strict: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.loopback = loopback
        self.strict = strict  # no stack answering: fail, do not fall back to the kernel
        self._lock = threading.RLock()
        self._pid = -1
        self._control: Any = None
        self._view: StackView | None = None
        self._hello_failed = False
        self.denied = False  # a stack answered but refused us (EACCES)
        self.failure = 0  # errno of the failed hello
        self._ctl: dict[int, Any] = {}
        self._counter = 0

    # -- control.sock ---------------------------------------------------------

    def _check_fork(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            # After fork the parent's connections are shared fds: leave them
            # to the parent (closing would not hang up, the parent holds them)
            # and talk on our own.
            self._pid = pid
            self._control = None
            self._ctl = {}

    def view(self) -> StackView | None:
        with self._lock:
            self._check_fork()
            if self._view is None and not self._hello_failed:
                try:
                    reply = self._hello()
                except OSError as e:
                    # No stack: sockets stay on the kernel. A stack that is
                    # not ours to use: its addresses get EACCES (sock.py).
                    self._hello_failed = True
                    self.denied = e.errno in (errno.EACCES, errno.EPERM)
                    self.failure = e.errno or errno.ENETUNREACH
                    return None
                self._view = StackView.from_hello(reply, self.loopback)
            return self._view

    def forget_view(self) -> None:
        """The next view() asks the supervisor again (the RETA moved)."""
        with self._lock:
            self._view = None

    def _hello(self) -> dict[str, Any]:
        try:
            return self.call("hello")
        except (BrokenPipeError, ConnectionResetError):
            # A server refusing our uid answers EACCES and hangs up at once,
            # maybe before our request went out: the answer may still be
            # waiting to be read.
            from shardstack.control import ControlClient, raise_for_reply

            c = ControlClient(self.run_dir / "control.sock", HELLO_RETRY_WAIT)
            try:
                return raise_for_reply(c._recv())  # a refusal comes unasked
            except TimeoutError:
                raise ConnectionResetError(errno.ECONNRESET, "control.sock hung up") from None
            finally:
                c.close()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request on this process's control connection; OSError(errno) on error."""
        from shardstack.control import ControlClient

        with self._lock:
            self._check_fork()
            if self._control is None:
                self._control = ControlClient(self.run_dir / "control.sock", CALL_TIMEOUT)
            try:
                return self._control.call(op, **args)
            except (ConnectionError, TimeoutError):
                self._control.close()
                self._control = None
                raise

    def close(self) -> None:
        """Hang up this process's channels (the supervisor then releases our binds)."""
        with self._lock:
            if self._pid == os.getpid():
                if self._control is not None:
                    self._control.close()
                for ch in self._ctl.values():
                    ch.close()
            self._control = None
            self._ctl = {}

    # -- workers --------------------------------------------------------------

    def worker_path(self, worker: int) -> str:
        return str(self.run_dir / f"worker-{worker}.sock")

    def next_counter(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def worker_call(self, worker: int, msg: dict[str, Any]) -> dict[str, Any]:
        """A ctl request to one worker (setsockopt/getsockopt by token). A
        connection migrated to another worker (shardstack.migrate) is
        followed there: the old worker answers {"moved": worker}."""
        for _ in range(MOVED_HOPS):
            reply = self._worker_call_once(worker, msg)
            moved = reply.get("moved")
            if not isinstance(moved, int) or moved == worker:
                return reply
            worker = moved
        return reply

    def _worker_call_once(self, worker: int, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._check_fork()
            ch = self._ctl.get(worker)
            if ch is None:
                ch = _CtlChannel(self.worker_path(worker))
                self._ctl[worker] = ch
            try:
                reply = ch.request(msg)
            except OSError:
                ch.close()
                self._ctl.pop(worker, None)
                raise
        if not reply.get("ok"):
            code = int(reply.get("errno") or errno.EIO)
            raise OSError(code, reply.get("error") or os.strerror(code))
        return reply


class _CtlChannel:
    """A blocking request/reply stream to worker-<i>.sock in "ctl" mode."""

    def __init__(self, path: str) -> None:
        from shardstack.shim.sock import kernel_socket

        self.sock = kernel_socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(CALL_TIMEOUT)
        self.buf = bytearray()
        try:
            self.sock.connect(path)
            hello = self.request({"op": "ctl"})
        except OSError:
            self.sock.close()
            raise
        if not hello.get("ok"):
            self.sock.close()
            code = int(hello.get("errno") or errno.EACCES)
            raise OSError(code, hello.get("error") or os.strerror(code))

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(gp.pack(msg))
        return read_frame(self.sock, self.buf)

    def close(self) -> None:
        self.sock.close()


def read_frame(sock: Any, buf: bytearray) -> dict[str, Any]:
    """Block until one whole frame is in; ECONNRESET if the peer hangs up first.

    Reads exactly the frame, never past it: on a connect's stream the
    connection's first bytes may follow the reply at once (a fast peer, a
    slow app), and they are the app's."""
    while True:
        msgs = gp.unpack_frames(buf)
        if msgs:
            if len(msgs) > 1:  # never happens with one request in flight
                raise OSError(errno.EPROTO, "unexpected extra gate message")
            return msgs[0]
        if len(buf) < gp.HEADER.size:
            need = gp.HEADER.size - len(buf)
        else:
            need = gp.HEADER.size + gp.HEADER.unpack_from(buf)[0] - len(buf)
        chunk = sock.recv(need)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "the stack hung up")
        buf += chunk


_STACK: Stack | None = None
_STACK_LOCK = threading.Lock()


def get_stack() -> Stack | None:
    return _STACK


def set_stack(stack: Stack | None) -> None:
    global _STACK
    with _STACK_LOCK:
        _STACK = stack
