"""A two-shard stack in one thread, for testing the shim and appgate without root.

Two real `core.Shard`s joined by an in-memory wire, each with its real
`AppGate` as worker 0 and worker 1 of one run directory, and a control
server answering hello/bind/listen/release with the supervisor's own
`BindTable`. Worker 0 (198.18.0.2) is where the shim's connects go (hello
says one worker); worker 1 (198.18.0.1) plays the remote host. A server app
that binds the wildcard gets its listener on both shards, so a client
connecting to 198.18.0.1 crosses the wire from shard 0 to shard 1 and back
into the app through a second unix stream. Only the wire and the control
server are stand-ins; the shim, appgate and engine are the real ones.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from shardstack.core import Shard, ShardConfig

from shardstack import control
from shardstack.appgate import AppGate
from shardstack.supervisor import BindTable

CLIENT_IP = "198.18.0.2"
SERVER_IP = "198.18.0.1"


def _ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


class Node:
    """One shard + its appgate, stepping like shardstack.worker.Worker._step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, run_dir: str, wid: int, ip: str,
                 drop: Any = None) -> None:
        self.loop = loop
        self.shard = Shard(ShardConfig(addrs=[_ip(ip)], secret=b"k" * 16), time.monotonic())
        self.peer: Node | None = None
        self.drop = drop  # drop(frame) -> bool: a test's wire filter
        self._timer: asyncio.TimerHandle | None = None
        self._in_step = False
        self._dirty = False
        self.gate = AppGate(self.shard, loop, run_dir, wid, self.flush)

    def flush(self) -> None:
        self._step()

    def receive(self, frames: list[bytes]) -> None:
        self.shard.receive_batch(frames, time.monotonic())
        self._step()

    def _on_timer(self) -> None:
        self._timer = None
        self.shard.advance(time.monotonic())
        self._step()

    def _step(self) -> None:
        if self._in_step:
            self._dirty = True
            return
        self._in_step = True
        try:
            for _ in range(1000):
                self._dirty = False
                events = self.shard.take_events()
                if events:
                    self.gate.on_events(events)
                frames = self.shard.take_frames()
                if frames:
                    if self.drop is not None:
                        frames = [f for f in frames if not self.drop(f)]
                    self.loop.call_soon(self.peer.receive, frames)
                if not events and not frames and not self._dirty:
                    break
            if self._timer is not None:
                self._timer.cancel()
            deadline = self.shard.next_deadline()
            self._timer = (None if deadline is None else
                           self.loop.call_later(max(0.0, deadline - time.monotonic()),
                                                self._on_timer))
        finally:
            self._in_step = False


class StackPair:
    """Start with `StackPair(tmpdir).start()`, stop with `.stop()`."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.nodes: list[Node] = []
        self.binds = BindTable([_ip(CLIENT_IP), _ip(SERVER_IP)])
        self.ready = threading.Event()
        self.drop: Any = None

    def start(self) -> StackPair:
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        (self.run_dir / "l").mkdir(mode=0o700, exist_ok=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("stack pair did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self.ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        a = Node(self.loop, str(self.run_dir), 0, CLIENT_IP, self._drop)
        b = Node(self.loop, str(self.run_dir), 1, SERVER_IP, self._drop)
        a.peer, b.peer = b, a
        self.nodes = [a, b]
        self.server = await control.serve_unix(self.run_dir / "control.sock", self._handle)

    def _drop(self, frame: bytes) -> bool:
        return self.drop is not None and self.drop(frame)

    def _handle(self, req: dict[str, Any], conn: control.Conn) -> dict[str, Any]:
        op = req.get("op")
        if op == "hello":
            return {"addrs": [CLIENT_IP], "workers": 1, "run_dir": str(self.run_dir)}
        if op == "bind":
            addr = _ip(req.get("addr") or "0.0.0.0")
            b = self.binds.bind(addr, int(req.get("port", 0)), bool(req.get("reuseaddr")),
                                bool(req.get("reuseport")))
            owned = conn.state.setdefault("binds", set())
            if not owned:
                conn.on_close.append(lambda: self._release_all(conn))
            owned.add(b.bind_id)
            return {"addr": str(ipaddress.IPv4Address(b.laddr)), "port": b.lport,
                    "bind_id": b.bind_id}
        if op == "listen":
            b = self.binds.get(int(req["bind_id"]))
            if b.listener is not None:
                return {}  # as the supervisor: listening already (a new backlog is local)
            self.binds.listen(b, int(req.get("backlog", 128)))
            b.listener = {"backlog": int(req.get("backlog", 128)), "path": req["path"]}
            for n in self.nodes:
                if b.laddr and b.laddr not in n.shard.addr_set:
                    continue  # a real stack's workers all share its addresses
                n.gate.add_listener(b.bind_id, b.laddr, b.lport, path=req["path"],
                                    backlog=int(req.get("backlog", 128)),
                                    opts=req.get("opts", ()))
                n.flush()
            return {}
        if op == "adopt":  # as the supervisor: one more holder of the bind
            b = self.binds.get(int(req["bind_id"]))
            owned = conn.state.setdefault("binds", set())
            if b.bind_id not in owned:
                if not owned:
                    conn.on_close.append(lambda: self._release_all(conn))
                owned.add(b.bind_id)
                b.holders += 1
            return {"addr": str(ipaddress.IPv4Address(b.laddr)), "port": b.lport,
                    "bind_id": b.bind_id}
        if op == "release":
            freed = self._release(int(req["bind_id"]))
            conn.state.get("binds", set()).discard(int(req["bind_id"]))
            return {"freed": freed}
        raise OSError(95, f"unknown op {op!r}")

    def _release(self, bind_id: int) -> bool:
        b = self.binds.binds.get(bind_id)
        if b is None:
            return True
        b.holders -= 1
        if b.holders > 0:
            return False
        if b.listener is not None:
            for n in self.nodes:
                n.gate.remove_listener(bind_id)  # a no-op where it was not installed
        self.binds.release(b)
        return True

    def _release_all(self, conn: control.Conn) -> None:
        for bind_id in list(conn.state.get("binds", ())):
            self._release(bind_id)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the stack's loop thread and return its result."""
        fut = asyncio.run_coroutine_threadsafe(_acall(fn, *args), self.loop)
        return fut.result(10)

    def stop(self) -> None:
        async def _stop() -> None:
            self.server.close()
            for n in self.nodes:
                if n._timer is not None:
                    n._timer.cancel()
                n.gate.close()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _acall(fn: Any, *args: Any) -> Any:
    return fn(*args)


# -- helpers for tests on the pair (run in the test thread, through the shim) ---------------


class Conn(NamedTuple):
    """A listener on the stack and one connection through it (the `conn` fixture)."""

    srv: socket.socket  # listening on 0.0.0.0:port
    port: int
    cl: socket.socket  # the client end, connected to SERVER_IP:port
    c: socket.socket  # the server end, accepted from srv
    addr: tuple[str, int]  # what accept() said the client is


def listener(backlog: int = 8, opts: dict | None = None, port: int = 0) -> socket.socket:
    """A stream socket listening on the wildcard; `opts` {(level, opt): value} set first."""
    s = socket.socket()
    for (level, opt), v in (opts or {}).items():
        s.setsockopt(level, opt, v)
    s.bind(("0.0.0.0", port))
    s.listen(backlog)
    return s


def closed_port() -> int:
    """A stack port that was just bound and released: nothing listens there."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def connect_accept(srv: socket.socket, timeout: float = 5) -> Conn:
    """Connect to `srv` across the wire (client shard to server shard) and accept."""
    port = srv.getsockname()[1]
    cl = socket.create_connection((SERVER_IP, port), timeout=timeout)
    c, addr = srv.accept()
    return Conn(srv, port, cl, c, addr)


def in_thread(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start fn(*args) in a thread; the returned join() gives its result or raises its error."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> Any:
        t.join(20)
        assert not t.is_alive(), "server thread hung"
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join


def set_linger(s: socket.socket, secs: int) -> None:
    """SO_LINGER {1, secs}."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, secs))


def close_with_rst(s: socket.socket) -> None:
    """close() with SO_LINGER {1, 0}: Linux tcp_close aborts with an RST."""
    set_linger(s, 0)
    s.close()


def recv_until_reset(s: socket.socket) -> None:
    """Read what is left until the peer's RST surfaces as ECONNRESET (bounded)."""
    try:
        for _ in range(50):
            if not s.recv(100):
                break
    except ConnectionResetError as e:
        assert e.errno == errno.ECONNRESET
        return
    raise AssertionError("no ECONNRESET: the connection ended without a reset")


def recv_all(s: socket.socket, n: int) -> None:
    """Receive (and drop) `n` bytes; an EOF before them fails the test."""
    got = 0
    while got < n:
        chunk = s.recv(65536)
        assert chunk, f"EOF after {got} of {n} bytes"
        got += len(chunk)


def as_nobody(run_dir: Path, child: Callable[[str], bytes], new_netns: bool = False
              ) -> tuple[bytes, int]:
    """Run child(path of run_dir) in a forked process as user 65534 (after an unshare of
    the network namespace if `new_netns`); (the bytes it returned, its exit code).

    The run dir is opened O_PATH by root first: pytest's tmp dirs above it are 0700."""
    os.chmod(run_dir, 0o755)
    r, w = os.pipe()
    dfd = os.open(run_dir, os.O_PATH)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if new_netns:
                    # An empty network namespace: should the shim wrongly fall back
                    # to the kernel, a SYN goes nowhere instead of out.
                    import ctypes

                    assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # NEWNET
                os.setuid(65534)
                os.write(w, child(f"/proc/self/fd/{dfd}"))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        got = os.read(r, 100)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
        os.close(dfd)
        os.chmod(run_dir, 0o700)
    return got, os.waitstatus_to_exitcode(status)
