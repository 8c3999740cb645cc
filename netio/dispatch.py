"""The pure half of the netio process: steer a batch of frames to workers.

Like a NIC's RSS engine followed by the kernel's `ip_rcv`/`arp_rcv`/`icmp_rcv`
for the few things the I/O process answers itself:

* TCP/IPv4 to one of our addresses: read only the IPv4 header and the two
  ports, hash the 4-tuple with the symmetric Toeplitz key, look the worker up
  in the 128-entry RETA, and append the frame (still raw) to that worker's
  group. The worker's `tcp_v4_rcv` does every other check.
* ARP (L2 only): answer requests for our addresses (`arp_process`) and feed
  every ARP packet to the neighbour table `neigh` (netio.neighbour: a request
  for us creates its sender's entry, anything else only updates an existing
  one). Only ARP fills it: never the source MAC of an IPv4 frame.
* ICMP echo request to us: reply (`icmp_echo`), after checking the IPv4
  header and the ICMP checksum as `icmp_rcv` does.
* ICMP errors (destination unreachable, time exceeded, parameter problem)
  quoting a TCP segment we sent: to the worker that owns that flow, the one
  its inbound frames hash to, i.e. the hash of the QUOTED 4-tuple turned
  round to the receive direction (`icmp_socket_deliver`: the worker's
  `tcp_v4_err` does the rest). Off the TCP fast path: ICMP is always the
  slow path here.
* Everything else is dropped and counted under a `DropReason` (the engine's
  enum, core.dropreason), the way Linux tags drops with SKB_DROP_REASON_*.
  Nothing in here raises on bad input.

No I/O, no clocks: `Dispatcher.dispatch(batch, now)` returns what to send
where (`now` only dates neighbour-table updates).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

from shardstack.core.dropreason import WIRE_REASONS, DropReason
from shardstack.core.wire.arp import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    build_arp_reply,
    build_arp_request,
    parse_arp,
)
from shardstack.core.wire.errors import WireError
from shardstack.core.wire.ethernet import (
    BROADCAST_MAC,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    build_ethernet,
)
from shardstack.core.wire.icmp import (
    ICMP_ECHO,
    ICMP_ERROR_TYPES,
    IcmpMessage,
    echo_reply_ipv4,
    parse_icmp,
    parse_icmp_quote,
)
from shardstack.core.wire.icmpv6 import (
    ALL_NODES,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_ERROR_TYPES,
    NA_OVERRIDE,
    NA_SOLICITED,
    NDISC_NEIGHBOUR_ADVERTISEMENT,
    NDISC_NEIGHBOUR_SOLICITATION,
    Icmpv6Message,
    build_neigh_advert,
    build_neigh_solicit,
    echo_reply6_for,
    multicast_mac,
    parse_icmpv6,
    parse_icmpv6_quote,
    parse_ndp,
    solicited_node_multicast,
)
from shardstack.core.wire.ipv4 import PROTO_ICMP, Ipv4Header, parse_ipv4
from shardstack.core.wire.ipv6 import (
    NEXTHDR_ICMP,
    NEXTHDR_TCP,
    NEXTHDR_UDP,
    Ipv6Header,
    is_multicast6,
    parse_ipv6,
)

from .neighbour import ZERO_MAC, NeighTable
from .rss import RETA_MASK, SYMMETRIC_KEY, FoldedToeplitz, Toeplitz, is_period16, make_reta

__all__ = ["Dispatcher", "DispatchStats", "Batch", "ETH_P_IP", "ETH_P_ARP"]

# The fast path's only raw offsets outside core.wire, on purpose: it reads
# version/IHL, flags/fragment offset, protocol, source and destination
# (offsets 0, 6, 9, 12, 16 of the IPv4 header) in one unpack, plus the
# ports as one 32-bit word, and leaves
# every other check to the worker's full parse (`tcp_v4_rcv`).
_IP_FAST = struct.Struct("!B5xHxB2xII")
_PORTS = struct.Struct("!I")
_ETHERTYPE = struct.Struct("!H")

# WireError.reason -> DropReason for the parsers of the slow paths; a reason
# not listed is the layer's header error.
_IP_REASONS = WIRE_REASONS["ip"]
_IP6_REASONS = WIRE_REASONS["ipv6"]
_NDP_REASONS = WIRE_REASONS["ndp"]
_ICMP_REASONS = {"checksum": DropReason.ICMP_CSUM}


PROTO_UDP = 17
_UDP_PORTS = struct.Struct("!HH")
# IPv6 source, destination and the two ports as nine 32-bit words (offset 8)
_IP6_TUPLE = struct.Struct("!9I")


@dataclass(slots=True)
class DispatchStats:
    frames: int = 0
    tcp: int = 0
    arp_replies: int = 0
    arp_learned: int = 0
    icmp_replies: int = 0
    icmp_errors: int = 0  # ICMP errors handed to the worker owning the quoted flow
    udp: int = 0  # UDP datagrams handed to a worker (core/udp.py)
    ipv6: int = 0  # IPv6 packets to us (all of them: TCP, UDP, ICMPv6)
    ndisc_na_sent: int = 0  # Neighbor Advertisements answering solicitations for us
    ndisc_learned: int = 0  # advertisements that resolved or refreshed a neighbour
    per_worker: list[int] = field(default_factory=list)
    drops: collections.Counter[DropReason] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "tcp": self.tcp,
            "arp_replies": self.arp_replies,
            "arp_learned": self.arp_learned,
            "icmp_replies": self.icmp_replies,
            "icmp_errors": self.icmp_errors,
            "udp": self.udp,
            "ipv6": self.ipv6,
            "ndisc_na_sent": self.ndisc_na_sent,
            "ndisc_learned": self.ndisc_learned,
            "per_worker": list(self.per_worker),
            "drops": {r.name: n for r, n in self.drops.items()},
        }


@dataclass(slots=True)
class Batch:
    """One dispatch result: per-worker frames and flags, and replies to send."""

    frames: list[list[bytes]]
    flags: list[bytearray]
    replies: list[bytes]


class Dispatcher:
    """Steer frames to workers; answer ARP and ICMP echo for `addrs`.

    `l2=True` means Ethernet frames (AF_PACKET) and needs our `mac`.
    """

    def __init__(
        self,
        n_workers: int,
        addrs: list[int] | set[int],
        l2: bool = False,
        mac: bytes | None = None,
        reta: list[int] | None = None,
        key: bytes = SYMMETRIC_KEY,
        addrs6: list[int] | set[int] | None = None,
    ) -> None:
        if l2 and (mac is None or len(mac) != 6):
            raise ValueError("an L2 dispatcher needs our 6-byte MAC address")
        self.n_workers = n_workers
        self.addrs = frozenset(addrs)
        self.l2 = l2
        self.mac = mac or b""
        self.hasher = Toeplitz(key)
        # With the symmetric key, steering is one lookup on the folded tuple
        # (rss.FoldedToeplitz); any other key takes the 12-table hash.
        self.folded = FoldedToeplitz(key) if is_period16(key) else None
        self.wtab: list[int] | None = None
        self.reta: list[int] = []
        self.set_reta(reta if reta is not None else make_reta(n_workers))
        self.stats = DispatchStats(per_worker=[0] * n_workers)
        self.neigh = NeighTable()  # filled from ARP only (netio.neighbour)
        # IPv6 (issue 14): our addresses, their solicited-node groups, and the
        # IPv6 neighbours (Linux's nd_tbl), filled from NS/NA only
        self.addrs6 = frozenset(addrs6 or ())
        self.snm6 = {solicited_node_multicast(a): a for a in self.addrs6}
        self.neigh6 = NeighTable()
        self.now = 0.0  # the time of the batch being dispatched

    @property
    def neighbours(self) -> dict[int, bytes]:
        """ip -> MAC of the neighbours frames may be sent to now (NUD_VALID)."""
        return self.neigh.valid()

    def set_reta(self, reta: list[int]) -> None:
        """Install a new indirection table (the supervisor rebalances with this)."""
        if len(reta) != RETA_MASK + 1 or not all(0 <= w < self.n_workers for w in reta):
            raise ValueError("RETA must have 128 entries, each a valid worker id")
        self.reta = list(reta)
        if self.folded is not None:
            self.wtab = self.folded.worker_table(self.reta)

    def dispatch(self, batch: list[tuple[bytes, int]], now: float | None = None) -> Batch:
        if now is not None:
            self.now = now
        n = self.n_workers
        out = Batch([[] for _ in range(n)], [bytearray() for _ in range(n)], [])
        frames_out, flags_out = out.frames, out.flags
        stats = self.stats
        per_worker = stats.per_worker
        reta, addrs, hp = self.reta, self.addrs, self.hasher.hash_packet
        wtab = self.wtab
        unpack_ip, unpack_ports = _IP_FAST.unpack_from, _PORTS.unpack_from
        l2 = self.l2
        mac = self.mac
        l3 = ETH_HLEN if l2 else 0
        stats.frames += len(batch)
        icmp_before = stats.icmp_errors
        udp_before = stats.udp
        # The fast path's drops, tallied in locals and counted once per batch:
        # under a flood of junk they are the hot path, and a Counter keyed by
        # an enum member costs two Python-level Enum.__hash__ calls per frame
        # (min of 60 runs, 64-frame batches of junk for another address:
        # 0.37 us/frame with the old str-keyed Counter, about twice that with
        # the enum per frame, 0.26 tallied; truncated junk 0.17 -> 0.08).
        runts = other_host = ip_hdr = frags = tcp_hdr = not_local = 0
        for frame, flags in batch:
            n_bytes = len(frame)
            if l2:
                if n_bytes < ETH_HLEN:
                    runts += 1
                    continue
                # Unicast for another station (veth, bridges and promiscuous
                # NICs show them to AF_PACKET): ip_rcv_core and arp_rcv drop
                # PACKET_OTHERHOST; group addresses (I/G bit) pass.
                if mac and not frame[0] & 1 and frame[:6] != mac:
                    other_host += 1
                    continue
                etype = _ETHERTYPE.unpack_from(frame, 12)[0]
                if etype != ETH_P_IP:
                    self._slow_l2(frame, etype, out, flags)
                    continue
            if n_bytes < l3 + 20:
                ip_hdr += 1  # shorter than an IPv4 header
                continue
            vihl, frag, proto, src, dst = unpack_ip(frame, l3)
            if proto != 6 or vihl >> 4 != 4:
                self._slow_ip(frame, flags, l3, out)
                continue
            if vihl == 0x45:
                l4 = l3 + 20
            elif vihl & 0x0F < 5:
                ip_hdr += 1  # IHL < 5
                continue
            else:
                l4 = l3 + ((vihl & 0x0F) << 2)
            if frag & 0x3FFF:
                frags += 1
                continue
            if n_bytes < l4 + 4:
                tcp_hdr += 1  # the ports are cut off
                continue
            if dst not in addrs:
                not_local += 1
                continue
            if wtab is not None:
                x = src ^ dst ^ unpack_ports(frame, l4)[0]
                w = wtab[(x ^ (x >> 16)) & 0xFFFF]
            else:
                w = reta[hp(frame, l3, l4) & RETA_MASK]
            frames_out[w].append(frame)
            flags_out[w].append(flags)
        for w in range(n):
            k = len(frames_out[w])
            per_worker[w] += k
            stats.tcp += k
        # per_worker counts ICMP errors and UDP too, tcp does not
        stats.tcp -= (stats.icmp_errors - icmp_before) + (stats.udp - udp_before)
        if runts or other_host or ip_hdr or frags or tcp_hdr or not_local:
            drops = stats.drops
            for reason, k in ((DropReason.PKT_TOO_SMALL, runts), (DropReason.OTHERHOST, other_host),
                              (DropReason.IP_HDR, ip_hdr), (DropReason.IP_FRAGMENT, frags),
                              (DropReason.TCP_HDR, tcp_hdr), (DropReason.IP_OTHERHOST, not_local)):
                if k:
                    drops[reason] += k
        return out

    # -- the slow paths: rare frames, readable code over fast code ----------

    def _slow_ip(self, frame: bytes, flags: int, l3: int, out: Batch) -> None:
        """Non-TCP IPv4 (or a bad version nibble): `ip_rcv` then `icmp_rcv`."""
        drops = self.stats.drops
        if frame[l3] >> 4 == 6 and self.addrs6:  # (no IPv6 address: not for us)
            self._ipv6(frame, flags, l3, out)
            return
        try:
            hdr, payload = parse_ipv4(memoryview(frame)[l3:])
        except WireError as e:
            drops[_IP_REASONS.get(e.reason, DropReason.IP_HDR)] += 1
            return
        if hdr.dst not in self.addrs:
            drops[DropReason.IP_OTHERHOST] += 1
            return
        if hdr.proto == PROTO_UDP:
            self._udp(frame, flags, hdr, payload, out)
            return
        if hdr.proto != PROTO_ICMP:
            drops[DropReason.NOT_TCP] += 1  # another protocol: we serve none
            return
        try:
            msg = parse_icmp(payload)  # verifies the checksum, as icmp_rcv does
        except WireError as e:
            drops[_ICMP_REASONS.get(e.reason, DropReason.ICMP_HDR)] += 1
            return
        if msg.type in ICMP_ERROR_TYPES:
            self._icmp_error(frame, flags, msg, out)
            return
        if msg.type != ICMP_ECHO or msg.code != 0:
            drops[DropReason.ICMP_TYPE] += 1
            return
        reply = echo_reply_ipv4(hdr, msg)  # RFC 1122 §3.2.2.6: same id, seq, data
        if self.l2:
            reply = build_ethernet(bytes(frame[6:12]), self.mac, ETH_P_IP, reply)
        out.replies.append(reply)
        self.stats.icmp_replies += 1

    def _udp(self, frame: bytes, flags: int, hdr: Ipv4Header, payload: memoryview,
             out: Batch) -> None:
        """UDP (core/udp.py): every worker holds every UDP socket, so any
        worker can deliver; the 4-tuple's hash spreads flows over them as
        TCP's, and keeps one flow on one worker (its order)."""
        if len(payload) < 4:
            self.stats.drops[DropReason.PKT_TOO_SMALL] += 1  # Linux: short UDP header
            return
        sport, dport = _UDP_PORTS.unpack_from(payload)
        w = self.reta[self.hasher.hash_tuple(hdr.src, hdr.dst, sport, dport) & RETA_MASK]
        out.frames[w].append(frame)
        out.flags[w].append(flags)
        self.stats.udp += 1

    def _icmp_error(self, frame: bytes, flags: int, msg: IcmpMessage, out: Batch) -> None:
        """An ICMP error about a TCP segment of ours goes, untouched, to the
        worker owning the flow: the quoted packet is ours (src = us), so the
        flow's inbound frames are (quoted dst -> quoted src), and that is the
        tuple to hash, with the same key and RETA as TCP frames. Anything
        else has no one to go to and is counted."""
        drops = self.stats.drops
        try:
            q = parse_icmp_quote(msg.payload)
        except WireError:
            drops[DropReason.ICMP_ERR_QUOTE] += 1
            return
        if q.proto not in (6, PROTO_UDP):
            drops[DropReason.ICMP_ERR_NOT_TCP] += 1
            return
        if q.src not in self.addrs:
            drops[DropReason.ICMP_ERR_NOT_OURS] += 1
            return
        w = self.reta[self.hasher.hash_tuple(q.dst, q.src, q.dport, q.sport) & RETA_MASK]
        out.frames[w].append(frame)
        out.flags[w].append(flags)
        self.stats.icmp_errors += 1

    def _slow_l2(self, frame: bytes, etype: int, out: Batch, flags: int = 0) -> None:
        """Non-IPv4 Ethernet: ARP (`arp_process`), everything else dropped."""
        drops = self.stats.drops
        if etype == ETH_P_IPV6 and self.addrs6:
            self._ipv6(frame, flags, ETH_HLEN, out)
            return
        if etype != ETH_P_ARP:
            drops[DropReason.UNHANDLED_PROTO] += 1  # LLDP, VLAN tags, IPv6 unconfigured...
            return
        try:
            arp = parse_arp(memoryview(frame)[ETH_HLEN:])
        except WireError:
            drops[DropReason.ARP_HDR] += 1
            return
        sip, sha = arp.sender_ip, arp.sender_mac
        # A sender we may record: a unicast MAC and an address that is set
        # and not ours (0.0.0.0 is a duplicate-address probe, RFC 5227).
        usable = sip != 0 and sip not in self.addrs and not sha[0] & 1 and sha != ZERO_MAC
        if arp.target_ip not in self.addrs:
            drops[DropReason.ARP_NOT_FOR_US] += 1  # not answered; may still refresh an entry
            if usable:
                self.neigh.arp_update(sip, sha, False, self.now)
            return
        if arp.op == ARPOP_REPLY:
            # to our MAC (PACKET_HOST): REACHABLE, else STALE; existing entries only
            if usable and self.neigh.arp_update(sip, sha, frame[:6] == self.mac, self.now):
                self.stats.arp_learned += 1
            else:  # unsolicited, inside locktime, or an unusable sender
                drops[DropReason.ARP_REPLY_IGNORED] += 1
            return
        if usable and arp.op == ARPOP_REQUEST:
            self.neigh.neigh_event_ns(sip, sha, self.now)  # the asker will talk to us
        body = build_arp_reply(arp, self.mac)
        out.replies.append(build_ethernet(sha, self.mac, ETH_P_ARP, body, pad=True))
        self.stats.arp_replies += 1

    # -- IPv6 (ipv6_rcv, icmpv6_rcv, ndisc_rcv) ---------------------------------

    def _ipv6(self, frame: bytes, flags: int, l3: int, out: Batch) -> None:
        """An IPv6 packet: TCP and UDP to the worker its 36-byte tuple hashes
        to (the steering programs do the same in the kernel for plain TCP,
        netio.fanout), ICMPv6 echo answered here, errors to the worker owning
        the quoted flow, NDP (L2) into `neigh6`. Extension headers are walked
        (and refused with a reason) by core.wire.ipv6.parse_ipv6.

        The common case first, as IPv4's fast path: TCP as the first next
        header, to one of our addresses, its ports inside the frame: the
        nine 32-bit words of the tuple folded into the worker table (the
        worker's tcp_v6_rcv does every other check). Measured on 64-frame
        batches: 12 us a frame through parse_ipv6 and the 36-table hash,
        about 1 us this way."""
        wtab = self.wtab
        if (wtab is not None and len(frame) >= l3 + 44 and frame[l3 + 6] == NEXTHDR_TCP
                and frame[l3] >> 4 == 6
                and int.from_bytes(frame[l3 + 24:l3 + 40], "big") in self.addrs6):
            a, b, c, d, e, f, g, h, i = _IP6_TUPLE.unpack_from(frame, l3 + 8)
            x = a ^ b ^ c ^ d ^ e ^ f ^ g ^ h ^ i
            w = wtab[(x ^ (x >> 16)) & 0xFFFF]
            out.frames[w].append(frame)
            out.flags[w].append(flags)
            self.stats.ipv6 += 1
            return
        drops = self.stats.drops
        try:
            hdr, payload = parse_ipv6(memoryview(frame)[l3:])
        except WireError as e:
            drops[_IP6_REASONS.get(e.reason, DropReason.IP_HDR)] += 1
            return
        dst = hdr.dst
        if dst not in self.addrs6:
            # to a group of ours: NDP to our solicited-node group, all-nodes
            group = is_multicast6(dst) and (dst in self.snm6 or dst == ALL_NODES)
            if not (group and hdr.next_header == NEXTHDR_ICMP):
                drops[DropReason.IP_OTHERHOST] += 1
                return
        self.stats.ipv6 += 1
        nh = hdr.next_header
        if nh in (NEXTHDR_TCP, NEXTHDR_UDP):
            if len(payload) < 4:
                drops[DropReason.TCP_HDR if nh == NEXTHDR_TCP else DropReason.PKT_TOO_SMALL] += 1
                return
            sport, dport = _UDP_PORTS.unpack_from(payload)
            w = self.reta[self.hasher.hash_tuple6(hdr.src, dst, sport, dport) & RETA_MASK]
            out.frames[w].append(frame)
            out.flags[w].append(flags)
            if nh == NEXTHDR_UDP:
                self.stats.udp += 1
            return
        if nh != NEXTHDR_ICMP:
            drops[DropReason.IP_NOPROTO] += 1
            return
        try:
            msg = parse_icmpv6(hdr.src, dst, payload)  # the checksum, as icmpv6_rcv
        except WireError as e:
            drops[_ICMP_REASONS.get(e.reason, DropReason.ICMP_HDR)] += 1
            return
        if msg.type in ICMPV6_ERROR_TYPES:
            self._icmpv6_error(frame, flags, msg.body, out)
        elif msg.type == ICMPV6_ECHO_REQUEST and msg.code == 0 and dst in self.addrs6:
            # RFC 4443 §4.2: same identifier, sequence and data; not to a
            # group (Linux answers those only with icmp_echo_ignore_multicast off)
            out.replies.append(self._framed6(frame, echo_reply6_for(hdr, msg)))
            self.stats.icmp_replies += 1
        elif msg.type in (NDISC_NEIGHBOUR_SOLICITATION, NDISC_NEIGHBOUR_ADVERTISEMENT):
            self._ndisc(frame, hdr, msg, out)
        else:
            drops[DropReason.ICMP_TYPE] += 1

    def _framed6(self, frame: bytes, packet: bytes) -> bytes:
        """A reply to `frame`: back to its sender's MAC on Ethernet."""
        if self.l2:
            return build_ethernet(bytes(frame[6:12]), self.mac, ETH_P_IPV6, packet)
        return packet

    def _icmpv6_error(self, frame: bytes, flags: int, body: memoryview, out: Batch) -> None:
        """As `_icmp_error`: the worker of the quoted flow, turned round."""
        drops = self.stats.drops
        try:
            q = parse_icmpv6_quote(body)
        except WireError:
            drops[DropReason.ICMP_ERR_QUOTE] += 1
            return
        if q.proto not in (NEXTHDR_TCP, NEXTHDR_UDP):
            drops[DropReason.ICMP_ERR_NOT_TCP] += 1
            return
        if q.src not in self.addrs6:
            drops[DropReason.ICMP_ERR_NOT_OURS] += 1
            return
        w = self.reta[self.hasher.hash_tuple6(q.dst, q.src, q.dport, q.sport) & RETA_MASK]
        out.frames[w].append(frame)
        out.flags[w].append(flags)
        self.stats.icmp_errors += 1

    def _ndisc(self, frame: bytes, hdr: Ipv6Header, msg: Icmpv6Message, out: Batch) -> None:
        """RFC 4861 NS/NA on Ethernet (a TUN is L3: nothing to resolve there).
        NS for one of our addresses: its sender's entry (STALE, §7.2.3) and a
        solicited, override NA back (to all-nodes for a DAD probe from ::).
        NA: an existing entry only (`NeighTable.ndisc_recv_na`)."""
        drops = self.stats.drops
        if not self.l2:
            drops[DropReason.ICMP_TYPE] += 1
            return
        try:
            nd = parse_ndp(hdr, msg)
        except WireError as e:
            drops[_NDP_REASONS.get(e.reason, DropReason.IPV6_NDISC_BAD_OPTIONS)] += 1
            return
        now = self.now
        if nd.type == NDISC_NEIGHBOUR_ADVERTISEMENT:
            if nd.target in self.addrs6:
                drops[DropReason.ARP_REPLY_IGNORED] += 1  # someone else claims our address
            elif self.neigh6.ndisc_recv_na(nd.target, nd.tgt_lladdr,
                                          bool(nd.flags & NA_SOLICITED),
                                          bool(nd.flags & NA_OVERRIDE), now):
                self.stats.ndisc_learned += 1
            else:
                drops[DropReason.ARP_REPLY_IGNORED] += 1
            return
        if nd.target not in self.addrs6:
            drops[DropReason.IPV6_NDISC_NS_OTHERHOST] += 1
            return
        ll = nd.src_lladdr
        if hdr.src == 0:  # duplicate address detection of our address: defend it
            na = build_neigh_advert(nd.target, ALL_NODES, nd.target, NA_OVERRIDE, self.mac)
            out.replies.append(build_ethernet(multicast_mac(ALL_NODES), self.mac, ETH_P_IPV6, na))
            self.stats.ndisc_na_sent += 1
            return
        if ll is not None and not ll[0] & 1 and ll != ZERO_MAC:
            self.neigh6.neigh_event_ns(hdr.src, ll, now)  # the asker will talk to us
        na = build_neigh_advert(nd.target, hdr.src, nd.target, NA_SOLICITED | NA_OVERRIDE,
                                self.mac)
        out.replies.append(build_ethernet(ll or bytes(frame[6:12]), self.mac, ETH_P_IPV6, na))
        self.stats.ndisc_na_sent += 1

    def neigh_solicit(self, target: int, dst_mac: bytes | None = None) -> bytes | None:
        """An NS for `target` from our first IPv6 address: to its
        solicited-node group, or unicast to `dst_mac` (the PROBE state's
        check of a cached address, RFC 4861 §7.3.3); None without one."""
        if not self.addrs6:
            return None
        src = min(self.addrs6)
        if dst_mac is None:
            group = solicited_node_multicast(target)
            ns = build_neigh_solicit(src, group, target, self.mac)
            return build_ethernet(multicast_mac(group), self.mac, ETH_P_IPV6, ns)
        ns = build_neigh_solicit(src, target, target, self.mac)
        return build_ethernet(dst_mac, self.mac, ETH_P_IPV6, ns)

    def arp_request(self, target: int, sender: int, dst_mac: bytes | None = None) -> bytes:
        """A who-has for `target`: broadcast, or unicast to `dst_mac` (the
        PROBE state's re-check of a cached address, Linux `arp_solicit`)."""
        body = build_arp_request(self.mac, sender, target)
        return build_ethernet(dst_mac or BROADCAST_MAC, self.mac, ETH_P_ARP, body, pad=True)
