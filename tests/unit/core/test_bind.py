"""bind(), listen() and the bind table rules (SO_REUSEADDR / SO_REUSEPORT like Linux)."""

from __future__ import annotations

import errno
import socket

import pytest
from core_helpers import A, B, make_shard
from shardstack.core.inet_connection_sock import inet_csk_get_port
from shardstack.core.inet_hashtables import InetHashinfo
from shardstack.core.sock import State, TcpSock


def err(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def test_bind_same_port_twice_is_eaddrinuse():
    sh = make_shard()
    a, b = sh.socket(), sh.socket()
    sh.bind(a, 0, 8080)
    assert err(sh.bind, b, A, 8080) == errno.EADDRINUSE
    assert sh.getsockname(a) == (0, 8080)


def test_bind_twice_is_einval_and_foreign_address_eaddrnotavail():
    sh = make_shard()
    a = sh.socket()
    assert err(sh.bind, a, B, 80) == errno.EADDRNOTAVAIL
    sh.bind(a, A, 80)
    assert err(sh.bind, a, A, 81) == errno.EINVAL


def test_reuseaddr_shares_a_port_but_only_one_listens():
    sh = make_shard()
    a, b = sh.socket(), sh.socket()
    for sd in (a, b):
        sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sh.bind(sd, 0, 9000)
    sh.listen(a, 5)
    assert err(sh.listen, b, 5) == errno.EADDRINUSE
    assert sh.state(b) is State.CLOSED
    c = sh.socket()
    sh.setsockopt(c, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    assert err(sh.bind, c, 0, 9000) == errno.EADDRINUSE  # a listener holds it


def test_reuseport_lets_several_listen():
    h = InetHashinfo()
    socks = [TcpSock(i, reuseport=True) for i in range(3)]
    for sk in socks:
        inet_csk_get_port(h, sk, 7000)
        sk.state = State.LISTEN
        inet_csk_get_port(h, sk, 7000)  # listen()'s re-check
    assert len(h.bhash[7000].owners) == 3
    other = TcpSock(9)
    with pytest.raises(OSError) as e:
        inet_csk_get_port(h, other, 7000)
    assert e.value.errno == errno.EADDRINUSE


def test_specific_and_wildcard_addresses_conflict():
    h = InetHashinfo()
    x = TcpSock(1, laddr=A)
    inet_csk_get_port(h, x, 80)
    y = TcpSock(2, laddr=0)
    with pytest.raises(OSError):
        inet_csk_get_port(h, y, 80)
    z = TcpSock(3, laddr=B)  # a different specific address is fine
    inet_csk_get_port(h, z, 80)


def test_bind_port_zero_picks_ephemeral_odd_port():
    sh = make_shard()
    sd = sh.socket()
    sh.bind(sd, 0, 0)
    port = sh.getsockname(sd)[1]
    assert 32768 <= port <= 60999 and port % 2 == 1


def test_listen_without_bind_autobinds_and_close_frees_port():
    sh = make_shard()
    sd = sh.socket()
    sh.listen(sd, 10)
    port = sh.getsockname(sd)[1]
    assert port in sh.h.bhash and sh.state(sd) is State.LISTEN
    sh.close(sd, 0.0)
    assert sh.h.bhash == {} and sh.h.listening == {}
    assert err(sh.listen, sd, 1) == errno.EBADF


def test_ephemeral_range_exhaustion_is_eaddrinuse():
    sh = make_shard(ephemeral_range=(40000, 40001))
    for _ in range(2):
        sh.bind(sh.socket(), 0, 0)
    assert err(sh.bind, sh.socket(), 0, 0) == errno.EADDRINUSE


def test_sockopts_roundtrip_and_bad_options():
    sh = make_shard()
    sd = sh.socket()
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_RCVBUF) == 1 << 20
    assert sh.getsockopt(sd, socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert err(sh.setsockopt, sd, socket.SOL_SOCKET, 12345, 1) == errno.ENOPROTOOPT
    assert err(sh.setsockopt, sd, socket.IPPROTO_TCP, socket.TCP_MAXSEG, 10) == errno.EINVAL
    assert err(sh.setsockopt, sd, socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"nope") \
        == errno.ENOENT
    assert err(sh.getpeername, sd) == errno.ENOTCONN
    assert err(sh.recv, 999, 10) == errno.EBADF
