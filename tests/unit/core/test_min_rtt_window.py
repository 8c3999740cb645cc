"""The path's minimum RTT is windowed (Linux tcp_update_rtt_min, tcp_min_rtt_wlen = 300 s):
after the path gets longer, TCP_INFO's min_rtt and RACK's reordering window
(RFC 8985 §6.2.4: min_RTT / 4) follow within the window; an all-time minimum
would keep the old path's value forever."""

from __future__ import annotations

import pytest
from core_helpers import B, connect_over, make_shard
from shardstack.core.tcp_info import tcp_get_info, unpack_tcp_info
from shardstack.core.tcp_recovery import _rack_reo_wnd
from shardstack.core.win_minmax import WinMin
from shardstack.netio.simlink import LinkParams, SimLink


def _min_rtt_us(sh, sd, now) -> int:
    return unpack_tcp_info(tcp_get_info(sh.sock(sd), now))["min_rtt"]


def _ping(link, a, c, b, s, n: int, every: float) -> None:
    """`n` small exchanges, one every `every` s (each gives an RTT sample)."""
    for _ in range(n):
        a.send(c, b"x" * 100, link.now)
        assert link.run_until(lambda: bool(b.sock(s).rcvq_len), link.now + 5.0)
        b.recv(s, 1 << 16)
        link.run_for(every)


def test_min_rtt_forgets_a_shorter_path_after_the_window():
    ab, ba = LinkParams(delay=0.005), LinkParams(delay=0.005)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=1, a_to_b=ab, b_to_a=ba)
    c, s = connect_over(link, a, b)
    _ping(link, a, c, b, s, 5, 1.0)
    assert 9_000 <= _min_rtt_us(a, c, link.now) < 12_000  # ms timestamps: +-1 ms
    ab.delay = ba.delay = 0.050  # the route changed: 100 ms RTT from now on
    _ping(link, a, c, b, s, 20, 10.0)  # 200 s: still inside the window
    assert _min_rtt_us(a, c, link.now) < 12_000
    _ping(link, a, c, b, s, 25, 10.0)  # 450 s after the change
    assert 99_000 <= _min_rtt_us(a, c, link.now) < 110_000
    sk = a.sock(c)
    sk.reord_seen = 1  # RACK's window scales with the (new) min RTT once reordering was seen
    assert _rack_reo_wnd(sk) == pytest.approx(sk.reo_wnd_mult * sk.min_rtt / 4)
    assert sk.min_rtt >= 0.099


def test_win_min_keeps_the_minimum_of_the_window():
    w = WinMin(win=100.0)
    assert w.update(0.0, 5.0) == 5.0
    assert w.update(10.0, 7.0) == 5.0
    assert w.update(60.0, 6.0) == 5.0
    # 5.0 (t=0) leaves between t=100 and t=125; 6.0 (t=60) is then the minimum
    assert w.update(130.0, 9.0) == 6.0
    assert w.get(130.0) == 6.0
    assert w.update(131.0, 1.0) == 1.0 and len(w.records) == 1  # a new minimum resets
    assert w.get(1000.0) is None
    assert len(WinMin(win=100.0).records) == 0
    w = WinMin(win=100.0)
    for t in range(0, 10_000, 3):  # rising samples: memory stays bounded
        w.update(float(t), float(t))
        assert len(w.records) <= 5
