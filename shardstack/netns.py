"""Network namespaces, veth pairs and TUN devices for the demo, the bench and tests.

Every real packet shardstack's harness sends stays inside namespaces made
here, with addresses from 198.18.0.0/15 (RFC 2544's benchmarking range), or
for IPv6 from 2001:db8::/32 (RFC 3849, documentation) and fd00::/8 (RFC 4193,
unique local), so nothing ever leaves the machine or touches the host's own interfaces.

Why context managers that kill before they delete: `ip netns del` only
unmounts the name; a namespace lives on while a process still runs in it
(and so do its veths and TUNs). So `netns()` first ends every process inside
(SIGTERM, then SIGKILL after a grace period), then deletes the name. Veth
pairs are created directly inside their two namespaces (`ip link add ... netns
A type veth peer ... netns B`), so no interface ever appears in the host's
namespace and names only need to be unique per namespace. Deleting a
namespace destroys the veth ends and TUNs in it (the kernel's
`default_device_exit_batch`), so cleanup cannot leak them.

Names carry the creating pid (`ssb-<pid>-<n>`) so `cleanup_stale()` can
remove what a killed run left behind without touching anyone else's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
TEST_NETS6 = (ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("fd00::/8"))
NETNS_DIR = "/run/netns"
DEFAULT_PREFIX = "ssb"
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL at teardown
CMD_TIMEOUT = 15.0  # any single `ip` call; bounded so a wedged kernel cannot hang us

_counter = itertools.count()
_NAME_RE = re.compile(r"^(?P<prefix>[a-z]+)-(?P<pid>\d+)-[0-9a-z]+$")


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up; `.reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- checks -----------------------------------------------------------------------------


def missing_requirements() -> list[str]:
    """What this process lacks to build namespaces; empty when it can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, veth and TUN need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if shutil.which("ip") is None:
        missing.append("the `ip` command (Debian package iproute2)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (the tun kernel module)")
    return missing


def check_address(addr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Parse `A.B.C.D[/N]` and insist it lies in 198.18.0.0/15, or an IPv6
    `X::Y[/N]` inside 2001:db8::/32 or fd00::/8; ValueError otherwise."""
    if ":" in addr:
        iface6 = ipaddress.IPv6Interface(addr)
        if not any(iface6.network.subnet_of(n) for n in TEST_NETS6):
            raise ValueError(f"{addr} is outside 2001:db8::/32 and fd00::/8: the harness "
                             "uses only those for IPv6")
        return iface6
    iface = ipaddress.IPv4Interface(addr)
    if iface.ip not in BENCH_NET or not iface.network.subnet_of(BENCH_NET):
        raise ValueError(f"{addr} is outside {BENCH_NET}: the harness uses only that range")
    return iface


def subnet6(index: int) -> ipaddress.IPv6Network:
    """The `index`-th /64 of 2001:db8::/32 (wrapping at 2**16), for IPv6 test links."""
    return ipaddress.IPv6Network(f"2001:db8:{index % 0xFFFF + 1:x}::/64")


def next_subnet6() -> ipaddress.IPv6Network:
    return subnet6(os.getpid() * 7 + next(_counter))


def subnet(index: int, prefix: int = 24) -> ipaddress.IPv4Network:
    """The `index`-th /prefix inside 198.18.0.0/15 (wrapping), for distinct test subnets."""
    subnets = 1 << (prefix - BENCH_NET.prefixlen)
    base = int(BENCH_NET.network_address) + (index % subnets) * (1 << (32 - prefix))
    return ipaddress.ip_network(f"{ipaddress.IPv4Address(base)}/{prefix}")


def host(net: ipaddress.IPv4Network, n: int) -> str:
    """`A.B.C.D/prefix` for the n-th address of `net`, e.g. host(198.18.3.0/24, 1) = 198.18.3.1/24."""
    return f"{net.network_address + n}/{net.prefixlen}"


def next_subnet(prefix: int = 24) -> ipaddress.IPv4Network:
    """A fresh subnet; spread by pid so concurrent runs seldom pick the same one."""
    return subnet(os.getpid() * 7 + next(_counter), prefix)


def unique_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A namespace name unique on this machine: prefix, our pid, a counter and random bits."""
    if not re.fullmatch(r"[a-z]+", prefix):
        raise ValueError(f"namespace prefix must be lowercase letters, not {prefix!r}")
    return f"{prefix}-{os.getpid()}-{next(_counter)}{secrets.token_hex(2)}"


# -- running commands ---------------------------------------------------------------------


def run(argv: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT
        ) -> subprocess.CompletedProcess[str]:
    """Run a short command; NetnsError (with its stderr) when it fails and `check`."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise NetnsError(f"`{argv[0]}` not found") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_netns() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def links(ns: str | None = None) -> list[str]:
    """Interface names in namespace `ns` (the host's when None)."""
    argv = ["ip", "-o", "link", "show"] if ns is None else ["ip", "-n", ns, "-o", "link", "show"]
    out = run(argv).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


# -- namespaces ---------------------------------------------------------------------------


@dataclass(slots=True)
class Netns:
    """A named network namespace we created; commands run inside via `ip netns exec`."""

    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(argv), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a process inside; it is ended at teardown if still running.

        `ip netns exec` execs the command, so the Popen's pid is the program's.
        Started in its own session so a Ctrl-C in our terminal reaches only us,
        and our teardown decides the order things stop in.
        """
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a per-namespace sysctl (net.ipv4.* are per netns)."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def add_addr(self, dev: str, cidr: str) -> None:
        """IPv6 addresses skip duplicate address detection (`nodad`): usable
        at once, not tentative for a second (RFC 4862 §5.4)."""
        if check_address(cidr).version == 6:
            self.ip("addr", "add", cidr, "dev", dev, "nodad")
        else:
            self.ip("addr", "add", cidr, "dev", dev)

    def add_route(self, dest: str, via: str | None = None, dev: str | None = None) -> None:
        check_address(dest)
        args = ["route", "add", dest]
        if via:
            check_address(via)
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def links(self) -> list[str]:
        return links(self.name)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one (`ip netns pids`)."""
        proc = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def kill_all(self, grace: float = KILL_GRACE) -> None:
        """SIGTERM everything inside, wait up to `grace` s, then SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.pids():
                self._reap()
                time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.poll()


def create_netns(name: str | None = None, prefix: str = DEFAULT_PREFIX) -> Netns:
    """Create a namespace with its loopback up (prefer the `netns()` context manager)."""
    name = name or unique_name(prefix)
    run(["ip", "netns", "add", name])
    ns = Netns(name)
    try:
        ns.up("lo")
    except NetnsError:
        delete_netns(ns)
        raise
    return ns


def delete_netns(ns: Netns | str, grace: float = KILL_GRACE) -> None:
    """End every process inside, then delete the namespace (and so its links). Idempotent."""
    ns = ns if isinstance(ns, Netns) else Netns(ns)
    if ns.name not in list_netns():
        return
    ns.kill_all(grace)
    run(["ip", "netns", "del", ns.name], check=False)
    # `ip netns del` can lose a race with a process that was still exiting;
    # one retry after the stragglers are gone is enough.
    if ns.name in list_netns():
        ns.kill_all(0.5)
        run(["ip", "netns", "del", ns.name], check=False)


@contextlib.contextmanager
def netns(prefix: str = DEFAULT_PREFIX, grace: float = KILL_GRACE) -> Iterator[Netns]:
    """A fresh namespace, removed with everything running in it on exit (also on errors)."""
    ns = create_netns(prefix=prefix)
    try:
        yield ns
    finally:
        delete_netns(ns, grace)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces named `<prefix>-<pid>-*` whose creating pid no longer runs."""
    removed = []
    for name in list_netns():
        m = _NAME_RE.match(name)
        if not m or m["prefix"] != prefix:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        delete_netns(name, grace=0.5)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- links --------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class VethPair:
    """Two veth ends: `a_dev` in `a`, `b_dev` in `b`, with optional addresses."""

    a: Netns
    a_dev: str
    b: Netns
    b_dev: str
    a_addr: str | None = None
    b_addr: str | None = None

    @property
    def a_ip(self) -> str | None:
        return self.a_addr.split("/", 1)[0] if self.a_addr else None

    @property
    def b_ip(self) -> str | None:
        return self.b_addr.split("/", 1)[0] if self.b_addr else None


def add_veth(a: Netns, b: Netns, a_dev: str = "veth0", b_dev: str = "veth0",
             a_addr: str | None = None, b_addr: str | None = None,
             mtu: int | None = None) -> VethPair:
    """Create a veth pair with one end in each namespace, both up, addresses assigned.

    Removed with either namespace; `del_veth` removes it earlier.
    """
    for addr in (a_addr, b_addr):
        if addr:
            check_address(addr)
    if a.name == b.name:
        raise ValueError("a veth pair needs two different namespaces")
    run(["ip", "link", "add", a_dev, "netns", a.name, "type", "veth",
         "peer", "name", b_dev, "netns", b.name])
    try:
        for ns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            if mtu:
                ns.ip("link", "set", dev, "mtu", str(mtu))
            if addr:
                ns.add_addr(dev, addr)
            ns.up(dev)
    except NetnsError:
        a.ip("link", "del", a_dev, check=False)
        raise
    return VethPair(a, a_dev, b, b_dev, a_addr, b_addr)


def del_veth(pair: VethPair) -> None:
    """Delete the pair (deleting one end deletes both). Idempotent."""
    pair.a.ip("link", "del", pair.a_dev, check=False)


@contextlib.contextmanager
def veth(a: Netns, b: Netns, **kwargs) -> Iterator[VethPair]:
    pair = add_veth(a, b, **kwargs)
    try:
        yield pair
    finally:
        del_veth(pair)


@contextlib.contextmanager
def tuntap(ns: Netns, dev: str = "tun0", mode: str = "tun", addr: str | None = None
           ) -> Iterator[str]:
    """A persistent TUN (or TAP) device in `ns`, removed on exit.

    shardstack's `serve --tun` makes its own device; this is for tests that
    need one to exist beforehand.
    """
    if mode not in ("tun", "tap"):
        raise ValueError(f"mode must be tun or tap, not {mode!r}")
    ns.ip("tuntap", "add", "dev", dev, "mode", mode)
    try:
        if addr:
            ns.add_addr(dev, addr)
        ns.up(dev)
        yield dev
    finally:
        ns.ip("link", "del", dev, check=False)


# -- the two-namespace topology the bench and tests share -----------------------------------


@dataclass(slots=True, frozen=True)
class Pair:
    """A client namespace and a server namespace joined by a veth pair on one /24."""

    client: Netns
    server: Netns
    link: VethPair
    net: ipaddress.IPv4Network
    net6: ipaddress.IPv6Network | None = None  # the link's IPv6 /64 (`ipv6=True`)

    @property
    def client_ip(self) -> str:
        return str(self.net.network_address + 1)

    @property
    def server_ip(self) -> str:
        return str(self.net.network_address + 2)

    @property
    def client_ip6(self) -> str:
        assert self.net6 is not None, "a pair made with ipv6=True"
        return str(self.net6.network_address + 1)

    @property
    def server_ip6(self) -> str:
        assert self.net6 is not None, "a pair made with ipv6=True"
        return str(self.net6.network_address + 2)


@contextlib.contextmanager
def client_server_pair(prefix: str = DEFAULT_PREFIX, server_addr: bool = True,
                       net: ipaddress.IPv4Network | None = None,
                       grace: float = KILL_GRACE, ipv6: bool = False) -> Iterator[Pair]:
    """Two namespaces on a veth: client .1/24, server .2/24 (or no kernel address on the
    server end when `server_addr` is False, for a user-space stack on AF_PACKET).
    `ipv6`: also a /64 of 2001:db8::/32, client ::1 and (with `server_addr`) server ::2."""
    net = net or next_subnet()
    net6 = next_subnet6() if ipv6 else None
    with netns(prefix, grace) as c, netns(prefix, grace) as s:
        link = add_veth(c, s, "veth0", "veth0", a_addr=host(net, 1),
                        b_addr=host(net, 2) if server_addr else None)
        if net6 is not None:
            c.add_addr("veth0", f"{net6.network_address + 1}/64")
            if server_addr:
                s.add_addr("veth0", f"{net6.network_address + 2}/64")
        yield Pair(c, s, link, net, net6)


@dataclass(slots=True, frozen=True)
class BridgedPair(Pair):
    """A Pair whose client and server veths meet in a third namespace, where a
    user-space bridge (`shardstack impair-bridge`) joins `bridge_a` (client
    side) and `bridge_b` (server side). `link` names the client's and the
    server's ends (both `veth0`); until a bridge runs, nothing passes."""

    bridge: Netns | None = None
    bridge_a: str = "vc"
    bridge_b: str = "vs"


def _quiet_l2(ns: Netns) -> None:
    # No IPv6 (router solicitations, DAD, MLD) so only the test's own frames cross.
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)


@contextlib.contextmanager
def bridged_pair(prefix: str = DEFAULT_PREFIX, server_addr: bool = True,
                 net: ipaddress.IPv4Network | None = None, grace: float = KILL_GRACE,
                 mtu: int | None = None, ipv6: bool = False) -> Iterator[BridgedPair]:
    """client ns (.1/24 on veth0) ── veth ── bridge ns (vc, vs: no addresses) ── veth ──
    server ns (veth0, .2/24 unless `server_addr` is False). IPv6 is off in all three,
    unless `ipv6`: then the client (::1) and server (::2, with `server_addr`) get a
    /64 of 2001:db8::/32, and only the bridge namespace stays IPv6-free."""
    net = net or next_subnet()
    net6 = next_subnet6() if ipv6 else None
    with netns(prefix, grace) as c, netns(prefix, grace) as br, netns(prefix, grace) as s:
        for ns in (br,) if ipv6 else (c, br, s):
            _quiet_l2(ns)
        add_veth(c, br, "veth0", "vc", a_addr=host(net, 1), mtu=mtu)
        add_veth(br, s, "vs", "veth0", b_addr=host(net, 2) if server_addr else None, mtu=mtu)
        if net6 is not None:
            c.add_addr("veth0", f"{net6.network_address + 1}/64")
            if server_addr:
                s.add_addr("veth0", f"{net6.network_address + 2}/64")
        link = VethPair(c, "veth0", s, "veth0", host(net, 1),
                        host(net, 2) if server_addr else None)
        yield BridgedPair(c, s, link, net, net6, br, "vc", "vs")
