"""The netio child of `shardstack serve`: netio.process.NetioProcess on the supervisor's device.

netio.process has its own `main(argv)` that opens the device by name. Under
the supervisor that cannot work for TUN: the supervisor already holds the
(single-queue) TUN open so it survives a netio restart, and a second
TUNSETIFF on it fails with EBUSY. So this child opens what the supervisor
describes (`netio.serve_devices.netio_rx`: the inherited TUN fd, its own
packet socket, or with direct RX the fanout member that gets everything that
is not TCP/IPv4), builds a Dispatcher for our address and runs
`NetioProcess`. In AF_PACKET mode netio also keeps the neighbour table
(filled from ARP only, netio.neighbour) that the workers mirror, and binds
the PULL their neighbour messages arrive on (netio.process); on exit it
removes that endpoint with its control endpoint.

Start-up (description on stdin, parent-death signal, ready byte) is the
workers' too: shardstack.child.
"""

from __future__ import annotations

import os
import signal
import threading

from shardstack.child import ChildDesc, child_main
from shardstack.core.wire.icmpv6 import ALL_NODES, multicast_mac
from shardstack.netio.device import innermost, join_multicast
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.process import NetioProcess, control_endpoint, neigh_endpoint
from shardstack.netio.serve_devices import device_mac, netio_rx


def run(desc: ChildDesc) -> int:
    cfg = desc.cfg
    dev = netio_rx(desc.dev, cfg.ifname, pcap=cfg.pcap, impair=cfg.impair)
    mac = device_mac(dev, cfg.ifname) if dev.l2 else None
    disp = Dispatcher(desc.workers, [cfg.addr.ip] if cfg.addr else [], l2=dev.l2, mac=mac,
                      reta=desc.reta, addrs6=[cfg.addr6.ip] if cfg.addr6 else [])
    if dev.l2 and disp.snm6:
        # NDP: our solicited-node groups and all-nodes reach this socket
        join_multicast(innermost(dev).sock, cfg.ifname,  # type: ignore[attr-defined]
                       [multicast_mac(g) for g in (*disp.snm6, ALL_NODES)])
    proc = NetioProcess(dev, disp, cfg.run_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    desc.ready()
    try:
        proc.run(stop)
    finally:
        proc.close()
        dev.close()  # our copy of a TUN fd: the supervisor's keeps the device
        _unlink_endpoints(proc.rundir)
    return 0


def _unlink_endpoints(rundir: str) -> None:
    """libzmq leaves ipc files behind: remove our control and neighbour endpoints."""
    for ep in (control_endpoint(rundir), neigh_endpoint(rundir)):
        try:
            os.unlink(ep.removeprefix("ipc://"))
        except FileNotFoundError:
            pass


def main() -> int:
    return child_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
