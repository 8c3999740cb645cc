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
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .events import Event
from .icmp import ICMP_ERR_CONVERT, NR_ICMP_UNREACH, IcmpErr
from .wire.checksum import internet_checksum, pseudo_header_sum
from .wire.icmp import build_dest_unreachable
from .wire.ipv4 import Ipv4Header, build_ipv4

if TYPE_CHECKING:
    from .shard import Shard

PROTO_UDP = 17
UDP_HLEN = 8
_HDR = struct.Struct("!HHHH")
ICMP_DEST_UNREACH = 3
ICMP_PORT_UNREACH = 3
ICMP_RATE = 1000.0  # net.ipv4.icmp_msgs_per_sec: tokens per second
ICMP_BURST = 50  # net.ipv4.icmp_msgs_burst


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


def udp_bind(sh: Shard, sd: int, laddr: int, lport: int) -> None:
    t = udp_table(sh)
    if sd in t.socks:
        raise OSError(errno.EINVAL, "already bound")
    t.socks[sd] = UdpSock(sd, laddr, lport)
    t.bound[(laddr, lport)] = sd


def udp_connect(sh: Shard, sd: int, raddr: int, rport: int) -> None:
    """connect(): the 4-tuple lookup finds it first (``ip4_datagram_connect``);
    AF_UNSPEC (raddr 0) disconnects."""
    t = udp_table(sh)
    sk = t.socks.get(sd)
    if sk is None:
        raise OSError(errno.EBADF, "no such UDP socket")
    if sk.rport:
        t.connected.pop((_src(sh, sk), sk.lport, sk.raddr, sk.rport), None)
    sk.raddr, sk.rport = raddr, rport
    if rport:
        # A wildcard-bound socket gets the route's source address (Linux
        # ip4_datagram_connect sets inet_saddr): the stack's first one.
        t.connected[(_src(sh, sk), sk.lport, raddr, rport)] = sd


def _src(sh: Shard, sk: UdpSock) -> int:
    return sk.laddr or sh.cfg.addrs[0]


def udp_close(sh: Shard, sd: int) -> None:
    t = udp_table(sh)
    sk = t.socks.pop(sd, None)
    if sk is None:
        return
    if t.bound.get((sk.laddr, sk.lport)) == sd:
        del t.bound[(sk.laddr, sk.lport)]
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
    if len(data) + UDP_HLEN + 20 > sh.cfg.mtu:
        raise OSError(errno.EMSGSIZE, "Message too long")
    src = _src(sh, sk)
    sh.frames.append(build_ipv4(src, dst, PROTO_UDP, _udp_header(src, dst, sk.lport, dport, data),
                                df=False))
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
    sh.events.append(UdpDatagram(sd, ip.src, sport, ip.dst, bytes(payload[UDP_HLEN:length])))


def _port_unreachable(sh: Shard, t: UdpTable, ip: Ipv4Header,
                      packet: bytes | bytearray | memoryview) -> None:
    """ICMP port unreachable quoting the IP header and 8 bytes (RFC 792), from
    a token bucket as ``icmp_global_allow`` (RFC 1812 §4.3.2.8 rate limits)."""
    now = sh.now
    t.tokens = min(float(ICMP_BURST), t.tokens + (now - t.refilled) * ICMP_RATE)
    t.refilled = now
    if t.tokens < 1.0:
        t.stats.icmp_ratelimited += 1
        return
    t.tokens -= 1.0
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
