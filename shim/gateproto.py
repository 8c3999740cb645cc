"""The wire contract between the shim (app side) and the appgate (worker side).

Both halves import this module, so the contract lives in one place
(docs/shim.md explains the design; docs/architecture.md "Runtime" the files).

An application's TCP connection is one AF_UNIX stream: the app holds end A,
the worker end W. Bytes on it are the TCP payload, nothing else, so the app's
data path is plain C (`recv`, `sendfile`, OpenSSL) and never framed.
What must travel besides the payload goes elsewhere:

- *Addresses of an accepted connection*: the worker binds W, before it
  connects to the app's listener, to an abstract name that spells the
  connection (`encode_conn_name`). `getpeername()` on A returns it, so
  `accept()` in the app learns both TCP endpoints with no round trip.
- *Active open*: the shim connects A to `worker-<i>.sock` and sends one framed
  request (`pack`, the same framing as `shardstack.control`) carrying A's own
  fd as SCM_RIGHTS. The worker answers with one framed reply (local address
  and port, or an errno), having first shrunk A's SO_SNDBUF and filled it, so
  A is not writable until the handshake ends (see appgate for the trick).
- *Errors*: a connection that dies (handshake refused or timed out, RST,
  retransmission timeout) gets one out-of-band byte (MSG_OOB on AF_UNIX,
  Linux >= 5.15) holding the errno, then W is closed while still holding
  unread bytes of A's, which makes the kernel set ECONNRESET on A (it does so
  when a stream peer closes with unread data). The shim's
  `getsockopt(SO_ERROR)` reads the exact errno from the OOB byte. When no
  byte of A's could be held unread (the app never wrote, or last wrote a
  lot), A just sees EOF, and the OOB byte is gone with the read that
  returned it; the shim's recv wrappers then ask the worker on the ctl
  stream (`{"op": "status", token}` -> `{errno, alive}`).
- *Options* after the connection exists (setsockopt/getsockopt on the shard
  socket): a per-process control stream to `worker-<i>.sock` ("ctl" request),
  addressing the connection by its token. getsockopt(TCP_INFO) answers with
  the engine's `struct tcp_info` as bytes (core.tcp_info).
- *Lingering close* (SO_LINGER {1, N > 0}): after closing A, the shim sends
  `{"op": "linger", token, timeout}` as the first request on a fresh stream
  to `worker-<i>.sock`; the worker answers `{ok, done, state}` once the
  connection left FIN-WAIT-1/CLOSING/LAST-ACK (its FIN is acknowledged),
  at once if A is still open elsewhere, else after `timeout` seconds, and
  hangs up.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Any, NamedTuple

import msgpack

HEADER = struct.Struct("!I")  # the control plane's framing: length, then msgpack map
MAX_MESSAGE = 1 << 20

# The abstract-namespace prefix of a worker-side connection name. The leading
# NUL puts it in the abstract namespace (unix(7)): nothing on disk to clean up.
NAME_PREFIX = b"\0shardstack/c/"

# Options the shim forwards to the shard socket (everything else on a stack
# socket is answered from local state, as the kernel would from its own).
IPPROTO_TCP = socket.IPPROTO_TCP
SOL_SOCKET = socket.SOL_SOCKET
TCP_FORWARDED = {
    socket.TCP_NODELAY, socket.TCP_MAXSEG, socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL,
    socket.TCP_KEEPCNT, getattr(socket, "TCP_CORK", 3), getattr(socket, "TCP_QUICKACK", 12),
    getattr(socket, "TCP_USER_TIMEOUT", 18), getattr(socket, "TCP_CONGESTION", 13),
    getattr(socket, "TCP_SYNCNT", 7), getattr(socket, "TCP_LINGER2", 8),
    getattr(socket, "TCP_WINDOW_CLAMP", 10),
}
SOL_FORWARDED = {
    socket.SO_KEEPALIVE, socket.SO_RCVBUF, socket.SO_SNDBUF, socket.SO_LINGER,
    socket.SO_REUSEADDR, socket.SO_REUSEPORT,
    getattr(socket, "SO_MAX_PACING_RATE", 47),  # the engine paces (core/tcp_pacing.py)
}

# Errnos a dying connection may report through the OOB byte (all < 256).
CONN_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE,
               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED)


class ProtoError(ValueError):
    """A malformed gate message or connection name."""


class ConnName(NamedTuple):
    """What the worker-side name of a connection spells."""

    worker: int
    token: int
    laddr: str
    lport: int
    raddr: str
    rport: int


def pack(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_frames(buf: bytearray) -> list[dict[str, Any]]:
    """Pop every complete frame off the front of `buf` (in place)."""
    out = []
    while len(buf) >= HEADER.size:
        (n,) = HEADER.unpack_from(buf)
        if n > MAX_MESSAGE:
            raise ProtoError(f"gate message of {n} bytes")
        if len(buf) < HEADER.size + n:
            break
        body = bytes(buf[HEADER.size:HEADER.size + n])
        del buf[:HEADER.size + n]
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ProtoError("bad msgpack") from None
        if not isinstance(msg, dict):
            raise ProtoError("gate message is not a map")
        out.append(msg)
    return out


def encode_conn_name(n: ConnName) -> bytes:
    """The abstract AF_UNIX name the worker binds W to (< 108 bytes)."""
    text = f"{n.worker}/{n.token}/{n.laddr}:{n.lport}/{n.raddr}:{n.rport}"
    return NAME_PREFIX + text.encode("ascii")


def decode_conn_name(raw: bytes | str) -> ConnName:
    """Inverse of encode_conn_name; ProtoError if `raw` is not such a name."""
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not raw.startswith(NAME_PREFIX):
        raise ProtoError("not a shardstack connection name")
    try:
        worker, token, local, remote = raw[len(NAME_PREFIX):].decode("ascii").split("/")
        laddr, lport = _split_hostport(local)
        raddr, rport = _split_hostport(remote)
        return ConnName(int(worker), int(token), laddr, lport, raddr, rport)
    except (ValueError, UnicodeDecodeError):
        raise ProtoError("malformed shardstack connection name") from None


def listener_file(bind_id: int, addr: str, port: int) -> str:
    """The file name, under <run-dir>/l/, of the AF_UNIX socket that stands for
    a bound stack socket and then listens for it: it spells the bind, so the
    fd alone tells what it is in any process it reaches (multiprocessing
    spawn pickles a socket as its fd)."""
    return f"{bind_id}_{addr}_{port}.sock"


def parse_listener_path(path: str) -> tuple[int, str, int] | None:
    """(bind_id, addr, port) of a path listener_file() named under an `l/`
    directory, else None."""
    head, _, name = path.rpartition("/")
    if not head.endswith("/l") or not name.endswith(".sock"):
        return None
    try:
        bind_id, addr, port = name[:-5].split("_")
        host, p = _split_hostport(f"{addr}:{port}")
        return int(bind_id), host, p
    except ValueError:
        return None


def _split_hostport(text: str) -> tuple[str, int]:
    """'host:port', the port after the last colon (an IPv6 host has colons)."""
    host, _, port = text.rpartition(":")
    p = int(port)
    if not 0 <= p <= 0xFFFF:
        raise ValueError(port)
    return ip_str(host), p


def ip_str(addr: int | str, v6: bool = False) -> str:
    """'a.b.c.d', or an IPv6 address's text, from the engine's int form (or
    a string, normalised). The engine's ints tell the families apart by size
    (IPv6 ones are above 2**32, core.tcp_h.V4_ADDR_MAX); `v6` says how to
    spell the ambiguous 0 (`::` rather than `0.0.0.0`)."""
    if isinstance(addr, str):
        if ":" not in addr:
            return str(ipaddress.IPv4Address(addr))
        addr, v6 = int(ipaddress.IPv6Address(addr)), True
    if addr >> 32 == 0xFFFF:
        # v4-mapped as Linux (inet_ntop) and Python 3.13 spell it: ::ffff:a.b.c.d
        return "::ffff:" + str(ipaddress.IPv4Address(addr & 0xFFFFFFFF))
    if addr > 0xFFFFFFFF or (v6 and addr == 0):
        return str(ipaddress.IPv6Address(addr))
    return str(ipaddress.IPv4Address(addr))


def ip_int(addr: int | str) -> int:
    """The engine's int of an address's text (IPv4 or IPv6), or an int as is."""
    if isinstance(addr, int):
        return addr
    return int(ipaddress.ip_address(addr))
