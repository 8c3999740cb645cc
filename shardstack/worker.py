"""A worker process: one `core.Shard` on a uvloop event loop.

Data path, per wake-up (no extra process hop, no per-frame msgpack):

    zmq PULL rx-<i>.ipc ──▶ drain every batch (NOBLOCK) ──▶ shard.receive_batch
    shard.take_events() ──▶ built-in services / appgate
    shard.take_frames_gso() ──▶ the shared TUN fd (or our own AF_PACKET
                            send socket): one write per frame, or one GSO
                            write per super-segment (--offload), cut at the
                            size the engine gives with it
    shard.next_deadline() ──▶ ONE loop timer, re-armed only when the
                            deadline moves earlier

Some facts about the ZeroMQ FD (zmq_getsockopt(3), ZMQ_FD): it signals
"something may have changed", edge-style, and only ZMQ_EVENTS tells the truth.
So a wake-up must drain with NOBLOCK until Again; if we stop early (to let
timers and the control socket run under a flood) we must reschedule ourselves,
because the FD will not fire again for messages already queued.

Direct RX (the default): the supervisor hands us our member of the kernel's
AF_PACKET fanout group (netio/fanout.py) or our queue of a multi-queue TUN
(netio/tunsteer.py), whose steering program already chose us by the flow
hash and RETA; we read it with `add_reader` (one recv/read per frame, no
process hop, no zmq), and the zmq PULL stays bound for the little netio
forwards: neighbour announcements, and ICMP errors quoting one of our flows
(the kernel gives netio every non-TCP frame; those go through
`shard.receive_batch` like any frame).

The supervisor starts us as `python -m shardstack.worker` (start-up:
shardstack.child); our devices are netio's (netio.serve_devices: the TUN fd,
or a packet socket behind netio.neigh_mirror.L2Tx, which adds Ethernet
headers from the mirror of netio's neighbour table). `worker-<i>.ctl`
serves its commands.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
import zmq

from shardstack import control, migrate, tracer
from shardstack.child import ChildDesc, child_main
from shardstack.config import ServeConfig
from shardstack.core import ConnInfo, Shard, ShardConfig
from shardstack.core.dropreason import DropReason
from shardstack.core.wire.ethernet import ETH_HLEN
from shardstack.load import BucketLoad
from shardstack.netio import rss
from shardstack.netio.device import (
    AUX_SPACE,
    MAX_FRAME,
    RX_CSUM_VALID,
    VNET_HDR_LEN,
    Device,
    DeviceWrapper,
    aux_rx_flags,
    vnet_rx_flags,
)
from shardstack.netio.impair import Impair
from shardstack.netio.neigh_mirror import L2Tx
from shardstack.netio.process import decode_neigh_entries, worker_endpoint
from shardstack.netio.serve_devices import worker_rx, worker_tx
from shardstack.rundir import RunDir
from shardstack.services import DISCARD, ECHO, Services
from shardstack.shim.gateproto import ip_str as gp_ip_str
from shardstack.stats import to_plain

MAX_BATCHES_PER_WAKEUP = 64  # bound one wake-up under a flood (x netio batch of 64); then yield
MAX_EVENT_ROUNDS = 64  # services reacting to events may raise more events
# Largest TCP payload per super-segment: an IPv4 packet's 64 KiB minus
# headers with options (the kernel's GSO_LEGACY_MAX_SIZE, 65536).
TSO_MAX = 65535 - 20 - 60
ZMQ_RCVHWM = 4096  # batches queued per worker before netio sees backpressure
_CSUM_ONLY = bytes(b & RX_CSUM_VALID for b in range(256))  # bytes.translate table
PROFILE_ENV = "SHARDSTACK_PROFILE"  # file prefix: cProfile each worker (see _start_profile)
BUSY_POLL_ENV = "SHARDSTACK_BUSY_POLL_US"  # direct RX: poll this long after a frame (0: off)
BUSY_POLL_MAX = 0.002  # seconds: bound on one busy-polling stretch (then timers, apps run)
MAX_DEV_FRAMES_PER_WAKEUP = 256  # direct RX: then let timers/control run (the fd stays readable)


@dataclass(slots=True)
class WorkerCounters:
    frames_in: int = 0
    frames_out: int = 0
    batches_in: int = 0
    wakeups: int = 0
    timer_fires: int = 0
    gso_out: int = 0
    drops: collections.Counter[DropReason] = field(default_factory=collections.Counter)

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] += n


def _monotonic() -> float:
    return time.monotonic()


class Worker:
    """Glue between zmq RX, the Shard, the device TX, services and appgate."""

    def __init__(self, cfg: ServeConfig, wid: int, reta: list[int], tx: Device,
                 loop: asyncio.AbstractEventLoop,
                 rx_sock: socket.socket | int | None = None) -> None:
        self.cfg = cfg
        self.wid = wid
        self.reta = list(reta)
        self.tx = tx
        self.l2 = tx.l2
        self.tso = tx.gso
        self.loop = loop
        self.run = RunDir(Path(cfg.run_dir))
        self.counters = WorkerCounters()
        self.shard = self._make_shard()
        self.load = BucketLoad(loop)  # per-RETA-bucket accounting (shardstack.load)
        self.shard.receive_batch = self.load.wrap(self.shard.receive_batch)
        # Moving buckets with their connections (shardstack.migrate): holds
        # and forwards frames of buckets on the move, around the shard's receive.
        self.migrate = migrate.Agent(self)
        if isinstance(tx, L2Tx):
            tx.attach_shard(self.shard)  # forward progress confirms neighbours
        self.services = None
        self.appgate = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None
        self._in_step = False
        self._dirty = False
        self._rx_scheduled = False
        self.zctx = zmq.Context.instance()
        self.pull = self.zctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, ZMQ_RCVHWM)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.ctl_server: asyncio.AbstractServer | None = None
        self.closed = False
        # Direct RX: our AF_PACKET fanout member (a socket) or our TUN queue
        # (an fd, the same one `tx` writes), or None (frames come from netio).
        self.rx_sock = rx_sock
        self.rx_vnet = bool(cfg.offload)
        self.rx_fd = -1
        self.rx_read = None
        self.rx_aux = None  # packet socket without vnet_hdr: recvmsg + PACKET_AUXDATA
        self.busy_poll = float(os.environ.get(BUSY_POLL_ENV, "0") or 0) / 1e6
        if isinstance(rx_sock, int):
            self.rx_fd = rx_sock
            self.rx_read = functools.partial(os.read, rx_sock)
        elif rx_sock is not None:
            self.rx_fd = rx_sock.fileno()
            self.rx_read = rx_sock.recv
            if not self.rx_vnet:
                # the frame's checksum state comes as a control message
                # (netio.device.aux_rx_flags; the supervisor's fanout group
                # enables PACKET_AUXDATA)
                self.rx_aux = rx_sock.recvmsg

    # -- construction ---------------------------------------------------------

    def _make_shard(self) -> Shard:
        wid, reta = self.wid, self.reta
        hasher = rss.Toeplitz(rss.SYMMETRIC_KEY)

        def owner_of(laddr: int, lport: int, raddr: int, rport: int) -> int:
            # The worker the peer's replies (raddr:rport → laddr:lport) are
            # steered to; over IPv6 (wire addresses above 32 bits) the 36-byte
            # tuple's hash.
            if raddr > 0xFFFFFFFF:
                return reta[hasher.hash_tuple6(raddr, laddr, rport, lport) & rss.RETA_MASK]
            return reta[hasher.hash_tuple(raddr, laddr, rport, lport) & rss.RETA_MASK]

        def port_filter(laddr: int, lport: int, raddr: int, rport: int) -> bool:
            # The mTCP trick: accept an ephemeral port only if it is ours.
            return owner_of(laddr, lport, raddr, rport) == wid

        self.owner_of = owner_of

        cfg = self.cfg
        scfg = ShardConfig(addrs=[cfg.addr.ip] if cfg.addr else [],
                           addrs6=[cfg.addr6.ip] if cfg.addr6 else [],
                           mtu=self.cfg.mtu, secret=self.cfg.secret,
                           trace=False, port_filter=port_filter,
                           tso_max=TSO_MAX if self.tso else 0,
                           tx_csum_offload=self.tso,  # send_gso marks NEEDS_CSUM
                           max_connections=self.cfg.max_connections,
                           ecn=self.cfg.ecn, pacing=self.cfg.pacing,
                           mtu_probing=self.cfg.mtu_probing)
        if self.cfg.tcp_mem:
            low, pressure, high = self.cfg.tcp_mem
            scfg.tcp_mem = (low, pressure, high)
        return Shard(scfg, _monotonic())

    async def start(self) -> None:
        # the built-in services on the wildcard: every address of ours
        self.services = Services(self.shard, 0, v6=self.cfg.addr6 is not None)
        for port in self.cfg.echo_ports:
            self.services.install(ECHO, port)
        for port in self.cfg.discard_ports:
            self.services.install(DISCARD, port)
        self.appgate = self._make_appgate()
        self.ctl_server = await control.serve_unix(self.run.worker_ctl(self.wid), self._on_ctl)
        self.migrate.listen()
        self.pull.bind(worker_endpoint(str(self.run.path), self.wid))
        self.loop.add_reader(self.pull.getsockopt(zmq.FD), self._on_rx)
        self._on_rx()  # messages may already be queued: the FD will not tell us
        if self.rx_read is not None:
            os.set_blocking(self.rx_fd, False)
            self.loop.add_reader(self.rx_fd, self._on_dev_rx)
            self._on_dev_rx()  # frames may have queued while no worker ran
        self._step()

    def _make_appgate(self):
        try:
            from shardstack.appgate import AppGate
        except ImportError:
            return None  # the app-facing half is optional: services still work
        gate = AppGate(self.shard, self.loop, str(self.run.path), self.wid, self.flush)
        gate.owner_of = self.owner_of  # a bound port's connect goes where its replies will
        return gate

    # -- the data path --------------------------------------------------------

    def _on_rx(self) -> None:
        self._rx_scheduled = False
        if self.closed:
            return
        recv = self.pull.recv_multipart
        receive = self.shard.receive_batch
        c = self.counters
        l2 = self.l2
        now = _monotonic()
        batches = frames = 0
        try:
            while batches < MAX_BATCHES_PER_WAKEUP:
                # One message is one netio batch: [flags, frame_0, ...]
                # (netio.process), handed to the shard without copying.
                parts = recv(zmq.NOBLOCK)
                batches += 1
                flags = parts[0]
                if not flags:  # a neighbour announcement (netio.process)
                    if l2:
                        self.tx.neigh_update(decode_neigh_entries(parts))
                    continue
                del parts[0]
                if l2:
                    parts = self._strip_eth(parts)
                frames += len(parts)
                # Only the checksum state matters to the shard (RX_GSO and
                # RX_CSUM_PARTIAL would split a batch at every super-frame).
                flags = flags.translate(_CSUM_ONLY)
                if not flags or flags.count(flags[0]) == len(flags):
                    # The usual case: one device, one checksum state for all.
                    receive(parts, now, bool(flags) and bool(flags[0] & RX_CSUM_VALID))
                else:
                    self._receive_mixed(parts, flags, now)
            else:
                # Flooded: let timers and control run, then come back (the FD
                # will not signal again for what is already queued).
                self._rx_scheduled = True
                self.loop.call_soon(self._on_rx)
        except zmq.Again:
            pass
        if not batches:
            return
        c.wakeups += 1
        c.batches_in += batches
        c.frames_in += frames
        self._step()

    def _on_dev_rx(self) -> None:
        """Direct RX: drain our fanout member or TUN queue (level-triggered:
        if we stop at the budget, the loop calls us again after timers and
        control). With busy polling on (SHARDSTACK_BUSY_POLL_US), keep
        polling the device for that long after the last frame before going
        back to sleep, so a quick next frame costs no wake-up; bounded per
        call so timers and the app side still run."""
        if self.closed or not self._dev_rx_once():
            return
        spin = self.busy_poll
        if spin <= 0:
            return
        now = _monotonic()
        idle_end = now + spin
        hard_end = now + BUSY_POLL_MAX
        while now < idle_end and now < hard_end:
            if self._dev_rx_once():
                idle_end = _monotonic() + spin
            now = _monotonic()

    def _dev_rx_once(self) -> int:
        recv = self.rx_read
        vnet = self.rx_vnet
        head = (VNET_HDR_LEN if vnet else 0) + (ETH_HLEN if self.l2 else 0)
        frames: list = []
        flags = bytearray()
        c = self.counters
        aux = self.rx_aux
        for _ in range(MAX_DEV_FRAMES_PER_WAKEUP):
            try:
                if aux is None:
                    data = recv(MAX_FRAME)
                else:
                    data, anc, _fl, _addr = aux(MAX_FRAME, AUX_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            if len(data) <= head:
                c.drop(DropReason.PKT_TOO_SMALL)
                continue
            mv = memoryview(data)
            if vnet:
                # Only the checksum state matters to the shard; keeping RX_GSO
                # would split batches into runs at every super-frame.
                flags.append(vnet_rx_flags(data) & RX_CSUM_VALID)
            else:
                flags.append(0 if aux is None else aux_rx_flags(anc) & RX_CSUM_VALID)
            # No neighbour learning from received frames (see L2Tx): their
            # MACs are unverified; only ARP, in netio, fills the table.
            frames.append(mv[head:] if head else data)
        if not frames:
            return 0
        now = _monotonic()
        if flags.count(flags[0]) == len(flags):
            self.shard.receive_batch(frames, now, bool(flags[0] & RX_CSUM_VALID))
        else:
            self._receive_mixed(frames, flags, now)
        c.wakeups += 1
        c.batches_in += 1
        c.frames_in += len(frames)
        self._step()
        return len(frames)

    def _receive_mixed(self, frames: list, flags: bytes, now: float) -> None:
        """Frames whose checksum state differs: runs of equal state, in order."""
        receive = self.shard.receive_batch
        start = 0
        for i in range(1, len(frames) + 1):
            if i == len(frames) or flags[i] != flags[start]:
                receive(frames[start:i], now, bool(flags[start] & RX_CSUM_VALID))
                start = i

    def _strip_eth(self, frames: list) -> list:
        """Ethernet frames (AF_PACKET, netio hop): hand on the IPv4. Their
        source MACs teach the neighbour table nothing (only ARP does, in
        netio: see L2Tx)."""
        return [memoryview(f)[ETH_HLEN:] for f in frames]

    def drain_rx(self) -> None:
        """Process every frame already queued for us (bounded): before a
        bucket's state leaves, what was steered here before the switch."""
        if self.rx_read is not None:
            for _ in range(64):
                if not self._dev_rx_once():
                    break
        self._on_rx()

    def _on_timer(self) -> None:
        self._timer = None
        self._armed = None
        self.counters.timer_fires += 1
        now = _monotonic()
        self.tx.poll(now)  # frames an Impair wrapper held back
        self.shard.advance(now)
        self._step()

    def flush(self) -> None:
        """Appgate's hook after it drove the shard: push frames, re-arm timer."""
        self._step()

    def _step(self) -> None:
        """Hand out events, send frames, re-arm the timer. Re-entrant safe:
        a flush() from inside an event handler only marks more work."""
        if self._in_step:
            self._dirty = True
            return
        self._in_step = True
        shard = self.shard
        try:
            for _ in range(MAX_EVENT_ROUNDS):
                self._dirty = False
                events = shard.take_events()
                if events:
                    self._dispatch(events)
                frames = shard.take_frames_gso()
                if frames:
                    frames = self._deliver_local(frames)  # the appgate's loopback hook
                if frames:
                    self._send(frames)
                if not events and not frames and not self._dirty:
                    break
            else:
                # Work is left (a connection to our own address feeds itself:
                # each round's frames come back as the next round's events).
                # Yield to other I/O, then go on: returning without a next
                # turn stranded a Writable, and a local transfer stalled.
                self.loop.call_soon(self._step)
            deadline = shard.next_deadline()
            held = self.tx.next_deadline()
            if held is not None and (deadline is None or held < deadline):
                deadline = held
            self._arm_timer(deadline)
        finally:
            self._in_step = False

    def _deliver_local(self, frames: list) -> list:
        """Frames to our own address never reach the device (Linux routes
        them via lo: ip_route_output_key, RTN_LOCAL): back into the shard.
        This is how `shardstack run --loopback` (127.0.0.0/8 mapped to the
        stack's address by the shim) and a connect to our own address work.
        Both directions of such a flow hash alike (symmetric Toeplitz) and
        listeners are on every shard, so the whole connection is ours.
        `frames` are `take_frames_gso()` pairs; a super-segment is taken
        whole (the shard accepts segments of any size)."""
        # (an IPv6-only stack: no IPv4 packet is ours; 5 bytes never equal 4)
        local = self.cfg.addr.ip.to_bytes(4, "big") if self.cfg.addr else b"none!"
        last = local[3]
        local6 = self.cfg.addr6.ip.to_bytes(16, "big") if self.cfg.addr6 else None
        out = None
        for i, pair in enumerate(frames):
            f = pair[0]
            if (f[19] == last and f[16:20] == local and f[0] >> 4 == 4) or (
                    local6 is not None and f[0] >> 4 == 6 and f[24:40] == local6):
                if out is None:
                    out = frames[:i]
                    mine = []
                mine.append(f)
            elif out is not None:
                out.append(pair)
        if out is None:
            return frames
        self.shard.receive_batch(mine, _monotonic(), True)
        self._dirty = True  # their answers: another round of _step
        return out

    def _send(self, frames: list) -> None:
        """`frames`: `shard.take_frames_gso()` pairs (packet, gso_size).
        gso_size 0: an ordinary packet, written as is; else a super-segment
        the kernel cuts into gso_size-byte payloads (the engine's current
        MSS with this segment's options, so no cut segment exceeds the MTU
        even when SACK blocks shorten it). Runs of ordinary packets between
        super-segments keep their order and their one-batch write."""
        tx = self.tx
        c = self.counters
        sent = 0
        run: list = []
        for f, gso in frames:
            if not gso:
                run.append(f)
                continue
            if run:
                sent += tx.send_batch(run)
                run = []
            if tx.send_gso(f, gso):
                sent += 1
                c.gso_out += 1
        if run:
            sent += tx.send_batch(run)
        c.frames_out += sent
        if sent != len(frames):
            c.drop(DropReason.DEV_TX, len(frames) - sent)

    def _dispatch(self, events: list) -> None:
        services = self.services
        now = _monotonic()
        rest = []
        for e in events:
            if services is not None and services.owns(e.sd):
                services.on_event(e, now)
            else:
                rest.append(e)
        if rest and self.appgate is not None:
            self.appgate.on_events(rest)

    def _arm_timer(self, deadline: float | None) -> None:
        """Keep ONE loop timer no later than the deadline. The deadline moves
        on almost every ACK (the RTO restarts), mostly later: a timer already
        armed earlier is kept and fires a little early (advance() finds
        nothing due and we re-arm), which is far cheaper than cancelling and
        re-creating a loop timer per step."""
        armed = self._armed
        if deadline is None or (armed is not None and armed <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = deadline
        if deadline is not None:
            self._timer = self.loop.call_later(max(0.0, deadline - _monotonic()), self._on_timer)

    # -- control --------------------------------------------------------------

    def _on_ctl(self, req: dict[str, Any], conn: control.Conn):
        op = req.get("op")
        if op == "ping":
            return {"worker": self.wid, "pid": os.getpid()}
        if op == "ss":
            return {"conns": [self._conn_dict(ci) for ci in self.shard.connections()]}
        if op == "stats":
            return self._stats()
        if op == "gate":  # the appgate's view of its connections (diagnostics)
            return {"conns": self.appgate.connections() if self.appgate is not None else []}
        if op == "load":  # states=False: the balancer's half-second poll needs no census
            return self.load.snapshot(self.shard if req.get("states", True) else None)
        if isinstance(op, str) and op.startswith("trace_"):  # `shardstack trace`
            return tracer.control(self, op, req)
        if isinstance(op, str) and op.startswith("mig_"):  # moving buckets (shardstack.migrate)
            return self.migrate.control(op, req)
        if op == "set_reta":
            self.reta[:] = req["reta"]  # port_filter closes over this list
            return {}
        if op in ("add_listener", "remove_listener", "add_udp", "connect_udp", "remove_udp"):
            if self.appgate is None:
                raise OSError(errno.EOPNOTSUPP, "this worker has no appgate")
            args = {k: v for k, v in req.items() if k != "op"}
            result = getattr(self.appgate, op)(**args)
            self.flush()
            return result if isinstance(result, dict) else {}
        raise OSError(errno.EOPNOTSUPP, f"unknown worker op {op!r}")

    def _conn_dict(self, ci: ConnInfo) -> dict[str, Any]:
        d = to_plain(ci)
        d["worker"] = self.wid
        v6 = ci.sd is not None and self.shard.sock(ci.sd).family == socket.AF_INET6
        for k in ("laddr", "raddr"):
            if d[k] > 0xFFFFFFFF or (v6 and d[k] == 0):
                # IPv6 (msgpack's ints stop at 64 bits) as `ss` prints it; an
                # AF_INET6 listener's `::` too, not 0.0.0.0
                d[k] = f"[{gp_ip_str(d[k], True)}]"
        return d

    def _stats(self) -> dict[str, Any]:
        # Every drop of this process by reason, ours and the shard's: names
        # on the wire (to_plain), produced from the enum.
        drops = self.counters.drops + self.shard.stats.drops
        if isinstance(self.tx, L2Tx):
            drops[DropReason.NEIGH_QUEUEFULL] += self.tx.stats.unres_discards
            drops[DropReason.NEIGH_FAILED] += self.tx.stats.failed
        counters = to_plain(self.counters)
        counters["drops"] = to_plain(+drops)
        counters["connections"] = sum(
            1 for ci in self.shard.connections() if ci.state != "LISTEN")
        shard_stats = self.shard.stats.as_dict()
        if self.services is not None:
            counters["services"] = to_plain(self.services.stats)
        if self.appgate is not None:
            counters["appgate"] = to_plain(getattr(self.appgate, "stats", {}))
            gate_udp = getattr(self.appgate, "udp", None)
            if gate_udp is not None:  # the shard's UDP MIB and the gate's hand-overs
                counters["udp"] = {**to_plain(self.shard.udp.stats), **to_plain(gate_udp.stats)}
        counters["migrate"] = self.migrate.control("mig_stats", {})
        dev = self.tx  # --impair: an Impair somewhere among the TX wrappers
        while isinstance(dev, DeviceWrapper) and not isinstance(dev, Impair):
            dev = dev.inner
        if isinstance(dev, Impair):
            counters["impair"] = dev.counters()["tx"]  # the rx lane is netio's
        if isinstance(self.tx, L2Tx):  # neighbour resolution (queued frames)
            counters["neigh"] = to_plain(self.tx.stats) | {"incomplete": len(self.tx.unres)}
        return {"worker": self.wid, "pid": os.getpid(), "counters": counters, "shard": shard_stats}

    def close(self) -> None:
        if self.migrate.steer.forward:
            # Buckets moved away (shardstack reload stops us once we own none):
            # what is still queued for us goes on to their new workers.
            self.drain_rx()
        self.closed = True
        self.load.close()
        self.loop.remove_reader(self.pull.getsockopt(zmq.FD))
        if self.rx_read is not None:
            self.loop.remove_reader(self.rx_fd)
        if self._timer is not None:
            self._timer.cancel()
        now = _monotonic()
        if self.appgate is not None:
            self.appgate.close()
        if self.services is not None:
            self.services.close_all(now)
            frames = self.shard.take_frames_gso()
            if frames:
                self._send(frames)  # FIN/RST on the way out
        self.migrate.close()
        if self.ctl_server is not None:
            self.ctl_server.close()
        self.pull.close(0)
        # libzmq leaves the ipc file behind on close; the next worker's bind
        # would reuse it, but a clean exit leaves nothing.
        for p in (self.run.worker_ctl(self.wid), self.run.rx_ipc(self.wid)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# -- process entry ------------------------------------------------------------


async def _amain(desc: ChildDesc) -> int:
    loop = asyncio.get_running_loop()
    cfg, wid = desc.cfg, desc.wid
    if cfg.pin:
        from shardstack.affinity import pin_worker

        pin_worker(wid)
    tx = worker_tx(desc.dev, cfg.ifname, wid, run_dir=cfg.run_dir,
                   subnet=cfg.addr.network if cfg.addr else None,
                   subnet6=cfg.addr6.network if cfg.addr6 else None,
                   gateway=cfg.gateway, pcap=cfg.pcap, impair=cfg.impair)
    worker = Worker(cfg, wid, desc.reta, tx, loop, worker_rx(desc.dev))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    desc.ready()
    prof = _start_profile(wid)
    try:
        await stop.wait()
    finally:
        worker.close()
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{os.environ[PROFILE_ENV]}.worker{wid}.{os.getpid()}.prof")
    return 0


def _start_profile(wid: int):
    """SHARDSTACK_PROFILE=PREFIX: cProfile this worker until SIGTERM and write
    PREFIX.worker<i>.<pid>.prof (read with `python -m pstats`). For finding
    where the microseconds go; it slows the worker down by about 2x."""
    if not os.environ.get(PROFILE_ENV):
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def main() -> int:
    return child_main(lambda desc: uvloop.run(_amain(desc)), warm_heap=True)


if __name__ == "__main__":
    raise SystemExit(main())
