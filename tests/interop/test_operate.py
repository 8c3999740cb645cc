"""Operating a running stack: `serve --metrics`, `shardstack reta`, and what a
worker crash does to its peers, its apps and everyone else.

Each test makes its own network namespace (198.18.0.0/15 only) with `shardstack
serve` inside, talks to it from the kernel side of the TUN, and scrapes
/metrics on the namespace's own loopback. Loads are bounded (a fixed number
of connections and bytes) and every wait is bounded in time.
"""

from __future__ import annotations

import socket
import time
import urllib.request

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
    assert after[cpu] > before[cpu]

    # `shardstack reta` agrees, and a new table counts real moves
    rep = st.cli("reta")
    assert rep["moves"] == 0 and rep["reta"] == rss.make_reta(2)
    for p in ports:
        b = _bucket(st, p, ECHO)
        assert rep["buckets"][b]["frames"] > 0 and rep["buckets"][b]["worker"] == b % 2
    new = rss.make_reta(2)
    new[0], new[1] = 1, 0
    control.call(f"{st.run_dir}/control.sock", "set_reta", reta=new)
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
