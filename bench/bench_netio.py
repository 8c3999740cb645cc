"""netio's dispatch rate to 2 workers, against a raw TUN read/write loop, same run.

Creates its own network namespace and TUN device (198.18.0.1 kernel side,
198.18.0.2 "us"). One offered load for every row: a sender process in the
namespace writes prebuilt TCP/IPv4 ACK frames (256 flows, so both workers get
traffic) onto the TUN with an AF_PACKET socket, i.e. the frames the stack
reads, as fast as it can for DURATION seconds. Rows:

  raw read        TunDevice.recv_batch until EAGAIN, frames counted, nothing else
  raw read+write  the same, writing every batch back (send_batch), the shape
                  of a forwarding loop
  netio -> 2 PULL NetioProcess (Dispatcher, RSS, one zmq message per worker
                  per batch) in this process; two drain processes count what
                  they receive (what netio costs on top of the raw read)
  serve rx=netio  `shardstack serve --tun` with 2 real workers: frames/s
  serve rx=direct handed to workers (`stats` per_worker) with netio reading
                  the TUN, and with the kernel steering to per-worker queues
                  (SHARDSTACK_RX); "workers took" is what the engines got
                  through in the same time (each stray ACK costs a RST)
  tun_tx (bench_tun.bench_tx)  raw small-frame write rate, for scale

Plus the rows of bench_tun's UDP receive loop (`rx tun read`), its reference.
Every loop is bounded by DURATION (and a hard cap per phase). Needs root.
Usage: python bench/bench_netio.py [DURATION_SECONDS]
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tun  # noqa: E402  (bench/ is not a package)
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4  # noqa: E402
from shardstack.netio.device import TunDevice  # noqa: E402
from shardstack.netio.dispatch import Dispatcher  # noqa: E402
from shardstack.netio.process import NetioProcess, worker_endpoint  # noqa: E402

KERNEL, US = bench_tun.KERNEL, bench_tun.US
KERNEL_I, US_I = bench_tun.KERNEL_I, bench_tun.US_I
TUN = "ssbn0"
FLOWS = 256
SLACK = 5.0  # seconds beyond DURATION any phase may take before it is cut

# AF_PACKET on the TUN: what we send is what the TUN's reader gets.
SENDER = """
import socket, sys, time
frames = [bytes.fromhex(h) for h in sys.argv[3].split(",")]
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind((sys.argv[2], 0x0800))
end = time.monotonic() + float(sys.argv[1])
n = refused = 0
while time.monotonic() < end:
    for f in frames:
        try:
            s.send(f)
            n += 1
        except OSError:
            refused += 1
print(n, refused)
"""

DRAIN = """
import sys, time, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.PULL)
s.setsockopt(zmq.RCVHWM, 100000)
s.bind(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    if s.poll(100):
        n += len(s.recv_multipart(copy=False)) - 1
print(n, flush=True)
"""


def frames_hex() -> str:
    frames = [build_tcp_ipv4(KERNEL_I, US_I, 30000 + i, 5001, 1, 1, ACK, 1000)
              for i in range(FLOWS)]
    return ",".join(f.hex() for f in frames)


def start_sender(ns: str, duration: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, str(duration), TUN,
         frames_hex()], stdout=subprocess.PIPE, text=True)


def sender_result(p: subprocess.Popen, duration: float) -> tuple[int, int]:
    out = p.communicate(timeout=duration + SLACK)[0].split()
    return int(out[0]), int(out[1])


def drain_dev(dev: TunDevice) -> None:
    for _ in range(10000):
        if not dev.recv_batch(64):
            return


def raw_loop(ns: str, dev: TunDevice, duration: float, write: bool) -> dict:
    drain_dev(dev)
    sender = start_sender(ns, duration)
    n = 0
    t0 = time.monotonic()
    end = t0 + duration + SLACK
    while time.monotonic() < end and sender.poll() is None:
        batch = dev.recv_batch(64)
        if batch:
            n += len(batch)
            if write:
                dev.send_batch([f for f, _ in batch])
        else:
            select.select([dev.fd], [], [], 0.05)
    elapsed = time.monotonic() - t0
    sent, refused = sender_result(sender, duration)
    drain_dev(dev)
    return {"frames": n, "rate": n / elapsed, "offered": sent / duration, "refused": refused}


def netio_loop(ns: str, dev: TunDevice, duration: float) -> dict:
    drain_dev(dev)
    with tempfile.TemporaryDirectory(prefix="ssbn-") as rundir:
        drains = [subprocess.Popen([sys.executable, "-c", DRAIN, worker_endpoint(rundir, i),
                                    str(duration + 2.0)], stdout=subprocess.PIPE, text=True)
                  for i in range(2)]
        for d in drains:  # bound before netio connects: nothing dropped for a late bind
            assert d.stdout.readline().strip() == "ready"
        proc = NetioProcess(dev, Dispatcher(2, [US_I]), rundir, sndhwm=100000)
        sender = start_sender(ns, duration)
        t0 = time.monotonic()
        end = t0 + duration + SLACK
        while time.monotonic() < end and sender.poll() is None:
            proc.step(0.05)
        elapsed = time.monotonic() - t0
        proc.step(0)
        sent, refused = sender_result(sender, duration)
        got = [int(d.communicate(timeout=duration + SLACK)[0].split()[-1]) for d in drains]
        st = proc.stats
        proc.close()
    return {"frames": st.rx_frames, "rate": sum(st.zmq_sent) / elapsed,
            "per_worker": list(st.zmq_sent), "dropped": sum(st.zmq_dropped),
            "received": got, "offered": sent / duration, "refused": refused}


def serve_loop(ns: str, duration: float, rx: str) -> dict:
    """The real thing: shardstack serve --tun with 2 workers; `rx` is
    SHARDSTACK_RX ("netio": netio reads and forwards; "direct": the kernel
    steers to per-worker TUN queues, netio only sees the rest)."""
    run_dir = tempfile.mkdtemp(prefix="ssbn-run-")
    os.rmdir(run_dir)
    argv = [sys.executable, "-m", "shardstack", "serve", "--workers", "2", "--tun", TUN,
            "--addr", f"{US}/24", "--peer", f"{KERNEL}/24", "--run-dir", run_dir]
    serve = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                             env={**os.environ, "SHARDSTACK_RX": rx},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stats() -> dict | None:
        r = subprocess.run([sys.executable, "-m", "shardstack", "stats", "--run-dir", run_dir,
                            "--json"], capture_output=True, text=True, timeout=20)
        return json.loads(r.stdout) if r.returncode == 0 else None

    try:
        deadline = time.monotonic() + 30
        s = None
        while time.monotonic() < deadline and serve.poll() is None:
            s = stats()
            if s and all(w["ready"] for w in s["workers"]) and s["netio"]["ready"]:
                break
            time.sleep(0.2)
        else:
            return {"error": "serve not ready"}
        d0 = s["netio"]["counters"]["dispatch"]["per_worker"]
        w0 = [w["counters"]["frames_in"] for w in s["workers"]]
        sender = start_sender(ns, duration)
        t0 = time.monotonic()
        sent, refused = sender_result(sender, duration)
        elapsed = time.monotonic() - t0
        s = stats()
        d1 = s["netio"]["counters"]["dispatch"]["per_worker"]
        w1 = [w["counters"]["frames_in"] for w in s["workers"]]
        disp = [b - a for a, b in zip(d0, d1, strict=True)]
        return {"rate": sum(disp) / elapsed, "per_worker": disp,
                "worker_in": [b - a for a, b in zip(w0, w1, strict=True)],
                "dropped": sum(s["netio"]["counters"]["netio"]["zmq_dropped"]),
                "offered": sent / duration, "refused": refused}
    finally:
        serve.terminate()
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(5)


def row(name: str, r: dict, extra: str = "") -> None:
    if "error" in r:
        print(f"{name:<22} {r['error']}")
        return
    print(f"{name:<22} {r['rate']:12,.0f} frames/s   offered {r['offered']:10,.0f}/s  {extra}")


def main(duration: float = 3.0) -> int:
    if os.geteuid() != 0:
        print("bench_netio: needs root", file=sys.stderr)
        return 2
    duration = min(max(duration, 0.5), 30.0)
    ns = f"ssbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        dev = bench_tun.in_netns(ns, lambda: TunDevice(TUN, 1500, vnet_hdr=False))
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{KERNEL}/24", "dev", TUN], check=True)
        print(f"-- {FLOWS} TCP flows of 40-byte ACKs written onto TUN {TUN}, {duration:g} s each")
        try:
            r = raw_loop(ns, dev, duration, write=False)
            row("raw read", r)
            r = raw_loop(ns, dev, duration, write=True)
            row("raw read+write", r)
            r = netio_loop(ns, dev, duration)
            row("netio -> 2 PULL", r, f"per worker {r['per_worker']}, zmq dropped "
                f"{r['dropped']}, drains got {r['received']}")
            print("-- bench_tun reference rows (UDP from the kernel's socket layer)")
            bench_tun.bench_rx(ns, dev, duration)
            bench_tun.bench_tx(dev, duration)
        finally:
            dev.close()
        print("-- shardstack serve --tun, 2 workers (real engines; each stray ACK gets a RST)")
        for rx in ("netio", "direct"):
            r = serve_loop(ns, duration, rx)
            row(f"serve rx={rx}", r, "" if "error" in r else
                f"per worker {r['per_worker']}, workers took {r['worker_in']}, "
                f"zmq dropped {r['dropped']}")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0))
