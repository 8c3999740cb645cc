"""Unmodified programs on a real stack: `shardstack serve` on a TUN, the kernel as the peer.

Each test gets its own network namespace (198.18.0.0/15 only) with `shardstack
serve` inside; the app runs under `shardstack run` (or `python -m
shardstack.shim`) and the kernel side of the TUN talks to it with curl or a
plain Python socket, or serves it. Every wait is bounded; the namespace goes
away with everything in it, also when a test fails.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from shardstack import control, netns

pytestmark = pytest.mark.interop

WAIT = 20.0
PY = sys.executable


class Env:
    def __init__(self, ns: netns.Netns, net) -> None:
        self.ns = ns
        self.addr = str(net.network_address + 2)  # the stack
        self.peer = str(net.network_address + 1)  # the kernel, on the TUN
        self.prefix = net.prefixlen
        self.run_dir = tempfile.mkdtemp(prefix="ssh-", dir="/tmp")
        os.rmdir(self.run_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix="ssh-files-", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []

    def serve(self) -> None:
        log = open(self.tmp / "serve.log", "wb")  # noqa: SIM115 (closed with the test dir)
        self.serve_proc = self.ns.popen(
            [PY, "-m", "shardstack", "serve", "--workers", "2", "--tun", "ssh0",
             "--peer", f"{self.peer}/{self.prefix}", "--addr", f"{self.addr}/{self.prefix}",
             "--run-dir", self.run_dir], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.serve_proc.poll() is None, self.log()
            try:
                if control.call(Path(self.run_dir) / "control.sock", "hello", timeout=2)["ready"]:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"stack not ready:\n{self.log()}")

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")

    def app(self, argv: list[str], name: str) -> subprocess.Popen:
        """An unmodified program under `shardstack run`, in the namespace."""
        out = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        p = self.ns.popen([PY, "-m", "shardstack", "run", "--", *argv],
                          stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp,
                          env=dict(os.environ, SHARDSTACK_RUN_DIR=self.run_dir,
                                   PYTHONUNBUFFERED="1"))
        self.procs.append(p)
        return p

    def app_log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_listening(self, port: int, name: str) -> None:
        """Until the kernel side can connect to addr:port (bounded)."""
        probe = f"import socket; socket.create_connection(('{self.addr}', {port}), 1).close()"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.ns.run([PY, "-c", probe], check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"app never listened on {port}:\n{self.app_log(name)}\n{self.log()}")

    def kernel_py(self, code: str, timeout: float = 60) -> str:
        r = self.ns.run([PY, "-c", textwrap.dedent(code)], check=False, timeout=timeout)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def shim_py(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        script = self.tmp / f"shim-{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(code))
        return subprocess.run(
            ["ip", "netns", "exec", self.ns.name, PY, "-m", "shardstack.shim",
             "--run-dir", self.run_dir, str(script)],
            capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for p in [*self.procs, getattr(self, "serve_proc", None)]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@pytest.fixture
def env():
    if os.geteuid() != 0:
        pytest.skip("shim interop tests need root (network namespaces, TUN)")
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssh") as ns:
        e = Env(ns, netns.next_subnet())
        try:
            e.serve()
            yield e
        finally:
            e.stop()


def test_http_server_fetched_by_curl(env):
    blob = os.urandom(4 << 20)
    (env.tmp / "blob.bin").write_bytes(blob)
    # No --bind: in a namespace with IPv6 on lo, http.server listens on a
    # dual-stack `::`, whose IPv4 half the shim puts on the stack.
    env.app(["python", "-m", "http.server", "8000"], "http")
    env.wait_listening(8000, "http")
    r = env.ns.run(["curl", "-sS", "--max-time", "60", "-o", str(env.tmp / "got.bin"),
                    f"http://{env.addr}:8000/blob.bin"], check=False, timeout=90)
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
    """urllib, asyncio and create_connection on the stack; kernel servers on the peer."""
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

        async def main():
            r, w = await asyncio.wait_for(asyncio.open_connection("{env.peer}", 8080), 10)
            w.write(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
            data = await asyncio.wait_for(r.read(), 10)
            w.close()
            return data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip()
        print("asyncio", asyncio.run(main()))

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
    assert lines[:3] == ["urllib kernel says hi", "asyncio kernel says hi", "refused True"]
    assert lines[3] == f"names {env.addr} ('{env.peer}', 8080)"


def test_connect_timeout_to_a_silent_host(env):
    """A SYN the kernel side drops (an address nobody has): the kernel's TimeoutError."""
    silent = env.peer.rsplit(".", 1)[0] + ".77"
    r = env.shim_py(f"""
        import socket, time
        t = time.monotonic()
        try:
            socket.create_connection(("{silent}", 80), timeout=1.5)
        except TimeoutError as e:
            print("timeout", round(time.monotonic() - t))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["timeout", "2"] or r.stdout.split() == ["timeout", "1"]
