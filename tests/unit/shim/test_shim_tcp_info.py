"""getsockopt(IPPROTO_TCP, TCP_INFO) on stack sockets, with the kernel's own
TCP_INFO on loopback as the oracle for length, int form and listener fields."""

from __future__ import annotations

import socket
import time

import pytest
from shardstack.core.tcp_info import unpack_tcp_info
from shardstack.shim.sock import kernel_socket
from stackpair import (
    SERVER_IP,
    close_with_rst,
    connect_accept,
    in_thread,
    listener,
    recv_until_reset,
)

TCP, INFO = socket.IPPROTO_TCP, socket.TCP_INFO


def _kernel_established():
    """A connected pair of kernel sockets on loopback (and their listener)."""
    lst = kernel_socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    k = kernel_socket()
    k.connect(lst.getsockname())
    peer, _ = lst.accept()
    return lst, k, peer


def _wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


def test_connected_stack_socket(stack):
    srv = listener()
    port = srv.getsockname()[1]
    n = 100_000

    def serve():
        c, _ = srv.accept()
        with c:
            got = 0
            while got < n:
                got += len(c.recv(65536))
            info = unpack_tcp_info(c.getsockopt(TCP, INFO, 1024))
            c.sendall(b"ok")  # its ACK covers all n bytes
            c.recv(10)
            return info

    join = in_thread(serve)
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    lst, k, kpeer = _kernel_established()
    raw = cl.getsockopt(TCP, INFO, 1024)
    assert len(raw) == len(k.getsockopt(TCP, INFO, 1024))  # the running kernel's sizeof
    i = unpack_tcp_info(raw)
    assert i["state"] == 1  # TCP_ESTABLISHED
    assert i["snd_mss"] == cl.getsockopt(TCP, socket.TCP_MAXSEG) == 1460 - 12  # peer's MSS
    assert i["advmss"] == 1460 and i["pmtu"] == 1500
    assert i["snd_cwnd"] == 10 and i["unacked"] == 0
    assert i["options"] & 7 == 7  # timestamps, SACK, window scaling
    assert i["bytes_acked"] == 1
    # Without a buffer: the first int (state, ca_state, retransmits, probes),
    # as the kernel gives it; with one: min(buflen, sizeof) bytes.
    assert cl.getsockopt(TCP, INFO) == k.getsockopt(TCP, INFO) == 1
    assert cl.getsockopt(TCP, INFO, 0) == 1
    assert cl.getsockopt(TCP, INFO, 3) == k.getsockopt(TCP, INFO, 3) == b"\x01\x00\x00"
    with pytest.raises(OSError):
        cl.getsockopt(TCP, INFO, 1025)  # out of range for CPython, as on a kernel socket
    cl.sendall(b"d" * n)
    assert cl.recv(10) == b"ok"
    i = unpack_tcp_info(cl.getsockopt(TCP, INFO, 1024))
    assert i["bytes_acked"] == 1 + n and i["bytes_sent"] == n
    assert i["bytes_received"] == 2 and i["rtt"] > 0
    cl.close()
    si = join()
    assert si["state"] == 1 and si["bytes_received"] == n
    assert si["rcv_wscale"] == i["snd_wscale"] and si["snd_wscale"] == i["rcv_wscale"]
    for s in (srv, lst, k, kpeer):
        s.close()


def test_listener_reports_accept_queue_and_backlog(stack):
    srv = listener(backlog=5)
    port = srv.getsockname()[1]
    klst = kernel_socket()
    klst.bind(("127.0.0.1", 0))
    klst.listen(5)
    clients, kclients = [], []
    for _ in range(2):
        clients.append(socket.create_connection((SERVER_IP, port), timeout=5))
        kc = kernel_socket()
        kc.connect(klst.getsockname())
        kclients.append(kc)

    def fields(s):
        i = unpack_tcp_info(s.getsockopt(TCP, INFO, 1024))
        return i["state"], i["unacked"], i["sacked"], i["snd_cwnd"]

    assert _wait_for(lambda: fields(klst)[1] == 2)
    assert fields(klst) == (10, 2, 5, 10)
    assert _wait_for(lambda: fields(srv)[1] == 2)  # both in the app's accept queue
    assert fields(srv) == fields(klst)
    assert srv.getsockopt(TCP, INFO) == klst.getsockopt(TCP, INFO) == 10  # TCP_LISTEN
    c, _ = srv.accept()
    assert fields(srv) == (10, 1, 5, 10)
    for s in (c, srv, klst, *clients, *kclients):
        s.close()


def test_bound_reset_and_kernel_sockets(stack):
    b = socket.socket()
    b.bind(("0.0.0.0", 0))  # on the stack, neither listening nor connected
    info = unpack_tcp_info(b.getsockopt(TCP, INFO, 1024))
    assert info["state"] == 7  # TCP_CLOSE
    assert b.getsockopt(TCP, INFO) == kernel_socket().getsockopt(TCP, INFO) == 7
    b.close()

    srv = listener()
    _, _, cl, c, _ = connect_accept(srv)
    close_with_rst(c)
    recv_until_reset(cl)
    assert cl.getsockopt(TCP, INFO) == 7  # a reset socket is closed, as on Linux
    cl.close()
    srv.close()

    # A kernel socket (loopback is not the stack's) keeps the kernel's answer.
    lst, k, kpeer = _kernel_established()
    s = socket.create_connection(lst.getsockname(), timeout=5)
    ki = unpack_tcp_info(s.getsockopt(TCP, INFO, 1024))
    assert ki["state"] == 1 and ki["pmtu"] > 1500  # lo's MTU, not the stack's 1500
    for x in (s, lst, k, kpeer):
        x.close()


def test_pacing_and_delivery_rate_through_the_shim(stack):
    """SO_MAX_PACING_RATE goes through the shim to the engine, which paces with
    it; TCP_INFO then shows the capped pacing rate and a measured delivery rate
    in Linux's layout (tcpi_pacing_rate, tcpi_max_pacing_rate, tcpi_delivery_rate)."""
    srv = listener()
    port = srv.getsockname()[1]
    n = 300_000
    cap = 3_000_000  # bytes/s

    def serve():
        c, _ = srv.accept()
        with c:
            got = 0
            while got < n:
                got += len(c.recv(65536))
            c.sendall(b"ok")
            c.recv(10)

    join = in_thread(serve)
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    so_max_pacing_rate = getattr(socket, "SO_MAX_PACING_RATE", 47)
    before = unpack_tcp_info(cl.getsockopt(TCP, INFO, 1024))
    assert before["max_pacing_rate"] == 0xFFFFFFFFFFFFFFFF  # ~0: no cap yet, as Linux
    cl.setsockopt(socket.SOL_SOCKET, so_max_pacing_rate, cap)
    assert cl.getsockopt(socket.SOL_SOCKET, so_max_pacing_rate) == cap
    cl.sendall(b"p" * n)
    assert cl.recv(10) == b"ok"
    i = unpack_tcp_info(cl.getsockopt(TCP, INFO, 1024))
    assert i["max_pacing_rate"] == cap
    assert 0 < i["pacing_rate"] <= cap
    assert i["delivery_rate"] > 0 and i["delivered"] >= n // i["snd_mss"]
    cl.close()
    join()
    srv.close()
