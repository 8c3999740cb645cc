"""`shardstack trace`: the engine's call-graph trace of a port or a connection, live.

The engine (core) records the names of the Linux functions it mirrors while
`Shard.tracing` is on (`Shard.trace()` hands them out; names as in the
team's callgraph.md). Tracing a whole worker would cost every connection,
so a worker attaches a `PortTracer` only while someone asks for it: it wraps
`shard.receive_batch` (on top of the load accounting's wrapper) and passes a
TCP segment to or from the port through the shard on its own, with tracing
on around that one call, so the names recorded are what the engine did for
that segment (lookup, state machine, and what it sent in answer). Other
segments of the batch go through untraced, in order. Detached, nothing of
this is on the hot path: the wrapper is removed and the engine's tracing
flag is off, as it is for a stack nobody traces.

Names only: what the engine does from a timer or an app's call (a
retransmission, accept, send) is not attributed to a port and is not shown.

The supervisor attaches one tracer per worker (a port's connections live on
every worker) under a trace id, collects their events (`trace_take`), and
detaches them when the CLI says so or its control connection closes.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections import deque
from typing import Any

from shardstack.core.wire.tcp import flags_to_str

MAX_EVENTS = 4096  # per tracer between two takes; older ones are dropped (counted)
_PORTS = struct.Struct("!HH")
_SEQ = struct.Struct("!II")


def _tcp_at(frame) -> tuple[int, int, int, int] | None:
    """(TCP's offset, source, destination, IP packet length) of a TCP/IPv4
    packet, or of a TCP/IPv6 one with TCP as the first next header (issue
    14), else None."""
    try:
        if frame[0] >> 4 == 6:
            if frame[6] != 6:
                return None
            return (40, int.from_bytes(frame[8:24], "big"), int.from_bytes(frame[24:40], "big"),
                    40 + int.from_bytes(frame[4:6], "big"))
        if frame[9] != 6:
            return None
        return ((frame[0] & 15) * 4, int.from_bytes(frame[12:16], "big"),
                int.from_bytes(frame[16:20], "big"), int.from_bytes(frame[2:4], "big"))
    except IndexError:
        return None


def _addr_text(a: int) -> str:
    if a > 0xFFFFFFFF:
        return f"[{ipaddress.IPv6Address(a)}]"
    return str(ipaddress.IPv4Address(a))


def segment_summary(frame) -> str | None:
    """`A:P > B:Q FLAGS seq S ack A len N` of a TCP packet (IPv6 addresses
    in brackets), or None."""
    at = _tcp_at(frame)
    if at is None:
        return None
    l4, src, dst, total = at
    try:
        sport, dport = _PORTS.unpack_from(frame, l4)
        seq, ack = _SEQ.unpack_from(frame, l4 + 4)
        doff = (frame[l4 + 12] >> 4) * 4
        flags = frame[l4 + 13]
    except (IndexError, struct.error):
        return None
    n = max(0, min(total, len(frame)) - l4 - doff)
    return (f"{_addr_text(src)}:{sport} > {_addr_text(dst)}:{dport} {flags_to_str(flags)} "
            f"seq {seq} ack {ack} len {n}")


def _ports(frame) -> tuple[int, int] | None:
    at = _tcp_at(frame)
    if at is None:
        return None
    try:
        return _PORTS.unpack_from(frame, at[0])
    except struct.error:
        return None


def set_tracing(shard: Any, on: bool) -> None:
    """Turn the engine's trace on or off at run time (Shard's own switch:
    `tracing`, and the bind/lookup table's `trace` list)."""
    shard.tracing = on
    shard.h.trace = shard._trace if on else None
    if not on:
        shard._trace.clear()


class Session:
    """One `shardstack trace` attached to this worker: its port, or one
    connection (`conn` = (laddr, lport, raddr, rport), ints, the stack's
    side first, and `port` its lport), and the events not yet taken (at most
    MAX_EVENTS; older ones dropped and counted)."""

    __slots__ = ("port", "conn", "events", "dropped")

    def __init__(self, port: int, conn: tuple[int, int, int, int] | None = None) -> None:
        self.port = port
        self.conn = conn
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.dropped = 0

    def matches(self, src: int, sport: int, dst: int, dport: int) -> bool:
        """A received segment (src -> dst) of this session's port or connection."""
        if self.conn is None:
            return self.port in (sport, dport)
        return self.conn == (dst, dport, src, sport)


class Tracer:
    """A worker's port traces: attached while at least one session exists."""

    def __init__(self, shard: Any, worker: int) -> None:
        self.shard = shard
        self.worker = worker
        self.sessions: dict[int, Session] = {}
        self._ports: frozenset[int] = frozenset()
        self._inner = None

    def start(self, tid: int, port: int, conn: tuple[int, int, int, int] | None = None) -> None:
        self.sessions[tid] = Session(port, conn)
        self._ports = frozenset(s.port for s in self.sessions.values())
        if self._inner is None:
            # Wrap whatever receive_batch is now (the load accounting's hook).
            self._inner = self.shard.receive_batch
            self.shard.receive_batch = self._receive_batch

    def stop(self, tid: int) -> None:
        self.sessions.pop(tid, None)
        self._ports = frozenset(s.port for s in self.sessions.values())
        if not self.sessions and self._inner is not None:
            self.shard.receive_batch = self._inner
            self._inner = None
            set_tracing(self.shard, False)

    def take(self, tid: int) -> tuple[list[dict[str, Any]], int]:
        sess = self.sessions.get(tid)
        if sess is None:
            return [], 0
        out = list(sess.events)
        sess.events.clear()
        dropped, sess.dropped = sess.dropped, 0
        return out, dropped

    def _receive_batch(self, packets, now, csum_ok=None):
        inner = self._inner
        ports = self._ports
        run: list = []
        for p in packets:
            pp = _ports(p)
            if pp is None or (pp[0] not in ports and pp[1] not in ports):
                run.append(p)
                continue
            if run:
                inner(run, now, csum_ok)
                run = []
            self._traced(inner, p, pp, now, csum_ok)
        if run:
            inner(run, now, csum_ok)

    def _traced(self, inner, packet, pp, now, csum_ok) -> None:
        shard = self.shard
        set_tracing(shard, True)
        try:
            inner([packet], now, csum_ok)
            calls = shard.trace()
        finally:
            set_tracing(shard, False)
        ev = {"worker": self.worker, "t": time.time(), "dir": "in",
              "segment": segment_summary(packet) or "?", "calls": [_plain(c) for c in calls]}
        at = _tcp_at(packet)
        src, dst = (at[1], at[2]) if at is not None else (0, 0)
        for sess in self.sessions.values():
            if sess.matches(src, pp[0], dst, pp[1]):
                if len(sess.events) == MAX_EVENTS:
                    sess.dropped += 1
                sess.events.append(ev)


def _plain(entry: Any) -> Any:
    """A trace entry for msgpack: a name, or (depth, name) if the engine gives depth."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, tuple | list):
        return [_plain(x) for x in entry]
    return str(entry)


def format_event(ev: dict[str, Any]) -> str:
    """One traced segment: a header line, then the calls indented (by their
    depth when the engine reports one, else one level)."""
    t = time.strftime("%H:%M:%S", time.localtime(ev["t"])) + f".{int(ev['t'] * 1e6) % 1000000:06d}"
    lines = [f"{t} w{ev['worker']} {ev['dir']} {ev['segment']}"]
    for c in ev["calls"]:
        if isinstance(c, list) and len(c) == 2 and isinstance(c[0], int):
            lines.append("  " * (1 + c[0]) + str(c[1]))
        else:
            lines.append("  " + str(c))
    return "\n".join(lines)


def control(worker: Any, op: str, req: dict[str, Any]) -> dict[str, Any]:
    """A worker's trace ops (worker-<i>.ctl): trace_start {tid, port, conn?}
    (conn: [laddr, lport, raddr, rport], ints), trace_take {tid} -> {events,
    dropped}, trace_stop {tid}."""
    tracer = getattr(worker, "tracer", None)
    if tracer is None:
        tracer = worker.tracer = Tracer(worker.shard, worker.wid)
    tid = int(req["tid"])
    if op == "trace_start":
        port = int(req["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        conn = req.get("conn")
        tracer.start(tid, port, tuple(int(x) for x in conn) if conn else None)
        return {}
    if op == "trace_take":
        events, dropped = tracer.take(tid)
        return {"events": events, "dropped": dropped}
    if op == "trace_stop":
        tracer.stop(tid)
        return {}
    raise ValueError(f"unknown trace op {op!r}")


def parse_conn(text: str) -> tuple[int, int, int, int]:
    """`LADDR:LPORT-RADDR:RPORT` (the stack's side first, as `shardstack ss`
    prints Local then Peer) -> four ints; ValueError if malformed."""
    import ipaddress

    try:
        local, remote = text.split("-")
        la, lp = local.rsplit(":", 1)
        ra, rp = remote.rsplit(":", 1)
        out = (int(ipaddress.IPv4Address(la)), int(lp), int(ipaddress.IPv4Address(ra)), int(rp))
    except ValueError:
        raise ValueError(f"bad connection {text!r}: expected LADDR:LPORT-RADDR:RPORT") from None
    if not (1 <= out[1] <= 65535 and 1 <= out[3] <= 65535):
        raise ValueError(f"bad connection {text!r}: ports are 1..65535")
    return out
