"""Fixtures for the shim's interop tests: `shardstack serve` on a TUN in a fresh namespace.

Each test gets its own network namespace (198.18.0.0/15 only) with `shardstack
serve` inside (`env`); the app runs under `shardstack run` (`env.app`) or
`python -m shardstack.shim` (`env.shim_py`), and the kernel side of the TUN
talks to it (`env.kernel_py`, curl), or serves it (`env.kernel_server`).
Every wait is bounded; the namespace goes away with everything in it, also
when a test fails.
"""

from __future__ import annotations

import contextlib
import json
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

WAIT = 20.0
PY = sys.executable


class Env:
    def __init__(self, ns: netns.Netns, net, net6=None) -> None:
        self.ns = ns
        self.addr = str(net.network_address + 2)  # the stack
        self.peer = str(net.network_address + 1)  # the kernel, on the TUN
        self.prefix = net.prefixlen
        self.net6 = net6  # dual stack: an IPv6 prefix (2001:db8::/32) as well
        self.addr6 = str(net6.network_address + 2) if net6 else ""
        self.peer6 = str(net6.network_address + 1) if net6 else ""
        self.run_dir = tempfile.mkdtemp(prefix="ssh-", dir="/tmp")
        os.rmdir(self.run_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix="ssh-files-", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []

    def serve(self) -> None:
        log = open(self.tmp / "serve.log", "wb")  # noqa: SIM115 (closed with the test dir)
        self.serve_proc = self.ns.popen(
            [PY, "-m", "shardstack", "serve", "--workers", "2", "--tun", "ssh0",
             "--peer", f"{self.peer}/{self.prefix}", "--addr", f"{self.addr}/{self.prefix}",
             *([] if self.net6 is None else
               ["--peer", f"{self.peer6}/{self.net6.prefixlen}",
                "--addr", f"{self.addr6}/{self.net6.prefixlen}"]),
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

    def _connectable(self, host: str, port: int) -> bool:
        """Whether the kernel side can connect to host:port within WAIT s (probes
        every 0.1 s)."""
        probe = f"import socket; socket.create_connection(('{host}', {port}), 1).close()"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.ns.run([PY, "-c", probe], check=False).returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def wait_listening(self, port: int, name: str) -> None:
        """Until the kernel side can connect to the app on addr:port (bounded)."""
        if not self._connectable(self.addr, port):
            raise AssertionError(
                f"app never listened on {port}:\n{self.app_log(name)}\n{self.log()}")

    def kernel_py(self, code: str, timeout: float = 60) -> str:
        r = self.ns.run([PY, "-c", textwrap.dedent(code)], check=False, timeout=timeout)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def shim_py(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        script = self.tmp / f"shim-{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(code))
        return self.shim_run(script, timeout=timeout)

    def shim_run(self, script: Path, *args: str, timeout: float = 60
                 ) -> subprocess.CompletedProcess:
        """`python -m shardstack.shim script args...` in the namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns.name, PY, "-m", "shardstack.shim",
             "--run-dir", self.run_dir, str(script), *args],
            capture_output=True, text=True, timeout=timeout)

    def app_py(self, code: str, name: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """`code` as app.py under `shardstack run [extra] -- python`, stdin a pipe."""
        script = self.tmp / f"{name}.py"
        script.write_text(textwrap.dedent(code))
        out = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        p = self.ns.popen([PY, "-m", "shardstack", "run", *extra, "--", "python", str(script)],
                          stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                          cwd=self.tmp, env=dict(os.environ, SHARDSTACK_RUN_DIR=self.run_dir,
                                                 PYTHONUNBUFFERED="1"))
        self.procs.append(p)
        return p

    def wait_for_line(self, name: str, prefix: str, proc: subprocess.Popen | None = None,
                      timeout: float = WAIT) -> str:
        """The first line of app `name`'s log starting with `prefix` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.app_log(name).splitlines():
                if line.startswith(prefix):
                    return line
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} from {name}:\n{self.app_log(name)}\n{self.log()}")

    def kernel_server(self, code: str, port: int) -> subprocess.Popen:
        """A plain-kernel Python server in the namespace, on the peer address."""
        p = self.ns.popen([PY, "-c", textwrap.dedent(code)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        self.wait_kernel_listening(self.peer, port)
        return p

    def wait_kernel_listening(self, host: str, port: int) -> None:
        if not self._connectable(host, port):
            raise AssertionError(f"kernel server never listened on {host}:{port}")

    def ss(self) -> list[dict]:
        """`shardstack ss --json`: every TCP socket on the stack."""
        r = self.ns.run([PY, "-m", "shardstack", "ss", "--json", "--run-dir", self.run_dir],
                        check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        data = json.loads(r.stdout)
        return data["conns"] if isinstance(data, dict) else data

    def stats(self) -> dict:
        """`shardstack stats --json`: the stack's own counters."""
        r = self.ns.run([PY, "-m", "shardstack", "stats", "--json", "--run-dir", self.run_dir],
                        check=False, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def gate_counts(self) -> dict[str, int]:
        """The workers' appgate counters summed: connections (and bytes) the
        stack itself handed to or took from apps (active_opens, passive_opens,
        bytes_up, bytes_down)."""
        total: dict[str, int] = {}
        for w in self.stats()["workers"]:
            for k, v in (w.get("counters", {}).get("appgate") or {}).items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        return total

    def kernel_listeners(self, port: int) -> str:
        """The namespace kernel's IPv4 (or dual-stack) TCP listeners on `port`
        (`ss -Htln`): empty when the app's listener is on the stack. An
        IPv6-only one (`[::]:port`, V6ONLY) is the kernel's by design."""
        r = self.ns.run(["ss", "-Htln", f"sport = :{port}"], check=False, timeout=10)
        return "\n".join(x for x in r.stdout.splitlines() if "[::]:" not in x)

    def stop_apps(self) -> None:
        """Stop the programs a test started, keep the stack (shared_env)."""
        procs, self.procs = self.procs, []
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def stop(self) -> None:
        for p in [*self.procs, getattr(self, "serve_proc", None)]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@contextlib.contextmanager
def _stack_env(dual: bool = False):
    if os.geteuid() != 0:
        pytest.skip("shim interop tests need root (network namespaces, TUN)")
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"
    with netns.netns(prefix="ssh") as ns:
        if dual:
            ns.ip("link", "set", "lo", "up")
        e = Env(ns, netns.next_subnet(), netns.next_subnet6() if dual else None)
        try:
            e.serve()
            yield e
        finally:
            e.stop()


@pytest.fixture
def env():
    with _stack_env() as e:
        yield e


@pytest.fixture(scope="module")
def module_env():
    """One stack for every test of a module (each test stops its own apps: `shared_env`)."""
    with _stack_env() as e:
        yield e


@pytest.fixture(scope="module")
def dual_env():
    """A dual-stack stack (IPv4 and 2001:db8::/32 on its TUN) for a module."""
    with _stack_env(dual=True) as e:
        yield e
        e.stop_apps()


@pytest.fixture
def shared_env(module_env):
    try:
        yield module_env
    finally:
        module_env.stop_apps()
