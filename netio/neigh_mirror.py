"""The worker's side of neighbour resolution: Ethernet output over a mirror of netio's table.

A worker on AF_PACKET writes whole Ethernet frames, so each IPv4 packet needs
the next hop's MAC. The neighbour table itself is netio's (netio.neighbour:
filled from ARP only, Linux's NUD states and timers). A worker keeps a
mirror of it, fed by netio's announcements on the worker channel
(netio.process), and talks back with fire-and-forget messages
(NEIGH_RESOLVE, NEIGH_CONFIRM), so nothing here ever waits on netio. This is
Linux's output half of a neighbour (`neigh_resolve_output`,
`__neigh_event_send` queueing on an INCOMPLETE entry, `dst_confirm`), put on
the device side of a worker as a wrapper around its send-only packet socket.

Pure apart from the channel: the clock is injected (`clock`), and the
engine is only read (the connections through a next hop, for confirmation).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from .device import Device, DeviceWrapper, PacketDevice
from .neighbour import NUD_DELAY, NUD_FAILED, NUD_STALE, NUD_VALID, NeighParms
from .process import NEIGH_CONFIRM, NEIGH_RESOLVE, encode_neigh_request, is_ip6, neigh_endpoint

__all__ = [
    "L2Tx",
    "MirrorStats",
    "NeighChannel",
    "ARP_QUEUE_LEN",
    "ARP_RETRANS",
    "ARP_PROBES",
    "CONFIRM_LEAD",
    "NEIGH_MIRROR_TTL",
    "DELAY_FIRST_PROBE_TIME",
]

# Neighbour resolution (Linux neighbour.c / arp.c defaults). The table itself
# is netio's (netio.neighbour: filled from ARP only, NUD states and timers);
# a worker mirrors it from netio's announcements and talks back with
# fire-and-forget messages, so nothing here ever waits on netio.
ARP_QUEUE_LEN = 3  # frames held per unresolved neighbour (the classic unres_qlen)
ARP_RETRANS = 1.0  # seconds between NEIGH_RESOLVE re-asks while INCOMPLETE (retrans_time)
ARP_PROBES = 3  # re-asks before the worker gives up on the neighbour (mcast_solicit)
CONFIRM_LEAD = 1.0  # s: look for forward progress this long before netio's DELAY ends
NEIGH_MIRROR_TTL = 60.0  # s: an entry netio said nothing of this long is asked about again
NEIGH_MIRROR_MAX = 4096  # STALE entries mirrored at most (netio's table holds 1024)
NEIGH_SNDHWM = 1024  # messages to netio queued before we count them as dropped
DELAY_FIRST_PROBE_TIME = NeighParms().delay_first_probe_time  # netio's DELAY (5 s)


@dataclass(slots=True)
class Unresolved:
    """An INCOMPLETE neighbour: frames waiting for its MAC (`arp_queue`)."""

    queue: list[tuple[bytes, int]] = field(default_factory=list)  # (packet, gso_size), oldest first
    probes: int = 1
    deadline: float = 0.0


@dataclass(slots=True)
class DelayCheck:
    """A neighbour in DELAY: at `deadline`, confirm it if a connection through
    it made forward progress since `snapshot` (id(sock) -> snd_una)."""

    deadline: float
    snapshot: dict[int, int]


@dataclass(slots=True)
class MirrorStats:
    """What a worker's side of neighbour resolution did (worker `stats`: neigh)."""

    queued: int = 0  # frames that waited on an unresolved neighbour
    flushed: int = 0  # of those, sent once it resolved
    unres_discards: int = 0  # pushed out of a full queue (drop NEIGH_QUEUEFULL)
    failed: int = 0  # dropped with a neighbour that failed (drop NEIGH_FAILED)
    probes: int = 0  # NEIGH_RESOLVE for a miss (first ask and re-asks)
    uses: int = 0  # NEIGH_RESOLVE for the first use of a STALE entry
    confirms: int = 0  # NEIGH_CONFIRM sent (forward progress in DELAY)
    updates: int = 0  # entries netio announced
    mac_changes: int = 0  # announced entries whose MAC changed
    msg_dropped: int = 0  # messages to netio its queue refused


class NeighSender(Protocol):
    """Where a worker's neighbour messages go (`NeighChannel`, or a test's recorder)."""

    def send(self, msg: bytes) -> bool: ...

    def close(self) -> None: ...


class NeighChannel:
    """Worker -> netio neighbour messages (netio.process NEIGH_RESOLVE,
    NEIGH_CONFIRM): a zmq PUSH to netio's PULL, sent with NOBLOCK and never
    answered, so a slow, absent or restarting netio costs at most a counted
    drop. libzmq queues to a peer that is not there yet (ZMQ_IMMEDIATE off)."""

    def __init__(self, run_dir: str) -> None:
        self.endpoint = neigh_endpoint(run_dir)
        self.sock: zmq.Socket[bytes] | None = None

    def send(self, msg: bytes) -> bool:
        sock = self.sock
        if sock is None:
            sock = self.sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, NEIGH_SNDHWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
        try:
            sock.send(msg, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class L2Tx(DeviceWrapper):
    """Ethernet framing for a worker's AF_PACKET TX (netio has none for workers).

    Next hop: the destination itself when on-link, else `--gateway`. Its MAC
    comes only from netio's neighbour table, which only ARP fills
    (netio.neighbour): received frames teach nothing, so a forged TCP frame
    cannot redirect our traffic. netio announces every change of an entry
    (`neigh_update`, with its NUD state) and we mirror the usable ones:
    `neigh` holds those we may use without a word (REACHABLE, DELAY, PROBE),
    `stale` the STALE ones, whose first use we report (NEIGH_RESOLVE: netio
    arms DELAY, as Linux's `neigh_event_send`) while we keep sending.

    A miss never blocks: the frame waits on the neighbour, at most
    ARP_QUEUE_LEN of them (the oldest goes first, counted `unres_discards`),
    as Linux's `__neigh_event_send` queues on an INCOMPLETE entry, and we
    send NEIGH_RESOLVE; the frames go out when netio's announcement arrives.
    Every ARP_RETRANS we ask again, and after ARP_PROBES (or when netio says
    FAILED) the frames are dropped (`failed`), as `neigh_invalidate` does;
    TCP retransmits.

    Confirmation (Linux `dst_confirm` -> `neigh_confirm`): when netio
    announces DELAY we note snd_una of the connections through that hop, and
    CONFIRM_LEAD before the DELAY ends, if one of them moved (the peer acked
    new data or our SYN), we send NEIGH_CONFIRM, so netio goes back to
    REACHABLE instead of probing. A confirmation names an address, never a MAC.
    """

    def __init__(self, inner: Device, mac: bytes, subnet: ipaddress.IPv4Network | None,
                 gateway: int | None, chan: NeighSender,
                 clock: Callable[[], float] = time.monotonic,
                 subnet6: ipaddress.IPv6Network | None = None) -> None:
        """`inner`: the send-only packet socket (maybe wrapped); `mac`: ours;
        `subnet`: on-link destinations, the others go to `gateway`.
        `subnet6`: our IPv6 prefix; IPv6 packets (version 6) go to their
        destination's MAC, resolved by netio's NDP table (there is no IPv6
        gateway: off-link IPv6 destinations are solicited directly)."""
        super().__init__(inner)
        self.l2 = True
        self.mac = mac
        self.net = int(subnet.network_address) if subnet is not None else 0
        self.mask = int(subnet.netmask) if subnet is not None else 0xFFFFFFFF
        self.gateway = gateway
        self.chan = chan
        self.clock = clock
        self.shard: Any = None  # the worker's Shard (attach_shard), for confirmations
        self.neigh: dict[int, bytes] = {}  # ip -> 14-byte Ethernet header, usable
        self.stale: dict[int, bytes] = {}  # ip -> header, usable once reported (STALE)
        self.heard: dict[int, float] = {}  # ip -> when netio last announced it
        self.unres: dict[int, Unresolved] = {}
        self.checks: dict[int, DelayCheck] = {}
        self._sweep_at: float | None = None
        self.stats = MirrorStats()

    def attach_shard(self, shard: object) -> None:
        """The shard whose connections confirm neighbours (forward progress)."""
        self.shard = shard

    # -- netio's announcements ----------------------------------------------------

    def neigh_update(self, entries: Iterable[tuple[int, bytes, int]],
                     now: float | None = None) -> None:
        """netio's announcement [(ip, mac, state)] (netio.process): mirror it,
        and send what waited on a neighbour that is now usable."""
        if now is None:
            now = self.clock()
        st = self.stats
        for ip, mac, state in entries:
            st.updates += 1
            if not state & NUD_VALID:  # INCOMPLETE, FAILED, gone
                self.neigh.pop(ip, None)
                self.stale.pop(ip, None)
                self.heard.pop(ip, None)
                self.checks.pop(ip, None)
                if state == NUD_FAILED and ip in self.unres:
                    st.failed += len(self.unres.pop(ip).queue)
                continue
            hdr = bytes(mac) + self.mac + (b"\x86\xdd" if is_ip6(ip) else b"\x08\x00")
            old = self.neigh.get(ip) or self.stale.get(ip)
            if old is not None and old != hdr:
                st.mac_changes += 1
            self.heard[ip] = now
            if state == NUD_STALE:
                self.neigh.pop(ip, None)
                self.stale[ip] = hdr
                if len(self.stale) > NEIGH_MIRROR_MAX:
                    del self.stale[next(iter(self.stale))]
            else:
                self.stale.pop(ip, None)
                self.neigh[ip] = hdr
                if self._sweep_at is None:
                    self._sweep_at = now + NEIGH_MIRROR_TTL
                if state == NUD_DELAY:
                    self._arm_check(ip, now)
                else:
                    self.checks.pop(ip, None)  # REACHABLE again, or PROBE: too late
            if ip in self.unres:
                if ip in self.stale:
                    self._use(ip)
                self._flush(ip)

    # -- the TX path ------------------------------------------------------------------

    def _hop(self, dst: int) -> int:
        if is_ip6(dst):
            return dst  # on-link or not, no IPv6 router to go through (see __init__)
        return dst if (dst & self.mask) == self.net or self.gateway is None else self.gateway

    def _header(self, hop: int) -> bytes | None:
        """The slow path of a frame for `hop`: a STALE entry (report its use),
        or a miss (queue; ask netio, without waiting)."""
        hdr = self.neigh.get(hop)
        if hdr is not None:
            return hdr
        if hop in self.stale:
            return self._use(hop)
        if hop not in self.unres:
            self.unres[hop] = Unresolved(deadline=self.clock() + ARP_RETRANS)
            self._solicit(hop)
        return None

    def _use(self, ip: int) -> bytes:
        """First use of a STALE entry (Linux `neigh_event_send`: netio arms
        DELAY); frames keep the cached MAC meanwhile."""
        hdr = self.stale.pop(ip)
        self.neigh[ip] = hdr
        self.stats.uses += 1
        self._tell(NEIGH_RESOLVE, ip)
        return hdr

    def _solicit(self, ip: int) -> None:
        self.stats.probes += 1
        self._tell(NEIGH_RESOLVE, ip)

    def _tell(self, op: int, ip: int) -> None:
        if not self.chan.send(encode_neigh_request(op, ip)):
            self.stats.msg_dropped += 1

    def _enqueue(self, hop: int, packet: bytes | bytearray | memoryview, gso: int) -> None:
        q = self.unres[hop].queue
        if len(q) >= ARP_QUEUE_LEN:
            del q[0]
            self.stats.unres_discards += 1
        q.append((bytes(packet), gso))  # the caller's buffer may be reused
        self.stats.queued += 1

    def _flush(self, ip: int) -> None:
        """The neighbour is resolved: its queued frames go, in order."""
        u = self.unres.pop(ip)
        hdr = self.neigh[ip]
        sent = 0
        run: list[bytes] = []
        for packet, gso in u.queue:
            if not gso:
                run.append(hdr + packet)
                continue
            if run:
                sent += self.inner.send_batch(run)
                run = []
            sent += self._send_gso(hdr, packet, gso)
        if run:
            sent += self.inner.send_batch(run)
        self.stats.flushed += sent

    def send_batch(self, frames: Iterable[bytes | bytearray | memoryview]) -> int:
        """Frames written or queued on an unresolved neighbour."""
        out = []
        queued = 0
        neigh, mask, net, gw = self.neigh, self.mask, self.net, self.gateway
        for f in frames:
            if f[0] >> 4 == 6:
                hop = int.from_bytes(f[24:40], "big")  # IPv6: the destination itself
            else:
                dst = int.from_bytes(f[16:20], "big")
                hop = dst if (dst & mask) == net or gw is None else gw  # _hop, inlined
            hdr = neigh.get(hop)
            if hdr is None:
                hdr = self._header(hop)
            if hdr is None:
                self._enqueue(hop, f, 0)
                queued += 1
                continue
            out.append(hdr + f)
        return (self.inner.send_batch(out) if out else 0) + queued

    def send_gso(self, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        dst = packet[24:40] if packet[0] >> 4 == 6 else packet[16:20]
        hop = self._hop(int.from_bytes(dst, "big"))
        hdr = self._header(hop)
        if hdr is None:
            self._enqueue(hop, packet, mss)
            return True
        return self._send_gso(hdr, packet, mss)

    def _send_gso(self, hdr: bytes, packet: bytes | bytearray | memoryview, mss: int) -> bool:
        inner = self.inner
        if isinstance(inner, PacketDevice):  # gathered by the kernel: no 64 KiB copy
            return inner.send_gso(packet, mss, eth=hdr)
        return inner.send_gso(hdr + packet, mss)

    # -- timers ---------------------------------------------------------------------

    def poll(self, now: float | None = None) -> None:
        self.inner.poll(now)
        if now is None:
            now = self.clock()
        if self.unres:
            self._neigh_timer(now)
        if self.checks:
            self._run_checks(now)
        if self._sweep_at is not None and now >= self._sweep_at:
            self._sweep(now)

    def _neigh_timer(self, now: float) -> None:
        """Our side of `neigh_timer_handler` for INCOMPLETE entries: ask netio
        again (a message or an announcement may have been lost), or give up
        and drop the queue after ARP_PROBES."""
        for ip, u in list(self.unres.items()):
            if u.deadline > now:
                continue
            if u.probes >= ARP_PROBES:
                del self.unres[ip]
                self.stats.failed += len(u.queue)
                continue
            u.probes += 1
            u.deadline = now + ARP_RETRANS
            self._solicit(ip)

    def _arm_check(self, ip: int, now: float) -> None:
        if self.shard is None or ip in self.checks:
            return
        self.checks[ip] = DelayCheck(now + max(0.0, DELAY_FIRST_PROBE_TIME - CONFIRM_LEAD),
                                     self._snd_una_by_sock(ip))

    def _run_checks(self, now: float) -> None:
        for ip, chk in list(self.checks.items()):
            if chk.deadline > now:
                continue
            del self.checks[ip]
            if self._progressed(ip, chk.snapshot):
                self.stats.confirms += 1
                self._tell(NEIGH_CONFIRM, ip)

    def _conns_via(self, hop: int) -> Iterator[tuple[object, int]]:
        """(sock, snd_una) of the shard's connections whose next hop is `hop`
        (read-only: the engine's established hash, keyed by 4-tuple)."""
        h = getattr(self.shard, "h", None)
        for key, sk in (h.ehash.items() if h is not None else ()):
            una = getattr(sk, "snd_una", None)  # request socks have none
            if una is not None and self._hop(key[2]) == hop:
                yield sk, una

    def _snd_una_by_sock(self, hop: int) -> dict[int, int]:
        return {id(sk): una for sk, una in self._conns_via(hop)}

    def _progressed(self, hop: int, before: dict[int, int]) -> bool:
        """Forward progress through `hop` since `before`: a connection's
        snd_una moved (the peer acked new data or our SYN: Linux `tcp_ack`'s
        FLAG_FORWARD_PROGRESS), or one appeared whose SYN is already acked."""
        for sk, una in self._conns_via(hop):
            prev = before.get(id(sk))
            if una != (getattr(sk, "iss", una) if prev is None else prev):
                return True
        return False

    def _sweep(self, now: float) -> None:
        """Entries netio said nothing of for NEIGH_MIRROR_TTL (it may have
        restarted without them) turn STALE here, so the next use asks again."""
        limit = now - NEIGH_MIRROR_TTL
        oldest = None
        for ip in list(self.neigh):
            t = self.heard.get(ip, now)
            if t <= limit:
                self.stale[ip] = self.neigh.pop(ip)
                self.checks.pop(ip, None)
            elif oldest is None or t < oldest:
                oldest = t
        self._sweep_at = None if oldest is None else oldest + NEIGH_MIRROR_TTL

    def next_deadline(self) -> float | None:
        d = self.inner.next_deadline()
        for u in self.unres.values():
            if d is None or u.deadline < d:
                d = u.deadline
        for c in self.checks.values():
            if d is None or c.deadline < d:
                d = c.deadline
        if self._sweep_at is not None and (d is None or self._sweep_at < d):
            d = self._sweep_at
        return d

    def close(self) -> None:
        self.chan.close()
        self.inner.close()
