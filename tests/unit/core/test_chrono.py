"""Where a sender's time goes (Linux tcp_chrono, TCP_INFO busy_time / rwnd_limited /
sndbuf_limited, what `ss -ti` prints): a receiver that stops reading makes the
sender rwnd-limited; an application writing more than the send buffer is
sndbuf-limited; nothing is timed once everything is acknowledged."""

from __future__ import annotations

import socket

from core_helpers import B, Bulk, connect_over, make_shard
from shardstack.core.tcp_info import tcp_get_info, unpack_tcp_info
from shardstack.netio.simlink import LinkParams, SimLink

MIB = 1 << 20


def _info(sh, sd, now):
    return unpack_tcp_info(tcp_get_info(sh.sock(sd), now))


def test_busy_rwnd_and_sndbuf_limited_times():
    params = LinkParams(delay=0.005, bandwidth=100e6 / 8, queue_bytes=MIB)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=1, params=params)
    opts = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024),)
    c, s = connect_over(link, a, b, server_opts=opts)
    bulk = Bulk(link, a, c, b, s, 3 * MIB)
    t0 = link.now

    def writer() -> bool:
        bulk.write()
        return False

    # 2 s in which the receiving application reads nothing: the window shuts.
    link.run_until(writer, t0 + 2.0)
    info = _info(a, c, link.now)
    assert info["rwnd_limited"] > 1.5e6, info["rwnd_limited"]
    assert info["sndbuf_limited"] == 0  # data waits for the window, not for the app
    assert info["busy_time"] >= info["rwnd_limited"] + info["sndbuf_limited"] - 1
    # Now it reads everything: the rest goes through and is acknowledged.

    def reader() -> bool:
        return bulk.step() and a.sock(c).sndq_len == 0

    assert link.run_until(reader, link.now + 30.0)
    done = _info(a, c, link.now)
    link.run_for(5.0)  # idle: nothing queued, no clock runs
    idle = _info(a, c, link.now)
    assert idle["busy_time"] == done["busy_time"]
    assert idle["rwnd_limited"] == done["rwnd_limited"] >= info["rwnd_limited"]


def test_a_cwnd_bound_sender_is_busy_but_not_rwnd_limited():
    params = LinkParams(delay=0.020, bandwidth=20e6 / 8, queue_bytes=MIB)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=2, params=params)
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 2 * MIB)
    assert link.run_until(bulk.step, link.now + 60.0)
    info = _info(a, c, link.now)
    assert info["busy_time"] > 0.5e6
    assert info["rwnd_limited"] < 0.05 * info["busy_time"], info


def test_a_small_send_buffer_makes_the_sender_sndbuf_limited():
    # 100 ms RTT, 64 KiB of send buffer: the whole buffer is in flight long
    # before cwnd or the peer's window would stop it; the app waits on SO_SNDBUF.
    params = LinkParams(delay=0.050, bandwidth=100e6 / 8, queue_bytes=MIB)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=3, params=params)
    c, s = connect_over(link, a, b)
    a.setsockopt(c, socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    bulk = Bulk(link, a, c, b, s, 2 * MIB)
    assert link.run_until(bulk.step, link.now + 120.0)
    info = _info(a, c, link.now)
    assert info["sndbuf_limited"] > 0.5 * info["busy_time"], info
    assert info["rwnd_limited"] < 0.05 * info["busy_time"]


def test_ss_info_shows_the_limits_like_ss_ti():
    from shardstack.stats import format_ss

    params = LinkParams(delay=0.005, bandwidth=100e6 / 8, queue_bytes=MIB)
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=1, params=params)
    opts = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024),)
    c, s = connect_over(link, a, b, server_opts=opts)
    bulk = Bulk(link, a, c, b, s, MIB)
    link.run_until(lambda: bulk.write() or False, link.now + 1.0)  # the receiver never reads
    rows = [dict(vars(ci)) if hasattr(ci, "__dict__") else
            {f: getattr(ci, f) for f in ci.__dataclass_fields__} for ci in a.connections()]
    est = [r for r in rows if r["state"] == "ESTABLISHED"]
    assert est and est[0]["info"]["cc"] == "cubic"
    text = format_ss(est, info=True)
    line = text.splitlines()[-1]
    assert line.startswith("\t cubic wscale:2,7 rto:")  # the peer fixed 128 KiB: shift 2
    assert "rwnd_limited:" in line and "busy:" in line and "minrtt:" in line
