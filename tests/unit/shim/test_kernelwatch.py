"""Strict mode's watch for kernel TCP sockets in the stack's scope (shim/kernelwatch.py).

Real kernel sockets on loopback only (no root, no traffic off this machine);
the scope is a StackView made up for the test: with `loopback=True`
127.0.0.0/8 belongs to the stack, as under `shardstack run --loopback`.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys

import pytest
from shardstack.shim import kernelwatch, launcher, scope
from shardstack.shim.sock import kernel_socket

VIEW = scope.StackView(("198.18.0.2",), (), False, 1, False)
LOOPBACK_VIEW = scope.StackView(("198.18.0.2",), (), False, 1, True)


def _c_listener(host: str) -> int:
    """socket/bind/listen called from C (libc through ctypes), as libuv does:
    the shim never sees it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    assert fd >= 0
    sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_aton(host)
    sa += b"\0" * 8
    buf = ctypes.create_string_buffer(sa, len(sa))
    assert libc.bind(fd, buf, len(sa)) == 0, ctypes.get_errno()
    assert libc.listen(fd, 4) == 0, ctypes.get_errno()
    return fd


def test_c_listener_on_the_wildcard_is_a_leak():
    fd = _c_listener("0.0.0.0")
    try:
        leak, settled = kernelwatch.check_fd(fd, VIEW)
        assert settled and leak is not None
        assert leak.what == "listens on" and leak.addr[0] == "0.0.0.0" and leak.fd == fd
        assert f"listens on 0.0.0.0:{leak.addr[1]}" in kernelwatch.report(leak, "warn")
    finally:
        socket.close(fd)


def test_loopback_listener_is_the_kernels_unless_loopback_mode():
    fd = _c_listener("127.0.0.1")
    try:
        assert kernelwatch.check_fd(fd, VIEW) == (None, True)
        leak, _ = kernelwatch.check_fd(fd, LOOPBACK_VIEW)
        assert leak is not None and leak.addr[0] == "127.0.0.1"
    finally:
        socket.close(fd)


def test_connected_socket_in_scope_is_a_leak():
    srv = kernel_socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = kernel_socket()
    try:
        c.connect(srv.getsockname())
        assert kernelwatch.check_fd(c.fileno(), VIEW) == (None, True)  # loopback: kernel's
        leak, settled = kernelwatch.check_fd(c.fileno(), LOOPBACK_VIEW)
        assert settled and leak.what == "is connected to" and leak.addr == srv.getsockname()
    finally:
        c.close()
        srv.close()


def test_unconnected_udp_unix_and_v6only_are_not_leaks():
    u = kernel_socket()
    d = kernel_socket(socket.AF_INET, socket.SOCK_DGRAM)
    d.bind(("0.0.0.0", 0))
    x = kernel_socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert kernelwatch.check_fd(u.fileno(), VIEW) == (None, False)  # may connect later
        assert kernelwatch.check_fd(d.fileno(), VIEW) == (None, True)  # UDP: kernel only
        assert kernelwatch.check_fd(x.fileno(), VIEW) == (None, True)
    finally:
        for s in (u, d, x):
            s.close()
    if not socket.has_ipv6:
        return
    for v6only, leaks in ((1, False), (0, True)):
        s = kernel_socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            try:
                s.bind(("::", 0))
            except OSError:
                pytest.skip("no IPv6 here")
            s.listen(1)
            leak, _ = kernelwatch.check_fd(s.fileno(), VIEW)
            assert (leak is not None) == leaks  # `::` dual stack = the IPv4 wildcard too
        finally:
            s.close()


def test_watcher_scan_reports_once(capsys):
    w = kernelwatch.Watcher(60.0)
    w._view = VIEW
    fd = _c_listener("0.0.0.0")
    try:
        found = w.scan()
        assert [x.fd for x in found] == [fd]
        err = capsys.readouterr().err
        assert "STRICT" in err and "through the KERNEL" in err and "call path" in err
        assert w.scan() == []  # once per socket
    finally:
        socket.close(fd)


def test_exit_action_ends_the_process(tmp_path):
    code = f"""
import sys
sys.path[:0] = {sys.path!r}
from shardstack.shim import kernelwatch, scope
from test_kernelwatch import _c_listener
w = kernelwatch.Watcher(60.0, "exit")
w._view = scope.StackView(("198.18.0.2",), (), False, 1, False)
_c_listener("0.0.0.0")
w.scan()
print("not reached")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == kernelwatch.EXIT_STATUS, r.stdout + r.stderr
    assert "not reached" not in r.stdout and "ending pid" in r.stderr


def test_launcher_kernel_sockets_option():
    a = launcher.parse_args(["--kernel-sockets", "exit", "--", "python", "x.py"])
    assert a.kernel_sockets == "exit" and a.command == ["python", "x.py"]
    assert launcher.parse_args(["--kernel-sockets=warn", "x"]).kernel_sockets == "warn"
    assert launcher.parse_args(["x"]).kernel_sockets == "warn"
    with pytest.raises(ValueError):
        launcher.parse_args(["--kernel-sockets", "ignore", "x"])
    env = launcher.child_env("/r", False, base={}, kernel_sockets="exit")
    assert env[kernelwatch.ENV_ACTION] == "exit"


def test_ipv6_listener_is_a_leak_when_the_stack_has_ipv6():
    """With an IPv6 address on the stack, a kernel listener on `::` (even
    V6ONLY: the stack would have taken it) is a leak; ::1 is not."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    dual = scope.StackView(("198.18.0.2",), (), False, 1, False, addrs6=("2001:db8:5::2",))
    for host, v6only, leaks in (("::", 1, True), ("::", 0, True), ("::1", 0, False)):
        s = kernel_socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            try:
                s.bind((host, 0))
            except OSError:
                pytest.skip("no IPv6 here")
            s.listen(1)
            leak, settled = kernelwatch.check_fd(s.fileno(), dual)
            assert settled and (leak is not None) == leaks, (host, v6only)
        finally:
            s.close()
