"""The control plane: msgpack requests over AF_UNIX stream sockets.

Used between the shim and the supervisor (`control.sock`) and between the
supervisor and each worker (`worker-<i>.ctl`). Never on the data path.

Framing: each message is a 4-byte big-endian length followed by that many
bytes of msgpack encoding one map. A request is `{"op": NAME, ...args}`; the
reply is `{"ok": True, ...results}` or `{"ok": False, "errno": N, "error":
TEXT}`. Requests on one connection are answered in order, one at a time.

Access: only the stack's own uid (or root) may talk to it. The run
directory's mode 0700 keeps others out already; the server also checks the
peer's credentials with SO_PEERCRED (as systemd, D-Bus and containerd do on
their sockets) and answers anyone else with EACCES, then hangs up.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 << 20  # a `ss` reply for ~100k sockets fits
DEFAULT_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")


class ControlError(OSError):
    """A malformed control message (bad length, not a msgpack map)."""


def pack(msg: dict[str, Any]) -> bytes:
    """One framed message."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ControlError(errno.EMSGSIZE, "control message too large")
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict[str, Any]:
    """Decode one message body; raises ControlError on anything but a map."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ControlError(errno.EBADMSG, f"bad control message: {e}") from None
    if not isinstance(msg, dict):
        raise ControlError(errno.EBADMSG, "control message is not a map")
    return msg


def check_length(n: int) -> int:
    if n > MAX_MESSAGE:
        raise ControlError(errno.EMSGSIZE, f"control message of {n} bytes exceeds limit")
    return n


def error_reply(exc: OSError) -> dict[str, Any]:
    code = exc.errno or errno.EIO
    return {"ok": False, "errno": code, "error": exc.strerror or os.strerror(code)}


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Turn an error reply into OSError(errno, error), as a syscall would."""
    if reply.get("ok"):
        return reply
    code = int(reply.get("errno") or errno.EIO)
    raise OSError(code, reply.get("error") or os.strerror(code))


# -- credentials ---------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected AF_UNIX socket (the creds at connect time)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def cred_allowed(cred: PeerCred, allowed_uid: int) -> bool:
    """The stack's own uid and root may use the control plane."""
    return cred.uid == allowed_uid or cred.uid == 0


# -- blocking client -----------------------------------------------------------


class ControlClient:
    """A blocking client: `ControlClient(path).call("ss")`.

    Used by the CLI and the shim (a shim call blocks the app thread, as the
    syscall it replaces does).
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = DEFAULT_TIMEOUT):
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request, wait for its reply; OSError(errno) on an error reply."""
        return raise_for_reply(self.request({"op": op, **args}))

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(pack(msg))
        return self._recv()

    def _recv(self) -> dict[str, Any]:
        (n,) = HEADER.unpack(self._recv_exact(HEADER.size))
        return unpack_body(self._recv_exact(check_length(n)))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "control connection closed")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(path: str | os.PathLike[str], op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any):
    """One request on a fresh connection."""
    with ControlClient(path, timeout) as c:
        return c.call(op, **args)


# -- asyncio client ------------------------------------------------------------


class AsyncControlClient:
    """The supervisor's connection to one worker's `worker-<i>.ctl`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        # Replies still owed for calls that timed out: they arrive late, in
        # order, and must not be taken for the answer to a later call.
        self._owed = 0

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> AsyncControlClient:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer)

    async def call(self, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> dict[str, Any]:
        async with self._lock:
            if self._writer.is_closing():
                # The peer died (or we closed): an OSError the caller expects,
                # not the RuntimeError a closed transport raises on write.
                raise ConnectionResetError(errno.ECONNRESET, "control connection closed")
            self._writer.write(pack({"op": op, **args}))
            self._owed += 1
            reply = None
            while self._owed:
                reply = await asyncio.wait_for(_read_message(self._reader), timeout)
                if reply is None:
                    break
                self._owed -= 1
        if reply is None:
            raise ConnectionResetError(errno.ECONNRESET, "control connection closed")
        return raise_for_reply(reply)

    def close(self) -> None:
        self._writer.close()


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean EOF between messages."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ControlError(errno.EBADMSG, "truncated control header") from None
        return None
    (n,) = HEADER.unpack(head)
    try:
        body = await reader.readexactly(check_length(n))
    except asyncio.IncompleteReadError:
        raise ControlError(errno.EBADMSG, "truncated control message") from None
    return unpack_body(body)


# -- asyncio server ------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Conn:
    """One accepted control connection, handed to the handler with each request.

    `on_close` callbacks run when the peer hangs up: the supervisor uses them
    to release a dead app's binds, as closing a socket fd would.
    """

    peer: PeerCred
    state: dict[str, Any] = field(default_factory=dict)
    on_close: list[Callable[[], None]] = field(default_factory=list)


Handler = Callable[[dict[str, Any], Conn], "dict[str, Any] | Awaitable[dict[str, Any]]"]


async def serve_unix(
    path: str | os.PathLike[str],
    handler: Handler,
    allowed_uid: int | None = None,
) -> asyncio.AbstractServer:
    """Serve `handler` on a fresh AF_UNIX listener at `path` (mode 0600).

    The handler returns the result map (`ok` is added) or raises OSError,
    which becomes an errno reply. Unknown ops should raise
    OSError(EOPNOTSUPP).
    """
    allowed = os.geteuid() if allowed_uid is None else allowed_uid
    path = os.fspath(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_conn(reader, writer, handler, allowed)
        except asyncio.CancelledError:
            pass  # the server's loop is shutting down: nothing left to answer

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_connect, path)
    finally:
        os.umask(old)
    return server


async def _serve_conn(reader, writer, handler: Handler, allowed_uid: int) -> None:
    sock = writer.get_extra_info("socket")
    cred = peer_cred(sock)
    if not cred_allowed(cred, allowed_uid):
        err = OSError(errno.EACCES, f"uid {cred.uid} may not use this shardstack")
        writer.write(pack(error_reply(err)))
        await _close(writer)
        return
    conn = Conn(cred)
    try:
        while True:
            try:
                req = await _read_message(reader)
            except (ControlError, ConnectionError):
                break
            if req is None:
                break
            writer.write(pack(await _dispatch(handler, req, conn)))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        for cb in conn.on_close:
            cb()
        await _close(writer)


async def _dispatch(handler: Handler, req: dict[str, Any], conn: Conn) -> dict[str, Any]:
    try:
        result = handler(req, conn)
        if inspect.isawaitable(result):
            result = await result
    except OSError as e:
        return error_reply(e)
    except (KeyError, TypeError, ValueError) as e:
        # A request missing an argument or carrying the wrong type: the
        # caller's fault, so EINVAL as a syscall with bad arguments would.
        return error_reply(OSError(errno.EINVAL, f"bad {req.get('op')!r} request: {e!r}"))
    out = {"ok": True}
    if result:
        out.update(result)
    return out


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
