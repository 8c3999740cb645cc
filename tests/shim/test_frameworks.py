"""Unmodified async servers and HTTP clients under `shardstack run` (issue 14).

One stack (`module_env`: `shardstack serve` on a TUN in a fresh namespace,
198.18.0.0/15) serves every test here in turn; each test stops its own
programs. Servers: uvicorn in its default configuration (uvloop and
httptools, as `--loop auto --http auto` pick them when installed),
hypercorn (asyncio worker, and uvloop worker with a Starlette app),
aiohttp on uvloop (`uvloop.install()`), anyio on uvloop, trio. Clients:
requests, httpx (sync, and async on uvloop), urllib3, aiohttp's on uvloop.

Each test proves the traffic went through the stack with the stack's own
counters (`shardstack stats`: the appgates' passive/active opens went up by
exactly the number of connections made), and for servers that the
namespace's kernel has no listener on the port. The apps report the
address they saw for their peer: the kernel's on the TUN for servers, the
stack's for clients (a kernel connection would show neither).
"""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.interop

N = 3  # connections per test
PEER_PORT = 9001

ASGI_APP = '''
import asyncio, os, sys

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    loop = type(asyncio.get_running_loop()).__module__
    impls = ",".join(sorted(m.rsplit(".", 1)[1] for m in sys.modules
                            if m.startswith("uvicorn.protocols.http.") and m.endswith("_impl")))
    body = f"client={scope['client'][0]} loop={loop} http={impls or '-'} pid={os.getpid()}\\n"
    body = body.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
'''

STARLETTE_APP = '''
import asyncio
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

async def home(request):
    loop = type(asyncio.get_running_loop()).__module__
    return PlainTextResponse(f"client={request.client.host} loop={loop}\\n",
                             headers={"connection": "close"})

app = Starlette(routes=[Route("/", home)])
'''

AIOHTTP_APP = '''
import asyncio, uvloop
from aiohttp import web

async def home(request):
    loop = type(asyncio.get_running_loop()).__module__
    return web.Response(text=f"client={request.remote} loop={loop}\\n",
                        headers={"connection": "close"})

uvloop.install()
app = web.Application()
app.router.add_get("/", home)
web.run_app(app, host="0.0.0.0", port={port}, print=lambda *a: print("listening", flush=True))
'''

ANYIO_APP = '''
import asyncio, anyio

async def handle(stream):
    async with stream:
        try:
            line = await stream.receive(100)
        except anyio.EndOfStream:
            return  # the readiness probe: connected and closed
        peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
        loop = type(asyncio.get_running_loop()).__module__
        await stream.send(f"client={peer[0]} loop={loop} got={line.decode().strip()}\\n".encode())

async def main():
    listener = await anyio.create_tcp_listener(local_host="0.0.0.0", local_port={port})
    print("listening", flush=True)
    await listener.serve(handle)

anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
'''

TRIO_APP = '''
import trio

async def handle(stream):
    line = await stream.receive_some(100)
    peer = stream.socket.getpeername()
    await stream.send_all(f"client={peer[0]} loop=trio got={line.decode().strip()}\\n".encode())
    await stream.aclose()

async def main():
    async with trio.open_nursery() as n:
        await n.start(trio.serve_tcp, handle, {port})
        print("listening", flush=True)

trio.run(main)
'''


def _fill(template: str, **values: object) -> str:
    """`{name}` placeholders filled (str.format would trip on the apps' own braces)."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", str(v))
    return template


def _write(env, name: str, code: str) -> None:
    (env.tmp / name).write_text(textwrap.dedent(code))


def _http_get_n(env, port: int) -> list[str]:
    """N GETs from the kernel side, each on its own connection."""
    out = env.kernel_py(f"""
        import http.client
        for _ in range({N}):
            c = http.client.HTTPConnection("{env.addr}", {port}, timeout=10)
            c.request("GET", "/")
            r = c.getresponse()
            assert r.status == 200, r.status
            print(r.read().decode().strip())
            c.close()
        """)
    return out.splitlines()


def _line_n(env, port: int) -> list[str]:
    """N one-line exchanges from the kernel side, each on its own connection."""
    out = env.kernel_py(f"""
        import socket
        for i in range({N}):
            with socket.create_connection(("{env.addr}", {port}), 10) as s:
                s.sendall(b"ping%d\\n" % i)
                data = b""
                while not data.endswith(b"\\n"):
                    chunk = s.recv(100)
                    assert chunk, data
                    data += chunk
                print(data.decode().strip())
        """)
    return out.splitlines()


def _serve_and_check(env, name: str, argv: list[str] | None, port: int, loop: str,
                     fetch=_http_get_n, script: str | None = None) -> list[str]:
    """Start a server app, make N connections to it, check the stack carried them."""
    if script is not None:
        name = "srv_" + name  # never a module name the script imports
        p = env.app_py(script, name)
    else:
        p = env.app(argv, name)
    env.wait_listening(port, name)
    assert env.kernel_listeners(port) == "", env.app_log(name)  # not on the kernel
    before = env.gate_counts()
    lines = fetch(env, port)
    after = env.gate_counts()
    assert after["passive_opens"] - before["passive_opens"] == N, (before, after)
    assert after["bytes_down"] > before["bytes_down"] and after["bytes_up"] > before["bytes_up"]
    assert len(lines) == N, lines
    for line in lines:
        assert f"client={env.peer} " in line, line  # the app saw the kernel's TCP address
        assert f"loop={loop}" in line, line
    assert p.poll() is None, env.app_log(name)
    assert "STRICT" not in env.app_log(name)
    return lines


# -- servers ---------------------------------------------------------------------


def test_uvicorn_default_config(shared_env):
    """`shardstack run -- python -m uvicorn app:app --host 0.0.0.0 --port P`, as
    issue 14 has it: uvicorn picks uvloop and httptools itself."""
    env = shared_env
    _write(env, "asgiapp.py", ASGI_APP)
    lines = _serve_and_check(env, "uvicorn", ["python", "-m", "uvicorn", "asgiapp:app",
                                              "--host", "0.0.0.0", "--port", "8101"],
                             8101, "uvloop")
    assert all("http=httptools" in line for line in lines), lines
    assert f"{env.peer}:" in env.app_log("uvicorn")  # the access log names the TCP peer


def test_uvicorn_workers_share_one_listener(shared_env):
    """`--workers 2`: the parent binds, two spawned children listen on the
    same socket (its fd, pickled): one accept queue for both, as on Linux."""
    env = shared_env
    _write(env, "asgiapp.py", ASGI_APP)
    lines = _serve_and_check(env, "uvicorn_w2", ["python", "-m", "uvicorn", "asgiapp:app",
                                                 "--host", "0.0.0.0", "--port", "8107",
                                                 "--workers", "2"], 8107, "uvloop")
    log = env.app_log("uvicorn_w2")
    children = {int(x.rsplit("[", 1)[1].rstrip("]")) for x in log.splitlines()
                if "Started server process" in x}
    assert len(children) == 2, log
    assert {int(x.rsplit("pid=", 1)[1]) for x in lines} <= children, (lines, log)


def test_hypercorn_asyncio(shared_env):
    env = shared_env
    _write(env, "asgiapp.py", ASGI_APP)
    _serve_and_check(env, "hypercorn", ["python", "-m", "hypercorn", "--bind", "0.0.0.0:8102",
                                        "asgiapp:app"], 8102, "asyncio")


def test_starlette_on_hypercorn_uvloop(shared_env):
    env = shared_env
    _write(env, "starapp.py", STARLETTE_APP)
    _serve_and_check(env, "starlette", ["python", "-m", "hypercorn", "--worker-class", "uvloop",
                                        "--bind", "0.0.0.0:8103", "starapp:app"], 8103, "uvloop")


def test_aiohttp_on_uvloop(shared_env):
    _serve_and_check(shared_env, "aiohttp", None, 8104, "uvloop",
                     script=_fill(AIOHTTP_APP, port=8104))


def test_anyio_on_uvloop(shared_env):
    _serve_and_check(shared_env, "anyio", None, 8105, "uvloop", fetch=_line_n,
                     script=_fill(ANYIO_APP, port=8105))


def test_trio(shared_env):
    _serve_and_check(shared_env, "trio", None, 8106, "trio", fetch=_line_n,
                     script=_fill(TRIO_APP, port=8106))


# -- clients ---------------------------------------------------------------------

KERNEL_HTTP = '''
import http.server

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"seen={self.client_address[0]} path={self.path}\\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("{peer}", {port}), H).serve_forever()
'''

CLIENTS = {
    "requests": '''
import requests
for i in range({n}):
    print(requests.get(f"{url}/requests{i}", timeout=10).text.strip())
''',
    "httpx": '''
import httpx
for i in range({n}):
    print(httpx.get(f"{url}/httpx{i}", timeout=10).text.strip())
''',
    "httpx_async_uvloop": '''
import asyncio, httpx, uvloop

async def main():
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    async with httpx.AsyncClient(timeout=10) as c:
        for i in range({n}):
            print((await c.get(f"{url}/httpx-async{i}")).text.strip())

uvloop.run(main())
''',
    "urllib3": '''
import urllib3
for i in range({n}):
    print(urllib3.request("GET", f"{url}/urllib3{i}", timeout=10).data.decode().strip())
''',
    "aiohttp_uvloop": '''
import asyncio, aiohttp, uvloop

async def main():
    async with aiohttp.ClientSession() as s:
        for i in range({n}):
            async with s.get(f"{url}/aiohttp{i}") as r:
                print((await r.text()).strip())

uvloop.run(main())
''',
}


@pytest.fixture(scope="module")
def kernel_http(module_env):
    """A kernel HTTP server on the peer address (HTTP/1.0: a connection per request)."""
    p = module_env.kernel_server(_fill(KERNEL_HTTP, peer=module_env.peer, port=PEER_PORT), PEER_PORT)
    module_env.procs.remove(p)  # outlives each test's stop_apps()
    yield module_env
    p.terminate()
    p.wait(10)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_http_clients(kernel_http, shared_env, client):
    env = shared_env
    code = _fill(CLIENTS[client], n=N, url=f"http://{env.peer}:{PEER_PORT}")
    before = env.gate_counts()
    name = "cli_" + client  # never a module name the script imports
    p = env.app_py(code, name)
    p.stdin.close()
    assert p.wait(60) == 0, env.app_log(name) + env.log()
    after = env.gate_counts()
    assert after["active_opens"] - before["active_opens"] == N, (before, after)
    lines = [x for x in env.app_log(name).splitlines() if x.startswith("seen=")]
    assert len(lines) == N, env.app_log(name)
    for line in lines:
        assert line.startswith(f"seen={env.addr} "), line  # the kernel saw the stack's address
    assert "STRICT" not in env.app_log(name)
