"""Test helpers for the engine: frames parsed into readable segments, shards back to back.

Tests read like packet traces (smoltcp's ``send``/``recv``): a :class:`Peer` plays
a scripted remote host against one Shard, building segments with ``core.wire``
and asserting exactly which segments come back; :class:`Pair` joins two Shards
with a fake clock and a hand-driven wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardstack.core import Shard, ShardConfig
from shardstack.core.wire.checksum import verify_tcp_checksum
from shardstack.core.wire.ipv4 import parse_ipv4, str_to_ip
from shardstack.core.wire.ipv6 import NEXTHDR_TCP, parse_ipv6, str_to_ip6
from shardstack.core.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    build_tcp_ipv4,
    build_tcp_ipv6,
    build_tcp_options,
    flags_to_str,
    parse_tcp,
)

A = str_to_ip("198.18.0.1")
B = str_to_ip("198.18.0.2")
#: The IPv6 pair (RFC 4193 unique local addresses, as the interop tests use).
A6 = str_to_ip6("fd00::1")
B6 = str_to_ip6("fd00::2")
SECRET = b"test-secret-0123456789"

__all__ = ["A", "B", "A6", "B6", "Seg", "parse", "parse6", "Peer", "Peer6", "Pair", "make_shard",
           "make_shard6", "listen", "passive_open", "server_conn", "connect_over", "ACK", "FIN",
           "PSH", "RST", "SYN"]


@dataclass(frozen=True)
class Seg:
    """One TCP segment as a test wants to see it."""

    src: int
    dst: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: str  # tcpdump letters, e.g. "S." for SYN+ACK
    window: int
    mss: int | None
    wscale: int | None
    sack_perm: bool
    ts: tuple[int, int] | None
    sack: tuple[tuple[int, int], ...]
    payload: bytes

    def __repr__(self) -> str:
        return (f"<{self.sport}>{self.dport} [{self.flags}] seq={self.seq} ack={self.ack} "
                f"win={self.window} len={len(self.payload)}>")


def parse(frame: bytes) -> Seg:
    ip, payload = parse_ipv4(frame)
    t = parse_tcp(payload)
    o = t.options
    return Seg(ip.src, ip.dst, t.src_port, t.dst_port, t.seq, t.ack, flags_to_str(t.flags),
               t.window, o.mss, o.wscale, o.sack_perm, o.ts, o.sack_blocks, bytes(t.payload))


def parse6(frame: bytes) -> Seg:
    """An IPv6 frame's TCP segment (its checksum must verify)."""
    ip, payload = parse_ipv6(frame)
    assert ip.next_header == NEXTHDR_TCP, ip
    assert verify_tcp_checksum(ip.src, ip.dst, payload), "bad TCP checksum over IPv6"
    t = parse_tcp(payload)
    o = t.options
    return Seg(ip.src, ip.dst, t.src_port, t.dst_port, t.seq, t.ack, flags_to_str(t.flags),
               t.window, o.mss, o.wscale, o.sack_perm, o.ts, o.sack_blocks, bytes(t.payload))


def make_shard6(addr6: int = A6, addr4: int | None = None, **kw) -> Shard:
    """A shard with the IPv6 address ``addr6`` (and the IPv4 one ``addr4``, if given)."""
    kw.setdefault("secret", SECRET)
    return Shard(ShardConfig(addrs=[addr4] if addr4 else [], addrs6=[addr6], **kw), 0.0)


def make_shard(addr: int = A, **kw) -> Shard:
    kw.setdefault("secret", SECRET)
    return Shard(ShardConfig(addrs=[addr], **kw), 0.0)


def listen(sh: Shard, port: int = 80, backlog: int = 4, opts: tuple = (),
           family: int = 2) -> int:
    """A listener on sh's wildcard:``port``, ``opts`` ((level, opt, value), ...) set before
    bind; its sd.  ``family`` 10 (AF_INET6): on ``::``."""
    lsd = sh.socket(family)
    for level, opt, value in opts:
        sh.setsockopt(lsd, level, opt, value)
    sh.bind(lsd, 0, port)
    sh.listen(lsd, backlog)
    return lsd


class Peer:
    """A scripted remote host talking to ``shard`` from ``addr:port``."""

    def __init__(self, shard: Shard, addr: int = B, port: int = 40000,
                 shard_addr: int = A) -> None:
        self.shard = shard
        self.addr = addr
        self.port = port
        self.shard_addr = shard_addr
        self.now = 0.0

    def send(self, flags: int, seq: int, ack: int = 0, *, dport: int = 80, window: int = 65535,
             payload: bytes = b"", mss: int | None = None, wscale: int | None = None,
             sack_perm: bool = False, ts: tuple[int, int] | None = None,
             sack: tuple = (), at: float | None = None, urgent: int = 0) -> None:
        if at is not None:
            self.now = at
            self.shard.advance(at)
        opts = build_tcp_options(mss=mss, wscale=wscale, sack_perm=sack_perm, ts=ts,
                                 sack_blocks=sack)
        pkt = build_tcp_ipv4(self.addr, self.shard_addr, self.port, dport, seq & 0xFFFFFFFF,
                             ack & 0xFFFFFFFF, flags, window, opts, payload, urgent=urgent)
        self.shard.receive(pkt, self.now)

    def recv(self) -> list[Seg]:
        """Every frame the shard sent since the last call, parsed."""
        return [parse(f) for f in self.shard.take_frames()]

    def recv_one(self) -> Seg:
        segs = self.recv()
        assert len(segs) == 1, segs
        return segs[0]

    def advance(self, t: float) -> list[Seg]:
        self.now = t
        self.shard.advance(t)
        return self.recv()

    def run_timers(self, limit: int = 10) -> list[tuple[float, Seg]]:
        """Fire the shard's timers in turn until none is left (at most ``limit``):
        (time, segment) for every segment they sent."""
        sent: list[tuple[float, Seg]] = []
        for _ in range(limit):
            t = self.shard.next_deadline()
            if t is None:
                break
            sent += [(t, s) for s in self.advance(t)]
        return sent


class Peer6(Peer):
    """A scripted IPv6 host ``addr:port`` (B6) talking to ``shard`` at A6: the same
    calls as :class:`Peer`, IPv6 frames."""

    def __init__(self, shard: Shard, addr: int = B6, port: int = 40000,
                 shard_addr: int = A6) -> None:
        super().__init__(shard, addr, port, shard_addr)

    def frame(self, flags: int, seq: int, ack: int = 0, *, dport: int = 80,
              window: int = 65535, payload: bytes = b"", urgent: int = 0, sack: tuple = (),
              **opts) -> bytes:
        return build_tcp_ipv6(self.addr, self.shard_addr, self.port, dport, seq & 0xFFFFFFFF,
                              ack & 0xFFFFFFFF, flags, window,
                              build_tcp_options(sack_blocks=sack, **opts), payload,
                              urgent=urgent)

    def send(self, flags: int, seq: int, ack: int = 0, *, at: float | None = None,
             **kw) -> None:  # type: ignore[override]
        if at is not None:
            self.now = at
            self.shard.advance(at)
        self.shard.receive(self.frame(flags, seq, ack, **kw), self.now)

    def recv(self) -> list[Seg]:
        """Every TCP frame the shard sent since the last call (ICMPv6 ones skipped)."""
        out = []
        for f in self.shard.take_frames():
            if parse_ipv6(f)[0].next_header == NEXTHDR_TCP:
                out.append(parse6(f))
        return out


def passive_open(peer: Peer, lsd: int, isn: int = 1000, *, ack_window: int = 65535,
                 ack_at: float | None = None, **syn) -> tuple[int, Seg]:
    """``peer`` opens a connection to the listener ``lsd``: its SYN (seq ``isn``, options
    ``syn``), the shard's SYN-ACK, its ACK (window ``ack_window``, sent at ``ack_at``,
    echoing the SYN-ACK's timestamp if its SYN had one), then the shard accepts.
    (accepted sd, SYN-ACK)."""
    peer.send(SYN, isn, **syn)
    sa = peer.recv_one()
    ts = syn.get("ts")
    peer.send(ACK, isn + 1, sa.seq + 1, window=ack_window, at=ack_at,
              ts=(ts[0] + 1, sa.ts[0]) if ts else None)
    acc = peer.shard.accept(lsd)
    assert acc is not None, "the handshake left nothing to accept"
    return acc[0], sa


def server_conn(isn: int = 1000, *, ack_window: int = 65535, ack_at: float | None = None,
                **syn) -> tuple[Shard, int, Peer, int]:
    """A fresh shard that accepted (on A:80) one connection from a Peer (B:40000), opened
    as :func:`passive_open` does: (shard, sd, peer, the shard's first data seq)."""
    sh = make_shard()
    peer = Peer(sh)
    sd, sa = passive_open(peer, listen(sh), isn, ack_window=ack_window, ack_at=ack_at, **syn)
    return sh, sd, peer, sa.seq + 1


class Pair:
    """Two shards back to back on a lossless wire with a fake clock.

    ``tap`` (list) records every frame that crossed, as (time, "ab"/"ba", Seg).
    ``drop`` is a predicate (direction, Seg) -> bool deciding which frames the wire loses.
    """

    def __init__(self, a: Shard | None = None, b: Shard | None = None, **kw) -> None:
        self.a = a or make_shard(A, **kw)
        self.b = b or make_shard(B, **kw)
        self.now = 0.0
        self.tap: list[tuple[float, str, Seg]] = []
        self.drop = None

    def deliver(self, max_rounds: int = 100_000) -> int:
        """Move frames both ways until the wire is quiet; returns how many crossed."""
        n = 0
        for _ in range(max_rounds):
            fa = self.a.take_frames()
            fb = self.b.take_frames()
            if not fa and not fb:
                return n
            for direction, frames, dst in (("ab", fa, self.b), ("ba", fb, self.a)):
                for f in frames:
                    seg = parse(f)
                    self.tap.append((self.now, direction, seg))
                    if self.drop is not None and self.drop(direction, seg):
                        continue
                    dst.receive(f, self.now)
                    n += 1
        raise AssertionError("wire never went quiet")

    def advance(self, t: float) -> None:
        """Move the clock to ``t``, firing timers in order and delivering what they send."""
        for _ in range(1_000_000):
            self.deliver()
            nxt = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            if not nxt or min(nxt) > t:
                break
            self.now = max(self.now, min(nxt))
            self.a.advance(self.now)
            self.b.advance(self.now)
        self.now = max(self.now, t)
        self.deliver()

    def segs(self, direction: str | None = None) -> list[Seg]:
        return [s for _, d, s in self.tap if direction is None or d == direction]

    def listen(self, port: int = 80, backlog: int = 4, opts: tuple = ()) -> int:
        """A listener on b:port (see :func:`listen`); its sd."""
        return listen(self.b, port, backlog, opts)

    def connect(self, port: int = 80, backlog: int = 16, opts: tuple = ()) -> tuple[int, int, int]:
        """Listener on b:port (``opts`` set on it), a connects; returns (listener sd, client
        sd, server sd)."""
        lsd = self.listen(port, backlog, opts)
        csd = self.a.socket()
        self.a.connect(csd, B, port, self.now)
        self.deliver()
        acc = self.b.accept(lsd)
        assert acc is not None
        return lsd, csd, acc[0]


def connect_over(link, a: Shard, b: Shard, port: int = 80, timeout: float = 30.0,
                 server_opts: tuple = ()) -> tuple[int, int]:
    """Listen on b (B:port, with `server_opts` set on the listener), connect from a over
    `link`, run the link until b accepts; (client sd, server sd)."""
    lsd = listen(b, port, 8, server_opts)
    c = a.socket()
    a.connect(c, B, port, 0.0)
    box: list = []

    def accepted() -> bool:
        r = b.accept(lsd)
        if r is not None:
            box.append(r)
        return bool(box)

    assert link.run_until(accepted, timeout)
    return c, box[0][0]


class Bulk:
    """`size` zero bytes from a's socket `c` to b's socket `s` over `link`, in
    writes of at most 64 KiB: `write()` offers a what is left, `read()` drains
    b, `step()` does both and says whether everything arrived (for run_until)."""

    def __init__(self, link, a: Shard, c: int, b: Shard, s: int, size: int) -> None:
        self.link, self.a, self.c, self.b, self.s = link, a, c, b, s
        self.data = memoryview(bytes(size))
        self.sent = self.got = 0

    def write(self) -> None:
        if self.sent < len(self.data):
            self.sent += self.a.send(self.c, self.data[self.sent:self.sent + 65536],
                                     self.link.now)

    def read(self) -> None:
        while chunk := self.b.recv(self.s, 1 << 20):
            self.got += len(chunk)

    def step(self) -> bool:
        self.write()
        self.read()
        return self.got == len(self.data)
