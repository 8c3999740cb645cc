"""Structure-aware fuzzer of ``Shard.receive`` (issue 11), in-process.

One input is a byte string read as a script (:class:`Script`, a small
``FuzzedDataProvider``): which conversation to set up, through the Shard API
and a scripted peer, to reach a state (LISTEN, SYN-SENT, SYN-RECEIVED as a
request sock, ESTABLISHED with or without timestamps/SACK/window scale, with
out-of-order data queued, with a flight and a SACK scoreboard, FIN-WAIT-1/2,
CLOSE-WAIT, LAST-ACK, CLOSING, TIME-WAIT), then a sequence of steps:

- a TCP segment built from the connection's own sequence variables (seq/ack
  near RCV.NXT/SND.UNA/SND.NXT, at the window edges or anywhere), any flags,
  window, payload, and options from a list of well-formed and malformed ones
  (lengths 0/1/overrunning, odd kinds, SACK blocks near SND.UNA);
- the same segment with bytes overwritten (IP header, data offset, options),
  offered with and without the device's checksum vouching;
- an ICMP error quoting one of our segments (types/codes/MTUs/quote lengths);
- random bytes;
- with ``v6`` (``run_one(data, v6=True)``: every input also replays as IPv6)
  the same conversations over IPv6 against a dual-stack shard, the
  mutations rewriting IPv6 header fields and inserting extension headers
  (hop-by-hop, destination options, routing, fragment, malformed ones), and
  ICMPv6 errors (Packet Too Big with MTUs around 1280, unreachable, ...);
- application calls (send, recv, shutdown, close, setsockopt TCP_MAXSEG);
- time passing (timers fire).

The property, after every step (:func:`check_invariants`): nothing raised out
of the Shard, and every socket's state is coherent: SND.UNA <= SND.NXT <=
SND.MAX, RCV.WUP <= RCV.NXT, the send MSS at least ``tcp_min_snd_mss`` less
the options, queues accounted exactly (rcvq, ofo, sndq, SACK scoreboard),
out-of-order data after RCV.NXT, the SACK scoreboard inside (SND.UNA,
SND.MAX], receive memory within the buffer's limit, and the shard's tables
and output bounded.

Engines: atheris (libFuzzer, coverage-guided over shardstack.core, ~300-500 inputs/s) when it imports::

    .venv/bin/python tests/fuzz/fuzz_receive.py -runs=20000 NEW_DIR tests/fuzz_corpus/receive

a plain mutator of the corpus (no coverage, ~1400 inputs/s per core: the
engine for million-input runs)::

    .venv/bin/python tests/fuzz/fuzz_receive.py --plain 1000000 SEED

and hypothesis, in the slow test, feeding the same ``run_one``.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "unit" / "core"))

import socket  # noqa: E402

from core_helpers import (  # noqa: E402
    A6,
    ACK,
    B6,
    FIN,
    RST,
    SYN,
    A,
    B,
    Peer,
    Peer6,
    listen,
    make_shard,
    make_shard6,
)
from shardstack.core.dropreason import DropReason  # noqa: E402
from shardstack.core.sock import State  # noqa: E402
from shardstack.core.wire.checksum import internet_checksum  # noqa: E402
from shardstack.core.wire.icmp import build_icmp_error  # noqa: E402
from shardstack.core.wire.icmpv6 import build_icmpv6_error  # noqa: E402
from shardstack.core.wire.tcp import build_tcp_ipv4, build_tcp_ipv6, build_tcp_options  # noqa: E402

MASK = 0xFFFFFFFF
HALF = 0x80000000
CORPUS = HERE.parent / "fuzz_corpus" / "receive"
#: The plain engine fails an input that runs longer than this (a spinning engine).
INPUT_SECONDS = 20
#: Linux tcp_min_snd_mss, less the timestamp option.
MIN_MSS_CACHE = 48 - 12


class Script:
    """Reads typed values from the input; zeros once it runs out (like
    atheris.FuzzedDataProvider, usable without atheris)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def u32(self) -> int:
        return self.u16() << 16 | self.u16()

    def below(self, n: int) -> int:
        return (self.u16() if n > 256 else self.byte()) % n

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


# -- conversations that reach each state --------------------------------------------------

def _syn_opts(s: Script) -> dict:
    kw: dict = {}
    if s.flag():
        kw["mss"] = s.choice([1, 12, 20, 48, 88, 536, 1000, 1460, 9000, 65535])
    if s.flag():
        kw["wscale"] = s.below(15)
    kw["sack_perm"] = s.flag()
    if s.flag():
        kw["ts"] = (s.u32() or 1, 0)
    return kw


class World:
    """A shard, the peer talking to it, and the descriptor of the socket under test."""

    def __init__(self, s: Script, v6: bool = False) -> None:
        kw = {}
        if s.flag():
            kw["syncookies"] = s.flag()
        self.v6 = v6
        # IPv6: a dual-stack shard (A6 and A), its peer at B6, AF_INET6 sockets.
        self.sh = make_shard6(A6, addr4=A, **kw) if v6 else make_shard(**kw)
        self.peer = Peer6(self.sh) if v6 else Peer(self.sh)
        self.family = socket.AF_INET6 if v6 else socket.AF_INET
        self.raddr = B6 if v6 else B
        self.sd: int | None = None
        self.lsd: int | None = None
        self.peer_isn = 1000
        self.ts = None
        self.now = 0.0

    def send(self, flags: int, seq: int, ack: int = 0, **kw) -> None:
        self.peer.send(flags, seq, ack, **kw)

    def sk(self):
        sk = self.sh.socks.get(self.sd) if self.sd is not None else None
        return sk


def setup(s: Script, v6: bool = False) -> World:
    w = World(s, v6)
    sh, peer = w.sh, w.peer
    scenario = s.below(14)
    if scenario == 0:  # LISTEN only
        w.lsd = listen(sh, backlog=s.below(4) + 1, family=w.family)
        return w
    if scenario == 1:  # SYN-SENT (we connect; the peer answers nothing yet)
        w.sd = sh.socket(w.family)
        sh.connect(w.sd, w.raddr, 40000, 0.0)
        peer.recv_one()
        return w
    w.lsd = listen(sh, backlog=s.below(8) + 1,
                   opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, s.choice([2048, 8192, 65536,
                                                                       262144])),),
                   family=w.family)
    opts = _syn_opts(s)
    w.ts = opts.get("ts")
    peer.send(SYN, w.peer_isn, **opts)
    sa = peer.recv()
    if scenario == 2 or not sa:  # request sock (NEW-SYN-RECV)
        return w
    sa = sa[-1]
    ts = ((w.ts[0] + 1) & MASK, sa.ts[0]) if w.ts and sa.ts else None
    peer.send(ACK, w.peer_isn + 1, sa.seq + 1, ts=ts)
    acc = sh.accept(w.lsd)
    if acc is None:
        return w
    w.sd = acc[0]
    sk = w.sk()
    una = sk.snd_una
    if scenario == 3:  # ESTABLISHED with out-of-order data queued
        for k in range(s.below(8)):
            peer.send(ACK, w.peer_isn + 1 + 100 * (k + 1), una, payload=b"q" * 50,
                      ts=((w.ts[0] + 2) & MASK, sa.ts[0]) if ts else None)
    elif scenario == 4:  # a flight out, partly SACKed
        sk.cc.cwnd = max(sk.cc.cwnd, 20)
        sh.send(w.sd, b"d" * (s.below(20000) + 1), 0.0)
        peer.recv()
        if sk.sack_ok:
            m = sk.mss_cache
            peer.send(ACK, w.peer_isn + 1, una,
                      sack=(((una + m) & MASK, (una + 2 * m) & MASK),),
                      ts=((w.ts[0] + 2) & MASK, sa.ts[0]) if ts else None)
    elif scenario in (5, 6, 7, 8):  # FIN-WAIT-1, FIN-WAIT-2, CLOSING, TIME-WAIT
        if s.flag():
            sh.close(w.sd, 0.0)
        else:
            sh.shutdown(w.sd, socket.SHUT_WR, 0.0)
        fin = [x for x in peer.recv() if "F" in x.flags]
        if fin and scenario >= 6:
            f = fin[-1]
            tsx = ((w.ts[0] + 3) & MASK, f.ts[0]) if ts and f.ts else None
            if scenario == 6:
                peer.send(ACK, w.peer_isn + 1, f.seq + 1, ts=tsx)
            elif scenario == 7:
                peer.send(FIN | ACK, w.peer_isn + 1, f.seq, ts=tsx)
            else:
                peer.send(FIN | ACK, w.peer_isn + 1, f.seq + 1, ts=tsx)
    elif scenario in (9, 10):  # CLOSE-WAIT, LAST-ACK
        peer.send(FIN | ACK, w.peer_isn + 1, una, ts=((w.ts[0] + 2) & MASK, sa.ts[0]) if ts else None)
        if scenario == 10:
            sh.close(w.sd, 0.0)
    elif scenario == 11:  # data both ways, in order
        peer.send(ACK, w.peer_isn + 1, una, payload=b"r" * 100,
                  ts=((w.ts[0] + 2) & MASK, sa.ts[0]) if ts else None)
        sh.send(w.sd, b"w" * 3000, 0.0)
    peer.recv()
    return w


# -- steps -------------------------------------------------------------------------------

_FLAG_SETS = [ACK, ACK | 0x08, SYN, SYN | ACK, FIN | ACK, RST, RST | ACK, FIN, 0, SYN | FIN,
              SYN | RST, 0x3F, 0xFF, ACK | 0x20, ACK | 0xC0]


def _seq_near(s: Script, base: int, window: int) -> int:
    k = s.below(8)
    if k == 0:
        return base
    if k == 1:
        return base + s.below(64) - 32
    if k == 2:
        return base + window + s.below(8) - 4
    if k == 3:
        return base - window - s.below(8)
    if k == 4:
        return base + HALF + s.below(3) - 1
    if k == 5:
        return base + s.below(window + 1) if window else base
    if k == 6:
        return s.u32()
    return base + 1


def _options(s: Script, sk) -> bytes:
    out = b""
    for _ in range(s.below(4)):
        kind = s.below(10)
        if kind == 0:
            out += build_tcp_options(ts=(s.u32(), s.u32()))
        elif kind == 1:
            una = sk.snd_una if sk else 0
            blocks = []
            for _ in range(s.below(5)):
                lo = _seq_near(s, una, 65535) & MASK
                blocks.append((lo, (lo + s.below(4000)) & MASK))
            out += build_tcp_options(sack_blocks=tuple(blocks)) if blocks else b""
        elif kind == 2:
            out += build_tcp_options(mss=s.u16(), wscale=s.below(15), sack_perm=s.flag())
        elif kind == 5:  # window scale beyond 14, raw (RFC 7323 §2.3: clamp)
            out += bytes([3, 3, 14 + s.below(242)])
        elif kind == 3:  # a malformed option: length 0 or 1, or overrunning
            out += bytes([s.byte(), s.choice([0, 1, 40, 255])])
        elif kind == 4:
            out += bytes([s.byte(), s.below(12)]) + s.raw(s.below(10))
        else:
            out += b"\x01"
    out = out[:40]
    return out + b"\x00" * (-len(out) % 4)


def tcp_frame(s: Script, w: World) -> bytes:
    sk = w.sk()
    if sk is not None and sk.state is not State.CLOSED:
        rcv, una, nxt = sk.rcv_nxt, sk.snd_una, sk.snd_nxt
        win = sk.rcv_wnd or 65535
        sport = w.peer.port
        dport = sk.lport
    else:
        rcv, una, nxt, win = w.peer_isn + 1, s.u32(), s.u32(), 65535
        sport, dport = w.peer.port, 80
    if s.below(8) == 0:
        sport = s.choice([sport + 1, s.u16()])
    seq = _seq_near(s, rcv, win) & MASK
    ack = _seq_near(s, s.choice([una, nxt]), 65535) & MASK
    flags = s.choice(_FLAG_SETS) if s.below(4) else s.byte()
    payload = b"p" * s.choice([0, 0, 1, 2, 10, 500, 1460, 3000, 65000 - 100])
    opts = _options(s, sk)
    if w.v6:
        return build_tcp_ipv6(B6, A6, sport, dport, seq, ack, flags, s.u16(), opts, payload,
                              flow_label=s.u16())
    return build_tcp_ipv4(B, A, sport, dport, seq, ack, flags, s.u16(), opts, payload,
                          ttl=64, ident=s.u16())


#: Extension headers to put in front of an IPv6 packet's upper layer: well-formed
#: ones (skipped), and ones the stack must refuse (fragment, Segments Left > 0,
#: options asking for a Parameter Problem, lengths past the packet).
_EXTHDRS = [
    (0, b"\x00\x01\x04\x00\x00\x00\x00"),  # hop-by-hop, PadN
    (60, b"\x00\x01\x04\x00\x00\x00\x00"),  # destination options, PadN
    (43, b"\x00\x00\x00\x00\x00\x00\x00"),  # routing, Segments Left 0
    (43, b"\x00\x00\x01\x00\x00\x00\x00"),  # routing, Segments Left 1
    (44, b"\x00\x00\x01\x00\x00\x00\x07"),  # fragment
    (60, b"\x00\xbe\x02\x00\x00\x01\x00"),  # unknown option, action 10
    (60, b"\x00\x7e\x02\x00\x00\x01\x00"),  # unknown option, action 01
    (60, b"\x05\x01\x04\x00\x00\x00\x00"),  # length past the packet
    (60, b"\x00\x01\x09\x00\x00\x00\x00"),  # option past its header
]


def _insert_exthdr(s: Script, b: bytearray) -> bytearray:
    """Put one extension header (or a run of empty ones) after the fixed IPv6 header."""
    if len(b) < 40:
        return b
    nh, rest = s.choice(_EXTHDRS)
    count = s.choice([1, 1, 2, 9, 40])
    ext = b""
    first = b[6]
    for _ in range(count):
        ext = ext + bytes([nh]) + rest
    # Each header names the next; the last names the original upper layer.
    chain = bytearray(ext)
    for i in range(count):
        chain[8 * i] = nh if i < count - 1 else first
    b[6] = nh
    out = b[:40] + chain + b[40:]
    plen = len(out) - 40
    out[4:6] = struct.pack("!H", min(plen, 0xFFFF))
    return out


def mutate(s: Script, pkt: bytes) -> bytes:
    b = bytearray(pkt)
    if b and b[0] >> 4 == 6:
        for _ in range(s.below(6) + 1):
            where = s.choice([0, 1, 4, 5, 6, 7, 8, 24, 39, 40 + 12, 40 + 13, 60, 61,
                              s.below(len(b))])
            if where < len(b):
                b[where] = s.byte()
        if s.flag():
            b = _insert_exthdr(s, b)
        if s.flag():
            n = s.below(len(b) + 8)
            b = b[:n] if n <= len(b) else b + bytes(n - len(b))
        return bytes(b)
    for _ in range(s.below(6) + 1):
        where = s.choice([0, 2, 3, 6, 9, 20 + 12, 20 + 13, 40, 41, 42, s.below(len(b))])
        if where < len(b):
            b[where] = s.byte()
    if s.flag():  # cut or extend
        n = s.below(len(b) + 8)
        b = b[:n] if n <= len(b) else b + bytes(n - len(b))
    if s.flag() and len(b) >= 20:  # fix the IP checksum so the mutation gets in
        b[10:12] = b"\0\0"
        ihl = (b[0] & 0xF) * 4
        if 20 <= ihl <= len(b):
            b[10:12] = struct.pack("!H", internet_checksum(bytes(b[:ihl])))
    return bytes(b)


def icmp6_frame(s: Script, w: World) -> bytes:
    """An ICMPv6 error (or another type) quoting one of our segments, or garbage."""
    sk = w.sk()
    if sk is not None:
        seq = _seq_near(s, sk.snd_una, 65535) & MASK
        laddr = sk.laddr if sk.laddr > 0xFFFFFFFF else A6
        quoted = build_tcp_ipv6(laddr, B6, sk.lport or 80, w.peer.port, seq, sk.rcv_nxt, ACK,
                                100, b"", b"x" * s.below(100))
    else:
        quoted = build_tcp_ipv6(A6, B6, 80, w.peer.port, s.u32(), 0, SYN | ACK, 100)
    quoted = quoted[:s.choice([len(quoted), 48, 47, 40, 8])]
    if s.flag():
        quoted = mutate(s, quoted)
    itype = s.choice([2, 2, 1, 1, 3, 4, 128, 129, 135, 136, s.byte()])
    code = s.choice([0, 0, 4, 1, 3, 5, 6, s.byte()])
    rest = s.choice([1280, 1279, 1220, 1500, 0, 65536, s.u32()])
    return build_icmpv6_error(B6, A6, itype, code, quoted, rest)


def icmp_frame(s: Script, w: World) -> bytes:
    if w.v6:
        return icmp6_frame(s, w)
    sk = w.sk()
    if sk is not None:
        seq = _seq_near(s, sk.snd_una, 65535) & MASK
        quoted = build_tcp_ipv4(A, B, sk.lport or 80, w.peer.port, seq, sk.rcv_nxt, ACK, 100,
                                b"", b"x" * s.below(100))
    else:
        quoted = build_tcp_ipv4(A, B, 80, w.peer.port, s.u32(), 0, SYN | ACK, 100)
    quoted = quoted[:s.choice([len(quoted), 28, 27, 20, 8])]
    if s.flag():
        quoted = mutate(s, quoted)
    itype = s.choice([3, 3, 3, 11, 12, 4, 5, 0, 8, s.byte()])
    code = s.choice([4, 4, 0, 1, 2, 3, 13, s.byte()])
    msg = build_icmp_error(itype, code, quoted, s.u16())
    from shardstack.core.wire.ipv4 import build_ipv4
    return build_ipv4(B, A, 1, msg)


def app_step(s: Script, w: World) -> None:
    sh = w.sh
    sd = s.choice([w.sd, w.lsd]) if w.sd is not None else w.lsd
    if sd is None:
        return
    op = s.below(7)
    try:
        if op == 0:
            sh.send(sd, b"a" * s.choice([1, 100, 1460, 10000, 70000]), w.now)
        elif op == 1:
            sh.recv(sd, s.choice([1, 100, 1 << 20]))
        elif op == 2:
            sh.shutdown(sd, s.choice([socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR]), w.now)
        elif op == 3:
            sh.close(sd, w.now)
        elif op == 4:
            sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_MAXSEG, s.u16())
        elif op == 5:
            acc = sh.accept(sd)
            if acc is not None:
                w.sd = acc[0]
        else:
            sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1 + s.below(10))
    except OSError:
        pass  # bad API use answers with an errno; that is the API's contract


def run_one(data: bytes, v6: bool = False) -> None:
    """One fuzz input: a conversation, then steps; raises AssertionError when an
    invariant breaks, or whatever escaped the Shard.  ``v6``: over IPv6."""
    s = Script(data)
    w = setup(s, v6)
    sh = w.sh
    check_invariants(sh)
    for _ in range(s.below(16) + 1):
        if not s.left():
            break
        kind = s.below(10)
        if kind <= 3:
            sh.receive(tcp_frame(s, w), w.now, csum_ok=s.flag())
        elif kind <= 5:
            sh.receive(mutate(s, tcp_frame(s, w)), w.now, csum_ok=s.flag())
        elif kind == 6:
            sh.receive(icmp_frame(s, w), w.now)
        elif kind == 7:
            raw = s.raw(s.below(80))
            if v6 and raw:  # random bytes behind an IPv6 version nibble
                raw = bytes([0x60 | (raw[0] & 0x0F)]) + raw[1:]
            sh.receive(raw, w.now)
        elif kind == 8:
            app_step(s, w)
        else:
            w.now += s.choice([0.001, 0.2, 1.0, 3.0, 30.0, 61.0, 200.0])
            sh.advance(w.now)
        frames = sh.take_frames()
        assert len(frames) <= 2048, len(frames)
        sh.take_events()
        check_invariants(sh)


def _seq_leq(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


def check_invariants(sh) -> None:
    """The property every input must keep."""
    # The receive boundary (core.fault) caught nothing: a fault there is a bug.
    assert not sh.stats.drops.get(DropReason.ENGINE_EXCEPTION), sh.stats.drops
    assert len(sh.socks) <= 64, len(sh.socks)
    assert len(sh.h.ehash) <= 64, len(sh.h.ehash)
    assert len(sh.timers) <= 64 * 16 + 64, len(sh.timers)
    for sk in sh.socks.values():
        st = sk.state
        if st in (State.CLOSED, State.LISTEN):
            continue
        where = f"{st} sd={sk.sd}"
        assert _seq_leq(sk.snd_una, sk.snd_nxt), where
        assert _seq_leq(sk.snd_nxt, sk.snd_max), where
        if st is State.TIME_WAIT:
            continue
        if st is not State.SYN_SENT:
            assert _seq_leq(sk.rcv_wup, sk.rcv_nxt), where
            assert sk.mss_cache >= MIN_MSS_CACHE, (where, sk.mss_cache)
        assert sk.rcvq_len == sum(len(x) for x in sk.rcvq) - sk.rcvq_off, where
        assert sk.sndq_len >= 0, where
        assert sk.rcvq_len >= 0 and sk.ofo_len >= 0, where
        ofo_total = 0
        for e in _ofo_entries(sk):
            s0, e0 = e[0], e[1]
            assert 0 < ((s0 - sk.rcv_nxt) & MASK) < HALF, (where, s0, sk.rcv_nxt)
            assert ((e0 - s0) & MASK) == len(e[2]), where
            ofo_total += len(e[2])
        assert ofo_total == sk.ofo_len, where
        limit = sk.rcvbuf + (sk.rcvbuf >> 3) + (1 << sk.rcv_wscale)
        assert sk.rcvq_len + sk.ofo_len <= limit, (where, sk.rcvq_len, sk.ofo_len, limit)
        span = (sk.snd_max - sk.snd_una) & MASK
        total = 0
        for b in sk.sacked:
            lo = (b[0] - sk.snd_una) & MASK
            hi = (b[1] - sk.snd_una) & MASK
            assert 0 <= lo < hi <= span, (where, lo, hi, span)
            total += hi - lo
        assert total == sk.sacked_bytes, where


def _ofo_entries(sk):
    return list(sk.ofo)


def seeds() -> list[bytes]:
    """Every corpus file (the regression set)."""
    if not CORPUS.is_dir():
        return []
    return [p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.is_file()]


def plain(runs: int, seed: int, every: int = 50000, v6: bool | None = None) -> int:
    """The engine without atheris: corpus inputs mutated (byte flips, inserts,
    cuts, splices) and fresh random ones, deterministic by ``seed``; prints
    progress; returns the number of inputs run.  Fast (no coverage
    instrumentation): the engine for the million-input runs.  ``v6`` None:
    every other input runs over IPv6."""
    import random
    import signal
    import time

    def stuck(*_: object) -> None:
        raise AssertionError(f"one input ran longer than {INPUT_SECONDS} s")

    signal.signal(signal.SIGALRM, stuck)
    rng = random.Random(seed)
    corpus = seeds() or [b"\0" * 16]
    t0 = time.monotonic()
    for i in range(runs):
        if rng.random() < 0.25:
            data = rng.randbytes(rng.choice((8, 32, 128, 400)))
        else:
            b = bytearray(rng.choice(corpus))
            for _ in range(rng.randint(1, 8)):
                op = rng.random()
                if op < 0.5 and b:
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
                elif op < 0.7:
                    b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randint(1, 8))
                elif op < 0.85 and len(b) > 4:
                    k = rng.randrange(len(b))
                    del b[k:k + rng.randint(1, 8)]
                else:
                    other = rng.choice(corpus)
                    k = rng.randrange(len(b) + 1)
                    b[k:] = other[rng.randrange(len(other) + 1):]
            data = bytes(b[:512])
        signal.alarm(INPUT_SECONDS)  # liveness: a wedged engine fails the run
        try:
            run_one(data, bool(i & 1) if v6 is None else v6)
        except BaseException:
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz-crash-{seed}-{i}"
            path.write_bytes(data)
            print(f"input {i} failed; saved to {path}", flush=True)
            raise
        finally:
            signal.alarm(0)
        if every and (i + 1) % every == 0:
            rate = (i + 1) / (time.monotonic() - t0)
            print(f"{i + 1} inputs, {rate:.0f}/s", flush=True)
    return runs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        runs = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
        seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        print(f"done: {plain(runs, seed)} inputs, every invariant held", flush=True)
        return
    import atheris

    def one(data: bytes) -> None:
        run_one(data)
        run_one(data, v6=True)  # every input means the same over IPv6

    # Coverage of the engine guides the mutations: every function of
    # shardstack.core is instrumented in place (instrument_all would take a
    # minute on every library loaded); ~5x slower than --plain.
    import types

    for name, mod in list(sys.modules.items()):
        if not name.startswith("shardstack.core"):
            continue
        for obj in list(vars(mod).values()):
            funcs = [obj] if isinstance(obj, types.FunctionType) else (
                list(vars(obj).values()) if isinstance(obj, type) else [])
            for f in funcs:
                if isinstance(f, types.FunctionType) and f.__module__ == name:
                    atheris.instrument_func(f)
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
