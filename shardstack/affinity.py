"""Per-CPU placement: worker i runs on CPU i, the kernel's share elsewhere.

The design is one worker per CPU (docs/architecture.md, "Processes"), like a
NIC's receive queue i whose interrupt is bound to CPU i. Left to the
scheduler, a busy worker and the processes it feeds (the app on the stack,
the kernel-side peer) migrate and share a CPU by turns, and throughput
flips between two levels from run to run. Pinning makes it one level.

With TUN the kernel's receive processing of every frame a worker writes
(routing, the peer's TCP, waking the reader) runs inside the worker's
write() unless Receive Packet Steering moves it: the kernel queues the
frame to another CPU's backlog (get_rps_cpu, by rx queue = the worker's TUN
queue). `steer_tun_rps` points each worker's queue at the CPUs that are not
the worker's, so the worker's own CPU is left for the stack.
"""

from __future__ import annotations

import os
import socket

SYS_NET = "/sys/class/net"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def worker_cpu(wid: int, cpus: list[int]) -> int:
    """The CPU worker `wid` is pinned to: the wid-th usable one, round robin."""
    return cpus[wid % len(cpus)]


def pin_worker(wid: int, cpus: list[int] | None = None) -> int | None:
    """Pin the calling process to worker `wid`'s CPU; None if it could not be."""
    cpus = cpus if cpus is not None else usable_cpus()
    cpu = worker_cpu(wid, cpus)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


def cpu_mask(cpus: set[int]) -> str:
    """`rps_cpus` format: hexadecimal bitmap, comma every 32 bits (bitmap_parse)."""
    bits = sum(1 << c for c in cpus)
    words = []
    while True:
        words.append(f"{bits & 0xFFFFFFFF:08x}")
        bits >>= 32
        if not bits:
            break
    return ",".join(reversed(words))


def rps_masks(workers: int, cpus: list[int]) -> dict[int, set[int]]:
    """Rx queue -> the CPUs its frames are processed on: all but its worker's.

    Empty when there is no other CPU to move work to.
    """
    masks = {}
    for wid in range(workers):
        others = set(cpus) - {worker_cpu(wid, cpus)}
        if others:
            masks[wid] = others
    return masks


def steer_tun_rps(ifname: str, workers: int, cpus: list[int] | None = None,
                  sys_net: str = SYS_NET) -> bool:
    """Write each worker queue's `rps_cpus` for TUN `ifname` (needs root).

    Only if /sys shows this process's network namespace: sysfs is bound to
    the namespace it was mounted in, and a same-named device elsewhere must
    not be touched (checked by ifindex). False if nothing was written.
    """
    cpus = cpus if cpus is not None else usable_cpus()
    base = os.path.join(sys_net, ifname)
    try:
        with open(os.path.join(base, "ifindex")) as f:
            if int(f.read()) != socket.if_nametoindex(ifname):
                return False
    except (OSError, ValueError):
        return False
    wrote = False
    for queue, cpuset in rps_masks(workers, cpus).items():
        try:
            with open(os.path.join(base, "queues", f"rx-{queue}", "rps_cpus"), "w") as f:
                f.write(cpu_mask(cpuset))
            wrote = True
        except OSError:
            return wrote
    return wrote
