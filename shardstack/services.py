"""Built-in services that run inside each worker on shard sockets.

Echo (RFC 862) sends back every byte it receives until the peer closes; discard
(RFC 863) throws everything away. Like the stack's listeners in general they
are replicated on every worker (SO_REUSEPORT style), so a connection is served
by the worker its flow hashes to, with no process hop.

They drive `core.Shard` directly through its sans-I/O API and its edge-
triggered events (core.events): Acceptable → accept until None; Readable →
recv until None; Writable → push what was left. Echo applies backpressure the
way a careful server does: while it holds unsent bytes it stops reading, so a
slow reader shrinks our advertised window instead of growing our memory.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from shardstack.core import events as ev

RECV_CHUNK = 256 * 1024
LISTEN_BACKLOG = 1024
ECHO = "echo"
DISCARD = "discard"


@dataclass(slots=True)
class _Conn:
    kind: str
    pending: bytearray = field(default_factory=bytearray)
    eof: bool = False  # peer sent FIN
    shut: bool = False  # we sent ours


@dataclass(slots=True)
class ServiceStats:
    accepted: int = 0
    bytes_in: int = 0
    bytes_echoed: int = 0
    closed: int = 0
    errors: int = 0


class Services:
    """The echo and discard services of one worker's shard."""

    def __init__(self, shard, addr: int, v6: bool = False) -> None:
        self.shard = shard
        self.addr = addr
        self.v6 = v6  # a dual-stack AF_INET6 listener (`::` takes IPv4 too)
        self.listeners: dict[int, str] = {}  # listening sd -> kind
        self.conns: dict[int, _Conn] = {}
        self.stats = ServiceStats()

    def install(self, kind: str, port: int) -> int:
        """Listen on (addr, port) for `kind` (ECHO or DISCARD)."""
        shard = self.shard
        sd = shard.socket(socket.AF_INET6 if self.v6 else socket.AF_INET)
        shard.setsockopt(sd, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shard.bind(sd, self.addr, port)
        shard.listen(sd, LISTEN_BACKLOG)
        self.listeners[sd] = kind
        return sd

    def owns(self, sd: int) -> bool:
        return sd in self.conns or sd in self.listeners

    def on_event(self, e: ev.Event, now: float) -> None:
        sd = e.sd
        if sd in self.listeners:
            if isinstance(e, ev.Acceptable):
                self._accept(sd)
            return
        conn = self.conns.get(sd)
        if conn is None:
            return
        if isinstance(e, ev.Readable):
            self._read(sd, conn, now)
        elif isinstance(e, ev.Writable):
            self._write(sd, conn, now)
            if not conn.pending and not conn.eof:
                self._read(sd, conn, now)
        elif isinstance(e, ev.SocketError):
            self.stats.errors += 1
            self._close(sd, now)
        elif isinstance(e, ev.Closed):
            self.conns.pop(sd, None)

    def _accept(self, lsd: int) -> None:
        kind = self.listeners[lsd]
        accept = self.shard.accept
        while (got := accept(lsd)) is not None:
            self.conns[got[0]] = _Conn(kind)
            self.stats.accepted += 1

    def _read(self, sd: int, conn: _Conn, now: float) -> None:
        recv = self.shard.recv
        stats = self.stats
        while not conn.pending:
            data = recv(sd, RECV_CHUNK)
            if data is None:
                return
            if not data:
                conn.eof = True
                break
            stats.bytes_in += len(data)
            if conn.kind == ECHO:
                n = self.shard.send(sd, data, now)
                stats.bytes_echoed += n
                if n < len(data):
                    conn.pending += memoryview(data)[n:]
        if conn.eof and not conn.pending:
            self._close(sd, now)

    def _write(self, sd: int, conn: _Conn, now: float) -> None:
        if conn.pending:
            n = self.shard.send(sd, bytes(conn.pending), now)
            if n:
                del conn.pending[:n]
                self.stats.bytes_echoed += n
        if conn.eof and not conn.pending:
            self._close(sd, now)

    def _close(self, sd: int, now: float) -> None:
        if self.conns.pop(sd, None) is not None:
            self.stats.closed += 1
            self.shard.close(sd, now)

    # -- migration (shardstack.migrate) ---------------------------------------------

    def export(self, sds: set[int]) -> list[dict]:
        """Let go of our connections among `sds` (the engine exported them)."""
        out = []
        for sd in sorted(sds):
            c = self.conns.pop(sd, None)
            if c is not None:
                out.append({"sd": sd, "kind": c.kind, "pending": bytes(c.pending),
                            "eof": c.eof, "shut": c.shut})
        return out

    def adopt(self, entries: list[dict], sdmap: dict[int, int], now: float) -> int:
        """Take over exported connections under their new descriptors, and
        accept children that arrived in our listeners' queues."""
        taken = 0
        for e in entries:
            sd = sdmap.get(e["sd"])
            if sd is None:
                continue
            c = _Conn(e["kind"], bytearray(e["pending"]), bool(e["eof"]), bool(e["shut"]))
            self.conns[sd] = c
            taken += 1
            self._write(sd, c, now)
            if sd in self.conns and not c.pending and not c.eof:
                self._read(sd, c, now)
        for lsd in list(self.listeners):
            self._accept(lsd)
        return taken

    def close_all(self, now: float) -> None:
        for sd in list(self.conns):
            self._close(sd, now)
        for sd in list(self.listeners):
            self.shard.close(sd, now)
        self.listeners.clear()
