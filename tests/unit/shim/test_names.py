"""A bound or listening stack socket's fd tells what it is by itself (no root).

multiprocessing spawn pickles a socket as its fd (SCM_RIGHTS); the new
process has none of the shim's per-process registry. hypercorn and
`uvicorn --workers N` bind in the parent and listen in such a child.
"""

from __future__ import annotations

import os
import socket

from shardstack.shim import gateproto as gp
from shardstack.shim import sock as shimsock
from stackpair import SERVER_IP


def _as_if_elsewhere(s: socket.socket) -> socket.socket:
    """`s`'s fd wrapped anew with the registry emptied: what a spawned
    process's socket(fileno=) sees."""
    fd = os.dup(s.fileno())
    with shimsock._REG_LOCK:
        saved = dict(shimsock._REGISTRY)
        shimsock._REGISTRY.clear()
    try:
        return socket.socket(s.family, s.type, s.proto, fileno=fd)
    finally:
        with shimsock._REG_LOCK:
            shimsock._REGISTRY.update(saved)


def test_bound_then_listening_fd_names_the_bind(stack):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    assert port > 0
    raw = shimsock._csocket(socket.AF_UNIX, socket.SOCK_STREAM, 0, s.fileno())
    path = raw.getsockname()  # read as AF_UNIX (the object's AF_INET face would cut it short)
    raw.detach()
    assert path == s._ss.path and gp.parse_listener_path(path) == (s._ss.bind_id, "0.0.0.0", port)
    assert os.stat(path).st_mode & 0o777 == 0o600  # only the stack's user connects
    t = _as_if_elsewhere(s)
    assert t._ss.kind == shimsock.BOUND and t._ss.bind_id == s._ss.bind_id
    assert t.getsockname() == ("0.0.0.0", port)
    t.detach()

    s.listen(4)
    u = _as_if_elsewhere(s)
    assert u._ss.kind == shimsock.LISTENER and u.getsockname() == ("0.0.0.0", port)
    # The recovered listener accepts a connection through the stack.
    c = socket.create_connection((SERVER_IP, port), timeout=5)
    a, peer = u.accept()
    assert peer == c.getsockname() and a.getsockname() == (SERVER_IP, port)
    for x in (a, c, u, s):
        x.close()


def test_listener_path_round_trip():
    assert gp.parse_listener_path("/run/l/" + gp.listener_file(3, "0.0.0.0", 80)) == (
        3, "0.0.0.0", 80)
    assert gp.parse_listener_path("/run/x/3_0.0.0.0_80.sock") is None
    assert gp.parse_listener_path("/run/l/3_0.0.0.0.sock") is None
    assert gp.parse_listener_path("/run/l/3_1.2.3.4_99999.sock") is None


def test_listening_in_two_places_shares_one_queue(stack):
    """The listener is the bound socket itself: a second process's listen()
    on the same fd (here: a re-wrapped copy) shares its accept queue."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    other = _as_if_elsewhere(s)
    assert other._ss.kind == shimsock.BOUND
    other.listen(4)  # the "child" listens first ...
    s.listen(4)  # ... the parent too: one queue, no second listener
    c = socket.create_connection((SERVER_IP, port), timeout=5)
    s.settimeout(5)
    a, _ = s.accept()
    assert a.getsockname() == (SERVER_IP, port)
    for x in (a, c, other, s):
        x.close()
    again = socket.socket()
    again.bind(("0.0.0.0", port))  # all holders closed: the port is free
    again.close()
