"""The receive window: its right edge never retracts (RFC 9293 §3.8.6.2.2, RFC 7323 §2.4),
and ACKs arriving beyond a closed window are still used (RFC 9293 §3.10.7.4 step 1).

The deadlock these guard against (interop, kernel peer, 3% loss): we offered a
window the peer filled exactly, then our next ACK moved the edge 4 bytes left
(a kept edge rounded *down* to the 8-byte scale granularity) and the window
closed; the peer's every later pure ACK carried SEQ = the old edge, beyond
RCV.NXT + 0, was dropped as out of window, and its ACK field with it, so our
sending side never learned its data had arrived.
"""

from __future__ import annotations

import hashlib
import random
import socket

import pytest
from core_helpers import ACK, PSH, SYN, B, Peer, connect_over, make_shard, parse
from shardstack.netio.simlink import LinkParams, SimLink

MASK = 0xFFFFFFFF
HALF = 0x80000000


def _rcvbuf_for_wscale(ws: int) -> int:
    """A buffer for which the handshake picks window-scale shift ``ws``."""
    return 65535 if ws == 0 else 1 << (15 + ws)


class EdgeWatch:
    """Every window the shard advertises, checked as it goes out."""

    def __init__(self, peer: Peer, sk, ws: int) -> None:
        self.peer, self.sk, self.ws = peer, sk, ws
        self.edge: int | None = None  # right edge the peer last saw (ack + win << ws)
        self.ack = 0
        self.recorded = (sk.rcv_wup + sk.rcv_wnd) & MASK
        self.segments = 0

    def collect(self) -> None:
        sk = self.sk
        rec = (sk.rcv_wup + sk.rcv_wnd) & MASK
        assert ((rec - self.recorded) & MASK) < HALF, "recorded right edge moved left"
        self.recorded = rec
        for s in self.peer.recv():
            if "." not in s.flags or "R" in s.flags:
                continue
            edge = (s.ack + (s.window << self.ws)) & MASK
            if self.edge is not None:
                assert ((edge - self.edge) & MASK) < HALF, (
                    f"advertised right edge moved left: {self.edge} -> {edge} ({s!r})")
            assert ((edge - rec) & MASK) == 0 or ((rec - edge) & MASK) < HALF
            self.edge, self.ack = edge, s.ack
            self.segments += 1


@pytest.mark.parametrize("ws", range(15))
@pytest.mark.parametrize("seed", [1, 2])
def test_advertised_right_edge_never_moves_left(ws, seed):
    """Random segment sizes, reordering, overlong and beyond-window segments, random
    reads and SO_RCVBUF changes, for every scale shift: the right edge only grows,
    memory stays bounded, and the byte stream arrives intact."""
    rnd = random.Random(seed * 100 + ws)
    sh = make_shard(rcvbuf=_rcvbuf_for_wscale(ws))
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    sh.listen(lsd, 4)
    p = Peer(sh)
    isn = 1000
    p.send(SYN, isn, window=65535, mss=1460, wscale=7)
    synack = p.recv_one()
    assert synack.wscale == ws
    p.send(ACK, isn + 1, synack.seq + 1, window=65535)
    sd = sh.accept(lsd)[0]
    sk = sh.sock(sd)
    w = EdgeWatch(p, sk, ws)
    w.edge = (isn + 1 + synack.window) & MASK
    w.ack = (isn + 1) & MASK
    our_ack = (synack.seq + 1) & MASK
    lo_buf = max(4096, 4 << ws)

    def resize() -> None:
        sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_RCVBUF,
                      rnd.randint(lo_buf, max(256 * 1024, 8 << ws)))

    resize()
    data = rnd.randbytes(3 << 20)
    got = bytearray()
    base = (isn + 1) & MASK
    nxt = 0  # peer's next new byte (offset into data)
    held: list[tuple[int, int]] = []  # reordered segments: (offset, length)

    def send_data(off: int, n: int) -> None:
        p.send(ACK | PSH, base + off, our_ack, window=65535, payload=data[off:off + n])

    prev_used = 0
    for _ in range(4000):
        acked = (w.ack - base) & MASK
        usable = ((w.edge - base) & MASK) - nxt
        r = rnd.random()
        if r < 0.45 and nxt < len(data):
            if usable <= 0:
                send_data(nxt, 1)  # beyond the window: a zero-window probe's shape
            else:
                n = min(usable, len(data) - nxt,
                        rnd.choice((1, 7, 100, 536, 1448, 2896, 9000, 64000)))
                if rnd.random() < 0.2:
                    n = min(usable, len(data) - nxt, 64000)  # fill the window exactly
                if rnd.random() < 0.1:
                    held.append((nxt, n))
                else:
                    send_data(nxt, n)
                nxt += n
        elif r < 0.55 and held:
            off, n = held.pop(rnd.randrange(len(held)))
            send_data(off, n)
        elif r < 0.62:
            # go back: resend from the last ACK (lost or dropped data), possibly overlong
            if acked < nxt:
                send_data(acked, min(nxt - acked, rnd.choice((536, 1448, 9000))))
        elif r < 0.70:
            p.send(ACK, base + nxt, our_ack, window=65535)  # pure ACK at our SND.NXT
        elif r < 0.90:
            chunk = sh.recv(sd, rnd.choice((1, 100, 4096, 65536, 1 << 20)))
            if chunk:
                got += chunk
        elif r < 0.92:
            resize()
        else:
            p.now += rnd.choice((0.001, 0.05, 0.3))
            sh.advance(p.now)
        w.collect()
        # Memory: never grows past the hard limit (it may sit above a lowered SO_RCVBUF).
        hard = sk.rcvbuf + (sk.rcvbuf >> 3) + (1 << ws)
        used = sk.rcvq_len + sk.ofo_len
        assert used <= hard or used <= prev_used, (used, hard)
        prev_used = used
    # Drain: read everything, resending from the last ACK whenever it stalls.
    for _ in range(20000):
        while True:
            chunk = sh.recv(sd, 1 << 20)
            if not chunk:
                break
            got += chunk
        w.collect()
        acked = (w.ack - base) & MASK
        if acked >= len(data) and len(got) == len(data):
            break
        nxt = max(nxt, acked)
        usable = ((w.edge - base) & MASK) - acked
        if usable > 0:
            send_data(acked, min(usable, len(data) - acked, 1448))
        else:
            p.now += 0.5
            sh.advance(p.now)
        w.collect()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert w.segments > 100


def _zero_window_conn():
    """An accepted connection whose receive window is closed and which has 2920
    bytes of its own in flight: the echo-service shape (it cannot read because
    its own sending is backed up)."""
    sh = make_shard(rcvbuf=8192)
    lsd = sh.socket()
    sh.bind(lsd, 0, 80)
    sh.listen(lsd, 4)
    p = Peer(sh)
    p.send(SYN, 1000, window=65535, mss=1460, wscale=0)
    synack = p.recv_one()
    iss = synack.seq
    p.send(ACK, 1001, iss + 1, window=65535)
    sd = sh.accept(lsd)[0]
    sk = sh.sock(sd)
    sent = 0
    for _ in range(8):  # fill the 8 KiB buffer exactly, in window
        p.send(ACK | PSH, 1001 + sent, iss + 1, window=65535, payload=bytes(1024))
        sent += 1024
    assert sk.rcvq_len == 8192
    assert sh.send(sd, bytes(2920), p.now) == 2920
    segs = p.recv()
    assert segs[-1].window == 0 and segs[-1].ack == 1001 + 8192
    assert sk.snd_nxt == (iss + 1 + 2920) & MASK
    return sh, p, sk, iss, 1001 + 8192


def test_ack_beyond_a_closed_window_is_still_used():
    """RFC 9293 §3.10.7.4 step 1: with RCV.WND zero "special allowance should be
    made to accept valid ACKs": a pure ACK whose SEQ lies past RCV.NXT still
    advances SND.UNA and updates the send window; its (absent) text is dropped."""
    sh, p, sk, iss, rcv_nxt = _zero_window_conn()
    p.send(ACK, rcv_nxt + 4, iss + 1 + 1448, window=4000)
    assert sk.snd_una == (iss + 1 + 1448) & MASK
    assert sk.snd_wnd == 4000
    assert sk.rcv_nxt == rcv_nxt and sk.rcvq_len == 8192
    assert sh.stats.oow_acks_accepted == 1
    # A data segment there: its ACK counts, its text is dropped and answered.
    p.send(ACK | PSH, rcv_nxt + 4, iss + 1 + 2920, window=4000, payload=b"x" * 100)
    assert sk.snd_una == (iss + 1 + 2920) & MASK
    assert sk.rcvq_len == 8192
    answer = p.recv()[-1]
    assert answer.ack == rcv_nxt and answer.window == 0


@pytest.mark.parametrize("case", ["unsent", "rst", "syn", "far", "nothing_new"])
def test_out_of_window_segments_without_a_usable_ack_are_dropped(case):
    sh, p, sk, iss, rcv_nxt = _zero_window_conn()
    una = sk.snd_una
    flags, seq, ack = ACK, rcv_nxt + 4, iss + 1 + 1448
    if case == "unsent":
        ack = iss + 1 + 5000  # acknowledges data never sent (RFC 5961 §5.2)
    elif case == "rst":
        flags = ACK | 0x04
    elif case == "syn":
        flags = ACK | SYN
    elif case == "far":
        seq = rcv_nxt + (1 << 20)  # further than any window we ever offered
    elif case == "nothing_new":
        ack = una  # same ACK, same window: nothing to learn
    p.send(flags, seq, ack, window=65535 if case == "nothing_new" else 4000)
    assert sk.snd_una == una
    assert sh.stats.oow_acks_accepted == 0
    assert sh.stats.drops
    assert sk.state.name == "ESTABLISHED"


# -- end to end: an echo service that stops reading while its sending is backed up ----------

def _echo_over_lossy_link(size: int, seed: int, loss: float = 0.03, delay: float = 0.001,
                          read_rate: float = 2e6, max_time: float = 300.0):
    """Client a streams ``size`` bytes to an echo service on b and reads the echo back
    at ``read_rate`` bytes/s in odd-sized pieces; the service reads (in 1000-byte
    pieces) only when its own send buffer took everything it read before, so its
    receive window closes whenever the client's reading falls behind (the interop
    deadlock's shape).  Every ACK put on the wire is checked: the advertised right
    edge never moves left, in either direction."""
    a, b = make_shard(), make_shard(B)
    edges: dict[str, int] = {}
    ws: dict[str, int] = {}
    retreats: list[tuple[str, int, int]] = []

    def tap(now: float, direction: str, pkt: bytes) -> None:
        s = parse(pkt)
        if "S" in s.flags:
            ws[direction] = s.wscale or 0
            return
        if "." not in s.flags or "R" in s.flags:
            return
        edge = (s.ack + (s.window << ws.get(direction, 0))) & MASK
        old = edges.get(direction)
        if old is not None and ((edge - old) & MASK) & HALF:
            retreats.append((direction, old, edge))
        else:
            edges[direction] = edge

    link = SimLink(a, b, seed=seed, params=LinkParams(delay=delay, loss=loss), tap=tap)
    c, s = connect_over(link, a, b,
                        server_opts=((socket.SOL_SOCKET, socket.SO_SNDBUF, 65536),))
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    sent = 0
    got = bytearray()
    pending = b""
    budget = 0.0
    last = link.now

    def app() -> bool:
        nonlocal sent, pending, budget, last
        if sent < size:
            sent += a.send(c, memoryview(data)[sent:sent + 65536], link.now)
        for _ in range(64):  # the echo service
            if pending:
                pending = pending[b.send(s, pending, link.now):]
                if pending:
                    break  # its send side is backed up: it stops reading
            chunk = b.recv(s, 1000)
            if not chunk:
                break
            pending = chunk
        budget = min(budget + (link.now - last) * read_rate, 1 << 20)
        last = link.now
        while budget >= 1:  # the client reads at a limited rate
            chunk = a.recv(c, min(int(budget), rnd.choice((777, 1448, 5000, 65536))))
            if not chunk:
                break
            got.extend(chunk)
            budget -= len(chunk)
        return len(got) == size

    deadline = link.now + max_time
    while not app() and link.now < deadline:
        link.run_until(app, min(link.now + 0.005, deadline))
    return a, b, link, data, bytes(got), retreats


def _check_echo(a, b, data, got, retreats, size):
    assert retreats == []
    assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    for sh in (a, b):
        drops = sh.stats.drops
        # a peer that respects our edges never has data dropped for window or memory
        assert not any(r.value in ("TCP_ZEROWINDOW", "PROTO_MEM") for r in drops), drops
    rto = a.stats.rto_fires + b.stats.rto_fires
    fr = a.stats.fast_retrans + b.stats.fast_retrans
    assert rto <= 2 + size // (1 << 20), (rto, fr)  # SACK/RACK-TLP repair 3% loss, not timeouts
    assert fr > rto


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_echo_with_closed_window_over_lossy_link_completes(seed):
    size = 2 << 20
    a, b, link, data, got, retreats = _echo_over_lossy_link(size, seed)
    _check_echo(a, b, data, got, retreats, size)
    assert link.now < 60.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_echo_16mib_with_closed_window_over_lossy_link_completes(seed):
    size = 16 << 20
    a, b, link, data, got, retreats = _echo_over_lossy_link(size, seed, max_time=3600.0)
    _check_echo(a, b, data, got, retreats, size)
