"""The supervisor: starts, watches and restarts netio and the workers.

It owns what must outlive any one child:

* the device: in TUN mode it opens the TUN itself and hands the same open
  file to netio and every worker (`pass_fds`), so a crashed netio or worker
  can be replaced without the interface (and the kernel side's address and
  routes) vanishing with it;
* the RETA (netio.rss), pushed to netio and to the workers (whose
  `port_filter` needs it to pick ephemeral ports);
* the global bind table (core.inet_hashtables/inet_connection_sock, the same
  code as a shard's), the single authority for bind() across shards, and the
  listeners installed on every worker, re-installed on a restarted worker;
* `control.sock` (shardstack.control), the shim's and the CLI's endpoint;
* with direct RX (the default; `SHARDSTACK_RX=netio` selects the netio
  hop), the N + 1 receive endpoints the kernel steers to: the packet sockets
  of the fanout group (netio/fanout.py) or the queues of a multi-queue TUN
  with a steering eBPF program (netio/tunsteer.py). Endpoint i goes to
  worker i, endpoint N to netio, and a restarted child gets the same one, so
  the member order (which the kernel's steering index refers to) never
  changes.

Why subprocess and not multiprocessing: a child is a fresh interpreter
(`python -m shardstack.worker`), so nothing of the supervisor's state (its
event loop, zmq context, open sockets) leaks into it, which is what
multiprocessing's fork does and its spawn only avoids by pickling. The child
reads its description as JSON on stdin (argv is world-readable in /proc and
the description carries the ISN secret), reports readiness on a pipe, and
asks the kernel to SIGTERM it if the supervisor dies (PR_SET_PDEATHSIG).

Child exit is watched with a pidfd per child (pidfd_open(2), readable when the
process exits): no SIGCHLD handler races, no polling. A dead child is
replaced at once; a child that fails before it reports ready, or dies more
than CRASH_BURST times in CRASH_WINDOW seconds, is restarted with exponential
backoff (at most MAX_BACKOFF), so a broken build does not spin the CPU.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardstack import control, migrate
from shardstack import reta as retabook
from shardstack.config import ServeConfig
from shardstack.core.inet_connection_sock import SOMAXCONN, inet_csk_get_port
from shardstack.core.inet_hashtables import InetHashinfo, inet_hash, inet_put_port, inet_unhash
from shardstack.core.sock import State
from shardstack.netio import rss
from shardstack.rundir import RunDir, prepare_run_dir
from shardstack.stats import ProcTelemetry

STOP_GRACE = 3.0  # SIGTERM → SIGKILL at shutdown
CRASH_WINDOW = 10.0  # seconds: more than CRASH_BURST deaths in it means a crash loop
CRASH_BURST = 5
MAX_BACKOFF = 5.0
WORKER_CALL_TIMEOUT = 3.0
RX_MODE_ENV = "SHARDSTACK_RX"  # "direct" (default) or "netio"
SPARE_DELAY = 1.0  # s after start-up or a handoff before the next spare starts
SPARE_MAX_FAILURES = 5  # spares dead before ready, in a row, before we stop making them


def rx_mode(cfg: ServeConfig) -> str:
    """How frames reach workers: "direct" (each worker reads its own AF_PACKET
    fanout member, steered in the kernel) or "netio" (netio reads the device
    and forwards over ZeroMQ). --impair and --pcap use netio (their RX half
    lives there); so does a TUN that cannot be opened multi-queue."""
    want = os.environ.get(RX_MODE_ENV, "direct").strip().lower()
    if want not in ("direct", "netio"):
        raise ValueError(f"{RX_MODE_ENV} must be 'direct' or 'netio', not {want!r}")
    if cfg.impair or cfg.pcap:
        return "netio"
    return want


def log(msg: str) -> None:
    print(f"shardstack[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# -- the global bind table ------------------------------------------------------


@dataclass(slots=True, eq=False)
class GlobalBind:
    """An owner in the supervisor's bind table: what core's conflict rules read."""

    bind_id: int
    laddr: int
    reuseaddr: bool
    reuseport: bool
    state: State = State.CLOSED
    lport: int = 0
    raddr: int = 0
    rport: int = 0
    bound: bool = False
    bind_by_connect: bool = False  # never: connect() ports are the shards' own
    backlog: int = 0
    listener: dict[str, Any] | None = None  # {backlog, path} once listening
    service: str | None = None  # "echo"/"discard" for the built-in services
    holders: int = 1  # control connections (processes) holding it: freed at the last
    # -- IPv6 (issue 14): the bind's family, as core's conflict rules read it
    family: int = socket.AF_INET
    v6only: bool = False  # IPV6_V6ONLY: `::` then takes no IPv4


UDP_BIND_BASE = 1 << 30  # UDP bind ids: apart from TCP's, one release op for both


@dataclass(slots=True, eq=False)
class UdpBind:
    """A UDP socket on the stack: the app's unix datagram path and its addresses."""

    bind_id: int
    laddr: int
    port: int
    reuseaddr: bool
    reuseport: bool
    path: str
    lport: int = 0
    raddr: int = 0
    rport: int = 0
    # -- IPv6 (issue 14): an AF_INET6 socket (IPv4 peers v4-mapped unless v6only)
    v6: bool = False
    v6only: bool = False

    def add_args(self) -> dict[str, Any]:
        if self.v6:
            return {"bind_id": self.bind_id, "addr": _dotted(self.laddr, True),
                    "port": self.lport, "path": self.path, "v6": True, "v6only": self.v6only}
        return {"bind_id": self.bind_id, "addr": _dotted(self.laddr), "port": self.lport,
                "path": self.path}

    def families(self) -> int:
        """Which families' datagrams it takes (1: IPv4, 2: IPv6), as core's
        inet_addr_families: by its address, or the wildcard's V6ONLY."""
        if not self.v6:
            return 1
        if self.laddr:
            return 2
        return 2 if self.v6only else 3

    def peer_text(self) -> str:
        return _dotted(self.raddr, self.v6 or self.raddr > 0xFFFFFFFF)


def _dotted(a: int, v6: bool = False) -> str:
    return str(ipaddress.IPv6Address(a) if v6 else ipaddress.IPv4Address(a))


class BindTable:
    """bind/listen/release across shards (docs/architecture.md "Runtime")."""

    def __init__(self, addrs: list[int], addrs6: list[int] | None = None) -> None:
        self.h = InetHashinfo()
        self.addrs = addrs
        self.addrs6 = list(addrs6 or ())
        self.binds: dict[int, GlobalBind] = {}
        self._next_id = 1

    def bind(self, addr: int, port: int, reuseaddr: bool = False, reuseport: bool = False,
             service: str | None = None, family: int = socket.AF_INET,
             v6only: bool = False) -> GlobalBind:
        """`family` AF_INET6: `addr` is 128-bit, 0 the wildcard `::` (which
        takes IPv4 too unless `v6only`: one table holds both families, so
        `::` and `0.0.0.0` on one port conflict as on Linux)."""
        mine = self.addrs6 if family == socket.AF_INET6 else self.addrs
        if addr != 0 and addr not in mine:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        if not 0 <= port <= 65535:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        b = GlobalBind(self._next_id, addr, reuseaddr, reuseport, service=service,
                       family=family, v6only=v6only)
        inet_csk_get_port(self.h, b, port, offset=self._next_id * 7919)
        self._next_id += 1
        self.binds[b.bind_id] = b
        return b

    def get(self, bind_id: int) -> GlobalBind:
        b = self.binds.get(bind_id)
        if b is None:
            raise OSError(errno.EBADF, "unknown bind_id")
        return b

    def listen(self, b: GlobalBind, backlog: int) -> None:
        """As core's ``inet_csk_listen_start`` without a shard's counters: re-check
        the port (two SO_REUSEADDR sockets may share it, only one may listen), then
        LISTEN and the listening hash."""
        if b.state is not State.LISTEN:
            inet_csk_get_port(self.h, b, b.lport)
            b.state = State.LISTEN
            b.backlog = min(max(backlog, 0), SOMAXCONN)
            inet_hash(self.h, b)

    def unlisten(self, b: GlobalBind) -> None:
        """Out of LISTEN, still bound (a port the app bound stays its own, as
        Linux's tcp_set_state(CLOSE) keeps a SOCK_BINDPORT_LOCK port)."""
        inet_unhash(self.h, b)
        b.state = State.CLOSED

    def release(self, b: GlobalBind) -> None:
        inet_unhash(self.h, b)
        inet_put_port(self.h, b)
        b.state = State.CLOSED
        self.binds.pop(b.bind_id, None)

    def listeners(self) -> list[GlobalBind]:
        return [b for b in self.binds.values() if b.listener is not None]


# -- children -------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Spare:
    """The warm spare (shardstack.spare): its process and our end of its socket."""

    proc: subprocess.Popen
    sock: socket.socket
    ready: bool = False  # it said its imports are done


@dataclass(slots=True, eq=False)
class Child:
    kind: str  # "netio" or "worker"
    wid: int  # worker id; -1 for netio
    proc: subprocess.Popen | None = None
    pidfd: int = -1
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0  # consecutive failed starts / crash-loop deaths
    deaths: list[float] = field(default_factory=list)
    served: bool = False  # reached ready since the last spawn
    ready: bool = False
    ready_fd: int = -1
    telemetry: ProcTelemetry | None = None
    ctl: control.AsyncControlClient | None = None
    reloading: bool = False  # `shardstack reload` is replacing it: its exit is no crash
    reloads: int = 0

    @property
    def name(self) -> str:
        return "netio" if self.kind == "netio" else f"worker-{self.wid}"


class Supervisor:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.run: RunDir | None = None
        self.reta = rss.make_reta(cfg.workers)
        self.book = retabook.RetaBook(cfg.workers, list(self.reta))  # moves, load report
        self.metrics = None  # shardstack.metrics.MetricsServer with --metrics
        self.traces: dict[int, dict[str, Any]] = {}  # `shardstack trace`: tid -> {port, conn?}
        # A warm spare worker (shardstack.spare): imports done, waiting to
        # become whichever worker dies next.
        self.spare: Spare | None = None
        self.spare_failures = 0  # spares that died before reporting ready, in a row
        self._next_tid = 1
        self.binds = BindTable([cfg.addr.ip] if cfg.addr else [],
                               [cfg.addr6.ip] if cfg.addr6 else [])
        self.udp_binds: dict[int, UdpBind] = {}  # UDP's own port space (udp_lib_get_port)
        self._next_udp = UDP_BIND_BASE
        self.tun = None  # netio.device.TunDevice in TUN mode
        self.fanout: list[Any] | None = None  # direct RX: the group's packet sockets
        self.fanout_stats = None
        self.tun_queues: list[Any] | None = None  # direct RX on TUN: one queue per child
        self.tun_counts = None  # tunsteer.SteeringCounts
        self.tun_reta_map = None  # tunsteer.RetaMap: the RETA the steering program reads
        self.tun_created = False
        self.peers_added: list[str] = []  # the --peer addresses we added to the TUN
        self.children: list[Child] = []
        self.netio: Child | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.stop_event: asyncio.Event | None = None
        self.server: asyncio.AbstractServer | None = None
        self.me = ProcTelemetry(os.getpid())
        self.move_lock = asyncio.Lock()  # one bucket move (or reload) at a time
        self.balancer = None  # shardstack.rebalance.Balancer with --rebalance auto

    # -- lifecycle ------------------------------------------------------------

    async def run_forever(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.stop_event.set)
        try:
            self._setup()
            self.server = await control.serve_unix(self.run.control_sock, self._on_control)
            if self.cfg.metrics:
                self._start_metrics()
            for c in self.children:
                self._spawn(c)
            self.loop.call_later(SPARE_DELAY, self._start_spare)
            if self.cfg.rebalance == "auto" and self.cfg.workers > 1:
                from shardstack.rebalance import Balancer

                self.balancer = Balancer(self.cfg.workers)
                self.loop.create_task(self._rebalance_loop())
            log(f"serving {' '.join(c.text for c in self.cfg.addrs)} on {self.cfg.device} {self.cfg.ifname} with "
                f"{self.cfg.workers} workers; run dir {self.run.path}")
            await self.stop_event.wait()
            log("stopping")
        finally:
            await self._teardown()
        return 0

    def _setup(self) -> None:
        cfg = self.cfg
        run = prepare_run_dir(cfg.run_dir)
        run.lock()  # EBUSY if another serve owns it: then touch nothing of its
        self.run = run
        self.run.remove_stale()
        for port in cfg.echo_ports:
            self.binds.bind(0, port, reuseaddr=True, service="echo")
        for port in cfg.discard_ports:
            self.binds.bind(0, port, reuseaddr=True, service="discard")
        if cfg.pcap:
            from shardstack.netio.pcap import create_capture

            create_capture(cfg.pcap, l2=cfg.device == "packet")
        if cfg.device == "tun":
            self._open_tun()
        elif not Path(f"/sys/class/net/{cfg.ifname}").exists():
            raise OSError(errno.ENODEV, f"no interface {cfg.ifname!r} for --packet")
        elif rx_mode(cfg) == "direct":
            from shardstack.netio import fanout

            self.fanout = fanout.open_group(cfg.ifname, cfg.workers, self.reta, cfg.offload)
            self.fanout_stats = fanout.GroupStats(self.fanout)
        self.netio = Child("netio", -1)
        self.children = [Child("worker", i) for i in range(cfg.workers)] + [self.netio]

    def _open_tun(self) -> None:
        from shardstack.netio.device import TunDevice

        cfg = self.cfg
        self.tun_created = not Path(f"/sys/class/net/{cfg.ifname}").exists()
        if rx_mode(cfg) == "direct":
            self._open_tun_queues()
        if self.tun is None:
            self.tun = TunDevice(cfg.ifname, mtu=cfg.mtu, vnet_hdr=cfg.offload, up=True)
        for peer in (cfg.peer, cfg.peer6):
            if peer is None:
                continue
            # IPv6: no duplicate address detection (`nodad`), so the
            # address is usable at once rather than "tentative" for a second
            # or more (RFC 4862 §5.4; the stack is the only other node).
            cmd = ["ip", "addr", "add", peer.text, "dev", cfg.ifname] + (["nodad"] if peer.v6
                                                                       else [])
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                self.peers_added.append(peer.text)
            elif "File exists" not in r.stderr:
                raise OSError(errno.EINVAL, f"ip addr add {peer.text}: {r.stderr.strip()}")

    def _open_tun_queues(self) -> None:
        from shardstack.netio import tunsteer

        cfg = self.cfg
        counts = reta_map = None
        try:
            counts = tunsteer.SteeringCounts(cfg.workers + 1)
            # The program reads the RETA from a map: set_reta is a map write.
            reta_map = tunsteer.RetaMap(self.reta)
            self.tun_queues = tunsteer.open_queues(cfg.ifname, cfg.workers, self.reta, cfg.mtu,
                                                   cfg.offload, counts, reta_map)
        except OSError as e:
            log(f"direct RX on TUN unavailable ({e.strerror}); frames go through netio")
            for m in (counts, reta_map):
                if m is not None:
                    m.close()
            return
        self.tun_counts = counts
        self.tun_reta_map = reta_map
        self.tun = self.tun_queues[-1]  # netio's queue: ICMP and whatever is not TCP
        if cfg.pin:
            from shardstack.affinity import steer_tun_rps

            steer_tun_rps(cfg.ifname, cfg.workers)

    def _start_metrics(self) -> None:
        from shardstack.metrics import MetricsServer, is_loopback, parse_listen

        host, port = parse_listen(self.cfg.metrics)
        self.metrics = MetricsServer(host, port, self.metrics_snapshot, self.loop)
        log(f"metrics on http://{host}:{self.metrics.port}/metrics")
        if not is_loopback(host):
            log(f"warning: metrics served beyond loopback ({host}), without authentication")

    async def _teardown(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.close()
        if self.metrics is not None:
            await self.loop.run_in_executor(None, self.metrics.close)
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for c in live:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            live = [c for c in live if c.proc.poll() is None]
        for c in live:
            log(f"{c.name} ignored SIGTERM; killing")
            c.proc.kill()
            c.proc.wait(timeout=5)
        for c in self.children:
            self._forget(c)
        self._drop_spare()
        if self.tun is not None:
            for text in self.peers_added if not self.tun_created else ():
                subprocess.run(["ip", "addr", "del", text, "dev", self.cfg.ifname],
                               capture_output=True, timeout=10)
            self.tun.close()  # a TUN we created (not persistent) goes with its last fd
        for q in self.tun_queues or ():
            q.close()
        if self.tun_counts is not None:
            self.tun_counts.close()
        if self.tun_reta_map is not None:
            self.tun_reta_map.close()
        for s in self.fanout or ():
            s.close()
        if self.run is not None:
            self.run.cleanup()

    # -- children -------------------------------------------------------------

    def _describe(self, c: Child, ready_w: int) -> tuple[dict[str, Any], list[int]]:
        desc: dict[str, Any] = {
            "config": self.cfg.to_dict(),
            "worker": c.wid,
            "workers": self.cfg.workers,
            "reta": self.reta,
            "ready_fd": ready_w,
        }
        fds = [ready_w]
        if self.tun_queues is not None:
            q = self.tun_queues[c.wid if c.kind == "worker" else self.cfg.workers]
            desc["tx"] = {"kind": "tun", "fd": q.fd, "vnet_hdr": q.vnet_hdr, "mtu": q.mtu}
            if c.kind == "worker":
                desc["tx"]["rx_fd"] = q.fd  # our queue: read and write it
            fds.append(q.fd)
        elif self.tun is not None:
            desc["tx"] = {"kind": "tun", "fd": self.tun.fd, "vnet_hdr": self.tun.vnet_hdr,
                          "mtu": self.tun.mtu}
            fds.append(self.tun.fd)
        else:
            desc["tx"] = {"kind": "packet", "ifname": self.cfg.ifname,
                          "vnet_hdr": self.cfg.offload}
            if self.fanout is not None:
                sock = self.fanout[c.wid if c.kind == "worker" else self.cfg.workers]
                desc["tx"]["rx_fd"] = sock.fileno()
                fds.append(sock.fileno())
        return desc, fds

    def _argv(self, c: Child) -> list[str]:
        mod = "shardstack.worker" if c.kind == "worker" else "shardstack.netio_adapter"
        return [sys.executable, "-m", mod]

    def _spawn(self, c: Child) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        desc, fds = self._describe(c, ready_w)
        proc = self._use_spare(desc, fds) if c.kind == "worker" else None
        if proc is None:
            try:
                proc = subprocess.Popen(self._argv(c), stdin=subprocess.PIPE, pass_fds=fds,
                                        close_fds=True)
            finally:
                os.close(ready_w)
            try:
                proc.stdin.write(json.dumps(desc).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died at once; the pidfd reports the exit and we retry
        else:
            os.close(ready_w)
        c.proc = proc
        c.started = time.monotonic()
        c.ready = False
        c.served = False
        c.telemetry = ProcTelemetry(proc.pid)
        c.pidfd = os.pidfd_open(proc.pid)
        c.ready_fd = ready_r
        self.loop.add_reader(c.pidfd, self._on_exit, c)
        self.loop.add_reader(ready_r, self._on_ready, c)

    # -- the warm spare (shardstack.spare) -----------------------------------

    def _start_spare(self) -> None:
        if self.stopping or self.spare is not None:
            return
        if self.spare_failures >= SPARE_MAX_FAILURES:
            return  # a spare that cannot even import: workers start cold, as without one
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "shardstack.spare",
                                     str(theirs.fileno())], stdin=subprocess.DEVNULL,
                                    pass_fds=[theirs.fileno()], close_fds=True)
        except OSError as e:
            log(f"cannot start a spare worker: {e}")
            ours.close()
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.spare = Spare(proc, ours)
        self.loop.add_reader(ours.fileno(), self._on_spare_msg)

    def _on_spare_msg(self) -> None:
        """The spare's one message: b"R", its imports are done; or EOF, it died."""
        sp = self.spare
        if sp is None:
            return
        try:
            data = sp.sock.recv(16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.loop.remove_reader(sp.sock.fileno())
        if data == b"R":
            sp.ready = True
            self.spare_failures = 0
            return
        self.spare = None
        sp.sock.close()
        self._end(sp.proc)
        self.spare_failures += 1
        log(f"spare worker (pid {sp.proc.pid}) exited before it was ready "
            f"({self.spare_failures} in a row)")
        self.loop.call_later(SPARE_DELAY * 2 ** self.spare_failures, self._start_spare)

    def _use_spare(self, desc: dict[str, Any], fds: list[int]) -> subprocess.Popen | None:
        """Hand a dying worker's description to the spare; None if there is
        no live spare (then the caller starts a fresh interpreter)."""
        if self.spare is None:
            return None
        proc, sock = self.spare.proc, self.spare.sock
        if not self.spare.ready:
            self.loop.remove_reader(sock.fileno())
        self.spare = None
        try:
            if proc.poll() is not None:
                raise OSError(errno.ESRCH, "the spare exited")
            from shardstack.spare import hand_over

            hand_over(sock, desc, fds)
        except OSError as e:
            log(f"spare worker unusable ({e}); starting a new process")
            self._end(proc)
            return None
        finally:
            sock.close()
        self.loop.call_later(SPARE_DELAY, self._start_spare)
        return proc

    def _drop_spare(self) -> None:
        if self.spare is not None:
            sp, self.spare = self.spare, None
            if not sp.ready:
                self.loop.remove_reader(sp.sock.fileno())
            sp.sock.close()  # an idle spare exits when its socket closes
            self._end(sp.proc)

    @staticmethod
    def _end(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"process {proc.pid} did not exit after SIGKILL")

    def _on_ready(self, c: Child) -> None:
        data = os.read(c.ready_fd, 16)
        self.loop.remove_reader(c.ready_fd)
        os.close(c.ready_fd)
        c.ready_fd = -1
        if not data:
            return  # died before ready: _on_exit handles it
        c.served = True
        if c.kind == "worker":
            self.loop.create_task(self._worker_ready(c))
        else:
            c.ready = True

    async def _worker_ready(self, c: Child) -> None:
        """A worker is ready (`hello` says so) once its control channel is up
        and it holds every listener: a restarted one gets them all again."""
        proc = c.proc
        try:
            ctl = await control.AsyncControlClient.connect(self.run.worker_ctl(c.wid))
        except OSError as e:
            log(f"{c.name}: cannot reach its control socket: {e}")
            return
        if c.proc is not proc or c.pidfd < 0:  # it died meanwhile
            ctl.close()
            return
        c.ctl = ctl
        try:
            for b in self.binds.listeners():
                await ctl.call("add_listener", timeout=WORKER_CALL_TIMEOUT,
                               **self._listener_args(b))
            for u in self.udp_binds.values():  # UDP sockets live on every worker too
                await ctl.call("add_udp", timeout=WORKER_CALL_TIMEOUT, **u.add_args())
                if u.rport:
                    await ctl.call("connect_udp", timeout=WORKER_CALL_TIMEOUT,
                                   bind_id=u.bind_id, addr=u.peer_text(), port=u.rport)
        except (OSError, TimeoutError, control.ControlError) as e:
            log(f"{c.name}: listener install failed: {e}")
            return
        for tid, args in list(self.traces.items()):  # a trace follows a restarted worker
            await self._call_quietly(c, "trace_start", tid=tid, **args)
        if c.proc is proc and c.pidfd >= 0:
            c.ready = True

    def _forget(self, c: Child) -> None:
        if c.pidfd >= 0:
            self.loop.remove_reader(c.pidfd)
            os.close(c.pidfd)
            c.pidfd = -1
        if c.ready_fd >= 0:
            self.loop.remove_reader(c.ready_fd)
            os.close(c.ready_fd)
            c.ready_fd = -1
        if c.ctl is not None:
            c.ctl.close()
            c.ctl = None
        c.ready = False

    def _on_exit(self, c: Child) -> None:
        rc = c.proc.wait()
        self._forget(c)
        if self.stopping:
            return
        now = time.monotonic()
        lived = now - c.started
        # A child that got as far as serving is replaced at once (kill -9, an
        # OOM kill); one that keeps failing to start, or keeps dying, backs off.
        failed_start = not c.served
        if c.reloading and not failed_start:  # replaced on purpose (`shardstack reload`)
            c.reloading = False
            c.reloads += 1
            log(f"{c.name} (pid {c.proc.pid}) replaced by reload after {lived:.1f}s")
            self._spawn(c)
            return
        c.deaths = [t for t in c.deaths if now - t < CRASH_WINDOW] + [now]
        if failed_start or len(c.deaths) > CRASH_BURST:
            c.quick_deaths += 1
        else:
            c.quick_deaths = 0
        delay = 0.0 if c.quick_deaths <= 1 else min(MAX_BACKOFF, 0.1 * 2 ** c.quick_deaths)
        log(f"{c.name} (pid {c.proc.pid}) exited with {rc} after {lived:.1f}s; "
            f"restarting in {delay:.1f}s")
        c.restarts += 1
        self.loop.call_later(delay, self._respawn, c)

    def _respawn(self, c: Child) -> None:
        if not self.stopping:
            self._spawn(c)

    # -- control.sock ---------------------------------------------------------

    def _on_control(self, req: dict[str, Any], conn: control.Conn):
        op = req.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise OSError(errno.EOPNOTSUPP, f"unknown op {op!r}")
        return handler(req, conn)

    def _op_hello(self, req, conn) -> dict[str, Any]:
        return {
            "addrs": [c.addr for c in self.cfg.addrs],
            "workers": self.cfg.workers,
            "run_dir": str(self.run.path),
            "pid": os.getpid(),
            "ready": all(c.ready for c in self.children),
            "mtu": self.cfg.mtu,
            # What the shim needs to route a connect: which destinations are on-link for the
            # stack (or reachable through its gateway), and the RETA that picks the worker
            # owning a given 4-tuple (for connect() from an explicitly bound port).
            "nets": [str(c.network) for c in self.cfg.addrs],
            "gateway": (str(ipaddress.IPv4Address(self.cfg.gateway))
                        if self.cfg.gateway is not None else None),
            "reta": list(self.reta),
        }

    def _op_bind(self, req, conn) -> dict[str, Any]:
        v6 = bool(req.get("v6"))
        addr = _addr_arg(req.get("addr", 0), v6)
        b = self.binds.bind(addr, int(req.get("port", 0)), bool(req.get("reuseaddr")),
                            bool(req.get("reuseport")),
                            family=socket.AF_INET6 if v6 else socket.AF_INET,
                            v6only=bool(req.get("v6only")))
        binds = conn.state.setdefault("binds", set())
        if not binds:
            conn.on_close.append(lambda: self._release_all(conn))
        binds.add(b.bind_id)
        return _bind_reply(b)

    def _op_adopt(self, req, conn) -> dict[str, Any]:
        """Another process holds the bound socket's fd now (multiprocessing
        spawn hands it over): it shares the bind, as processes sharing a
        kernel socket do; the bind goes at its last holder's release or exit."""
        b = self.binds.get(int(req["bind_id"]))
        if b.service is not None:
            raise OSError(errno.EBADF, "not an app's bind")
        binds = conn.state.setdefault("binds", set())
        if b.bind_id in binds:
            return _bind_reply(b)
        if not binds:
            conn.on_close.append(lambda: self._release_all(conn))
        binds.add(b.bind_id)
        b.holders += 1
        return _bind_reply(b)

    async def _op_listen(self, req, conn) -> dict[str, Any]:
        b = self._owned(req, conn)
        if b.listener is not None:
            return {}
        self.binds.listen(b, int(req.get("backlog", 128)))
        b.listener = {"backlog": b.backlog, "path": str(req["path"]),
                      "opts": list(req.get("opts") or [])}
        done = []
        try:
            for c in self._workers():
                if c.ctl is not None:
                    await c.ctl.call("add_listener", timeout=WORKER_CALL_TIMEOUT,
                                     **self._listener_args(b))
                    done.append(c)
        except OSError:
            for c in done:
                await self._call_quietly(c, "remove_listener", bind_id=b.bind_id)
            b.listener = None
            b.state = State.CLOSED
            raise
        return {}

    async def _op_unlisten(self, req, conn) -> dict[str, Any]:
        """shutdown(SHUT_RD) of a listener: Linux disconnects a LISTEN socket
        (inet_shutdown -> tcp_disconnect -> inet_csk_listen_stop). The workers
        drop it and reset what waits in its queue; the bind stays, so listen()
        may follow."""
        b = self._owned(req, conn)
        if b.listener is None:
            return {}
        b.listener = None
        await self._ask_workers("remove_listener", bind_id=b.bind_id)
        self.binds.unlisten(b)
        return {}

    # -- UDP: a port space of its own (Linux udp_lib_get_port), every worker told --

    async def _op_udp_bind(self, req, conn) -> dict[str, Any]:
        v6 = bool(req.get("v6"))
        addr = _addr_arg(req.get("addr", 0), v6)
        if addr != 0 and addr not in (self.binds.addrs6 if v6 else self.binds.addrs):
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        port = int(req.get("port", 0))
        if not 0 <= port <= 65535:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        u = UdpBind(self._next_udp, addr, port, bool(req.get("reuseaddr")),
                    bool(req.get("reuseport")), str(req["path"]), v6=v6,
                    v6only=v6 and bool(req.get("v6only")))
        u.lport = port if port else self._udp_ephemeral(u)
        if port and any(self._udp_conflict(u, o) for o in self.udp_binds.values()):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self._next_udp += 1
        self.udp_binds[u.bind_id] = u
        binds = conn.state.setdefault("binds", set())
        if not binds:
            conn.on_close.append(lambda: self._release_all(conn))
        binds.add(u.bind_id)
        for reply in await self._ask_workers("add_udp", **u.add_args()):
            if reply is None:
                log(f"udp bind {u.bind_id}: a worker did not take it")
        return {"addr": _dotted(u.laddr, v6), "port": u.lport, "bind_id": u.bind_id}

    async def _op_udp_connect(self, req, conn) -> dict[str, Any]:
        bind_id = int(req["bind_id"])
        u = self.udp_binds.get(bind_id)
        if u is None or bind_id not in conn.state.get("binds", ()):
            raise OSError(errno.EBADF, "bind_id not owned by this connection")
        text = req.get("addr", 0)
        u.raddr = _addr_arg(text, isinstance(text, str) and ":" in text)
        u.rport = int(req.get("port", 0))
        await self._ask_workers("connect_udp", bind_id=bind_id, addr=u.peer_text(),
                                port=u.rport)
        return {}

    @staticmethod
    def _udp_conflict(a: UdpBind, b: UdpBind) -> bool:
        if a.lport != b.lport or (a.laddr and b.laddr and a.laddr != b.laddr):
            return False
        if not a.families() & b.families():
            return False  # e.g. 0.0.0.0 beside a V6ONLY `::` (Linux ipv6_rcv_saddr_equal)
        return not ((a.reuseaddr and b.reuseaddr) or (a.reuseport and b.reuseport))

    def _udp_ephemeral(self, u: UdpBind) -> int:
        used = {o.lport for o in self.udp_binds.values()}
        lo, hi = 32768, 60999  # net.ipv4.ip_local_port_range
        start = lo + (u.bind_id * 7919) % (hi - lo + 1)
        for i in range(hi - lo + 1):
            p = lo + (start - lo + i) % (hi - lo + 1)
            if p not in used:
                return p
        raise OSError(errno.EAGAIN, "no free UDP port")

    async def _release_udp(self, u: UdpBind) -> None:
        self.udp_binds.pop(u.bind_id, None)
        await self._ask_workers("remove_udp", bind_id=u.bind_id)

    async def _op_release(self, req, conn) -> dict[str, Any]:
        u = self.udp_binds.get(int(req.get("bind_id", -1)))
        if u is not None and u.bind_id in conn.state.get("binds", ()):
            conn.state["binds"].discard(u.bind_id)
            await self._release_udp(u)
            return {"freed": True}
        b = self._owned(req, conn)
        conn.state["binds"].discard(b.bind_id)
        b.holders -= 1
        if b.holders <= 0:
            await self._release(b)
        return {"freed": b.holders <= 0}  # else another process still holds it

    async def _op_ss(self, req, conn) -> dict[str, Any]:
        conns: list[dict[str, Any]] = []
        for reply in await self._ask_workers("ss"):
            if reply is not None:
                conns += reply.get("conns", [])
        return {"conns": conns}

    async def _op_stats(self, req, conn) -> dict[str, Any]:
        replies = await self._ask_workers("stats")
        workers = []
        for c, reply in zip(self._workers(), replies, strict=True):
            w = {"id": c.wid, "restarts": c.restarts, "ready": c.ready,
                 "proc": c.telemetry.sample() if c.telemetry else {}}
            if reply is not None:
                w["counters"] = reply.get("counters", {})
                w["shard"] = reply.get("shard", {})
            workers.append(w)
        n = self.netio
        netio = {"restarts": n.restarts, "ready": n.ready,
                 "proc": n.telemetry.sample() if n.telemetry else {},
                 "counters": await self._netio_stats()}
        spare = (None if self.spare is None
                 else {"pid": self.spare.proc.pid, "ready": self.spare.ready})
        return {"run_dir": str(self.run.path),
                "supervisor": {"proc": self.me.sample(), "spare": spare},
                "netio": netio, "workers": workers}

    async def _netio_stats(self) -> dict[str, Any]:
        reply = await self._netio_call({"op": "stats"})
        if reply is None:
            return {}
        reply.pop("ok", None)
        if self.fanout_stats is not None or self.tun_counts is not None:
            # Direct RX: the kernel's steering program dispatched the TCP
            # frames, netio's Dispatcher only what the kernel sent it;
            # per_worker is what reached each worker by either path.
            if self.fanout_stats is not None:
                fs = self.fanout_stats.sample()
            else:
                fs = {"delivered": self.tun_counts.read()}
            reply["rx"] = "direct"
            reply["steered"] = fs
            per = reply.get("dispatch", {}).get("per_worker")
            if per is not None:
                for i in range(min(len(per), self.cfg.workers)):
                    per[i] += fs["delivered"][i]
        else:
            reply["rx"] = "netio"
        return reply

    async def _netio_call(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """netio's control socket is ZeroMQ REP (netio.process); a blocking
        REQ with a timeout, off the loop."""
        from shardstack.netio.process import control_call

        return await self.loop.run_in_executor(
            None, control_call, str(self.run.path), req, int(WORKER_CALL_TIMEOUT * 1000))

    async def _op_set_reta(self, req, conn) -> dict[str, Any]:
        """A new 128-entry indirection table, to netio and workers. The
        connections of buckets that change workers do not follow (they reset
        at their next segment): `reta_move` is the move that carries them."""
        reta = [int(w) for w in req["reta"]]
        if len(reta) != rss.RETA_SIZE or not all(0 <= w < self.cfg.workers for w in reta):
            raise OSError(errno.EINVAL, "RETA must hold 128 valid worker ids")
        await self._install_reta(reta)
        return {}

    async def _install_reta(self, reta: list[int]) -> None:
        """Switch the steering (kernel program or map, netio's Dispatcher) and
        tell the workers (their ephemeral-port filter reads it)."""
        await self._steer_reta(reta)
        await self._publish_reta(reta)

    async def _steer_reta(self, reta: list[int]) -> None:
        """What decides where frames go: the kernel's steering with direct
        RX, netio's Dispatcher without it."""
        self.reta = reta
        self.book.install(reta)
        direct = False
        if self.fanout is not None:
            from shardstack.netio import fanout

            fanout.set_program(self.fanout[0], self.cfg.workers, reta)  # one program per group
            direct = True
        if self.tun_reta_map is not None:
            self.tun_reta_map.write(reta)  # 128 map writes; the program stays
            direct = True
        if not direct:
            await self._netio_reta(reta)

    async def _publish_reta(self, reta: list[int]) -> None:
        """Everyone else who reads the RETA: netio (with direct RX it only
        forwards ICMP errors by it) and the workers (ephemeral ports)."""
        if self.fanout is not None or self.tun_reta_map is not None:
            await self._netio_reta(reta)
        await self._ask_workers("set_reta", reta=reta)

    async def _netio_reta(self, reta: list[int]) -> None:
        reply = await self._netio_call({"op": "reta", "reta": reta})
        if not reply or not reply.get("ok"):
            raise OSError(errno.EIO, f"netio refused the RETA: {reply}")

    # -- moving buckets with their connections (shardstack.migrate) ---------------

    async def _op_reta_move(self, req, conn) -> dict[str, Any]:
        """`shardstack reta move BUCKET WORKER`."""
        bucket, dst = int(req["bucket"]), int(req["worker"])
        if not 0 <= bucket < rss.RETA_SIZE:
            raise OSError(errno.EINVAL, f"bucket must be 0..{rss.RETA_SIZE - 1}")
        if not 0 <= dst < self.cfg.workers:
            raise OSError(errno.EINVAL, f"worker must be 0..{self.cfg.workers - 1}")
        async with self.move_lock:
            rec = await self._move([bucket], dst, "hand")
        if not rec["ok"]:
            raise OSError(errno.ETIMEDOUT, f"move aborted, bucket {bucket} stays with worker "
                          f"{rec['from']}: {rec['reason']}")
        return rec

    async def _move(self, buckets: list[int], dst: int, by: str) -> dict[str, Any]:
        """Move `buckets` (all of one worker's) to worker `dst` with their
        connections; the caller holds move_lock. Returns the move's record
        (migrate.MoveRecord.as_dict()), also kept in the book."""
        src = self.reta[buckets[0]]
        if any(self.reta[b] != src for b in buckets):
            raise OSError(errno.EINVAL, "buckets of one move must share a worker")
        t0 = time.monotonic()
        label = buckets[0] if len(buckets) == 1 else f"{len(buckets)}x"
        rec = migrate.MoveRecord(label, src, dst, True, time.time(), 0.0, 0.0, 0, 0, 0, by=by)
        if src == dst:
            return rec.as_dict()
        workers = self._workers()
        a, b = workers[src], workers[dst]
        if not (a.ready and b.ready and a.ctl is not None and b.ctl is not None):
            raise OSError(errno.EAGAIN, "both workers must be running and ready")
        timeout = migrate.MOVE_TIMEOUT + migrate.ACK_GRACE + 1.0
        try:
            await b.ctl.call("mig_hold", timeout=timeout, buckets=buckets, src=src)
        except (OSError, TimeoutError, control.ControlError) as e:
            # Nothing switched yet: the bucket simply stays (B, if it wakes up
            # holding, gives up after its own timeout: it gets no frames of it).
            rec.ok, rec.reason = False, f"worker {dst} did not take the hold: {e!r}"
            rec.seconds = time.monotonic() - t0
            self.book.record(rec.as_dict())
            log(f"move of bucket(s) {label} {src} -> {dst} aborted: {rec.reason}")
            return rec.as_dict()
        old = list(self.reta)
        new = list(self.reta)
        for k in buckets:
            new[k] = dst
        t_switch = time.monotonic()
        try:
            # Only the steering before the export (the pause runs from here);
            # the rest of the RETA's readers are told once the move is done.
            await self._steer_reta(new)
            # not_after (CLOCK_MONOTONIC, every process's clock): A must not
            # start an export the supervisor has stopped waiting for.
            exp = await a.ctl.call("mig_export", timeout=timeout, buckets=buckets, to=dst,
                                   not_after=time.monotonic() + 1.0)
        except (OSError, TimeoutError, control.ControlError) as e:
            # A kept (or took back) the state: the bucket goes back to it, and
            # what B held meanwhile is forwarded there.
            await self._install_reta(old)
            await self._call_quietly(b, "mig_abort", buckets=buckets)
            rec.ok, rec.reason = False, str(e) or type(e).__name__
            rec.seconds = time.monotonic() - t0
            self.book.record(rec.as_dict())
            log(f"move of bucket(s) {label} {src} -> {dst} aborted: {rec.reason}")
            return rec.as_dict()
        rec.conns = exp.get("conns", 0)
        rec.app_conns = exp.get("app_conns", 0)
        rec.forwarded = exp.get("forwarded", 0)
        try:
            fin = await b.ctl.call("mig_finish", timeout=timeout, buckets=buckets)
            rec.pause = max(0.0, fin.get("installed_at", t_switch) - t_switch)
            rec.transfer = fin.get("transfer", 0.0)
            rec.steps = {k: round(v, 6) for d in (exp, fin) for k, v in d.items()
                         if k.endswith("_seconds")}
            rec.held = fin.get("held", 0)
        except (OSError, TimeoutError, control.ControlError) as e:
            # Sent and acknowledged, so it is B's now; its figures are lost.
            rec.reason = f"no figures from worker {dst}: {e}"
        try:
            await self._publish_reta(self.reta)
        except OSError as e:
            log(f"move of bucket(s) {label}: RETA not published everywhere: {e}")
        rec.seconds = time.monotonic() - t0
        rec.at = time.time()
        self.book.record(rec.as_dict())
        return rec.as_dict()

    async def _op_reload(self, req, conn) -> dict[str, Any]:
        """`shardstack reload`: every worker process replaced by a new one
        started from the current code, its connections moved away first and
        back after (docs/howto.md "Reloading"). Needs two workers or more."""
        workers = self._workers()
        if len(workers) < 2:
            raise OSError(errno.EOPNOTSUPP, "reload moves connections between workers: "
                          "it needs --workers 2 or more")
        report = []
        async with self.move_lock:
            for c in workers:
                report.append(await self._reload_one(c, workers))
        return {"workers": report}

    async def _reload_one(self, c: Child, workers: list[Child]) -> dict[str, Any]:
        mine = [k for k in range(rss.RETA_SIZE) if self.reta[k] == c.wid]
        others = [o.wid for o in workers if o is not c]
        old_pid = c.proc.pid if c.proc is not None else None
        moves = []
        # away: round robin over the others, one move per destination
        for i, dst in enumerate(others):
            part = mine[i::len(others)]
            if part:
                rec = await self._move(part, dst, "reload")
                moves.append(rec)
                if not rec["ok"]:
                    raise OSError(errno.ETIMEDOUT, f"reload of {c.name}: {rec['reason']}")
        away = sum(m["conns"] for m in moves)
        t_away = time.monotonic()
        await self._replace(c)
        t_new = time.monotonic()
        self._start_spare()  # the next worker's successor starts importing now
        for dst in others:  # and back
            part = [k for k in mine if self.reta[k] == dst]
            if part:
                rec = await self._move(part, c.wid, "reload")
                moves.append(rec)
                if not rec["ok"]:
                    raise OSError(errno.ETIMEDOUT, f"reload of {c.name}: {rec['reason']}")
        log(f"reload: {c.name} pid {old_pid} -> {c.proc.pid}: new process ready in "
            f"{t_new - t_away:.2f} s, {away} connections moved away and back")
        return {"worker": c.wid, "old_pid": old_pid, "pid": c.proc.pid,
                "conns": away, "moves": moves,
                "replace_seconds": round(t_new - t_away, 3)}

    async def _replace(self, c: Child) -> None:
        """Stop c's process (it owns no bucket now) and wait for its successor."""
        proc = c.proc
        c.reloading = True
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE + 20.0
        while c.proc is proc or not c.ready:
            if time.monotonic() > deadline:
                c.reloading = False
                raise OSError(errno.ETIMEDOUT, f"{c.name}: no ready successor in time")
            if c.proc is proc and time.monotonic() > deadline - 20.0 and proc.poll() is None:
                proc.kill()
            await asyncio.sleep(0.02)

    async def _rebalance_loop(self) -> None:
        """--rebalance auto: sample the workers' load, move a bucket from the
        hottest worker to the coldest when the balancer says so."""
        from shardstack.rebalance import SAMPLE_PERIOD

        while not self.stopping:
            await asyncio.sleep(SAMPLE_PERIOD)
            try:
                await self._rebalance_once()
            except Exception as e:  # a bug here must not end rebalancing silently
                log(f"rebalance: {type(e).__name__}: {e}")

    async def _rebalance_once(self) -> None:
        if self.move_lock.locked() or not all(c.ready for c in self._workers()):
            return
        loads = await self._ask_workers("load", states=False)
        if any(ld is None for ld in loads):
            return
        pick = self.balancer.observe(time.monotonic(), self.reta, loads)
        if pick is None:
            return
        buckets, dst = pick
        async with self.move_lock:
            buckets = [k for k in buckets if self.reta[k] != dst]
            if not buckets:
                return
            rec = await self._move(buckets, dst, "auto")
            log(f"rebalance: buckets {buckets} -> worker {dst} "
                f"({'ok' if rec['ok'] else rec['reason']}, {rec['conns']} connections, "
                f"ratio was {self.balancer.last_ratio:.2f})")

    async def _op_reta(self, req, conn) -> dict[str, Any]:
        """`shardstack reta`: the table, the moves so far, per-bucket load."""
        return retabook.report(self.book, await self._ask_workers("load"))

    async def _op_trace_start(self, req, conn) -> dict[str, Any]:
        """`shardstack trace --port N | --conn ...`: attach a trace on every worker
        (shardstack.tracer); detached by trace_stop or when `conn` closes."""
        port = int(req["port"])
        if not 1 <= port <= 65535:
            raise OSError(errno.EINVAL, f"port {port} out of range")
        args: dict[str, Any] = {"port": port}
        if req.get("conn"):
            args["conn"] = [int(x) for x in req["conn"]]
            if len(args["conn"]) != 4 or args["conn"][1] != port:
                raise OSError(errno.EINVAL, "conn is [laddr, lport, raddr, rport], lport = port")
        tid = self._next_tid
        self._next_tid += 1
        self.traces[tid] = args
        conn.on_close.append(lambda: self.loop.create_task(self._trace_stop(tid)))
        await self._ask_workers("trace_start", tid=tid, **args)
        return {"tid": tid}

    async def _op_trace_take(self, req, conn) -> dict[str, Any]:
        tid = int(req["tid"])
        if tid not in self.traces:
            raise OSError(errno.ENOENT, f"no trace {tid}")
        events: list[dict[str, Any]] = []
        dropped = 0
        for reply in await self._ask_workers("trace_take", tid=tid):
            if reply is not None:
                events += reply.get("events", [])
                dropped += reply.get("dropped", 0)
        events.sort(key=lambda e: e["t"])
        return {"events": events, "dropped": dropped}

    async def _op_trace_stop(self, req, conn) -> dict[str, Any]:
        await self._trace_stop(int(req["tid"]))
        return {}

    async def _trace_stop(self, tid: int) -> None:
        if self.traces.pop(tid, None) is not None:
            await self._ask_workers("trace_stop", tid=tid)

    async def metrics_snapshot(self) -> dict[str, Any]:
        """What a metrics scrape reads (shardstack.metrics): the workers'
        counters and load, netio's, and CPU/RSS of every process."""
        stats, loads = await asyncio.gather(self._ask_workers("stats"), self._ask_workers("load"))
        workers = [{"id": c.wid, **(reply or {})}
                   for c, reply in zip(self._workers(), stats, strict=True)]
        procs = [{"process": "supervisor", **self.me.counters()}]
        if self.spare is not None:
            from shardstack.stats import ProcTelemetry

            procs.append({"process": "spare", **ProcTelemetry(self.spare.proc.pid).counters()})
        for c in self.children:
            if c.telemetry is not None:
                procs.append({"process": c.name, "restarts": c.restarts,
                              **c.telemetry.counters()})
        return {"workers": workers, "reta": retabook.report(self.book, loads),
                "processes": procs, "netio": await self._netio_stats()}

    # -- helpers --------------------------------------------------------------

    def _workers(self) -> list[Child]:
        return [c for c in self.children if c.kind == "worker"]

    def _owned(self, req, conn) -> GlobalBind:
        bind_id = int(req["bind_id"])
        if bind_id not in conn.state.get("binds", ()):
            raise OSError(errno.EBADF, "bind_id not owned by this connection")
        return self.binds.get(bind_id)

    def _listener_args(self, b: GlobalBind) -> dict[str, Any]:
        if b.family == socket.AF_INET6:  # (the text: msgpack's ints stop at 64 bits)
            return {"bind_id": b.bind_id, "addr": _dotted(b.laddr, True), "port": b.lport,
                    **b.listener, "v6": True, "v6only": b.v6only}
        return {"bind_id": b.bind_id, "addr": b.laddr, "port": b.lport, **b.listener}

    async def _release(self, b: GlobalBind) -> None:
        if b.listener is not None:
            await self._ask_workers("remove_listener", bind_id=b.bind_id)
        self.binds.release(b)

    def _release_all(self, conn: control.Conn) -> None:
        for bind_id in list(conn.state.get("binds", ())):
            u = self.udp_binds.get(bind_id)
            if u is not None:
                self.loop.create_task(self._release_udp(u))
                continue
            b = self.binds.binds.get(bind_id)
            if b is not None:
                b.holders -= 1
                if b.holders <= 0:
                    self.loop.create_task(self._release(b))
        conn.state["binds"] = set()

    async def _call_quietly(self, c: Child, op: str, **args: Any) -> dict[str, Any] | None:
        if c.ctl is None:
            return None
        try:
            return await c.ctl.call(op, timeout=WORKER_CALL_TIMEOUT, **args)
        except (TimeoutError, OSError, control.ControlError) as e:
            log(f"{c.name}: {op} failed: {e}")
            return None

    async def _ask_workers(self, op: str, **args: Any) -> list[dict[str, Any] | None]:
        calls = (self._call_quietly(c, op, **args) for c in self._workers())
        return list(await asyncio.gather(*calls))


def _addr_arg(a: Any, v6: bool = False) -> int:
    if isinstance(a, int):
        return a
    try:
        if v6:
            return int(ipaddress.IPv6Address(a or "::"))
        return int(ipaddress.IPv4Address(a or "0.0.0.0"))
    except ValueError:
        raise OSError(errno.EINVAL, f"bad address {a!r}") from None


def _bind_reply(b: GlobalBind) -> dict[str, Any]:
    return {"addr": _dotted(b.laddr, b.family == socket.AF_INET6), "port": b.lport,
            "bind_id": b.bind_id}


def serve(cfg: ServeConfig) -> int:
    """`shardstack serve`: run in the foreground until SIGTERM/SIGINT."""
    import uvloop

    return uvloop.run(Supervisor(cfg).run_forever())
