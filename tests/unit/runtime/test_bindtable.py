"""The supervisor's global bind table and the `ss`/`stats` renderers."""

from __future__ import annotations

import errno

import msgpack
import pytest
from shardstack.core import ConnInfo, DropReason, ShardStats
from shardstack.netio.dispatch import DispatchStats

from shardstack.stats import format_ss, format_stats, to_plain
from shardstack.supervisor import BindTable, _addr_arg
from shardstack.worker import WorkerCounters

A = 0xC6120002
B = 0xC6120003


def _errno(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def test_bind_conflicts_follow_linux():
    t = BindTable([A, B])
    b1 = t.bind(A, 8080)
    assert b1.lport == 8080
    assert _errno(t.bind, A, 8080) == errno.EADDRINUSE
    assert _errno(t.bind, 0, 8080) == errno.EADDRINUSE  # INADDR_ANY overlaps A
    t.bind(B, 8080)  # another address of ours: no overlap
    assert _errno(t.bind, 0x0A000001, 80) == errno.EADDRNOTAVAIL
    assert _errno(t.bind, A, 70000) == errno.EINVAL


def test_reuseaddr_shares_until_one_listens():
    t = BindTable([A])
    a = t.bind(A, 9000, reuseaddr=True)
    b = t.bind(A, 9000, reuseaddr=True)
    t.listen(a, 16)
    assert _errno(t.listen, b, 16) == errno.EADDRINUSE  # only one may listen
    assert _errno(t.bind, A, 9000, reuseaddr=True) == errno.EADDRINUSE
    t.release(a)
    t.listen(b, 16)


def test_reuseport_shares_listeners_and_release_frees():
    t = BindTable([A])
    a = t.bind(0, 7000, reuseport=True)
    b = t.bind(0, 7000, reuseport=True)
    t.listen(a, 8)
    t.listen(b, 8)
    t.release(a)
    t.release(b)
    assert not t.binds
    t.bind(A, 7000)  # free again


def test_port_zero_picks_distinct_ephemeral_ports():
    t = BindTable([A])
    ports = {t.bind(A, 0).lport for _ in range(50)}
    assert len(ports) == 50
    assert all(32768 <= p <= 60999 for p in ports)


def test_unknown_bind_id_is_ebadf():
    assert _errno(BindTable([A]).get, 42) == errno.EBADF


def test_addr_arg():
    assert _addr_arg("198.18.0.2") == A and _addr_arg(A) == A and _addr_arg("") == 0
    assert _errno(_addr_arg, "nonsense") == errno.EINVAL


def test_to_plain_and_ss_table():
    ci = ConnInfo(3, "ESTABLISHED", A, 7, 0xC6120001, 40000, 10, 20, 10, 0.001, 0.2)
    row = to_plain(ci) | {"worker": 1}
    assert row["laddr"] == A and row["state"] == "ESTABLISHED"
    text = format_ss([row])
    assert text.splitlines()[0].split()[:3] == ["State", "Recv-Q", "Send-Q"]
    assert "198.18.0.2:7" in text and "198.18.0.1:40000" in text
    assert text.splitlines()[1].split()[1:3] == ["20", "10"]  # recv-q, send-q


def test_format_stats_reads_the_stats_reply():
    """The counters as the processes send them (DropReason names produced by
    their own stats objects), printed by reason."""
    shard = ShardStats()
    disp = DispatchStats(per_worker=[5, 6])
    disp.drops[DropReason.NOT_TCP] += 1
    wc = WorkerCounters(frames_in=5, frames_out=4)
    wc.drop(DropReason.DEV_TX)
    reply = {
        "run_dir": "/r",
        "supervisor": {"proc": {"pid": 1, "cpu_percent": 1.0, "rss": 2 << 20}},
        "netio": {"proc": {"pid": 2}, "restarts": 0,
                  "counters": {"dispatch": disp.as_dict(),
                               "netio": {"zmq_dropped": [0, 0]}}},
        "workers": [{"id": 0, "proc": {"pid": 3}, "restarts": 2,
                     "counters": to_plain(wc) | {"connections": 1},
                     "shard": shard.as_dict()}],
    }
    reply = msgpack.unpackb(msgpack.packb(reply))  # as it crosses the control socket
    text = format_stats(reply)
    assert "w0=5 w1=6" in text and "netio drops: NOT_TCP=1" in text
    assert "worker 0 drops: DEV_TX=1" in text
    worker_line = [ln for ln in text.splitlines() if ln.startswith("0 ")][0]
    assert worker_line.split() == ["0", "5", "4", "1", "1"]


A6 = 0x20010DB8 << 96 | 2


def test_ipv6_binds_share_one_table_with_ipv4():
    """Linux's rules across families (core.inet_sk_saddr_equal): a dual-stack
    `::` overlaps 0.0.0.0 and every IPv4 address; a V6ONLY `::` overlaps
    neither; IPv6 addresses must be ours."""
    import socket

    v6 = socket.AF_INET6
    t = BindTable([A], [A6])
    t.bind(0, 8000, family=v6)  # dual stack
    assert _errno(t.bind, 0, 8000) == errno.EADDRINUSE
    assert _errno(t.bind, A, 8000) == errno.EADDRINUSE
    assert _errno(t.bind, A6, 8000, family=v6) == errno.EADDRINUSE
    t.bind(0, 8001, family=v6, v6only=True)
    t.bind(0, 8001)  # the IPv4 wildcard beside an IPv6-only one
    t.bind(A6, 8002, family=v6)
    t.bind(A, 8002)
    assert _errno(t.bind, A6 + 1, 80, family=v6) == errno.EADDRNOTAVAIL
    assert _errno(t.bind, A, 80, family=v6) == errno.EADDRNOTAVAIL  # not an IPv6 address of ours
    assert _addr_arg("2001:db8::2", True) == A6 and _addr_arg("", True) == 0
