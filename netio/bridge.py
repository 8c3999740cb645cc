"""An impairing L2 bridge: frames between two interfaces, with seeded faults each way.

`shardstack impair-bridge IF_A IF_B --loss P --dup P --reorder P --delay-ms D`
is a user-space "netem on a wire" for kernels and containers without
sch_netem. It knows nothing of shardstack: put it between any two hosts,
namespaces or VMs joined by interfaces it can open with AF_PACKET (typically
the middle namespace of client ── veth ── bridge ── veth ── server).

Each direction (A→B, B→A) has its own fault pipeline (`netio.impair`'s lane:
loss, duplication, corruption, delay ± jitter, adjacent-swap reordering) with
its own RNG seeded from (seed, direction), so the same seed and the same
frames give the same faults, and an optional rate limit (a FIFO served at
`rate` bits/s with a tail-drop limit, the bottleneck link). Frames come in
with the virtio-net header (PACKET_VNET_HDR), so the bridge sees what the
kernel hands over:

* a GSO super-frame (a peer with TSO/GSO on: up to 64 KiB of TCP in one skb)
  is cut into MTU-sized TCP/IPv4 segments here, as a NIC would put them on
  the wire, so loss and reordering hit segments, not 45-segment blocks
  (Linux's tcp_gso_segment: sequence numbers advance, IP ids increment, CWR
  only on the first, FIN and PSH only on the last segment);
* a frame whose checksum the sender left to offload (CHECKSUM_PARTIAL, virtio
  NEEDS_CSUM) goes out with the same request, so the kernel on the far side
  completes it; corruption only hits frames with a complete checksum (damage
  to the others would be checksummed and so undetectable).

The interfaces are put in promiscuous mode (released on exit). The bridge's
own interfaces should have no IP address, so the bridge namespace's kernel
stays silent.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from shardstack.core.wire.checksum import internet_checksum, pseudo_header_sum

from .device import (
    ETH_P_ALL,
    PACKET_IGNORE_OUTGOING,
    PACKET_VNET_HDR,
    SOL_PACKET,
    TX_DROP_ERRNOS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    VNET_HDR_LEN,
    _grow_rcvbuf,
    get_mtu,
)
from .impair import ImpairLane, ImpairSpec

__all__ = ["BridgeCounters", "ImpairBridge", "gso_segment_tcpv4", "parse_rate", "main"]

PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
MAX_FRAME = 65535 + 14 + VNET_HDR_LEN + 64
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
TCP_CSUM_OFFSET = 16
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80
_ZERO_VNET = bytes(VNET_HDR_LEN)
BATCH = 64
# A frame in a pipeline: (frame, 0) with a complete checksum, else (frame, the
# virtio-net header to send it with).
_Item = tuple[bytes, Any]


def parse_rate(text: str) -> float:
    """'100mbit', '1gbit', '500kbit', '2000000' (bit/s) -> bits per second; 0 = unlimited."""
    t = text.strip().lower()
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if t.endswith(suffix):
            value = float(t[: -len(suffix)]) * scale
            break
    else:
        value = float(t)
    if value < 0:
        raise ValueError(f"negative rate: {text}")
    return value


def _l3_offset(frame: bytes | memoryview) -> int:
    """Offset of the network header: 14, or 18 behind one 802.1Q tag."""
    if len(frame) >= 18 and frame[12] << 8 | frame[13] == ETH_P_8021Q:
        return 18
    return 14


def gso_segment_tcpv4(frame: bytes | memoryview, gso_size: int) -> list[bytes]:
    """Cut an Ethernet+IPv4+TCP super-frame into segments of `gso_size` payload bytes.

    Each segment's TCP checksum field holds the folded pseudo-header sum
    (CHECKSUM_PARTIAL: the far side completes it, virtio NEEDS_CSUM at the
    TCP header). Mirrors what Linux's tcp_gso_segment/inet_gso_segment do:
    seq advances, IP id increments, CWR only on the first, FIN/PSH only on the
    last, IP total length and header checksum per segment.
    """
    mv = memoryview(frame)
    l3 = _l3_offset(mv)
    ihl = (mv[l3] & 0x0F) * 4
    l4 = l3 + ihl
    doff = (mv[l4 + 12] >> 4) * 4
    end = l4 + doff
    payload = mv[end:]
    if gso_size <= 0 or len(payload) <= gso_size:
        return [bytes(mv)]
    eth = bytes(mv[:l3])
    ip = bytearray(mv[l3:l4])
    tcp = bytearray(mv[l4:end])
    ident = ip[4] << 8 | ip[5]
    seq = int.from_bytes(tcp[4:8], "big")
    flags = tcp[13]
    src = int.from_bytes(ip[12:16], "big")
    dst = int.from_bytes(ip[16:20], "big")
    out: list[bytes] = []
    n = (len(payload) + gso_size - 1) // gso_size
    for i in range(n):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        ip[2:4] = (ihl + doff + len(chunk)).to_bytes(2, "big")
        ip[4:6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
        ip[10:12] = b"\0\0"
        ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
        tcp[4:8] = ((seq + i * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if i:
            f &= ~_CWR
        if i != n - 1:
            f &= ~(_FIN | _PSH)
        tcp[13] = f
        partial = pseudo_header_sum(src, dst, 6, doff + len(chunk))
        tcp[16:18] = partial.to_bytes(2, "big")
        out.append(b"".join((eth, ip, tcp, chunk)))
    return out


@dataclass(slots=True)
class BridgeCounters:
    """One direction's frame counts beyond the fault pipeline's own."""

    rx_frames: int = 0  # frames read from the ingress interface (super-frames once)
    rx_bytes: int = 0
    gso_split: int = 0  # super-frames cut into segments
    tx_frames: int = 0  # frames written to the egress interface
    tx_bytes: int = 0
    tx_errors: int = 0  # refused by the egress interface (too big, queue full, down)
    rate_dropped: int = 0  # tail drops at the rate limiter's queue

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Shaper:
    """A FIFO drained at `rate` bits/s (0: no limit), at most `limit` frames queued."""

    rate: float
    limit: int
    queue: collections.deque[tuple[float, _Item]] = field(default_factory=collections.deque)
    free_at: float = 0.0  # when the link finishes the last queued frame

    def push(self, item: _Item, now: float) -> bool:
        if len(self.queue) >= self.limit:
            return False
        start = max(now, self.free_at)
        self.free_at = start + len(item[0]) * 8.0 / self.rate
        self.queue.append((self.free_at, item))
        return True

    def pop_due(self, now: float, out: list[_Item]) -> None:
        q = self.queue
        while q and q[0][0] <= now:
            out.append(q.popleft()[1])

    def next_deadline(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class _Port:
    """One interface: an AF_PACKET socket with the virtio-net header, promiscuous."""

    def __init__(self, ifname: str) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            _grow_rcvbuf(s)
            s.bind((ifname, ETH_P_ALL))
            ifindex = socket.if_nametoindex(ifname)
            # struct packet_mreq: ifindex, type, alen, address[8]
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            s.setblocking(False)
            self.mtu = get_mtu(ifname)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self.name = ifname

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class ImpairBridge:
    """Forward frames A↔B through one fault pipeline (and shaper) per direction.

    `step(timeout)` waits at most `timeout` s for frames or a due deadline,
    moves what is ready and returns; `run(seconds, ...)` loops until the time
    is up or `stop()` is called. Items in the pipelines are (frame, vnet):
    vnet 0 for a frame with a complete checksum, else the 10-byte virtio-net
    header to send it with (the offload request passed through).
    """

    def __init__(self, if_a: str, if_b: str, spec: ImpairSpec, rate: float = 0.0,
                 limit: int = 1000, clock: Callable[[], float] = time.monotonic,
                 segment: bool = True) -> None:
        self.spec = spec
        # segment=False keeps super-frames whole: one fault hits a whole burst of
        # up to 45 segments (a burst loss; what a bridge without GSO would do).
        self.segment = segment
        self.clock = clock
        self.ports: list[_Port] = []
        try:
            self.ports = [_Port(if_a), _Port(if_b)]
        except BaseException:
            self.close()
            raise
        self.names = ("a2b", "b2a")
        self.lanes = [ImpairLane(spec, name, True, True) for name in self.names]
        self.counts = [BridgeCounters(), BridgeCounters()]
        self.shapers = [_Shaper(rate, limit) if rate > 0 else None for _ in self.names]
        self._stop = False
        self._poller = select.poll()
        for p in self.ports:
            self._poller.register(p.fileno(), select.POLLIN)
        self._fd_dir = {p.fileno(): i for i, p in enumerate(self.ports)}

    # -- the data path -------------------------------------------------------------------

    def _ingest(self, d: int, now: float) -> int:
        """Read up to a batch from port d, through lane d; frames read."""
        sock = self.ports[d].sock
        c = self.counts[d]
        batch: list[tuple[bytes, Any]] = []  # (frame, 0 or the vnet header to send with)
        n = 0
        while n < BATCH:
            try:
                data = sock.recv(MAX_FRAME)
            except BlockingIOError:
                break
            n += 1
            if len(data) <= VNET_HDR_LEN + 14:
                continue
            c.rx_frames += 1
            c.rx_bytes += len(data) - VNET_HDR_LEN
            vflags, gso_type, _hl, gso_size, _cs, _co = VNET_HDR.unpack_from(data)
            frame = data[VNET_HDR_LEN:]
            gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
            if gso == VIRTIO_NET_HDR_GSO_TCPV4 and self.segment and _is_ipv4(frame):
                c.gso_split += 1
                l4 = _l3_offset(frame) + (frame[_l3_offset(frame)] & 0x0F) * 4
                hdr = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0,
                                    0, l4, TCP_CSUM_OFFSET)
                batch.extend((seg, hdr) for seg in gso_segment_tcpv4(frame, gso_size))
            elif vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso != VIRTIO_NET_HDR_GSO_NONE:
                # Offload requests we do not act on go through as they are.
                batch.append((frame, data[:VNET_HDR_LEN]))
            else:
                batch.append((frame, 0))
        if batch:
            self._forward(d, self.lanes[d].push(batch, now), now)
        return n

    def _forward(self, d: int, ready: list[_Item], now: float) -> None:
        shaper = self.shapers[d]
        if shaper is not None:
            for item in ready:
                if not shaper.push(item, now):
                    self.counts[d].rate_dropped += 1
            ready = []
            shaper.pop_due(now, ready)
        if ready:
            self._send(d, ready)

    def _send(self, d: int, items: list[_Item]) -> None:
        sendmsg = self.ports[1 - d].sock.sendmsg
        c = self.counts[d]
        for frame, vnet in items:
            try:
                sendmsg((vnet or _ZERO_VNET, frame))
            except OSError as e:
                if e.errno not in TX_DROP_ERRNOS:
                    raise
                c.tx_errors += 1
                continue
            c.tx_frames += 1
            c.tx_bytes += len(frame)

    def _release(self, now: float) -> None:
        for d in (0, 1):
            ready = self.lanes[d].poll(now)
            shaper = self.shapers[d]
            if shaper is not None:
                self._forward(d, ready, now)
                out: list[_Item] = []
                shaper.pop_due(now, out)
                if out:
                    self._send(d, out)
            elif ready:
                self._send(d, ready)

    def next_deadline(self) -> float | None:
        ds = [t for lane in self.lanes if (t := lane.next_deadline()) is not None]
        ds += [t for s in self.shapers if s is not None and (t := s.next_deadline()) is not None]
        return min(ds) if ds else None

    def step(self, timeout: float) -> int:
        """Wait up to `timeout` s, move what is ready; frames read."""
        now = self.clock()
        due = self.next_deadline()
        if due is not None:
            timeout = max(0.0, min(timeout, due - now))
        events = self._poller.poll(timeout * 1000.0)
        now = self.clock()
        n = 0
        for fd, _ in events:
            n += self._ingest(self._fd_dir[fd], now)
        self._release(self.clock())
        return n

    # -- control ---------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self, seconds: float, progress: Callable[[dict[str, dict[str, int]]], None] | None = None,
            interval: float = 1.0) -> None:
        """Forward until `seconds` pass or `stop()`; `progress(counters)` every `interval` s."""
        start = self.clock()
        end = start + seconds
        next_report = start + interval
        while not self._stop:
            now = self.clock()
            if now >= end:
                break
            wait = min(0.1, end - now)
            if progress is not None:
                wait = min(wait, max(0.0, next_report - now))
            self.step(wait)
            if progress is not None and self.clock() >= next_report:
                next_report += interval
                progress(self.counters())

    def counters(self) -> dict[str, dict[str, int]]:
        out = {}
        for d, name in enumerate(self.names):
            row = self.lanes[d].stats.as_dict()
            row.update(self.counts[d].as_dict())
            out[name] = row
        return out

    def close(self) -> None:
        for p in self.ports:
            p.close()
        self.ports = []


def _is_ipv4(frame: bytes) -> bool:
    l3 = _l3_offset(frame)
    return frame[l3 - 2] << 8 | frame[l3 - 1] == ETH_P_IP and frame[l3] >> 4 == 4


# -- the command ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("if_a", metavar="IF_A", help="one interface (frames read here go out on IF_B)")
    p.add_argument("if_b", metavar="IF_B", help="the other interface")
    p.add_argument("--loss", type=_rate_arg, default=0.0, metavar="P",
                   help="drop probability per frame, each direction: 0.01 or 1%% (default 0)")
    p.add_argument("--dup", type=_rate_arg, default=0.0, metavar="P",
                   help="duplication probability per frame")
    p.add_argument("--reorder", type=_rate_arg, default=0.0, metavar="P",
                   help="probability that a frame is held back until the next one has passed "
                        "(at most --hold-ms)")
    p.add_argument("--corrupt", type=_rate_arg, default=0.0, metavar="P",
                   help="probability of one flipped bit (frames with a complete checksum only)")
    p.add_argument("--delay-ms", type=float, default=0.0, metavar="D",
                   help="one-way delay added in each direction (RTT grows by 2 D)")
    p.add_argument("--jitter-ms", type=float, default=0.0, metavar="J",
                   help="uniform ± jitter on the delay (may reorder by itself)")
    p.add_argument("--hold-ms", type=float, default=10.0,
                   help="longest a reordered frame waits for a successor (default 10)")
    p.add_argument("--ce", type=_rate_arg, default=0.0, metavar="P",
                   help="probability that an ECN-capable (ECT) IPv4 packet is marked "
                        "Congestion Experienced instead of passing unmarked, as an AQM "
                        "router does (RFC 3168; netem's ecn); default 0")
    p.add_argument("--mtu-blackhole", type=int, default=0, metavar="N",
                   help="silently drop IPv4 packets longer than N bytes, no ICMP: a path-MTU "
                        "black hole (RFC 4821) after GSO frames are cut (default: none)")
    p.add_argument("--rate", type=parse_rate, default=0.0, metavar="R",
                   help="bottleneck rate per direction: 100mbit, 1gbit, bits/s (default: none)")
    p.add_argument("--limit", type=int, default=1000,
                   help="frames queued at the rate limiter before tail drop (default 1000)")
    p.add_argument("--keep-gso", action="store_true",
                   help="forward TSO/GSO super-frames whole: a fault then hits a burst of up "
                        "to 45 segments (default: cut them into MTU-sized segments first)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1): same seed, "
                   "same frames -> same faults")
    p.add_argument("--seconds", type=float, default=3600.0, metavar="S",
                   help="stop after S seconds (default 3600)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="seconds between progress lines on stderr (0: none; default 5)")
    p.add_argument("--json", action="store_true", help="print the final counters as JSON")


def _rate_arg(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def spec_from_args(a: argparse.Namespace) -> ImpairSpec:
    return ImpairSpec(loss=a.loss, dup=a.dup, reorder=a.reorder, corrupt=a.corrupt,
                      delay=a.delay_ms / 1e3, jitter=a.jitter_ms / 1e3, hold=a.hold_ms / 1e3,
                      seed=a.seed, ce=a.ce, blackhole=a.mtu_blackhole)


def _progress_line(c: dict[str, dict[str, int]]) -> str:
    return "  ".join(
        f"{d}: {r['frames']} in, {r['lost']} lost, {r['duplicated']} dup, "
        f"{r['reordered']} reord, {r['tx_frames']} out" for d, r in c.items())


def run_command(a: argparse.Namespace) -> int:
    import json

    if a.seconds <= 0 or a.delay_ms < 0 or a.jitter_ms < 0 or a.limit < 1 or a.mtu_blackhole < 0:
        print("impair-bridge: --seconds, --limit must be positive, delays non-negative",
              file=sys.stderr)
        return 2
    try:
        bridge = ImpairBridge(a.if_a, a.if_b, spec_from_args(a), rate=a.rate, limit=a.limit,
                              segment=not a.keep_gso)
    except OSError as e:
        print(f"impair-bridge: cannot open {a.if_a}/{a.if_b}: {e} (needs root or "
              "CAP_NET_RAW, and both interfaces in this namespace)", file=sys.stderr)
        return 1
    old = {s: signal.signal(s, bridge.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    print(f"impair-bridge: {a.if_a} <-> {a.if_b} loss={a.loss:g} dup={a.dup:g} "
          f"reorder={a.reorder:g} delay={a.delay_ms:g}ms rate={a.rate:g}bit/s ce={a.ce:g} "
          f"mtu-blackhole={a.mtu_blackhole} seed={a.seed} "
          f"for at most {a.seconds:g} s (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        report = None
        if a.interval > 0:
            def report(c: dict[str, dict[str, int]]) -> None:
                print(f"[{time.monotonic() - started:7.1f}s] {_progress_line(c)}",
                      file=sys.stderr, flush=True)
        bridge.run(a.seconds, report, a.interval if a.interval > 0 else 1.0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        counters = bridge.counters()
        bridge.close()
    elapsed = time.monotonic() - started
    if a.json:
        print(json.dumps({"seconds": round(elapsed, 3), "seed": a.seed, "counters": counters}))
    else:
        print(f"impair-bridge: {elapsed:.1f} s")
        for d, row in counters.items():
            print(f"  {d}: " + " ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardstack impair-bridge", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
