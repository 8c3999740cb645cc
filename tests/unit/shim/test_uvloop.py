"""uvloop's host/port paths on the shim (shim/uvhook.py): two real shards, no root.

Before the hook, uvloop's create_server(host, port) bound its socket on the
stack but listened in C on the kernel (a random kernel port: "running", yet
unreachable), and create_connection(host, port) connected in C from the
kernel. Each test here checks on the stack itself (its `ss` table or the
names the shim reports) that the connection went through it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys

import pytest
from stackpair import SERVER_IP, closed_port

uvloop = pytest.importorskip("uvloop")


async def _echo(reader, writer):
    peer = writer.get_extra_info("peername")
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write(repr(peer).encode())
    writer.close()


def _opens(stack) -> tuple[int, int]:
    """(active, passive) opens the stack pair's appgates handed to apps: the
    stack's own count of connections that went through it."""
    return (sum(n.gate.stats.active_opens for n in stack.nodes),
            sum(n.gate.stats.passive_opens for n in stack.nodes))


@pytest.fixture
def uvstack(stack):
    """The stack, with uvloop patched: without the hook uvloop would connect to
    198.18.0.1 through the kernel, out of this machine. Never run like that."""
    from shardstack.shim import uvhook

    assert uvloop.Loop.create_connection is uvhook.create_connection
    assert uvloop.Loop.create_server is uvhook.create_server
    assert uvloop.Loop.create_datagram_endpoint is uvhook.create_datagram_endpoint
    return stack


async def _roundtrip(port: int, blob: bytes) -> tuple[bytes, object, object]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(SERVER_IP, port), 5)
    names = (writer.get_extra_info("peername"), writer.get_extra_info("sockname"))
    writer.write(blob)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return got, names[0], names[1]


def test_create_server_and_connection_on_uvloop(uvstack):
    async def main():
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        server = await asyncio.start_server(_echo, "0.0.0.0", 0)
        (lsock,) = server.sockets
        port = lsock.getsockname()[1]
        assert lsock.getsockname() == ("0.0.0.0", port)  # the TCP name, not the unix listener's
        blob = os.urandom(300_000)
        got, peer, local = await _roundtrip(port, blob)
        server.close()
        await server.wait_closed()
        return port, got, blob, peer, local

    before = _opens(uvstack)
    port, got, blob, peer, local = uvloop.run(main())
    assert _opens(uvstack) == (before[0] + 1, before[1] + 1)
    assert peer == (SERVER_IP, port)
    assert local[0] == "198.18.0.2" and local[1] > 0  # the client's stack address
    assert got[:len(blob)] == blob
    # The server saw the client's TCP name, not a unix address.
    assert got[len(blob):] == repr(local).encode()


def test_server_close_gives_the_port_back(uvstack):
    async def main():
        server = await asyncio.start_server(_echo, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        again = await asyncio.start_server(_echo, "0.0.0.0", port)  # EADDRINUSE if not released
        got, _, _ = await _roundtrip(port, b"x")
        again.close()
        await again.wait_closed()
        return got

    assert uvloop.run(main()).startswith(b"x")


def test_refused_on_uvloop(uvstack):
    async def main():
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection(SERVER_IP, closed_port()), 5)

    uvloop.run(main())


def test_every_way_to_get_a_uvloop_loop(uvstack):
    """install()'s policy, new_event_loop(), a Runner's loop_factory: all patched."""

    async def main():
        server = await asyncio.start_server(_echo, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        got, peer, _ = await _roundtrip(port, b"abc")
        server.close()
        await server.wait_closed()
        return type(asyncio.get_running_loop()).__module__, peer, got[:3]

    results = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        results.append(r.run(main()))
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        results.append(asyncio.run(main()))
    finally:
        asyncio.set_event_loop_policy(old)
    loop = uvloop.new_event_loop()
    try:
        results.append(loop.run_until_complete(main()))
    finally:
        loop.close()
    for mod, peer, got in results:
        assert mod.startswith("uvloop") and peer[0] == SERVER_IP and got == b"abc"


def test_several_hosts_stack_and_kernel(uvstack):
    """A host list: one listener on the stack, one on kernel loopback, one server object."""

    async def main():
        server = await asyncio.start_server(_echo, ["0.0.0.0", "127.0.0.1"], 0)
        names = sorted(s.getsockname() for s in server.sockets)
        got, _, _ = await _roundtrip(names[0][1], b"stack")
        # The loopback one is a kernel socket (no --loopback): so is this client.
        r, w = await asyncio.open_connection("127.0.0.1", names[1][1])
        w.write(b"kernel")
        w.write_eof()
        got2 = await asyncio.wait_for(r.read(), 5)
        w.close()
        server.close()
        await server.wait_closed()
        return names, got, got2

    before = _opens(uvstack)
    names, got, got2 = uvloop.run(main())
    assert _opens(uvstack) == (before[0] + 1, before[1] + 1)  # only the stack's connection
    assert [n[0] for n in names] == ["0.0.0.0", "127.0.0.1"]
    assert got.startswith(b"stack") and got2.startswith(b"kernel")


def test_tls_client_and_server_on_uvloop(uvstack, tmp_path):
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=shardstack.test", "-keyout", key, "-out", crt],
                   check=True, capture_output=True, timeout=60)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    cctx = ssl.create_default_context(cafile=str(crt))

    async def main():
        server = await asyncio.start_server(_echo, "0.0.0.0", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.wait_for(asyncio.open_connection(
            SERVER_IP, port, ssl=cctx, server_hostname="shardstack.test"), 10)
        peer = w.get_extra_info("peername")
        w.write(b"secret")
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(6), 10)
        w.close()
        # start_tls on a plain connection (the TransportView is unwrapped for uvloop).
        r2, w2 = await asyncio.open_connection(SERVER_IP, port)
        await w2.start_tls(cctx, server_hostname="shardstack.test")
        w2.write(b"late")
        got2 = await asyncio.wait_for(r2.readexactly(4), 10)
        w2.close()
        server.close()
        await server.wait_closed()
        return peer, port, got, got2

    peer, port, got, got2 = uvloop.run(main())
    assert peer == (SERVER_IP, port) and got == b"secret" and got2 == b"late"


def test_socket_extra_shows_tcp(uvstack):
    """uvicorn and aiohttp read names and set TCP_NODELAY on get_extra_info('socket')."""

    async def main():
        seen = []

        async def handle(reader, writer):
            s = writer.get_extra_info("socket")
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            seen.append((s.family, s.getpeername(), s.getsockname(),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            writer.close()

        server = await asyncio.start_server(handle, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection(SERVER_IP, port)
        await asyncio.wait_for(r.read(), 5)
        local = w.get_extra_info("sockname")
        w.close()
        server.close()
        await server.wait_closed()
        return seen, port, local

    seen, port, local = uvloop.run(main())
    family, peer, sockname, nodelay = seen[0]
    assert family == socket.AF_INET and peer == local and sockname == (SERVER_IP, port)
    assert nodelay == 1


def test_hook_patches_uvloop_imported_after_install(tmp_path):
    """The import hook: `import uvloop` after install() finds Loop patched; and
    uvloop imported first is patched by install() itself."""
    code = """
import sys, shardstack.shim as shim
{first}
shim.install({run_dir!r})
import uvloop
from shardstack.shim import uvhook
print(uvloop.Loop.create_server is uvhook.create_server,
      uvloop.Loop.create_connection is uvhook.create_connection)
"""
    for first in ("", "import uvloop"):
        r = subprocess.run([sys.executable, "-c", code.format(first=first, run_dir=str(tmp_path))],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.split() == ["True", "True"], r.stderr


def test_kernel_only_paths_untouched(uvstack):
    """Without the shim installed, and for AF_UNIX, uvloop runs its own code."""

    async def main():
        path = str(uvstack.run_dir / "u.sock")
        server = await asyncio.start_unix_server(_echo, path)
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"unix")
        w.write_eof()
        got = await asyncio.wait_for(r.read(), 5)
        w.close()
        server.close()
        await server.wait_closed()
        return got

    assert uvloop.run(main()).startswith(b"unix")


def test_sock_given_listening_bound_and_connected(uvstack):
    """sock= with a shim socket: listening already (socket.create_server), only
    bound (hypercorn, uvicorn --workers), or connected (aiohttp's client)."""

    async def main():
        loop = asyncio.get_running_loop()
        listening = socket.create_server(("0.0.0.0", 0))
        bound = socket.socket()
        bound.bind(("0.0.0.0", 0))
        servers = [await asyncio.start_server(_echo, sock=listening),
                   await asyncio.start_server(_echo, sock=bound)]
        out = []
        for srv in servers:
            port = srv.sockets[0].getsockname()[1]
            c = socket.socket()
            c.setblocking(False)
            await loop.sock_connect(c, (SERVER_IP, port))
            r, w = await asyncio.open_connection(sock=c)
            w.write(b"given")
            w.write_eof()
            out.append((await asyncio.wait_for(r.read(), 5), w.get_extra_info("peername"), port))
            w.close()
            srv.close()
            await srv.wait_closed()
        return out

    before = _opens(uvstack)
    out = uvloop.run(main())
    assert _opens(uvstack) == (before[0] + 2, before[1] + 2)
    for got, peer, port in out:
        assert got.startswith(b"given") and peer == (SERVER_IP, port)
