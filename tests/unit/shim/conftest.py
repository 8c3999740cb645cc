import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import shardstack.shim as shim  # noqa: E402
from stackpair import StackPair, connect_accept, listener  # noqa: E402


@pytest.fixture
def stack(tmp_path):
    """A running two-shard stack with the shim installed in this process."""
    sp = StackPair(tmp_path / "run").start()
    link = shim.install(str(tmp_path / "run"))
    # Without an answering stack, sockets to 198.18.0.1 would go to the
    # kernel and out of this machine: never start a test like that.
    assert link.view() is not None
    try:
        yield sp
    finally:
        shim.uninstall()
        link.close()
        shim.sock._REGISTRY.clear()
        from shardstack.shim.stack import set_stack

        set_stack(None)
        sp.stop()


@pytest.fixture
def conn(stack):
    """One connection across the stack pair: Conn(srv, port, cl, c, addr), all closed after."""
    srv = listener()
    try:
        conn = connect_accept(srv)
    except BaseException:
        srv.close()
        raise
    try:
        yield conn
    finally:
        for s in (conn.c, conn.cl, srv):
            s.close()
