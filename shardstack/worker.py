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

The supervisor starts us as `python -m shardstack.worker` with a JSON
description on stdin (not argv: it carries the ISN secret) and any device fd
passed down (`pass_fds`). `worker-<i>.ctl` serves its commands.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
import zmq

from shardstack import control, tracer
from shardstack.config import ServeConfig
from shardstack.load import BucketLoad
from shardstack.netio import rss
from shardstack.netio.device import (
    AUX_SPACE,
    MAX_FRAME,
    RX_CSUM_VALID,
    VNET_HDR_LEN,
    PacketDevice,
    _rx_flags,
    aux_rx_flags,
)
from shardstack.netio.neighbour import NUD_DELAY, NUD_FAILED, NUD_STALE, NUD_VALID, NeighParms
from shardstack.netio.process import (
    NEIGH_CONFIRM,
    NEIGH_RESOLVE,
    decode_neigh_entries,
    encode_neigh_request,
    neigh_endpoint,
    worker_endpoint,
)
from shardstack.rundir import RunDir
from shardstack.stats import to_plain

ETH_HLEN = 14
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
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n


def _monotonic() -> float:
    return time.monotonic()


class Worker:
    """Glue between zmq RX, the Shard, the device TX, services and appgate."""

    def __init__(self, cfg: ServeConfig, wid: int, reta: list[int], tx: Any,
                 loop: asyncio.AbstractEventLoop, rx_sock: Any = None) -> None:
        self.cfg = cfg
        self.wid = wid
        self.reta = list(reta)
        self.tx = tx
        self.l2 = tx.l2
        self.tso = bool(getattr(tx, "gso", False))
        self.loop = loop
        self.run = RunDir(Path(cfg.run_dir))
        self.counters = WorkerCounters()
        self.shard = self._make_shard()
        self.load = BucketLoad(loop)  # per-RETA-bucket accounting (shardstack.load)
        self.shard.receive_batch = self.load.wrap(self.shard.receive_batch)
        if self.l2 and hasattr(tx, "attach_shard"):
            tx.attach_shard(self.shard)  # L2Tx: forward progress confirms neighbours
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

    def _make_shard(self):
        from shardstack.core import Shard, ShardConfig

        wid, reta = self.wid, self.reta
        hasher = rss.Toeplitz(rss.SYMMETRIC_KEY)

        def port_filter(laddr: int, lport: int, raddr: int, rport: int) -> bool:
            # The mTCP trick: accept an ephemeral port only if the peer's
            # replies (raddr:rport → laddr:lport) hash to this worker.
            return reta[hasher.hash_tuple(raddr, laddr, rport, lport) & rss.RETA_MASK] == wid

        scfg = ShardConfig(addrs=[self.cfg.addr.ip], mtu=self.cfg.mtu, secret=self.cfg.secret,
                           trace=False, port_filter=port_filter,
                           tso_max=TSO_MAX if self.tso else 0,
                           tx_csum_offload=self.tso)  # send_gso marks NEEDS_CSUM
        return Shard(scfg, _monotonic())

    async def start(self) -> None:
        from shardstack.services import DISCARD, ECHO, Services

        self.services = Services(self.shard, self.cfg.addr.ip)
        for port in self.cfg.echo_ports:
            self.services.install(ECHO, port)
        for port in self.cfg.discard_ports:
            self.services.install(DISCARD, port)
        self.appgate = self._make_appgate()
        self.ctl_server = await control.serve_unix(self.run.worker_ctl(self.wid), self._on_ctl)
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
        return AppGate(self.shard, self.loop, str(self.run.path), self.wid, self.flush)

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
                c.drop("runt")
                continue
            mv = memoryview(data)
            if vnet:
                # Only the checksum state matters to the shard; keeping RX_GSO
                # would split batches into runs at every super-frame.
                flags.append(_rx_flags(data) & RX_CSUM_VALID)
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
        local = self.cfg.addr.ip.to_bytes(4, "big")
        last = local[3]
        out = None
        for i, pair in enumerate(frames):
            f = pair[0]
            if f[19] == last and f[16:20] == local:
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
            c.drop("tx", len(frames) - sent)

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
        if op == "load":
            return self.load.snapshot(self.shard)
        if isinstance(op, str) and op.startswith("trace_"):  # `shardstack trace`
            return tracer.control(self, op, req)
        if op == "set_reta":
            self.reta[:] = req["reta"]  # port_filter closes over this list
            return {}
        if op in ("add_listener", "remove_listener"):
            if self.appgate is None:
                raise OSError(errno.EOPNOTSUPP, "this worker has no appgate")
            args = {k: v for k, v in req.items() if k != "op"}
            result = getattr(self.appgate, op)(**args)
            self.flush()
            return result if isinstance(result, dict) else {}
        raise OSError(errno.EOPNOTSUPP, f"unknown worker op {op!r}")

    def _conn_dict(self, ci: Any) -> dict[str, Any]:
        d = to_plain(ci)
        d["worker"] = self.wid
        return d

    def _stats(self) -> dict[str, Any]:
        counters = to_plain(self.counters)
        counters["connections"] = sum(
            1 for ci in self.shard.connections() if ci.state != "LISTEN")
        shard_stats = self.shard.stats.as_dict()
        drops = counters["drops"]
        for k, v in shard_stats.items():
            if k.startswith("drop_"):
                drops[k[5:]] = drops.get(k[5:], 0) + v
        if self.services is not None:
            counters["services"] = to_plain(self.services.stats)
        if self.appgate is not None:
            counters["appgate"] = to_plain(getattr(self.appgate, "stats", {}))
        impair = getattr(getattr(self.tx, "inner", self.tx), "counters", None)
        if impair is None:
            impair = getattr(self.tx, "counters", None)
        if impair is not None:
            counters["impair"] = impair()["tx"]  # the rx lane is netio's
        neigh = getattr(self.tx, "unres", None)
        if neigh is not None:  # L2Tx: neighbour resolution (queued frames)
            counters["neigh"] = dict(self.tx.stats, incomplete=len(neigh))
            for k in ("unres_discards", "failed"):
                if self.tx.stats[k]:
                    drops["neigh_" + k] = drops.get("neigh_" + k, 0) + self.tx.stats[k]
        return {"worker": self.wid, "pid": os.getpid(), "counters": counters, "shard": shard_stats}

    def close(self) -> None:
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


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Die with the supervisor even if it is SIGKILLed (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def keep_heap_warm() -> None:
    """Serve large buffers from a heap that is never given back (glibc mallopt).

    A bulk sender moves 256 KiB chunks (appgate.CHUNK) through the send
    queue, allocated on read and freed on ACK. By default glibc maps such
    blocks fresh (or trims the heap under them) each time, and touching the
    new pages costs a fault per 4 KiB: measured, that was the largest single
    cost of sending. Pinning the thresholds keeps freed chunks for reuse;
    the price is that the worker's RSS stays at its high-water mark.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def make_tx(cfg: ServeConfig, spec: dict[str, Any], wid: int):
    """The worker's own TX device: the shared TUN fd, or a send-only AF_PACKET
    socket that adds Ethernet headers (`L2Tx`); under `--impair`, wrapped in
    netio's Impair so the TX direction is impaired too (seeded per worker)."""
    from shardstack.netio.device import PacketDevice, TunDevice

    if spec.get("kind") == "tun":
        dev = TunDevice.from_fd(spec["fd"], cfg.ifname, spec["mtu"], spec["vnet_hdr"])
    elif spec.get("kind") == "packet":
        dev = PacketDevice(cfg.ifname, rx=False, vnet_hdr=spec.get("vnet_hdr", False))
    else:
        raise ValueError(f"unknown device kind {spec.get('kind')!r}")
    if cfg.pcap:
        from shardstack.netio.pcap import Pcap

        dev = Pcap(dev, SharedPcapFile(cfg.pcap), rx=False)
    if cfg.impair:
        import dataclasses

        from shardstack.netio.impair import Impair, parse_impair_spec

        spec_ = parse_impair_spec(cfg.impair)
        dev = Impair(dev, dataclasses.replace(spec_, seed=spec_.seed * 1009 + wid + 1))
    if spec.get("kind") == "packet":
        from shardstack.netio_adapter import _mac_of

        return L2Tx(dev, _mac_of(dev, cfg.ifname), cfg)
    return dev


class SharedPcapFile:
    """The file object netio.pcap.Pcap writes to, shared by every process.

    The supervisor writes the pcap global header once; each process opens
    the file O_APPEND and this object turns each of Pcap's batches (records
    written, then flush()) into ONE write(2), which the kernel appends whole,
    so records of different processes never interleave. The header Pcap
    writes on construction is swallowed: the file already has one.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.buf = bytearray()
        self._header_seen = False

    def write(self, data) -> int:
        if not self._header_seen:
            self._header_seen = True
            return len(data)
        self.buf += data
        return len(data)

    def flush(self) -> None:
        if self.buf:
            os.write(self.fd, self.buf)
            self.buf.clear()

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


def write_pcap_header(path: str, l2: bool) -> None:
    """Create (truncate) the shared capture with its global header (supervisor)."""
    import struct

    from shardstack.netio import pcap

    linktype = pcap.LINKTYPE_ETHERNET if l2 else pcap.LINKTYPE_RAW
    with open(path, "wb") as f:
        f.write(struct.pack("=IHHiIII", pcap.PCAP_MAGIC, 2, 4, 0, 0, pcap.SNAPLEN, linktype))


# Neighbour resolution (Linux neighbour.c / arp.c defaults). The table itself
# is netio's (netio.neighbour: filled from ARP only, NUD states and timers);
# a worker mirrors it from netio's announcements and talks back with
# fire-and-forget messages, so nothing here ever waits on netio.
ARP_QUEUE_LEN = 3  # frames held per unresolved neighbour (the classic unres_qlen)
ARP_RETRANS = 1.0  # seconds between NEIGH_RESOLVE re-asks while INCOMPLETE (retrans_time)
ARP_PROBES = 3  # re-asks before the worker gives up on the neighbour (mcast_solicit)
CONFIRM_LEAD = 1.0  # s: look for forward progress this long before netio's DELAY ends
NEIGH_MIRROR_TTL = 60.0  # s: an entry netio said nothing of this long is asked about again
NEIGH_MIRROR_MAX = 4096  # STALE entries mirrored at most (netio's table holds 1024)
NEIGH_SNDHWM = 1024  # messages to netio queued before we count them as dropped
DELAY_FIRST_PROBE_TIME = NeighParms().delay_first_probe_time  # netio's DELAY (5 s)


@dataclass(slots=True)
class Unresolved:
    """An INCOMPLETE neighbour: frames waiting for its MAC (`arp_queue`)."""

    queue: list = field(default_factory=list)  # (packet, gso_size), oldest first
    probes: int = 1
    deadline: float = 0.0


@dataclass(slots=True)
class DelayCheck:
    """A neighbour in DELAY: at `deadline`, confirm it if a connection through
    it made forward progress since `snapshot` (id(sock) -> snd_una)."""

    deadline: float
    snapshot: dict


class NeighChannel:
    """Worker -> netio neighbour messages (netio.process NEIGH_RESOLVE,
    NEIGH_CONFIRM): a zmq PUSH to netio's PULL, sent with NOBLOCK and never
    answered, so a slow, absent or restarting netio costs at most a counted
    drop. libzmq queues to a peer that is not there yet (ZMQ_IMMEDIATE off)."""

    def __init__(self, run_dir: str) -> None:
        self.endpoint = neigh_endpoint(run_dir)
        self.sock: zmq.Socket | None = None

    def send(self, msg: bytes) -> bool:
        sock = self.sock
        if sock is None:
            sock = self.sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, NEIGH_SNDHWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
        try:
            sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class L2Tx:
    """Ethernet framing for a worker's AF_PACKET TX (netio has none for workers).

    Next hop: the destination itself when on-link, else `--gateway`. Its MAC
    comes only from netio's neighbour table, which only ARP fills
    (netio.neighbour): received frames teach nothing, so a forged TCP frame
    cannot redirect our traffic. netio announces every change of an entry
    (`neigh_update`, with its NUD state) and we mirror the usable ones:
    `neigh` holds those we may use without a word (REACHABLE, DELAY, PROBE),
    `stale` the STALE ones, whose first use we report (NEIGH_RESOLVE: netio
    arms DELAY, as Linux's `neigh_event_send`) while we keep sending.

    A miss never blocks: the frame waits on the neighbour, at most
    ARP_QUEUE_LEN of them (the oldest goes first, counted `unres_discards`),
    as Linux's `__neigh_event_send` queues on an INCOMPLETE entry, and we
    send NEIGH_RESOLVE; the frames go out when netio's announcement arrives.
    Every ARP_RETRANS we ask again, and after ARP_PROBES (or when netio says
    FAILED) the frames are dropped (`failed`), as `neigh_invalidate` does;
    TCP retransmits.

    Confirmation (Linux `dst_confirm` -> `neigh_confirm`): when netio
    announces DELAY we note snd_una of the connections through that hop, and
    CONFIRM_LEAD before the DELAY ends, if one of them moved (the peer acked
    new data or our SYN), we send NEIGH_CONFIRM, so netio goes back to
    REACHABLE instead of probing. A confirmation names an address, never a MAC.
    """

    l2 = True

    def __init__(self, inner, mac: bytes, cfg: ServeConfig, chan: Any = None) -> None:
        self.inner = inner
        self.mac = mac
        self.net = int(cfg.addr.network.network_address)
        self.mask = int(cfg.addr.network.netmask)
        self.gateway = cfg.gateway
        self.run_dir = cfg.run_dir
        self.chan = chan if chan is not None else NeighChannel(cfg.run_dir)
        self.shard: Any = None  # the worker's Shard (attach_shard), for confirmations
        self.neigh: dict[int, bytes] = {}  # ip -> 14-byte Ethernet header, usable
        self.stale: dict[int, bytes] = {}  # ip -> header, usable once reported (STALE)
        self.heard: dict[int, float] = {}  # ip -> when netio last announced it
        self.unres: dict[int, Unresolved] = {}
        self.checks: dict[int, DelayCheck] = {}
        self._sweep_at: float | None = None
        self.stats = {"queued": 0, "flushed": 0, "unres_discards": 0, "failed": 0,
                      "probes": 0, "uses": 0, "confirms": 0, "updates": 0,
                      "mac_changes": 0, "msg_dropped": 0}

    def attach_shard(self, shard: Any) -> None:
        """The shard whose connections confirm neighbours (forward progress)."""
        self.shard = shard

    # -- netio's announcements ----------------------------------------------------

    def neigh_update(self, entries, now: float | None = None) -> None:
        """netio's announcement [(ip, mac, state)] (netio.process): mirror it,
        and send what waited on a neighbour that is now usable."""
        if now is None:
            now = _monotonic()
        st = self.stats
        for ip, mac, state in entries:
            st["updates"] += 1
            if not state & NUD_VALID:  # INCOMPLETE, FAILED, gone
                self.neigh.pop(ip, None)
                self.stale.pop(ip, None)
                self.heard.pop(ip, None)
                self.checks.pop(ip, None)
                if state == NUD_FAILED and ip in self.unres:
                    st["failed"] += len(self.unres.pop(ip).queue)
                continue
            hdr = bytes(mac) + self.mac + b"\x08\x00"
            old = self.neigh.get(ip) or self.stale.get(ip)
            if old is not None and old != hdr:
                st["mac_changes"] += 1
            self.heard[ip] = now
            if state == NUD_STALE:
                self.neigh.pop(ip, None)
                self.stale[ip] = hdr
                if len(self.stale) > NEIGH_MIRROR_MAX:
                    del self.stale[next(iter(self.stale))]
            else:
                self.stale.pop(ip, None)
                self.neigh[ip] = hdr
                if self._sweep_at is None:
                    self._sweep_at = now + NEIGH_MIRROR_TTL
                if state == NUD_DELAY:
                    self._arm_check(ip, now)
                else:
                    self.checks.pop(ip, None)  # REACHABLE again, or PROBE: too late
            if ip in self.unres:
                if ip in self.stale:
                    self._use(ip)
                self._flush(ip)

    # -- the TX path ------------------------------------------------------------------

    def _hop(self, dst: int) -> int:
        return dst if (dst & self.mask) == self.net or self.gateway is None else self.gateway

    def _header(self, hop: int) -> bytes | None:
        """The slow path of a frame for `hop`: a STALE entry (report its use),
        or a miss (queue; ask netio, without waiting)."""
        hdr = self.neigh.get(hop)
        if hdr is not None:
            return hdr
        if hop in self.stale:
            return self._use(hop)
        if hop not in self.unres:
            self.unres[hop] = Unresolved(deadline=_monotonic() + ARP_RETRANS)
            self._solicit(hop)
        return None

    def _use(self, ip: int) -> bytes:
        """First use of a STALE entry (Linux `neigh_event_send`: netio arms
        DELAY); frames keep the cached MAC meanwhile."""
        hdr = self.stale.pop(ip)
        self.neigh[ip] = hdr
        self.stats["uses"] += 1
        self._tell(NEIGH_RESOLVE, ip)
        return hdr

    def _solicit(self, ip: int) -> None:
        self.stats["probes"] += 1
        self._tell(NEIGH_RESOLVE, ip)

    def _tell(self, op: int, ip: int) -> None:
        if not self.chan.send(encode_neigh_request(op, ip)):
            self.stats["msg_dropped"] += 1

    def _enqueue(self, hop: int, packet, gso: int) -> None:
        q = self.unres[hop].queue
        if len(q) >= ARP_QUEUE_LEN:
            del q[0]
            self.stats["unres_discards"] += 1
        q.append((bytes(packet), gso))  # the caller's buffer may be reused
        self.stats["queued"] += 1

    def _flush(self, ip: int) -> None:
        """The neighbour is resolved: its queued frames go, in order."""
        u = self.unres.pop(ip)
        hdr = self.neigh[ip]
        sent = 0
        run: list = []
        for packet, gso in u.queue:
            if not gso:
                run.append(hdr + packet)
                continue
            if run:
                sent += self.inner.send_batch(run)
                run = []
            sent += self._send_gso(hdr, packet, gso)
        if run:
            sent += self.inner.send_batch(run)
        self.stats["flushed"] += sent

    def send_batch(self, frames) -> int:
        """Frames written or queued on an unresolved neighbour."""
        out = []
        queued = 0
        neigh, mask, net, gw = self.neigh, self.mask, self.net, self.gateway
        for f in frames:
            dst = int.from_bytes(f[16:20], "big")
            hop = dst if (dst & mask) == net or gw is None else gw  # _hop, inlined
            hdr = neigh.get(hop)
            if hdr is None:
                hdr = self._header(hop)
            if hdr is None:
                self._enqueue(hop, f, 0)
                queued += 1
                continue
            out.append(hdr + f)
        return (self.inner.send_batch(out) if out else 0) + queued

    @property
    def gso(self) -> bool:
        return self.inner.gso

    def send_gso(self, packet, mss: int) -> bool:
        hop = self._hop(int.from_bytes(packet[16:20], "big"))
        hdr = self._header(hop)
        if hdr is None:
            self._enqueue(hop, packet, mss)
            return True
        return self._send_gso(hdr, packet, mss)

    def _send_gso(self, hdr: bytes, packet, mss: int) -> bool:
        inner = self.inner
        if isinstance(inner, PacketDevice):  # gathered by the kernel: no 64 KiB copy
            return inner.send_gso(packet, mss, eth=hdr)
        return inner.send_gso(hdr + packet, mss)

    # -- timers ---------------------------------------------------------------------

    def poll(self, now: float | None = None) -> None:
        self.inner.poll(now)
        if now is None:
            now = _monotonic()
        if self.unres:
            self._neigh_timer(now)
        if self.checks:
            self._run_checks(now)
        if self._sweep_at is not None and now >= self._sweep_at:
            self._sweep(now)

    def _neigh_timer(self, now: float) -> None:
        """Our side of `neigh_timer_handler` for INCOMPLETE entries: ask netio
        again (a message or an announcement may have been lost), or give up
        and drop the queue after ARP_PROBES."""
        for ip, u in list(self.unres.items()):
            if u.deadline > now:
                continue
            if u.probes >= ARP_PROBES:
                del self.unres[ip]
                self.stats["failed"] += len(u.queue)
                continue
            u.probes += 1
            u.deadline = now + ARP_RETRANS
            self._solicit(ip)

    def _arm_check(self, ip: int, now: float) -> None:
        if self.shard is None or ip in self.checks:
            return
        self.checks[ip] = DelayCheck(now + max(0.0, DELAY_FIRST_PROBE_TIME - CONFIRM_LEAD),
                                     self._snd_una_by_sock(ip))

    def _run_checks(self, now: float) -> None:
        for ip, chk in list(self.checks.items()):
            if chk.deadline > now:
                continue
            del self.checks[ip]
            if self._progressed(ip, chk.snapshot):
                self.stats["confirms"] += 1
                self._tell(NEIGH_CONFIRM, ip)

    def _conns_via(self, hop: int):
        """(sock, snd_una) of the shard's connections whose next hop is `hop`
        (read-only: the engine's established hash, keyed by 4-tuple)."""
        h = getattr(self.shard, "h", None)
        for key, sk in (h.ehash.items() if h is not None else ()):
            una = getattr(sk, "snd_una", None)  # request socks have none
            if una is not None and self._hop(key[2]) == hop:
                yield sk, una

    def _snd_una_by_sock(self, hop: int) -> dict:
        return {id(sk): una for sk, una in self._conns_via(hop)}

    def _progressed(self, hop: int, before: dict) -> bool:
        """Forward progress through `hop` since `before`: a connection's
        snd_una moved (the peer acked new data or our SYN: Linux `tcp_ack`'s
        FLAG_FORWARD_PROGRESS), or one appeared whose SYN is already acked."""
        for sk, una in self._conns_via(hop):
            prev = before.get(id(sk))
            if una != (getattr(sk, "iss", una) if prev is None else prev):
                return True
        return False

    def _sweep(self, now: float) -> None:
        """Entries netio said nothing of for NEIGH_MIRROR_TTL (it may have
        restarted without them) turn STALE here, so the next use asks again."""
        limit = now - NEIGH_MIRROR_TTL
        oldest = None
        for ip in list(self.neigh):
            t = self.heard.get(ip, now)
            if t <= limit:
                self.stale[ip] = self.neigh.pop(ip)
                self.checks.pop(ip, None)
            elif oldest is None or t < oldest:
                oldest = t
        self._sweep_at = None if oldest is None else oldest + NEIGH_MIRROR_TTL

    def next_deadline(self) -> float | None:
        d = self.inner.next_deadline()
        for u in self.unres.values():
            if d is None or u.deadline < d:
                d = u.deadline
        for c in self.checks.values():
            if d is None or c.deadline < d:
                d = c.deadline
        if self._sweep_at is not None and (d is None or self._sweep_at < d):
            d = self._sweep_at
        return d

    def close(self) -> None:
        self.chan.close()
        self.inner.close()


def _netio_call(run_dir: str, req: dict[str, Any], timeout_ms: int = 200) -> dict | None:
    """One request to netio's REP control socket. It BLOCKS up to `timeout_ms`:
    for the supervisor (which runs it in an executor) and tools, never from
    a worker's event loop (workers use NeighChannel)."""
    import msgpack

    from shardstack.netio.process import control_endpoint

    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    try:
        s.connect(control_endpoint(run_dir))
        s.send(msgpack.packb(req))
        return msgpack.unpackb(s.recv(), strict_map_key=False)
    except zmq.ZMQError:
        return None
    finally:
        s.close(0)


async def _amain(desc: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    cfg = ServeConfig.from_dict(desc["config"])
    wid = desc["worker"]
    if cfg.pin:
        from shardstack.affinity import pin_worker

        pin_worker(wid)
    tx = make_tx(cfg, desc["tx"], wid)
    rx_sock = desc["tx"].get("rx_fd")
    if rx_sock is not None and desc["tx"]["kind"] == "packet":
        import socket

        rx_sock = socket.socket(fileno=rx_sock)
    worker = Worker(cfg, wid, desc["reta"], tx, loop, rx_sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    if desc.get("ready_fd") is not None:
        os.write(desc["ready_fd"], b"1")
        os.close(desc["ready_fd"])
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
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:
        return 1  # the supervisor died before prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    keep_heap_warm()
    desc = json.loads(sys.stdin.read())
    return uvloop.run(_amain(desc))


if __name__ == "__main__":
    raise SystemExit(main())
