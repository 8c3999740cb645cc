"""`shardstack ss -i` prints the pacing and delivery rate the way Linux's `ss -ti`
does (`pacing_rate 1.2Mbps delivery_rate 950Kbps ... app_limited`), from a real
connection's TCP_INFO (two shards over a simulated 10 Mbit/s link)."""

from __future__ import annotations

import re
import socket

from shardstack.core import Shard, ShardConfig
from shardstack.core.shard import SO_MAX_PACING_RATE
from shardstack.core.wire.ipv4 import str_to_ip
from shardstack.netio.simlink import LinkParams, SimLink

from shardstack.stats import format_ss, to_plain

A = str_to_ip("198.18.0.1")
B = str_to_ip("198.18.0.2")


def _connected(rate_cap: int | None):
    a = Shard(ShardConfig(addrs=[A], secret=b"s" * 16), 0.0)
    b = Shard(ShardConfig(addrs=[B], secret=b"s" * 16), 0.0)
    link = SimLink(a, b, seed=1, params=LinkParams(delay=0.005, bandwidth=1.25e6))
    lsd = b.socket()
    b.bind(lsd, 0, 80)
    b.listen(lsd, 4)
    c = a.socket()
    if rate_cap is not None:
        a.setsockopt(c, socket.SOL_SOCKET, SO_MAX_PACING_RATE, rate_cap)
    a.connect(c, B, 80, 0.0)
    box: list = []

    def accepted() -> bool:
        r = b.accept(lsd)
        if r is not None:
            box.append(r)
        return bool(box)

    assert link.run_until(accepted, 5.0)
    return a, b, link, c, box[0][0]


def _ss_line(sh: Shard) -> str:
    rows = [to_plain(ci) | {"worker": 0} for ci in sh.connections()]
    return format_ss(rows, info=True).splitlines()[-1]


def test_ss_i_prints_pacing_and_delivery_rate_like_ss_ti():
    a, b, link, c, s = _connected(500_000)
    for _ in range(40):  # 400 kB, read as it comes
        sent = 0
        while sent < 10_000:
            sent += a.send(c, b"d" * (10_000 - sent), link.now)
            link.run_for(0.01)
        while b.recv(s, 1 << 20):
            pass
    link.run_for(0.2)
    line = _ss_line(a)
    # 500 kB/s is 4.0 Mbit/s: the cap is both the rate and its limit.
    assert "pacing_rate 4.0Mbps/4.0Mbps" in line, line
    m = re.search(r"delivery_rate (\d+\.\d)([KMG])bps", line)
    assert m, line
    assert m.group(2) in "KM"
    assert re.search(r"delivered:\d+", line)


def test_ss_i_says_app_limited():
    a, b, link, c, s = _connected(None)
    for _ in range(10):
        a.send(c, b"x" * 500, link.now)
        link.run_for(0.05)
        while b.recv(s, 1 << 20):
            pass
    line = _ss_line(a)
    assert re.search(r"pacing_rate \d+\.\d[KMG]bps ", line), line  # no cap: no "/limit"
    assert " app_limited" in line, line
