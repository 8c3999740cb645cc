"""Strict mode catches TCP sockets that C code opens on the kernel (shim/kernelwatch.py).

Under `shardstack run`, a program calls socket/bind/listen and
socket/connect through libc (ctypes), as libuv or a C extension would: the
shim's `socket.socket` never sees them. The launcher's watcher must say so
loudly, with the address and the call path, or, with `--kernel-sockets
exit`, end the program. A loopback listener made the same way is the
kernel's by the scope rules and stays unreported.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.interop

KERNEL_PORT = 9201

C_SOCKETS = '''
import ctypes, socket, struct, sys, time

libc = ctypes.CDLL(None, use_errno=True)

def sockaddr(host, port):
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
    raw += socket.inet_aton(host) + b"\\0" * 8
    return ctypes.create_string_buffer(raw, len(raw)), len(raw)

def c_listen(host, port):
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    buf, n = sockaddr(host, port)
    assert libc.bind(fd, buf, n) == 0, ctypes.get_errno()
    assert libc.listen(fd, 4) == 0, ctypes.get_errno()
    return fd

def c_connect(host, port):
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    buf, n = sockaddr(host, port)
    assert libc.connect(fd, buf, n) == 0, ctypes.get_errno()
    return fd

def serve_in_c():
    c_listen("127.0.0.1", 8202)  # loopback: the kernel's, no report
    c_listen("0.0.0.0", 8201)
    c_connect("{peer}", {kport})
    print("ready", flush=True)
    time.sleep(6)
    print("still running", flush=True)

serve_in_c()
'''

KERNEL_SERVER = '''
import socket, time
s = socket.create_server(("{peer}", {kport}))
conns = []
end = time.monotonic() + 60
s.settimeout(1)
while time.monotonic() < end:
    try:
        conns.append(s.accept()[0])
    except OSError:
        pass
'''


@pytest.fixture(scope="module")
def kernel_peer(module_env):
    p = module_env.kernel_server(KERNEL_SERVER.format(peer=module_env.peer, kport=KERNEL_PORT),
                                 KERNEL_PORT)
    module_env.procs.remove(p)  # outlives each test's stop_apps()
    yield module_env
    p.terminate()
    p.wait(10)


def _app(env) -> str:
    return C_SOCKETS.replace("{peer}", env.peer).replace("{kport}", str(KERNEL_PORT))


def test_c_sockets_are_reported_loudly(kernel_peer, shared_env):
    env = shared_env
    p = env.app_py(_app(env), "c_warn")
    env.wait_for_line("c_warn", "ready", p)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and env.app_log("c_warn").count("STRICT") < 2:
        time.sleep(0.1)
    log = env.app_log("c_warn")
    assert "STRICT" in log and "listens on 0.0.0.0:8201 through the KERNEL" in log, log
    assert f"is connected to {env.peer}:{KERNEL_PORT}" in log, log
    assert "127.0.0.1:8202" not in log, log  # loopback is the kernel's without --loopback
    assert log.count("STRICT") == 2, log  # once per socket
    # The call path names the code that drove the C calls.
    assert "c_warn.py" in log and "serve_in_c" in log, log
    env.wait_for_line("c_warn", "still running", p, timeout=15)  # warn: it goes on


def test_kernel_sockets_exit_refuses(kernel_peer, shared_env):
    env = shared_env
    p = env.app_py(_app(env), "c_exit", extra=("--kernel-sockets", "exit"))
    assert p.wait(15) == 3, env.app_log("c_exit")
    log = env.app_log("c_exit")
    assert "STRICT" in log and "ending pid" in log and "still running" not in log, log
