"""UDP on the stack, unmodified programs under `shardstack run` (issue 14).

One stack for the module (`module_env`: `shardstack serve` on a TUN in a
fresh namespace, 198.18.0.0/15). The kernel side of the TUN is the peer.
Each test checks with the stack's own counters (`shardstack stats`:
workers' `udp` counters, the shard's UDP MIB and the gate's hand-overs)
that the datagrams went through the stack.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.interop

N = 5


def _udp(env) -> dict[str, int]:
    total: dict[str, int] = {}
    for w in env.stats()["workers"]:
        for k, v in (w.get("counters", {}).get("udp") or {}).items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


UDP_ECHO_SERVER = '''
import socketserver

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data + f" from {self.client_address[0]}".encode(), self.client_address)

srv = socketserver.UDPServer(("0.0.0.0", 5300), Echo)
print("listening", srv.server_address, flush=True)
srv.serve_forever()
'''


def test_socketserver_udp_echo(shared_env):
    env = shared_env
    p = env.app_py(UDP_ECHO_SERVER, "udp_echo")
    line = env.wait_for_line("udp_echo", "listening", p)
    assert "('0.0.0.0', 5300)" in line, line
    before = _udp(env)
    out = env.kernel_py(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        for i in range({N}):
            msg = b"ping %d" % i
            s.sendto(msg, ("{env.addr}", 5300))
            data, addr = s.recvfrom(2048)
            assert addr == ("{env.addr}", 5300), addr
            print(data.decode())
        """)
    after = _udp(env)
    lines = out.splitlines()
    assert lines == [f"ping {i} from {env.peer}" for i in range(N)], out
    assert after["in_datagrams"] - before["in_datagrams"] == N, (before, after)
    assert after["to_apps"] - before["to_apps"] == N
    assert after["from_apps"] - before["from_apps"] == N
    assert after["out_datagrams"] - before["out_datagrams"] == N
    # A closed port on the stack answers ICMP port unreachable: the kernel
    # client's connected socket sees ECONNREFUSED, as from a Linux host.
    out = env.kernel_py(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.connect(("{env.addr}", 5399))
        s.send(b"anyone?")
        try:
            s.recv(100)
        except ConnectionRefusedError:
            print("refused")
        """)
    assert out.strip() == "refused"
    assert _udp(env)["no_ports"] > after.get("no_ports", 0)


KERNEL_UDP_ECHO = '''
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{peer}", 5301))
s.settimeout(1)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(65535)
    except OSError:
        continue
    s.sendto(data + (" seen %s:%d" % addr).encode(), addr)
'''

UDP_CLIENT = '''
import errno, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for i in range({n}):
    s.sendto(b"hi %d" % i, ("{peer}", 5301))
    data, addr = s.recvfrom(2048)
    print(data.decode(), addr == ("{peer}", 5301))
print("name", s.getsockname())
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(5)
c.connect(("{peer}", 5301))
c.send(b"connected")
print(c.recv(2048).decode(), c.getpeername())
big = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    big.sendto(b"x" * 2000, ("{peer}", 5301))
except OSError as e:
    print("big", errno.errorcode[e.errno])
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for dst in ("{bcast}",):  # the stack's subnet: its socket (255.255.255.255 is the kernel's)
    try:
        b.sendto(b"all", (dst, 5301))
    except OSError as e:
        print("broadcast", errno.errorcode[e.errno])
b.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
try:
    b.sendto(b"all", ("255.255.255.255", 5301))
except OSError as e:
    print("broadcast allowed", errno.errorcode[e.errno])
u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u1.bind(("0.0.0.0", 5310))
u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u2.bind(("0.0.0.0", 5310))
except OSError as e:
    print("rebind", errno.errorcode[e.errno])
p1, p2 = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
for x in (p1, p2):
    x.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    x.bind(("0.0.0.0", 5311))
print("reuseport", p1.getsockname()[1], p2.getsockname()[1])
try:
    u1.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                  socket.inet_aton("239.1.2.3") + socket.inet_aton("0.0.0.0"))
except OSError as e:
    print("multicast", errno.errorcode[e.errno])
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.settimeout(5)
r.connect(("{peer}", 5302))  # nobody there: the kernel answers port unreachable
r.send(b"hello?")
try:
    r.recv(100)
except ConnectionRefusedError:
    print("refused")
'''


def test_udp_client_against_the_kernel(shared_env):
    env = shared_env
    k = env.ns.popen([env_py(), "-c", KERNEL_UDP_ECHO.replace("{peer}", env.peer)])
    env.procs.append(k)
    before = _udp(env)
    bcast = str(ipaddress.IPv4Network(f"{env.addr}/{env.prefix}", strict=False).broadcast_address)
    code = (UDP_CLIENT.replace("{peer}", env.peer).replace("{n}", str(N))
            .replace("{bcast}", bcast))
    p = env.app_py(code, "udp_client")
    p.stdin.close()
    assert p.wait(60) == 0, env.app_log("udp_client") + env.log()
    log = env.app_log("udp_client").splitlines()
    assert log[:N] == [f"hi {i} seen {env.addr}:{_port(log)} True" for i in range(N)], log
    assert log[N].startswith(f"name ('{env.addr}'") or log[N].startswith("name ('0.0.0.0'"), log
    assert log[N + 1].startswith(f"connected seen {env.addr}:") and env.peer in log[N + 1], log
    assert "big EMSGSIZE" in log and "refused" in log, log
    assert "broadcast EACCES" in log and "broadcast allowed ENETUNREACH" in log, log
    assert "rebind EADDRINUSE" in log and "reuseport 5311 5311" in log, log
    assert "multicast ENOPROTOOPT" in log, log  # a clear no, not silence
    after = _udp(env)
    assert after["out_datagrams"] - before["out_datagrams"] == N + 2  # + connected + refused one
    assert after["in_datagrams"] - before["in_datagrams"] == N + 1
    assert after["refused"] - before.get("refused", 0) == 1


def _port(log: list[str]) -> str:
    return log[0].rsplit(":", 1)[1].split()[0]


def env_py() -> str:
    import sys

    return sys.executable


DNS_SERVER = '''
import socketserver
import dns.message, dns.rrset

class Dns(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        name = q.question[0].name
        r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "198.18.77.77"))
        sock.sendto(r.to_wire(), self.client_address)

srv = socketserver.UDPServer(("0.0.0.0", 5353), Dns)
print("listening", flush=True)
srv.serve_forever()
'''


def test_dnspython_resolves_against_a_dns_server_on_the_stack(shared_env):
    env = shared_env
    p = env.app_py(DNS_SERVER, "dns_server")
    env.wait_for_line("dns_server", "listening", p)
    before = _udp(env)
    out = env.kernel_py(f"""
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["{env.addr}"]
        r.port = 5353
        for name in ("a.shardstack.test", "b.shardstack.test"):
            print(name, [x.address for x in r.resolve(name, "A", lifetime=5)])
        """)
    assert out.splitlines() == ["a.shardstack.test ['198.18.77.77']",
                                "b.shardstack.test ['198.18.77.77']"], out
    after = _udp(env)
    assert after["to_apps"] - before["to_apps"] >= 2
    assert after["from_apps"] - before["from_apps"] >= 2


ASYNCIO_UDP = '''
import asyncio

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data.upper() + (" %s" % addr[0]).encode(), addr)

async def main():
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("0.0.0.0", 5320))
    print("listening", transport.get_extra_info("sockname"), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
'''


def test_asyncio_datagram_endpoint(shared_env):
    """asyncio's loop: create_datagram_endpoint's socket is the shim's, on the stack."""
    env = shared_env
    p = env.app_py(ASYNCIO_UDP, "udp_asyncio")
    line = env.wait_for_line("udp_asyncio", "listening", p)
    assert "('0.0.0.0', 5320)" in line, line
    before = _udp(env)
    out = env.kernel_py(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        for i in range({N}):
            s.sendto(b"dgram %d" % i, ("{env.addr}", 5320))
            print(s.recvfrom(2048)[0].decode())
        """)
    assert out.splitlines() == [f"DGRAM {i} {env.peer}" for i in range(N)], out
    after = _udp(env)
    assert after["to_apps"] - before["to_apps"] == N
    assert after["from_apps"] - before["from_apps"] == N


UVLOOP_UDP = '''
import asyncio
import uvloop

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data.upper() + (" %s" % addr[0]).encode(), addr)

class Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        if not self.got.done():
            self.got.set_result((data, addr))

    def error_received(self, exc):
        if not self.got.done():
            self.got.set_exception(exc)

async def main():
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop"), type(loop)
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("0.0.0.0", 5330))
    print("listening", transport.get_extra_info("sockname"), flush=True)
    # the other way: a connected endpoint on the stack to the kernel's echo
    peer = "KERNEL_PEER"
    t2, c = await loop.create_datagram_endpoint(Client, remote_addr=(peer, 5331))
    t2.sendto(b"to kernel")
    data, addr = await asyncio.wait_for(c.got, 10)
    print("client", data.decode(), addr, t2.get_extra_info("peername"), flush=True)
    t2.close()
    await asyncio.sleep(60)

uvloop.run(main())
'''


def test_uvloop_datagram_endpoint(shared_env):
    """uvloop's create_datagram_endpoint (libuv's UDP handle, in C) goes on
    the stack when the scope says so: a server endpoint (local_addr) echoing
    the kernel's datagrams, and a connected one (remote_addr) to a kernel
    echo; the stack's UDP counters count both."""
    env = shared_env
    before = _udp(env)
    kecho = env.ns.popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("{env.peer}", 5331))
        s.settimeout(30)
        data, addr = s.recvfrom(2048)
        s.sendto(data + b" back", addr)
        print(addr[0], flush=True)
        """)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(kecho)
    try:
        p = env.app_py(UVLOOP_UDP.replace("KERNEL_PEER", env.peer), "udp_uvloop")
        line = env.wait_for_line("udp_uvloop", "listening", p)
        assert "('0.0.0.0', 5330)" in line, line
        out = env.kernel_py(f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            for i in range({N}):
                s.sendto(b"uv %d" % i, ("{env.addr}", 5330))
                print(s.recvfrom(2048)[0].decode())
            """)
        assert out.splitlines() == [f"UV {i} {env.peer}" for i in range(N)], out
        line = env.wait_for_line("udp_uvloop", "client", p)
        assert f"client to kernel back ('{env.peer}', 5331) ('{env.peer}', 5331)" in line, line
        assert kecho.communicate(timeout=30)[0].strip() == env.addr  # from the stack's address
    finally:
        if kecho.poll() is None:
            kecho.kill()
    after = _udp(env)
    assert after["to_apps"] - before["to_apps"] == N + 1
    assert after["from_apps"] - before["from_apps"] == N + 1
