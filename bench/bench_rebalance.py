"""Live rebalancing figures: the pause a bucket move imposes on its
connections, the frames held meanwhile, and how fast --rebalance auto evens
a skewed load.

    sudo .venv/bin/python bench/bench_rebalance.py [--conns N] [--moves M] [--rounds R]

Starts `shardstack serve --workers 2 --echo 7` in a network namespace of its
own (198.18.0.0/15) and, from the kernel side:

1. by hand: N echo connections kept busy (a thread sends 1 KiB and reads the
   echo on each in turn), then M moves of the busiest buckets back and forth
   (the `reta_move` control op). Per move: the pause (from the old worker's
   export to the new worker's install: the time the bucket's connections
   were served by nobody), the pause per connection moved, and the frames the
   new worker held and replayed.
2. auto: a second stack with --rebalance auto; 16 flows whose hashes land on
   8 of worker 0's buckets, driven as fast as the client goes; the time from
   the start of the load until both workers' CPU (the stack's own per-worker
   accounting) is within +-20 % of the mean over a 1 s window.

There is no kernel counterpart to compare with (Linux does not move a TCP
connection between CPUs' socket tables; its RSS is static): the figures
stand alone. Bounded: every wait and loop has a time limit. Figures are
printed, never asserted (tests/interop/test_migrate.py asserts behaviour).
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
import threading
import time
from pathlib import Path

from shardstack.netio import rss

from shardstack import control, netns
from shardstack.migrate import bucket_of

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
LIMIT = 120.0  # s: bound on each phase


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


@contextlib.contextmanager
def stack(extra: list[str]):
    with netns.netns(prefix="ssb") as ns:
        net = netns.next_subnet()
        peer, addr = str(net.network_address + 1), str(net.network_address + 2)
        run_dir = tempfile.mkdtemp(prefix="ssb-", dir="/tmp")
        os.rmdir(run_dir)
        proc = ns.popen([sys.executable, "-m", "shardstack", "serve", "--workers", "2",
                         "--tun", "ssb0", "--peer", f"{peer}/{net.prefixlen}",
                         "--addr", f"{addr}/{net.prefixlen}", "--run-dir", run_dir,
                         "--echo", "7", *extra],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctl = Path(run_dir) / "control.sock"
        deadline = time.monotonic() + 30
        while True:
            try:
                if control.call(ctl, "hello", timeout=2)["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("stack not ready in 30 s")
            time.sleep(0.05)
        try:
            yield ns, peer, addr, ctl
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def connect_all(ns, peer, addr, ports) -> list[socket.socket]:
    out = []
    for p in ports:
        with in_netns(ns.name):
            s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((peer, p))
        s.settimeout(10)
        s.connect((addr, 7))
        out.append(s)
    return out


class Pinger:
    """Round-robin 1 KiB echoes over every connection until stopped (bounded)."""

    def __init__(self, socks: list[socket.socket], size: int = 1024) -> None:
        self.socks = socks
        self.msg = os.urandom(size)
        self.stop = threading.Event()
        self.rounds = 0
        self.error = ""
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        end = time.monotonic() + LIMIT
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                for s in self.socks:
                    s.sendall(self.msg)
                    got = b""
                    while len(got) < len(self.msg):
                        chunk = s.recv(len(self.msg) - len(got))
                        if not chunk:
                            raise ConnectionError("EOF")
                        got += chunk
                    if got != self.msg:
                        raise AssertionError("echo differs")
                self.rounds += 1
        except (OSError, AssertionError) as e:
            self.error = repr(e)

    def close(self) -> None:
        self.stop.set()
        self.t.join(15)
        for s in self.socks:
            s.close()


def by_hand(args) -> None:
    with stack([]) as (ns, peer, addr, ctl):
        reta = rss.make_reta(2)
        ports = list(range(30000, 30000 + args.conns))
        socks = connect_all(ns, peer, addr, ports)
        pinger = Pinger(socks)
        count: dict[int, int] = {}
        for p in ports:
            b = bucket_of(_ip(addr), 7, _ip(peer), p)
            count[b] = count.get(b, 0) + 1
        busiest = sorted(count, key=lambda b: -count[b])[:max(1, args.moves // 4)]
        recs = []
        try:
            time.sleep(0.5)
            for i in range(args.moves):
                b = busiest[i % len(busiest)]
                rec = control.call(ctl, "reta_move", bucket=b, worker=1 - reta[b], timeout=15)
                reta[b] = 1 - reta[b]
                recs.append(rec)
                time.sleep(0.05)
        finally:
            pinger.close()
        if pinger.error:
            print(f"echo failed during the moves: {pinger.error}")
        moved = [r for r in recs if r["conns"]]
        per_conn = [r["pause"] / r["conns"] for r in moved]
        pauses = [r["pause"] for r in moved]
        held = [r["held"] for r in recs]
        total = [r["seconds"] for r in recs]

        def ms(xs: list[float]) -> str:
            return (f"min {min(xs) * 1e3:7.2f}  median {statistics.median(xs) * 1e3:7.2f}  "
                    f"max {max(xs) * 1e3:7.2f} ms")

        print(f"by hand: {len(recs)} moves of {len(busiest)} buckets "
              f"({statistics.mean(r['conns'] for r in recs):.1f} connections each), "
              f"{args.conns} busy echo connections, {pinger.rounds} echo rounds")
        print(f"  pause per move:        {ms(pauses)}")
        print(f"  pause per connection:  {ms(per_conn)}")
        print(f"  whole move (sup.):     {ms(total)}")
        print(f"  frames held per move:  min {min(held)}  median {statistics.median(held)}  "
              f"max {max(held)}")


def auto(args) -> None:
    with stack(["--rebalance", "auto"]) as (ns, peer, addr, ctl):
        mine = [b for b, w in enumerate(rss.make_reta(2)) if w == 0][:8]
        per = dict.fromkeys(mine, 0)
        ports, p = [], 30000
        while len(ports) < 16:
            b = bucket_of(_ip(addr), 7, _ip(peer), p)
            if b in per and per[b] < 2:
                per[b] += 1
                ports.append(p)
            p += 1
        socks = connect_all(ns, peer, addr, ports)
        pinger = Pinger(socks, size=16384)

        def cpu() -> list[float]:
            return [w["cpu_seconds"] for w in control.call(ctl, "reta", timeout=10)["workers"]]

        t0 = time.monotonic()
        last_t, last = t0, cpu()
        converged = None
        try:
            while time.monotonic() - t0 < 30:
                time.sleep(1.0)
                now_t, now = time.monotonic(), cpu()
                rate = [(b - a) / (now_t - last_t) for a, b in zip(last, now, strict=True)]
                last_t, last = now_t, now
                mean = sum(rate) / 2
                if mean > 0.05 and all(abs(r - mean) <= 0.2 * mean for r in rate):
                    converged = now_t - t0
                    break
            rep = control.call(ctl, "reta", timeout=10)
        finally:
            pinger.close()
        autos = [m for m in rep["migrations"]["last"] if m["by"] == "auto"]
        print(f"auto: converged within +-20 % in {converged:.1f} s" if converged is not None
              else "auto: did not converge in 30 s")
        for m in autos:
            print(f"  move {m['bucket']} {m['from']}->{m['to']}: {m['conns']} connections, "
                  f"pause {m['pause'] * 1e3:.2f} ms, held {m['held']} frames")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--moves", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1, help="repeat both phases")
    ap.add_argument("--skip-auto", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace and a TUN)")
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average, {os.cpu_count()} CPUs)")
    for _ in range(args.rounds):
        by_hand(args)
        if not args.skip_auto:
            auto(args)


if __name__ == "__main__":
    main()
