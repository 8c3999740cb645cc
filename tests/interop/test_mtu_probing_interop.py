"""PLPMTUD (RFC 4821) against a real black hole: `impair-bridge --mtu-blackhole`.

kernel server ns ── veth ── bridge ns (drops IPv4 packets over 1300 bytes, no
ICMP) ── veth ── the stack (`serve --packet --mtu-probing 1|2`).  A program
on the stack (`shardstack run`) sends 2 MiB to the kernel.  The interface MTU
is 1500, so the stack's full-size segments vanish: with tcp_mtu_probing = 1
it suspects a black hole after its RTOs, falls back to 1024 and probes up;
with 2 it starts at 1024 and probes up.  Either way every byte arrives and
the largest segment the kernel received (its tcpi_rcv_mss) is within the
probe threshold of what the hole lets through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from bridged_stack import require_root, start_bridge, start_serve, stop, stop_bridge

from shardstack import netns

pytestmark = pytest.mark.interop
PY = sys.executable
HOLE = 1300
KPORT = 5010
SIZE = 2 << 20

KSERVER = textwrap.dedent("""
    import hashlib, socket, struct, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("READY", flush=True)
    srv.settimeout(120)
    c, _ = srv.accept()
    c.settimeout(120)
    h, n = hashlib.sha256(), 0
    while b := c.recv(1 << 16):
        h.update(b); n += len(b)
    info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    rcv_mss = struct.unpack_from("I", info, 20)[0]  # tcpi_rcv_mss
    print("GOT", n, h.hexdigest(), rcv_mss, flush=True)
""")

SENDER = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
    s.sendall(bytes(range(256)) * (int(sys.argv[3]) // 256))
    s.close()
""")


@pytest.mark.parametrize("probing", [1, 2])
def test_stack_finds_the_path_mtu_through_a_black_hole(tmp_path: Path, probing: int) -> None:
    require_root()
    import hashlib
    want = hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()
    with netns.bridged_pair(prefix="ssmtu", server_addr=False) as pair:
        kaddr = str(pair.net.network_address + 1)
        saddr = str(pair.net.network_address + 2)
        run_dir = tempfile.mkdtemp(prefix="ssmtu-", dir="/tmp")
        os.rmdir(run_dir)
        log = open(tmp_path / "serve.log", "wb")
        serve = br = ksrv = sender = None
        try:
            serve = start_serve(pair, run_dir, log, tmp_path / "serve.log",
                                ["--addr", f"{saddr}/24", "--mtu-probing", str(probing)])
            br = start_bridge(pair, ["--mtu-blackhole", str(HOLE), "--delay-ms", "1"])
            ksrv = pair.client.popen([PY, "-c", KSERVER, kaddr, str(KPORT)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert ksrv.stdout.readline().startswith("READY")
            sender = pair.server.popen([PY, "-m", "shardstack", "run", "--run-dir", run_dir,
                                        "--", PY, "-c", SENDER, kaddr, str(KPORT), str(SIZE)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = ksrv.communicate(timeout=120)
            got = out.split("GOT", 1)[1].split()
            stats = json.loads(subprocess.run(
                [PY, "-m", "shardstack", "stats", "--json", "--run-dir", run_dir],
                capture_output=True, text=True, timeout=30, check=True).stdout)
        finally:
            stop(sender)
            stop(ksrv)
            bridge = stop_bridge(br)
            stop(serve)
            log.close()
    n, digest, rcv_mss = int(got[0]), got[1], int(got[2])
    assert n == SIZE and digest == want
    shard = [w["shard"] for w in stats["workers"]]
    assert bridge["b2a"]["blackholed"] > 0  # the hole was real: full-size segments died
    assert sum(s["tcp_mtup_success"] for s in shard) >= 1
    if probing == 1:
        assert sum(s["tcp_mtup_blackholes"] for s in shard) >= 1
    else:
        # Started at 1024 and probed up: only probes were too big, never an RTO's worth.
        assert sum(s["tcp_mtup_blackholes"] for s in shard) == 0
        assert bridge["b2a"]["blackholed"] == sum(s["tcp_mtup_fail"] for s in shard)
    # The largest segment the kernel received: within the probe threshold below the hole
    # (IP 20 + TCP 20 + timestamps 12 around the payload).
    assert HOLE - 8 - 52 <= rcv_mss <= HOLE - 52, rcv_mss
