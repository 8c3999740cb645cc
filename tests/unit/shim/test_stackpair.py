"""The shim and appgate end to end over two real shards (no root: tests/unit/shim/stackpair.py)."""

from __future__ import annotations

import _socket
import errno
import hashlib
import os
import select
import socket
import struct
import threading

import pytest
from shardstack.shim.sock import ShimSocket
from stackpair import (
    CLIENT_IP,
    SERVER_IP,
    as_nobody,
    close_with_rst,
    in_thread,
    listener,
    recv_all,
    recv_until_reset,
)


def test_connect_accept_addresses_and_echo(stack):
    srv = listener()
    port = srv.getsockname()[1]
    assert isinstance(srv, ShimSocket) and srv.family == socket.AF_INET
    assert srv.type == socket.SOCK_STREAM and srv.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_ACCEPTCONN) == 1

    def serve():
        c, addr = srv.accept()
        with c:
            data = c.recv(100)
            c.sendall(data[::-1])
            return addr, c.getsockname(), c.getpeername()

    join = in_thread(serve)
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    cl.sendall(b"abcdef")
    assert cl.recv(100) == b"fedcba"
    assert cl.recv(100) == b""  # the server closed: FIN
    addr, sname, pname = join()
    lname = cl.getsockname()
    assert lname[0] == CLIENT_IP and 1024 <= lname[1] <= 65535
    assert cl.getpeername() == (SERVER_IP, port)
    assert addr == pname == lname and sname == (SERVER_IP, port)
    cl.close()
    srv.close()


def test_refused_is_the_kernels_exception(stack):
    srv = listener()
    port = srv.getsockname()[1]
    srv.close()  # released: nothing listens on the port any more
    with pytest.raises(ConnectionRefusedError) as ei:
        socket.create_connection((SERVER_IP, port), timeout=5)
    assert ei.value.errno == errno.ECONNREFUSED
    s = socket.socket()
    assert s.connect_ex((SERVER_IP, port)) == errno.ECONNREFUSED
    s.close()


def test_nonblocking_connect_is_writable_only_when_established(stack):
    srv = listener()
    port = srv.getsockname()[1]
    stack.drop = lambda frame: True  # the wire eats the SYN: the handshake stalls
    s = socket.socket()
    s.setblocking(False)
    assert s.connect_ex((SERVER_IP, port)) == errno.EINPROGRESS
    assert select.select([], [s], [], 0.3)[1] == []  # not writable while SYN-SENT
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    with pytest.raises(OSError) as ei:
        s.getpeername()
    assert ei.value.errno == errno.ENOTCONN
    assert s.connect_ex((SERVER_IP, port)) == errno.EALREADY
    assert s.getsockname()[0] == CLIENT_IP  # the port is chosen at connect(), as in Linux
    stack.drop = None  # the SYN retransmission (RTO 1 s) gets through
    _, w, _ = select.select([], [s], [], 5)
    assert w == [s]
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert s.getpeername() == (SERVER_IP, port)
    # Linux: the first connect() after the handshake completes it (0), then EISCONN
    # (a kernel socket on loopback does the same: [0, EISCONN])
    assert [s.connect_ex((SERVER_IP, port)) for _ in range(2)] == [0, errno.EISCONN]
    c, _ = srv.accept()
    s.setblocking(True)
    s.sendall(b"x" * 100000)  # the filler is gone: full-size writes work
    got = b""
    while len(got) < 100000:
        got += c.recv(65536)
    assert got == b"x" * 100000
    for x in (s, c, srv):
        x.close()


def test_connect_timeout(stack):
    srv = listener()
    port = srv.getsockname()[1]
    stack.drop = lambda frame: True
    s = socket.socket()
    s.settimeout(0.2)
    with pytest.raises(TimeoutError):
        s.connect((SERVER_IP, port))
    s.close()
    srv.close()


def test_bulk_transfer_with_backpressure_and_half_close(stack):
    srv = listener()
    port = srv.getsockname()[1]
    payload = os.urandom(3 << 20)

    def serve():
        c, _ = srv.accept()
        h = hashlib.sha256()
        n = 0
        with c:
            while True:
                chunk = c.recv(1 << 16)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
            c.sendall(struct.pack("!Q", n) + h.digest())  # after our EOF: half-close works
        return n

    join = in_thread(serve)
    cl = socket.create_connection((SERVER_IP, port), timeout=20)
    cl.sendall(payload)
    cl.shutdown(socket.SHUT_WR)
    f = cl.makefile("rb")
    reply = f.read()
    assert reply == struct.pack("!Q", len(payload)) + hashlib.sha256(payload).digest()
    assert join() == len(payload)
    f.close()
    cl.close()
    srv.close()


def test_peer_reset_surfaces_as_econnreset(conn):
    cl, c = conn.cl, conn.c
    cl.sendall(b"request")
    assert c.recv(100) == b"request"
    close_with_rst(c)
    recv_until_reset(cl)


def test_reset_reported_by_so_error(conn):
    cl = conn.cl
    close_with_rst(conn.c)
    select.select([cl], [], [], 5)
    assert cl.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


def test_options_reach_the_shard(stack):
    srv = listener(opts={(socket.IPPROTO_TCP, socket.TCP_NODELAY): 1})
    port = srv.getsockname()[1]
    cl = socket.socket()
    cl.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # before connect: replayed
    cl.connect((SERVER_IP, port))
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # after: forwarded
    cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
    assert cl.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert cl.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert cl.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
    assert 500 < cl.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1460
    assert len(cl.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == 8
    gate = stack.nodes[0].gate
    (conn,) = list(gate.conns.values())
    shard = stack.nodes[0].shard
    got = stack.call(lambda: (shard.getsockopt(conn.sd, socket.IPPROTO_TCP, socket.TCP_NODELAY),
                              shard.getsockopt(conn.sd, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                              shard.getsockopt(conn.sd, socket.IPPROTO_TCP,
                                               socket.TCP_KEEPIDLE)))
    assert got == (1, 1, 33)
    c, _ = srv.accept()
    c.close()
    cl.close()
    srv.close()


def test_timeout_options_read_and_reach_the_shard_like_the_kernels(stack):
    """TCP_USER_TIMEOUT / TCP_SYNCNT / TCP_LINGER2: unset they read as a
    kernel socket's do; set on a listener they reach the shard and carry
    over to the accepted child (Linux clones the listener)."""
    opts = (socket.TCP_USER_TIMEOUT, socket.TCP_SYNCNT, socket.TCP_LINGER2,
            socket.TCP_WINDOW_CLAMP)
    kernel = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # not the shim's
    want = [kernel.getsockopt(socket.IPPROTO_TCP, o) for o in opts]
    kernel.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, 500)
    want_clamped = kernel.getsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2)
    kernel.close()
    srv = listener(opts={(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT): 4000,
                        (socket.IPPROTO_TCP, socket.TCP_SYNCNT): 3,
                        (socket.IPPROTO_TCP, socket.TCP_LINGER2): 500})
    port = srv.getsockname()[1]
    cl = socket.socket()
    assert [cl.getsockopt(socket.IPPROTO_TCP, o) for o in opts] == want
    cl.connect((SERVER_IP, port))
    assert srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2) == want_clamped
    c, _ = srv.accept()
    cport = cl.getsockname()[1]
    child = stack.call(lambda: [sk for node in stack.nodes for sk in node.shard.socks.values()
                                if (sk.lport, sk.rport) == (port, cport)])
    assert [(sk.user_timeout, sk.syn_count) for sk in child] == [(4000, 3)]
    c.close()
    cl.close()
    srv.close()


def test_bind_conflicts_are_the_kernels(stack):
    a = listener()
    port = a.getsockname()[1]
    b = socket.socket()
    with pytest.raises(OSError) as ei:
        b.bind(("0.0.0.0", port))
    assert ei.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as ei:
        b.getpeername()
    assert ei.value.errno == errno.ENOTCONN
    a.close()
    b.bind(("0.0.0.0", port))  # released on close
    assert b.getsockname() == ("0.0.0.0", port)
    b.close()


def test_kernel_sockets_stay_kernel(stack):
    u1, u2 = socket.socketpair()
    u1.sendall(b"x")
    assert u2.recv(1) == b"x"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.sendto(b"y", udp.getsockname())
    assert udp.recv(1) == b"y"
    lo = socket.socket()
    lo.bind(("127.0.0.1", 0))
    lo.listen(1)
    c = socket.create_connection(lo.getsockname(), timeout=5)
    s, _ = lo.accept()
    assert c.getpeername() == lo.getsockname()  # a real kernel TCP socket
    assert c.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET
    for x in (u1, u2, udp, lo, c, s):
        x.close()


def test_dup_fromfd_and_fileno_rewrap_keep_tcp_identity(conn):
    cl, c = conn.cl, conn.c
    for s in (cl, c):
        d = s.dup()
        assert (d.getsockname(), d.getpeername()) == (s.getsockname(), s.getpeername())
        d.close()
        f = socket.fromfd(s.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        assert f.getpeername() == s.getpeername()
        f.close()
    fd = c.detach()
    again = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    assert again.getpeername() == conn.addr
    cl.sendall(b"still here")
    assert again.recv(100) == b"still here"
    again.close()


@pytest.mark.slow
def test_full_app_backlog_holds_connections_until_accepted(stack):
    """A full app backlog is a full accept queue: the worker parks children
    and the shard drops further SYNs, whose retransmissions succeed once the
    app accepts (tcp_conn_request on a full queue)."""
    srv = listener(backlog=1)
    port = srv.getsockname()[1]

    def client(i):
        c = socket.create_connection((SERVER_IP, port), timeout=20)
        c.sendall(b"%d" % i)
        return c

    joins = [in_thread(client, i) for i in range(5)]
    gate = stack.nodes[1].gate
    for _ in range(1000):  # bounded: until the worker found the app's backlog full
        if gate.stats.backlog_full:
            break
        threading.Event().wait(0.01)
    got = set()
    srv.settimeout(20)
    for _ in joins:
        a, _ = srv.accept()
        a.settimeout(5)
        got.add(a.recv(10))
        a.close()
    assert got == {b"%d" % i for i in range(5)}
    assert gate.stats.backlog_full > 0  # the worker had to wait for the app
    for j in joins:
        j().close()
    srv.close()


def test_close_with_unread_data_sends_rst(conn):
    """tcp_close: closing with unread receive data aborts the connection."""
    cl, c = conn.cl, conn.c
    cl.sendall(b"never read")
    select.select([c], [], [], 5)
    c.close()
    recv_until_reset(cl)


def test_passive_side_sees_reset_after_its_small_write(conn):
    cl, c = conn.cl, conn.c
    c.settimeout(5)
    c.sendall(b"hello")  # a small write: the worker keeps its last byte back
    assert cl.recv(100) == b"hello"
    close_with_rst(cl)
    with pytest.raises(ConnectionResetError):
        c.recv(100)


def test_recv_timeout_and_specific_address_bind(stack):
    srv = socket.socket()
    srv.bind((CLIENT_IP, 0))  # a stack address, not the wildcard
    srv.listen(1)
    assert srv.getsockname()[0] == CLIENT_IP
    srv.close()
    srv = listener()
    cl = socket.create_connection((SERVER_IP, srv.getsockname()[1]), timeout=5)
    cl.settimeout(0.2)
    with pytest.raises(TimeoutError):
        cl.recv(10)
    cl.close()
    srv.close()


def test_connect_from_a_bound_port(stack):
    srv = listener()
    port = srv.getsockname()[1]
    cl = socket.socket()
    cl.bind(("0.0.0.0", 0))
    bport = cl.getsockname()[1]
    cl.settimeout(5)
    cl.connect((SERVER_IP, port))
    assert cl.getsockname() == (CLIENT_IP, bport)
    c, addr = srv.accept()
    assert addr == (CLIENT_IP, bport)
    for x in (c, cl, srv):
        x.close()


def test_closed_listener_refuses(stack):
    srv = listener()
    port = srv.getsockname()[1]
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    srv.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((SERVER_IP, port), timeout=5)
    cl.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_app_gets_eacces(stack):
    os.chmod(stack.run_dir / "control.sock", 0o666)

    def app(run_dir: str) -> bytes:
        from shardstack.shim.stack import Stack, set_stack

        set_stack(Stack(run_dir))
        s = socket.socket()
        got = b""
        try:
            s.connect((SERVER_IP, 80))
        except OSError as e:
            got = str(e.errno).encode()
        lo = socket.socket()
        lo.bind(("127.0.0.1", 0))  # loopback is still the kernel's
        return got

    got, code = as_nobody(stack.run_dir, app, new_netns=True)
    assert got == str(errno.EACCES).encode()
    assert code == 0


def test_dual_stack_ipv6_listener_serves_ipv4(stack):
    """`::` with IPV6_V6ONLY off (http.server's default in a v6-capable netns):
    the IPv4 half goes on the stack, addresses show v4-mapped."""
    srv = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = srv.getsockname()[1]
    assert srv.getsockname() == ("::", port, 0, 0)
    assert srv.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET6
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    c, addr = srv.accept()
    assert c.family == socket.AF_INET6
    assert addr == ("::ffff:" + CLIENT_IP, cl.getsockname()[1], 0, 0)
    assert c.getsockname() == ("::ffff:" + SERVER_IP, port, 0, 0)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.settimeout(5)
    v6.connect(("::ffff:" + SERVER_IP, port))  # a v4-mapped destination: the stack
    c2, _ = srv.accept()
    v6.sendall(b"mapped")
    assert c2.recv(10) == b"mapped"
    assert v6.getpeername() == ("::ffff:" + SERVER_IP, port, 0, 0)
    for x in (v6, c2, c, cl, srv):
        x.close()


@pytest.mark.parametrize("size", [0, 1 << 20])
def test_passive_side_sees_reset_after_no_write_or_a_large_one(conn, size):
    """Nothing for the worker to hold back unread: the shim asks it at EOF ("status")."""
    cl, c = conn.cl, conn.c
    c.settimeout(10)
    if size:
        send = in_thread(c.sendall, b"x" * size)
        recv_all(cl, size)
        send()
    close_with_rst(cl)
    with pytest.raises(ConnectionResetError) as e:
        c.recv(100)
    assert e.value.errno == errno.ECONNRESET
    assert c.recv(100) == b""  # reported once, then EOF (tcp_recvmsg)


def test_clean_eof_is_not_a_reset(conn):
    cl, c = conn.cl, conn.c
    c.settimeout(10)
    c.sendall(b"x" * (1 << 20))  # large: nothing held back
    c.shutdown(socket.SHUT_WR)  # both FINs: the worker closes its end (POLLHUP on ours)
    got = 0
    while chunk := cl.recv(65536):
        got += len(chunk)
    assert got == 1 << 20
    cl.close()
    assert c.recv(100) == b""


def test_send_after_peer_reset_is_econnreset(conn):
    """A writer blocked on a connection the peer resets gets ECONNRESET, not EPIPE."""
    cl, c = conn.cl, conn.c
    c.settimeout(10)

    def flood():
        chunk = b"x" * 65536
        for _ in range(2000):  # far more than every buffer on the way holds
            c.sendall(chunk)
    join = in_thread(flood)
    assert cl.recv(65536)
    close_with_rst(cl)
    with pytest.raises(ConnectionResetError) as e:
        join()
    assert e.value.errno == errno.ECONNRESET


def test_reset_reported_by_so_error_is_not_reported_again(conn):
    cl, c = conn.cl, conn.c
    c.settimeout(10)
    c.sendall(b"x" * (1 << 20))  # large: nothing held back
    recv_all(cl, 1 << 20)
    close_with_rst(cl)
    select.select([c], [], [], 10)
    assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    assert c.recv(100) == b""  # sk_err was consumed by SO_ERROR (sock_getsockopt)


@pytest.mark.parametrize("timeout,expected", [(None, [errno.EISCONN, errno.EISCONN]),
                                              (5.0, [0, errno.EISCONN])])
def test_connect_again_after_connect_is_the_kernels(stack, timeout, expected):
    """Linux __inet_stream_connect: a blocking connect() ends SS_CONNECTED (then
    EISCONN); CPython's timeout mode connects a non-blocking fd and only polls, so
    the socket stays SS_CONNECTING and the next connect() says 0 once. A kernel
    socket on loopback gives exactly these two answers."""
    srv = listener()
    port = srv.getsockname()[1]
    s = socket.socket()
    s.settimeout(timeout)
    s.connect((SERVER_IP, port))
    assert [s.connect_ex((SERVER_IP, port)) for _ in range(2)] == expected
    c, _ = srv.accept()
    for x in (s, c, srv):
        x.close()
