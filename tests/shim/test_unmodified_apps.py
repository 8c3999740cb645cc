"""Unmodified programs on a real stack: `shardstack serve` on a TUN, the kernel as the peer.

Stdlib servers under `shardstack run` driven by kernel clients (curl, plain
sockets), and stdlib clients under the shim against kernel servers. The
fixtures (a namespace with `shardstack serve` in it) are in conftest.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.interop

WAIT = 20.0
PY = sys.executable


def test_http_server_fetched_by_curl(env):
    blob = os.urandom(20 << 20)
    (env.tmp / "blob.bin").write_bytes(blob)
    # No --bind: in a namespace with IPv6 on lo, http.server listens on a
    # dual-stack `::`, whose IPv4 half the shim puts on the stack.
    env.app(["python", "-m", "http.server", "8000"], "http")
    env.wait_listening(8000, "http")
    r = env.ns.run(["curl", "-sS", "--max-time", "120", "-o", str(env.tmp / "got.bin"),
                    f"http://{env.addr}:8000/blob.bin"], check=False, timeout=150)
    assert r.returncode == 0, r.stderr + env.app_log("http")
    got = (env.tmp / "got.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest()


ECHO_APPS = {
    "socketserver": """
        import socketserver
        class H(socketserver.BaseRequestHandler):
            def handle(self):
                while data := self.request.recv(65536):
                    self.request.sendall(data)
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer(("0.0.0.0", 7007), H).serve_forever()
    """,
    "forking": """
        import os, socketserver
        class H(socketserver.BaseRequestHandler):
            def handle(self):
                assert os.getpid() != PARENT  # a forked child serves the connection
                while data := self.request.recv(65536):
                    self.request.sendall(data)
        PARENT = os.getpid()
        socketserver.ForkingTCPServer.allow_reuse_address = True
        socketserver.ForkingTCPServer(("0.0.0.0", 7007), H).serve_forever()
    """,
    "asyncio": """
        import asyncio
        async def handle(r, w):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()
        async def main():
            server = await asyncio.start_server(handle, "0.0.0.0", 7007)
            async with server:
                await server.serve_forever()
        asyncio.run(main())
    """,
    "selectors": """
        import selectors, socket
        sel = selectors.DefaultSelector()
        srv = socket.create_server(("0.0.0.0", 7007), backlog=64)
        srv.setblocking(False)
        sel.register(srv, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is srv:
                    c, _ = srv.accept()
                    c.setblocking(True)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    data = key.fileobj.recv(65536)
                    if data:
                        key.fileobj.sendall(data)
                    else:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
    """,
}


@pytest.mark.parametrize("kind", sorted(ECHO_APPS))
def test_echo_servers(env, kind):
    (env.tmp / "app.py").write_text(textwrap.dedent(ECHO_APPS[kind]))
    env.app(["python", "app.py"], kind)
    env.wait_listening(7007, kind)
    out = env.kernel_py(f"""
        import hashlib, random, socket, threading
        def one(i):
            data = random.Random(i).randbytes(256 * 1024)
            with socket.create_connection(("{env.addr}", 7007), timeout=30) as c:
                t = threading.Thread(target=c.sendall, args=(data,))
                t.start()
                got = b""
                while len(got) < len(data):
                    chunk = c.recv(65536)
                    assert chunk, "EOF early"
                    got += chunk
                t.join()
                return hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        print(all(one(i) for i in range(4)))
    """)
    assert out.strip() == "True", env.app_log(kind)


def test_shim_clients_against_kernel_servers(env):
    """urllib, http.client, asyncio and create_connection on the stack; kernel servers."""
    (env.tmp / "index.html").write_bytes(b"kernel says hi\n")
    srv = env.ns.popen([PY, "-m", "http.server", "8080", "--bind", env.peer,
                        "--directory", str(env.tmp)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.procs.append(srv)
    probe = f"import socket; socket.create_connection(('{env.peer}', 8080), 1).close()"
    for _ in range(100):
        if env.ns.run([PY, "-c", probe], check=False).returncode == 0:
            break
        time.sleep(0.1)
    r = env.shim_py(f"""
        import asyncio, errno, socket, urllib.request
        assert socket.socket is not None and socket.socket.__name__ == "ShimSocket"
        body = urllib.request.urlopen("http://{env.peer}:8080/index.html", timeout=20).read()
        print("urllib", body.decode().strip())

        import http.client
        h = http.client.HTTPConnection("{env.peer}", 8080, timeout=20)
        for _ in range(2):  # HTTP/1.0 server: a new connection per request
            h.request("GET", "/index.html")
            resp = h.getresponse()
            data = resp.read()
        h.close()
        print("http.client", resp.status, data.decode().strip())

        async def main():
            r, w = await asyncio.wait_for(asyncio.open_connection("{env.peer}", 8080), 10)
            w.write(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
            data = await asyncio.wait_for(r.read(), 10)
            w.close()
            return data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip()
        print("asyncio", asyncio.run(main()))

        async def refused():
            try:
                await asyncio.wait_for(asyncio.open_connection("{env.peer}", 1), 10)
            except ConnectionRefusedError as e:
                return e.errno == errno.ECONNREFUSED
        print("asyncio refused", asyncio.run(refused()))

        try:
            socket.create_connection(("{env.peer}", 1), timeout=10)
        except ConnectionRefusedError as e:
            print("refused", e.errno == errno.ECONNREFUSED)
        c = socket.create_connection(("{env.peer}", 8080), timeout=10)
        print("names", c.getsockname()[0], c.getpeername())
        c.close()
    """)
    assert r.returncode == 0, r.stderr + env.log()
    lines = r.stdout.splitlines()
    assert lines[:5] == ["urllib kernel says hi", "http.client 200 kernel says hi",
                         "asyncio kernel says hi", "asyncio refused True", "refused True"]
    assert lines[5] == f"names {env.addr} ('{env.peer}', 8080)"


def test_connect_timeout_to_a_silent_host(env):
    """A SYN the kernel side drops (an address nobody has): the kernel's TimeoutError."""
    silent = env.peer.rsplit(".", 1)[0] + ".77"
    r = env.shim_py(f"""
        import socket, time
        t = time.monotonic()
        try:
            socket.create_connection(("{silent}", 80), timeout=1.5)
        except socket.timeout as e:  # the same class as TimeoutError since 3.10
            print("timeout", type(e).__name__, str(e), round(time.monotonic() - t, 1), sep="|")
        s = socket.socket()
        s.settimeout(1.0)
        print("connect_ex", s.connect_ex(("{silent}", 80)))  # EAGAIN, as CPython's
        s.close()
    """)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    kind, name, text, took = first.split("|")
    assert (kind, name, text) == ("timeout", "TimeoutError", "timed out"), first
    assert 1.2 <= float(took) <= 5.0, first  # the app's timeout, not the SYN retries'
    assert second == f"connect_ex {errno.EAGAIN}"


def test_tls_server_fetched_by_curl(env):
    """An `ssl`-wrapped http.server with a self-signed certificate; curl -k on the kernel."""
    key, cert = env.tmp / "key.pem", env.tmp / "cert.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=shardstack-test", "-keyout", str(key), "-out", str(cert)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    blob = os.urandom(1 << 20)
    (env.tmp / "blob.bin").write_bytes(blob)
    (env.tmp / "tls.py").write_text(textwrap.dedent(f"""
        import http.server, ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain("{cert}", "{key}")
        srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8443),
                                              http.server.SimpleHTTPRequestHandler)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.serve_forever()
    """))
    env.app(["python", "tls.py"], "tls")
    env.wait_listening(8443, "tls")
    got = env.tmp / "got.bin"
    r = env.ns.run(["curl", "-sS", "-k", "--max-time", "60", "-o", str(got),
                    "-w", "%{ssl_verify_result} %{http_code}",
                    f"https://{env.addr}:8443/blob.bin"], check=False, timeout=90)
    assert r.returncode == 0, r.stderr + env.app_log("tls")
    assert r.stdout.split()[1] == "200"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()


BOUND_CONNECT_AFTER_MOVE = r'''
import json, socket, subprocess, sys
from shardstack.netio import rss

ADDR, PEER, PORT, RUN = {addr!r}, {peer!r}, {port}, {run!r}
ip = lambda a: int.from_bytes(socket.inet_aton(a), "big")
s = socket.socket()
s.bind((ADDR, 0))  # on the stack: the shim has read the stack's RETA by now
port = s.getsockname()[1]
# The bucket the kernel's replies to us (PEER:PORT -> ADDR:port) are steered by.
b = rss.Toeplitz(rss.SYMMETRIC_KEY).hash_tuple(ip(PEER), ip(ADDR), PORT, port) & rss.RETA_MASK
ctl = [sys.executable, "-m", "shardstack", "reta", "--json", "--run-dir", RUN]
owner = json.loads(subprocess.run(ctl, capture_output=True, text=True, check=True).stdout)["buckets"][b]["worker"]
subprocess.run(ctl[:4] + ["move", str(b), str(1 - owner)] + ctl[-2:], check=True,
               capture_output=True)
s.settimeout(10)
s.connect((PEER, PORT))  # the shim's copy of the RETA still names the old owner
s.sendall(b"ping")
print("echo", s.recv(10).decode(), "moved", b, owner, "->", 1 - owner, flush=True)
'''

KERNEL_ECHO = '''
import socket
srv = socket.create_server(("{peer}", {port}))
srv.settimeout(60)
for _ in range(5):  # the readiness probe's connection, then ours
    c, _ = srv.accept()
    c.settimeout(20)
    c.sendall(c.recv(100))
    c.close()
'''


def test_connect_from_a_bound_port_after_its_bucket_moved(shared_env):
    """A client that bound its port connects on the worker the RETA steers its
    replies to now, not the one in the RETA it read before a bucket moved
    (the SYN-ACK went to the new owner and was reset: connect() timed out)."""
    env = shared_env
    env.kernel_server(KERNEL_ECHO.format(peer=env.peer, port=7741), 7741)
    before = env.gate_counts()
    r = env.shim_py(BOUND_CONNECT_AFTER_MOVE.format(addr=env.addr, peer=env.peer, port=7741,
                                                    run=env.run_dir), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("echo ping moved"), r.stdout + r.stderr
    assert env.gate_counts()["active_opens"] - before.get("active_opens", 0) == 1


LOCAL_FILL_DRAIN = r'''
import select, socket, time
l = socket.socket()
l.bind(({addr!r}, 0))
l.listen(1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)  # the engine's minimum: many small rounds
s.setblocking(False)
try:
    s.connect(l.getsockname())
except BlockingIOError:
    pass
srv, _ = l.accept()
srv.setblocking(False)
select.select([], [s], [], 5)
total = 0
try:
    for _ in range(4096):  # fill every buffer on the way until the sender would block
        total += s.send(b" " * 8192)  # (32 MiB at most: far more than they hold)
except BlockingIOError:
    pass
s.setblocking(True)
s.sendall(b"world")
s.shutdown(socket.SHUT_WR)
got, tail, deadline = 0, b"", time.monotonic() + 20
while time.monotonic() < deadline:
    if not select.select([srv], [], [], 0.5)[0]:
        continue
    b = srv.recv(65536)
    if not b:
        break
    got += len(b)
    tail = (tail + b)[-5:]
print("sent", total + 5, "got", got, "tail", tail.decode(), flush=True)
'''


def test_connection_to_our_own_address_does_not_stall(shared_env):
    """A connection from the stack to its own address runs on one worker,
    each round's frames its next round's input; with a tiny send buffer the
    rounds ran out, the Writable that was left never came, and the transfer
    stalled at ~150 KiB."""
    env = shared_env
    r = env.shim_py(LOCAL_FILL_DRAIN.format(addr=env.addr), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    words = r.stdout.split()
    assert words[0] == "sent" and words[1] == words[3] and words[5] == "world", r.stdout
