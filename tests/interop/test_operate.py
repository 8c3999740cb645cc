"""Operating a running stack: `serve --metrics`, `shardstack reta`, and what a
worker crash does to its peers, its apps and everyone else.

Each test makes its own network namespace (198.18.0.0/15 only) with `shardstack
serve` inside, talks to it from the kernel side of the TUN, and scrapes
/metrics on the namespace's own loopback. Loads are bounded (a fixed number
of connections and bytes) and every wait is bounded in time.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shardstack.netio import rss
from test_serve import (
    ECHO,
    _require_root,
    _start,
    _stop,
    close_all,
    echo_many,
    in_netns,
    wait_for,
)

from shardstack import control, netns
from shardstack.load import frame_bucket

pytestmark = pytest.mark.interop

METRICS_PORT = 9464


@pytest.fixture
def mstack():
    """A 2-worker stack serving /metrics on the namespace's 127.0.0.1."""
    _require_root()
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssm") as ns:
        st = _start(ns, netns.next_subnet(), ["--metrics", str(METRICS_PORT)])
        try:
            yield st
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def scrape(st, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """GET /metrics inside the stack's namespace, parsed by prometheus_client's
    own text parser: {(sample name, sorted labels): value}."""
    with in_netns(st.ns.name):
        with urllib.request.urlopen(f"http://{host}:{METRICS_PORT}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _w(i: int) -> tuple:
    return (("worker", str(i)),)


def _bucket(st, sport: int, dport: int) -> int:
    return rss.flow_hash(_ipint(st.peer), _ipint(st.addr), sport, dport) & rss.RETA_MASK


def _ipint(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


def test_metrics_counters_move_under_load(mstack):
    st = mstack
    before = scrape(st)
    for proc in ("supervisor", "netio", "worker-0", "worker-1"):
        assert before[("shardstack_process_resident_memory_bytes", (("process", proc),))] > 0
        assert ("shardstack_process_cpu_seconds_total", (("process", proc),)) in before
    for i in (0, 1):
        assert before[("shardstack_reta_buckets", _w(i))] == 64
        assert before[("shardstack_reta_moves_total", (("direction", "in"),) + _w(i))] == 0
        assert before[("shardstack_connections", (("state", "LISTEN"),) + _w(i))] == 2

    ports = st.ports_for(8, ECHO, 30000)
    socks = [st.connect(ECHO, p) for p in ports]
    try:
        echo_many(socks, 256 * 1024, seed=15)
        during = scrape(st)
        for i in (0, 1):
            mine = [p for p in ports if st.worker_of(p, ECHO) == i]
            assert during[("shardstack_connections", (("state", "ESTABLISHED"),) + _w(i))] \
                == len(mine)
    finally:
        close_all(socks)
    after = scrape(st)
    for i in (0, 1):
        for name in ("shardstack_segments_in_total", "shardstack_segments_out_total",
                     "shardstack_worker_frames_in_total", "shardstack_load_frames_total",
                     "shardstack_load_bytes_total"):
            assert after[(name, _w(i))] > before[(name, _w(i))], (name, i)
        # 256 KiB each way on 4 connections per worker: at least that many bytes counted
        assert after[("shardstack_load_bytes_total", _w(i))] \
            - before[("shardstack_load_bytes_total", _w(i))] >= 4 * 256 * 1024
    for p in ports:  # every flow's bucket took frames, and it is the one the hash names
        b = str(_bucket(st, p, ECHO))
        assert after[("shardstack_bucket_frames_total", (("bucket", b),))] \
            > before[("shardstack_bucket_frames_total", (("bucket", b),))]
    cpu = ("shardstack_process_cpu_seconds_total", (("process", "worker-0"),))
    # The kernel's per-process CPU time moves in clock ticks: poll (bounded)
    # rather than trust one scrape taken right after the traffic.
    wait_for(lambda: scrape(st)[cpu] > before[cpu], what="worker-0's CPU seconds to move")

    # `shardstack reta` agrees, and a new table counts real moves
    rep = st.cli("reta")
    assert rep["moves"] == 0 and rep["reta"] == rss.make_reta(2)
    for p in ports:
        b = _bucket(st, p, ECHO)
        assert rep["buckets"][b]["frames"] > 0 and rep["buckets"][b]["worker"] == b % 2
    new = rss.make_reta(2)
    new[0], new[1] = 1, 0
    control.call(f"{st.run_dir}/control.sock", "set_reta", reta=new, timeout=10)
    moved = scrape(st)
    assert moved[("shardstack_reta_moves_total", (("direction", "in"),) + _w(0))] == 1
    assert moved[("shardstack_reta_moves_total", (("direction", "out"),) + _w(0))] == 1
    assert st.cli("reta")["moves"] == 2


def test_metrics_loopback_only_by_default(mstack):
    """Bound to 127.0.0.1: the stack's own address (and the TUN's peer side)
    do not answer on the metrics port."""
    assert scrape(mstack)
    with in_netns(mstack.ns.name), pytest.raises(ConnectionRefusedError):
        socket.create_connection((mstack.peer, METRICS_PORT), timeout=2).close()


def test_metrics_through_a_worker_crash(mstack):
    """Scrapes while a worker dies and is replaced still answer 200 with
    parseable text (a dead worker's families are just absent), and the
    restart is counted."""
    st = mstack
    victim = st.stats()["workers"][1]["proc"]["pid"]
    os.kill(victim, signal.SIGKILL)
    for _ in range(5):
        assert ("shardstack_reta_buckets", _w(0)) in scrape(st)
    wait_for(lambda: st.hello()["ready"], what="worker 1 replaced")

    def counted():
        m = scrape(st)
        return m.get(("shardstack_process_restarts_total", (("process", "worker-1"),))) == 1 \
            and ("shardstack_segments_in_total", _w(1)) in m
    wait_for(counted, what="the restart in the metrics, worker 1 answering again")


def test_bucket_of_a_real_frame():
    """frame_bucket reads the 4-tuple where Linux puts it: checked on a frame
    the kernel built (a SYN from a kernel socket, captured on a TUN)."""
    _require_root()
    with netns.netns(prefix="ssb") as ns:
        from shardstack.netio.device import TunDevice

        net = netns.next_subnet()
        peer, addr = str(net.network_address + 1), str(net.network_address + 2)
        with in_netns(ns.name):
            dev = TunDevice("ssb0", mtu=1500)
        try:
            ns.run(["ip", "addr", "add", f"{peer}/{net.prefixlen}", "dev", "ssb0"])
            with in_netns(ns.name):
                s = socket.socket()
            s.setblocking(False)
            s.bind((peer, 41234))
            try:
                s.connect((addr, 80))
            except BlockingIOError:
                pass
            deadline = time.monotonic() + 5
            frame = None
            while frame is None and time.monotonic() < deadline:
                for f, _flags in dev.recv_batch():
                    if f[0] >> 4 == 4 and f[9] == 6:
                        frame = bytes(f)
                time.sleep(0.01)
            s.close()
            assert frame is not None, "no SYN seen on the TUN"
            assert frame_bucket(frame) == rss.flow_hash(_ipint(peer), _ipint(addr), 41234, 80) \
                & rss.RETA_MASK
        finally:
            dev.close()


# -- a worker crash ---------------------------------------------------------------------

APP_PORT = 7320
WAIT_APP = 20.0  # s: bound on any one wait for the app or the kernel side
APP_ECHO = """
import os, socket, sys, threading
threading.Timer(120, os._exit, (3,)).start()  # bounded: the test never needs longer
srv = socket.create_server(("0.0.0.0", {port}))
print("listening", flush=True)
def say(line):
    # One write(2) per line: print() writes the text and the newline
    # separately, and the connections' threads would interleave them.
    os.write(1, (line + "\\n").encode())
def serve(c, port):
    try:
        while True:
            data = c.recv(1 << 20)
            if not data:
                say(f"eof {{port}}")
                return
            c.sendall(data)
    except OSError as e:
        say(f"error {{port}} {{type(e).__name__}} {{e.errno}}")
        say(f"then {{port}} {{c.recv(10)!r}}")
while True:
    c, (host, port) = srv.accept()
    threading.Thread(target=serve, args=(c, port), daemon=True).start()
"""


def _run_app(st, code: str, name: str):
    script = st.log.with_name(st.log.name + f"-{name}.py")
    script.write_text(code)
    log = st.log.with_name(st.log.name + f"-{name}.log")
    with open(log, "wb") as out:
        proc = st.ns.popen([sys.executable, "-m", "shardstack", "run", "--", sys.executable,
                            str(script)], stdout=out, stderr=subprocess.STDOUT,
                           env=dict(os.environ, SHARDSTACK_RUN_DIR=st.run_dir,
                                    PYTHONUNBUFFERED="1"))
    return proc, log


def _lines(log) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _spare_ready(st) -> None:
    """Until the supervisor's warm spare has its imports done (it replaces a
    dead worker within milliseconds; a cold start takes a loaded machine
    most of the second the test allows)."""
    wait_for(lambda: (st.stats()["supervisor"].get("spare") or {}).get("ready"),
             what="the warm spare ready")


def _ports_on(st, worker: int, n: int, start: int) -> list[int]:
    out = []
    p = start
    while len(out) < n:
        if st.worker_of(p, APP_PORT) == worker:
            out.append(p)
        p += 1
    return out


@pytest.fixture
def crash_stack():
    _require_root()
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssc") as ns:
        st = _start(ns, netns.next_subnet(), [])
        try:
            yield st
        finally:
            _stop(st)
            for f in st.log.parent.glob(st.log.name + "*"):
                f.unlink(missing_ok=True)


@pytest.mark.parametrize("last_write", [5, 1 << 20], ids=["small", "large"])
def test_worker_crash(crash_stack, last_write):
    """kill -9 of worker 1 under an app on the shim: its apps see ECONNRESET
    (held byte in the unix stream after a small write; the shim's status
    query after a large one), its peers get RST on their next segment,
    worker 0's connections are untouched, and the replacement accepts a new
    connection within a second of the kill."""
    st = crash_stack
    app, log = _run_app(st, APP_ECHO.format(port=APP_PORT), "app")
    wait_for(lambda: "listening" in _lines(log) or app.poll() is not None, what="app listening")
    assert app.poll() is None, _lines(log)
    w0 = _ports_on(st, 0, 2, 30000)
    w1 = _ports_on(st, 1, 2, 30000)
    socks = {p: st.connect(APP_PORT, p) for p in w0 + w1}
    try:
        # the app's last write on each connection: the echo of `last_write` bytes
        echo_many(list(socks.values()), last_write, seed=last_write)
        _spare_ready(st)
        victim = st.stats()["workers"][1]["proc"]["pid"]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # a new connection to the replaced worker within one second of the kill
        fresh = _ports_on(st, 1, 1, 31000)[0]
        new = None
        while new is None and time.monotonic() < t_kill + 1.0:
            try:
                new = st.connect(APP_PORT, fresh, timeout=max(0.05, t_kill + 1.0
                                                              - time.monotonic()))
            except OSError:
                time.sleep(0.02)
        served_in = time.monotonic() - t_kill
        assert new is not None, "no new connection to worker 1 within 1 s of the kill"
        with new:
            echo_many([new], 1000, seed=7)
        assert served_in < 1.0

        # the app: ECONNRESET once (then EOF) on worker 1's connections, nothing on worker 0's
        def reported():
            lines = _lines(log)
            return all(any(line.startswith(f"then {p} ") for line in lines) for p in w1) \
                and lines
        lines = wait_for(reported, timeout=10,
                         what=f"the app told of worker 1's connections: {_lines(log)}")
        for p in w1:
            assert f"error {p} ConnectionResetError {errno.ECONNRESET}" in lines, lines
            assert f"then {p} b''" in lines, lines
        assert not [x for x in lines if any(f" {p} " in x + " " for p in w0)], lines

        # worker 0's connections are untouched: they echo as before
        echo_many([socks[p] for p in w0], 64 * 1024, seed=9)

        # worker 1's peers: their next segment is answered with RST
        for p in w1:
            s = socks[p]
            s.settimeout(10)
            s.sendall(b"anyone there?")
            with pytest.raises(ConnectionResetError):
                s.recv(100)
    finally:
        close_all(socks.values())
        app.kill()
        app.wait(5)


APP_CLIENT = """
import os, socket, threading
threading.Timer(120, os._exit, (3,)).start()
c = socket.create_connection(("{peer}", {port}), timeout=30)
c.settimeout(None)
c.sendall(b"w" * {size})
print("sent", flush=True)
try:
    data = c.recv(100)
    print("no reset", data, flush=True)
except OSError as e:
    print("error", type(e).__name__, e.errno, flush=True)
    print("then", c.recv(10), flush=True)
"""


@pytest.mark.parametrize("last_write", [5, 1 << 20], ids=["small", "large"])
def test_worker_crash_active_open(crash_stack, last_write):
    """The same for a connection the app opened (to a kernel server): the app
    sees ECONNRESET, the kernel server's next segment is answered with RST."""
    st = crash_stack
    with in_netns(st.ns.name):
        srv = socket.create_server((st.peer, 7330))
    srv.settimeout(WAIT_APP)
    app = None
    try:
        app, log = _run_app(st, APP_CLIENT.format(peer=st.peer, port=7330, size=last_write),
                            "client")
        conn, (_host, lport) = srv.accept()
        with conn:
            conn.settimeout(WAIT_APP)
            got = 0
            while got < last_write:
                got += len(conn.recv(1 << 20))
            wait_for(lambda: "sent" in _lines(log), what="the app's write done")
            victim_id = rss.flow_to_worker(_ipint(st.peer), _ipint(st.addr), 7330, lport,
                                           rss.make_reta(2))
            victim = st.stats()["workers"][victim_id]["proc"]["pid"]
            os.kill(victim, signal.SIGKILL)
            lines = wait_for(lambda: [x for x in _lines(log) if x.startswith("then")]
                             and _lines(log), timeout=10,
                             what=f"the app told of its connection: {_lines(log)}")
            assert f"error ConnectionResetError {errno.ECONNRESET}" in lines, lines
            assert "then b''" in lines, lines
            conn.sendall(b"anyone there?")
            with pytest.raises(ConnectionResetError):
                conn.recv(100)
    finally:
        srv.close()
        if app is not None:
            app.kill()
            app.wait(5)


# -- shardstack trace -------------------------------------------------------------------

CORE_TESTS = Path(__file__).resolve().parents[1] / "unit" / "core"


def _core_trace_test():
    """tests/unit/core/test_trace.py, the engine's own trace test: its reading
    of the reference call graph and its comparison (NOT_IMPLEMENTED names
    absent, every other one present in order) are the ones to apply here."""
    sys.path.insert(0, str(CORE_TESTS))
    try:
        spec = importlib.util.spec_from_file_location("core_test_trace", CORE_TESTS / "test_trace.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(CORE_TESTS))


def test_trace_port_shows_the_passive_open(crash_stack):
    """`shardstack trace --port 7` attached to a running stack prints, for a
    connection's SYN and its final ACK, the engine's passive-open call graph
    (the reference call graph's "Receive SYN" and "Receive ACK", compared as
    the engine's own trace test does), then detaches by itself once the port
    is quiet."""
    st = crash_stack
    tr = st.ns.popen([sys.executable, "-m", "shardstack", "trace", "--port", str(ECHO),
                      "--json", "--timeout", "20", "--run-dir", st.run_dir],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tr.stderr.readline().startswith("tracing port 7")
        sport = st.ports_for(1, ECHO, 33000)[0]
        other = st.ports_for(1, ECHO, 34000)[0]
        with st.connect(ECHO, sport) as s:
            s.sendall(b"traced")
            assert s.recv(100) == b"traced"
        out, err = tr.communicate(timeout=30)
    finally:
        if tr.poll() is None:
            tr.kill()
            tr.wait(5)
    assert tr.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    mine = [e for e in events if f":{sport} > " in e["segment"]]
    assert mine, out
    syn, ack = mine[0], mine[1]
    assert " S seq " in syn["segment"] and " . seq " in ack["segment"], (syn, ack)
    ref = _core_trace_test()
    sections = ref.reference_sections(ref.reference_text())
    ref.check_section(sections["Receive SYN"], syn["calls"])
    ref.check_section(sections["Receive ACK"], ack["calls"])
    assert all(e["worker"] == st.worker_of(sport, ECHO) for e in mine)
    # detached: the supervisor no longer knows the session (its workers were
    # told to stop: tests/unit/runtime/test_tracer.py), and the stack serves on
    with pytest.raises(OSError) as ei:
        control.call(f"{st.run_dir}/control.sock", "trace_take", tid=1)
    assert ei.value.errno == errno.ENOENT
    with st.connect(ECHO, other) as s:
        s.sendall(b"x")
        assert s.recv(10) == b"x"


def test_trace_conn_shows_only_that_connection(crash_stack):
    """`shardstack trace --conn` prints one connection's segments, not those of
    another connection to the same port at the same time."""
    st = crash_stack
    a_port, b_port = st.ports_for(2, ECHO, 35000)
    a = st.connect(ECHO, a_port)
    b = st.connect(ECHO, b_port)
    try:
        tr = st.ns.popen([sys.executable, "-m", "shardstack", "trace", "--conn",
                          f"{st.addr}:{ECHO}-{st.peer}:{a_port}", "--json", "--timeout", "20",
                          "--run-dir", st.run_dir],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert tr.stderr.readline().startswith(f"tracing {st.addr}:{ECHO}-")
            for s, msg in ((b, b"other"), (a, b"mine"), (b, b"other again")):
                s.sendall(msg)
                assert s.recv(100) == msg
            out, err = tr.communicate(timeout=30)
        finally:
            if tr.poll() is None:
                tr.kill()
                tr.wait(5)
    finally:
        close_all([a, b])
    assert tr.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events, err
    assert all(e["segment"].startswith(f"{st.peer}:{a_port} > {st.addr}:{ECHO} ") for e in events)
    assert any(e["segment"].endswith("len 4") for e in events)  # "mine"
    assert all("tcp_v4_rcv" in e["calls"] for e in events)


def test_set_reta_steers_new_connections(crash_stack):
    """A new RETA reaches the kernel's steering at once (TUN direct RX: the
    program reads the RETA from a BPF map): a connection whose bucket moved
    from worker 0 to worker 1 is accepted and served by worker 1."""
    st = crash_stack
    sport = st.ports_for(2, ECHO, 36000)[0]
    if st.worker_of(sport, ECHO) != 0:
        sport = st.ports_for(2, ECHO, 36000)[1]
    assert st.worker_of(sport, ECHO) == 0
    bucket = _bucket(st, sport, ECHO)
    new = rss.make_reta(2)
    new[bucket] = 1
    control.call(f"{st.run_dir}/control.sock", "set_reta", reta=new, timeout=10)
    assert st.stats()["netio"]["counters"]["rx"] == "direct"
    with st.connect(ECHO, sport) as s:
        s.sendall(b"moved")
        assert s.recv(100) == b"moved"
        mine = [c for c in st.ss() if c.get("rport") == sport and c.get("lport") == ECHO]
        assert [c["worker"] for c in mine] == [1], mine
    rep = st.cli("reta")
    assert rep["moves"] == 1 and rep["buckets"][bucket]["worker"] == 1
