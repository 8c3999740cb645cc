"""The netio child of `shardstack serve`: netio.process.NetioProcess on the supervisor's device.

netio.process has its own `main(argv)` that opens the device by name. Under
the supervisor that cannot work for TUN: the supervisor already holds the
(single-queue) TUN open so it survives a netio restart, and a second
TUNSETIFF on it fails with EBUSY. So this adapter builds the same stack of
objects around the inherited fd: TunDevice.from_fd, then the wrappers in
`make_device`'s order (Trace, Impair, Pcap, device), a Dispatcher for our
address, and `NetioProcess.run`. In AF_PACKET mode netio opens its own
receive socket (`PacketDevice(ifname)`), as `make_device` would, or, with
direct RX, adopts the supervisor's fanout member that gets everything that is
not TCP/IPv4 (netio/fanout.py). There netio also keeps the neighbour table
(filled from ARP only, netio.neighbour) that the workers mirror, and binds
the PULL their neighbour messages arrive on (netio.process); on exit it
removes that endpoint with its control endpoint.

The supervisor starts it as `python -m shardstack.netio_adapter` with the
worker's JSON description on stdin (see shardstack.worker).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from shardstack.config import ServeConfig


def build_device(cfg: ServeConfig, tx: dict[str, Any]):
    """The device netio reads, wrapped as `netio.process.make_device` does."""
    from shardstack.netio.device import PacketDevice, TunDevice
    from shardstack.netio.impair import Impair
    from shardstack.netio.pcap import Pcap

    if tx["kind"] == "tun":
        dev = TunDevice.from_fd(tx["fd"], cfg.ifname, tx["mtu"], tx["vnet_hdr"])
    elif tx.get("rx_fd") is not None:
        # Direct RX: we are the fanout group's last member and get only what
        # is not TCP/IPv4 (ARP, ICMP, fragments); workers read their own,
        # and get ICMP errors about their flows from us (netio.dispatch).
        import socket

        dev = PacketDevice(cfg.ifname, vnet_hdr=tx.get("vnet_hdr", False),
                           sock=socket.socket(fileno=tx["rx_fd"]))
    else:
        dev = PacketDevice(cfg.ifname, rx=True, vnet_hdr=tx.get("vnet_hdr", False))
    if cfg.pcap:
        from shardstack.worker import SharedPcapFile

        dev = Pcap(dev, SharedPcapFile(cfg.pcap))
    if cfg.impair:
        dev = Impair(dev, cfg.impair)
    return dev


def _mac_of(dev, ifname: str) -> bytes:
    while hasattr(dev, "inner"):
        dev = dev.inner
    return getattr(dev, "mac", None) or interface_mac(ifname)


def interface_mac(ifname: str) -> bytes:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def run(desc: dict[str, Any]) -> int:
    from shardstack.netio.dispatch import Dispatcher
    from shardstack.netio.process import NetioProcess

    cfg = ServeConfig.from_dict(desc["config"])
    dev = build_device(cfg, desc["tx"])
    mac = _mac_of(dev, cfg.ifname) if dev.l2 else None
    disp = Dispatcher(desc["workers"], [cfg.addr.ip], l2=dev.l2, mac=mac, reta=desc["reta"])
    proc = NetioProcess(dev, disp, cfg.run_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.write(desc["ready_fd"], b"1")
    os.close(desc["ready_fd"])
    try:
        proc.run(stop)
    finally:
        proc.close()
        dev.close()  # our copy of a TUN fd: the supervisor's keeps the device
        _unlink_endpoint(proc)
    return 0


def _unlink_endpoint(proc) -> None:
    """libzmq leaves ipc files behind: remove our control and neighbour endpoints."""
    from shardstack.netio.process import control_endpoint, neigh_endpoint

    for ep in (control_endpoint(proc.rundir), neigh_endpoint(proc.rundir)):
        try:
            os.unlink(ep.removeprefix("ipc://"))
        except FileNotFoundError:
            pass


def main() -> int:
    from shardstack.worker import set_parent_death_signal

    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:
        return 1  # the supervisor died before prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    return run(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    raise SystemExit(main())
