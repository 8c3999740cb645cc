"""--live: the same scripts against a running stack over TUN, through the real shim.

``run_live`` (root) creates a network namespace of its own, starts ``shardstack
serve`` in it on a TUN device (one worker, no offloads, the stack at
198.18.99.2/24, the kernel side at 198.18.99.1, a gateway route for the
packetdrill peer 198.19.99.1), and runs this module inside the namespace:
the script's system calls go through ``shardstack.shim`` sockets (each call
on a thread, so a blocking one really blocks), the peer's packets are written
with a raw IP socket (the kernel routes them into the TUN), and the stack's
packets are read off the TUN's kernel side with an AF_PACKET socket (the
kernel does not forward them: the peer address is nobody's).  Time is real,
so the tolerance matters as it does for packetdrill on Linux.

The stack runs with its own configuration: sysctl lines are checked but do
not reconfigure it, so a script that needs another setting fails (never
passes silently).  The namespace and everything in it go away afterwards.
"""

from __future__ import annotations

import argparse
import errno as E
import fcntl
import json
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shardstack.core import tcp_info as _tcp_info
from shardstack.core.wire.ipv4 import str_to_ip

from . import packets as P
from . import profile as prof
from .executor import BASE, Executor, Fail, Result
from .script import IcmpSpec, Unsupported, parse_script
from .syscalls import SIOCINQ, SIOCOUTQ, Call, Outcome, Unknown, value

STACK_IP = "198.18.99.2"
KERNEL_IP = "198.18.99.1"
PEER_IP = "198.19.99.1"
IFNAME = "pd0"
ETH_P_ALL = 0x0003
READY_WAIT = 20.0


class LiveCall(Call):
    """A system call on a thread: ``attempt`` reports it once it has returned."""

    def __init__(self, fn) -> None:
        super().__init__(None)
        self.fn = fn
        self.thread: threading.Thread | None = None
        self.outcome: Outcome | None = None

    def _body(self) -> None:
        try:
            self.outcome = self.fn()
        except OSError as e:
            self.outcome = Outcome(-1, e.errno or E.EIO)
        except Unknown as e:
            self.outcome = Outcome(-1, 0, {"unknown": str(e)})

    def attempt(self, now: float) -> Outcome | None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._body, daemon=True)
            self.thread.start()
            self.thread.join(0.005)  # a call that does not block returns at once
        if self.thread.is_alive():
            return None
        out = self.outcome
        if out is not None and "unknown" in out.outs:
            raise Unknown(out.outs["unknown"])
        return out


class LiveLayer:
    """Script fds over shim sockets."""

    def __init__(self, stack_ip: str, peer_ip: str, settings: prof.Settings) -> None:
        self.settings = settings
        self.stack_ip = stack_ip
        self.peer_ip = peer_ip
        self.fds: dict[int, socket.socket] = {}
        self.listening: set[int] = set()
        self.last_fd: int | None = None
        self.conn_fd: int | None = None
        self.bind_port = 8080

    def absorb(self, events: list) -> None:
        pass

    def sock(self, fd: Any) -> socket.socket:
        fd = value(fd)
        self.last_fd = fd
        s = self.fds.get(fd)
        if s is None:
            raise OSError(E.EBADF, os.strerror(E.EBADF))
        return s

    def make(self, name: str, args: list[Any], expected_ret: Any) -> Call:
        fn = getattr(self, "sys_" + name, None)
        if fn is None:
            raise Unknown(f"system call {name}() (live mode)")
        return LiveCall(fn(args, expected_ret))

    @staticmethod
    def _ok(fn) -> Outcome:
        fn()
        return Outcome(0)

    def sys_socket(self, args, expected_ret):
        typ = value(args[1])
        if typ & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) != socket.SOCK_STREAM:
            raise Unknown("socket type other than SOCK_STREAM")

        def run():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # The profile's buffers (tcp_rmem/tcp_wmem maximum, so the window scale):
            # the running stack has no sysctls, its sockets take them one by one.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.rcvbuf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.sndbuf)
            if typ & socket.SOCK_NONBLOCK:
                s.setblocking(False)
            fd = value(expected_ret)
            self.fds[fd] = s
            self.last_fd = fd
            return Outcome(fd)
        return run

    def sys_bind(self, args, expected_ret):
        return lambda: self._ok(lambda: self.sock(args[0]).bind((self.stack_ip, self.bind_port)))

    def sys_listen(self, args, expected_ret):
        def run():
            self.sock(args[0]).listen(value(args[1]))
            self.listening.add(value(args[0]))
            return Outcome(0)
        return run

    def sys_accept(self, args, expected_ret):
        def run():
            conn, _ = self.sock(args[0]).accept()
            fd = value(expected_ret)
            if not isinstance(fd, int) or fd < 0:
                fd = max([*self.fds, 2]) + 1
            self.fds[fd] = conn
            self.conn_fd = fd
            return Outcome(fd)
        return run

    def sys_connect(self, args, expected_ret):
        self.conn_fd = value(args[0])

        def run():
            err = self.sock(args[0]).connect_ex((self.peer_ip, 8080))
            return Outcome(0) if err == 0 else Outcome(-1, err)
        return run

    def _recv(self, args, n, flags=0):
        def run():
            data = self.sock(args[0]).recv(n, flags)
            return Outcome(len(data))
        return run

    def _send(self, args, n, flags=0):
        def run():
            s = self.sock(args[0])
            if s.getblocking() and not flags & socket.MSG_DONTWAIT:
                s.sendall(bytes(n), flags)
                return Outcome(n)
            return Outcome(s.send(bytes(n), flags))
        return run

    def sys_read(self, args, expected_ret):
        return self._recv(args, value(args[2]))

    def sys_recv(self, args, expected_ret):
        return self._recv(args, value(args[2]), value(args[3]) if len(args) > 3 else 0)

    def sys_write(self, args, expected_ret):
        return self._send(args, value(args[2]))

    def sys_send(self, args, expected_ret):
        return self._send(args, value(args[2]), value(args[3]) if len(args) > 3 else 0)

    def sys_sendto(self, args, expected_ret):
        return self.sys_send(args[:4], expected_ret)

    def sys_shutdown(self, args, expected_ret):
        return lambda: self._ok(lambda: self.sock(args[0]).shutdown(value(args[1])))

    def sys_close(self, args, expected_ret):
        def run():
            self.sock(args[0]).close()
            self.fds.pop(value(args[0]), None)
            return Outcome(0)
        return run

    def sys_setsockopt(self, args, expected_ret):
        level, opt, val = value(args[1]), value(args[2]), value(args[3])
        if isinstance(val, list) and len(val) == 1:
            val = val[0]
        elif isinstance(val, dict) and ("l_onoff" in val or "onoff" in val):
            val = struct.pack("ii", val.get("l_onoff", val.get("onoff", 0)),
                              val.get("l_linger", val.get("linger", 0)))
        return lambda: self._ok(lambda: self.sock(args[0]).setsockopt(level, opt, val))

    def sys_getsockopt(self, args, expected_ret):
        level, opt = value(args[1]), value(args[2])
        want = value(args[3]) if len(args) > 3 else ...

        def run():
            s = self.sock(args[0])
            if isinstance(want, dict):
                raw = s.getsockopt(level, opt, 8)
                onoff, linger = struct.unpack("ii", raw[:8])
                keys = ("l_onoff", "l_linger") if "l_onoff" in want else ("onoff", "linger")
                return Outcome(0, outs={"optval": dict(zip(keys, (onoff, linger), strict=True))})
            got = s.getsockopt(level, opt)
            return Outcome(0, outs={"optval": [got] if isinstance(want, list) else got})
        return run

    def sys_fcntl(self, args, expected_ret):
        cmd = value(args[1])

        def run():
            s = self.sock(args[0])
            if cmd == fcntl.F_GETFL:
                return Outcome(os.O_RDWR | (0 if s.getblocking() else os.O_NONBLOCK))
            if cmd == fcntl.F_SETFL:
                s.setblocking(not value(args[2]) & os.O_NONBLOCK)
                return Outcome(0)
            raise Unknown(f"fcntl command {cmd}")
        return run

    def sys_ioctl(self, args, expected_ret):
        req = value(args[1])
        if req not in (SIOCINQ, SIOCOUTQ):
            raise Unknown(f"ioctl request {req:#x}")

        def run():
            s = self.sock(args[0])
            buf = fcntl.ioctl(s.fileno(), req, struct.pack("i", 0))
            return Outcome(0, outs={"optval": [struct.unpack("i", buf)[0]]})
        return run

    def sys_poll(self, args, expected_ret):
        fds = value(args[0])
        timeout = value(args[2])

        def run():
            p = select.poll()
            for f in fds:
                p.register(self.sock(f["fd"]).fileno(), f.get("events", 0))
            ready = dict(p.poll(timeout))
            revents = [ready.get(self.fds[f["fd"]].fileno(), 0) for f in fds]
            return Outcome(sum(1 for r in revents if r), outs={"revents": revents})
        return run


class LiveExecutor(Executor):
    """The virtual executor's rules, on the real clock, against the live stack."""

    def __init__(self, script, settings, ifname: str, verbose: bool = False, log=None) -> None:
        self.t0 = time.monotonic()
        super().__init__(script, settings, verbose, log)
        self.instant_calls = False
        self.grace = 2.0  # real seconds: wait only so long for what never comes
        self.local_ip = str_to_ip(STACK_IP)
        self.remote_ip = str_to_ip(PEER_IP)
        self.captured: queue.Queue = queue.Queue()
        self.cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.cap.bind((ifname, ETH_P_ALL))
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.stop = threading.Event()
        threading.Thread(target=self._capture, daemon=True).start()

    @property
    def now(self) -> float:  # type: ignore[override]
        return BASE + time.monotonic() - self.t0

    @now.setter
    def now(self, _value: float) -> None:
        pass  # real time is not set

    def _capture(self) -> None:
        self.cap.settimeout(0.05)
        while not self.stop.is_set():
            try:
                frame = self.cap.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            stamp = time.monotonic() - self.t0
            if len(frame) >= 20 and frame[0] >> 4 == 4 and frame[9] == 6 \
                    and frame[12:16] == socket.inet_aton(STACK_IP):
                self.captured.put((stamp, frame))

    def close(self) -> None:
        self.stop.set()
        for s in list(self.layer.fds.values()) if self.layer else []:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        self.cap.close()
        self.raw.close()

    def start_stack(self) -> None:
        if self.layer is None:
            self.layer = LiveLayer(STACK_IP, PEER_IP, self.settings)
            self.shard = self.layer  # only checked for "started"

    def _drain(self) -> None:
        while True:
            try:
                stamp, frame = self.captured.get_nowait()
            except queue.Empty:
                return
            w = P.decode(frame, stamp)
            if w is not None:
                self.out.append(w)
                if self.verbose:
                    self.log(f"  {stamp:9.6f} sent     {self._wtext(w)}")

    def step_to(self, t: float) -> bool:
        left = t - self.t()
        if left > 0:
            time.sleep(min(left, 0.001))
        self.collect()
        return self.t() < t

    def run_until(self, t: float) -> None:
        while self.step_to(t):
            pass

    def next_change(self) -> float | None:
        return self.t() + 0.001

    def inbound(self, ev) -> None:
        spec = ev.body
        if isinstance(spec, IcmpSpec):
            self.raw.sendto(self.icmp_frame(ev), (STACK_IP, 0))
            self.collect()
            return
        if self.local_port is None:
            self.local_port = self.layer.bind_port
        ecr_map = self.map_ecr if "." in spec.flags else None
        rport, lport, isn = self.remote_port, self.local_port, self.local_isn
        if spec.sport is not None:
            rport, lport, isn = spec.sport, spec.dport, self.flow_isn.get(spec.sport)
        frame = P.build_inbound(spec, self.remote_ip, self.local_ip, rport, lport, isn or 0,
                                ecr_map)
        if len(frame) > self.settings.mtu:
            # The kernel routes what we inject into the TUN: no packet beyond its MTU
            # (packetdrill writes such GSO packets to its tun directly).
            raise Unsupported(ev.line, f"an inbound packet of {len(frame)} bytes: beyond the "
                                       f"live TUN's MTU of {self.settings.mtu}")
        if self.verbose:
            self.log(f"  {self.t():9.6f} inject   {spec.text[1:].strip()}")
        self.raw.sendto(frame, (STACK_IP, 0))
        self.collect()

    def snapshot(self) -> dict[str, int] | None:
        fd = self.layer.conn_fd if self.layer.conn_fd in self.layer.fds else self.layer.last_fd
        s = self.layer.fds.get(fd)
        if s is None:
            return None
        try:
            raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _tcp_info.TCP_INFO_LEN)
        except OSError:
            return None
        info = _tcp_info.unpack_tcp_info(raw)
        return {k if k.startswith("tcpi_") else "tcpi_" + k: v for k, v in info.items()}


def run_inner(paths: list[str], ifname: str, run_dir: str, verbose: bool,
              tolerance_usecs: int | None = None) -> list[Result]:
    from shardstack import shim

    shim.install(run_dir, strict=True)
    results = []
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else None
    for path in paths:
        t0 = time.monotonic()
        ex = None
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                script = parse_script(f.read(), path)
            ex = LiveExecutor(script, prof.linux(), ifname, verbose, log)
            if tolerance_usecs is not None:
                ex.tol_abs = tolerance_usecs / 1e6
            ex.run()
            r = Result(path, "pass", None, "")
        except Unsupported as e:
            r = Result(path, "skip", e.line, e.why)
        except Fail as e:
            r = Result(path, "fail", e.line, e.reason)
        except Exception as e:  # a runner bug must show, never pass
            r = Result(path, "fail", None, f"runner error {type(e).__name__}: {e}")
        finally:
            if ex is not None:
                ex.close()
        r.seconds = time.monotonic() - t0
        results.append(r)
        time.sleep(0.2)  # let the stack forget the last script's connections
    return results


def run_live(paths: list[str], verbose: bool = False,
             tolerance_usecs: int | None = None) -> list[Result]:
    """Each script against a fresh live stack in a namespace of our own (root)."""
    from shardstack import control, netns

    if os.geteuid() != 0:
        return [Result(p, "skip", None, "--live needs root (network namespace, TUN)")
                for p in paths]
    results = []
    for path in paths:
        with netns.netns(prefix="sspd") as ns:
            run_dir = tempfile.mkdtemp(prefix="sspd-", dir="/tmp")
            os.rmdir(run_dir)
            logf = open(Path(tempfile.gettempdir()) / f"sspd-serve-{os.getpid()}.log", "wb")  # noqa: SIM115
            serve = ns.popen([sys.executable, "-m", "shardstack", "serve", "--workers", "1",
                              "--no-offload", "--tun", IFNAME, "--addr", f"{STACK_IP}/24",
                              "--peer", f"{KERNEL_IP}/24", "--gateway", KERNEL_IP,
                              "--run-dir", run_dir], stdout=logf, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + READY_WAIT
            ready = False
            while time.monotonic() < deadline and serve.poll() is None:
                try:
                    ready = control.call(Path(run_dir) / "control.sock", "hello",
                                         timeout=2)["ready"]
                except OSError:
                    ready = False
                if ready:
                    break
                time.sleep(0.05)
            if not ready:
                results.append(Result(path, "fail", None, "live stack did not start"))
                continue
            inner = ns.run([sys.executable, "-m", "shardstack.packetdrill.live", "--inner",
                            "--ifname", IFNAME, "--run-dir", run_dir]
                           + (["--verbose"] if verbose else [])
                           + ([f"--tolerance-usecs={tolerance_usecs}"] if tolerance_usecs else [])
                           + [os.path.abspath(path)],
                           check=False, timeout=600)
            if verbose and inner.stderr:
                sys.stderr.write(inner.stderr)
            try:
                rows = json.loads(inner.stdout)
                results.extend(Result(path, r["status"], r["line"], r["reason"], r["seconds"])
                               for r in rows)
            except ValueError:
                results.append(Result(path, "fail", None, "live runner failed: "
                                      + (inner.stderr or "")[-300:]))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardstack.packetdrill.live")
    p.add_argument("--inner", action="store_true", required=True)
    p.add_argument("--ifname", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--tolerance-usecs", type=int)
    p.add_argument("scripts", nargs="+")
    args = p.parse_args(argv)
    results = run_inner(args.scripts, args.ifname, args.run_dir, args.verbose,
                        args.tolerance_usecs)
    print(json.dumps([r.as_dict() for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
