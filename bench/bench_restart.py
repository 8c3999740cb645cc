"""How long a killed worker's flows go unserved: kill -9 to the first new
connection its replacement serves.

    sudo .venv/bin/python bench/bench_restart.py [--rounds N] [--workers W]

Starts `shardstack serve` (echo on port 7) in a network namespace of its own
(198.18.0.0/15), then N times: kill -9 worker 1, and from the kernel side
connect, every 10 ms, from a source port whose flow hashes to worker 1, until
an echo round trip succeeds. Prints the time from the kill to that echo
(min / median / max), and how long the supervisor took to report the
replacement ready. The replacement is the supervisor's warm spare
(shardstack.spare) when one is ready, else a fresh interpreter: `--gap 0.2`
measures the latter. Bounded: each round gives up after 10 s. The figures are
printed, never asserted (tests/interop/test_operate.py asserts the one-second
bound once).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardstack.netio import rss

from shardstack import control, netns

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
ROUND_LIMIT = 10.0


@contextlib.contextmanager
def in_netns(name: str):
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def _ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "big")


def echo_once(ns: str, peer: str, addr: str, sport: int, timeout: float) -> bool:
    with in_netns(ns):
        s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((peer, sport))
        s.settimeout(timeout)
        s.connect((addr, 7))
        s.sendall(b"ping")
        return s.recv(10) == b"ping"
    except OSError:
        return False
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gap", type=float, default=3.0,
                    help="seconds between kills (the supervisor's warm spare is back about "
                    "1.5 s after it was used; a shorter gap measures cold starts)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace and a TUN)")
    with netns.netns(prefix="ssr") as ns:
        net = netns.next_subnet()
        peer, addr = str(net.network_address + 1), str(net.network_address + 2)
        run_dir = tempfile.mkdtemp(prefix="ssr-", dir="/tmp")
        os.rmdir(run_dir)
        proc = ns.popen([sys.executable, "-m", "shardstack", "serve", "--workers",
                         str(args.workers), "--tun", "ssr0", "--peer", f"{peer}/{net.prefixlen}",
                         "--addr", f"{addr}/{net.prefixlen}", "--run-dir", run_dir, "--echo", "7"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctl = Path(run_dir) / "control.sock"

        def ready() -> bool:
            try:
                return bool(control.call(ctl, "hello", timeout=2)["ready"])
            except OSError:
                return False

        deadline = time.monotonic() + 20
        while not ready():
            if time.monotonic() > deadline:
                sys.exit("stack not ready in 20 s")
            time.sleep(0.05)
        reta = rss.make_reta(args.workers)
        ports = (p for p in range(20000, 60000)
                 if rss.flow_to_worker(_ip(peer), _ip(addr), p, 7, reta) == 1)
        served, readies = [], []
        try:
            for _ in range(args.rounds):
                victim = control.call(ctl, "stats")["workers"][1]["proc"]["pid"]
                t0 = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                ok = False
                while not ok and time.monotonic() - t0 < ROUND_LIMIT:
                    ok = echo_once(ns.name, peer, addr, next(ports), 0.2)
                    if not ok:
                        time.sleep(0.01)
                served.append(time.monotonic() - t0)
                while not ready() and time.monotonic() - t0 < ROUND_LIMIT:
                    time.sleep(0.01)
                readies.append(time.monotonic() - t0)
                time.sleep(args.gap)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)

    def fmt(xs: list[float]) -> str:
        return (f"min {min(xs) * 1000:6.0f} ms  median {statistics.median(xs) * 1000:6.0f} ms  "
                f"max {max(xs) * 1000:6.0f} ms")

    print(f"kill -9 -> new connection served by the replacement: {fmt(served)}")
    print(f"kill -9 -> supervisor reports ready again:          {fmt(readies)}")


if __name__ == "__main__":
    main()
