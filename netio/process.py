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

The neighbour table (AF_PACKET mode) is netio's: `dispatcher.neigh`, a
netio.neighbour.NeighTable filled from ARP only, with Linux's NUD states and
timers, which this loop runs (`neigh_timer_handler`, probes put on the
device). Workers mirror it:

* netio -> workers, on the worker channel: a message whose first part
  (flags) is EMPTY is not a batch but a neighbour announcement `[b"",
  entry...]`, each entry 11 bytes: IPv4 address (4, big-endian), MAC (6),
  NUD state (1, Linux's NUD_* value; NONE = the entry is gone). Once a
  worker asked for an address, every change of its entry's MAC or state
  goes to every worker (`take_changes`), so a worker that queued frames on
  a neighbour sends them as soon as it resolves (Linux's `neigh_update`
  flushing the `arp_queue`), and one that used a MAC that changed or FAILED
  stops. Entries nobody asked for (an ARP request made them) stay netio's. `decode_batch` returns [] for
  it, `decode_neigh_entries` reads it ((ip, mac, state); a 10-byte entry,
  the older form, is REACHABLE) and `decode_neighbours` gives the usable
  ones as (ip, mac). An IPv6 neighbour's entry is 23 bytes: its address
  takes 16 (RFC 4861 NDP fills `dispatcher.neigh6` as ARP fills `neigh`).
  Addresses are told apart by size: IPv6 ones are never below 2**32
  (`is_ip6`; the stack refuses ::/96, the deprecated IPv4-compatible block).
* workers -> netio, fire and forget (a worker never waits on netio): each
  worker connects a PUSH to netio's PULL at `neigh_endpoint(rundir)` and
  sends 5-byte messages (17 for IPv6), an op byte and the address: `NEIGH_RESOLVE` (Linux
  `neigh_event_send`: a frame waits on this address or a STALE entry was
  used; netio starts resolution or arms DELAY, and announces the entry back
  at once when it has a usable MAC) and `NEIGH_CONFIRM` (`neigh_confirm`:
  the worker saw forward progress through that next hop).

Control channel (`control_endpoint(rundir)`, netio binds REP): msgpack maps
{"op": "stats"} -> counters; {"op": "reta", "reta": [128 ints]} installs a
new indirection table; {"op": "neighbours"} -> {ip: mac hex} (usable
entries); {"op": "neigh"} -> {ip: {"mac", "state"}} (every entry, `ip
neigh` style); {"op": "arp", "ip": int} does what NEIGH_RESOLVE does (L2);
{"op": "stop"} ends the loop. Every reply has "ok". The control socket is
for the supervisor and tools: it is a blocking REQ/REP, so workers do not use
it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from shardstack.core.wire.icmpv6 import ALL_NODES, multicast_mac

from .device import (
    DEFAULT_BATCH,
    Device,
    Frame,
    LoopbackDevice,
    PacketDevice,
    TunDevice,
    innermost,
    join_multicast,
)
from .dispatch import Dispatcher
from .impair import Impair
from .neighbour import NUD_REACHABLE, NUD_VALID, nud_name
from .pcap import Pcap
from .trace import Trace

__all__ = [
    "NetioProcess",
    "NetioStats",
    "worker_endpoint",
    "control_endpoint",
    "control_call",
    "decode_batch",
    "decode_neighbours",
    "decode_neigh_entries",
    "encode_neighbour",
    "neigh_endpoint",
    "encode_neigh_request",
    "NEIGH_RESOLVE",
    "NEIGH_CONFIRM",
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
NEIGH_RESOLVE = 0x52  # b"R": neigh_event_send (workers -> netio)
NEIGH_CONFIRM = 0x43  # b"C": neigh_confirm (workers -> netio)
MAX_NEIGH_MSGS = 1024  # worker neighbour messages handled per step (then the device again)
MAX_BATCHES_PER_WAKEUP = 16  # then look at the control socket again
IDLE_TIMEOUT = 0.5  # seconds; upper bound on one wait


def worker_endpoint(rundir: str, worker: int) -> str:
    return f"ipc://{rundir}/rx-{worker}.ipc"


def control_endpoint(rundir: str) -> str:
    return f"ipc://{rundir}/netio-ctl.ipc"


def control_call(rundir: str, req: dict[str, Any], timeout_ms: int = 200) -> dict[str, Any] | None:
    """One request to netio's REP control socket; None if netio does not
    answer within `timeout_ms`. It BLOCKS that long: for the supervisor
    (which runs it in an executor) and tools, never from a worker's event
    loop (workers talk to netio through netio.neigh_mirror.NeighChannel)."""
    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        s.connect(control_endpoint(rundir))
        s.send(msgpack.packb(req))
        reply = msgpack.unpackb(s.recv(), strict_map_key=False)
    except zmq.ZMQError:
        return None
    finally:
        s.close(0)
    return reply if isinstance(reply, dict) else None


def neigh_endpoint(rundir: str) -> str:
    """Where netio's PULL for the workers' neighbour messages is bound (L2)."""
    return f"ipc://{rundir}/netio-neigh.ipc"


def is_ip6(ip: int) -> bool:
    """An IPv6 address, in the neighbour plumbing (see the module docstring)."""
    return ip > 0xFFFFFFFF


def encode_neigh_request(op: int, ip: int) -> bytes:
    """A worker's NEIGH_RESOLVE / NEIGH_CONFIRM message about `ip`."""
    return bytes((op,)) + ip.to_bytes(16 if is_ip6(ip) else 4, "big")


def decode_batch(parts: Sequence[Frame]) -> list[tuple[bytes, int]]:
    """A worker's view of one message: [(frame, flags), ...] ([] for a
    neighbour announcement)."""
    flags = bytes(parts[0])
    if not flags:
        return []
    return [(bytes(p), flags[i]) for i, p in enumerate(parts[1:])]


def encode_neighbour(ip: int, mac: bytes, state: int = NUD_REACHABLE) -> bytes:
    """One announcement entry: ip (4, or 16 for IPv6; big-endian), MAC (6), NUD state (1)."""
    return ip.to_bytes(16 if is_ip6(ip) else 4, "big") + bytes(mac) + bytes((state,))


def decode_neigh_entries(parts: Sequence[Frame]) -> list[tuple[int, bytes, int]]:
    """The entries of a neighbour announcement `[b"", entry...]`: [(ip, mac,
    state)]; [] for a frame batch. Malformed entries are skipped."""
    if len(parts[0]):
        return []
    out = []
    for p in parts[1:]:
        n = len(p)
        if n == 11 or n == 10:
            out.append((int.from_bytes(p[:4], "big"), bytes(p[4:10]),
                        p[10] if n == 11 else NUD_REACHABLE))
        elif n == 23:
            out.append((int.from_bytes(p[:16], "big"), bytes(p[16:22]), p[22]))
    return out


def decode_neighbours(parts: Sequence[Frame]) -> list[tuple[int, bytes]]:
    """The usable entries of a neighbour announcement: [(ip, mac)]."""
    return [(ip, mac) for ip, mac, st in decode_neigh_entries(parts) if st & NUD_VALID]


@dataclass(slots=True)
class NetioStats:
    wakeups: int = 0
    rx_batches: int = 0
    rx_frames: int = 0
    tx_replies: int = 0
    tx_reply_failed: int = 0
    neigh_announced: int = 0  # neighbour entries announced to the workers
    neigh_msgs: int = 0  # NEIGH_RESOLVE / NEIGH_CONFIRM messages from workers
    neigh_bad_msgs: int = 0  # malformed ones (dropped)
    neigh_probes_failed: int = 0  # who-has the device refused
    zmq_sent: list[int] = field(default_factory=list)  # frames per worker
    zmq_dropped: list[int] = field(default_factory=list)  # frames per worker (HWM)

    def as_dict(self) -> dict[str, object]:
        return {
            "wakeups": self.wakeups,
            "rx_batches": self.rx_batches,
            "rx_frames": self.rx_frames,
            "tx_replies": self.tx_replies,
            "tx_reply_failed": self.tx_reply_failed,
            "neigh_announced": self.neigh_announced,
            "neigh_msgs": self.neigh_msgs,
            "neigh_bad_msgs": self.neigh_bad_msgs,
            "neigh_probes_failed": self.neigh_probes_failed,
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
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        sndhwm: int = DEFAULT_SNDHWM,
        batch: int = DEFAULT_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dev = dev
        self.clock = clock
        self.dispatcher = dispatcher
        self.rundir = rundir
        self.batch = batch
        self.ctx = ctx or zmq.Context.instance()
        n = dispatcher.n_workers
        self.stats = NetioStats(zmq_sent=[0] * n, zmq_dropped=[0] * n)
        self.push: list[zmq.Socket[bytes]] = []
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
        # L2: the workers' neighbour messages (see the module docstring)
        self.neigh = dispatcher.neigh
        self.neigh6 = dispatcher.neigh6
        self.neigh_pull: zmq.Socket[bytes] | None = None
        if dispatcher.l2:
            self.neigh_pull = self.ctx.socket(zmq.PULL)
            self.neigh_pull.setsockopt(zmq.LINGER, 0)
            self.neigh_pull.bind(neigh_endpoint(rundir))
            self.poller.register(self.neigh_pull, zmq.POLLIN)
            self.neigh.neigh_timer_handler(clock())  # its timers start on our clock
            self.neigh6.neigh_timer_handler(clock())
        if dev.fileno() >= 0:
            self.poller.register(dev.fileno(), zmq.POLLIN)
        self.running = False

    # -- the loop -----------------------------------------------------------

    def step(self, timeout: float | None = 0.0) -> int:
        """Wait up to `timeout` seconds (None: until the next deadline or
        IDLE_TIMEOUT), then handle everything ready. Returns frames read."""
        dev = self.dev
        if timeout is None:
            timeout = self.wait_time()
        events = dict(self.poller.poll(max(1, int(timeout * 1000.0)))) if timeout > 0 else {}
        self.stats.wakeups += 1
        got = self._drain()
        dev.poll()
        got += self._drain()
        if self.ctl in events or self.ctl.poll(0):
            self._control()
        pull = self.neigh_pull
        if pull is not None:
            if pull in events or pull.poll(0):
                self._neigh_rx()
            self._neigh_tx()
        return got

    def wait_time(self) -> float:
        """How long `step(None)` may sleep: IDLE_TIMEOUT, or less when the
        device's wrappers or (L2) the neighbour table have something due."""
        timeout = IDLE_TIMEOUT
        deadline = self.dev.next_deadline()  # the wrappers' clock: time.monotonic
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        if self.neigh_pull is not None:  # (a TUN's table never runs its timers)
            soonest = min(self.neigh.next_deadline(), self.neigh6.next_deadline())
            timeout = max(0.0, min(timeout, soonest - self.clock()))
        return timeout

    # -- the neighbour table (L2) -------------------------------------------

    def _neigh_rx(self) -> None:
        """The workers' NEIGH_RESOLVE / NEIGH_CONFIRM messages (non-blocking)."""
        pull, neigh, stats = self.neigh_pull, self.neigh, self.stats
        if pull is None:  # a TUN's netio has no neighbour channel
            return
        now = self.clock()
        for _ in range(MAX_NEIGH_MSGS):
            try:
                msg = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            stats.neigh_msgs += 1
            if len(msg) not in (5, 17):
                stats.neigh_bad_msgs += 1
                continue
            ip = int.from_bytes(msg[1:], "big")
            if len(msg) == 17 and not is_ip6(ip):
                stats.neigh_bad_msgs += 1
                continue
            if msg[0] == NEIGH_RESOLVE:
                self._resolve(ip, now)
            elif msg[0] == NEIGH_CONFIRM:
                (self.neigh6 if is_ip6(ip) else neigh).neigh_confirm(ip, now)
            else:
                stats.neigh_bad_msgs += 1

    def _resolve(self, ip: int, now: float) -> None:
        """A worker needs `ip`: Linux `neigh_event_send`, and the entry is
        announced back when usable (the asking worker may have none)."""
        tbl = self.neigh6 if is_ip6(ip) else self.neigh
        if tbl.neigh_event_send(ip, now) & NUD_VALID:
            tbl.announce(ip)

    def _neigh_tx(self) -> None:
        """Run the table's timers, put its who-has on the device, announce
        its changes."""
        neigh = self.neigh
        now = self.clock()
        if now >= neigh.soonest:
            neigh.neigh_timer_handler(now)
        probes = neigh.take_probes()
        if probes and self.dispatcher.addrs:
            src = min(self.dispatcher.addrs)
            arp = self.dispatcher.arp_request
            frames = [arp(p.ip, src, p.mac) for p in probes]
            self.stats.neigh_probes_failed += len(frames) - self.dev.send_batch(frames)
        changes = neigh.take_changes()
        changes += self._ndisc_tx(now)
        if changes:
            self._announce([encode_neighbour(ip, mac, st) for ip, mac, st in changes])

    def _ndisc_tx(self, now: float) -> list[tuple[int, bytes, int]]:
        """`_neigh_tx` for IPv6: the NDP table's timers and solicitations
        (RFC 4861 §7.2.2: multicast to the solicited-node group while
        INCOMPLETE, unicast in PROBE); its changes, to announce."""
        nd = self.neigh6
        if now >= nd.soonest:
            nd.neigh_timer_handler(now)
        probes = nd.take_probes()
        frames = [f for f in (self.dispatcher.neigh_solicit(p.ip, p.mac) for p in probes)
                  if f is not None]
        if frames:
            self.stats.neigh_probes_failed += len(frames) - self.dev.send_batch(frames)
        return nd.take_changes()

    def _announce(self, entries: list[bytes]) -> None:
        """Tell every worker (see the module docstring)."""
        for sock in self.push:
            try:
                _raw_send(sock, b"", _MORE)
            except zmq.Again:
                continue  # a stalled worker re-asks (NEIGH_RESOLVE) on its own timer
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
            out = disp.dispatch(batch, self.clock())
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

    def counters(self) -> dict[str, object]:
        out: dict[str, object] = {"netio": self.stats.as_dict(),
                                  "dispatch": self.dispatcher.stats.as_dict()}
        if self.neigh_pull is not None:
            out["neigh"] = dict(self.neigh.stats.as_dict(), entries=len(self.neigh))
            out["neigh6"] = dict(self.neigh6.stats.as_dict(), entries=len(self.neigh6))
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

    def handle(self, req: object) -> dict[str, Any]:
        """One control request (the REP socket's body; also callable directly)."""
        if not isinstance(req, dict):
            req = {}
        op = req.get("op")
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
        if op == "neigh":
            # IPv6 entries by their text: msgpack ints stop at 64 bits
            return {"ok": True, "neigh": {ip: {"mac": n.mac.hex(), "state": nud_name(n.state)}
                                          for ip, n in self.neigh.entries.items()},
                    "neigh6": {str(ipaddress.IPv6Address(ip)):
                               {"mac": n.mac.hex(), "state": nud_name(n.state)}
                               for ip, n in self.neigh6.entries.items()}}
        if op == "arp":
            if not self.dispatcher.l2 or not (self.dispatcher.addrs or self.dispatcher.addrs6):
                return {"ok": False, "error": "ARP needs an L2 device"}
            try:
                # an int (IPv4), or an address's text (IPv6: NDP)
                ip = int(ipaddress.ip_address(req["ip"]) if isinstance(req["ip"], str)
                         else req["ip"])
            except (KeyError, TypeError, ValueError):
                return {"ok": False, "error": "arp needs an int ip"}
            self._resolve(ip, self.clock())
            self._neigh_tx()  # the who-has goes now
            return {"ok": True}
        if op == "stop":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        for s in self.push:
            s.close(0)
        self.ctl.close(0)
        if self.neigh_pull is not None:
            self.neigh_pull.close(0)


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
    p.add_argument("--addr", action="append", required=True,
                   help="our IPv4 or IPv6 address (repeatable)")
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
    ips = [ipaddress.ip_address(a.split("/")[0]) for a in args.addr]
    addrs = [int(a) for a in ips if a.version == 4]
    addrs6 = [int(a) for a in ips if a.version == 6]
    mac = getattr(innermost(dev), "mac", None)
    disp = Dispatcher(args.workers, addrs, l2=dev.l2, mac=mac, addrs6=addrs6)
    if dev.l2 and disp.snm6:
        join_multicast(innermost(dev).sock,  # type: ignore[attr-defined]
                       name, [multicast_mac(g) for g in (*disp.snm6, ALL_NODES)])
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


if __name__ == "__main__":
    raise SystemExit(main())
