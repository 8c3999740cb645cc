"""`shardstack serve` as a whole: real processes, a real TUN, the kernel as the peer.

Each test makes its own network namespace (198.18.0.0/15 addresses only),
starts `shardstack serve` inside it with `ip netns exec`, and talks to the
stack from the kernel side of the TUN in the same namespace. Client sockets
are created inside the namespace by switching this thread's network
namespace for the socket() call only (setns(2)); a socket keeps the
namespace it was made in.

Flows are pinned to workers deterministically: clients bind source ports
chosen with netio.rss, so the test knows which worker each connection must
land on and checks `shardstack ss` against it.

Every wait is bounded in count and time; every namespace is deleted with
whatever still runs in it, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from shardstack.netio import rss

from shardstack import netns

pytestmark = pytest.mark.interop

ECHO = 7
DISCARD = 9
WAIT = 20.0  # seconds: upper bound on any single wait for the stack
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, TUN)")


@contextlib.contextmanager
def in_netns(name: str):
    """Run the body with this thread in network namespace `name` (then back)."""
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise SystemExit("could not return to our network namespace")
    finally:
        os.close(target)
        os.close(home)


class StackCli:
    """`shardstack <command> --json` against the stack whose run dir is `run_dir`."""

    run_dir: str
    cli_timeout: ClassVar[float] = WAIT

    def cli(self, *args: str) -> dict | list:
        r = subprocess.run(
            [sys.executable, "-m", "shardstack", *args, "--run-dir", self.run_dir, "--json"],
            capture_output=True, text=True, timeout=self.cli_timeout,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stats(self) -> dict:
        return self.cli("stats")

    def ss(self) -> list[dict]:
        return self.cli("ss")


@dataclass
class Stack(StackCli):
    ns: netns.Netns
    proc: subprocess.Popen
    run_dir: str
    addr: str
    peer: str
    workers: int
    log: Path
    client_ns: str = ""
    reta: list[int] = field(default_factory=lambda: rss.make_reta(2))

    def hello(self) -> dict | None:
        from shardstack import control

        try:
            return control.call(Path(self.run_dir) / "control.sock", "hello", timeout=5)
        except OSError:
            return None

    def wait_ready(self, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log.read_text()}"
            h = self.hello()
            if h is not None and h["ready"]:
                return h
            time.sleep(0.05)
        raise AssertionError(f"stack not ready in {timeout}s:\n{self.log.read_text()}")

    def socket(self) -> socket.socket:
        with in_netns(self.client_ns or self.ns.name):
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def worker_of(self, sport: int, dport: int) -> int:
        """The worker that must own the flow peer:sport → addr:dport."""
        return rss.flow_to_worker(_ip(self.peer), _ip(self.addr), sport, dport, self.reta)

    def ports_for(self, n: int, dport: int, start: int) -> list[int]:
        """n client ports, alternating between workers 0 and 1 (deterministic)."""
        want = [[], []]
        p = start
        while min(len(w) for w in want) < (n + 1) // 2 and p < 65000:
            w = self.worker_of(p, dport)
            if len(want[w]) < (n + 1) // 2:
                want[w].append(p)
            p += 1
        out = [x for pair in zip(want[0], want[1], strict=True) for x in pair]
        return out[:n]

    def connect(self, dport: int, sport: int, timeout: float = 10.0) -> socket.socket:
        s = self.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.peer, sport))
        s.settimeout(timeout)
        s.connect((self.addr, dport))
        return s


def _ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


def _start(ns: netns.Netns, net, extra: list[str], workers: int = 2, device=None,
           run_dir: str | None = None) -> Stack:
    addr = str(net.network_address + 2)
    peer = str(net.network_address + 1)
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="sss-", dir="/tmp")
        os.rmdir(run_dir)  # serve creates it (mode 0700) and removes it at exit
    log = Path(tempfile.mkstemp(prefix="sss-log-", dir="/tmp")[1])
    dev = device or ["--tun", "sst0", "--peer", f"{peer}/{net.prefixlen}"]
    if "--rebalance" not in extra:
        # These tests place flows on chosen workers by the initial RETA (and
        # test_migrate moves buckets by hand): no automatic moves under them.
        extra = [*extra, "--rebalance", "off"]
    argv = [sys.executable, "-m", "shardstack", "serve", "--workers", str(workers), *dev,
            "--addr", f"{addr}/{net.prefixlen}", "--run-dir", run_dir,
            "--echo", str(ECHO), "--discard", str(DISCARD), *extra]
    with open(log, "wb") as f:
        proc = ns.popen(argv, stdout=f, stderr=subprocess.STDOUT)
    st = Stack(ns, proc, run_dir, addr, peer, workers, log, reta=rss.make_reta(workers))
    st.wait_ready()
    return st


def _stop(st: Stack) -> int:
    if st.proc.poll() is None:
        st.proc.send_signal(signal.SIGTERM)
        try:
            return st.proc.wait(15)
        except subprocess.TimeoutExpired:
            st.proc.kill()
            st.proc.wait(5)
            raise AssertionError("serve did not stop within 15 s of SIGTERM") from None
    return st.proc.returncode


@pytest.fixture
def stack():
    _require_root()
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="sss") as ns:
        st = _start(ns, netns.next_subnet(), [])
        try:
            yield st
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


# -- traffic helpers ------------------------------------------------------------------


@contextlib.contextmanager
def selecting(socks: list[socket.socket]) -> Iterator[selectors.BaseSelector]:
    """One selector watching every socket for reading and writing; the sockets are
    non-blocking until the block ends."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        yield sel
    finally:
        sel.close()
        for s in socks:
            s.setblocking(True)


def echo_many(socks: list[socket.socket], size: int, seed: int, timeout: float = 60.0) -> None:
    """Send `size` seeded random bytes on every socket at once and check each
    gets exactly its bytes back (non-blocking, one selector, bounded)."""
    rng = random.Random(seed)
    payload = {s: rng.randbytes(size) for s in socks}
    sent = dict.fromkeys(socks, 0)
    got = {s: bytearray() for s in socks}
    deadline = time.monotonic() + timeout
    pending = set(socks)
    with selecting(socks) as sel:
        while pending:
            assert time.monotonic() < deadline, (
                f"echo incomplete: {[len(got[s]) for s in socks]} of {size}")
            for key, mask in sel.select(timeout=1.0):
                s = key.fileobj
                if mask & selectors.EVENT_WRITE and sent[s] < size:
                    try:
                        sent[s] += s.send(payload[s][sent[s]:sent[s] + 65536])
                    except BlockingIOError:
                        pass
                    if sent[s] == size:
                        sel.modify(s, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    assert data, f"EOF after {len(got[s])} of {size} echoed bytes"
                    got[s] += data
                    if len(got[s]) >= size:
                        pending.discard(s)
                        sel.unregister(s)
    for s in socks:
        assert bytes(got[s]) == payload[s]


def close_all(socks):
    for s in socks:
        s.close()


def wait_for(pred, timeout: float = WAIT, what: str = "condition", every: float = 0.05):
    """pred()'s first true value, polled every `every` s for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# -- tests ----------------------------------------------------------------------------


def test_ping(stack):
    r = stack.ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", stack.addr], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 received" in r.stdout
    st = stack.stats()
    assert st["netio"]["counters"]["dispatch"]["icmp_replies"] >= 3


def _echo_spread(stack, n: int, size: int):
    ports = stack.ports_for(n, ECHO, 20000)
    socks = [stack.connect(ECHO, p) for p in ports]
    try:
        echo_many(socks, size, seed=n)
        conns = [c for c in stack.ss() if c.get("lport") == ECHO and c.get("rport") in ports]
        by_port = {c["rport"]: c["worker"] for c in conns}
        assert sorted(by_port) == sorted(ports), "ss must list every open connection"
        for p in ports:
            assert by_port[p] == stack.worker_of(p, ECHO), f"flow from port {p} on wrong worker"
        assert {0, 1} <= set(by_port.values())
        assert all(c["state"] == "ESTABLISHED" for c in conns)
    finally:
        close_all(socks)
    return ports


def test_echo_concurrent_fast(stack):
    _echo_spread(stack, 20, 64 * 1024)
    _check_counters(stack)


@pytest.mark.slow
def test_echo_concurrent_200(stack):
    _echo_spread(stack, 200, 64 * 1024)
    _check_counters(stack)


def _tun_queue_drops(stack) -> int:
    """Frames the kernel steered to one of the TUN's queues and then dropped
    because that queue was full (tun_net_xmit counts them in tx_dropped):
    the steering program counted them, no worker could read them. 0 when
    the stack is not on the default TUN."""
    r = stack.ns.run(["cat", "/sys/class/net/sst0/statistics/tx_dropped"], check=False)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


def _check_counters(stack):
    """netio's per-worker dispatch counts match what each worker took in,
    once traffic has settled (bounded wait: FIN/ACK stragglers): every frame
    steered to a worker was read by it, or was dropped by the kernel at a
    full TUN queue (a loaded host; TCP retransmits those) and counted there."""

    def settled():
        st = stack.stats()
        disp = st["netio"]["counters"]["dispatch"]["per_worker"]
        dropped = st["netio"]["counters"]["netio"]["zmq_dropped"]
        fin = [w["counters"]["frames_in"] for w in st["workers"]]
        missing = [d - x - f for d, x, f in zip(disp, dropped, fin, strict=True)]
        ok = min(missing) >= 0 and sum(missing) == _tun_queue_drops(stack)
        return st if ok else None

    st = wait_for(settled, what="netio dispatch == worker frames_in")
    for w in st["workers"]:
        c = w["counters"]
        assert c["frames_in"] > 0 and c["frames_out"] > 0
        assert w["proc"]["pid"] > 0 and w["proc"]["rss"] > 0
    assert st["supervisor"]["proc"]["pid"] == stack.hello()["pid"]


def test_discard_swallows(stack):
    s = stack.connect(DISCARD, stack.ports_for(1, DISCARD, 30000)[0])
    try:
        data = random.Random(9).randbytes(1 << 20)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096) == b""  # nothing comes back, then the server's FIN
    finally:
        s.close()

    def swallowed():
        st = stack.stats()
        return sum(w["counters"]["services"]["bytes_in"] for w in st["workers"]) >= len(data)

    wait_for(swallowed, what="discard service counted 1 MiB")


def test_kill_worker_restarts_and_others_survive(stack):
    ports = stack.ports_for(8, ECHO, 40000)
    socks = [stack.connect(ECHO, p) for p in ports]
    try:
        echo_many(socks, 4096, seed=1)
        before = stack.stats()
        victim = before["workers"][1]["proc"]["pid"]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def replaced():
            w = stack.stats()["workers"][1]
            return w if w["proc"].get("pid") not in (None, victim) else None

        w1 = wait_for(replaced, timeout=1.0, what="worker 1 replaced within a second")
        assert w1["restarts"] == 1
        wait_for(lambda: stack.hello()["ready"], what="restarted worker ready")
        assert time.monotonic() - t0 < WAIT
        survivors = [s for s, p in zip(socks, ports, strict=True) if stack.worker_of(p, ECHO) == 0]
        assert len(survivors) == 4
        echo_many(survivors, 64 * 1024, seed=2)  # worker 0's connections are untouched
        fresh_ports = stack.ports_for(6, ECHO, 41000)
        fresh = [stack.connect(ECHO, p) for p in fresh_ports]
        try:
            echo_many(fresh, 16 * 1024, seed=3)  # both workers accept new connections
        finally:
            close_all(fresh)
        st = stack.stats()
        assert st["workers"][0]["proc"]["pid"] == before["workers"][0]["proc"]["pid"]
        assert st["workers"][0]["restarts"] == 0
    finally:
        close_all(socks)


def test_sigterm_leaves_nothing(stack):
    st = stack.stats()
    pids = [st["netio"]["proc"]["pid"]] + [w["proc"]["pid"] for w in st["workers"]]
    pids.append(stack.proc.pid)
    assert "sst0" in stack.ns.links()
    assert _stop(stack) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(stack.run_dir)
    assert "sst0" not in stack.ns.links()
    assert stack.ns.pids() == []


def test_second_serve_same_run_dir_is_refused(stack):
    r = stack.ns.run([sys.executable, "-m", "shardstack", "serve", "--tun", "sst1",
                      "--addr", f"{stack.addr}/24", "--run-dir", stack.run_dir], check=False)
    assert r.returncode == 1
    assert os.strerror(errno.EBUSY) in r.stderr or "another" in r.stderr
    assert stack.hello()["ready"]  # the first one is unharmed


SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM, ETHTOOL_STSO, ETHTOOL_SGSO = 0x17, 0x1F, 0x24


def _offloads_off(ns: str, ifname: str) -> None:
    """The kernel peer sends finished frames: no partial checksums, no TSO/GSO
    super-frames (what `ethtool -K IF tx off tso off gso off` does; no ethtool
    binary needed)."""
    import fcntl
    import struct

    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for cmd in (ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_STXCSUM):
            val = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
            ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(val))
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


def nft_loss(ns: netns.Netns, percent: int) -> None:
    """Random TCP loss in the kernel peer's namespace: on what it sends (output) and
    on what it receives (input), independent of the stack's own seeded RNG."""
    ns.run(["nft", "add", "table", "inet", "t"])
    for hook in ("output", "input"):
        ns.run(["nft", "add", "chain", "inet", "t", hook,
                f"{{ type filter hook {hook} priority 0; }}"])
        ns.run(["nft", "add", "rule", "inet", "t", hook, "meta", "l4proto", "tcp",
                "numgen", "random", "mod", "100", "<", str(percent), "counter", "drop"])


def nft_drops(ns: netns.Netns) -> dict[str, int]:
    """What nft_loss dropped so far, by hook ("output", "input")."""
    out = json.loads(ns.run(["nft", "-j", "list", "table", "inet", "t"]).stdout)
    drops = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        for e in rule["expr"] if rule else ():
            if "counter" in e:
                drops[rule["chain"]] = e["counter"]["packets"]
    return drops


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_packet_mode_echo_over_veth(offload):
    """AF_PACKET on one end of a veth pair; the kernel in another netns on the other.

    With offload the kernel's TSO super-frames and partial checksums arrive
    whole (PACKET_VNET_HDR); without it the peer is told to send finished
    frames, as a NIC without offloads would."""
    _require_root()
    with netns.netns(prefix="sss") as a, netns.netns(prefix="sss") as b:
        net = netns.next_subnet()
        netns.run(["ip", "link", "add", "vsa", "netns", a.name, "type", "veth",
                   "peer", "name", "vsb", "netns", b.name])
        a.up("vsa")
        b.up("vsb")
        b.add_addr("vsb", f"{net.network_address + 1}/{net.prefixlen}")
        if not offload:
            _offloads_off(b.name, "vsb")
        st = _start(a, net, [] if offload else ["--no-offload"], device=["--packet", "vsa"])
        st.client_ns = b.name
        try:
            _echo_spread(st, 10, 64 * 1024)
            _check_counters(st)
            if offload:
                assert sum(w["counters"]["gso_out"] for w in st.stats()["workers"]) > 0
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def test_control_bind_listen_release_through_workers(stack):
    """The supervisor's control.sock: bind/listen install an app listener on
    every worker (appgate), survive a worker restart, and go with the app."""
    from shardstack import control

    pytest.importorskip("shardstack.appgate")
    ctl_path = Path(stack.run_dir) / "control.sock"
    app = control.ControlClient(ctl_path)
    other = control.ControlClient(ctl_path)
    lpath = str(Path(stack.run_dir) / "l" / "t.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(lpath)
    lsock.listen(16)
    lsock.settimeout(10)
    try:
        b = app.call("bind", addr="0.0.0.0", port=8080, reuseaddr=True, reuseport=False)
        assert b["port"] == 8080 and b["addr"] == "0.0.0.0"
        for port, addr, code in ((8080, "0.0.0.0", errno.EADDRINUSE),  # taken
                                 (ECHO, stack.addr, errno.EADDRINUSE),  # the echo service's
                                 (8081, "198.18.255.254", errno.EADDRNOTAVAIL)):  # not ours
            with pytest.raises(OSError) as ei:
                other.call("bind", addr=addr, port=port)
            assert ei.value.errno == code
        with pytest.raises(OSError) as ei:  # another app's bind_id is not ours to use
            other.call("listen", bind_id=b["bind_id"], backlog=16, path=lpath)
        assert ei.value.errno == errno.EBADF
        app.call("listen", bind_id=b["bind_id"], backlog=16, path=lpath)

        def round_trip(sport: int) -> None:
            tcp = stack.connect(8080, sport)
            u, _ = lsock.accept()
            with tcp, u:
                u.settimeout(10)
                tcp.sendall(b"ping %d" % sport)
                assert u.recv(100) == b"ping %d" % sport
                u.sendall(b"pong")
                assert tcp.recv(100) == b"pong"

        ports = stack.ports_for(2, 8080, 50000)
        assert {stack.worker_of(p, 8080) for p in ports} == {0, 1}
        for p in ports:
            round_trip(p)
        # a restarted worker gets the listener again
        victim = stack.stats()["workers"][1]["proc"]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: stack.stats()["workers"][1]["proc"].get("pid") not in (None, victim)
                 and stack.hello()["ready"], what="worker 1 back")
        wait_for(lambda: stack.stats()["workers"][1]["counters"]["appgate"] is not None,
                 what="worker 1 answering")
        round_trip(stack.ports_for(2, 8080, 51000)[1])
        # the app goes away: its bind is released everywhere, the port refuses
        app.close()

        def refused() -> bool:
            try:
                stack.connect(8080, stack.ports_for(1, 8080, 52000)[0], timeout=2).close()
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # Caught mid-removal: the handshake completed, then the worker found
                # the app's listener gone and reset the child. Not refused yet.
                return False
            return False

        wait_for(refused, what="port 8080 refused after the app hung up")
        # The hang-up is noticed asynchronously (as a closing fd would be): the port
        # is free again once every worker has dropped the listener.
        b2 = wait_for(lambda: _try_bind(other, stack.addr, 8080), what="port 8080 free again")
        assert b2["bind_id"] != b["bind_id"]
    finally:
        app.close()
        other.close()
        lsock.close()
        os.unlink(lpath)


@pytest.mark.slow
def test_echo_under_impairment():
    """--impair: seeded loss, duplication and reordering in both directions
    (netio's RX, each worker's TX); TCP still delivers every byte in order."""
    _require_root()
    with netns.netns(prefix="sss") as ns:
        spec = "loss=0.02,dup=0.01,reorder=0.02,seed=5"
        # MTU-sized frames (no offload): thousands of them, so every fault occurs
        st = _start(ns, netns.next_subnet(), ["--impair", spec, "--no-offload"])
        try:
            _echo_spread(st, 10, 64 * 1024)
            s = st.stats()
            rx = s["netio"]["counters"]["impair"]["rx"]
            tx = [w["counters"]["impair"] for w in s["workers"]]
            assert rx["lost"] > 0 and sum(t["lost"] for t in tx) > 0, (rx, tx)
            assert sum(w["shard"]["retrans_segs"] for w in s["workers"]) > 0
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)


def test_pcap_records_traffic(tmp_path):
    _require_root()
    pcap = tmp_path / "cap.pcap"
    with netns.netns(prefix="sss") as ns:
        st = _start(ns, netns.next_subnet(), ["--pcap", str(pcap)])
        try:
            _echo_spread(st, 2, 4096)
        finally:
            _stop(st)
            st.log.unlink(missing_ok=True)
    from scapy.layers.inet import IP, TCP
    from scapy.utils import RawPcapReader

    with RawPcapReader(str(pcap)) as r:  # LINKTYPE_RAW: each record is an IPv4 packet
        pkts = [IP(data) for data, _meta in r]
    tcp = [p[TCP] for p in pkts if TCP in p]
    assert any(t.dport == ECHO and t.flags == "S" for t in tcp)  # the kernel's SYNs (RX)
    assert any(t.sport == ECHO and t.flags == "SA" for t in tcp)  # workers' SYN-ACKs (TX)
    assert len({(t.sport, t.dport) for t in tcp}) == 4  # 2 connections, both directions


def test_supervisor_killed_children_follow(stack):
    """kill -9 of the supervisor: the children get SIGTERM from the kernel
    (PR_SET_PDEATHSIG) and exit, the TUN goes with its last fd, and a new
    serve can take over the run directory."""
    st = stack.stats()
    kids = [st["netio"]["proc"]["pid"]] + [w["proc"]["pid"] for w in st["workers"]]
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(5)

    def all_gone() -> bool:
        for pid in kids:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                pass
        return True

    wait_for(all_gone, timeout=10, what="children exit after the supervisor died")
    wait_for(lambda: "sst0" not in stack.ns.links(), timeout=10, what="TUN gone")
    # the dead serve left only stale endpoints (its children removed theirs)
    assert set(os.listdir(stack.run_dir)) <= {"control.sock", "serve.lock", "l"}
    net = ipaddress.ip_interface(f"{stack.addr}/24").network
    again = _start(stack.ns, net, [], run_dir=stack.run_dir)  # takes the directory over
    try:
        r = stack.ns.run(["ping", "-c", "1", "-W", "2", stack.addr], check=False)
        assert r.returncode == 0, r.stdout
        socks = [again.connect(ECHO, p) for p in again.ports_for(2, ECHO, 45000)]
        try:
            echo_many(socks, 4096, seed=4)
        finally:
            close_all(socks)
    finally:
        _stop(again)
        again.log.unlink(missing_ok=True)
    assert os.listdir(stack.run_dir) == []  # adopted, not created: emptied, kept
    os.rmdir(stack.run_dir)


def _try_bind(client, addr, port):
    try:
        return client.call("bind", addr=addr, port=port)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        return None
