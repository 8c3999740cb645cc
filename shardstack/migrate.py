"""Moving RETA buckets between live workers, connections and all (issue 15).

A bucket b moves from worker A to worker B in four steps, driven by the
supervisor (`Supervisor._move`); docs/architecture.md "Moving a bucket" has
the picture. The worker's half lives here:

1. **hold** (B): frames of bucket b that reach B are kept, in arrival order,
   instead of going to the shard (which knows none of b's connections yet and
   would answer them with RST, tcp_v4_send_reset).
2. The supervisor switches RETA[b] to B (the TUN steering map, the fanout
   program, netio's Dispatcher): from now on the kernel steers b's frames to B.
3. **export** (A): A drains what the kernel had already queued for it (those
   frames were steered before the switch), then takes the bucket's TCP state
   out of its shard (`Shard.migrate_out`, core/tcp_migrate.py) and, for every
   connection an app owns, its appgate state (bytes read from the app but not
   taken by the engine, bytes taken from the engine but not written to the app,
   the one-byte-late consumption, EOF flags, the listener it came from) and
   the worker's end of the app's AF_UNIX stream, which goes to B with
   SCM_RIGHTS: the app's descriptor never changes. Built-in service
   connections (echo/discard) carry their own few fields. From then on a frame
   of b that still reaches A (a straggler steered before the switch, or one
   in flight on the netio hop) is forwarded to B's ZeroMQ receive endpoint.
4. **install** (B): `Shard.migrate_in`, the appgate and services take the new
   descriptors, the held frames are replayed in order, and B stops holding.

The transfer is one AF_UNIX stream connection from A to B's `migrate-<i>.sock`,
A's sends bounded by MOVE_TIMEOUT. If B does not acknowledge the whole
message in time, A installs the state back into its own shard (the same
install path) and the supervisor switches the bucket back: the bucket stays
with A. B forwards what it held to A then.

Wire format of one transfer (all integers big-endian):

    u32 nfds | ceil(nfds / FDS_PER_CARRIER) carrier bytes, each sent with up
    to FDS_PER_CARRIER descriptors (SCM_RIGHTS) | u32 len | msgpack body

A stream socket delivers the descriptors of one sendmsg with its bytes and
never merges two descriptor-carrying writes into one read (unix(7): "the
ancillary data ... is never merged"), so the receiver collects descriptors
in order and the body refers to them by index.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shardstack.load import _BUCKET_OF, frame_bucket

MOVE_TIMEOUT = 2.0  # s: a move not done by then is aborted (the bucket stays put)
# s the sender still waits for the answer after MOVE_TIMEOUT: the receiver
# starts no install after MOVE_TIMEOUT (it refuses a late transfer), so an
# install begun in time gets this long to finish before the sender gives up.
ACK_GRACE = 1.0
FOREIGN_GRACE = 3.0  # s after a worker starts: frames of others' buckets are forwarded
HOLD_MAX = 1 << 16  # frames held per bucket; beyond, dropped (TCP retransmits them)
FDS_PER_CARRIER = 250  # SCM_MAX_FD is 253
_U32 = struct.Struct("!I")
_FD_SIZE = array.array("i").itemsize
CARRIER_ANC = socket.CMSG_SPACE(FDS_PER_CARRIER * _FD_SIZE)
FORWARD_ETH = bytes(12) + b"\x08\x00"  # a dummy Ethernet header: L2 workers strip 14 bytes
FORWARD_ETH6 = bytes(12) + b"\x86\xdd"


def bucket_of(laddr: int, lport: int, raddr: int, rport: int) -> int:
    """The RETA bucket a connection's frames hash to (symmetric key: either
    direction), IPv4 or IPv6 (128-bit addresses): netio.rss.FoldedToeplitz's
    fold6, which is its fold for addresses below 2**32."""
    x = laddr ^ raddr
    x ^= x >> 64
    x ^= x >> 32
    x = (x & 0xFFFFFFFF) ^ (lport << 16 | rport)
    return _BUCKET_OF[(x ^ (x >> 16)) & 0xFFFF]


def bucket_match(buckets: set[int]) -> Callable[[int, int, int, int], bool]:
    """The `match(laddr, lport, raddr, rport)` that `Shard.migrate_out` takes."""
    return lambda la, lp, ra, rp: bucket_of(la, lp, ra, rp) in buckets


# -- the receive-side filter: hold and forward ------------------------------------


@dataclass(slots=True)
class SteerStats:
    held: int = 0  # frames held, over all moves
    replayed: int = 0
    forwarded: int = 0  # stragglers sent on to the bucket's new worker
    hold_dropped: int = 0  # beyond HOLD_MAX, or an aborted move with nowhere to go
    forward_dropped: int = 0  # the new worker's endpoint was full or gone


@dataclass(slots=True)
class Held:
    frames: list = field(default_factory=list)  # (bytes, csum_ok)
    since: float = 0.0


class RxSteer:
    """Wraps `shard.receive_batch`: frames of held buckets are kept, frames of
    forwarded buckets go to `forwarder(wid)`, the rest pass. With nothing
    held or forwarded it costs one attribute test per batch."""

    __slots__ = ("inner", "hold", "forward", "active", "stats", "send", "reta", "wid",
                 "foreign")

    def __init__(self, inner: Callable[..., Any],
                 send: Callable[[int, list, bytes], bool],
                 reta: list[int] | None = None, wid: int = -1) -> None:
        self.inner = inner
        self.send = send  # (wid, frames, flags) -> sent?
        self.hold: dict[int, Held] = {}
        self.forward: dict[int, int] = {}  # bucket -> worker id
        # While set (a new process's first seconds): frames of buckets the
        # RETA gives to another worker go there. They are what the process
        # this one replaces left unread on the same queue after moving its
        # buckets away (shardstack reload); answering them would be a RST.
        self.foreign = False
        self.reta = reta
        self.wid = wid
        self.active = False
        self.stats = SteerStats()

    def _update(self) -> None:
        self.active = bool(self.hold or self.forward or self.foreign)

    def set_foreign(self, on: bool) -> None:
        self.foreign = on and self.reta is not None
        self._update()

    def __call__(self, packets: Any, now: float, csum_ok: bool | None = None) -> None:
        if not self.active:
            return self.inner(packets, now, csum_ok)
        keep = []
        out: dict[int, list] = {}
        hold, forward = self.hold, self.forward
        for f in packets:
            k = frame_bucket(f)
            h = hold.get(k)
            if h is not None:
                if len(h.frames) < HOLD_MAX:
                    h.frames.append((bytes(f), csum_ok))
                    self.stats.held += 1
                else:
                    self.stats.hold_dropped += 1
                continue
            w = forward.get(k)
            if w is None and self.foreign and k >= 0 and self.reta[k] != self.wid:
                w = self.reta[k]
            if w is not None:
                out.setdefault(w, []).append(f)
                continue
            keep.append(f)
        for w, frames in out.items():
            flags = bytes([1 if csum_ok else 0]) * len(frames)
            if self.send(w, frames, flags):
                self.stats.forwarded += len(frames)
            else:
                self.stats.forward_dropped += len(frames)
        if keep:
            self.inner(keep, now, csum_ok)
        return None

    def start_hold(self, buckets: list[int], now: float) -> None:
        for b in buckets:
            self.forward.pop(b, None)
            self.hold.setdefault(b, Held(since=now))
        self._update()

    def take_held(self, buckets: list[int]) -> list:
        """Stop holding `buckets`; their frames in arrival order (merged by
        bucket: the order within a flow is what matters, and a flow has one
        bucket)."""
        out = []
        for b in buckets:
            h = self.hold.pop(b, None)
            if h is not None:
                out += h.frames
        self._update()
        return out

    def set_forward(self, buckets: list[int], wid: int) -> None:
        for b in buckets:
            self.hold.pop(b, None)
            self.forward[b] = wid
        self._update()

    def clear_forward(self, buckets: list[int]) -> None:
        for b in buckets:
            self.forward.pop(b, None)
        self._update()


# -- the transfer ------------------------------------------------------------------


def pack_transfer(body: dict[str, Any], fds: list[int]) -> tuple[bytes, list[tuple[bytes, list[int]]], bytes]:
    """(head, carriers, tail): send head, then each carrier byte with its
    fds, then tail."""
    raw = msgpack.packb(body, use_bin_type=True)
    carriers = [(b"F", fds[i:i + FDS_PER_CARRIER]) for i in range(0, len(fds), FDS_PER_CARRIER)]
    return _U32.pack(len(fds)), carriers, _U32.pack(len(raw)) + raw


def send_transfer(path: str, body: dict[str, Any], fds: list[int],
                  deadline: float) -> socket.socket:
    """Connect to `path`, send body and fds (blocking, bounded by `deadline`);
    returns the socket, on which the receiver's one-byte ack arrives."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.connect(path)
        head, carriers, tail = pack_transfer(body, fds)
        s.sendall(head)
        for byte, group in carriers:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            s.sendmsg([byte], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", group))])
        view = memoryview(tail)
        while view:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            n = s.send(view)
            view = view[n:]
    except BaseException:
        s.close()
        raise
    return s


def wait_ack(s: socket.socket, deadline: float) -> bool:
    try:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        return s.recv(1) == b"K"
    except OSError:
        return False


class TransferReader:
    """The receiving side of one transfer connection: feed it whatever
    recvmsg returned; `done()` gives (body, fds) once complete."""

    __slots__ = ("buf", "fds", "nfds", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self, data: bytes, anc: list) -> None:
        self.buf += data
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                self.fds.extend(a)

    def done(self) -> tuple[dict[str, Any], list[int]] | None:
        buf = self.buf
        if len(buf) < 4:
            return None
        nfds = _U32.unpack_from(buf, 0)[0]
        ncar = -(-nfds // FDS_PER_CARRIER)
        at = 4 + ncar
        if len(buf) < at + 4:
            return None
        n = _U32.unpack_from(buf, at)[0]
        if len(buf) < at + 4 + n or len(self.fds) < nfds:
            return None
        body = msgpack.unpackb(bytes(buf[at + 4:at + 4 + n]), raw=False, strict_map_key=False)
        return body, list(self.fds)


# -- the record of moves (the supervisor's) ----------------------------------------


@dataclass(slots=True)
class MoveRecord:
    """One move as `shardstack reta` shows it."""

    bucket: int
    src: int
    dst: int
    ok: bool
    at: float  # wall clock (time.time) when it finished
    seconds: float  # the whole move, supervisor's view
    pause: float  # RETA switched -> installed at B: how long the bucket's frames waited
    conns: int  # connections moved (established, handshaking, TIME-WAIT...)
    app_conns: int  # of those, with an app's stream handed over
    held: int  # frames B held and replayed
    forwarded: int = 0  # stragglers A sent on (cumulative at A when the move ended)
    reason: str = ""  # why it was aborted
    by: str = "hand"  # "hand", "auto", "reload"
    transfer: float = 0.0  # A's export started -> installed at B (state out, sent, in)
    steps: dict = field(default_factory=dict)  # where the time went (*_seconds of A and B)

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "from": self.src, "to": self.dst, "ok": self.ok,
                "at": round(self.at, 3), "seconds": round(self.seconds, 6),
                "pause": round(self.pause, 6), "conns": self.conns, "app_conns": self.app_conns,
                "held": self.held, "forwarded": self.forwarded, "reason": self.reason,
                "by": self.by, "transfer": round(self.transfer, 6), "steps": self.steps}


# -- the worker's agent ------------------------------------------------------------


@dataclass(slots=True)
class Incoming:
    """A bucket set this worker holds, waiting for its state."""

    buckets: list[int]
    src: int
    since: float
    future: Any = None  # resolved with the install's figures
    timer: Any = None


class Agent:
    """One worker's side of moves: the hold/forward filter around the shard's
    receive, `migrate-<i>.sock` for incoming transfers, the ctl ops
    (`mig_hold`, `mig_export`, `mig_finish`, `mig_abort`)."""

    def __init__(self, worker: Any) -> None:
        self.w = worker
        self.loop = worker.loop
        self.steer = RxSteer(worker.shard.receive_batch, self._forward, worker.reta, worker.wid)
        worker.shard.receive_batch = self.steer
        # A worker started owning no bucket is a reload's successor (shardstack
        # reload moves them all away first): until FOREIGN_GRACE after start
        # (listen()), what its predecessor left on the queue goes on.
        self.steer.set_foreign(worker.wid not in worker.reta)
        self.push: dict[int, Any] = {}  # wid -> zmq PUSH to its rx endpoint
        self.incoming: dict[int, Incoming] = {}  # bucket -> its pending move
        self.server: socket.socket | None = None
        self.moves_in = 0
        self.moves_out = 0
        self.aborted = 0

    # -- endpoints -------------------------------------------------------------

    @staticmethod
    def path(run_dir: Any, wid: int) -> str:
        return f"{run_dir}/migrate-{wid}.sock"

    def listen(self) -> None:
        p = self.path(self.w.run.path, self.w.wid)
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(p)
        finally:
            os.umask(old)
        s.listen(16)
        self.server = s
        self.loop.add_reader(s.fileno(), self._on_accept)
        self.loop.call_later(FOREIGN_GRACE, self.steer.set_foreign, False)

    def close(self) -> None:
        if self.server is not None:
            self.loop.remove_reader(self.server.fileno())
            self.server.close()
            self.server = None
            try:
                os.unlink(self.path(self.w.run.path, self.w.wid))
            except FileNotFoundError:
                pass
        for p in self.push.values():
            p.close(0)
        self.push.clear()

    def _forward(self, wid: int, frames: list, flags: bytes) -> bool:
        import zmq

        from shardstack.netio.process import worker_endpoint

        p = self.push.get(wid)
        if p is None:
            p = self.w.zctx.socket(zmq.PUSH)
            p.setsockopt(zmq.LINGER, 0)
            p.setsockopt(zmq.SNDHWM, 1024)
            p.connect(worker_endpoint(str(self.w.run.path), wid))
            self.push[wid] = p
        if self.w.l2:
            frames = [(FORWARD_ETH6 if f[0] >> 4 == 6 else FORWARD_ETH) + bytes(f)
                      for f in frames]
        try:
            p.send_multipart([flags, *frames], zmq.NOBLOCK, copy=True)
        except zmq.ZMQError:
            return False
        return True

    # -- ctl ops ---------------------------------------------------------------

    def control(self, op: str, req: dict[str, Any]) -> Any:
        buckets = [int(b) for b in req.get("buckets", ())]
        if op == "mig_hold":
            return self.hold(buckets, int(req.get("src", -1)))
        if op == "mig_export":
            not_after = req.get("not_after")
            if isinstance(not_after, float) and time.monotonic() > not_after:
                # The supervisor gave up on this move (we were stopped or
                # busy) and switched the bucket back to us: it stays.
                raise OSError(errno.ETIMEDOUT, "export request arrived too late")
            return self.export(buckets, int(req["to"]))
        if op == "mig_finish":
            return self.finish(buckets)
        if op == "mig_abort":
            return self.abort(buckets)
        if op == "mig_stats":
            return {"steer": _plain(self.steer.stats), "moves_in": self.moves_in,
                    "moves_out": self.moves_out, "aborted": self.aborted}
        raise OSError(errno.EOPNOTSUPP, f"unknown migration op {op!r}")

    def hold(self, buckets: list[int], src: int) -> dict[str, Any]:
        now = time.monotonic()
        self.steer.start_hold(buckets, now)
        inc = Incoming(buckets, src, now, self.loop.create_future())
        inc.timer = self.loop.call_later(3 * MOVE_TIMEOUT, self._expire, inc)
        for b in buckets:
            self.incoming[b] = inc
        return {}

    def _expire(self, inc: Incoming) -> None:
        """Nobody finished or aborted the move: stop holding (supervisor gone?)."""
        if not any(self.incoming.get(b) is inc for b in inc.buckets):
            return
        if inc.future.done():  # installed; only the supervisor's finish never came
            for b in inc.buckets:
                if self.incoming.get(b) is inc:
                    del self.incoming[b]
            return
        self.abort(inc.buckets)

    def abort(self, buckets: list[int]) -> dict[str, Any]:
        """The move is off: the bucket stays with (went back to) its source;
        what we held goes there."""
        incs = {id(i): i for b in buckets if (i := self.incoming.pop(b, None)) is not None}
        frames = self.steer.take_held(buckets)
        src = next((i.src for i in incs.values()), -1)
        sent = False
        if frames and 0 <= src != self.w.wid:
            by_flag: dict[bool, list] = {}
            for f, ok in frames:
                by_flag.setdefault(bool(ok), []).append(f)
            sent = all(self._forward(src, fs, bytes([1 if ok else 0]) * len(fs))
                       for ok, fs in by_flag.items())
        if frames and not sent:
            self.steer.stats.hold_dropped += len(frames)
        for i in incs.values():
            if i.timer is not None:
                i.timer.cancel()
            if i.future is not None and not i.future.done():
                i.future.set_exception(OSError(errno.ECANCELED, "move aborted"))
                i.future.exception()  # retrieved: nobody may be waiting
        self.aborted += 1 if incs else 0
        return {"held": len(frames)}

    async def finish(self, buckets: list[int]) -> dict[str, Any]:
        """Wait (bounded) until the state for `buckets` is installed here."""
        incs = {id(i): i for b in buckets if (i := self.incoming.get(b)) is not None}
        if not incs:
            raise OSError(errno.ENOENT, "no move pending for these buckets")
        inc = next(iter(incs.values()))
        figures = await asyncio.wait_for(asyncio.shield(inc.future), MOVE_TIMEOUT)
        for b in inc.buckets:
            if self.incoming.get(b) is inc:
                del self.incoming[b]
        if inc.timer is not None:
            inc.timer.cancel()
        return figures

    def export(self, buckets: list[int], to: int) -> dict[str, Any]:
        """Step 3 (module docstring): hand `buckets`' connections to worker `to`."""
        w = self.w
        t0 = time.monotonic()
        self.steer.clear_forward(buckets)
        w.drain_rx()  # frames the kernel steered to us before the switch: ours to process
        w.flush()
        t_drained = time.monotonic()
        states = w.shard.migrate_out(bucket_match(set(buckets)))
        t_out = time.monotonic()
        sds = {s["sd"] for s in states if isinstance(s.get("sd"), int) and s["sd"] >= 0}
        gate, socks = (w.appgate.export_conns(sds, to) if w.appgate is not None else ([], []))
        svc = w.services.export(sds) if w.services is not None else []
        body = {"buckets": buckets, "from": w.wid, "t_export": t0, "engine": states,
                "gate": gate, "services": svc, "t_sent": time.monotonic()}
        fds = [s.fileno() for s in socks]
        deadline = t0 + MOVE_TIMEOUT
        ok, why = False, ""
        try:
            s = send_transfer(self.path(w.run.path, to), body, fds, deadline)
            try:
                ok = wait_ack(s, deadline + ACK_GRACE)
                why = "" if ok else "not acknowledged in time"
            finally:
                s.close()
        except OSError as e:
            why = f"transfer failed: {e}"
        if not ok:
            # The bucket stays ours: the state goes back into our own shard.
            dups = [os.dup(fd) for fd in fds]
            try:
                self.install(body, dups, local=True)
            except BaseException:
                for fd in dups:
                    _close_quietly(fd)
                raise
            for sk in socks:
                sk.close()
            self.aborted += 1
            raise OSError(errno.ETIMEDOUT, f"move of buckets {buckets} to worker {to}: {why}")
        for sk in socks:
            sk.close()
        self.steer.set_forward(buckets, to)
        self.moves_out += 1
        w.flush()
        return {"conns": len(states), "app_conns": len(gate), "services": len(svc),
                "export_seconds": time.monotonic() - t0, "drain_seconds": t_drained - t0,
                "out_seconds": t_out - t_drained,
                "forwarded": self.steer.stats.forwarded}

    # -- incoming transfers ------------------------------------------------------

    def _on_accept(self) -> None:
        for _ in range(16):
            try:
                c, _addr = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            c.setblocking(False)
            rd = TransferReader()
            deadline = time.monotonic() + MOVE_TIMEOUT
            timer = self.loop.call_later(MOVE_TIMEOUT, self._drop_conn, c, rd)
            self.loop.add_reader(c.fileno(), self._on_data, c, rd, timer, deadline)

    def _drop_conn(self, c: socket.socket, rd: TransferReader) -> None:
        if c.fileno() >= 0:
            self.loop.remove_reader(c.fileno())
            c.close()
        for fd in rd.fds:
            os.close(fd)
        rd.fds = []

    def _on_data(self, c: socket.socket, rd: TransferReader, timer: Any,
                 deadline: float) -> None:
        """The sender writes the whole transfer at once, as fast as we read
        (it packed everything first): once its first bytes are here, read the
        rest in one go, blocking (bounded by the deadline), rather than a
        chunk per loop iteration between this worker's own traffic, which
        measured a third of a 100-connection move's pause."""
        for _ in range(1 << 16):
            try:
                data, anc, _fl, _a = c.recvmsg(1 << 20, CARRIER_ANC, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, anc = b"", []
            if c.gettimeout() == 0.0:
                c.settimeout(max(0.001, deadline - time.monotonic()))
            rd.feed(data, anc)
            got = rd.done()
            if got is not None:
                timer.cancel()
                self.loop.remove_reader(c.fileno())
                body, fds = got
                rd.fds = []
                # Acknowledge only what is installed: a refusal (the engine's
                # ENOENT for a missing listener, EADDRINUSE for a taken
                # 4-tuple) makes the sender take its state back.
                try:
                    if time.monotonic() > float(body["t_export"]) + MOVE_TIMEOUT:
                        # The sender stops waiting at MOVE_TIMEOUT + ACK_GRACE and
                        # takes the state back: two live copies must never exist.
                        raise OSError(errno.ETIMEDOUT, "transfer arrived too late")
                    self.install(body, fds)
                    ack = b"K"
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    for fd in fds:
                        _close_quietly(fd)
                    print(f"worker {self.w.wid}: refused a transfer: {e!r}", file=sys.stderr)
                    ack = b"N"
                try:
                    c.send(ack, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                c.close()
                return
            if not data:
                timer.cancel()
                self._drop_conn(c, rd)
                return

    def install(self, body: dict[str, Any], fds: list[int], local: bool = False) -> dict[str, Any]:
        """Step 4: the state into our shard, the apps' streams to our appgate,
        the held frames replayed; `local`: an aborted export coming back."""
        w = self.w
        now = time.monotonic()
        t_recv = now - float(body.get("t_sent", now))
        pairs = w.shard.migrate_in(body["engine"], now)  # all or nothing; the caller closes fds
        t_in = time.monotonic()
        socks = [socket.socket(fileno=fd) for fd in fds]
        for sk in socks:
            sk.setblocking(False)
        sdmap = {int(a): int(b) for a, b in pairs}
        app = w.appgate.import_conns(body["gate"], socks, sdmap) if w.appgate is not None else 0
        if w.appgate is None:
            for sk in socks:
                sk.close()
        svc = w.services.adopt(body["services"], sdmap, now) if w.services is not None else 0
        buckets = [int(b) for b in body["buckets"]]
        held = [] if local else self.steer.take_held(buckets)
        t_gate = time.monotonic()
        self._replay(held, now)
        t_replay = time.monotonic()
        w.shard.advance(time.monotonic())  # timers that fell due during the move
        w.flush()
        done = time.monotonic()
        figures = {"conns": len(body["engine"]), "installed": len(sdmap), "app_conns": app,
                   "services": svc, "held": len(held), "installed_at": done,
                   "transfer": done - float(body["t_export"]),
                   "install_seconds": done - now, "recv_seconds": t_recv,
                   "in_seconds": t_in - now, "gate_seconds": t_gate - t_in,
                   "replay_seconds": t_replay - t_gate}
        if local:
            return figures
        self.moves_in += 1
        self.steer.stats.replayed += len(held)
        incs = {id(i): i for b in buckets if (i := self.incoming.get(b)) is not None}
        for i in incs.values():  # finish() takes them out of `incoming`
            if i.future is not None and not i.future.done():
                i.future.set_result(figures)
        return figures

    def _replay(self, held: list, now: float) -> None:
        """Held frames into the shard, in order, in runs of equal checksum state."""
        inner = self.steer.inner
        run: list = []
        state = None
        for f, ok in held:
            if run and ok != state:
                inner(run, now, state)
                run = []
            state = ok
            run.append(f)
        if run:
            inner(run, now, state)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _plain(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
