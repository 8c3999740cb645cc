"""Receive-buffer auto-tuning (Linux tcp_init_buffer_space / tcp_rcv_space_adjust):
the buffer, and so the window offered, grows with what the application reads
per receiver RTT, up to tcp_rmem[2]; not when the application does not read,
and not when SO_RCVBUF fixed it.

Why it matters (issue 12): a fixed 256 KiB window caps a connection at
256 KiB / RTT: 6.5 MB/s at 40 ms, whatever the path carries.
"""

from __future__ import annotations

import random
import socket

from core_helpers import B, connect_over, make_shard
from shardstack.core.tcp_info import tcp_get_info, unpack_tcp_info
from shardstack.netio.simlink import LinkParams, SimLink
from test_data import transfer

MIB = 1 << 20
RTT = 0.040
FIXED_WINDOW = 256 * 1024  # the stack's buffer before auto-tuning


def _pair(params: LinkParams, server_opts: tuple = ()):
    a = make_shard()
    b = make_shard(B)
    link = SimLink(a, b, seed=3, params=params)
    c, s = connect_over(link, a, b, server_opts=server_opts)
    return a, b, link, c, s


def _max_window(b, s, link, during):
    """Run `during()` while sampling the right edge b offers on connection s."""
    seen = [0]

    def tap(now, direction, packet):
        if direction == "ba":
            sk = b.sock(s)
            seen[0] = max(seen[0], sk.rcv_wnd)

    link.tap = tap
    during()
    return seen[0]


def test_a_reading_receiver_opens_the_window_past_the_fixed_buffer():
    # 40 ms RTT, 100 Mbit/s: the path holds 500 KB; a fixed 256 KiB window
    # would cap the transfer at 6.5 MB/s.
    params = LinkParams(delay=RTT / 2, bandwidth=100e6 / 8, queue_bytes=4 * MIB)
    a, b, link, c, s = _pair(params)
    data = random.Random(1).randbytes(12 * MIB)
    t0 = link.now
    got: list[bytes] = []
    top = _max_window(b, s, link, lambda: got.append(transfer(link, a, c, b, s, data, 120.0)))
    elapsed = link.now - t0
    assert got[0] == data
    sk = b.sock(s)
    assert sk.rcvbuf > 2 * FIXED_WINDOW, sk.rcvbuf
    assert top > FIXED_WINDOW, top
    assert sk.rcvbuf <= 6 * MIB  # tcp_rmem[2]
    # Faster than any fixed 256 KiB window allows (slow start included).
    assert elapsed < len(data) / (FIXED_WINDOW / RTT), elapsed
    # TCP_INFO shows the receiver's RTT and the space read per RTT, as Linux's.
    info = unpack_tcp_info(tcp_get_info(sk, link.now))
    assert RTT * 1e6 <= info["rcv_rtt"] < 3 * RTT * 1e6, info["rcv_rtt"]
    assert info["rcv_space"] > FIXED_WINDOW


def test_a_receiver_that_does_not_read_does_not_grow():
    params = LinkParams(delay=RTT / 2, bandwidth=100e6 / 8, queue_bytes=4 * MIB)
    a, b, link, c, s = _pair(params)
    start = b.sock(s).rcvbuf
    data = bytes(4 * MIB)
    sent = 0

    def fill() -> bool:
        nonlocal sent
        if sent < len(data):
            sent += a.send(c, memoryview(data)[sent:sent + 262144], link.now)
        return False

    link.run_until(fill, link.now + 5.0)
    sk = b.sock(s)
    assert sk.rcvbuf == start
    assert sk.rcvq_len >= start - sk.rcv_mss  # the window filled up and stayed shut


def test_so_rcvbuf_fixes_the_buffer():
    params = LinkParams(delay=RTT / 2, bandwidth=100e6 / 8, queue_bytes=4 * MIB)
    opts = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 200_000),)
    a, b, link, c, s = _pair(params, server_opts=opts)
    data = random.Random(2).randbytes(4 * MIB)
    assert transfer(link, a, c, b, s, data, 120.0) == data
    assert b.sock(s).rcvbuf == 200_000
