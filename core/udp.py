"""UDP over IPv4, sans-I/O (RFC 768; Linux ``net/ipv4/udp.c``).

A shard keeps a table of UDP sockets (``UdpTable``, at ``Shard.udp``):
bound ones by local (address, port), connected ones also by the 4-tuple.
The global port allocation is the supervisor's, as for TCP; a shard only
records what it is told, so every worker holds every UDP socket and
whichever worker RSS hands a datagram to can deliver it (as listeners).

- ``udp_rcv``: length and checksum checks (a zero checksum means none,
  RFC 768), then ``__udp4_lib_lookup``: a connected socket matching the
  4-tuple first, then a socket bound to the destination address, then the
  wildcard; the payload becomes a ``UdpDatagram`` event. No socket: ICMP
  port unreachable (RFC 1122 §4.1.3.1, ``icmp_send(ICMP_DEST_UNREACH,
  ICMP_PORT_UNREACH)``), rate-limited as Linux's ``icmp_ratelimit`` allows.
- ``udp_sendmsg``: one IPv4 datagram with a checksum, DF clear.
- ``udp_err``: an ICMP error quoting one of our datagrams reaches a
  *connected* socket as ``UdpError`` (ECONNREFUSED for port unreachable),
  as Linux reports it without IP_RECVERR (``__udp4_lib_err``).

IPv6 (issue 14; Linux ``net/ipv6/udp.c``): the same table holds both
families (addresses by size, ``tcp_h.V4_ADDR_MAX``).  ``udp_bind(...,
family=AF_INET6, v6only=...)``: an AF_INET6 socket on ``::`` takes IPv4 too
unless V6ONLY (then it is keyed ``(ANY6, port)``), and sees IPv4 peers
v4-mapped in its ``UdpDatagram``s; ``udp_connect``/``udp_sendmsg`` take
v4-mapped destinations for IPv4.  ``udpv6_rcv``: the checksum is mandatory
(RFC 8200 §8.1: a zero one is an error, Linux ``udp6_csum_init``), no socket
answers ICMPv6 port unreachable (RFC 4443 §3.1, code 4); ``udpv6_sendmsg``
sends from the socket's address or the shard's first IPv6 one (EMSGSIZE past
MTU - 48); ``udpv6_err`` reports fatal errors (``icmpv6_err_convert``) to
connected sockets.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .events import Event
from .icmp import ICMP_ERR_CONVERT, NR_ICMP_UNREACH, IcmpErr
from .tcp_h import AF_INET, AF_INET6, V4_ADDR_MAX
from .wire.checksum import internet_checksum, pseudo_header_sum
from .wire.icmp import build_dest_unreachable
from .wire.icmpv6 import ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, build_icmpv6_error
from .wire.ipv4 import Ipv4Header, build_ipv4
from .wire.ipv6 import Ipv6Header, build_ipv6

if TYPE_CHECKING:
    from .icmpv6 import Icmpv6Err
    from .shard import Shard

PROTO_UDP = 17
UDP_HLEN = 8
_HDR = struct.Struct("!HHHH")
ICMP_DEST_UNREACH = 3
ICMP_PORT_UNREACH = 3
ICMP_RATE = 1000.0  # net.ipv4.icmp_msgs_per_sec: tokens per second
ICMP_BURST = 50  # net.ipv4.icmp_msgs_burst
#: The listening-key address of an IPV6_V6ONLY socket on ``::`` (as inet_hashtables.ANY6).
ANY6 = 1 << 128


@dataclass(frozen=True, slots=True)
class UdpDatagram(Event):
    """A datagram for UDP socket ``sd``."""

    src: int
    sport: int
    dst: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UdpError(Event):
    """An ICMP error for connected UDP socket ``sd`` (``sk_err``)."""

    errno: int


@dataclass(slots=True)
class UdpSock:
    sd: int
    laddr: int
    lport: int
    raddr: int = 0
    rport: int = 0
    family: int = AF_INET  # AF_INET6: IPv4 peers appear v4-mapped
    v6only: bool = False


@dataclass(slots=True)
class UdpStats:
    """Linux's UDP MIB names: /proc/net/snmp ``Udp:``."""

    in_datagrams: int = 0
    no_ports: int = 0
    in_errors: int = 0
    in_csum_errors: int = 0
    out_datagrams: int = 0
    icmp_ratelimited: int = 0


@dataclass(slots=True)
class UdpTable:
    socks: dict[int, UdpSock] = field(default_factory=dict)
    bound: dict[tuple[int, int], int] = field(default_factory=dict)
    connected: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    stats: UdpStats = field(default_factory=UdpStats)
    tokens: float = ICMP_BURST
    refilled: float = 0.0


def udp_table(sh: Shard) -> UdpTable:
    return sh.udp


# -- the socket side (the supervisor decided the port) -----------------------------


def _bound_key(sk: UdpSock) -> tuple[int, int]:
    if sk.laddr == 0 and sk.v6only:
        return ANY6, sk.lport
    return sk.laddr, sk.lport


def _wire(sk: UdpSock, addr: int) -> int:
    """An address in the socket's terms -> the wire's (v4-mapped -> IPv4)."""
    if sk.family == AF_INET6 and addr >> 32 == 0xFFFF:
        return addr & 0xFFFFFFFF
    return addr


def udp_bind(sh: Shard, sd: int, laddr: int, lport: int, family: int = AF_INET,
             v6only: bool = False) -> None:
    """A UDP socket bound to laddr:lport (the supervisor chose the port); for
    AF_INET6, ``laddr`` is an IPv6 int or 0 (``::``), v4-mapped for IPv4."""
    t = udp_table(sh)
    if sd in t.socks:
        raise OSError(errno.EINVAL, "already bound")
    sk = UdpSock(sd, 0, lport, family=family, v6only=v6only and family == AF_INET6)
    sk.laddr = _wire(sk, laddr)
    t.socks[sd] = sk
    t.bound[_bound_key(sk)] = sd


def udp_connect(sh: Shard, sd: int, raddr: int, rport: int) -> None:
    """connect(): the 4-tuple lookup finds it first (``ip4_datagram_connect``);
    AF_UNSPEC (raddr 0) disconnects."""
    t = udp_table(sh)
    sk = t.socks.get(sd)
    if sk is None:
        raise OSError(errno.EBADF, "no such UDP socket")
    if sk.rport:
        t.connected.pop((_src(sh, sk), sk.lport, sk.raddr, sk.rport), None)
    sk.raddr, sk.rport = _wire(sk, raddr), rport
    if rport:
        # A wildcard-bound socket gets the route's source address (Linux
        # ip4_datagram_connect sets inet_saddr): the stack's first one.
        t.connected[(_src(sh, sk), sk.lport, raddr, rport)] = sd


def _src(sh: Shard, sk: UdpSock, dst: int | None = None) -> int:
    """The source address: the bound one, else the shard's first of the
    destination's family (0 when it has none)."""
    if sk.laddr:
        return sk.laddr
    addrs = sh.cfg.addrs6 if (sk.raddr if dst is None else dst) > V4_ADDR_MAX else sh.cfg.addrs
    return addrs[0] if addrs else 0


def udp_close(sh: Shard, sd: int) -> None:
    t = udp_table(sh)
    sk = t.socks.pop(sd, None)
    if sk is None:
        return
    key = _bound_key(sk)
    if t.bound.get(key) == sd:
        del t.bound[key]
    if sk.rport:
        t.connected.pop((_src(sh, sk), sk.lport, sk.raddr, sk.rport), None)


def udp_sendmsg(sh: Shard, sd: int, dst: int, dport: int, data: bytes) -> None:
    """One datagram from socket ``sd`` (its bound address, or the shard's
    first for the wildcard) to dst:dport; EMSGSIZE past the MTU (no
    fragmentation here), EDESTADDRREQ without a destination."""
    t = udp_table(sh)
    sk = t.socks.get(sd)
    if sk is None:
        raise OSError(errno.EBADF, "no such UDP socket")
    if not dport:
        if not sk.rport:
            raise OSError(errno.EDESTADDRREQ, "Destination address required")
        dst, dport = sk.raddr, sk.rport
    wire = _wire(sk, dst)
    if sk.family == AF_INET6 and wire == dst:
        udpv6_sendmsg(sh, t, sk, dst, dport, data)  # not v4-mapped: IPv6, ::/96 refused there
        return
    dst = wire
    if dst > V4_ADDR_MAX:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
    if sk.v6only:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    if len(data) + UDP_HLEN + 20 > sh.cfg.mtu:
        raise OSError(errno.EMSGSIZE, "Message too long")
    src = _src(sh, sk, dst)
    if not src:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    sh.frames.append(build_ipv4(src, dst, PROTO_UDP, _udp_header(src, dst, sk.lport, dport, data),
                                df=False))
    t.stats.out_datagrams += 1


def udpv6_sendmsg(sh: Shard, t: UdpTable, sk: UdpSock, dst: int, dport: int,
                  data: bytes) -> None:
    """One IPv6 datagram (Linux ``udpv6_sendmsg``): no fragmentation here, so
    EMSGSIZE past MTU - 48; ENETUNREACH without an IPv6 source, an IPv4-bound
    or V6ONLY mismatch, or a destination no route reaches."""
    if dst <= V4_ADDR_MAX or dst >> 32 == 0xFFFF or dst >> 120 == 0xFF:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    if sk.laddr and sk.laddr <= V4_ADDR_MAX:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    if len(data) + UDP_HLEN + 40 > sh.cfg.mtu:
        raise OSError(errno.EMSGSIZE, "Message too long")
    src = _src(sh, sk, dst)
    if not src:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    sh.frames.append(build_ipv6(src, dst, PROTO_UDP,
                                _udp_header(src, dst, sk.lport, dport, data)))
    t.stats.out_datagrams += 1


def _udp_header(src: int, dst: int, sport: int, dport: int, data: bytes) -> bytes:
    length = UDP_HLEN + len(data)
    body = _HDR.pack(sport, dport, length, 0) + data
    csum = internet_checksum(body, pseudo_header_sum(src, dst, PROTO_UDP, length))
    return _HDR.pack(sport, dport, length, csum or 0xFFFF) + data  # 0 means "none" (RFC 768)


# -- the wire side -------------------------------------------------------------------------


def udp_rcv(sh: Shard, ip: Ipv4Header, payload: bytes | bytearray | memoryview,
            packet: bytes | bytearray | memoryview, csum_ok: bool = False) -> None:
    """One UDP datagram for one of our addresses (``__udp4_lib_rcv``); never raises.
    ``csum_ok``: the device vouched for the checksum (a local sender that
    offloaded it leaves only the pseudo-header sum there), as for TCP."""
    t = udp_table(sh)
    if len(payload) < UDP_HLEN:
        t.stats.in_errors += 1
        return
    sport, dport, length, csum = _HDR.unpack_from(payload)
    if length < UDP_HLEN or length > len(payload):
        t.stats.in_errors += 1  # Linux: UDP_MIB_INERRORS, "short packet"
        return
    if csum and not csum_ok and internet_checksum(payload[:length],
                                  pseudo_header_sum(ip.src, ip.dst, PROTO_UDP, length)) != 0:
        t.stats.in_csum_errors += 1
        t.stats.in_errors += 1
        return
    sd = (t.connected.get((ip.dst, dport, ip.src, sport))
          or t.bound.get((ip.dst, dport)) or t.bound.get((0, dport)))
    if sd is None or t.socks[sd].rport and (t.socks[sd].raddr, t.socks[sd].rport) != (
            ip.src, sport):
        t.stats.no_ports += 1
        _port_unreachable(sh, t, ip, packet)
        return
    t.stats.in_datagrams += 1
    sk = t.socks[sd]
    src, dst = ip.src, ip.dst
    if sk.family == AF_INET6:  # a dual-stack socket's IPv4 peer (RFC 4291 §2.5.5.2)
        src, dst = 0xFFFF00000000 | src, 0xFFFF00000000 | dst
    sh.events.append(UdpDatagram(sd, src, sport, dst, bytes(payload[UDP_HLEN:length])))


def udpv6_rcv(sh: Shard, ip: Ipv6Header, payload: bytes | bytearray | memoryview,
              packet: bytes | bytearray | memoryview, csum_ok: bool = False) -> None:
    """One UDP datagram over IPv6 for one of our addresses (Linux ``__udp6_lib_rcv``);
    never raises.  Lookup: connected, bound to the address, V6ONLY ``::``, then a
    dual-stack ``::`` (never an IPv4 socket)."""
    t = udp_table(sh)
    if len(payload) < UDP_HLEN:
        t.stats.in_errors += 1
        return
    sport, dport, length, csum = _HDR.unpack_from(payload)
    if length == 0 and len(payload) > 0xFFFF - UDP_HLEN:
        length = len(payload)  # RFC 2675 §4: a jumbogram's length field is 0
    if length < UDP_HLEN or length > len(payload):
        t.stats.in_errors += 1
        return
    if not csum_ok and (csum == 0 or internet_checksum(
            payload[:length], pseudo_header_sum(ip.src, ip.dst, PROTO_UDP, length)) != 0):
        t.stats.in_csum_errors += 1  # RFC 8200 §8.1: the checksum is not optional
        t.stats.in_errors += 1
        return
    sd = (t.connected.get((ip.dst, dport, ip.src, sport))
          or t.bound.get((ip.dst, dport)) or t.bound.get((ANY6, dport)))
    if sd is None:
        sd = t.bound.get((0, dport))
        if sd is not None and t.socks[sd].family != AF_INET6:
            sd = None
    if sd is None or t.socks[sd].rport and (t.socks[sd].raddr, t.socks[sd].rport) != (
            ip.src, sport):
        t.stats.no_ports += 1
        if _icmp_allowed(sh, t):
            sh.frames.append(build_icmpv6_error(ip.dst, ip.src, ICMPV6_DEST_UNREACH,
                                                ICMPV6_PORT_UNREACH, packet))
        return
    t.stats.in_datagrams += 1
    sh.events.append(UdpDatagram(sd, ip.src, sport, ip.dst, bytes(payload[UDP_HLEN:length])))


def _icmp_allowed(sh: Shard, t: UdpTable) -> bool:
    """The token bucket of ``icmp_global_allow`` (RFC 1812 §4.3.2.8, RFC 4443 §2.4(f))."""
    now = sh.now
    t.tokens = min(float(ICMP_BURST), t.tokens + (now - t.refilled) * ICMP_RATE)
    t.refilled = now
    if t.tokens < 1.0:
        t.stats.icmp_ratelimited += 1
        return False
    t.tokens -= 1.0
    return True


def _port_unreachable(sh: Shard, t: UdpTable, ip: Ipv4Header,
                      packet: bytes | bytearray | memoryview) -> None:
    """ICMP port unreachable quoting the IP header and 8 bytes (RFC 792), from
    a token bucket as ``icmp_global_allow`` (RFC 1812 §4.3.2.8 rate limits)."""
    if not _icmp_allowed(sh, t):
        return
    quote = bytes(packet[:ip.header_len + UDP_HLEN])
    sh.frames.append(build_ipv4(ip.dst, ip.src, 1, build_dest_unreachable(ICMP_PORT_UNREACH, quote),
                                df=False))


def udp_err(sh: Shard, e: IcmpErr) -> None:
    """An ICMP error quoting one of our datagrams (``__udp4_lib_err``): only a
    connected socket learns of it (no IP_RECVERR here)."""
    t = udp_table(sh)
    q = e.quote
    sd = t.connected.get((q.src, q.sport, q.dst, q.dport))
    if sd is None:
        sh.stats.icmp_in_errors += 1  # as __udp4_lib_err: ICMP_MIB_INERRORS
        return
    if e.type != ICMP_DEST_UNREACH or e.code > NR_ICMP_UNREACH:
        return  # soft errors (time exceeded, parameter problem): unreported without IP_RECVERR
    err, hard = ICMP_ERR_CONVERT[e.code]
    if hard:
        sh.events.append(UdpError(sd, err))


def udpv6_err(sh: Shard, e: Icmpv6Err, fatal: bool, err: int) -> None:
    """An ICMPv6 error quoting one of our datagrams (Linux ``__udp6_lib_err``):
    a connected socket learns of a fatal one (port unreachable: ECONNREFUSED)."""
    t = udp_table(sh)
    q = e.quote
    sd = t.connected.get((q.src, q.sport, q.dst, q.dport))
    if sd is None:
        sh.stats.icmp6_in_errors += 1
        return
    if fatal:
        sh.events.append(UdpError(sd, err))
