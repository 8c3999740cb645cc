"""A peer's RST reaches an unmodified app as ECONNRESET, whatever it wrote last.

The kernel peer aborts (SO_LINGER {1, 0} then close: RST) a connection the app
accepted (passive) or opened (active), after the app wrote nothing, a small
message, or a large one (1 MiB, far beyond what the worker can hold back
unread in the unix stream). The app's blocking `recv()` (or asyncio's
`StreamReader.read()`) must raise ConnectionResetError with errno
ECONNRESET, once; a later `recv()` returns b"" as on Linux (tcp_recvmsg
reports sk_err once). Fixtures are in conftest.py.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

SIZE = 1 << 20
WRITES = {"never": 0, "small": 16, "large": SIZE}

APP_BLOCKING = """
import errno, os, socket, sys, time
MODE, WRITE = {mode!r}, {write}
def wait_reset(c):
    try:
        data = c.recv(65536)
        print("no reset", len(data), flush=True)
    except ConnectionResetError as e:
        print("reset", e.errno == errno.ECONNRESET, flush=True)
        print("then", c.recv(65536), flush=True)
if MODE == "passive":
    srv = socket.create_server(("0.0.0.0", 7310))
    print("listening", flush=True)
    c, _ = srv.accept()
else:
    c = socket.create_connection(("{peer}", {kport}), timeout=30)
    c.settimeout(None)
print("connected", c.getsockname()[0], flush=True)
if WRITE:
    c.sendall(b"x" * WRITE)
open("marker", "w").close()  # the kernel side may abort now
wait_reset(c)
"""

APP_ASYNCIO = """
import asyncio, errno
WRITE = {write}
done = asyncio.Event()
async def handle(r, w):
    print("connected", w.get_extra_info("sockname")[0], flush=True)
    if WRITE:
        w.write(b"x" * WRITE)
        await w.drain()
    open("marker", "w").close()
    try:
        data = await r.read(65536)
        print("no reset", len(data), flush=True)
    except ConnectionResetError as e:
        print("reset", e.errno == errno.ECONNRESET, flush=True)
    w.close()
    done.set()
async def main():
    srv = await asyncio.start_server(handle, "0.0.0.0", 7310)
    print("listening", flush=True)
    await asyncio.wait_for(done.wait(), 60)
    srv.close()
asyncio.run(main())
"""

# The kernel's side: read what the app writes, wait for its marker, then RST.
KERNEL_ABORT = """
import os, socket, struct, time
def abort(c, expect):
    got = 0
    while got < expect:
        chunk = c.recv(65536)
        if not chunk:
            return  # a readiness probe, not the app
        got += len(chunk)
    deadline = time.monotonic() + 30
    while not os.path.exists("{marker}"):
        assert time.monotonic() < deadline, "no marker"
        time.sleep(0.01)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
"""


def _kernel_server(env, write: int, port: int) -> None:
    env.kernel_server(KERNEL_ABORT.format(marker=env.tmp / "marker") + f"""
import threading
srv = socket.create_server(("{env.peer}", {port}))
while True:  # the readiness probe connects too
    c, _ = srv.accept()
    threading.Thread(target=abort, args=(c, {write}), daemon=True).start()
""", port)


CASES = [(side, write) for side in ("passive", "active", "asyncio") for write in WRITES
         if (side, write) != ("asyncio", "small")]  # the blocking cases cover it


@pytest.mark.parametrize(("side", "write"), CASES)
def test_peer_reset_is_econnreset(env, side, write):
    n = WRITES[write]
    if side == "active":
        _kernel_server(env, n, 7300)
    code = (APP_ASYNCIO.format(write=n) if side == "asyncio" else
            APP_BLOCKING.format(mode=side, write=n, peer=env.peer, kport=7300))
    app = env.app_py(code, "rst")
    if side != "active":
        env.wait_for_line("rst", "listening", app)
        env.kernel_py(KERNEL_ABORT.format(marker=env.tmp / "marker") + f"""
c = socket.create_connection(("{env.addr}", 7310), timeout=30)
abort(c, {n})
""")
    assert app.wait(60) == 0, env.app_log("rst")
    log = env.app_log("rst").splitlines()
    assert f"connected {env.addr}" in log, log  # on the stack, not the kernel
    assert "reset True" in log, log
    if side != "asyncio":
        assert "then b''" in log, log  # reported once, then EOF (as tcp_recvmsg)


APP_SHUT_THEN_ABORT = """
import socket, struct, time
srv = socket.create_server(("0.0.0.0", 7311))
print("listening", flush=True)
c, _ = srv.accept()
print("connected", c.getsockname()[0], flush=True)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.shutdown(socket.SHUT_WR)
time.sleep(0.5)  # the FIN is out: the peer reads EOF first
c.close()
time.sleep(2)  # the process (and with it every fd) stays: close() alone must abort
"""

KERNEL_SEES_FIN_THEN_RST = """
import socket, time
c = socket.create_connection(("{addr}", 7311), timeout=10)
print("first", c.recv(100), flush=True)
# Without writing (data towards a closed socket would draw a RST anyway): the
# RST alone moves the kernel socket from CLOSE-WAIT (8) to CLOSE (7).
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:
    state = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    if state != 8:
        break
    time.sleep(0.02)
print("state", state, flush=True)
"""


def test_linger_zero_close_after_shutdown_sends_rst(env):
    # Linux tcp_close: SO_LINGER {1, 0} aborts (tcp_disconnect: RST, as
    # tcp_need_reset holds in FIN-WAIT-1/2) even after shutdown(SHUT_WR) sent
    # the FIN; the peer read EOF, then its writes meet the RST.
    app = env.app_py(APP_SHUT_THEN_ABORT, "shutabort")
    env.wait_for_line("shutabort", "listening", app)
    out = env.kernel_py(KERNEL_SEES_FIN_THEN_RST.format(addr=env.addr)).splitlines()
    assert app.wait(30) == 0, env.app_log("shutabort")
    assert f"connected {env.addr}" in env.app_log("shutabort").splitlines()
    assert out[0] == "first b''", out
    assert out[1] == "state 7", out  # TCP_CLOSE: the abort's RST arrived
