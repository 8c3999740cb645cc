"""TCP interop between the Linux kernel and shardstack, both ways, over TUN and AF_PACKET.

Issue 7's suite. Each test builds its own namespaces (198.18.0.0/15 only):

* ``tun``: one namespace; `shardstack serve --tun` in it, the kernel on the
  TUN's other side (``--peer``).
* ``packet``: two namespaces joined by a veth; the stack on one end through
  AF_PACKET (no kernel address there), the kernel peer on the other.

The stack side is always an unmodified Python program under `shardstack run`
(or a built-in ``--echo``/``--discard`` service); the kernel side is the same
program run by plain Python in the kernel peer's namespace. The program
(``PEER`` below, written to tmp_path) is a selectors loop over many
connections that moves seeded data both ways at once and checks every
received byte stream by SHA-256; it can hold its connections open while the
test inspects `shardstack ss`, and either end can be made the one that
closes first, so the FIN handshake can be watched from both sides.

Faults come from two independent sources: the stack's own seeded
``--impair`` (netio RX and every worker's TX) and nftables random drops in the
kernel peer's namespace (output and input hooks; the kernel has no netem).

Wire details are read from captures: the stack's ``--pcap`` (handshake
options) and tcpdump on the kernel side (window checks: a kernel-side capture
is in the order the kernel saw things, so "sent only what the last ACK
allowed" can be checked soundly).

Tests: bulk SHA-256 transfers and `ss` worker placement (both directions x
both devices); 64 parallel connections; --impair + nftables loss (TUN 2 MiB
fast; 16 MiB, AF_PACKET with apps and 32 connections slow); 1 GiB kernel ->
discard and -> a hashing app (slow, throughput printed); SYN/SYN-ACK options
both ways; window scaling, zero windows and a small MSS audited on a
kernel-side capture; FIN handshakes ending in TIME-WAIT/CLOSED on the right
side; the first SYN over AF_PACKET kept while ARP resolves (L2Tx neighbour queue).
SS_INTEROP_PCAP=1 adds the stack's --pcap to the impaired runs.

Every wait is bounded; namespaces go with everything in them, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from shardstack.core.dropreason import DropReason
from shardstack.netio import rss
from test_serve import StackCli, _offloads_off, in_netns, nft_drops, nft_loss
from test_serve import wait_for as _wait_for

from shardstack import control, netns

pytestmark = pytest.mark.interop

PY = sys.executable
WAIT = 30.0  # seconds: bound on any single wait for the stack (busy 2-core machine)
ECHO, DISCARD, APP_PORT = 7, 9, 5001
WORKERS = 2
MSS = 1460  # MTU 1500 - 40
NFT_LOSS = 3  # percent per hook, kernel side
IMPAIR = "loss=0.03,dup=0.01,reorder=0.05,delay=2ms,jitter=1ms,seed={seed}"

# The one program both sides run (stdlib only). Client: `--conns K` connections
# at once to HOST:PORT, each sends a 20-byte header (seed, up, down), then `up`
# bytes of Random(2*seed) while reading `down` bytes of Random(2*seed+1) from
# the server; both ends check what they got by SHA-256. `--first` names the
# end that closes first (shutdown(SHUT_WR) as soon as its transfer is done);
# the other closes when it sees EOF. `--hold` (client): print "held" once every
# transfer is done and wait for a line on stdin before closing. One JSON line
# per event on stdout.
PEER = r'''
import argparse, hashlib, json, random, selectors, socket, struct, sys, time

HDR = struct.Struct("!IQQ")
CHUNK = 256 * 1024


def say(**kw):
    print(json.dumps(kw), flush=True)


def blob(seed, n):
    return random.Random(seed).randbytes(n)


class Conn:
    def __init__(self, sock, role, active, seed=None, up=0, down=0, connecting=False,
                 pause=0.0):
        self.sock, self.role, self.active = sock, role, active
        self.connecting = connecting
        self.read_at = time.monotonic() + pause  # a slow reader: its window closes
        self.hdr = b""
        self.out = memoryview(b"")
        self.sent = 0
        self.want = -1  # unknown until the server has the header
        self.got = 0
        self.h = hashlib.sha256()
        self.expect = None
        self.done = self.shut = self.eof = self.closed = False
        self.events = 0
        if role == "client":
            self.setup(seed, up, down)
            self.out = memoryview(HDR.pack(seed, up, down) + bytes(self.out))

    def setup(self, seed, up, down):
        self.seed, self.up, self.down = seed, up, down
        mine, theirs = (2 * seed, 2 * seed + 1) if self.role == "client" else (2 * seed + 1, 2 * seed)
        self.out = memoryview(blob(mine, up if self.role == "client" else down))
        self.want = down if self.role == "client" else up
        self.expect = hashlib.sha256(blob(theirs, self.want)).hexdigest()

    def names(self):
        return list(self.sock.getsockname()[:2]), list(self.sock.getpeername()[:2])

    def interest(self):
        ev = 0
        if self.connecting or self.sent < len(self.out):
            ev |= selectors.EVENT_WRITE
        if not self.connecting and not self.paused():
            ev |= selectors.EVENT_READ
        return ev

    def paused(self):
        if self.read_at and time.monotonic() < self.read_at:
            return True
        self.read_at = 0
        return False

    def on_write(self):
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, "connect failed")
            self.connecting = False
            return
        try:
            self.sent += self.sock.send(self.out[self.sent:self.sent + CHUNK])
        except BlockingIOError:
            pass

    def on_read(self):
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        if not data:
            if not self.done:
                raise EOFError(f"EOF after {self.got} of {self.want} bytes (seed {self.hdr!r})")
            self.eof = True
            return
        if self.want < 0:
            self.hdr += data
            if len(self.hdr) < HDR.size:
                return
            self.setup(*HDR.unpack_from(self.hdr))
            data = self.hdr[HDR.size:]
        if self.done:
            raise ValueError(f"{len(data)} bytes after the transfer was complete")
        self.got += len(data)
        if self.got > self.want:
            raise ValueError(f"got {self.got} bytes, want {self.want}")
        self.h.update(data)

    def check_done(self):
        if self.done or self.want < 0 or self.got < self.want or self.sent < len(self.out):
            return False
        self.done = True
        local, peer = self.names()
        say(event="conn", seed=self.seed, local=local, peer=peer, rx=self.got,
            ok=self.h.hexdigest() == self.expect)
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["client", "server"])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--up", type=int, default=0)
    ap.add_argument("--down", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", choices=["client", "server"], default="client")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--rcvbuf", type=int, default=0)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--maxseg", type=int, default=0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    sel = selectors.DefaultSelector()
    conns = []
    active = a.first == a.role
    lsock = None
    watched = set()  # connection sockets registered with `sel`
    if a.role == "server":
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if a.rcvbuf:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf)
        lsock.bind((a.host, a.port))
        lsock.listen(256)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, None)
        say(event="listening", addr=list(lsock.getsockname()[:2]))
    else:
        for i in range(a.conns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if a.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf)
            if a.maxseg:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, a.maxseg)
            s.setblocking(False)
            rc = s.connect_ex((a.host, a.port))
            if rc not in (0, 115):  # EINPROGRESS
                raise OSError(rc, "connect_ex")
            c = Conn(s, "client", active, a.seed + i, a.up, a.down, connecting=True,
                     pause=a.pause)
            conns.append(c)
            watched.add(s)
            sel.register(s, c.interest(), c)
    accepted = 0
    held = not a.hold

    def advance(c):
        c.check_done()
        if c.done and held and c.active and not c.shut:
            c.sock.shutdown(socket.SHUT_WR)
            c.shut = True
        if c.eof and not c.closed:
            watch(c, 0)
            c.sock.close()
            c.closed = True
            return
        watch(c, c.interest())

    def watch(c, ev):
        # a paused reader with nothing to send waits on no event at all
        if c.sock in watched:
            if ev:
                sel.modify(c.sock, ev, c)
            else:
                sel.unregister(c.sock)
                watched.discard(c.sock)
        elif ev:
            sel.register(c.sock, ev, c)
            watched.add(c.sock)

    while True:
        if all(c.closed for c in conns) and (lsock is None or accepted == a.conns):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("timeout: " + json.dumps(
                [[c.sent, len(c.out), c.got, c.want, c.done, c.eof] for c in conns]))
        if not held and conns and all(c.done for c in conns):
            say(event="held")
            sys.stdin.readline()
            held = True
            for c in conns:
                if not c.closed:
                    advance(c)
        waking = [c for c in conns if c.read_at and not c.closed]
        for c in waking:
            if not c.paused():
                advance(c)
        for key, mask in sel.select(0.05 if waking else 1.0):
            c = key.data
            if c is None:
                try:
                    s, _ = lsock.accept()
                except BlockingIOError:
                    continue
                s.setblocking(False)
                c = Conn(s, "server", active, pause=a.pause)
                conns.append(c)
                accepted += 1
                advance(c)
                if accepted == a.conns:
                    sel.unregister(lsock)
                continue
            if mask & selectors.EVENT_WRITE:
                c.on_write()
            if mask & selectors.EVENT_READ and not c.connecting and not c.paused():
                c.on_read()
            advance(c)
    say(event="done", conns=len(conns), ok=all(c.done for c in conns))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        say(event="error", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
'''


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, TUN, veth)")
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"


def _ip(a: str | int) -> int:
    return a if isinstance(a, int) else int.from_bytes(socket.inet_aton(a), "big")


def wait_for(pred, timeout: float = WAIT, what: str = "condition", every: float = 0.1):
    """test_serve.wait_for with this file's bounds (WAIT, a 0.1 s poll)."""
    return _wait_for(pred, timeout, what, every)


# -- a process speaking JSON lines ------------------------------------------------------


class Lines:
    """A child's stdout read as JSON lines, each wait bounded."""

    def __init__(self, proc: subprocess.Popen, name: str, log: Path) -> None:
        self.proc, self.name, self.log = proc, name, log
        self.buf = b""
        self.events: list[dict] = []
        os.set_blocking(proc.stdout.fileno(), False)

    def _pump(self, timeout: float) -> bool:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return True
        finally:
            sel.close()
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"event": "junk", "line": line.decode(errors="replace")})
        return True

    def expect(self, event: str, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("event") == event:
                    return e
                if e.get("event") == "error":
                    raise AssertionError(f"{self.name}: {e['error']}\n{self.stderr()}")
            left = deadline - time.monotonic()
            if left > 0 and self._pump(min(left, 1.0)):
                continue
            if left > 0 and self.proc.poll() is None:  # stdout closed, exit pending
                time.sleep(0.05)
                continue
            raise AssertionError(f"{self.name}: no {event!r} within {timeout}s "
                                 f"(rc {self.proc.poll()}), events {self.events[-5:]}\n"
                                 f"{self.stderr()}")

    def wait_count(self, event: str, n: int, timeout: float = WAIT) -> list[dict]:
        """Until `n` events of kind `event` have arrived (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [e for e in self.events if e.get("event") == event]
            if len(got) >= n:
                return got
            for e in self.events:
                if e.get("event") == "error":
                    raise AssertionError(f"{self.name}: {e['error']}\n{self.stderr()}")
            left = deadline - time.monotonic()
            if left <= 0 or (not self._pump(min(left, 1.0)) and self.proc.poll() is not None):
                raise AssertionError(f"{self.name}: {len(got)} of {n} {event!r} events "
                                     f"within {timeout}s\n{self.stderr()}")

    def finish(self, timeout: float = WAIT) -> list[dict]:
        """Wait for exit; every event; the program must have ended cleanly."""
        self.expect("done", timeout)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit") from None
        assert rc == 0, f"{self.name} exited {rc}\n{self.stderr()}"
        return self.events

    def release(self) -> None:
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def conns(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "conn"]


# -- topologies -------------------------------------------------------------------------


@dataclass
class Topo(StackCli):
    """A running stack (`sns`) and its kernel peer (`kns`: same namespace on TUN)."""

    kind: str
    sns: netns.Netns
    kns: netns.Netns
    addr: str  # the stack
    peer: str  # the kernel
    dev: str  # the kernel's interface towards the stack
    tmp: Path
    run_dir: str = ""
    proc: subprocess.Popen | None = None
    reta: list[int] = field(default_factory=lambda: rss.make_reta(WORKERS))
    children: list[subprocess.Popen] = field(default_factory=list)

    cli_timeout: ClassVar[float] = WAIT

    def serve_log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-4000:]

    def worker_of(self, kaddr: str, kport: int, sport: int) -> int:
        """The worker that must own the flow kernel kaddr:kport <-> stack addr:sport."""
        return rss.flow_to_worker(_ip(kaddr), _ip(self.addr), kport, sport, self.reta)

    def _run(self, ns: netns.Netns, argv: list[str], name: str, env=None) -> Lines:
        log = self.tmp / f"{name}.err"
        with open(log, "wb") as err:
            p = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                         cwd=self.tmp, env=env)
        self.children.append(p)
        return Lines(p, name, log)

    def stack_peer(self, args: list[str], name: str = "stack-app") -> Lines:
        """PEER as an unmodified program on the stack (`shardstack run`)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return self._run(self.sns, [PY, "-m", "shardstack", "run", "--run-dir", self.run_dir,
                                    "--", "python", str(self.tmp / "peer.py"), *args], name, env)

    def kernel_peer(self, args: list[str], name: str = "kernel-app") -> Lines:
        """PEER on the kernel's own TCP, in the kernel peer's namespace."""
        return self._run(self.kns, [PY, str(self.tmp / "peer.py"), *args], name)

    def kernel_socket(self) -> socket.socket:
        with in_netns(self.kns.name):
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def kernel_ss(self) -> list[tuple[str, str, str]]:
        """(state, local, peer) of the kernel's TCP sockets (`ss -tan`)."""
        out = self.kns.run(["ss", "-Htan"]).stdout
        rows = []
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 5:
                rows.append((f[0], f[3], f[4]))
        return rows


def _serve(t: Topo, device: list[str], extra: list[str]) -> None:
    if "--rebalance" not in extra:  # flows are checked against the initial RETA's placement
        extra = [*extra, "--rebalance", "off"]
    t.run_dir = tempfile.mkdtemp(prefix="sst-", dir="/tmp")
    os.rmdir(t.run_dir)  # serve creates it (0700) and removes it at exit
    argv = [PY, "-m", "shardstack", "serve", "--workers", str(WORKERS), *device,
            "--addr", f"{t.addr}/24", "--run-dir", t.run_dir,
            "--echo", str(ECHO), "--discard", str(DISCARD), *extra]
    with open(t.tmp / "serve.log", "wb") as log:
        t.proc = t.sns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    sock = Path(t.run_dir) / "control.sock"

    def ready():
        assert t.proc.poll() is None, f"serve exited early:\n{t.serve_log()}"
        try:
            return control.call(sock, "hello", timeout=5)["ready"]
        except OSError:
            return False

    wait_for(ready, what="serve ready", every=0.05)


def _stop(t: Topo) -> None:
    for p in [*t.children, t.proc]:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@contextlib.contextmanager
def topology(kind: str, tmp: Path, extra: list[str] = ()) -> Iterator[Topo]:
    _require_root()
    (tmp / "peer.py").write_text(PEER)
    net = netns.next_subnet()
    addr, peer = str(net.network_address + 2), str(net.network_address + 1)
    with contextlib.ExitStack() as stack:
        sns = stack.enter_context(netns.netns(prefix="sst"))
        if kind == "tun":
            t = Topo(kind, sns, sns, addr, peer, "sst0", tmp)
            device = ["--tun", "sst0", "--peer", f"{peer}/24"]
        else:
            kns = stack.enter_context(netns.netns(prefix="sst"))
            # no address on the stack's end: the kernel there must stay out of it
            netns.add_veth(sns, kns, "vsa", "vsb", b_addr=f"{peer}/24")
            if "--no-offload" in extra:
                # Without the virtio-net header the stack cannot tell a veth's
                # partial checksums from bad ones: the kernel must finish them,
                # as a NIC without offloads does (test_serve does the same).
                _offloads_off(kns.name, "vsb")
            t = Topo(kind, sns, kns, addr, peer, "vsb", tmp)
            device = ["--packet", "vsa"]
        try:
            _serve(t, device, list(extra))
            yield t
        finally:
            _stop(t)


@contextlib.contextmanager
def routed_topology(kind: str, tmp: Path, prefix: str,
                    setup_router: Callable[[netns.Netns, str], None]
                    ) -> Iterator[tuple[Topo, netns.Netns, str]]:
    """The stack, a kernel router, a client namespace behind the router.

    ``packet``: stack --AF_PACKET vsa|vsb--> router ns --vka|vcb--> client ns (the stack
    reaches the client through ``--gateway``); ``tun``: stack --TUN--> the kernel of the
    stack's namespace routes --vka|vcb--> client ns. Namespaces are named ``prefix``...,
    the TUN ``prefix``0. ``setup_router(router, client address)`` shapes the router's
    path towards the client. Yields (topo, client namespace, client address); topo.kns
    is the router."""
    _require_root()
    n1, n2 = netns.next_subnet(), netns.next_subnet()
    addr, r1 = str(n1.network_address + 2), str(n1.network_address + 1)
    r2, client = str(n2.network_address + 1), str(n2.network_address + 2)
    with contextlib.ExitStack() as stack:
        sns = stack.enter_context(netns.netns(prefix=prefix))
        if kind == "packet":
            router = stack.enter_context(netns.netns(prefix=prefix))
            netns.add_veth(sns, router, "vsa", "vsb", b_addr=netns.host(n1, 1))
            device = ["--packet", "vsa", "--gateway", r1]
        else:
            router = sns  # the kernel on the TUN's other side forwards
            device = ["--tun", f"{prefix}0", "--peer", netns.host(n1, 1)]
        cns = stack.enter_context(netns.netns(prefix=prefix))
        netns.add_veth(router, cns, "vka", "vcb", a_addr=netns.host(n2, 1),
                       b_addr=netns.host(n2, 2))
        setup_router(router, client)
        router.sysctl("net.ipv4.ip_forward", 1)
        cns.ip("route", "add", "default", "via", r2)
        t = Topo(kind, sns, router, addr, r1, "vsb" if kind == "packet" else f"{prefix}0", tmp)
        try:
            _serve(t, device, [])
            yield t, cns, client
        finally:
            _stop(t)


DEVICES = ["tun", "packet"]


# -- checks shared by the transfer tests --------------------------------------------------


def _check_transfers(lines: Lines, n: int, up: int | None = None) -> list[dict]:
    conns = lines.conns()
    assert len(conns) == n, f"{lines.name}: {len(conns)} of {n} connections\n{lines.events[-5:]}"
    bad = [c for c in conns if not c["ok"]]
    assert not bad, f"{lines.name}: SHA-256 mismatch on {bad[:3]}"
    if up is not None:
        assert all(c["rx"] == up for c in conns)
    assert len({c["seed"] for c in conns}) == n, "each connection carries its own data"
    return conns


def _check_ss_workers(t: Topo, conns: list[dict], stack_side: bool) -> dict[int, int]:
    """Every connection is listed by `shardstack ss` on the worker its flow hashes to.

    `conns` are the PEER reports of one side (stack_side: `local` is the stack's).
    Returns connections per worker."""
    rows = t.ss()
    by_tuple = {(_ip(r["laddr"]), r["lport"], _ip(r["raddr"]), r["rport"]): r for r in rows}
    per_worker: dict[int, int] = {}
    for c in conns:
        (sa, sp), (ka, kp) = (c["local"], c["peer"]) if stack_side else (c["peer"], c["local"])
        assert sa == t.addr and ka == t.peer, c
        r = by_tuple.get((_ip(sa), sp, _ip(ka), kp))
        assert r is not None, f"{sa}:{sp} <-> {ka}:{kp} missing from ss ({len(rows)} rows)"
        assert r["worker"] == t.worker_of(ka, kp, sp), f"flow {c} on worker {r['worker']}"
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
    return per_worker


def diagnose(t: Topo) -> str:
    """What both stacks think of their connections, for a failed or stalled transfer."""
    out = []
    with contextlib.suppress(Exception):
        out.append("stack ss: " + json.dumps([r for r in t.ss() if r["state"] != "LISTEN"]))
    with contextlib.suppress(Exception):
        out.append("kernel ss:\n" + t.kns.run(["ss", "-tinmo"]).stdout)
    with contextlib.suppress(Exception):
        for w in t.stats()["workers"]:
            out.append(f"worker {w['id']} shard: "
                       + json.dumps({k: v for k, v in w.get("shard", {}).items() if v}))
    return "\n".join(out)


def _transfer(t: Topo, direction: str, conns: int, up: int, down: int, seed: int,
              timeout: float = 120, hold: bool = True, first: str = "client",
              server_args: tuple[str, ...] = (), client_args: tuple[str, ...] = ()
              ) -> tuple[Lines, Lines, dict[int, int]]:
    """`conns` connections, kernel client -> stack server ("k2s") or the reverse
    ("s2k"), `up` bytes client->server and `down` back on each, all verified.
    The programs give up after `timeout` s (and say how far they got); we wait
    a little longer so their report arrives, then add both stacks' view."""
    common = ["--port", str(APP_PORT), "--conns", str(conns), "--first", first,
              "--timeout", str(timeout)]
    cargs = [*common, "--up", str(up), "--down", str(down), "--seed", str(seed)]
    cargs += ["--hold"] if hold else []
    cargs += client_args
    common += server_args
    if direction == "k2s":
        srv = t.stack_peer(["server", "--host", "0.0.0.0", *common], "stack-server")
        srv.expect("listening")
        cli = t.kernel_peer(["client", "--host", t.addr, *cargs], "kernel-client")
    else:
        srv = t.kernel_peer(["server", "--host", t.peer, *common], "kernel-server")
        srv.expect("listening")
        cli = t.stack_peer(["client", "--host", t.peer, *cargs], "stack-client")
    per_worker: dict[int, int] = {}
    try:
        if hold:
            cli.expect("held", timeout + WAIT)
            stack_side = cli if direction == "s2k" else srv
            # the server reports a connection once it has all `up` bytes and sent `down`
            srv.wait_count("conn", conns)
            per_worker = _check_ss_workers(t, _check_transfers(stack_side, conns), True)
            cli.release()
        cli.finish(timeout + WAIT)
        srv.finish(timeout + WAIT)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diagnose(t)}") from None
    _check_transfers(cli, conns, down)
    _check_transfers(srv, conns, up)
    return cli, srv, per_worker


# -- 1. bulk, both directions x both devices ---------------------------------------------------


@pytest.mark.parametrize("direction", ["k2s", "s2k"])
@pytest.mark.parametrize("kind", DEVICES)
def test_bulk_sha_both_ways(kind, direction, tmp_path):
    """4 MiB up and 3 MiB down on one connection; the stack lists it on the right worker."""
    with topology(kind, tmp_path) as t:
        t0 = time.monotonic()
        _, _, per_worker = _transfer(t, direction, 1, 4 << 20, 3 << 20, seed=17)
        dt = time.monotonic() - t0
        print(f"\n{kind} {direction}: 7 MiB in {dt:.1f} s ({7 * 8 / dt:.1f} Mbit/s)")
        assert sum(per_worker.values()) == 1
        st = t.stats()
        assert all(w["restarts"] == 0 for w in st["workers"])
        gate = [w["counters"].get("appgate") or {} for w in st["workers"]]
        assert sum(g.get("bytes_up", 0) + g.get("bytes_down", 0) for g in gate) >= 7 << 20, gate


# -- 2. many parallel connections -------------------------------------------------------------


@pytest.mark.parametrize("direction", ["k2s", "s2k"])
@pytest.mark.parametrize("kind", DEVICES)
def test_many_parallel_connections(kind, direction, tmp_path):
    """64 connections at once, each with its own 64 KiB + 32 KiB, spread over both workers."""
    n = 64
    with topology(kind, tmp_path) as t:
        _, _, per_worker = _transfer(t, direction, n, 64 << 10, 32 << 10, seed=1000)
        assert sum(per_worker.values()) == n
        # 64 flows: the kernel's random ports (k2s) or the stack's per-worker port
        # choice (s2k) leave both workers with a share
        assert set(per_worker) == set(range(WORKERS)), per_worker
        assert min(per_worker.values()) >= 8, per_worker
        if direction == "s2k":
            gates = [w["counters"]["appgate"] for w in t.stats()["workers"]]
            assert sum(g["active_opens"] for g in gates) >= n, gates


# -- 3. loss, reordering, duplication and delay on both sides ---------------------------------


def _impaired(t: Topo, direction: str, size: int, timeout: float):
    nft_loss(t.kns, NFT_LOSS)
    t0 = time.monotonic()
    _transfer(t, direction, 1, size, size, seed=31, timeout=timeout, hold=False)
    dt = time.monotonic() - t0
    s = t.stats()
    rx = s["netio"]["counters"]["impair"]["rx"]
    tx = [w["counters"]["impair"] for w in s["workers"]]
    kernel = nft_drops(t.kns)
    retrans = sum(w["shard"]["retrans_segs"] for w in s["workers"])
    print(f"\nimpaired {direction} {2 * size >> 20} MiB in {dt:.1f} s; stack rx {rx}; "
          f"tx {tx}; kernel nft drops {kernel}; stack retrans {retrans}")
    assert rx["lost"] > 0 and sum(x["lost"] for x in tx) > 0, (rx, tx)
    assert kernel["output"] > 0 and kernel["input"] > 0, kernel
    assert retrans > 0
    assert all(w["restarts"] == 0 for w in s["workers"])


def _impair_args(seed: int, tmp: Path) -> list[str]:
    """MTU-sized frames (no offload) so faults hit thousands of them;
    SS_INTEROP_PCAP=1 also records them (tmp_path/stack.pcap) to see who stalls."""
    extra = ["--impair", IMPAIR.format(seed=seed), "--no-offload"]
    if os.environ.get("SS_INTEROP_PCAP"):
        extra += ["--pcap", str(tmp / "stack.pcap")]
    return extra


@pytest.mark.parametrize(("kind", "seed", "size", "timeout"), [
    pytest.param("tun", 7, 1 << 20, 120, id="tun-fast"),
    # AF_PACKET with shim apps at the stack end (the robustness suite covers the
    # echo service there)
    pytest.param("packet", 9, 4 << 20, 200, id="packet-app", marks=pytest.mark.slow),
    pytest.param("tun", 8, 8 << 20, 240, id="tun-16mib", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("direction", ["k2s", "s2k"])
def test_impaired_both_sides(direction, kind, seed, size, timeout, tmp_path):
    """`size` each way through --impair AND kernel-side nftables drops."""
    with topology(kind, tmp_path, _impair_args(seed, tmp_path)) as t:
        _impaired(t, direction, size, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["k2s", "s2k"])
def test_impaired_many_connections(direction, tmp_path):
    """32 connections at once under both sides' faults, 128 KiB each way each."""
    with topology("tun", tmp_path, _impair_args(10, tmp_path)) as t:
        nft_loss(t.kns, NFT_LOSS)
        t0 = time.monotonic()
        _transfer(t, direction, 32, 128 << 10, 128 << 10, seed=300, timeout=200, hold=False)
        print(f"\n32 impaired connections {direction}: {time.monotonic() - t0:.1f} s")
        s = t.stats()
        assert sum(w["shard"]["retrans_segs"] for w in s["workers"]) > 0
        assert all(w["restarts"] == 0 for w in s["workers"])


# -- 4. 1 GiB from a kernel client ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kernel_client_1gib_to_discard(tmp_path):
    total, block = 1 << 30, os.urandom(1 << 20)
    bound = 300.0
    with topology("tun", tmp_path) as t:
        def swallowed() -> int:
            return sum(w["counters"]["services"]["bytes_in"] for w in t.stats()["workers"])

        before = swallowed()
        s = t.kernel_socket()
        s.settimeout(60)
        with s:
            s.connect((t.addr, DISCARD))
            t0 = time.monotonic()
            for _ in range(total // len(block)):
                s.sendall(block)
                assert time.monotonic() - t0 < bound, "1 GiB not sent within the bound"
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # the discard server's FIN, after all our bytes
            dt = time.monotonic() - t0
        print(f"\n1 GiB kernel -> stack discard: {dt:.1f} s, {total * 8 / dt / 1e9:.2f} Gbit/s")
        wait_for(lambda: swallowed() - before == total, what="discard counted exactly 1 GiB")


SINK = r'''
import hashlib, json, socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print(json.dumps({"event": "listening"}), flush=True)
c, _ = srv.accept()
h, n = hashlib.sha256(), 0
while data := c.recv(1 << 20):
    h.update(data)
    n += len(data)
c.close()
print(json.dumps({"event": "done", "bytes": n, "sha": h.hexdigest()}), flush=True)
'''


def _gib_block(i: int, base: bytes) -> bytes:
    """Block i of the 1 GiB stream: its index up front, so a lost, repeated or
    misplaced block changes the hash."""
    return i.to_bytes(8, "big") + base[8:]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kernel_client_1gib_sha_to_stack_app(tmp_path):
    """1 GiB from a kernel client into an unmodified sink program on the stack,
    which hashes every byte (SHA-256 and count checked)."""
    total, base, bound = 1 << 30, os.urandom(1 << 20), 300.0
    blocks = total // len(base)
    expect = hashlib.sha256()
    for i in range(blocks):
        expect.update(_gib_block(i, base))
    with topology("tun", tmp_path) as t:
        (tmp_path / "sink.py").write_text(SINK)
        sink = t._run(t.sns, [PY, "-m", "shardstack", "run", "--run-dir", t.run_dir, "--",
                              "python", str(tmp_path / "sink.py"), str(APP_PORT)], "sink")
        sink.expect("listening")
        s = t.kernel_socket()
        s.settimeout(60)
        with s:
            s.connect((t.addr, APP_PORT))
            t0 = time.monotonic()
            for i in range(blocks):
                s.sendall(_gib_block(i, base))
                assert time.monotonic() - t0 < bound, f"only {i} MiB sent within {bound}s"
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
            dt = time.monotonic() - t0
        done = sink.expect("done", WAIT)
        print(f"\n1 GiB kernel -> stack app (shim): {dt:.1f} s, "
              f"{total * 8 / dt / 1e9:.2f} Gbit/s")
        assert done["bytes"] == total
        assert done["sha"] == expect.hexdigest()


# -- 5. what goes on the wire -----------------------------------------------------------------


def _opts(tcp) -> dict:
    return {name: val for name, val in tcp.options}


def test_synack_options_to_linux_syn(tmp_path):
    """The stack's SYN-ACK answers Linux's SYN with MSS, SACK-permitted, timestamps
    (echoing the SYN's TSval) and window scale; the stack's own SYN gets all four
    back from Linux, and data segments then carry timestamps both ways."""
    from scapy.layers.inet import TCP

    pcap = tmp_path / "cap.pcap"
    with topology("tun", tmp_path, ["--pcap", str(pcap)]) as t:
        s = t.kernel_socket()
        with s:
            s.settimeout(WAIT)
            s.connect((t.addr, ECHO))
            kport = s.getsockname()[1]
            s.sendall(b"x" * 3000)
            got = b""
            while len(got) < 3000:
                got += s.recv(4096)
        _transfer(t, "s2k", 1, 4096, 4096, seed=3, hold=True)
        t.proc.send_signal(signal.SIGTERM)  # every process flushes its pcap batches
        t.proc.wait(WAIT)
    tcp = [p[TCP] for p in _read_ip(pcap) if TCP in p]

    # kernel client -> stack server
    syn = next(p for p in tcp if p.flags == "S" and p.sport == kport and p.dport == ECHO)
    sa = next(p for p in tcp if p.flags == "SA" and p.sport == ECHO and p.dport == kport)
    so, ao = _opts(syn), _opts(sa)
    assert {"MSS", "SAckOK", "Timestamp", "WScale"} <= set(so), so  # Linux offers them all
    assert ao.get("MSS") == MSS, ao
    assert "SAckOK" in ao and "WScale" in ao and 0 <= ao["WScale"] <= 14, ao
    assert ao["Timestamp"][1] == so["Timestamp"][0], "TSecr must echo the SYN's TSval"
    assert sa.ack == (syn.seq + 1) % 2**32
    data_in = [p for p in tcp if p.dport == ECHO and p.sport == kport and len(p.payload)]
    data_out = [p for p in tcp if p.sport == ECHO and p.dport == kport and len(p.payload)]
    assert data_in and data_out
    assert all("Timestamp" in _opts(p) for p in data_in + data_out)

    # stack client -> kernel server
    ssyn = next(p for p in tcp if p.flags == "S" and p.dport == APP_PORT)
    ksa = next(p for p in tcp if p.flags == "SA" and p.sport == APP_PORT
               and p.dport == ssyn.sport)
    so, ko = _opts(ssyn), _opts(ksa)
    assert so.get("MSS") == MSS and "SAckOK" in so and "Timestamp" in so and "WScale" in so, so
    # Linux answers with an option only when the SYN carried it, so all four came back
    assert {"MSS", "SAckOK", "Timestamp", "WScale"} <= set(ko), ko
    assert ko["Timestamp"][1] == so["Timestamp"][0]
    out = [p for p in tcp if p.sport == ssyn.sport and p.dport == APP_PORT and len(p.payload)]
    assert out and all(_opts(p)["Timestamp"][1] != 0 for p in out)


def _tcpdump(t: Topo, path: Path, ns=None, dev: str | None = None,
             bufkib: int = 8192) -> subprocess.Popen:
    """tcpdump (default: in the kernel's namespace on its device); --immediate-mode,
    or libpcap keeps the last partly filled TPACKET_V3 block (up to a second of
    packets) at exit."""
    ns = t.kns if ns is None else ns
    p = ns.popen(["tcpdump", "-i", dev or t.dev, "-s", "128", "-U", "--immediate-mode",
                  "-B", str(bufkib), "-n", "-w", str(path), "tcp", "port", str(APP_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(p.stderr.fileno(), False)
    buf = b""

    def listening():
        nonlocal buf
        with contextlib.suppress(BlockingIOError, TypeError):
            buf += p.stderr.read() or b""
        assert p.poll() is None, buf
        return b"listening on" in buf

    wait_for(listening, what="tcpdump listening", every=0.05)
    return p


def _tcpdump_stop(p: subprocess.Popen, path: Path) -> None:
    """Stop once the file stopped growing (bounded); the capture must be whole."""
    last, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline and path.stat().st_size != last:
        last = path.stat().st_size
        time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    p.wait(WAIT)
    os.set_blocking(p.stderr.fileno(), True)
    err = p.stderr.read().decode(errors="replace")
    dropped = [int(line.split()[0]) for line in err.splitlines() if "dropped by kernel" in line]
    assert dropped == [0], f"tcpdump lost packets, the audit would be unsound: {err}"


@contextlib.contextmanager
def _capture(t: Topo, path: Path, **tcpdump_kw) -> Iterator[None]:
    """tcpdump into `path` (see _tcpdump) while the block runs; whole when it ends."""
    dump = _tcpdump(t, path, **tcpdump_kw)
    try:
        yield
    finally:
        _tcpdump_stop(dump, path)


def _read_ip(path: Path) -> list:
    """IPv4 packets of a capture, whatever its link type (Ethernet on a veth,
    raw IP on a TUN: LINKTYPE_RAW, which some scapy versions leave as Raw)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether
    from scapy.utils import RawPcapReader

    out = []
    with RawPcapReader(str(path)) as r:
        ether = r.linktype == 1
        for data, _meta in r:
            p = Ether(data) if ether else IP(data)
            if IP in p:
                out.append(p[IP])
    return out


def _window_audit(pkts, sender: str, receiver: str) -> tuple[int, int]:
    """Walk a kernel-side capture of one connection: (max bytes in flight from
    `sender`, number of segments that went past the right edge `receiver` had
    last advertised, window scaled by the shift from its SYN)."""
    from scapy.layers.inet import IP, TCP

    shift: dict[str, int] = {}
    isn: dict[str, int] = {}
    acked = edge = None
    flight = beyond = 0
    for p in pkts:
        if not p.haslayer(TCP):
            continue
        ip, tcp = p[IP], p[TCP]
        src = ip.src
        if tcp.flags.S:
            shift[src] = _opts(tcp).get("WScale", 0)
            isn[src] = tcp.seq
            continue
        if src == receiver and tcp.flags.A and sender in isn:
            a = (tcp.ack - isn[sender]) % 2**32
            acked = a if acked is None else max(acked, a)
            e = a + (tcp.window << shift.get(receiver, 0))
            edge = e if edge is None else max(edge, e)
        elif src == sender and acked is not None:
            n = ip.len - ip.ihl * 4 - tcp.dataofs * 4
            if n <= 0:
                continue
            end = (tcp.seq - isn[sender]) % 2**32 + n
            flight = max(flight, end - acked)
            # a one-byte probe into a zero window is allowed (RFC 9293 §3.8.6.1)
            beyond += end > edge and not (edge == acked and n == 1)
    return flight, beyond


@pytest.mark.parametrize("kind", DEVICES)
def test_window_scaling_honoured_both_ways(kind, tmp_path):
    """A 10 ms round trip (--impair delay, no loss) needs > 64 KiB in flight:
    each side must send past 65535 bytes, and never past what the other's
    last scaled window allowed (checked on a kernel-side capture)."""
    with topology(kind, tmp_path, ["--impair", "delay=5ms,seed=1"]) as t:
        cap = tmp_path / "k.pcap"
        with _capture(t, cap):
            _transfer(t, "k2s", 1, 8 << 20, 8 << 20, seed=5, hold=False, timeout=150)
        pkts = _read_ip(cap)
    k_flight, k_beyond = _window_audit(pkts, sender=t.peer, receiver=t.addr)
    s_flight, s_beyond = _window_audit(pkts, sender=t.addr, receiver=t.peer)
    print(f"\nmax in flight: kernel->stack {k_flight}, stack->kernel {s_flight}")
    assert s_flight > 65535, "the stack never used more than an unscaled window"
    assert s_beyond == 0, "the stack sent beyond the kernel's advertised window"
    assert k_flight > 65535, "the kernel never got more than 64 KiB of window from the stack"
    assert k_beyond == 0, "the kernel sent past the stack's window (scale mismatch?)"


def _kernel_state(t: Topo, kaddr_port: str, saddr_port: str) -> str | None:
    for state, local, peer in t.kernel_ss():
        if local == kaddr_port and peer == saddr_port:
            return state
    return None


def _stack_state(t: Topo, sport: int, kport: int) -> str | None:
    for r in t.ss():
        if r["lport"] == sport and r["rport"] == kport and _ip(r["raddr"]) == _ip(t.peer):
            return r["state"]
    return None


@pytest.mark.parametrize("first", ["client", "server"])
@pytest.mark.parametrize("direction", ["k2s", "s2k"])
@pytest.mark.parametrize("kind", DEVICES)
def test_fin_handshake_states(kind, direction, first, tmp_path):
    """Whoever closes first ends in TIME-WAIT, the other end's socket goes away
    (CLOSED) once its FIN is acked: on the kernel (`ss -tan`) and on the stack."""
    with topology(kind, tmp_path) as t:
        cli, _, _ = _transfer(t, direction, 1, 100_000, 50_000, seed=9, hold=False,
                              first=first)
        c = cli.conns()[0]
        kside, sside = (c["local"], c["peer"]) if direction == "k2s" else (c["peer"], c["local"])
        kname, sname = f"{kside[0]}:{kside[1]}", f"{sside[0]}:{sside[1]}"
        kernel_closes_first = (first == "client") == (direction == "k2s")
        if kernel_closes_first:
            wait_for(lambda: _kernel_state(t, kname, sname) == "TIME-WAIT", what="kernel TIME-WAIT")
            wait_for(lambda: _stack_state(t, sside[1], kside[1]) is None,
                     what="stack connection CLOSED")
        else:
            wait_for(lambda: _stack_state(t, sside[1], kside[1]) == "TIME-WAIT",
                     what="stack TIME-WAIT")
            wait_for(lambda: _kernel_state(t, kname, sname) is None,
                     what="kernel socket CLOSED (LAST-ACK acked)")
        # and it stays that way: no retransmitted FIN revives anything
        time.sleep(1.0)
        if kernel_closes_first:
            assert _kernel_state(t, kname, sname) == "TIME-WAIT"
            assert _stack_state(t, sside[1], kside[1]) is None
        else:
            assert _stack_state(t, sside[1], kside[1]) == "TIME-WAIT"
            assert _kernel_state(t, kname, sname) is None


def test_first_active_open_over_packet_keeps_its_syn(tmp_path):
    """A stack client's first connection to a kernel peer it never heard from:
    nothing it sends may be lost to neighbour resolution."""
    with topology("packet", tmp_path) as t:
        _transfer(t, "s2k", 1, 4096, 4096, seed=2, hold=False)
        st = t.stats()
        tx_drops = sum(w["counters"]["drops"].get(DropReason.DEV_TX.name, 0) for w in st["workers"])
        retrans = sum(w["shard"].get("retrans_segs", 0) for w in st["workers"])
        assert (tx_drops, retrans) == (0, 0), "the SYN was dropped and retransmitted"


@pytest.mark.parametrize("direction", ["k2s", "s2k"])
def test_zero_window_and_recovery(direction, tmp_path):
    """The receiver (the stack's app for k2s, the kernel's for s2k) reads nothing
    for 2 s with a 64 KiB SO_RCVBUF: its window closes, the sender must respect
    the zero window (persist probes only), and resume when it reopens; all
    2 MiB arrive intact."""
    with topology("tun", tmp_path) as t:
        cap = tmp_path / "k.pcap"
        with _capture(t, cap):
            _transfer(t, direction, 1, 2 << 20, 0, seed=41, hold=False, timeout=90,
                      server_args=("--pause", "2", "--rcvbuf", "65536"))
        pkts = _read_ip(cap)
    sender, receiver = (t.peer, t.addr) if direction == "k2s" else (t.addr, t.peer)
    from scapy.layers.inet import TCP

    zero = [p for p in pkts if p.src == receiver and p[TCP].window == 0
            and not p[TCP].flags.S]
    assert zero, "the receiver's window never closed: the test did not test anything"
    flight, beyond = _window_audit(pkts, sender=sender, receiver=receiver)
    assert beyond == 0, "data sent into a closed window"
    print(f"\n{direction}: {len(zero)} zero-window ACKs, max in flight {flight}")


@pytest.mark.parametrize("direction", ["k2s", "s2k"])
def test_small_mss_honoured_both_ways(direction, tmp_path):
    """The client sets TCP_MAXSEG 536 before connect (on the stack: replayed to
    the shard): its SYN offers MSS 536, and then no data segment either way
    carries more than 536 - 12 bytes (timestamps; RFC 6691: the sender takes
    its options out of the MSS). Frames are real segments (--no-offload)."""
    from scapy.layers.inet import TCP

    with topology("tun", tmp_path, ["--no-offload"]) as t:
        cap = tmp_path / "k.pcap"
        with _capture(t, cap):
            _transfer(t, direction, 1, 200_000, 200_000, seed=51, hold=False,
                      client_args=("--maxseg", "536"))
        pkts = _read_ip(cap)
    client = t.peer if direction == "k2s" else t.addr
    syn = next(p for p in pkts if p[TCP].flags == "S")
    assert syn.src == client and _opts(syn[TCP])["MSS"] == 536
    sizes: dict[str, list[int]] = {t.peer: [], t.addr: []}
    for p in pkts:
        n = p.len - p.ihl * 4 - p[TCP].dataofs * 4
        if n > 0:
            sizes[p.src].append(n)
    for src, ns in sizes.items():
        assert len(ns) > 300, f"{src} sent only {len(ns)} segments"
        assert max(ns) == 536 - 12, f"{src}: largest segment {max(ns)} (want 524)"
