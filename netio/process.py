"""The netio process: the one reader of the device (DESIGN.md §1, RX path).

The loop is deliberately thin (trio's epoll manager, asyncio's selector
loop): wait for the device fd, the control socket or the next wrapper
deadline; then drain the device in batches, hand each batch to the pure
`Dispatcher`, push each worker's group as ONE multipart ZeroMQ message, and
write ARP/ICMP replies back to the device in one batch.

Worker channel (`worker_endpoint(rundir, i)`: the worker binds a PULL
socket there, netio connects a PUSH socket to it, so frames queue (up to
SNDHWM) while a worker starts or restarts): each message is

    [flags, frame_0, frame_1, ..., frame_{n-1}]

where `flags` is n bytes, byte k holding the device flags of frame k
(`device.RX_CSUM_VALID`, `RX_CSUM_PARTIAL`, `RX_GSO`) and frame k is the
raw frame (IPv4 packet on TUN, Ethernet frame on AF_PACKET). `decode_batch`
undoes it. Sends use SNDHWM and zmq.NOBLOCK: an overloaded or absent worker
costs counted drops (`zmq_dropped`), never a stalled RX path, as a full NIC
ring drops rather than blocks.

Neighbour announcements share the worker channel: a message whose first part
(flags) is EMPTY is not a batch but `[b"", entry...]`, each entry 10 bytes,
the IPv4 address (4, big-endian) and MAC (6) of a neighbour a worker asked
netio to resolve (`arp` op) and whose ARP reply has now arrived. Every worker
gets it, so a worker that queued frames for that neighbour sends them at once
(Linux's `neigh_update` flushing the `arp_queue`). `decode_batch` returns []
for it and `decode_neighbours` reads it.

Control channel (`control_endpoint(rundir)`, netio binds REP): msgpack maps
{"op": "stats"} -> counters; {"op": "reta", "reta": [128 ints]} installs a
new indirection table; {"op": "neighbours"} -> {ip: mac hex}; {"op": "arp",
"ip": int} sends a who-has (L2); {"op": "stop"} ends the loop. Every reply
has "ok".
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq
from shardstack.core.wire.ipv4 import str_to_ip

from .device import DEFAULT_BATCH, Device, LoopbackDevice, PacketDevice, TunDevice
from .dispatch import Dispatcher
from .impair import Impair
from .pcap import Pcap
from .trace import Trace

__all__ = [
    "NetioProcess",
    "NetioStats",
    "worker_endpoint",
    "control_endpoint",
    "decode_batch",
    "decode_neighbours",
    "make_device",
    "main",
]

# Multipart sends go through pyzmq's Cython `send` with plain int flags:
# `send_multipart` does per-part IntFlag arithmetic in Python and costs about
# four times as much per frame (bench/bench_tun.py, "loop"). libzmq makes a
# multipart message atomic: once its first part is queued, the rest follow.
_raw_send = zmq.backend.Socket.send
_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)

DEFAULT_SNDHWM = 256  # messages (batches) queued per worker before we drop
SOLICIT_TTL = 10.0  # seconds a worker's ARP question stays open (then forgotten)
MAX_SOLICITED = 1024  # open questions kept at most (a bound, not a tuning knob)
MAX_BATCHES_PER_WAKEUP = 16  # then look at the control socket again
IDLE_TIMEOUT = 0.5  # seconds; upper bound on one wait


def worker_endpoint(rundir: str, worker: int) -> str:
    return f"ipc://{rundir}/rx-{worker}.ipc"


def control_endpoint(rundir: str) -> str:
    return f"ipc://{rundir}/netio-ctl.ipc"


def decode_batch(parts: list) -> list[tuple[bytes, int]]:
    """A worker's view of one message: [(frame, flags), ...] ([] for a
    neighbour announcement)."""
    flags = bytes(parts[0])
    if not flags:
        return []
    return [(bytes(p), flags[i]) for i, p in enumerate(parts[1:])]


def encode_neighbour(ip: int, mac: bytes) -> bytes:
    return ip.to_bytes(4, "big") + bytes(mac)


def decode_neighbours(parts: list) -> list[tuple[int, bytes]]:
    """The entries of a neighbour announcement `[b"", entry...]`: [(ip, mac)];
    [] for a frame batch. Malformed entries are skipped."""
    if len(parts[0]):
        return []
    return [(int.from_bytes(p[:4], "big"), bytes(p[4:10])) for p in parts[1:] if len(p) == 10]


@dataclass(slots=True)
class NetioStats:
    wakeups: int = 0
    rx_batches: int = 0
    rx_frames: int = 0
    tx_replies: int = 0
    tx_reply_failed: int = 0
    neigh_announced: int = 0  # neighbour announcements sent to the workers
    zmq_sent: list[int] = field(default_factory=list)  # frames per worker
    zmq_dropped: list[int] = field(default_factory=list)  # frames per worker (HWM)

    def as_dict(self) -> dict:
        return {
            "wakeups": self.wakeups,
            "rx_batches": self.rx_batches,
            "rx_frames": self.rx_frames,
            "tx_replies": self.tx_replies,
            "tx_reply_failed": self.tx_reply_failed,
            "neigh_announced": self.neigh_announced,
            "zmq_sent": list(self.zmq_sent),
            "zmq_dropped": list(self.zmq_dropped),
        }


class NetioProcess:
    """Device -> Dispatcher -> per-worker PUSH sockets, plus the control REP."""

    def __init__(
        self,
        dev: Device,
        dispatcher: Dispatcher,
        rundir: str,
        ctx: zmq.Context | None = None,
        sndhwm: int = DEFAULT_SNDHWM,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self.dev = dev
        self.dispatcher = dispatcher
        self.rundir = rundir
        self.batch = batch
        self.ctx = ctx or zmq.Context.instance()
        n = dispatcher.n_workers
        self.stats = NetioStats(zmq_sent=[0] * n, zmq_dropped=[0] * n)
        self.push: list[zmq.Socket] = []
        for i in range(n):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, sndhwm)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(worker_endpoint(rundir, i))
            self.push.append(s)
        self.ctl = self.ctx.socket(zmq.REP)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.bind(control_endpoint(rundir))
        self.poller = zmq.Poller()
        self.poller.register(self.ctl, zmq.POLLIN)
        if dev.fileno() >= 0:
            self.poller.register(dev.fileno(), zmq.POLLIN)
        self.running = False
        # ip -> when a worker asked us to resolve it (`arp` op): announced to
        # the workers once the reply is in `dispatcher.neighbours`.
        self.solicited: dict[int, float] = {}

    # -- the loop -----------------------------------------------------------

    def step(self, timeout: float | None = 0.0) -> int:
        """Wait up to `timeout` seconds (None: until the next deadline or
        IDLE_TIMEOUT), then handle everything ready. Returns frames read."""
        dev = self.dev
        if timeout is None:
            timeout = IDLE_TIMEOUT
            deadline = dev.next_deadline()
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        events = dict(self.poller.poll(max(1, int(timeout * 1000.0)))) if timeout > 0 else {}
        self.stats.wakeups += 1
        got = self._drain()
        dev.poll()
        got += self._drain()
        if self.ctl in events or self.ctl.poll(0):
            self._control()
        if self.solicited:
            self._announce()
        return got

    def _announce(self) -> None:
        """Tell every worker about neighbours it asked for that are now
        resolved, so frames they queued go out (see the module docstring)."""
        neigh = self.dispatcher.neighbours
        self._expire(time.monotonic())  # never answered: stop looking
        entries = []
        for ip in [ip for ip in self.solicited if ip in neigh]:
            del self.solicited[ip]
            entries.append(encode_neighbour(ip, neigh[ip]))
        if not entries:
            return
        for sock in self.push:
            try:
                _raw_send(sock, b"", _MORE)
            except zmq.Again:
                continue  # a stalled worker re-asks on its own timer
            for e in entries[:-1]:
                _raw_send(sock, e, _MORE)
            _raw_send(sock, entries[-1], _LAST)
        self.stats.neigh_announced += len(entries)

    def _drain(self) -> int:
        dev, stats, disp = self.dev, self.stats, self.dispatcher
        total = 0
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            batch = dev.recv_batch(self.batch)
            if not batch:
                break
            stats.rx_batches += 1
            stats.rx_frames += len(batch)
            total += len(batch)
            out = disp.dispatch(batch)
            for w, frames in enumerate(out.frames):
                if frames:
                    self._push(w, out.flags[w], frames)
            if out.replies:
                sent = dev.send_batch(out.replies)
                stats.tx_replies += sent
                stats.tx_reply_failed += len(out.replies) - sent
            if len(batch) < self.batch:
                break
        return total

    def _push(self, w: int, flags: bytearray, frames: list[bytes]) -> None:
        sock = self.push[w]
        try:
            _raw_send(sock, bytes(flags), _MORE)
        except zmq.Again:  # HWM reached: drop the batch, never block
            self.stats.zmq_dropped[w] += len(frames)
            return
        for f in frames[:-1]:
            _raw_send(sock, f, _MORE)
        _raw_send(sock, frames[-1], _LAST)
        self.stats.zmq_sent[w] += len(frames)

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None) -> None:
        """Loop until a "stop" command, `stop` is set, or `max_seconds` pass."""
        self.running = True
        end = None if max_seconds is None else time.monotonic() + max_seconds
        while self.running and not (stop is not None and stop.is_set()):
            if end is not None and time.monotonic() >= end:
                break
            self.step(None)

    # -- control ------------------------------------------------------------

    def counters(self) -> dict:
        out = {"netio": self.stats.as_dict(), "dispatch": self.dispatcher.stats.as_dict()}
        counters = getattr(self.dev, "counters", None)
        if counters is not None:
            out["impair"] = counters()
        return out

    def _control(self) -> None:
        try:
            req = msgpack.unpackb(self.ctl.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        except (ValueError, msgpack.UnpackException) as e:
            self.ctl.send(msgpack.packb({"ok": False, "error": f"bad request: {e}"}))
            return
        self.ctl.send(msgpack.packb(self.handle(req)))

    def handle(self, req) -> dict:
        """One control request (the REP socket's body; also callable directly)."""
        op = req.get("op") if isinstance(req, dict) else None
        if op == "stats":
            return {"ok": True, **self.counters()}
        if op == "reta":
            try:
                self.dispatcher.set_reta(list(req.get("reta", ())))
            except (TypeError, ValueError) as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True}
        if op == "neighbours":
            return {"ok": True, "neighbours": {ip: mac.hex() for ip, mac in
                                               self.dispatcher.neighbours.items()}}  # fmt: skip
        if op == "arp":
            if not self.dispatcher.l2 or not self.dispatcher.addrs:
                return {"ok": False, "error": "ARP needs an L2 device"}
            src = min(self.dispatcher.addrs)
            ip = int(req["ip"])
            self._solicit(ip)
            self.dev.send_batch([self.dispatcher.arp_request(ip, src)])
            return {"ok": True}
        if op == "stop":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _solicit(self, ip: int) -> None:
        if ip not in self.solicited and len(self.solicited) >= MAX_SOLICITED:
            self._expire(time.monotonic())
            if len(self.solicited) >= MAX_SOLICITED:
                return  # the asking worker still gives up on its own timer
        self.solicited[ip] = time.monotonic()

    def _expire(self, now: float) -> None:
        for ip in [k for k, t in self.solicited.items() if now - t > SOLICIT_TTL]:
            del self.solicited[ip]

    def close(self) -> None:
        for s in self.push:
            s.close(0)
        self.ctl.close(0)


def make_device(
    kind: str,
    name: str = "ss0",
    mtu: int | None = 1500,
    vnet_hdr: bool = False,
    impair: str | None = None,
    pcap: str | None = None,
    trace: bool = False,
) -> Device:
    """Open a device and stack the wrappers the options ask for.

    Order (outermost first): Trace, Impair, Pcap, device. So the pcap shows
    what really crossed the device, and the trace what the stack saw.
    """
    if kind == "tun":
        dev: Device = TunDevice(name, mtu, vnet_hdr=vnet_hdr)
    elif kind == "packet":
        dev = PacketDevice(name, vnet_hdr=vnet_hdr)
    elif kind == "loopback":
        dev = LoopbackDevice(mtu=mtu or 1500)
    else:
        raise ValueError(f"unknown device kind {kind!r}")
    if pcap:
        dev = Pcap(dev, pcap)
    if impair:
        dev = Impair(dev, impair)
    if trace:
        dev = Trace(dev)
    return dev


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstack-netio", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tun", metavar="NAME", help="TUN device to open or create")
    g.add_argument("--packet", metavar="IFNAME", help="existing interface for AF_PACKET")
    p.add_argument("--addr", action="append", required=True, help="our IPv4 address (repeatable)")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--rundir", required=True)
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--vnet-hdr", action="store_true", help="offloads: 64 KiB super-frames")
    p.add_argument("--impair", metavar="SPEC")
    p.add_argument("--pcap", metavar="FILE")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--sndhwm", type=int, default=DEFAULT_SNDHWM)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kind, name = ("tun", args.tun) if args.tun else ("packet", args.packet)
    dev = make_device(kind, name, args.mtu, args.vnet_hdr, args.impair, args.pcap, args.trace)
    addrs = [str_to_ip(a.split("/")[0]) for a in args.addr]
    mac = getattr(_innermost(dev), "mac", None)
    disp = Dispatcher(args.workers, addrs, l2=dev.l2, mac=mac)
    os.makedirs(args.rundir, mode=0o700, exist_ok=True)
    proc = NetioProcess(dev, disp, args.rundir, sndhwm=args.sndhwm, batch=args.batch)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        proc.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        proc.close()
        dev.close()
    return 0


def _innermost(dev: Device) -> Device:
    while hasattr(dev, "inner"):
        dev = dev.inner
    return dev


if __name__ == "__main__":
    raise SystemExit(main())
