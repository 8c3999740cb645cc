"""The control plane: framing, request/response, errors, SO_PEERCRED fence."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading

import msgpack
import pytest

from shardstack import control

# -- framing ------------------------------------------------------------------


def test_pack_is_length_prefixed_msgpack():
    msg = {"op": "bind", "addr": "198.18.0.2", "port": 80}
    framed = control.pack(msg)
    (n,) = struct.unpack("!I", framed[:4])
    assert n == len(framed) - 4
    assert msgpack.unpackb(framed[4:]) == msg


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(7), b""])
def test_unpack_rejects_non_maps_and_garbage(body):
    with pytest.raises(control.ControlError) as ei:
        control.unpack_body(body)
    assert ei.value.errno == errno.EBADMSG


def test_oversized_length_is_refused():
    with pytest.raises(control.ControlError) as ei:
        control.check_length(control.MAX_MESSAGE + 1)
    assert ei.value.errno == errno.EMSGSIZE


def test_error_reply_round_trips_to_oserror():
    reply = control.error_reply(OSError(errno.EADDRINUSE, "Address already in use"))
    assert reply == {"ok": False, "errno": errno.EADDRINUSE, "error": "Address already in use"}
    with pytest.raises(OSError) as ei:
        control.raise_for_reply(reply)
    assert ei.value.errno == errno.EADDRINUSE
    assert control.raise_for_reply({"ok": True, "x": 1}) == {"ok": True, "x": 1}


# -- a real server on a loop in a thread ---------------------------------------


class ServerThread:
    """Run `serve_unix(path, handler, allowed_uid)` on a private loop."""

    def __init__(self, path, handler, allowed_uid=None):
        self.path = path
        self.closed = threading.Event()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start():
            self.server = await control.serve_unix(path, handler, allowed_uid)
            started.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        assert started.wait(5)

    def stop(self):
        async def close():
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "c.sock")


def test_request_reply_and_errno(sock_path):
    closed = []
    hung_up = threading.Event()

    def on_close(conn):
        closed.append(conn.peer.pid)
        hung_up.set()

    def handler(req, conn):
        if req["op"] == "add":
            if not conn.on_close:
                conn.on_close.append(lambda: on_close(conn))
            return {"sum": req["a"] + req["b"]}
        if req["op"] == "fail":
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        if req["op"] == "missing":
            return {"x": req["nope"]}
        raise OSError(errno.EOPNOTSUPP, "unknown op")

    srv = ServerThread(sock_path, handler)
    try:
        assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
        with control.ControlClient(sock_path) as c:
            assert c.call("add", a=2, b=40) == {"ok": True, "sum": 42}
            with pytest.raises(OSError) as ei:
                c.call("fail")
            assert ei.value.errno == errno.EADDRNOTAVAIL
            with pytest.raises(OSError) as ei:
                c.call("missing")  # a handler's KeyError is the caller's bad request
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                c.call("what")
            assert ei.value.errno == errno.EOPNOTSUPP
            # the connection survived every error
            assert c.call("add", a=1, b=1)["sum"] == 2
        assert hung_up.wait(5)  # on_close runs on the server's thread
        assert closed == [os.getpid()]
    finally:
        srv.stop()


def test_async_handler_and_pipelined_requests(sock_path):
    async def handler(req, conn):
        await asyncio.sleep(0)
        return {"echo": req["n"]}

    srv = ServerThread(sock_path, handler)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"".join(control.pack({"op": "e", "n": i}) for i in range(20)))
        c = control.ControlClient.__new__(control.ControlClient)
        c.sock = s
        assert [c._recv()["echo"] for _ in range(20)] == list(range(20))
        s.close()
    finally:
        srv.stop()


def test_malformed_frame_closes_connection(sock_path):
    srv = ServerThread(sock_path, lambda req, conn: {})
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(struct.pack("!I", 3) + b"\x93\x01\x02")  # a msgpack array, not a map
        assert s.recv(100) == b""  # hung up, nothing answered
        s.close()
    finally:
        srv.stop()


def test_peercred_rejects_other_uid(sock_path):
    # Allow only a uid we are not (and not root): our own connection is refused.
    other = os.getuid() + 12345
    srv = ServerThread(sock_path, lambda req, conn: {"hi": 1}, allowed_uid=other)
    try:
        if os.getuid() == 0:
            # root is always let in: the fence is for everyone else
            assert control.call(sock_path, "hello")["hi"] == 1
        else:
            with pytest.raises(OSError) as ei:
                control.call(sock_path, "hello")
            assert ei.value.errno == errno.EACCES
    finally:
        srv.stop()


def test_cred_allowed_rules():
    me = control.PeerCred(1, 1000, 1000)
    assert control.cred_allowed(me, 1000)
    assert not control.cred_allowed(me, 1001)
    assert control.cred_allowed(control.PeerCred(1, 0, 0), 1001)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() a child to another user")
def test_peercred_rejects_unprivileged_process(tmp_path):
    # The socket lives in a world-searchable directory and is made mode 0666,
    # so only SO_PEERCRED stands between uid 65534 and the server.
    tmp_path.chmod(0o755)
    path = str(tmp_path / "c.sock")
    srv = ServerThread(path, lambda req, conn: {"hi": 1})
    try:
        os.chmod(path, 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, try the call, report the errno
            code = 255
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    control.call(path, "hello", timeout=5)
                    code = 0
                except OSError as e:
                    code = e.errno or 254
                os.write(w, bytes([code]))
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == bytes([errno.EACCES])
        assert control.call(path, "hello")["hi"] == 1  # root still gets in
    finally:
        srv.stop()


def test_async_client_call_on_a_dead_peer_is_an_oserror(sock_path):
    """The supervisor's client to a worker that died: every later call raises
    an OSError (EPIPE, then ECONNRESET), which callers handle, never the
    RuntimeError uvloop's closed transport raises on write."""
    import uvloop

    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(sock_path)
    lsock.listen(1)

    async def main():
        c = await control.AsyncControlClient.connect(sock_path)
        peer, _ = lsock.accept()  # already queued: does not block
        peer.close()  # the worker dies
        for _ in range(3):
            with pytest.raises(OSError):  # EPIPE, ECONNRESET: what callers handle
                await c.call("ping", timeout=2)
            await asyncio.sleep(0.05)  # the transport notices and closes
        c.close()

    try:
        uvloop.run(main())
    finally:
        lsock.close()


def test_async_client_late_reply_is_not_the_next_calls_answer(sock_path):
    """A call that timed out (a worker stopped for a moment) leaves its reply
    owed on the stream; the next call skips it and gets its own answer."""
    import uvloop

    async def main():
        async def handler(req, conn):
            if req["op"] == "slow":
                await asyncio.sleep(0.3)
            return {"echo": req["op"]}

        server = await control.serve_unix(sock_path, handler)
        c = await control.AsyncControlClient.connect(sock_path)
        with pytest.raises(TimeoutError):
            await c.call("slow", timeout=0.05)
        assert (await c.call("fast", timeout=2))["echo"] == "fast"
        assert (await c.call("again", timeout=2))["echo"] == "again"
        c.close()
        server.close()

    uvloop.run(main())
