"""The servers a run can measure: the Linux kernel's TCP, and shardstack over TUN or AF_PACKET.

Every target gives the load client (in its own client namespace) an address
and port for a service, and the telemetry the pids to watch. Topologies, all
on one veth pair between a client and a server namespace (198.18.0.0/15):

  kernel            client .1 ──veth── .2 server ns: a Python server on the kernel's TCP
  shardstack-tun    client .1 ──veth── .2 server ns (forwarding) ── TUN: stack at T.2
  shardstack-packet client .1 ──veth── server ns: the stack owns .2 on the veth by AF_PACKET

The shardstack targets need `shardstack serve` and (for the source and http
services) `shardstack run`; `probe_capabilities()` checks the CLI for them, and
a target that cannot be built raises `Unavailable` with the reason, which the
runner reports as "n/a" — never a made-up number.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardstack import netns as nsmod
from shardstack.bench import scenarios as sc

PY = sys.executable
SERVE_READY_TIMEOUT = 20.0
SERVICE_READY_TIMEOUT = 10.0


class Unavailable(Exception):
    """This target (or this service on it) cannot run here yet; str() is the reason."""


def shardstack_argv(*args: str) -> list[str]:
    return [PY, "-m", "shardstack", *args]


# -- what the CLI can do today -------------------------------------------------------------


@dataclass(slots=True)
class Capabilities:
    serve: bool = False
    tun: bool = False
    packet: bool = False
    echo: bool = False
    discard: bool = False
    run: bool = False
    stats_json: bool = False
    flags: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("serve", "tun", "packet", "echo", "discard", "run",
                                              "stats_json")} | {"reasons": self.reasons}

    def missing_for(self, device: str, service: str) -> str | None:
        """Why shardstack over `device` cannot offer `service`, or None if it can."""
        if not self.serve:
            return self.reasons.get("serve", "`shardstack serve` is not available")
        if not getattr(self, device):
            return f"`shardstack serve` has no --{device} option yet"
        if service in ("echo", "discard") and not getattr(self, service):
            return f"`shardstack serve` has no --{service} service yet"
        if service in ("source", "http", "udp-echo") and not self.run:
            return self.reasons.get("run", "`shardstack run` (the shim launcher) is not available")
        return None


def _help(sub: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(shardstack_argv(sub, "--help"), capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"`shardstack {sub} --help` timed out"
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or "not built yet" in text:
        return False, text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}"
    return True, text


def probe_capabilities() -> Capabilities:
    """Ask the CLI's help which subcommands and options exist."""
    caps = Capabilities()
    ok, text = _help("serve")
    if ok:
        caps.flags = {w.strip(",[]") for w in text.split() if w.startswith("--")}
        caps.tun = "--tun" in caps.flags
        caps.packet = "--packet" in caps.flags
        caps.echo = "--echo" in caps.flags
        caps.discard = "--discard" in caps.flags
        caps.serve = caps.tun or caps.packet
        if not caps.serve:
            caps.reasons["serve"] = "`shardstack serve` has neither --tun nor --packet"
    else:
        caps.reasons["serve"] = f"`shardstack serve` not usable: {text}"
    ok, text = _help("run")
    if ok and importlib.util.find_spec("shardstack.shim.launcher") is None:
        ok, text = False, "the shim launcher (shardstack.shim.launcher) is not built yet"
    caps.run = ok
    if not ok:
        caps.reasons["run"] = f"`shardstack run` not usable: {text}"
    ok, text = _help("stats")
    caps.stats_json = ok and "--json" in text
    return caps


# -- a running stack ----------------------------------------------------------------------


def wait_ready(run_dir: str | os.PathLike[str], serve: subprocess.Popen,
               timeout: float = SERVE_READY_TIMEOUT) -> str | None:
    """Wait until the supervisor in `run_dir` says it is ready; None, or why not."""
    from shardstack import control

    sock = Path(run_dir) / "control.sock"
    deadline = time.monotonic() + timeout
    last = "no control socket"
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            return f"`shardstack serve` exited with status {serve.returncode}"
        if sock.exists():
            try:
                if control.call(sock, "hello", timeout=2.0).get("ready", True):
                    return None
                last = "supervisor not ready"
            except OSError as e:
                last = str(e)
        time.sleep(0.1)
    return f"`shardstack serve` not ready after {timeout:.0f} s: {last}"


def control_call(run_dir: str | os.PathLike[str], op: str) -> dict[str, Any] | None:
    """One control request to the stack in `run_dir`; None when it is not there."""
    from shardstack import control

    sock = Path(run_dir) / "control.sock"
    if not sock.exists():
        return None
    return control.call(sock, op, timeout=2.0)


def wait_tcp(ns: nsmod.Netns, host: str, port: int, timeout: float,
             server: subprocess.Popen | None = None, mode: str = "probe") -> str:
    """Connect from `ns` until `host:port` answers; "" on success, else why not.

    Gives up early when `server` (the process that should be listening) exits.
    """
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.poll() is not None:
            return f"the server process exited with status {server.returncode}"
        proc = ns.run([PY, "-m", "shardstack.bench.client", mode, "--host", host, "--port",
                       str(port), "--seconds", "1"], check=False, timeout=20)
        if '"ok": true' in proc.stdout:
            return ""
        if time.monotonic() >= deadline:
            return f"nothing answers on {host}:{port} after {timeout:.0f} s"


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-300:]


# -- targets --------------------------------------------------------------------------------


@dataclass(slots=True)
class Endpoint:
    host: str
    port: int
    udp: bool = False  # probed with a datagram, not a connection


class Target:
    """Base: a topology plus lazily started services; a context manager that cleans up."""

    name = "?"

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.pair: nsmod.Pair | None = None
        self.services: dict[str, Endpoint] = {}
        self.failed: dict[str, str] = {}
        self.pids: dict[str, tuple[int, bool]] = {}  # role -> (pid, with children)
        self.files_dir: Path | None = None
        self.workers = 0

    def __enter__(self) -> Target:
        try:
            self.setup()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def setup(self) -> None:
        raise NotImplementedError

    def _make_pair(self, server_addr: bool) -> nsmod.Pair:
        pair = self.stack.enter_context(nsmod.client_server_pair(server_addr=server_addr,
                                                                 grace=2.0))
        # CRR opens tens of thousands of connections from one client namespace and
        # the client closes first (TIME_WAIT is on its side): widen the ephemeral
        # range and let TIME_WAIT ports be reused (RFC 6191-style, needs timestamps).
        pair.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        pair.client.sysctl("net.ipv4.tcp_tw_reuse", 1)
        self.pair = pair
        return pair

    def _files(self) -> Path:
        if self.files_dir is None:
            d = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="ssbench-")))
            for size in (sc.KIB, sc.MIB):
                (d / f"f{size}.bin").write_bytes(os.urandom(size))
            self.files_dir = d
        return self.files_dir

    def probe(self, ep: Endpoint, timeout: float = SERVICE_READY_TIMEOUT,
              server: subprocess.Popen | None = None, log: Path | None = None) -> None:
        """Wait until the service accepts a connection (answers a datagram, for
        UDP) from the client namespace."""
        assert self.pair is not None
        why = wait_tcp(self.pair.client, ep.host, ep.port, timeout, server,
                       "udp-probe" if ep.udp else "probe")
        if why:
            tail = _tail(log) if log else ""
            raise Unavailable(f"{self.name}: {why}" + (f" (log: {tail})" if tail else ""))

    def endpoint(self, case: sc.Case) -> Endpoint:
        """Start the case's service if needed; where the client should connect.

        A service that failed to start once is not tried again on this target
        (each try can wait seconds), the same reason is raised at once.
        """
        if case.service in self.failed:
            raise Unavailable(self.failed[case.service])
        ep = self.services.get(case.service)
        if ep is None:
            try:
                ep = self.start_service(case.service, case.port)
            except Unavailable as e:
                self.failed[case.service] = str(e)
                raise
            self.services[case.service] = ep
        return ep

    def start_service(self, service: str, port: int) -> Endpoint:
        raise NotImplementedError

    def stats(self) -> dict[str, Any] | None:
        return None


class KernelTarget(Target):
    name = "kernel"

    def setup(self) -> None:
        self._make_pair(server_addr=True)

    def start_service(self, service: str, port: int) -> Endpoint:
        assert self.pair is not None
        host = self.pair.server_ip
        if service == "http":
            argv = [PY, "-m", "http.server", "--bind", host, "--directory", str(self._files()),
                    str(port)]
            proc = self.pair.server.popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            self.pids["app-http"] = (proc.pid, True)
        else:
            argv = [PY, "-m", "shardstack.bench.servers", "--bind", host, f"--{service}",
                    str(port)]
            proc = self.pair.server.popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            self.pids[f"server-{service}"] = (proc.pid, False)
        ep = Endpoint(host, port, service == "udp-echo")
        self.probe(ep, server=proc)
        return ep


class ShardstackTarget(Target):
    """`shardstack serve` in the server namespace, apps under `shardstack run`."""

    def __init__(self, device: str, workers: int, caps: Capabilities, log_dir: Path):
        super().__init__()
        if device not in ("tun", "packet"):
            raise ValueError(device)
        self.device = device
        self.workers = workers
        self.caps = caps
        self.name = f"shardstack-{device}"
        self.log_dir = log_dir
        self.run_dir = ""
        self.host = ""
        self.serve: subprocess.Popen | None = None

    def setup(self) -> None:
        why = self.caps.missing_for(self.device, "echo")
        if why and not self.caps.serve:
            raise Unavailable(why)
        if not getattr(self.caps, self.device):
            raise Unavailable(f"`shardstack serve` has no --{self.device} option yet")
        pair = self._make_pair(server_addr=self.device == "tun")
        self.run_dir = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="ssb-run-"))
        argv = ["serve", "--workers", str(self.workers), "--run-dir", self.run_dir]
        if self.device == "tun":
            tnet = nsmod.next_subnet()
            self.host = str(tnet.network_address + 2)
            pair.server.sysctl("net.ipv4.ip_forward", 1)
            pair.client.add_route(str(tnet), via=pair.server_ip)
            argv += ["--tun", "sst0", "--addr", nsmod.host(tnet, 2), "--peer", nsmod.host(tnet, 1)]
            if "--gateway" in self.caps.flags:
                argv += ["--gateway", str(tnet.network_address + 1)]
        else:
            self.host = pair.server_ip
            argv += ["--packet", pair.link.b_dev, "--addr", nsmod.host(pair.net, 2)]
        if self.caps.echo:
            argv += ["--echo", str(sc.ECHO_PORT)]
        if self.caps.discard:
            argv += ["--discard", str(sc.DISCARD_PORT)]
        log = open(self.log_dir / f"{self.name}-w{self.workers}-serve.log", "wb")  # noqa: SIM115
        self.stack.callback(log.close)
        self.serve = pair.server.popen(shardstack_argv(*argv), stdout=log, stderr=subprocess.STDOUT)
        self.pids["supervisor"] = (self.serve.pid, True)
        self.stack.callback(self._stop_serve)
        self._wait_ready()

    def _stop_serve(self) -> None:
        # SIGTERM first so the supervisor can take its children down in order;
        # the namespace teardown SIGKILLs whatever is left.
        if self.serve and self.serve.poll() is None:
            self.serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.serve.wait(timeout=5)

    def _wait_ready(self) -> None:
        assert self.serve is not None
        why = wait_ready(self.run_dir, self.serve)
        if why:
            log = self.log_dir / f"{self.name}-w{self.workers}-serve.log"
            raise Unavailable(f"{why} (log {log}: {self._log_tail()})")

    def _log_tail(self) -> str:
        return _tail(self.log_dir / f"{self.name}-w{self.workers}-serve.log")

    def stats(self) -> dict[str, Any] | None:
        return control_call(self.run_dir, "stats")

    def start_service(self, service: str, port: int) -> Endpoint:
        assert self.pair is not None
        why = self.caps.missing_for(self.device, service)
        if why:
            raise Unavailable(why)
        ep = Endpoint(self.host, port, service == "udp-echo")
        if service in ("echo", "discard"):
            self.probe(ep)  # built into the workers
            return ep
        if service == "http":
            app = [PY, "-m", "http.server", "--bind", self.host, "--directory",
                   str(self._files()), str(port)]
        else:
            app = [PY, "-m", "shardstack.bench.servers", "--bind", self.host, f"--{service}",
                   str(port)]
        env = dict(os.environ, SHARDSTACK_RUN_DIR=self.run_dir)
        log_path = self.log_dir / f"{self.name}-w{self.workers}-{service}.log"
        log = open(log_path, "wb")  # noqa: SIM115
        self.stack.callback(log.close)
        proc = self.pair.server.popen(shardstack_argv("run", "--", *app), env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        self.pids[f"app-{service}"] = (proc.pid, True)
        self.probe(ep, server=proc, log=log_path)
        return ep


@contextlib.contextmanager
def open_target(kind: str, workers: int, caps: Capabilities, log_dir: Path) -> Iterator[Target]:
    target: Target = KernelTarget() if kind == "kernel" else ShardstackTarget(
        kind.removeprefix("shardstack-"), workers, caps, log_dir)
    with target:
        yield target


VARIANTS = ("kernel", "shardstack-tun", "shardstack-packet")
