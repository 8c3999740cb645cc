"""TCP_WINDOW_CLAMP (Linux ``tcp_set_window_clamp`` / ``tp->window_clamp``).

The clamp bounds every window we advertise: the SYN's or SYN-ACK's, the
scale chosen for it, and each window afterwards (``tcp_select_window``),
read off the wire here.  Set on a listener it reaches the connections it
accepts, cookie ones included.
"""

from __future__ import annotations

import errno
import socket

import pytest
from core_helpers import B, Pair, make_shard
from shardstack.core.shard import SOCK_MIN_RCVBUF
from shardstack.core.wire.ipv4 import str_to_ip

TCP_WINDOW_CLAMP = getattr(socket, "TCP_WINDOW_CLAMP", 10)
TCP = socket.IPPROTO_TCP


def advertised(p: Pair, direction: str, wscale: int) -> list[int]:
    """Every window, in bytes, the sender of ``direction`` put on the wire."""
    out = []
    for _t, d, seg in p.tap:
        if d == direction:
            out.append(seg.window if "S" in seg.flags else seg.window << wscale)
    return out


def pump(p: Pair, snd, sd_s, rcv, sd_r, data: bytes, chunk: int = 3000) -> bytes:
    """Send ``data`` while the receiver reads slowly (``chunk`` per round)."""
    got = bytearray()
    sent = 0
    for _ in range(100_000):
        if sent < len(data):
            sent += snd.send(sd_s, data[sent:sent + 65536], p.now)
        p.deliver()
        got += rcv.recv(sd_r, chunk) or b""
        p.deliver()
        if len(got) == len(data):
            break
        p.advance(p.now + 0.05)
    return bytes(got)


def test_setsockopt_semantics():
    sh = make_shard()
    sd = sh.socket()
    assert sh.getsockopt(sd, TCP, TCP_WINDOW_CLAMP) == 0  # none yet
    sh.setsockopt(sd, TCP, TCP_WINDOW_CLAMP, 40000)
    assert sh.getsockopt(sd, TCP, TCP_WINDOW_CLAMP) == 40000
    for small in (1, 100, -5, SOCK_MIN_RCVBUF // 2 - 1):
        sh.setsockopt(sd, TCP, TCP_WINDOW_CLAMP, small)
        assert sh.getsockopt(sd, TCP, TCP_WINDOW_CLAMP) == SOCK_MIN_RCVBUF // 2 == 1152
    sh.setsockopt(sd, TCP, TCP_WINDOW_CLAMP, (5000).to_bytes(4, "little"))
    assert sh.getsockopt(sd, TCP, TCP_WINDOW_CLAMP) == 5000
    sh.setsockopt(sd, TCP, TCP_WINDOW_CLAMP, 0)  # a closed socket may drop its clamp
    assert sh.getsockopt(sd, TCP, TCP_WINDOW_CLAMP) == 0


def test_zero_on_a_connected_or_listening_socket_is_einval():
    p = Pair()
    lsd, c, s = p.connect()
    for sh, sd in ((p.a, c), (p.b, s), (p.b, lsd)):
        with pytest.raises(OSError) as e:
            sh.setsockopt(sd, TCP, TCP_WINDOW_CLAMP, 0)
        assert e.value.errno == errno.EINVAL
    # Connected, without a clamp, it reads as the largest window it may offer.
    sk = p.a.sock(c)
    assert p.a.getsockopt(c, TCP, TCP_WINDOW_CLAMP) == min(sk.rcvbuf, 65535 << sk.rcv_wscale)


def test_active_open_offers_no_more_than_the_clamp():
    p = Pair(rcvbuf=1 << 20)
    clamp = 20000
    c = p.a.socket()
    p.a.setsockopt(c, TCP, TCP_WINDOW_CLAMP, clamp)
    lsd = p.b.socket()
    p.b.bind(lsd, 0, 80)
    p.b.listen(lsd, 4)
    p.a.connect(c, B, 80, p.now)
    p.deliver()
    s, _ = p.b.accept(lsd)
    syn = p.segs("ab")[0]
    # the clamp bounds the window, rounded down to whole segments as Linux: 13 x 1460
    assert syn.flags == "S" and syn.window == clamp - clamp % 1460
    assert syn.wscale == 0  # the scale fits the clamp, not the 1 MiB buffer
    assert p.a.getsockopt(c, TCP, TCP_WINDOW_CLAMP) == clamp
    data = bytes(range(256)) * 2000
    assert pump(p, p.b, s, p.a, c, data) == data
    wins = advertised(p, "ab", p.a.sock(c).rcv_wscale)
    assert len(wins) > 100 and max(wins) == clamp
    assert p.b.sock(s).max_window == clamp  # what the server ever saw offered


def test_listener_clamp_reaches_accepted_children_with_scaling():
    p = Pair(rcvbuf=4 << 20)
    clamp = 300_001  # not a multiple of the scale's granularity
    lsd = p.b.socket()
    p.b.setsockopt(lsd, TCP, TCP_WINDOW_CLAMP, clamp)
    p.b.bind(lsd, 0, 80)
    p.b.listen(lsd, 4)
    c = p.a.socket()
    p.a.connect(c, B, 80, p.now)
    p.deliver()
    s, _ = p.b.accept(lsd)
    synack = p.segs("ba")[0]
    assert synack.flags == "S." and synack.window == 65160  # 45 x 1448, as Linux
    assert synack.wscale == 3  # smallest shift that can express 300 001 (a 4 MiB buffer: 7)
    assert p.b.getsockopt(s, TCP, TCP_WINDOW_CLAMP) == clamp
    data = bytes(2_000_000)
    assert pump(p, p.a, c, p.b, s, data, chunk=200_000) == data
    wins = advertised(p, "ba", 3)
    assert max(wins) <= clamp and max(wins) > clamp - 8  # rounded down to the scale
    # And the sender never had more than that outstanding.
    sk = p.a.sock(c)
    assert sk.max_window <= clamp


def test_syn_cookie_children_inherit_the_clamp():
    p = Pair()
    lsd = p.b.socket()
    p.b.setsockopt(lsd, TCP, TCP_WINDOW_CLAMP, 10_000)
    p.b.bind(lsd, 0, 80)
    p.b.listen(lsd, 0)
    # Fill the request queue with a half-open connection (listen(fd, 0) takes one:
    # Linux counts it full only above the backlog), then connect for real.
    blocker = make_shard(str_to_ip("198.18.0.3"))
    bsd = blocker.socket()
    blocker.connect(bsd, B, 80, p.now)
    for f in blocker.take_frames():
        p.b.receive(f, p.now)
    p.b.take_frames()
    c = p.a.socket()
    p.a.connect(c, B, 80, p.now)
    p.deliver()
    assert p.b.stats.syncookies_sent >= 1 and p.b.stats.syncookies_recv >= 1
    acc = p.b.accept(lsd)
    assert acc is not None
    s = acc[0]
    assert p.b.getsockopt(s, TCP, TCP_WINDOW_CLAMP) == 10_000
    synack = [x for x in p.segs("ba") if x.flags == "S."][-1]
    assert synack.window <= 10_000
    data = bytes(200_000)
    assert pump(p, p.a, c, p.b, s, data, chunk=50_000) == data
    assert max(advertised(p, "ba", p.b.sock(s).rcv_wscale)) <= 10_000


def test_a_smaller_clamp_mid_connection_never_retracts_the_edge():
    p = Pair()
    _lsd, c, s = p.connect()
    data = bytes(300_000)
    p.a.send(c, data[:40_000], p.now)
    p.deliver()
    sk = p.b.sock(s)
    edge_before = (sk.rcv_wup + sk.rcv_wnd) & 0xFFFFFFFF
    p.b.setsockopt(s, TCP, TCP_WINDOW_CLAMP, 5000)
    n = len(p.tap)
    got = p.b.recv(s, 1 << 20)
    got += pump(p, p.a, c, p.b, s, data[40_000:], chunk=100_000)
    assert got == data
    ws = sk.rcv_wscale
    edges = [(x.ack + (x.window << ws)) & 0xFFFFFFFF for _t, d, x in p.tap[n:] if d == "ba"]
    # RFC 9293 §3.8.6.2.2: the right edge only moves right ...
    assert all(0 <= ((e - edge_before) & 0xFFFFFFFF) < 1 << 31 for e in edges)
    for e1, e2 in zip(edges, edges[1:], strict=False):
        assert ((e2 - e1) & 0xFFFFFFFF) < 1 << 31
    # ... and once the old promise is used up, no window exceeds the clamp.
    late = [x.window << ws for _t, d, x in p.tap[-20:] if d == "ba"]
    assert late and max(late) <= 5000
