"""The load client: one plain-Python program run unchanged against every server.

    python -m shardstack.bench.client MODE --host H --port P --seconds S --max-ops N ...

It uses only the standard `socket`/`selectors` modules and the kernel's TCP in
the client namespace, so the kernel's figure and shardstack's come from the
very same code. It writes JSON lines to stdout: `{"type": "tick", "t", "ops",
"bytes", ...}` every TICK seconds (cumulative counts, plus the latency
percentiles of the last interval) and one final `{"type": "result", ...}`.

Modes:
  bulk-send  one connection, send until the deadline or max-bytes, then FIN and
             wait for the server's FIN (so every byte was taken): upload rate.
             With --acked: stop at the deadline, count what the server
             acknowledged (the send queue subtracted), reset the flow.
  bulk-recv  one connection, ask the source service for max-bytes (`SEND n\\n`)
             and read until the deadline or EOF: download rate.
  crr        `--conns` concurrent slots, each: connect, send `--size` bytes,
             read `--size` bytes back, close; transactions/s and their latency.
  rr         one connection, TCP_NODELAY, `--size`-byte ping-pong; latency.
  http       `--conns` concurrent HTTP/1.0 GETs of `--path` (http.server closes
             after each): requests/s, body bytes/s; checks status and length.
  probe      connect until the service answers (at most --seconds), then close.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import selectors
import socket
import struct
import sys
import termios
import time
from array import array

from shardstack.bench.aggregate import latency_summary, rate

TICK = 0.25
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 5.0  # a single blocking send/recv that takes longer is a failure
TXN_TIMEOUT = 3.0  # one crr/http transaction
DRAIN_TIMEOUT = 10.0  # bulk-send: wait for the server's FIN after ours
MAX_ERRORS = 2000
MAX_SAMPLES = 4_000_000  # latency samples kept (bounded memory)
CHUNK = 256 * 1024


class Reporter:
    """Cumulative counters, latency samples and the JSON-lines output."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.start = time.perf_counter()
        self.ops = 0
        self.nbytes = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.lat_us = array("d")
        self._tick_from = 0
        self._next_tick = self.start + TICK

    def now(self) -> float:
        return time.perf_counter()

    def sample(self, us: float) -> None:
        if len(self.lat_us) < MAX_SAMPLES:
            self.lat_us.append(us)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if self.errors >= MAX_ERRORS:
            raise RuntimeError(f"too many errors ({self.errors}): {self.error_kinds}")

    def maybe_tick(self, now: float) -> None:
        if now >= self._next_tick:
            self.tick(now)

    def tick(self, now: float) -> None:
        self._next_tick = now + TICK
        msg = {"type": "tick", "t": round(now - self.start, 4), "ops": self.ops,
               "bytes": self.nbytes, "errors": self.errors}
        window = sorted(self.lat_us[self._tick_from:])
        self._tick_from = len(self.lat_us)
        if window:
            s = latency_summary(window, (50.0, 99.0))
            msg["p50_us"] = round(s["p50"], 1)
            msg["p99_us"] = round(s["p99"], 1)
        self.emit(msg)

    def emit(self, msg: dict) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def result(self, mode: str, elapsed: float | None = None, **extra) -> dict:
        elapsed = self.now() - self.start if elapsed is None else elapsed
        self.tick(self.start + elapsed)
        res = {"type": "result", "mode": mode, "elapsed": elapsed, "ops": self.ops,
               "bytes": self.nbytes, "ops_per_s": rate(self.ops, elapsed),
               "bytes_per_s": rate(self.nbytes, elapsed), "errors": self.errors,
               "error_kinds": self.error_kinds}
        if self.lat_us:
            for k, v in latency_summary(self.lat_us).items():
                res["latency_count" if k == "count" else f"{k}_us"] = v
        res.update(extra)
        self.emit(res)
        return res


# -- single-connection modes ---------------------------------------------------------------


CC: bytes | None = None  # --cc: TCP_CONGESTION for every socket, set before connect


def _connect(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if CC:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CC)
        s.settimeout(CONNECT_TIMEOUT)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    s.settimeout(IO_TIMEOUT)
    return s


def bulk_send(a: argparse.Namespace, rep: Reporter) -> dict:
    s = _connect(a.host, a.port)
    buf = memoryview(bytearray(b"x" * CHUNK))
    deadline = rep.start + a.seconds
    with s:
        now = rep.now()
        while now < deadline and rep.nbytes < a.max_bytes:
            n = s.send(buf[: min(CHUNK, a.max_bytes - rep.nbytes)])
            rep.nbytes += n
            rep.ops += 1
            now = rep.now()
            rep.maybe_tick(now)
        sent_at = now
        if a.acked:
            return _bulk_send_acked(s, rep, sent_at)
        s.shutdown(socket.SHUT_WR)
        # Wait for the server's FIN: only then has it read every byte we sent.
        s.settimeout(DRAIN_TIMEOUT)
        try:
            while s.recv(65536):
                pass
            eof = True
        except TimeoutError:
            eof = False
    elapsed = (rep.now() if eof else sent_at) - rep.start
    return rep.result("bulk-send", elapsed, server_eof=eof)


def _bulk_send_acked(s: socket.socket, rep: Reporter, sent_at: float) -> dict:
    """Stop at the deadline and count only what the server acknowledged: the
    bytes still in our send queue (SIOCOUTQ: unsent + unacknowledged) are
    taken off, and the flow is reset rather than drained (on a lossy, slow
    link the kernel's send buffer can hold many seconds of data)."""
    outq = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    sent = rep.nbytes
    rep.nbytes = max(0, sent - outq)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return rep.result("bulk-send", sent_at - rep.start, acked=True, queued_at_end=outq,
                      handed_to_kernel=sent)


def bulk_recv(a: argparse.Namespace, rep: Reporter) -> dict:
    s = _connect(a.host, a.port)
    buf = bytearray(1024 * 1024)
    deadline = rep.start + a.seconds
    eof = False
    with s:
        s.sendall(b"SEND %d\n" % a.max_bytes)
        now = rep.now()
        while now < deadline and rep.nbytes < a.max_bytes:
            n = s.recv_into(buf)
            if n == 0:
                eof = True
                break
            rep.nbytes += n
            rep.ops += 1
            now = rep.now()
            rep.maybe_tick(now)
        elapsed = rep.now() - rep.start
        # Stopping early: RST the flow (SO_LINGER 0) rather than drain gigabytes.
        if not eof:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return rep.result("bulk-recv", elapsed, server_eof=eof)


def rr(a: argparse.Namespace, rep: Reporter) -> dict:
    s = _connect(a.host, a.port)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"r" * a.size
    buf = bytearray(a.size)
    view = memoryview(buf)
    deadline = rep.start + a.seconds
    clock = time.perf_counter_ns
    with s:
        now = rep.now()
        while now < deadline and rep.ops < a.max_ops:
            t0 = clock()
            s.sendall(msg)
            got = 0
            while got < a.size:
                n = s.recv_into(view[got:])
                if n == 0:
                    raise ConnectionResetError(errno.ECONNRESET, "echo server closed")
                got += n
            rep.sample((clock() - t0) / 1000.0)
            rep.ops += 1
            rep.nbytes += a.size
            now = rep.now()
            rep.maybe_tick(now)
    return rep.result("rr", slow_count=_slow_count(rep.lat_us))


#: A round trip this much over the median waited for a retransmission
#: (a probe timeout or an RTO: 200 ms and more on Linux and on the stack).
SLOW_OVER_P50_US = 100_000.0


def _slow_count(lat_us) -> int:
    """How many round trips took over p50 + 100 ms: those that met a loss."""
    if not lat_us:
        return 0
    p50 = sorted(lat_us)[len(lat_us) // 2]
    return sum(1 for v in lat_us if v > p50 + SLOW_OVER_P50_US)


def udp_rr(a: argparse.Namespace, rep: Reporter) -> dict:
    """UDP request/response: one datagram out, its echo back, one at a time.
    A datagram lost either way costs its 0.5 s timeout and counts as an error."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((a.host, a.port))
    s.settimeout(0.5)
    msg = b"u" * a.size
    deadline = rep.start + a.seconds
    clock = time.perf_counter_ns
    with s:
        now = rep.now()
        while now < deadline and rep.ops < a.max_ops:
            t0 = clock()
            s.send(msg)
            try:
                data = s.recv(a.size + 1)
            except TimeoutError:
                rep.error("lost")
            else:
                if len(data) != a.size:
                    rep.error("short")
                else:
                    rep.sample((clock() - t0) / 1000.0)
                    rep.ops += 1
                    rep.nbytes += a.size
            now = rep.now()
            rep.maybe_tick(now)
    return rep.result("udp-rr")


def udp_probe(a: argparse.Namespace, rep: Reporter) -> dict:
    """Whether a UDP echo answers at host:port (the probe of a UDP service)."""
    deadline = rep.start + a.seconds
    attempts = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while attempts < 1000:
            attempts += 1
            try:
                s.sendto(b"probe", (a.host, a.port))
                if s.recvfrom(64)[0] == b"probe":
                    return rep.result("udp-probe", attempts=attempts, ok=True)
            except OSError:
                pass
            if rep.now() >= deadline:
                break
    return rep.result("udp-probe", attempts=attempts, ok=False)


def probe(a: argparse.Namespace, rep: Reporter) -> dict:
    deadline = rep.start + a.seconds
    attempts = 0
    last = ""
    while attempts < 1000:
        attempts += 1
        try:
            with socket.create_connection((a.host, a.port), timeout=1.0):
                return rep.result("probe", attempts=attempts, ok=True)
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if rep.now() >= deadline:
            break
        time.sleep(0.1)
    return rep.result("probe", attempts=attempts, ok=False, last_error=last)


# -- many-connection modes (one selector loop, like a load generator's event loop) ----------


class _Txn:
    """One crr or http transaction on one non-blocking socket."""

    __slots__ = ("sock", "t0", "out", "inbuf", "want", "state")

    def __init__(self, sock: socket.socket, t0: float, out: bytes, want: int):
        self.sock = sock
        self.t0 = t0
        self.out = memoryview(out)
        self.inbuf = bytearray()
        self.want = want  # bytes to read before done; -1: until EOF
        self.state = "connecting"


def _start_txn(sel: selectors.BaseSelector, a: argparse.Namespace, rep: Reporter,
               request: bytes, want: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    if a.mode == "crr":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if CC:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CC)
    txn = _Txn(s, rep.now(), request, want)
    rc = s.connect_ex((a.host, a.port))
    if rc not in (0, errno.EINPROGRESS):
        s.close()
        rep.error(errno.errorcode.get(rc, str(rc)))
        return
    sel.register(s, selectors.EVENT_WRITE, txn)


def _finish(sel: selectors.BaseSelector, txn: _Txn) -> None:
    sel.unregister(txn.sock)
    txn.sock.close()


def _step(sel: selectors.BaseSelector, txn: _Txn, rep: Reporter, a: argparse.Namespace,
          now: float) -> bool:
    """Advance one transaction on readiness; True when it completed (ok or failed)."""
    s = txn.sock
    if txn.state == "connecting":
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            _finish(sel, txn)
            rep.error(errno.errorcode.get(err, str(err)))
            return True
        txn.state = "sending"
    if txn.state == "sending":
        try:
            n = s.send(txn.out)
        except BlockingIOError:
            return False
        except OSError as e:
            _finish(sel, txn)
            rep.error(errno.errorcode.get(e.errno or 0, "send"))
            return True
        txn.out = txn.out[n:]
        if not txn.out:
            txn.state = "reading"
            sel.modify(s, selectors.EVENT_READ, txn)
        return False
    try:
        chunk = s.recv(262144)
    except BlockingIOError:
        return False
    except OSError as e:
        _finish(sel, txn)
        rep.error(errno.errorcode.get(e.errno or 0, "recv"))
        return True
    if chunk:
        txn.inbuf += chunk
        if txn.want < 0 or len(txn.inbuf) < txn.want:
            return False
    _finish(sel, txn)
    ok, body = _check_reply(txn, a)
    if not ok:
        rep.error("bad-reply" if body else "short-reply")
        return True
    rep.ops += 1
    rep.nbytes += body
    rep.sample((rep.now() - txn.t0) * 1e6)
    return True


def _check_reply(txn: _Txn, a: argparse.Namespace) -> tuple[bool, int]:
    """(ok, payload bytes) of a finished transaction."""
    if a.mode == "crr":
        return len(txn.inbuf) == a.size, len(txn.inbuf)
    head, sep, body = bytes(txn.inbuf).partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
        return False, 1
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is not None and length != len(body):
        return False, 1
    return True, len(body)


def many(a: argparse.Namespace, rep: Reporter) -> dict:
    """crr and http: keep `conns` transactions in flight until the deadline or max-ops."""
    if a.mode == "crr":
        request, want = b"q" * a.size, a.size
    else:
        request = f"GET {a.path} HTTP/1.0\r\nHost: {a.host}\r\n\r\n".encode()
        want = -1
    sel = selectors.DefaultSelector()
    deadline = rep.start + a.seconds
    started = 0
    now = rep.now()
    while True:
        while (len(sel.get_map()) < a.conns and now < deadline and started < a.max_ops):
            started += 1
            _start_txn(sel, a, rep, request, want)
        if not sel.get_map():
            break
        for key, _ in sel.select(timeout=0.05):
            _step(sel, key.data, rep, a, now)
        now = rep.now()
        rep.maybe_tick(now)
        if now >= deadline + TXN_TIMEOUT:
            break
        if now >= deadline:
            _expire(sel, rep, now)
    for key in list(sel.get_map().values()):
        _finish(sel, key.data)
        rep.error("unfinished")
    sel.close()
    return rep.result(a.mode, min(now, deadline + TXN_TIMEOUT) - rep.start, conns=a.conns)


def _expire(sel: selectors.BaseSelector, rep: Reporter, now: float) -> None:
    for key in list(sel.get_map().values()):
        if now - key.data.t0 > TXN_TIMEOUT:
            _finish(sel, key.data)
            rep.error("timeout")


MODES = {"bulk-send": bulk_send, "bulk-recv": bulk_recv, "rr": rr, "crr": many, "http": many,
         "probe": probe, "udp-rr": udp_rr, "udp-probe": udp_probe}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shardstack.bench.client",
                                description="shardstack bench load client (JSON lines out)")
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=3.0, help="time bound of the load loop")
    p.add_argument("--max-ops", type=int, default=1_000_000, help="count bound of the load loop")
    p.add_argument("--max-bytes", type=int, default=1 << 34, help="byte bound (bulk modes)")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--path", default="/")
    p.add_argument("--cc", help="congestion control for every socket (TCP_CONGESTION, "
                   "e.g. cubic; needs CAP_NET_ADMIN for one not in the allowed list)")
    p.add_argument("--acked", action="store_true",
                   help="bulk-send: count only bytes acknowledged by the deadline, then reset")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.seconds <= 0 or a.seconds > 3600 or a.max_ops < 1 or a.conns < 1 or a.size < 1:
        print("client: bad bounds", file=sys.stderr)
        return 2
    global CC
    CC = a.cc.encode() if a.cc else None
    rep = Reporter()
    try:
        MODES[a.mode](a, rep)
    except (OSError, RuntimeError) as e:
        rep.emit({"type": "error", "error": f"{type(e).__name__}: {e}", "ops": rep.ops,
                  "bytes": rep.nbytes, "t": rep.now() - rep.start})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
