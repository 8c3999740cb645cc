"""Which sockets the shim puts on the stack, and which stay on the kernel.

Pure decisions (no I/O) so they are unit-testable. DESIGN.md §2 "Scope":
AF_INET and AF_INET6 SOCK_STREAM sockets whose addresses belong to the stack;
the rest (AF_UNIX, loopback, IPv6 when the stack has no IPv6 address) stays
on kernel sockets, transparently.

- bind(addr): the wildcard (""/0.0.0.0, and `::` when the stack has IPv6)
  and the stack's own addresses go to the stack; 0.0.0.0 then means "every
  stack address", not the kernel's.
- connect(dst): a destination inside the stack's networks (`nets` from the
  supervisor's hello), or anywhere but loopback when the stack has a gateway
  or announces no networks at all. IPv6: inside the stack's IPv6 prefix
  (there is no IPv6 gateway); link-local, multicast and ::1 stay kernel.
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
    addrs6: tuple[str, ...] = ()  # the stack's IPv6 addresses (issue 14)
    nets6: tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_hello(cls, reply: dict, loopback: bool = False) -> StackView:
        addrs, nets, addrs6, nets6 = [], [], [], []
        for a in reply.get("addrs", ()):
            iface = ipaddress.ip_interface(str(a))
            if iface.version == 6:
                addrs6.append(str(iface.ip))
                if iface.network.prefixlen < 128:
                    nets6.append(iface.network)
                continue
            addrs.append(str(iface.ip))
            if iface.network.prefixlen < 32:
                nets.append(iface.network)
        for n in reply.get("nets", ()):
            net = ipaddress.ip_network(str(n), strict=False)
            (nets6 if net.version == 6 else nets).append(net)
        return cls(tuple(addrs), tuple(dict.fromkeys(nets)), bool(reply.get("gateway")),
                   max(1, int(reply.get("workers", 1))), loopback,
                   tuple(int(x) for x in reply.get("reta", ())), int(reply.get("mtu") or 1500),
                   tuple(addrs6), tuple(dict.fromkeys(nets6)))

    @property
    def primary(self) -> str:
        return self.addrs[0] if self.addrs else "0.0.0.0"

    @property
    def primary6(self) -> str:
        return self.addrs6[0] if self.addrs6 else "::"


def _ip(host: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


def _ip6(host: str) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(host)
    except ValueError:
        return None


def is_v6(host: str) -> bool:
    """An IPv6 address's text (what the shim hands the stack as such)."""
    return ":" in host


def bind_scope(host: str, view: StackView | None) -> tuple[str, str]:
    """(KERNEL|STACK, address to bind on the stack) for bind((host, port))."""
    if view is None:
        return KERNEL, host
    if host in ("", "0.0.0.0"):
        return STACK, "0.0.0.0"
    if is_v6(host):
        ip6 = _ip6(host)
        if ip6 is not None and view.addrs6 and (ip6.is_unspecified or str(ip6) in view.addrs6):
            return STACK, str(ip6)
        return KERNEL, host
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
    if is_v6(host):
        return _connect_scope6(host, view, bound_on_stack)
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


def _connect_scope6(host: str, view: StackView | None,
                    bound_on_stack: bool) -> tuple[str, str]:
    ip = _ip6(host.split("%", 1)[0])
    if view is None or ip is None or not view.addrs6:
        return KERNEL, host
    if bound_on_stack or str(ip) in view.addrs6:
        return STACK, str(ip)
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return KERNEL, host
    if any(ip in n for n in view.nets6):
        return STACK, str(ip)
    return KERNEL, host


def pick_worker(view: StackView, pid: int, counter: int) -> int:
    """Worker for an active open with an ephemeral port: any worker can
    choose a port whose replies hash back to it (the mTCP trick), so spread
    the app's connections over all of them."""
    return (pid + counter) % view.workers
