"""Moving RETA buckets with their connections, live (issue 15): `shardstack reta
move`, `shardstack reload` and `serve --rebalance auto` under traffic from
the kernel's TCP (the peer, in the namespace the test makes).

The streams: N kernel client sockets to an app under the shim (an echo
server, one thread per connection) and/or the built-in echo service; each
sends seeded random bytes while the moves happen, then FIN, and reads the
echo to EOF; the SHA-256 of what it sent must equal the SHA-256 of what
came back (a byte lost, duplicated or reordered in either direction changes
it). "No RST": the kernel's own counters in the namespace (nstat: TcpOutRsts,
TcpEstabResets, TcpExtTCPAbortOnData...) do not move, the stack's shards
sent no RST (their out_rsts), and the app saw no error.

Every loop is bounded in count and time; namespaces are the test's own
(198.18.0.0/15), deleted at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from shardstack.netio import rss
from test_operate import _lines, _run_app
from test_serve import _require_root, _start, _stop, wait_for

from shardstack import control, netns
from shardstack.migrate import bucket_of

pytestmark = pytest.mark.interop

APP_PORT = 7340
ECHO = 7
N_STREAMS = 200
MOVES = 55
STREAM_WINDOW = 16 * 1024  # bytes a stream may have out (sent, not yet echoed)
STREAM_MAX = 1 << 20  # bytes a stream sends at most before the moves end
TRAFFIC_TIMEOUT = 240.0  # s: bound on the whole traffic


def _ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


@dataclass
class Stream:
    sock: socket.socket
    port: int
    rng: random.Random
    sent: int = 0
    got: int = 0
    h_sent: object = field(default_factory=hashlib.sha256)
    h_got: object = field(default_factory=hashlib.sha256)
    fin: bool = False
    eof: bool = False
    error: str = ""
    pending: bytes = b""


class Streams:
    """Echo streams driven from one thread: send while `stop` is not set
    (each within STREAM_WINDOW of what came back, at most STREAM_MAX), then
    FIN, then read to EOF."""

    def __init__(self, socks: dict[int, socket.socket], seed: int,
                 max_bytes: int = STREAM_MAX) -> None:
        self.streams = [Stream(s, p, random.Random(seed * 100003 + p)) for p, s in socks.items()]
        self.max_bytes = max_bytes
        self.stop = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.failure = ""

    def start(self) -> Streams:
        self.thread.start()
        return self

    def finish(self, timeout: float = 60.0, st=None) -> None:
        self.stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive() and st is not None:
            busy = {s.port for s in self.streams if not s.eof}
            rows = [c for c in st.ss() if c.get("rport") in busy or c.get("remote_port") in busy
                    or any(str(p) in json.dumps(c) for p in busy)]
            for c in rows:
                print("stuck:", {k: v for k, v in c.items() if not isinstance(v, dict)},
                      {k: c["info"].get(k) for k in ("state", "unacked", "notsent_bytes",
                                                     "bytes_received", "bytes_acked")}
                      if isinstance(c.get("info"), dict) else "")
                w = c["worker"]
                g = control.call(f"{st.run_dir}/worker-{w}.ctl", "gate", timeout=5)["conns"]
                print("gate:", [x for x in g if x["sd"] == c["sd"]])
            for f in st.log.parent.glob(st.log.name + "-app.log"):
                print("app:", [x for x in _lines(f) if any(str(p) in x for p in busy)])
            b = sorted(busy)[0]
            print("bucket", bucket_of(_ip(st.addr), APP_PORT, _ip(st.peer), b),
                  "worker stats", json.dumps([w.get("counters", {}).get("appgate")
                                              for w in st.stats()["workers"]]))
        assert not self.thread.is_alive(), "streams did not finish in time: " + self.summary()
        assert not self.failure, self.failure

    def summary(self) -> str:
        busy = [s for s in self.streams if not s.eof]
        return (f"{len(busy)} streams not done; e.g. "
                + ", ".join(f"{s.port}: sent {s.sent} got {s.got} fin {s.fin}" for s in busy[:5]))

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # reported by finish()
            self.failure = f"{type(e).__name__}: {e}"

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        for st in self.streams:
            st.sock.setblocking(False)
            sel.register(st.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
        deadline = time.monotonic() + TRAFFIC_TIMEOUT
        live = len(self.streams)
        while live:
            if time.monotonic() > deadline:
                self.failure = "traffic timed out: " + self.summary()
                return
            stopping = self.stop.is_set()
            for key, mask in sel.select(timeout=0.2):
                st = key.data
                if mask & selectors.EVENT_READ:
                    try:
                        data = st.sock.recv(65536)
                    except BlockingIOError:
                        data = None
                    except OSError as e:
                        st.error = f"{type(e).__name__} {e.errno}"
                        self.failure = f"stream {st.port}: {st.error} after {st.got} bytes"
                        return
                    if data == b"":
                        if not st.fin:
                            self.failure = f"stream {st.port}: EOF before our FIN ({st.got})"
                            return
                        st.eof = True
                        sel.unregister(st.sock)
                        live -= 1
                        continue
                    if data:
                        st.got += len(data)
                        st.h_got.update(data)
                if mask & selectors.EVENT_WRITE and not st.fin:
                    if stopping or st.sent >= self.max_bytes:
                        if stopping:
                            st.sock.shutdown(socket.SHUT_WR)
                            st.fin = True
                            sel.modify(st.sock, selectors.EVENT_READ, st)
                        continue
                    if st.sent - st.got >= STREAM_WINDOW:
                        continue
                    if not st.pending:
                        st.pending = st.rng.randbytes(st.rng.randrange(1, 8192))
                    try:
                        n = st.sock.send(st.pending)
                    except BlockingIOError:
                        n = 0
                    st.h_sent.update(st.pending[:n])
                    st.sent += n
                    st.pending = st.pending[n:]
            if not stopping:
                # A stream with its window full waits for its echo: don't spin on EVENT_WRITE.
                for st in self.streams:
                    if st.fin or st.eof:
                        continue
                    want = selectors.EVENT_READ
                    if st.sent - st.got < STREAM_WINDOW and st.sent < self.max_bytes:
                        want |= selectors.EVENT_WRITE
                    if sel.get_key(st.sock).events != want:
                        sel.modify(st.sock, want, st)
            else:
                for st in self.streams:
                    if not st.fin and not st.eof and sel.get_key(st.sock).events \
                            != selectors.EVENT_READ | selectors.EVENT_WRITE:
                        sel.modify(st.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
        sel.close()

    def check(self) -> None:
        for st in self.streams:
            assert st.eof and st.got == st.sent, (st.port, st.sent, st.got)
            assert st.h_got.hexdigest() == st.h_sent.hexdigest(), f"stream {st.port}: SHA differs"
        assert sum(st.sent for st in self.streams) > 0


def kernel_rst_counters(ns: netns.Netns) -> dict[str, int]:
    """The namespace kernel's reset-related counters (nstat, absolute)."""
    r = ns.run(["nstat", "-az", "--json"])
    k = json.loads(r.stdout)["kernel"]
    names = ("TcpOutRsts", "TcpEstabResets", "TcpAttemptFails", "TcpExtTCPAbortOnData",
             "TcpExtTCPAbortOnClose", "TcpExtTCPAbortOnTimeout")
    return {n: int(k.get(n, 0)) for n in names}


def stack_rsts(st) -> int:
    return sum(w.get("shard", {}).get("out_rsts", 0) for w in st.stats()["workers"])


@pytest.fixture
def mig_stack():
    _require_root()
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssg") as ns:
        st = _start(ns, netns.next_subnet(), [])
        try:
            yield st
        finally:
            _stop(st)
            for f in st.log.parent.glob(st.log.name + "*"):
                f.unlink(missing_ok=True)


APP = """
import os, socket, sys, threading
threading.Timer(300, os._exit, (3,)).start()  # bounded: the test never needs longer
srv = socket.create_server(("0.0.0.0", {port}), backlog=256)
print("listening", flush=True)
def say(line):
    os.write(1, (line + "\\n").encode())  # one write(2) per line: threads interleave
def serve(c, port):
    with c:
        try:
            while True:
                data = c.recv(1 << 20)
                if not data:
                    say(f"eof {{port}}")
                    return
                c.sendall(data)
        except OSError as e:
            say(f"error {{port}} {{type(e).__name__}} {{e.errno}}")
while True:
    c, (host, port) = srv.accept()
    threading.Thread(target=serve, args=(c, port), daemon=True).start()
"""


def _app(st):
    app, log = _run_app(st, APP.format(port=APP_PORT), "app")
    wait_for(lambda: "listening" in _lines(log) or app.poll() is not None, what="app listening")
    assert app.poll() is None, _lines(log)
    return app, log


def _connect_all(st, ports: list[int], dport: int) -> dict[int, socket.socket]:
    socks = {}
    try:
        for p in ports:
            socks[p] = st.connect(dport, p)
    except BaseException:
        for s in socks.values():
            s.close()
        raise
    return socks


def _move(st, bucket: int, worker: int) -> dict:
    return control.call(f"{st.run_dir}/control.sock", "reta_move", bucket=bucket, worker=worker,
                        timeout=10)


def _cli_long(st, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "shardstack", *args, "--run-dir", st.run_dir,
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _check_app(log, ports) -> None:
    lines = wait_for(lambda: sum(x.startswith("eof ") for x in _lines(log)) >= len(ports)
                     and _lines(log), timeout=30, what="the app saw every EOF")
    assert not [x for x in lines if x.startswith(("error", "then"))], lines
    assert {int(x.split()[1]) for x in lines if x.startswith("eof ")} >= set(ports)


def test_streams_survive_bucket_moves(mig_stack):
    """Done-when: 200 concurrent streams, SHA-256 checked, survive >= 50 bucket
    moves with no loss, no duplicate and no RST. 150 streams to an app under
    the shim (its unix stream ends travel by SCM_RIGHTS), 50 to the built-in
    echo service (its state travels as values)."""
    st = mig_stack
    app, log = _app(st)
    app_ports = st.ports_for(N_STREAMS * 3 // 4, APP_PORT, 30000)
    echo_ports = st.ports_for(N_STREAMS - len(app_ports), ECHO, 40000)
    rst0, srst0 = kernel_rst_counters(st.ns), stack_rsts(st)
    socks = _connect_all(st, app_ports, APP_PORT)
    socks.update(_connect_all(st, echo_ports, ECHO))
    assert len(socks) == N_STREAMS
    flows = [(p, APP_PORT) for p in app_ports] + [(p, ECHO) for p in echo_ports]
    buckets = sorted({bucket_of(_ip(st.addr), d, _ip(st.peer), p) for p, d in flows})
    reta = rss.make_reta(2)
    streams = Streams(socks, seed=15).start()
    records = []
    try:
        time.sleep(0.5)  # every stream under way
        deadline = time.monotonic() + 150
        for i in range(MOVES):
            assert time.monotonic() < deadline, f"only {i} moves in the time allowed"
            assert not streams.failure, streams.failure
            b = buckets[(i * 7) % len(buckets)]
            dst = 1 - reta[b]
            rec = _move(st, b, dst)
            assert rec["ok"] and rec["from"] == reta[b] and rec["to"] == dst, rec
            reta[b] = dst
            records.append(rec)
        # and once through the command line, as an operator does
        b = buckets[0]
        out = st.cli("reta", "move", str(b), str(1 - reta[b]))
        assert out["bucket"] == b and out["to"] == 1 - reta[b], out
        reta[b] = 1 - reta[b]
        streams.finish(st=st)
    finally:
        streams.stop.set()
        for s in socks.values():
            s.close()
    streams.check()
    moved = [r for r in records if r["conns"]]
    assert len(moved) >= 50, f"only {len(moved)} moves carried connections"
    assert sum(r["app_conns"] for r in records) > 0
    rep = st.cli("reta")
    assert rep["reta"] == reta
    assert rep["migrations"]["done"] >= MOVES + 1 and rep["migrations"]["aborted"] == 0
    _check_app(log, app_ports)
    assert kernel_rst_counters(st.ns) == rst0, "the kernel peer saw or sent a reset"
    assert stack_rsts(st) == srst0, "the stack sent a RST"
    app.kill()
    app.wait(5)
    pauses = sorted(r["pause"] for r in moved)
    print(f"moves {len(records)}, with connections {len(moved)}; pause median "
          f"{pauses[len(pauses) // 2] * 1e3:.2f} ms max {pauses[-1] * 1e3:.2f} ms; held "
          f"{sum(r['held'] for r in records)} frames")


def test_reload_keeps_streams(mig_stack):
    """Done-when: `shardstack reload` under the same streams: all survive, and
    the worker pids have changed."""
    st = mig_stack
    app, log = _app(st)
    app_ports = st.ports_for(N_STREAMS * 3 // 4, APP_PORT, 30000)
    echo_ports = st.ports_for(N_STREAMS - len(app_ports), ECHO, 40000)
    rst0, srst0 = kernel_rst_counters(st.ns), stack_rsts(st)
    pids = [w["proc"]["pid"] for w in st.stats()["workers"]]
    socks = _connect_all(st, app_ports, APP_PORT)
    socks.update(_connect_all(st, echo_ports, ECHO))
    streams = Streams(socks, seed=16).start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        out = _cli_long(st, "reload")
        took = time.monotonic() - t0
        assert [w["old_pid"] for w in out["workers"]] == pids
        new_pids = [w["pid"] for w in out["workers"]]
        assert all(a != b for a, b in zip(pids, new_pids, strict=True))
        assert sum(w["conns"] for w in out["workers"]) >= N_STREAMS  # each moved away and back
        time.sleep(0.5)  # traffic on the new processes
        streams.finish(st=st)
    finally:
        streams.stop.set()
        for s in socks.values():
            s.close()
    streams.check()
    moves = [m for w in out["workers"] for m in w["moves"]]
    print([(w["replace_seconds"], [(m["pause"], m["held"], m["steps"]) for m in w["moves"]])
           for w in out["workers"]])
    print(f"reload: {took:.1f} s; {len(moves)} moves, pause per move max "
          f"{max(m['pause'] for m in moves) * 1e3:.1f} ms, held {sum(m['held'] for m in moves)}")
    now = [w["proc"]["pid"] for w in st.stats()["workers"]]
    assert now == new_pids and not set(now) & set(pids)
    _check_app(log, app_ports)
    assert kernel_rst_counters(st.ns) == rst0, "the kernel peer saw or sent a reset"
    assert stack_rsts(st) == srst0, "the stack sent a RST"
    # the new processes serve new connections too
    s = st.connect(APP_PORT, 45000)
    s.sendall(b"after reload")
    assert s.recv(100) == b"after reload"
    s.close()
    app.kill()
    app.wait(5)


SKEW_BUCKETS = 8  # of worker 0's buckets carry all the load
SKEW_FLOWS = 2  # per bucket
CONVERGE_S = 10.0
CPU_WINDOW = 2.0  # s over which a worker's CPU rate is measured


@pytest.fixture
def auto_stack():
    _require_root()
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssa") as ns:
        st = _start(ns, netns.next_subnet(), ["--rebalance", "auto"])
        try:
            yield st
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def _worker_cpu(st) -> list[float]:
    rep = control.call(f"{st.run_dir}/control.sock", "reta", timeout=10)
    return [w["cpu_seconds"] for w in rep["workers"]]


def test_rebalance_auto_evens_a_skewed_load(auto_stack):
    """Done-when: flows hashed onto a few of worker 0's buckets; with
    --rebalance auto the workers' CPU converges within +-20 % of the mean
    inside 10 s. The CPU is the stack's own accounting (shardstack.load:
    each worker's process CPU time, what the balancer reads): wall-clock
    CPU of a process on this shared 2-core box is too noisy to assert on,
    and includes nothing the worker did not do itself either way. The
    streams stay SHA-256 intact through the moves."""
    st = auto_stack
    addr, peer = _ip(st.addr), _ip(st.peer)
    mine = [b for b in range(rss.RETA_SIZE) if st.reta[b] == 0][:SKEW_BUCKETS]
    ports: list[int] = []
    per = {b: 0 for b in mine}
    p = 30000
    while len(ports) < SKEW_BUCKETS * SKEW_FLOWS:
        b = bucket_of(addr, ECHO, peer, p)
        if b in per and per[b] < SKEW_FLOWS:
            per[b] += 1
            ports.append(p)
        p += 1
    assert all(st.worker_of(p, ECHO) == 0 for p in ports)
    socks = _connect_all(st, ports, ECHO)
    streams = Streams(socks, seed=17, max_bytes=1 << 40).start()
    converged_at = None
    samples = []
    try:
        t0 = time.monotonic()
        last_t, last = t0, _worker_cpu(st)
        while time.monotonic() - t0 < CONVERGE_S + CPU_WINDOW:
            assert not streams.failure, streams.failure
            time.sleep(CPU_WINDOW)
            now_t, now = time.monotonic(), _worker_cpu(st)
            rate = [(b - a) / (now_t - last_t) for a, b in zip(last, now, strict=True)]
            last_t, last = now_t, now
            mean = sum(rate) / len(rate)
            samples.append((round(now_t - t0, 1), [round(r, 3) for r in rate]))
            if mean > 0.05 and all(abs(r - mean) <= 0.2 * mean for r in rate):
                converged_at = now_t - t0
                break
        streams.finish(st=st)
    finally:
        streams.stop.set()
        for s in socks.values():
            s.close()
    streams.check()
    rep = st.cli("reta")
    auto = [m for m in rep["migrations"]["last"] if m["by"] == "auto"]
    print(f"converged in {converged_at} s; CPU s/s per worker: {samples}; auto moves: "
          + ", ".join(f"{m['bucket']} {m['from']}->{m['to']} pause {m['pause'] * 1e3:.1f} ms "
                      f"held {m['held']}" for m in auto))
    assert auto, "the balancer moved nothing: " + st.log.read_text()[-3000:]
    assert converged_at is not None and converged_at <= CONVERGE_S, samples


def test_move_to_a_frozen_worker_is_aborted_in_bounded_time(mig_stack):
    """A move that cannot finish (the new worker stopped with SIGSTOP) is
    aborted within a bounded time; the bucket stays with its worker and its
    connections carry on: SHA-256 intact, no RST."""
    st = mig_stack
    ports = st.ports_for(20, ECHO, 40000)
    rst0, srst0 = kernel_rst_counters(st.ns), stack_rsts(st)
    socks = _connect_all(st, ports, ECHO)
    b = bucket_of(_ip(st.addr), ECHO, _ip(st.peer), ports[0])
    src = st.reta[b]
    victim = st.stats()["workers"][1 - src]["proc"]["pid"]
    streams = Streams(socks, seed=18, max_bytes=256 * 1024).start()
    try:
        time.sleep(0.3)
        os.kill(victim, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(OSError) as ei:
                _move(st, b, 1 - src)
            took = time.monotonic() - t0
        finally:
            os.kill(victim, signal.SIGCONT)
        assert ei.value.errno == errno.ETIMEDOUT, ei.value
        assert took < 6.0, f"the abort took {took:.1f} s"
        rep = st.cli("reta")
        assert rep["reta"][b] == src
        assert rep["migrations"]["aborted"] == 1 and rep["migrations"]["done"] == 0
        # the bucket still moves once the worker is back
        rec = _move(st, b, 1 - src)
        assert rec["to"] == 1 - src
        streams.finish(st=st)
    finally:
        streams.stop.set()
        for s in socks.values():
            s.close()
    streams.check()
    assert kernel_rst_counters(st.ns) == rst0, "the kernel peer saw or sent a reset"
    assert stack_rsts(st) == srst0, "the stack sent a RST"


APP_OPTS = """
import os, socket, threading
t = threading.Timer(120, os._exit, (3,))
t.daemon = True  # bounded, and no reason to outlive the connection
t.start()
srv = socket.create_server(("0.0.0.0", {port}))
print("listening", flush=True)
c, _ = srv.accept()
with c:
    while True:
        data = c.recv(100)
        if not data:
            break
        # socket options go to the worker holding the connection (its token)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nodelay = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        state = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]
        c.sendall(f"{{data.decode()}} nodelay={{nodelay}} state={{state}}".encode())
"""


def test_socket_options_follow_a_moved_connection(mig_stack):
    """After its bucket moved, an app's setsockopt/getsockopt (TCP_NODELAY,
    TCP_INFO) on the connection still reach its TCP state: the old worker
    answers "moved" and the shim asks the new one."""
    st = mig_stack
    port = APP_PORT + 1
    app, log = _run_app(st, APP_OPTS.format(port=port), "opts")
    try:
        wait_for(lambda: "listening" in _lines(log) or app.poll() is not None,
                 what="app listening")
        sport = 41000
        s = st.connect(port, sport)
        b = bucket_of(_ip(st.addr), port, _ip(st.peer), sport)
        w = st.reta[b]
        for i in range(3):
            s.sendall(f"q{i}".encode())
            assert s.recv(100) == f"q{i} nodelay=1 state=1".encode()  # TCP_ESTABLISHED
            w = 1 - w
            assert _move(st, b, w)["app_conns"] == 1
        s.close()
        assert app.wait(10) == 0, _lines(log)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(5)


def test_moves_over_af_packet(tmp_path):
    """The same protocol when the kernel's AF_PACKET fanout program steers
    (--packet on a veth, the kernel peer in another namespace): 40 echo
    streams through 20 moves, SHA-256 intact, no RST on either side."""
    _require_root()
    with netns.netns(prefix="ssp") as a, netns.netns(prefix="ssp") as b:
        net = netns.next_subnet()
        netns.run(["ip", "link", "add", "vpa", "netns", a.name, "type", "veth",
                   "peer", "name", "vpb", "netns", b.name])
        a.up("vpa")
        b.up("vpb")
        b.add_addr("vpb", f"{net.network_address + 1}/{net.prefixlen}")
        st = _start(a, net, [], device=["--packet", "vpa"])
        st.client_ns = b.name
        try:
            ports = st.ports_for(40, ECHO, 40000)
            rst0, srst0 = kernel_rst_counters(b), stack_rsts(st)
            socks = _connect_all(st, ports, ECHO)
            buckets = sorted({bucket_of(_ip(st.addr), ECHO, _ip(st.peer), p) for p in ports})
            reta = list(st.reta)
            streams = Streams(socks, seed=19, max_bytes=512 * 1024).start()
            try:
                time.sleep(0.3)
                for i in range(20):
                    assert not streams.failure, streams.failure
                    k = buckets[(i * 5) % len(buckets)]
                    rec = _move(st, k, 1 - reta[k])
                    assert rec["to"] == 1 - reta[k]
                    reta[k] = 1 - reta[k]
                streams.finish(st=st)
            finally:
                streams.stop.set()
                for s in socks.values():
                    s.close()
            streams.check()
            assert kernel_rst_counters(b) == rst0, "the kernel peer saw or sent a reset"
            assert stack_rsts(st) == srst0, "the stack sent a RST"
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def test_ipv6_connections_move_too():
    """IPv6 connections (a dual-stack serve on a TUN, the kernel's IPv6 client)
    go with their bucket: their 4-tuples hash on 128-bit addresses. 30 echo
    streams through 15 moves, SHA-256 intact, no RST."""
    import ipaddress

    from test_ipv6 import v6_stack
    from test_serve import in_netns

    with v6_stack("tun", ["--echo", str(ECHO)]) as st:
        a6, p6 = int(ipaddress.IPv6Address(st.addr6)), int(ipaddress.IPv6Address(st.peer6))
        ports = list(range(42000, 42030))
        socks = {}
        try:
            for p in ports:
                with in_netns(st.kns.name):
                    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((st.peer6, p))
                s.settimeout(10)
                s.connect((st.addr6, ECHO))
                socks[p] = s
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        rst0 = kernel_rst_counters(st.kns)
        buckets = sorted({bucket_of(a6, ECHO, p6, p) for p in ports})
        reta = rss.make_reta(2)
        ctl = f"{st.run_dir}/control.sock"
        streams = Streams(socks, seed=20, max_bytes=256 * 1024).start()
        try:
            time.sleep(0.3)
            moved = 0
            for i in range(15):
                assert not streams.failure, streams.failure
                k = buckets[(i * 3) % len(buckets)]
                rec = control.call(ctl, "reta_move", bucket=k, worker=1 - reta[k], timeout=10)
                reta[k] = 1 - reta[k]
                moved += rec["conns"]
            assert moved >= 15, "the moves carried (almost) no IPv6 connection"
            streams.finish()
        finally:
            streams.stop.set()
            for s in socks.values():
                s.close()
        streams.check()
        assert kernel_rst_counters(st.kns) == rst0, "the kernel peer saw or sent a reset"
        assert st.shard_sum("out_rsts") == 0, "the stack sent a RST"
