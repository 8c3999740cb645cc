"""close() with SO_LINGER {1, N > 0} on a stack socket (Linux tcp_close ->
sk_stream_wait_close): it returns once the data and the FIN are acknowledged,
or after N seconds, whichever comes first; only the last close waits."""

from __future__ import annotations

import socket
import threading
import time

from stackpair import SERVER_IP, in_thread, listener, set_linger

FIN = 0x01


def _tcp(frame: bytes) -> tuple[int, int]:
    """(source port, flags) of an IPv4/TCP frame on the stack pair's wire."""
    ihl = (frame[0] & 0x0F) * 4
    return int.from_bytes(frame[ihl:ihl + 2], "big"), frame[ihl + 13]


def _conn_state(stack, node: int, lport: int) -> str | None:
    """The RFC state of the shard socket on `node` with local port `lport`."""
    rows = stack.call(stack.nodes[node].shard.connections)
    states = [r.state for r in rows if r.lport == lport and r.rport]
    return states[0] if states else None


def test_lingering_close_returns_after_the_fin_is_acked(stack):
    srv = listener()
    port = srv.getsockname()[1]
    n = 200_000
    release = threading.Event()

    def serve():
        c, _ = srv.accept()
        with c:
            got = 0
            while True:
                b = c.recv(65536)
                if not b:
                    break
                got += len(b)
            release.wait(10)  # keep the server's socket open while the test looks
            return got

    join = in_thread(serve)
    cl = socket.create_connection((SERVER_IP, port), timeout=5)
    lport = cl.getsockname()[1]
    dropped = []

    def drop_first_fin(frame):
        sport, flags = _tcp(frame)
        if sport == lport and flags & FIN and not dropped:
            dropped.append(frame)
            return True  # the FIN (and the data it rides with) needs a retransmission
        return False

    stack.drop = drop_first_fin
    cl.sendall(b"q" * n)
    set_linger(cl, 5)
    cl.setblocking(False)  # Linux lingers in close() even on a non-blocking fd
    cl.close()
    # close() returned: the peer's TCP already had every byte and the FIN,
    # and ours has left FIN-WAIT-1 (its FIN is acknowledged).
    assert dropped, "the first FIN was never sent"
    assert _conn_state(stack, 0, lport) in ("FIN-WAIT-2", "TIME-WAIT", None)
    assert _conn_state(stack, 1, port) == "CLOSE-WAIT"
    release.set()
    assert join() == n
    srv.close()


def test_lingering_close_gives_up_after_its_time(stack, conn):
    port, cl = conn.port, conn.cl
    lport = cl.getsockname()[1]
    stack.drop = lambda frame: True  # the link is down: nothing gets acknowledged
    cl.sendall(b"never acked")
    set_linger(cl, 2)
    t0 = time.monotonic()
    cl.close()
    took = time.monotonic() - t0
    assert 1.9 <= took < 10, took  # ~2 s: the linger time, then close() returns anyway
    # The close goes on in the background, as Linux's does: FIN still unacked.
    assert _conn_state(stack, 0, lport) == "FIN-WAIT-1"
    assert _conn_state(stack, 1, port) == "ESTABLISHED"  # the peer saw nothing
    stack.drop = None


def test_only_the_last_close_lingers(stack, conn):
    cl, c = conn.cl, conn.c
    lport = cl.getsockname()[1]
    set_linger(cl, 5)
    d = cl.dup()  # the same socket under a second fd (and the linger setting)
    stack.drop = lambda frame: True
    t0 = time.monotonic()
    cl.close()  # not the last reference: no FIN, no wait
    assert time.monotonic() - t0 < 2.5
    assert _conn_state(stack, 0, lport) == "ESTABLISHED"
    stack.drop = None
    d.sendall(b"last words")
    d.close()  # the last one: waits for the ACK of the data and the FIN
    assert _conn_state(stack, 0, lport) in ("FIN-WAIT-2", "TIME-WAIT", None)
    assert c.recv(100) == b"last words"
    assert c.recv(100) == b""
