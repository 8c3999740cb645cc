"""`shardstack run --loopback`: 127.0.0.1 entirely through the stack.

The shim maps 127.0.0.0/8 to the stack's address; the worker delivers frames
to its own address back into its shard instead of the device (as Linux
routes them via lo). A client and a server in one process, then in two
processes, talk over 127.0.0.1, and `shardstack ss --json` shows both ends
of the connection on the stack while it is up. Fixtures are in conftest.py.
"""

from __future__ import annotations

import ipaddress

import pytest

pytestmark = pytest.mark.interop

SIZE = 256 * 1024

ECHO = """
import hashlib, socket, sys, threading
def echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def exchange(c, n):
    data = bytes(range(256)) * (n // 256)
    t = threading.Thread(target=c.sendall, args=(data,))
    t.start()
    got = bytearray()
    while len(got) < n:
        chunk = c.recv(65536)
        assert chunk, "EOF early"
        got += chunk
    t.join()
    return bytes(got) == data
"""

SAME_PROCESS = ECHO + """
srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
peers = []
def serve():
    for _ in range(2):
        conn, addr = srv.accept()
        peers.append(addr[0])
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
b = socket.socket()
b.bind(("127.0.0.1", 0))  # an explicitly bound client, too
b.settimeout(30)
b.connect(("127.0.0.1", port))
print("bound", b.getsockname()[0], exchange(b, 4096), flush=True)
b.close()
c = socket.create_connection(("127.0.0.1", port), timeout=30)
print("exchange", exchange(c, {size}), flush=True)
print("names", srv.getsockname()[0], c.getsockname()[0], c.getpeername(), peers, flush=True)
print("ready", port, c.getsockname()[1], flush=True)
sys.stdin.readline()  # the test looks at `ss` meanwhile
print("again", exchange(c, {size}), flush=True)
c.close()
"""

SERVER = ECHO + """
srv = socket.create_server(("127.0.0.1", 0))
print("ready", srv.getsockname()[1], flush=True)
conn, addr = srv.accept()
print("names", srv.getsockname()[0], conn.getsockname()[0], addr[0], flush=True)
echo(conn)
print("server done", flush=True)
"""

CLIENT = ECHO + """
c = socket.create_connection(("127.0.0.1", {port}), timeout=30)
print("exchange", exchange(c, {size}), flush=True)
print("names", c.getsockname()[0], c.getpeername(), flush=True)
print("ready", c.getsockname()[1], flush=True)
sys.stdin.readline()
print("again", exchange(c, {size}), flush=True)
c.close()
"""


def _ip(v) -> str:
    return str(ipaddress.IPv4Address(v if isinstance(v, int) else str(v)))


def _both_ends(env, sport: int, cport: int) -> None:
    """ss shows the client's and the server's end of sport<->cport, established."""
    rows = env.ss()
    ends = {(_ip(r["laddr"]), r["lport"], _ip(r["raddr"]), r["rport"]): r for r in rows
            if r["state"] != "LISTEN"}
    a = env.addr
    client, server = (a, cport, a, sport), (a, sport, a, cport)
    assert client in ends and server in ends, rows
    assert ends[client]["state"] == ends[server]["state"] == "ESTABLISHED", rows
    # One connection, both ends on the worker its flow hashes to.
    assert ends[client]["worker"] == ends[server]["worker"], rows


def test_loopback_same_process(env):
    app = env.app_py(SAME_PROCESS.format(size=SIZE), "lo1", extra=("--loopback",))
    _, sport, cport = env.wait_for_line("lo1", "ready", app, timeout=60).split()
    log = env.app_log("lo1").splitlines()
    assert "exchange True" in log, log
    # The app sees loopback names, as on Linux (the stack its own address).
    assert "bound 127.0.0.1 True" in log, log
    assert f"names 127.0.0.1 127.0.0.1 ('127.0.0.1', {sport}) ['127.0.0.1', '127.0.0.1']" \
        in log, log
    _both_ends(env, int(sport), int(cport))
    app.stdin.write(b"go\n")
    app.stdin.flush()
    assert app.wait(60) == 0, env.app_log("lo1")
    assert "again True" in env.app_log("lo1").splitlines()


def test_loopback_two_processes(env):
    srv = env.app_py(SERVER, "lo-srv", extra=("--loopback",))
    sport = int(env.wait_for_line("lo-srv", "ready", srv).split()[1])
    cli = env.app_py(CLIENT.format(port=sport, size=SIZE), "lo-cli", extra=("--loopback",))
    cport = int(env.wait_for_line("lo-cli", "ready", cli, timeout=60).split()[1])
    log = env.app_log("lo-cli").splitlines()
    assert "exchange True" in log, log
    assert f"names 127.0.0.1 ('127.0.0.1', {sport})" in log, log
    assert "names 127.0.0.1 127.0.0.1 127.0.0.1" in env.app_log("lo-srv").splitlines()
    _both_ends(env, sport, cport)
    cli.stdin.write(b"go\n")
    cli.stdin.flush()
    assert cli.wait(60) == 0, env.app_log("lo-cli")
    assert "again True" in env.app_log("lo-cli").splitlines()
    assert srv.wait(60) == 0, env.app_log("lo-srv")
    assert "server done" in env.app_log("lo-srv").splitlines()
