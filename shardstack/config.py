"""Configuration of a running stack (`shardstack serve`), parsed once.

The supervisor builds one `ServeConfig` from the command line and hands it
to every child process as a plain dict (`to_dict`/`from_dict`), so netio and
the workers see exactly what the supervisor validated.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MIN_MTU = 576  # RFC 791: every host must accept 576-byte datagrams
MAX_MTU = 65535
MAX_WORKERS = 128  # one RETA entry per worker at least
IFNAMSIZ = 16
STACK_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range


class ConfigError(ValueError):
    """An invalid setting; the CLI prints it and exits with status 2."""


@dataclass(slots=True, frozen=True)
class Cidr:
    """An interface address with its prefix, e.g. 198.18.0.2/24 or
    2001:db8::2/64 (`v6`; `ip` is then the 128-bit address as an int)."""

    ip: int
    prefix: int
    v6: bool = False

    @property
    def text(self) -> str:
        return f"{self.addr}/{self.prefix}"

    @property
    def addr(self) -> str:
        if self.v6:
            return str(ipaddress.IPv6Address(self.ip))
        return str(ipaddress.IPv4Address(self.ip))

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_interface(self.text).network


def parse_cidr(text: str, what: str = "address") -> Cidr:
    """`A.B.C.D/N` (or bare `A.B.C.D`, taken as /32), or an IPv6 `X:Y::Z/N`
    (bare: /128)."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as e:
        raise ConfigError(f"bad {what} {text!r}: {e}") from None
    if isinstance(iface, ipaddress.IPv6Interface):
        if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback \
                or iface.ip.ipv4_mapped is not None or int(iface.ip) <= 0xFFFFFFFF:
            raise ConfigError(f"bad {what} {text!r}: not a unicast IPv6 address")
        return Cidr(int(iface.ip), iface.network.prefixlen, True)
    return Cidr(int(iface.ip), iface.network.prefixlen)


def split_families(cidrs: list[Cidr], what: str) -> tuple[Cidr | None, Cidr | None]:
    """(the IPv4 one, the IPv6 one) of a repeated option: at most one each
    (dual stack), at least one in all."""
    v4 = [c for c in cidrs if not c.v6]
    v6 = [c for c in cidrs if c.v6]
    if len(v4) > 1 or len(v6) > 1:
        raise ConfigError(f"{what}: at most one IPv4 and one IPv6 address (dual stack)")
    return (v4[0] if v4 else None), (v6[0] if v6 else None)


def parse_ip(text: str, what: str = "address") -> int:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError as e:
        raise ConfigError(f"bad {what} {text!r}: {e}") from None


def parse_port(text: str | int, what: str = "port") -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"bad {what} {text!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what} {port} out of range 1..65535")
    return port


@dataclass(slots=True)
class ServeConfig:
    """Everything `serve` needs; immutable once the children start."""

    workers: int
    device: str  # "tun" or "packet"
    ifname: str
    addr: Cidr | None  # the IPv4 address; None: an IPv6-only stack
    peer: Cidr | None = None
    addr6: Cidr | None = None  # the IPv6 address (dual stack with `addr`)
    peer6: Cidr | None = None
    gateway: int | None = None
    mtu: int = 1500
    run_dir: str = ""
    echo_ports: list[int] = field(default_factory=list)
    discard_ports: list[int] = field(default_factory=list)
    impair: str | None = None
    pcap: str | None = None
    offload: bool = True  # virtio-net header: GSO/GRO super-frames, checksum offload
    pin: bool = False  # worker i on CPU i; TUN queue i's kernel work elsewhere (shardstack.affinity)
    metrics: str | None = None  # "[HOST:]PORT" for Prometheus (shardstack.metrics); loopback default
    secret: bytes = b""
    max_connections: int = 0  # per worker; 0: no cap (ShardConfig.max_connections)
    tcp_mem: list[int] = field(default_factory=list)  # bytes (low, pressure, high); []: default
    rebalance: str = "auto"  # "auto": move buckets from hot to cold workers (shardstack.rebalance)
    ecn: int = 2  # net.ipv4.tcp_ecn: 0 off, 1 ask and accept, 2 accept (ShardConfig.ecn)
    pacing: bool = False  # pace every connection (ShardConfig.pacing); else SO_MAX_PACING_RATE only
    mtu_probing: int = 0  # net.ipv4.tcp_mtu_probing: 0 off, 1 after a black hole, 2 always

    def validate(self) -> ServeConfig:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be 1..{MAX_WORKERS}, not {self.workers}")
        if self.device not in ("tun", "packet"):
            raise ConfigError("need a device: --tun NAME or --packet IFACE")
        if not self.ifname or len(self.ifname.encode()) >= IFNAMSIZ or "/" in self.ifname:
            raise ConfigError(f"bad interface name {self.ifname!r} (1..15 bytes, no '/')")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"--mtu must be {MIN_MTU}..{MAX_MTU}, not {self.mtu}")
        if self.addr is None and self.addr6 is None:
            raise ConfigError("need an --addr (IPv4, IPv6, or one of each)")
        for mine, peer in ((self.addr, self.peer), (self.addr6, self.peer6)):
            if peer is None:
                continue
            if self.device != "tun":
                raise ConfigError("--peer configures the kernel side of a TUN; use it with --tun")
            if mine is None:
                raise ConfigError(f"--peer {peer.text}: no --addr of its family")
            if peer.ip == mine.ip:
                raise ConfigError("--peer must differ from --addr")
        if self.gateway is not None and (self.addr is None
                                         or self.gateway not in _hosts(self.addr)):
            raise ConfigError("--gateway must lie inside --addr's network")
        ports = self.echo_ports + self.discard_ports
        if len(set(ports)) != len(ports):
            raise ConfigError("a port is given to more than one service")
        if self.max_connections < 0:
            raise ConfigError("--max-connections must be >= 0")
        if self.ecn not in (0, 1, 2):
            raise ConfigError(f"--ecn must be 0, 1 or 2, not {self.ecn}")
        if self.mtu_probing not in (0, 1, 2):
            raise ConfigError(f"--mtu-probing must be 0, 1 or 2, not {self.mtu_probing}")
        if self.metrics is not None:
            from shardstack.metrics import parse_listen

            try:
                parse_listen(self.metrics)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.rebalance not in ("auto", "off"):
            raise ConfigError(f"--rebalance must be auto or off, not {self.rebalance!r}")
        if len(self.secret) < 16:
            raise ConfigError("secret must be at least 16 bytes")
        return self

    @property
    def addrs(self) -> list[Cidr]:
        """Our addresses, IPv4 first."""
        return [c for c in (self.addr, self.addr6) if c is not None]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("addr", "peer", "addr6", "peer6"):
            c = getattr(self, k)
            d[k] = c.text if c else None
        d["secret"] = self.secret.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        d = dict(d)
        for k in ("addr", "peer", "addr6", "peer6"):
            d[k] = parse_cidr(d[k]) if d.get(k) else None
        d["secret"] = bytes.fromhex(d["secret"])
        return cls(**d)


def _hosts(c: Cidr) -> range:
    net = c.network
    return range(int(net.network_address), int(net.broadcast_address) + 1)


def new_secret() -> bytes:
    """The per-boot secret for ISNs (RFC 6528) and SYN cookies; shared by workers."""
    return os.urandom(32)
