"""The shim's pure parts: connection names, gate framing, scope, launcher arguments."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys

import pytest
from shardstack.shim import gateproto as gp
from shardstack.shim import launcher, scope
from shardstack.shim.sock import _parse_inet, _wire_value

# -- connection names -----------------------------------------------------------


def test_conn_name_round_trip_and_fits_sun_path():
    n = gp.ConnName(31, 2**40, "198.18.255.254", 65535, "255.255.255.255", 1)
    raw = gp.encode_conn_name(n)
    assert raw.startswith(b"\0")  # abstract namespace: nothing on disk
    assert len(raw) < 108
    assert gp.decode_conn_name(raw) == n


def test_conn_name_survives_the_kernel():
    """What getpeername() hands back for the abstract name decodes again."""
    n = gp.ConnName(1, 7, "198.18.0.1", 80, "198.18.0.2", 40000)
    w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(b"\0shardstack-test-%d" % os.getpid())
    srv.listen(1)
    try:
        w.bind(gp.encode_conn_name(n))
        w.connect(srv.getsockname())
        a, peer = srv.accept()
        assert gp.decode_conn_name(a.getpeername()) == n
        assert gp.decode_conn_name(peer) == n
        a.close()
    finally:
        w.close()
        srv.close()


@pytest.mark.parametrize("raw", [
    b"/run/shardstack/worker-0.sock", b"\0shardstack/c/", b"\0shardstack/c/1/2/3",
    b"\0shardstack/c/x/1/1.2.3.4:5/1.2.3.4:6", b"\0shardstack/c/1/1/1.2.3.4:70000/1.2.3.4:6",
    b"\0shardstack/c/1/1/1.2.3:5/1.2.3.4:6", b"\0shardstack/c/1/1/1.2.3.4:5/\xff:6", "",
])
def test_conn_name_rejects_anything_else(raw):
    with pytest.raises(gp.ProtoError):
        gp.decode_conn_name(raw)


# -- framing --------------------------------------------------------------------


def test_frames_split_anywhere():
    msgs = [{"op": "connect", "addr": "198.18.0.1", "port": 80}, {"ok": True, "laddr": "x"}]
    wire = b"".join(gp.pack(m) for m in msgs)
    for cut in range(len(wire) + 1):
        buf = bytearray(wire[:cut])
        got = gp.unpack_frames(buf)
        buf += wire[cut:]
        got += gp.unpack_frames(buf)
        assert got == msgs and not buf


@pytest.mark.parametrize("bad", [
    gp.HEADER.pack(3) + b"\x93\x01\x02",  # a list, not a map
    gp.HEADER.pack(1) + b"\xc1",  # never-used msgpack byte
    gp.HEADER.pack(gp.MAX_MESSAGE + 1),
])
def test_frames_reject_garbage(bad):
    with pytest.raises(gp.ProtoError):
        gp.unpack_frames(bytearray(bad))


# -- scope ----------------------------------------------------------------------

VIEW = scope.StackView.from_hello({"addrs": ["198.18.0.2/24"], "workers": 2})
FLAT = scope.StackView.from_hello({"addrs": ["198.18.0.2"], "workers": 1})
GW = scope.StackView.from_hello({"addrs": ["198.18.0.2/24"], "gateway": True})


def test_hello_parsing():
    assert VIEW.addrs == ("198.18.0.2",)
    assert VIEW.nets == (ipaddress.IPv4Network("198.18.0.0/24"),)
    assert VIEW.workers == 2 and FLAT.nets == ()
    v = scope.StackView.from_hello({"addrs": ["198.18.0.2"], "nets": ["198.19.0.0/16"]})
    assert v.nets == (ipaddress.IPv4Network("198.19.0.0/16"),)


@pytest.mark.parametrize("host,view,expect", [
    ("", VIEW, (scope.STACK, "0.0.0.0")),
    ("0.0.0.0", VIEW, (scope.STACK, "0.0.0.0")),
    ("198.18.0.2", VIEW, (scope.STACK, "198.18.0.2")),
    ("198.18.0.9", VIEW, (scope.KERNEL, "198.18.0.9")),  # not ours: the kernel says EADDRNOTAVAIL
    ("127.0.0.1", VIEW, (scope.KERNEL, "127.0.0.1")),
    ("localhost", VIEW, (scope.KERNEL, "localhost")),
    ("0.0.0.0", None, (scope.KERNEL, "0.0.0.0")),  # no stack running: all kernel
])
def test_bind_scope(host, view, expect):
    assert scope.bind_scope(host, view) == expect


def test_bind_scope_loopback_mode_maps_to_primary():
    v = scope.StackView.from_hello({"addrs": ["198.18.0.2/24"]}, loopback=True)
    assert scope.bind_scope("127.0.0.1", v) == (scope.STACK, "198.18.0.2")
    assert scope.connect_scope("127.0.0.5", v) == (scope.STACK, "198.18.0.2")


@pytest.mark.parametrize("host,view,expect", [
    ("198.18.0.1", VIEW, scope.STACK),  # on the stack's network
    ("198.18.1.1", VIEW, scope.KERNEL),  # off it, no gateway
    ("198.18.1.1", GW, scope.STACK),  # the stack routes everywhere
    ("198.19.3.3", FLAT, scope.STACK),  # no networks announced: all but loopback
    ("127.0.0.1", FLAT, scope.KERNEL),
    ("127.0.0.1", GW, scope.KERNEL),
    ("224.0.0.1", GW, scope.KERNEL),
    ("0.0.0.0", GW, scope.KERNEL),
    ("198.18.0.2", VIEW, scope.STACK),  # its own address
    ("not-an-ip", VIEW, scope.KERNEL),
    ("198.18.0.1", None, scope.KERNEL),
])
def test_connect_scope(host, view, expect):
    assert scope.connect_scope(host, view)[0] == expect


def test_connect_scope_bound_socket_stays_on_stack():
    assert scope.connect_scope("198.18.1.1", VIEW, bound_on_stack=True) == (scope.STACK,
                                                                             "198.18.1.1")


def test_pick_worker_spreads_and_stays_in_range():
    v = scope.StackView.from_hello({"addrs": ["198.18.0.2"], "workers": 3})
    seen = {scope.pick_worker(v, 1234, i) for i in range(10)}
    assert seen == {0, 1, 2}


# -- address/option arguments ---------------------------------------------------


@pytest.mark.parametrize("addr,expect", [
    (("198.18.0.1", 80), ("198.18.0.1", 80)),
    ((b"198.18.0.1", 80), ("198.18.0.1", 80)),
    (("", 0), ("", 0)),
    (("198.18.0.1", 70000), None),  # let the kernel method raise OverflowError
    (("198.18.0.1",), None),
    ("198.18.0.1:80", None),
    ((80, "198.18.0.1"), None),
    (("<broadcast>", 1), None),
])
def test_parse_inet(addr, expect):
    assert _parse_inet(addr) == expect


def test_parse_inet_matches_kernel_errors_for_bad_tuples():
    """A malformed address must fail exactly as the kernel socket's method does."""
    with socket.socket() as s:
        with pytest.raises(TypeError):
            s.connect("198.18.0.1:80")
        with pytest.raises(OverflowError):
            s.connect(("198.18.0.1", 70000))


def test_wire_value_linger():
    raw = socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    assert _wire_value(socket.SO_LINGER, raw) == [0, 0]
    import struct

    assert _wire_value(socket.SO_LINGER, struct.pack("ii", 1, 0)) == [1, 0]
    assert _wire_value(socket.TCP_NODELAY, 1) == 1


# -- launcher -------------------------------------------------------------------


def test_launcher_args():
    a = launcher.parse_args(["--run-dir", "/r", "--loopback", "--", "python", "-m", "x"])
    assert (a.run_dir, a.loopback, a.command) == ("/r", True, ["python", "-m", "x"])
    a = launcher.parse_args(["--run-dir=/r", "python", "app.py", "--run-dir", "y"])
    assert a.run_dir == "/r" and a.command == ["python", "app.py", "--run-dir", "y"]
    a = launcher.parse_args(["-m", "http.server", "8000"], in_process=True)
    assert (a.module, a.command) == ("http.server", ["8000"])
    a = launcher.parse_args(["--no-check", "app.py", "-m"], in_process=True)
    assert (a.module, a.command, a.check) == (None, ["app.py", "-m"], False)


@pytest.mark.parametrize("argv", [[], ["--run-dir"], ["--bogus", "x"], ["--"]])
def test_launcher_bad_args(argv):
    with pytest.raises(ValueError):
        launcher.parse_args(argv)


def test_launcher_env_and_command():
    env = launcher.child_env("/r", True, {"PYTHONPATH": "/a:/b", "HOME": "/h"})
    assert env["SHARDSTACK_SHIM"] == "1" and env["SHARDSTACK_RUN_DIR"] == "/r"
    assert env["SHARDSTACK_SHIM_LOOPBACK"] == "1" and env["HOME"] == "/h"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(launcher.BOOT_DIR), "/a", "/b"]
    again = launcher.child_env("/r", False, env)
    assert again["PYTHONPATH"] == env["PYTHONPATH"] and "SHARDSTACK_SHIM_LOOPBACK" not in again
    assert (launcher.BOOT_DIR / "sitecustomize.py").is_file()
    assert launcher.resolve_command(["python3", "a.py"]) == [sys.executable, "a.py"]
    assert launcher.resolve_command(["python3.11"]) == [sys.executable]
    assert launcher.resolve_command(["/usr/bin/python3", "x"]) == ["/usr/bin/python3", "x"]
    assert launcher.resolve_command(["curl", "x"]) == ["curl", "x"]


def test_launcher_reports_missing_stack(tmp_path, capsys):
    assert launcher.main(["--run-dir", str(tmp_path), "true"]) == 1
    assert "no shardstack running" in capsys.readouterr().err
    assert launcher.main(["--bogus"]) == 2


def test_errno_table_is_small_enough_for_one_oob_byte():
    assert all(0 < e < 256 for e in gp.CONN_ERRNOS)
    assert errno.ECONNREFUSED in gp.CONN_ERRNOS


# -- no stack answering -----------------------------------------------------------


@pytest.fixture
def no_stack(tmp_path):
    import shardstack.shim as shim
    from shardstack.shim.stack import set_stack

    def make(strict):
        return shim.install(str(tmp_path / "nothing-here"), strict=strict)

    yield make
    shim.uninstall()
    set_stack(None)


def test_without_a_stack_sockets_stay_on_the_kernel(no_stack):
    no_stack(False)
    s = socket.socket()
    s.bind(("0.0.0.0", 0))  # a kernel bind: the kernel's own answer
    assert s.getsockname()[1] != 0 and s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == 2
    s.close()


def test_strict_mode_never_falls_back(no_stack):
    no_stack(True)
    s = socket.socket()
    with pytest.raises(OSError) as ei:
        s.connect(("198.18.0.1", 80))  # fails before any packet could leave
    assert ei.value.errno == errno.ENETUNREACH
    with pytest.raises(OSError) as ei:
        s.bind(("0.0.0.0", 0))
    assert ei.value.errno == errno.ENETUNREACH
    s.bind(("127.0.0.1", 0))  # loopback stays the kernel's
    s.close()


DUAL = scope.StackView.from_hello({"addrs": ["198.18.0.2/24", "2001:db8:5::2/64"], "workers": 2})


def test_hello_with_ipv6():
    assert DUAL.addrs == ("198.18.0.2",) and DUAL.addrs6 == ("2001:db8:5::2",)
    assert DUAL.nets6 == (ipaddress.IPv6Network("2001:db8:5::/64"),)
    assert DUAL.primary == "198.18.0.2" and DUAL.primary6 == "2001:db8:5::2"


@pytest.mark.parametrize("host, view, expect", [
    ("::", DUAL, (scope.STACK, "::")),
    ("2001:db8:5::2", DUAL, (scope.STACK, "2001:db8:5::2")),
    ("2001:DB8:5:0::2", DUAL, (scope.STACK, "2001:db8:5::2")),  # normalised
    ("2001:db8:5::9", DUAL, (scope.KERNEL, "2001:db8:5::9")),  # not ours
    ("::1", DUAL, (scope.KERNEL, "::1")),
    ("::", VIEW, (scope.KERNEL, "::")),  # no IPv6 on the stack
])
def test_bind_scope_ipv6(host, view, expect):
    assert scope.bind_scope(host, view) == expect


@pytest.mark.parametrize("host, expect", [
    ("2001:db8:5::1", scope.STACK),  # inside the stack's prefix
    ("2001:db8:6::1", scope.KERNEL),  # outside: no IPv6 gateway
    ("fe80::1", scope.KERNEL),
    ("ff02::1", scope.KERNEL),
    ("::1", scope.KERNEL),
])
def test_connect_scope_ipv6(host, expect):
    assert scope.connect_scope(host, DUAL)[0] == expect
    assert scope.connect_scope(host, VIEW)[0] == scope.KERNEL  # a stack without IPv6


def test_ipv6_parse_and_face():
    from shardstack.shim.sock import AF_INET6, _face, _parse_addr

    assert _parse_addr(AF_INET6, ("::", 80), v6=True) == ("::", 80)
    assert _parse_addr(AF_INET6, ("::", 80)) == ("0.0.0.0", 80)  # the IPv4 half only
    assert _parse_addr(AF_INET6, ("::", 80), v6only=True) is None
    assert _parse_addr(AF_INET6, ("2001:db8:5::2", 80, 0, 0), v6=True) == ("2001:db8:5::2", 80)
    assert _parse_addr(AF_INET6, ("2001:db8:5::2", 80)) is None
    assert _parse_addr(AF_INET6, ("::ffff:198.18.0.2", 80), v6=True) == ("198.18.0.2", 80)
    assert _parse_addr(AF_INET6, ("::ffff:198.18.0.2", 80), v6=True, v6only=True) is None
    assert _face(AF_INET6, "2001:db8:5::1", 5) == ("2001:db8:5::1", 5, 0, 0)
    assert _face(AF_INET6, "198.18.0.1", 5) == ("::ffff:198.18.0.1", 5, 0, 0)
    assert _face(AF_INET6, "::ffff:198.18.0.1", 5) == ("::ffff:198.18.0.1", 5, 0, 0)


def test_ipv6_conn_names_and_addresses():
    n = gp.ConnName(1, 77, "2001:db8:5::2", 8000, "::ffff:198.18.0.1", 40000)
    raw = gp.encode_conn_name(n)
    assert len(raw) < 108 and gp.decode_conn_name(raw) == n
    assert gp.ip_int("2001:db8:5::2") == 0x20010DB8000500000000000000000002
    assert gp.ip_str(0xFFFF_C6120001) == "::ffff:198.18.0.1"  # as inet_ntop spells it
    assert gp.ip_str(0, v6=True) == "::" and gp.ip_str(0) == "0.0.0.0"
    assert gp.parse_listener_path("/r/l/" + gp.listener_file(3, "::", 8000)) == (3, "::", 8000)


def test_read_frame_never_reads_past_its_frame():
    """A connect's reply and the connection's first bytes can arrive together
    (a fast peer, a slow app): read_frame takes the reply and leaves the data
    on the socket for the app (it once read 64 KiB and raised ProtoError on
    the data, or dropped it)."""
    from shardstack.shim.stack import read_frame

    a, b = socket.socketpair()
    try:
        data = os.urandom(5000)
        b.sendall(gp.pack({"ok": True, "lport": 5}) + data)
        assert read_frame(a, bytearray()) == {"ok": True, "lport": 5}
        got = b""
        a.settimeout(5)
        while len(got) < len(data):
            got += a.recv(65536)
        assert got == data
    finally:
        a.close()
        b.close()


def test_kernel_udp_sendmsg_keeps_its_ancillary_data():
    """A UDP socket the stack does not take (no stack here) sends with
    sendmsg through the kernel with its control messages (IPV6_PKTINFO,
    IP_PKTINFO...), not joined into a sendto that drops them."""
    from shardstack.shim.sock import ShimSocket

    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s = ShimSocket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r.bind(("127.0.0.1", 0))
        r.settimeout(5)
        pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton("127.0.0.1"), bytes(4))
        anc = [(socket.IPPROTO_IP, 8, pktinfo)]  # IP_PKTINFO (Linux)
        calls = []
        orig = ShimSocket.sendto
        ShimSocket.sendto = lambda self, *a: calls.append(a) or orig(self, *a)
        try:
            assert s.sendmsg([b"ab", b"c"], anc, 0, r.getsockname()) == 3
        finally:
            ShimSocket.sendto = orig
        assert r.recv(10) == b"abc" and calls == []
    finally:
        r.close()
        s.close()
