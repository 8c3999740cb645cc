"""Raw TUN read/write loop rate: the baseline netio is compared against.

Creates its own network namespace with a TUN device (198.18.0.1 kernel side,
198.18.0.2 "us"), then measures, each for DURATION seconds:

  rx   the kernel (a sender process in the netns) floods UDP datagrams at us;
       we read them with TunDevice.recv_batch (read until EAGAIN).
  tx   we write small UDP/IPv4 frames with TunDevice.send_batch.
  gso  (vnet_hdr) we write 64 KB TCP super-segments with send_gso and report
       segments/s as the kernel sees them (bytes / 1448), to show the lever.
  disp the pure Dispatcher on 64-frame TCP batches (no I/O), for scale.
  loop NetioProcess.step on an in-memory device: dispatch + ZeroMQ to two
       PULL sockets (the netio overhead on top of the raw device read).

Needs root. Usage: python bench/bench_tun.py [DURATION_SECONDS]
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
import threading
import time
import uuid

from scapy.layers.inet import IP, UDP
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4
from shardstack.netio.device import TunDevice
from shardstack.netio.dispatch import Dispatcher

KERNEL, US = "198.18.0.1", "198.18.0.2"
KERNEL_I, US_I = 0xC6120001, 0xC6120002
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SENDER = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.0.1", 40000))
msg = b"x" * 64
n = 0
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(msg, ("198.18.0.2", 9))
            n += 1
        except OSError:
            pass
print(n)
"""


def in_netns(ns: str, fn):
    out: dict = {}

    def body():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        out["v"] = fn()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out["v"]


def bench_rx(ns: str, dev: TunDevice, duration: float) -> None:
    sender = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, str(duration)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    n = 0
    t0 = time.monotonic()
    end = t0 + duration + 1.0
    while time.monotonic() < end and sender.poll() is None:
        batch = dev.recv_batch(64)
        if batch:
            n += len(batch)
        else:
            select.select([dev.fd], [], [], 0.05)
    while dev.recv_batch(64):
        pass
    sent = int(sender.communicate(timeout=10)[0].strip() or 0)
    elapsed = time.monotonic() - t0
    print(f"rx  tun read           {n / elapsed:12,.0f} frames/s  "
          f"(kernel sent {sent / duration:,.0f}/s, read {n}/{sent})")  # fmt: skip


def bench_tx(dev: TunDevice, duration: float) -> None:
    frame = bytes(IP(src=US, dst=KERNEL) / UDP(sport=9, dport=9) / (b"y" * 64))
    batch = [frame] * 64
    n = 0
    t0 = time.monotonic()
    end = t0 + duration
    while time.monotonic() < end:
        n += dev.send_batch(batch)
    elapsed = time.monotonic() - t0
    print(f"tx  tun write          {n / elapsed:12,.0f} frames/s  ({len(frame)} B frames)")


def bench_gso(dev: TunDevice, duration: float) -> None:
    payload = bytes(65535 - 40)
    pkt = build_tcp_ipv4(US_I, KERNEL_I, 45000, 5999, 1, 1, ACK, 65535, payload=payload)
    n = 0
    t0 = time.monotonic()
    end = t0 + duration
    while time.monotonic() < end:
        n += dev.send_gso(pkt, 1448)
    elapsed = time.monotonic() - t0
    segs = n * (len(payload) // 1448 + 1) / elapsed
    # Local delivery does not segment (the unmatched super-segment is reset
    # whole), so this is the write-path ceiling, not a goodput figure.
    print(f"gso tun write 64 KB     {n / elapsed:12,.0f} writes/s  = {segs:,.0f} MSS-segments/s "
          f"equivalent, {n * len(payload) * 8 / elapsed / 1e9:.2f} Gbit/s offered")  # fmt: skip


def bench_dispatch(duration: float) -> None:
    d = Dispatcher(4, [US_I])
    batch = [
        (build_tcp_ipv4(KERNEL_I, US_I, 30000 + i, 80, 1, 1, ACK, 1000), 0) for i in range(64)
    ]
    n = 0
    t0 = time.monotonic()
    end = t0 + duration
    while time.monotonic() < end:
        d.dispatch(batch)
        n += 64
    elapsed = time.monotonic() - t0
    print(f"disp Dispatcher only    {n / elapsed:12,.0f} frames/s  "
          f"({elapsed / n * 1e9:,.0f} ns/frame)")  # fmt: skip


def bench_netio_loop(duration: float) -> None:
    """NetioProcess.step over an in-memory device refilled with TCP frames:
    dispatch + one zmq multipart message per worker per batch, 2 workers
    (PULL sockets drained by a thread)."""
    import tempfile

    import zmq
    from shardstack.netio.device import LoopbackDevice
    from shardstack.netio.process import NetioProcess, worker_endpoint

    frames = [build_tcp_ipv4(KERNEL_I, US_I, 30000 + i, 80, 1, 1, ACK, 1000) for i in range(64)]
    with tempfile.TemporaryDirectory() as rundir:
        ctx = zmq.Context()
        pulls = []
        for i in range(2):
            s = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 100000)
            s.bind(worker_endpoint(rundir, i))
            pulls.append(s)
        got = [0]
        stop = threading.Event()

        def drain():
            poller = zmq.Poller()
            for s in pulls:
                poller.register(s, zmq.POLLIN)
            while not stop.is_set():
                for s, _ in poller.poll(50):
                    got[0] += len(s.recv_multipart()) - 1

        t = threading.Thread(target=drain)
        t.start()
        dev = LoopbackDevice(capacity=1 << 20)
        proc = NetioProcess(dev, Dispatcher(2, [US_I]), rundir, ctx=ctx, sndhwm=100000)
        n = 0
        t0 = time.monotonic()
        end = t0 + duration
        while time.monotonic() < end:
            for f in frames * 16:
                dev.rxq.append((f, 0))
            n += proc.step(0)
        elapsed = time.monotonic() - t0
        stop.set()
        t.join()
        proc.close()
        for s in pulls:
            s.close(0)
        ctx.term()
    print(f"loop netio step (mem)   {n / elapsed:12,.0f} frames/s  "
          f"(zmq dropped {sum(proc.stats.zmq_dropped)})")  # fmt: skip


def main(duration: float = 2.0) -> int:
    if os.geteuid() != 0:
        print("bench_tun: needs root", file=sys.stderr)
        return 2
    ns = f"ssbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for vnet in (False, True):
            name = "ssbtun1" if vnet else "ssbtun0"
            dev = in_netns(ns, lambda n=name, v=vnet: TunDevice(n, 1500, vnet_hdr=v))
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{KERNEL}/24", "dev", name], check=True)
            print(f"-- TUN {name} vnet_hdr={vnet}")
            try:
                bench_rx(ns, dev, duration)
                bench_tx(dev, duration)
                if vnet:
                    bench_gso(dev, duration)
            finally:
                dev.close()
        bench_dispatch(duration)
        bench_netio_loop(duration)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0))
