"""asyncio apps on the stack, with the stdlib selector loop and with uvloop.

- A non-blocking connect to a blackholed address must not block the event
  loop: a concurrent task keeps ticking on schedule while the SYN goes
  unanswered (the filler trick keeps the fd unwritable, docs/shim.md).
- `loop.sock_accept` / `sock_connect` / `sock_recv` / `sock_sendall` on stack
  sockets, against kernel peers.

Fixtures (a namespace with `shardstack serve`) are in conftest.py.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

LOOPS = ("asyncio", "uvloop")
MAX_GAP = 0.2  # s: a 20 ms ticker may be late, never blocked for the connect's duration

RUNNER = {
    "asyncio": "import asyncio\nrun = asyncio.run\n",
    "uvloop": "import asyncio, uvloop\nrun = uvloop.run\n",
}


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_blackholed_connect_keeps_the_loop_ticking(env, loop_kind):
    silent = env.peer.rsplit(".", 1)[0] + ".77"  # on the stack's net; nobody answers
    r = env.shim_py(RUNNER[loop_kind] + f"""
import socket, time

async def main():
    loop = asyncio.get_running_loop()
    ticks = []
    done = asyncio.Event()

    async def ticker():
        while not done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.1)
    s = socket.socket()
    s.setblocking(False)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(loop.sock_connect(s, ("{silent}", 80)), 2.0)
        print("connected")
    except (asyncio.TimeoutError, TimeoutError):
        print("pending", round(time.monotonic() - t0, 1))
    t1 = time.monotonic()
    print("stack", s.getsockname()[0])
    s.close()
    done.set()
    await task
    during = [b - a for a, b in zip(ticks, ticks[1:]) if t0 <= b <= t1]
    print("ticks", len(during), max(during))
    if loop_kind_is_uvloop:
        print("loop", type(loop).__module__)

loop_kind_is_uvloop = {loop_kind == "uvloop"}
run(main())
""")
    assert r.returncode == 0, r.stderr + env.log()
    lines = r.stdout.splitlines()
    kind, took = lines[0].split()
    assert kind == "pending" and 1.9 <= float(took) < 4.0, r.stdout  # wait_for's 2 s
    assert lines[1] == f"stack {env.addr}", r.stdout  # the connect went through the stack
    _, n, gap = lines[2].split()
    assert int(n) >= 20, r.stdout  # ~100 expected; the loop ran all along
    assert float(gap) < MAX_GAP, r.stdout
    if loop_kind == "uvloop":
        assert lines[3].startswith("loop uvloop"), r.stdout


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_sock_methods(env, loop_kind):
    """sock_accept/sock_recv/sock_sendall serve a kernel client; sock_connect/
    sock_sendall/sock_recv_into talk to a kernel echo server."""
    env.kernel_server(f"""
        import socket, threading
        srv = socket.create_server(("{env.peer}", 7200))
        def echo(c):
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        while True:
            c, _ = srv.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()
    """, 7200)
    app = env.app_py(RUNNER[loop_kind] + f"""
import hashlib, socket, sys

SIZE = 1 << 20

async def serve_one(lst):
    loop = asyncio.get_running_loop()
    conn, addr = await loop.sock_accept(lst)
    print("accepted", addr[0], conn.getsockname()[0], flush=True)
    conn.setblocking(False)
    got = 0
    while got < SIZE:
        data = await loop.sock_recv(conn, 65536)
        assert data, "EOF early"
        got += len(data)
        await loop.sock_sendall(conn, data)
    conn.close()
    print("served", got, flush=True)

async def client():
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, ("{env.peer}", 7200))
    data = bytes(range(256)) * (SIZE // 256)
    send = asyncio.ensure_future(loop.sock_sendall(s, data))
    buf = bytearray(65536)
    h, got = hashlib.sha256(), 0
    while got < SIZE:
        n = await loop.sock_recv_into(s, buf)
        assert n, "EOF early"
        h.update(buf[:n])
        got += n
    await send
    s.close()
    print("client", h.digest() == hashlib.sha256(data).digest(), flush=True)

async def main():
    lst = socket.create_server(("0.0.0.0", 7201))
    lst.setblocking(False)
    print("listening", type(asyncio.get_running_loop()).__module__, flush=True)
    await asyncio.wait_for(asyncio.gather(serve_one(lst), client()), 60)
    lst.close()

run(main())
""", "sockapp")
    env.wait_for_line("sockapp", "listening", app)
    out = env.kernel_py(f"""
        import hashlib, os, socket, threading
        data = os.urandom(1 << 20)
        with socket.create_connection(("{env.addr}", 7201), timeout=30) as c:
            t = threading.Thread(target=c.sendall, args=(data,))
            t.start()
            h, got = hashlib.sha256(), 0
            while got < len(data):
                chunk = c.recv(65536)
                assert chunk, "EOF early"
                h.update(chunk)
                got += len(chunk)
            t.join()
        print(h.digest() == hashlib.sha256(data).digest())
    """)
    assert out.strip() == "True", env.app_log("sockapp")
    assert app.wait(60) == 0, env.app_log("sockapp")
    log = env.app_log("sockapp").splitlines()
    expect_loop = "uvloop" if loop_kind == "uvloop" else "asyncio"
    assert log[0].startswith(f"listening {expect_loop}"), log
    assert f"accepted {env.peer} {env.addr}" in log, log
    assert f"served {1 << 20}" in log, log
    assert "client True" in log, log
