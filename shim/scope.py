"""Which sockets the shim puts on the stack, and which stay on the kernel.

Pure decisions (no I/O) so they are unit-testable. DESIGN.md §2 "Scope":
AF_INET + SOCK_STREAM sockets whose addresses belong to the stack; the rest
(AF_UNIX, UDP, IPv6, loopback) stays on kernel sockets, transparently.

- bind(addr): the wildcard (""/0.0.0.0) and the stack's own addresses go to
  the stack; 0.0.0.0 then means "every stack address", not the kernel's.
- connect(dst): a destination inside the stack's networks (`nets` from the
  supervisor's hello), or anywhere but loopback when the stack has a gateway
  or announces no networks at all.
- loopback mode (`shardstack run --loopback`): 127.0.0.0/8 is treated as the
  stack's first address, so programs hard-wired to localhost run on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

KERNEL, STACK = "kernel", "stack"
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@dataclass(slots=True, frozen=True)
class StackView:
    """What the shim knows of the running stack (from `hello`)."""

    addrs: tuple[str, ...]
    nets: tuple[ipaddress.IPv4Network, ...] = ()
    gateway: bool = False
    workers: int = 1
    loopback: bool = False
    reta: tuple[int, ...] = field(default=())
    mtu: int = 1500

    @classmethod
    def from_hello(cls, reply: dict, loopback: bool = False) -> StackView:
        addrs, nets = [], []
        for a in reply.get("addrs", ()):
            iface = ipaddress.IPv4Interface(str(a))
            addrs.append(str(iface.ip))
            if iface.network.prefixlen < 32:
                nets.append(iface.network)
        for n in reply.get("nets", ()):
            nets.append(ipaddress.IPv4Network(str(n), strict=False))
        return cls(tuple(addrs), tuple(dict.fromkeys(nets)), bool(reply.get("gateway")),
                   max(1, int(reply.get("workers", 1))), loopback,
                   tuple(int(x) for x in reply.get("reta", ())), int(reply.get("mtu") or 1500))

    @property
    def primary(self) -> str:
        return self.addrs[0] if self.addrs else "0.0.0.0"


def _ip(host: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def bind_scope(host: str, view: StackView | None) -> tuple[str, str]:
    """(KERNEL|STACK, address to bind on the stack) for bind((host, port))."""
    if view is None:
        return KERNEL, host
    if host in ("", "0.0.0.0"):
        return STACK, "0.0.0.0"
    ip = _ip(host)
    if ip is None:
        return KERNEL, host
    if str(ip) in view.addrs:
        return STACK, str(ip)
    if view.loopback and ip in _LOOPBACK:
        return STACK, view.primary
    return KERNEL, host


def connect_scope(host: str, view: StackView | None, bound_on_stack: bool = False) -> tuple[str, str]:
    """(KERNEL|STACK, destination on the stack) for connect((host, port)).

    `bound_on_stack`: the socket was bound to a stack address first, so the
    connection must leave from the stack whatever the destination.
    """
    ip = _ip(host)
    if view is None or ip is None:
        return KERNEL, host
    if ip in _LOOPBACK:
        if view.loopback:
            return STACK, view.primary
        return KERNEL, host
    if bound_on_stack or str(ip) in view.addrs:
        return STACK, str(ip)
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return KERNEL, host
    if view.gateway or not view.nets:
        return STACK, str(ip)
    if any(ip in n for n in view.nets):
        return STACK, str(ip)
    return KERNEL, host


def pick_worker(view: StackView, pid: int, counter: int) -> int:
    """Worker for an active open with an ephemeral port: any worker can
    choose a port whose replies hash back to it (the mTCP trick), so spread
    the app's connections over all of them."""
    return (pid + counter) % view.workers
