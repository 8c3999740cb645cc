"""IPv6 end to end against the Linux kernel (issue 14): `curl -6` fetching
from `python -m http.server --bind ::` running unmodified under `shardstack
run`, over TUN and over AF_PACKET (where the stack answers and sends NDP);
`ping -6` answered by the stack; the stack connecting out to a kernel IPv6
server; dual stack (one `::` listener taking IPv4 peers as ::ffff:a.b.c.d);
and a transfer under seeded loss, its SHA-256 checked.

Addresses: 2001:db8::/32 (documentation) and 198.18.0.0/15, only inside the
namespaces each test creates (shardstack.netns); every wait is bounded.
The stack's own counters (`shardstack stats`: the shard's passive/active
opens, netio's ICMPv6 replies and NDP tables) prove the traffic went
through it and not through a kernel socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shardstack import netns

pytestmark = pytest.mark.interop

PY = sys.executable
WAIT = 30.0  # s: bound on any single wait
HTTP_PORT = 8000
WORKERS = 2


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, TUN)")
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"


@dataclass
class V6Stack:
    """A dual-stack `shardstack serve` (`sns`) and its kernel peer (`kns`)."""

    kind: str  # "tun" or "packet"
    sns: netns.Netns
    kns: netns.Netns
    addr6: str  # the stack's
    peer6: str  # the kernel's
    addr4: str
    peer4: str
    tmp: Path
    run_dir: str = ""
    proc: subprocess.Popen | None = None
    apps: list[subprocess.Popen] = field(default_factory=list)

    def start(self, extra: list[str], dev: list[str], addrs: list[str]) -> None:
        self.run_dir = str(self.tmp / "run")
        argv = [PY, "-m", "shardstack", "serve", "--workers", str(WORKERS), *dev, *addrs,
                "--run-dir", self.run_dir, *extra]
        with open(self.tmp / "serve.log", "wb") as log:
            self.proc = self.sns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited:\n{self.log()}"
            h = self._cli_quiet("stats")
            if h is not None and all(w.get("counters") for w in h.get("workers", [])) \
                    and h.get("workers"):
                return
            time.sleep(0.1)
        raise AssertionError(f"stack not ready:\n{self.log()}")

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-4000:]

    def _cli_quiet(self, *args: str) -> dict | list | None:
        r = subprocess.run([PY, "-m", "shardstack", *args, "--run-dir", self.run_dir, "--json"],
                           capture_output=True, text=True, timeout=WAIT)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def cli(self, *args: str):
        out = self._cli_quiet(*args)
        assert out is not None, f"shardstack {args} failed\n{self.log()}"
        return out

    def shard_sum(self, key: str) -> int:
        return sum(w["shard"][key] for w in self.cli("stats")["workers"])

    def netio(self) -> dict:
        return self.cli("stats")["netio"]["counters"]

    def run_app(self, argv: list[str], name: str) -> subprocess.Popen:
        """An unmodified program on the stack (`shardstack run`)."""
        with open(self.tmp / f"{name}.log", "wb") as log:
            p = self.sns.popen([PY, "-m", "shardstack", "run", "--run-dir", self.run_dir, "--",
                                *argv], stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp / "www")
        self.apps.append(p)
        return p

    def app_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_listening(self, port: int, app: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert app.poll() is None, f"{name} exited:\n{self.app_log(name)}"
            rows = self.cli("ss")
            if any(r["state"] == "LISTEN" and r["lport"] == port for r in rows):
                return
            time.sleep(0.1)
        raise AssertionError(f"nothing listens on {port}:\n{self.app_log(name)}")

    def stop(self) -> None:
        for p in self.apps:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def v6_stack(kind: str, extra: list[str] = ()) -> Iterator[V6Stack]:
    """A dual-stack serve on a TUN (the kernel peer in the same namespace) or
    on a veth by AF_PACKET (the kernel peer in a namespace of its own)."""
    _require_root()
    net4, net6 = netns.next_subnet(), netns.next_subnet6()
    a4, p4 = str(net4.network_address + 2), str(net4.network_address + 1)
    a6, p6 = str(net6.network_address + 2), str(net6.network_address + 1)
    addrs = ["--addr", f"{a4}/24", "--addr", f"{a6}/64"]
    with tempfile.TemporaryDirectory(prefix="ss6-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        if kind == "tun":
            with netns.netns(prefix="sssix") as ns:
                ns.ip("link", "set", "lo", "up")
                st = V6Stack(kind, ns, ns, a6, p6, a4, p4, Path(tmp))
                try:
                    st.start(list(extra), ["--tun", "ss6t", "--peer", f"{p4}/24",
                                           "--peer", f"{p6}/64"], addrs)
                    yield st
                finally:
                    st.stop()
        else:
            with netns.client_server_pair(prefix="sssix", server_addr=False, net=net4,
                                          ipv6=True) as pair:
                a6, p6 = pair.server_ip6, pair.client_ip6
                addrs[3] = f"{a6}/64"
                st = V6Stack(kind, pair.server, pair.client, a6, p6, a4, p4, Path(tmp))
                try:
                    st.start(list(extra), ["--packet", "veth0"], addrs)
                    yield st
                finally:
                    st.stop()


def _curl(st: V6Stack, url: str, out: Path, flag: str = "-6", timeout: int = 60) -> None:
    r = st.kns.run(["curl", flag, "-sS", "--fail", "-m", str(timeout), "-o", str(out), url],
                   check=False, timeout=timeout + 10)
    assert r.returncode == 0, f"curl {url}: {r.stderr}\n{st.log()}"


def _blob(st: V6Stack, name: str, size: int, seed: int) -> str:
    data = hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)
    (st.tmp / "www" / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", ["tun", "packet"])
def test_curl6_from_the_kernel_to_http_server_on_the_stack(kind):
    """The issue's "Done when": `curl -6` against `python -m http.server
    --bind ::` on the stack works from the kernel peer; the same `::`
    listener takes IPv4 (dual stack), its peer shown v4-mapped; `ping -6`
    is answered by the stack."""
    with v6_stack(kind) as st:
        want = _blob(st, "blob.bin", 3 << 20, 1)
        app = st.run_app([PY, "-m", "http.server", "--bind", "::", str(HTTP_PORT)], "http")
        st.wait_listening(HTTP_PORT, app, "http")
        rows = [r for r in st.cli("ss") if r["lport"] == HTTP_PORT]
        # one AF_INET6 `::` listener per worker, shown as Linux's ss shows it
        assert [r["laddr"] for r in rows] == ["[::]"] * WORKERS, rows
        opens = st.shard_sum("passive_opens")
        out = st.tmp / "got6.bin"
        _curl(st, f"http://[{st.addr6}]:{HTTP_PORT}/blob.bin", out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want
        _curl(st, f"http://{st.addr4}:{HTTP_PORT}/blob.bin", st.tmp / "got4.bin", "-4")
        assert hashlib.sha256((st.tmp / "got4.bin").read_bytes()).hexdigest() == want
        # both connections were the stack's (the kernel has no such listener)
        assert st.shard_sum("passive_opens") - opens == 2
        # IPv6 super-segments went out whole (GSO TCPV6), none refused by the device
        workers = st.cli("stats")["workers"]
        assert not any(w["counters"]["drops"].get("DEV_TX") for w in workers), workers
        assert sum(w["counters"]["gso_out"] for w in workers) > 0
        # direct RX: the kernel's steering program (eBPF on TUN, cBPF fanout
        # on AF_PACKET) put the IPv6 TCP frames on the workers, netio saw none
        n = st.netio()
        assert n["rx"] == "direct" and n["dispatch"]["tcp"] == 0, n
        assert sum(n["steered"]["delivered"][:WORKERS]) > 0, n
        log = st.app_log("http")
        assert f'{st.peer6} - - ' in log and f'::ffff:{st.peer4} - - ' in log, log
        # ping -6: answered by netio, the kernel peer sees no loss
        replies = st.netio()["dispatch"]["icmp_replies"]
        r = st.kns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", st.addr6],
                       check=False, timeout=20)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert st.netio()["dispatch"]["icmp_replies"] - replies == 3
        if kind == "packet":
            # NDP: the kernel resolved us (NS answered with an NA), and the
            # stack holds the kernel in its IPv6 neighbour table
            nd = st.netio()
            assert nd["dispatch"]["ndisc_na_sent"] >= 1, nd
            assert nd["neigh6"]["entries"] >= 1, nd
            neigh = st.kns.run(["ip", "-6", "neigh", "show", st.addr6]).stdout
            assert "lladdr" in neigh, neigh


KERNEL_SERVER = """
import hashlib, socket, sys
data = hashlib.shake_256(b"kernel").digest(2 << 20)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("ready", flush=True)
s.settimeout(60)
c, peer = s.accept()
c.settimeout(60)  # bounded: accept() hands back a blocking socket
c.sendall(data)
c.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = c.recv(65536)
    if not b:
        break
    got += b
print(peer[0], hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest(), flush=True)
"""

STACK_CLIENT = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
print(s.family == socket.AF_INET6, s.getsockname()[0], len(s.getsockname()), flush=True)
got = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    got += b
s.sendall(got[::-1])
s.close()
print(hashlib.sha256(got).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("kind", ["tun", "packet"])
def test_stack_connects_out_to_a_kernel_ipv6_server(kind):
    """The other direction: a program on the stack connects to the kernel's
    IPv6 listener, downloads 2 MiB and sends it back reversed; both ends'
    SHA-256 agree. On AF_PACKET the stack must resolve the kernel first (its
    NS to the solicited-node group, the kernel's NA)."""
    with v6_stack(kind) as st:
        (st.tmp / "server.py").write_text(KERNEL_SERVER)
        (st.tmp / "www" / "client.py").write_text(STACK_CLIENT)
        srv = st.kns.popen([PY, str(st.tmp / "server.py"), st.peer6, "9100"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert srv.stdout.readline().strip() == "ready"
            actives = st.shard_sum("active_opens")
            cli = st.run_app([PY, "client.py", st.peer6, "9100"], "client")
            assert cli.wait(90) == 0, st.app_log("client")
            out = srv.communicate(timeout=30)[0].split()
        finally:
            if srv.poll() is None:
                srv.kill()
        peer, sent, back = out[0], out[1], out[2]
        assert peer == st.addr6  # the kernel saw the stack's IPv6 address
        lines = st.app_log("client").split()
        assert lines[:3] == ["True", st.addr6, "4"], lines  # AF_INET6, a 4-tuple name
        assert lines[3] == sent
        want_back = hashlib.sha256(hashlib.shake_256(b"kernel").digest(2 << 20)[::-1])
        assert back == want_back.hexdigest()
        assert st.shard_sum("active_opens") - actives == 1
        if kind == "packet":
            n6 = st.netio()["neigh6"]
            assert n6["probes_bcast"] >= 1 and n6["entries"] >= 1, n6


@pytest.mark.parametrize("kind", ["tun", "packet"])
def test_transfer_under_loss_over_ipv6(kind):
    """Seeded loss and reordering in both directions (--impair: netio's RX,
    every worker's TX; on AF_PACKET NDP frames too) on an IPv6 download:
    every byte arrives, in order."""
    spec = "loss=0.02,reorder=0.02,seed=11"
    with v6_stack(kind, ["--impair", spec, "--no-offload"]) as st:
        want = _blob(st, "lossy.bin", 4 << 20, 2)
        app = st.run_app([PY, "-m", "http.server", "--bind", "::", str(HTTP_PORT)], "http")
        st.wait_listening(HTTP_PORT, app, "http")
        out = st.tmp / "lossy.got"
        _curl(st, f"http://[{st.addr6}]:{HTTP_PORT}/lossy.bin", out, timeout=120)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want
        s = st.cli("stats")
        rx = s["netio"]["counters"]["impair"]["rx"]
        tx = [w["counters"]["impair"] for w in s["workers"]]
        assert rx["lost"] > 0 and sum(t["lost"] for t in tx) > 0, (rx, tx)
        assert sum(w["shard"]["retrans_segs"] for w in s["workers"]) > 0


UDP6_SERVER = """
import socket, socketserver

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data + b" from " + repr(self.client_address).encode(), self.client_address)

class Server(socketserver.UDPServer):
    address_family = socket.AF_INET6

srv = Server(("::", 5400), Echo)
print("listening", srv.server_address, flush=True)
srv.serve_forever()
"""

UDP6_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(b"up", (sys.argv[1], 5401))
data, addr = s.recvfrom(2048)
print(data.decode(), addr, s.getsockname()[0], flush=True)
"""


UV6_ECHO = """
import asyncio
import uvloop

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data.upper() + repr(addr).encode(), addr)

async def main():
    t, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Echo, local_addr=("::", 5402))
    print("listening", t.get_extra_info("sockname"), flush=True)
    await asyncio.sleep(60)

uvloop.run(main())
"""


def _udp_total(st: V6Stack, key: str) -> int:
    return sum((w["counters"].get("udp") or {}).get(key, 0) for w in st.cli("stats")["workers"])


def test_udp_over_ipv6_both_ways():
    """AF_INET6 UDP on the stack: a `socketserver.UDPServer` on `::` answers
    the kernel over IPv6 and over IPv4 (its peer v4-mapped, as on Linux), and
    a program on the stack sends to a kernel IPv6 UDP echo; the stack's UDP
    counters count every datagram."""
    with v6_stack("tun") as st:
        (st.tmp / "www" / "srv.py").write_text(UDP6_SERVER)
        (st.tmp / "www" / "cli.py").write_text(UDP6_CLIENT)
        before = _udp_total(st, "to_apps")
        app = st.run_app([PY, "srv.py"], "udp6")
        deadline = time.monotonic() + WAIT
        while "listening" not in st.app_log("udp6") and time.monotonic() < deadline:
            assert app.poll() is None, st.app_log("udp6")
            time.sleep(0.05)
        assert "('::', 5400, 0, 0)" in st.app_log("udp6"), st.app_log("udp6")
        r = st.kns.run([PY, "-c", f"""
import socket
for fam, dst in ((socket.AF_INET6, "{st.addr6}"), (socket.AF_INET, "{st.addr4}")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"hi", (dst, 5400))
    print(s.recvfrom(2048)[0].decode())
"""], check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr + st.app_log("udp6")
        six, four = r.stdout.splitlines()
        assert six.startswith(f"hi from ('{st.peer6}', ") and six.endswith(", 0, 0)"), six
        assert four.startswith(f"hi from ('::ffff:{st.peer4}', "), four
        kecho = st.kns.popen([PY, "-c", f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("{st.peer6}", 5401))
s.settimeout(30)
d, a = s.recvfrom(2048)
s.sendto(d + b" back", a)
print(a[0], flush=True)
"""], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            cli = st.run_app([PY, "cli.py", st.peer6], "udp6cli")
            assert cli.wait(30) == 0, st.app_log("udp6cli")
            seen = kecho.communicate(timeout=30)[0].strip()
        finally:
            if kecho.poll() is None:
                kecho.kill()
        assert seen == st.addr6  # the datagram left from the stack's IPv6 address
        line = st.app_log("udp6cli").strip()
        # an autobound unconnected socket's name is the wildcard, as on Linux
        assert line == f"up back ('{st.peer6}', 5401, 0, 0) ::", line
        assert _udp_total(st, "to_apps") - before == 3
        # uvloop's create_datagram_endpoint on `::` (the hook: shim/uvhook.py)
        (st.tmp / "www" / "uv6.py").write_text(UV6_ECHO)
        uv = st.run_app([PY, "uv6.py"], "uv6")
        deadline = time.monotonic() + WAIT
        while "listening" not in st.app_log("uv6") and time.monotonic() < deadline:
            assert uv.poll() is None, st.app_log("uv6")
            time.sleep(0.05)
        assert "('::', 5402, 0, 0)" in st.app_log("uv6"), st.app_log("uv6")
        r = st.kns.run([PY, "-c", f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"uv", ("{st.addr6}", 5402))
print(s.recvfrom(2048)[0].decode())
"""], check=False, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith(f"UV('{st.peer6}', "), \
            r.stdout + r.stderr + st.app_log("uv6")
        assert _udp_total(st, "to_apps") - before == 4


def test_ipv6_over_af_packet_through_a_lossy_bridge():
    """`shardstack impair-bridge` between the kernel and the stack on
    AF_PACKET (netns.bridged_pair with ipv6=True): NDP, the handshake and a
    4 MiB `curl -6` download all cross a link that loses and reorders
    frames both ways; the file's SHA-256 matches."""
    _require_root()
    with tempfile.TemporaryDirectory(prefix="ss6-") as tmp, \
            netns.bridged_pair(prefix="sssix", server_addr=False, ipv6=True) as pair:
        (Path(tmp) / "www").mkdir()
        st = V6Stack("packet", pair.server, pair.client, pair.server_ip6, pair.client_ip6,
                     pair.server_ip, pair.client_ip, Path(tmp))
        bridge = pair.bridge.popen(
            [PY, "-m", "shardstack", "impair-bridge", pair.bridge_a, pair.bridge_b,
             "--loss", "0.02", "--reorder", "0.02", "--seed", "6", "--seconds", "150",
             "--interval", "0", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            assert bridge.poll() is None, bridge.communicate()[1]
            st.start(["--no-offload"], ["--packet", "veth0"],
                     ["--addr", f"{pair.server_ip}/24", "--addr", f"{pair.server_ip6}/64"])
            want = _blob(st, "far.bin", 4 << 20, 3)
            app = st.run_app([PY, "-m", "http.server", "--bind", "::", str(HTTP_PORT)], "http")
            st.wait_listening(HTTP_PORT, app, "http")
            out = st.tmp / "far.got"
            _curl(st, f"http://[{st.addr6}]:{HTTP_PORT}/far.bin", out, timeout=120)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == want
            assert st.netio()["dispatch"]["ndisc_na_sent"] >= 1
            assert st.shard_sum("retrans_segs") > 0
        finally:
            st.stop()
            bridge.send_signal(signal.SIGTERM)
            out_text, _err = bridge.communicate(timeout=20)
        counters = json.loads(out_text.strip().splitlines()[-1])["counters"]
        assert all(c["lost"] > 0 for c in counters.values()), counters


def test_stack_to_its_own_ipv6_address():
    """A program on the stack fetching from a server on the stack over the
    stack's own IPv6 address: the frames never reach the device (the
    worker's local delivery, as Linux routes them via lo)."""
    with v6_stack("tun") as st:
        want = _blob(st, "self.bin", 1 << 20, 4)
        app = st.run_app([PY, "-m", "http.server", "--bind", "::", str(HTTP_PORT)], "http")
        st.wait_listening(HTTP_PORT, app, "http")
        (st.tmp / "www" / "get.py").write_text(
            "import hashlib, sys, urllib.request\n"
            "d = urllib.request.urlopen(sys.argv[1], timeout=30).read()\n"
            "print(hashlib.sha256(d).hexdigest(), flush=True)\n")
        before = st.cli("stats")["workers"]
        cli = st.run_app([PY, "get.py", f"http://[{st.addr6}]:{HTTP_PORT}/self.bin"], "get")
        assert cli.wait(60) == 0, st.app_log("get")
        assert st.app_log("get").strip() == want
        after = st.cli("stats")["workers"]
        assert sum(w["shard"]["active_opens"] for w in after) - \
            sum(w["shard"]["active_opens"] for w in before) == 1
        assert sum(w["shard"]["passive_opens"] for w in after) - \
            sum(w["shard"]["passive_opens"] for w in before) == 1


def test_ipv6_only_stack():
    """`serve --addr 2001:db8::2/64` alone: an IPv6-only stack serves curl -6
    (services and the shim need no IPv4 address), and an IPv4 connect from
    a program on it fails at once with ENETUNREACH (no IPv4 route), not a
    hang."""
    _require_root()
    net6 = netns.next_subnet6()
    a6, p6 = str(net6.network_address + 2), str(net6.network_address + 1)
    with tempfile.TemporaryDirectory(prefix="ss6-") as tmp, netns.netns(prefix="sssix") as ns:
        (Path(tmp) / "www").mkdir()
        st = V6Stack("tun", ns, ns, a6, p6, "", "", Path(tmp))
        try:
            st.start(["--echo", "7"], ["--tun", "ss6t", "--peer", f"{p6}/64"],
                     ["--addr", f"{a6}/64"])
            want = _blob(st, "only6.bin", 256 << 10, 5)
            app = st.run_app([PY, "-m", "http.server", "--bind", "::", str(HTTP_PORT)], "http")
            st.wait_listening(HTTP_PORT, app, "http")
            _curl(st, f"http://[{a6}]:{HTTP_PORT}/only6.bin", st.tmp / "only6.got")
            assert hashlib.sha256((st.tmp / "only6.got").read_bytes()).hexdigest() == want
            r = ns.run([PY, "-c", f"""
import socket
s = socket.create_connection(("{a6}", 7), timeout=5)
s.sendall(b"echo6")
print(s.recv(100).decode())
"""], check=False, timeout=20)
            assert r.stdout.strip() == "echo6", r.stdout + r.stderr
            (st.tmp / "www" / "v4.py").write_text(
                "import errno, socket, time\n"
                "t = time.monotonic()\n"
                "try:\n"
                "    socket.create_connection(('198.18.0.9', 80), timeout=10)\n"
                "except OSError as e:\n"
                "    print(errno.errorcode.get(e.errno), round(time.monotonic() - t, 1))\n")
            cli = st.run_app([PY, "v4.py"], "v4")
            assert cli.wait(30) == 0, st.app_log("v4")
            code, secs = st.app_log("v4").split()
            assert code == "ENETUNREACH" and float(secs) < 2, st.app_log("v4")
        finally:
            st.stop()


DNS6_SERVER = """
import socket, socketserver
import dns.message, dns.rrset

class Dns(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "AAAA", "2001:db8::77"))
        sock.sendto(r.to_wire(), self.client_address)

class Server(socketserver.UDPServer):
    address_family = socket.AF_INET6

srv = Server(("::", 5353), Dns)
print("listening", flush=True)
srv.serve_forever()
"""


def test_dnspython_resolves_over_ipv6_against_a_server_on_the_stack():
    """dnspython (unmodified) in the kernel's namespace resolves AAAA records
    from a DNS server on the stack's IPv6 address, over UDP/IPv6."""
    with v6_stack("tun") as st:
        (st.tmp / "www" / "dns6.py").write_text(DNS6_SERVER)
        before = _udp_total(st, "to_apps")
        app = st.run_app([PY, "dns6.py"], "dns6")
        deadline = time.monotonic() + WAIT
        while "listening" not in st.app_log("dns6") and time.monotonic() < deadline:
            assert app.poll() is None, st.app_log("dns6")
            time.sleep(0.05)
        r = st.kns.run([PY, "-c", f"""
import dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = ["{st.addr6}"]
r.port = 5353
for name in ("a.shardstack.test", "b.shardstack.test"):
    print(name, [x.address for x in r.resolve(name, "AAAA", lifetime=5)])
"""], check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr + st.app_log("dns6")
        assert r.stdout.splitlines() == ["a.shardstack.test ['2001:db8::77']",
                                         "b.shardstack.test ['2001:db8::77']"], r.stdout
        assert _udp_total(st, "to_apps") - before >= 2
