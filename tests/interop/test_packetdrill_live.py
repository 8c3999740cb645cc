"""`shardstack packetdrill --live`: scripts against a real stack on TUN, through the shim.

The runner makes its own namespace (198.18.0.0/15), starts `shardstack serve`
in it, and runs each script's calls through shim sockets in real time.  A
right script passes; the same script expecting another window or errno fails
at that line: the live path sees what the stack really sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.interop

# Generous tolerance: the user-space stack answers in milliseconds and CI is loaded.
HANDSHAKE = """\
--tolerance_usecs=200000
0   socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
+0  setsockopt(3, SOL_SOCKET, SO_REUSEADDR, [1], 4) = 0
+0  bind(3, ..., ...) = 0
+0  listen(3, 1) = 0
+0  < S 0:0(0) win 65535 <mss 1000,sackOK,nop,nop,nop,wscale 7>
+0  > S. 0:0(0) ack 1 <mss 1460,nop,nop,sackOK,nop,wscale 7>
+.1 < . 1:1(0) ack 1 win 514
+0  accept(3, ..., ...) = 4
+0  write(4, ..., 100) = 100
+0  > P. 1:101(100) ack 1
+.1 < P. 1:11(10) ack 101 win 514
+0  > . 101:101(0) ack 11
+0  read(4, ..., 1000) = 10
+0  close(4) = 0
+0  > F. 101:101(0) ack 11
"""


def _run(tmp_path, name: str, text: str) -> dict:
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, TUN)")
    path = tmp_path / name
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "shardstack", "packetdrill", "--live", "--json",
                          str(path)], capture_output=True, text=True, timeout=120)
    rows = json.loads(out.stdout)
    assert len(rows) == 1, out.stderr
    return rows[0] | {"rc": out.returncode}


def test_live_handshake_data_and_close_pass(tmp_path):
    r = _run(tmp_path, "ok.pkt", HANDSHAKE)
    assert (r["status"], r["rc"]) == ("pass", 0), r


def test_live_wrong_window_fails_with_actual_packet(tmp_path):
    r = _run(tmp_path, "win.pkt", HANDSHAKE.replace("+0  > S. 0:0(0) ack 1 <",
                                                     "+0  > S. 0:0(0) ack 1 win 1000 <"))
    assert (r["status"], r["line"], r["rc"]) == ("fail", 7, 1), r
    assert "window 1000 vs 64240" in r["reason"]  # Linux's SYN-ACK window at MSS 1460


def test_live_wrong_errno_fails(tmp_path):
    r = _run(tmp_path, "errno.pkt", HANDSHAKE.replace(
        "+0  read(4, ..., 1000) = 10", "+0  read(4, ..., 1000) = -1 EAGAIN (x)"))
    assert r["status"] == "fail" and r["line"] == 14, r
    assert "returned 10; expected -1 EAGAIN" in r["reason"]
