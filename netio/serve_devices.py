"""The devices of a `shardstack serve` run, built from the supervisor's description.

The supervisor opens what must outlive a child (the TUN, its queues, the
AF_PACKET fanout group) and describes it to each child as a `DeviceSpec`
(JSON on stdin, the fds passed down). From that:

* a worker writes through `worker_tx`: the shared TUN fd (or its own queue),
  or a send-only packet socket behind `L2Tx` (Ethernet headers from the
  mirror of netio's neighbour table, netio.neigh_mirror); and with direct RX
  reads `worker_rx`, its queue or fanout member;
* netio reads `netio_rx`: the same TUN fd, or its own packet socket, or with
  direct RX the fanout group's last member (all that is not TCP/IPv4).

Both wrap what they open in the order `process.make_device` uses (Impair
outside Pcap, so the capture shows what crossed the device) and share one
capture file (`pcap.SharedPcapFile`). Under `--impair` each worker's TX
draws from its own seed, derived from the spec's and the worker id.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import TypedDict

from .device import Device, PacketDevice, TunDevice, innermost
from .impair import Impair, parse_impair_spec
from .neigh_mirror import L2Tx, NeighChannel
from .pcap import Pcap, SharedPcapFile

__all__ = ["DeviceSpec", "worker_tx", "worker_rx", "netio_rx", "device_mac", "interface_mac"]


class DeviceSpec(TypedDict, total=False):
    """A child's device, as the supervisor describes it (`desc["tx"]`)."""

    kind: str  # "tun" or "packet"
    fd: int  # TUN: the open device, or this child's queue of a multi-queue TUN
    mtu: int  # TUN
    vnet_hdr: bool  # the virtio-net header (offloads)
    ifname: str  # packet: the interface
    rx_fd: int  # direct RX: this child's TUN queue (= fd) or fanout member


def interface_mac(ifname: str) -> bytes:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def device_mac(dev: Device, ifname: str) -> bytes:
    """Our MAC: the packet socket's own (SIOCGIFHWADDR), else sysfs."""
    return getattr(innermost(dev), "mac", None) or interface_mac(ifname)


def _open(spec: DeviceSpec, ifname: str, rx: bool) -> Device:
    kind = spec.get("kind")
    if kind == "tun":
        return TunDevice.from_fd(spec["fd"], ifname, spec["mtu"], spec["vnet_hdr"])
    if kind == "packet":
        vnet = spec.get("vnet_hdr", False)
        rx_fd = spec.get("rx_fd")
        if rx and rx_fd is not None:
            # Direct RX, netio's side: the fanout group's last member gets
            # only what is not TCP/IPv4 (ARP, ICMP, fragments).
            return PacketDevice(ifname, vnet_hdr=vnet, sock=socket.socket(fileno=rx_fd))
        return PacketDevice(ifname, rx=rx, vnet_hdr=vnet)
    raise ValueError(f"unknown device kind {kind!r}")


def worker_tx(spec: DeviceSpec, ifname: str, wid: int, *, run_dir: str,
              subnet: ipaddress.IPv4Network | None, gateway: int | None,
              pcap: str | None = None, impair: str | None = None,
              subnet6: ipaddress.IPv6Network | None = None) -> Device:
    """Worker `wid`'s TX device (its RX half, if any, is `worker_rx`)."""
    dev = _open(spec, ifname, rx=False)
    if pcap:
        dev = Pcap(dev, SharedPcapFile(pcap), rx=False)
    if impair:
        imp = parse_impair_spec(impair)
        dev = Impair(dev, dataclasses.replace(imp, seed=imp.seed * 1009 + wid + 1))
    if spec.get("kind") == "packet":
        return L2Tx(dev, device_mac(dev, ifname), subnet, gateway, NeighChannel(run_dir),
                    subnet6=subnet6)
    return dev


def worker_rx(spec: DeviceSpec) -> socket.socket | int | None:
    """Direct RX: the worker's fanout member (a socket) or TUN queue (an fd,
    the one it also writes); None when frames come through netio."""
    rx_fd = spec.get("rx_fd")
    if rx_fd is None or spec.get("kind") != "packet":
        return rx_fd
    return socket.socket(fileno=rx_fd)


def netio_rx(spec: DeviceSpec, ifname: str, *, pcap: str | None = None,
             impair: str | None = None) -> Device:
    """The device netio reads (and answers ARP/ICMP on)."""
    dev = _open(spec, ifname, rx=True)
    if pcap:
        dev = Pcap(dev, SharedPcapFile(pcap))
    if impair:
        dev = Impair(dev, impair)
    return dev
