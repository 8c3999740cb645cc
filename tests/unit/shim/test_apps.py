"""Unmodified standard-library programs over the shim (two real shards, no root)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import urllib.request

import pytest
from stackpair import SERVER_IP, closed_port, listener


def test_asyncio_streams_server_and_client(stack):
    async def main():
        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(SERVER_IP, port), 5)
        assert writer.get_extra_info("peername") == (SERVER_IP, port)
        blob = os.urandom(1 << 20)
        writer.write(blob)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()

    assert asyncio.run(main())


def test_asyncio_refused_and_timeout(stack):
    async def main():
        port = closed_port()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection(SERVER_IP, port), 5)

    asyncio.run(main())


def test_selectors_echo_server(stack):
    srv = listener(backlog=16)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        sel = selectors.DefaultSelector()
        sel.register(srv, selectors.EVENT_READ)
        for _ in range(2000):
            if stop.is_set():
                break
            for key, _ in sel.select(0.05):
                if key.fileobj is srv:
                    c, _ = srv.accept()
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    data = key.fileobj.recv(65536)
                    if data:
                        key.fileobj.sendall(data)
                    else:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        sel.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    clients = [socket.create_connection((SERVER_IP, port), timeout=5) for _ in range(5)]
    for i, c in enumerate(clients):
        c.sendall(b"ping %d" % i)
    for i, c in enumerate(clients):
        assert c.recv(100) == b"ping %d" % i
        c.close()
    stop.set()
    t.join(10)
    srv.close()


def test_socketserver_threading_echo(stack):
    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    with socketserver.ThreadingTCPServer(("0.0.0.0", 0), Echo) as server:
        port = server.server_address[1]
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True)
        t.start()
        with socket.create_connection((SERVER_IP, port), timeout=5) as c:
            f = c.makefile("rwb")
            for word in (b"alpha\n", b"beta\n"):
                f.write(word)
                f.flush()
                assert f.readline() == word.upper()
            f.close()
        server.shutdown()
        t.join(10)


def test_http_server_and_urllib_with_sendfile(stack, tmp_path):
    blob = os.urandom(2 << 20)
    (tmp_path / "blob.bin").write_bytes(blob)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

        def copyfile(self, source, outputfile):
            self.connection.sendfile(source)  # os.sendfile on the unix fd

    with http.server.ThreadingHTTPServer(("0.0.0.0", 0), Quiet) as server:
        port = server.server_address[1]
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True)
        t.start()
        with urllib.request.urlopen(f"http://{SERVER_IP}:{port}/blob.bin", timeout=20) as r:
            body = r.read()
        server.shutdown()
        t.join(10)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(blob).hexdigest()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a cert")
def test_tls_over_the_shim(stack, tmp_path):
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=shardstack.test", "-keyout", key, "-out", crt],
                   check=True, capture_output=True, timeout=60)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    cctx = ssl.create_default_context(cafile=str(crt))
    srv = listener(backlog=4)
    port = srv.getsockname()[1]

    def serve():
        raw, _ = srv.accept()
        with sctx.wrap_socket(raw, server_side=True) as c:
            c.sendall(c.recv(100) + b" over tls")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with socket.create_connection((SERVER_IP, port), timeout=10) as raw:
        with cctx.wrap_socket(raw, server_hostname="shardstack.test") as c:
            assert c.getpeername() == (SERVER_IP, port)
            c.sendall(b"hello")
            assert c.recv(100) == b"hello over tls"
    t.join(10)
    srv.close()
