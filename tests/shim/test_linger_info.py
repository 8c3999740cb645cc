"""TCP_INFO and a lingering close() of a shim client against Linux peers.

The app (under `python -m shardstack.shim`) connects to kernel servers on the
TUN's far side. TCP_INFO reports the kernel's MSS, the initial window and
acknowledged bytes, as long as the kernel's own struct. SO_LINGER {1, 5}:
when close() returns, the kernel already holds the FIN (its socket is in
CLOSE-WAIT). SO_LINGER {1, 2} towards a peer whose ACKs nftables drops (in
the test's own namespace): close() returns after the linger time. Fixtures
are in conftest.py.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.interop

KERNEL = """
import socket, threading, time
def serve(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b:
                break
            if b.endswith(b"?"):
                c.sendall(b"!")
        time.sleep(3)  # stay in CLOSE-WAIT while the app looks
def listen(port):
    srv = socket.create_server(("{peer}", port))
    while True:  # the readiness probe connects too
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for p in (7320, 7321):
    threading.Thread(target=listen, args=(p,), daemon=True).start()
time.sleep(120)
"""

APP = """
import json, socket, struct, subprocess, time
from shardstack.core.tcp_info import unpack_tcp_info
from shardstack.shim.sock import kernel_socket
T, I = socket.IPPROTO_TCP, socket.TCP_INFO
out = {{}}
s = socket.create_connection(("{peer}", 7320), timeout=10)
out["sockname"] = s.getsockname()[0]
out["len"] = len(s.getsockopt(T, I, 1024))
out["klen"] = len(kernel_socket().getsockopt(T, I, 1024))  # a plain kernel TCP socket
i = unpack_tcp_info(s.getsockopt(T, I, 1024))
out["start"] = {{k: i[k] for k in ("state", "snd_mss", "snd_cwnd", "bytes_acked")}}
out["maxseg"] = s.getsockopt(T, socket.TCP_MAXSEG)
s.sendall(b"x" * 65535 + b"?")
assert s.recv(1) == b"!"
out["acked"] = unpack_tcp_info(s.getsockopt(T, I, 1024))["bytes_acked"]
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
s.sendall(b"y" * 100000)
lport = s.getsockname()[1]
s.close()
ss = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( sport = :7320 and dport = :{{lport}} )"],
                    capture_output=True, text=True).stdout
out["close_wait"] = len(ss.splitlines())

s = socket.create_connection(("{peer}", 7321), timeout=10)
for cmd in ("add table inet linger_t", "add chain inet linger_t out {{ type filter hook output priority 0; }}",
            "add rule inet linger_t out tcp sport 7321 drop"):
    subprocess.run(["nft", *cmd.split()], check=True)
s.sendall(b"z" * 1000)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2))
t = time.monotonic()
s.close()
out["blocked_close"] = time.monotonic() - t
subprocess.run(["nft", "delete", "table", "inet", "linger_t"], check=True)
print(json.dumps(out))
"""


def test_tcp_info_and_lingering_close_against_linux(env):
    env.kernel_server(KERNEL.format(peer=env.peer), 7320)
    env.wait_kernel_listening(env.peer, 7321)
    r = env.shim_py(APP.format(peer=env.peer))
    assert r.returncode == 0, r.stdout + r.stderr + env.log()
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sockname"] == env.addr  # on the stack, not the kernel
    assert out["len"] == out["klen"]
    assert out["start"] == {"state": 1, "snd_mss": out["maxseg"], "snd_cwnd": 10,
                            "bytes_acked": 1}
    assert out["maxseg"] == 1460 - 12  # the kernel's MSS on a 1500-byte link, less timestamps
    assert out["acked"] == 1 + 65536
    assert out["close_wait"] == 1  # the kernel had the FIN when close() returned
    assert 1.9 <= out["blocked_close"] < 10  # no ACK: close() gave up after ~2 s
