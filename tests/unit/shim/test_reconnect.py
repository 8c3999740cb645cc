"""connect() again on a socket whose connect failed, through the shim (two real shards,
no root: stackpair.py), and an ICMP error failing a connect through the shim.

Linux lets a socket whose handshake failed (ECONNREFUSED, ETIMEDOUT,
EHOSTUNREACH...) connect again: a blocking connect leaves it unconnected at
once; after a non-blocking one the next connect() reports how it ended (or
ECONNABORTED once SO_ERROR took the errno), then the socket is fresh.
"""

from __future__ import annotations

import errno
import select
import socket

from shardstack.core.wire.icmp import ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, build_icmp_error
from shardstack.core.wire.ipv4 import PROTO_ICMP, build_ipv4, parse_ipv4, str_to_ip
from shardstack.core.wire.tcp import SYN, parse_tcp
from stackpair import CLIENT_IP, SERVER_IP, closed_port, listener


def _echo_once_and_close(cl: socket.socket, srv: socket.socket) -> None:
    """Accept `cl`'s connection, exchange one message each way, close all three."""
    c, _ = srv.accept()
    cl.sendall(b"ping")
    assert c.recv(10) == b"ping"
    c.sendall(b"pong")
    assert cl.recv(10) == b"pong"
    for s in (c, cl, srv):
        s.close()


def test_blocking_connect_again_after_refusal_succeeds(stack):
    port = closed_port()
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((SERVER_IP, port))
        raise AssertionError("connect to a closed port succeeded")
    except ConnectionRefusedError as e:
        assert e.errno == errno.ECONNREFUSED
    assert s.connect_ex((SERVER_IP, port)) == errno.ECONNREFUSED  # refused again, not EISCONN
    srv = listener(backlog=4, port=port)
    s.connect((SERVER_IP, port))  # the same socket object and fd
    assert s.getpeername() == (SERVER_IP, port)
    assert s.getsockname()[0] == CLIENT_IP
    _echo_once_and_close(s, srv)


def test_nonblocking_connect_again_reports_then_succeeds(stack):
    port = closed_port()
    s = socket.socket()
    s.setblocking(False)
    fd = s.fileno()
    assert s.connect_ex((SERVER_IP, port)) == errno.EINPROGRESS
    assert select.select([], [s], [], 5)[1] == [s]
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    # Linux: the error was read, so this connect() says ECONNABORTED and resets the socket.
    assert s.connect_ex((SERVER_IP, port)) == errno.ECONNABORTED
    srv = listener(backlog=4, port=port)
    assert s.connect_ex((SERVER_IP, port)) == errno.EINPROGRESS
    assert select.select([], [s], [], 5)[1] == [s]
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert s.fileno() == fd and s.getpeername() == (SERVER_IP, port)
    s.setblocking(True)
    _echo_once_and_close(s, srv)


def test_connect_again_keeps_the_bound_port(stack):
    port = closed_port()
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    mine = s.getsockname()[1]
    assert s.connect_ex((SERVER_IP, port)) == errno.ECONNREFUSED
    assert s.getsockname()[1] == mine
    srv = listener(backlog=4, port=port)
    s.settimeout(5)
    s.connect((SERVER_IP, port))
    assert s.getsockname() == (CLIENT_IP, mine)
    _echo_once_and_close(s, srv)


def test_icmp_host_unreachable_fails_the_connect_then_retry_works(stack):
    """The client shard's SYN is answered by a router's host-unreachable: connect()
    fails with EHOSTUNREACH at once (no SYN retries), and works once the path does."""
    srv = listener(backlog=4)
    port = srv.getsockname()[1]
    client = stack.nodes[0]
    router = str_to_ip("198.18.0.254")
    seen = []

    def answer_with_icmp(frame: bytes) -> bool:
        ip, payload = parse_ipv4(frame)
        if ip.proto != 6 or parse_tcp(payload).flags != SYN:
            return False
        seen.append(frame)
        err = build_ipv4(router, ip.src, PROTO_ICMP,
                         build_icmp_error(ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, frame))
        stack.loop.call_soon(client.receive, [err])
        return True  # the SYN is lost beyond the router

    stack.drop = answer_with_icmp
    s = socket.socket()
    s.settimeout(5)
    assert s.connect_ex((SERVER_IP, port)) == errno.EHOSTUNREACH
    assert len(seen) == 1, "the connect waited for SYN retransmissions"
    assert client.shard.stats.tcp_icmp_aborts == 1
    stack.drop = None
    s.connect((SERVER_IP, port))
    _echo_once_and_close(s, srv)
