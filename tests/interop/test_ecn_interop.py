"""ECN (RFC 3168) between the stack and the Linux kernel, through `impair-bridge --ce`.

kernel client ns (net.ipv4.tcp_ecn=1, CUBIC) ── veth ── bridge ns (marks ECT
packets CE, both ways, no loss) ── veth ── the stack (`serve --packet --ecn 1`).
A sniffer on the client's veth records every TCP header and ECN field as the
kernel sends and receives them, so the test reads the protocol off the wire:

* passive: the kernel's SYN asks (ECE|CWR), the stack's SYN-ACK accepts (ECE);
  kernel -> stack bulk data goes ECT(0), the stack echoes the bridge's CE
  marks with ECE, the kernel answers with CWR and counts TCPDeliveredCE;
* the stack as sender (its echo service sending back): its data is ECT(0),
  marks come back as ECE from the kernel, the stack sends CWR, enters CWR
  (ssthresh appears in `shardstack ss -i`) and counts delivered_ce, with no
  retransmission at all: it backed off without a loss;
* active: a program on the stack (`shardstack run`) connects out to a kernel
  server; the stack's SYN asks, the kernel's SYN-ACK accepts, and the kernel's
  TCP_INFO says ECN is on and ECT data arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from bridged_stack import require_root, start_bridge, start_serve, stop, stop_bridge

from shardstack import netns

pytestmark = pytest.mark.interop
PY = sys.executable
ECHO, DISCARD, KPORT = 7, 9, 5009
ECE, CWR, SYN, ACK = 0x40, 0x80, 0x02, 0x10
TCPI_OPT_ECN, TCPI_OPT_ECN_SEEN = 8, 16

SNIFF = textwrap.dedent("""
    import json, signal, socket, struct, sys
    dev, me = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((dev, 0))
    s.settimeout(0.2)
    me = socket.inet_aton(me)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    rows = []
    print("READY", flush=True)
    while not stop:
        try:
            f = s.recv(70000)
        except socket.timeout:
            continue
        if len(f) < 54 or f[12:14] != b"\\x08\\x00" or f[23] != 6:
            continue
        ip = f[14:]
        hl = (ip[0] & 15) * 4
        tot = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[hl:]
        thl = (tcp[12] >> 4) * 4
        out = ip[12:16] == me
        sport, dport = struct.unpack_from("!HH", tcp, 0)
        rows.append([int(out), sport, dport, tcp[13], ip[1] & 3, tot - hl - thl])
    print(json.dumps(rows), flush=True)
""")

# A bulk client: send N bytes to PORT (reading back N when ECHO), then wait for a line
# on stdin before closing, so the connection can be inspected while it is open.
CLIENT = textwrap.dedent("""
    import socket, sys, threading
    host, port, n, back = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    s.settimeout(60)
    s.connect((host, port))
    got = [0]
    def reader():
        while got[0] < n:
            b = s.recv(1 << 16)
            if not b:
                break
            got[0] += len(b)
    t = threading.Thread(target=reader)
    if back:
        t.start()
    s.sendall(bytes(n))
    if back:
        t.join(60)
    opts = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[5]  # tcpi_options
    print("DONE", got[0], s.getsockname()[1], opts, flush=True)
    sys.stdin.readline()
    s.close()
""")

# On the stack (`shardstack run`): connect out, send N bytes, close.
ACTIVE = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    s.sendall(bytes(int(sys.argv[3])))
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    print("SENT", flush=True)
""")

# A kernel server: read everything, then hold the connection until stdin says go.
KSERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("READY", flush=True)
    srv.settimeout(60)
    c, _ = srv.accept()
    n = 0
    while b := c.recv(1 << 16):
        n += len(b)
    print("GOT", n, c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[5], flush=True)
    sys.stdin.readline()
    c.close()
""")


def _line(proc: subprocess.Popen, word: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(word):
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {word!r} from {proc.args!r}: {proc.stderr.read() if proc.stderr else ''}")


def _stack_ctl(run_dir: str, *args: str) -> str:
    return subprocess.run([PY, "-m", "shardstack", *args, "--run-dir", run_dir],
                          capture_output=True, text=True, timeout=30, check=True).stdout


def _sniffed(sniffer: subprocess.Popen) -> list[list[int]]:
    sniffer.send_signal(signal.SIGTERM)
    out, err = sniffer.communicate(timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def _nstat(ns: netns.Netns, name: str) -> int:
    out = ns.run(["nstat", "-az", name]).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == name:
            return int(f[1])
    return 0


def test_ecn_with_the_kernel_through_a_marking_bridge(tmp_path: Path) -> None:
    require_root()
    size = 3 << 20
    with netns.bridged_pair(prefix="ssecn", server_addr=False) as pair:
        kaddr = str(pair.net.network_address + 1)
        saddr = str(pair.net.network_address + 2)
        pair.client.run(["sysctl", "-qw", "net.ipv4.tcp_ecn=1"])
        run_dir = tempfile.mkdtemp(prefix="ssecn-", dir="/tmp")
        os.rmdir(run_dir)
        log = open(tmp_path / "serve.log", "wb")
        serve = br = sniffer = None
        procs: list[subprocess.Popen] = []
        try:
            serve = start_serve(pair, run_dir, log, tmp_path / "serve.log",
                                ["--addr", f"{saddr}/24", "--echo", str(ECHO),
                                 "--discard", str(DISCARD), "--ecn", "1"])
            br = start_bridge(pair, ["--ce", "1%", "--delay-ms", "2", "--seed", "5"])
            sniffer = pair.client.popen([PY, "-c", SNIFF, "veth0", kaddr], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
            _line(sniffer, "READY")

            # 1. kernel -> stack (discard): the stack is the receiver.
            up = pair.client.popen([PY, "-c", CLIENT, saddr, str(DISCARD), str(size), "0"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            procs.append(up)
            done = _line(up, "DONE").split()
            up_port, up_opts = int(done[2]), int(done[3])
            kss_up = pair.client.run(["ss", "-tinH", "sport", f"= :{up_port}"]).stdout
            up.stdin.write("\n")
            up.stdin.flush()
            up.wait(30)
            delivered_ce_kernel = _nstat(pair.client, "TcpExtTCPDeliveredCE")

            # 2. stack -> kernel (echo): the stack is the sender.
            echo = pair.client.popen([PY, "-c", CLIENT, saddr, str(ECHO), str(size), "1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            procs.append(echo)
            done = _line(echo, "DONE").split()
            assert int(done[1]) == size
            echo_port = int(done[2])
            ss_i = _stack_ctl(run_dir, "ss", "-i")
            stats = json.loads(_stack_ctl(run_dir, "stats", "--json"))
            echo.stdin.write("\n")
            echo.stdin.flush()
            echo.wait(30)

            # 3. the stack connects out to a kernel server (the stack is the active side).
            ksrv = pair.client.popen([PY, "-c", KSERVER, kaddr, str(KPORT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            procs.append(ksrv)
            _line(ksrv, "READY")
            active = pair.server.popen([PY, "-m", "shardstack", "run", "--run-dir", run_dir, "--",
                                        PY, "-c", ACTIVE, kaddr, str(KPORT), "100000"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(active)
            got = _line(ksrv, "GOT").split()
            assert int(got[1]) == 100000
            active_opts = int(got[2])
            ksrv.stdin.write("\n")
            ksrv.stdin.flush()
            _line(active, "SENT")
            rows = _sniffed(sniffer)
            sniffer = None
        finally:
            for p in procs:
                stop(p)
            stop(sniffer)
            bridge = stop_bridge(br)
            stop(serve)
            log.close()

    def seg(out: int, port: int, kport_side: str) -> list[list[int]]:
        # rows: [outgoing from the kernel, sport, dport, flags, ecn field, payload length]
        key = 2 if out else 1  # the stack's port is dport on the way out, sport coming in
        return [r for r in rows if r[0] == out and r[key] == port]

    # -- 1: the kernel asks, the stack accepts; the stack echoes CE; the kernel sends CWR
    k_out = seg(1, DISCARD, "")
    k_in = seg(0, DISCARD, "")
    syn = [r for r in k_out if r[3] & SYN]
    synack = [r for r in k_in if r[3] & SYN]
    assert syn and syn[0][3] & (ECE | CWR) == ECE | CWR
    assert synack and synack[0][3] & (ECE | CWR) == ECE
    assert {r[4] for r in k_out if r[5]} == {2}, "kernel data not ECT(0)"
    assert all(r[4] == 0 for r in k_in), "the stack's ACKs must be Not-ECT"
    assert any(r[3] & ECE for r in k_in if not r[3] & SYN), "the stack never echoed a CE mark"
    assert any(r[3] & CWR for r in k_out if not r[3] & SYN), "the kernel never sent CWR"
    # The kernel's own view: ECN on; no marks seen, as the stack's ACKs are Not-ECT.
    assert up_opts & TCPI_OPT_ECN and not up_opts & TCPI_OPT_ECN_SEEN
    assert "delivered_ce:" in kss_up, kss_up
    assert delivered_ce_kernel > 0

    # -- 2: the stack sends ECT(0), the kernel echoes, the stack sends CWR, no retransmit
    s_in = [r for r in seg(0, ECHO, "") if r[5]]
    s_ack = seg(1, ECHO, "")
    shard = [w["shard"] for w in stats["workers"]]
    # New data goes ECT(0) (CE once marked); a retransmission Not-ECT (RFC 3168 §6.1.5).
    retrans = sum(s["retrans_segs"] for s in shard)
    assert {r[4] for r in s_in} <= {0, 2, 3} and any(r[4] == 3 for r in s_in)
    assert sum(1 for r in s_in if r[4] == 0) <= retrans, shard
    assert any(r[3] & ECE for r in s_ack), "the kernel never echoed"
    assert any(r[3] & CWR for r in s_in), "the stack never sent CWR"
    assert sum(s["tcp_delivered_ce"] for s in shard) > 0
    # Backed off without a loss: no RTO, no fast recovery; at most a tail loss probe
    # (RFC 8985 §7) when a loaded host delays ACKs past 2 SRTT.
    assert sum(s["rto_fires"] + s["fast_retrans"] for s in shard) == 0, json.dumps(shard)
    assert retrans <= sum(s["tlp_probes"] for s in shard), shard
    line = next(x for x in ss_i.splitlines() if f":{echo_port}" in x)
    info = ss_i.splitlines()[ss_i.splitlines().index(line) + 1]
    assert "ecn" in info.split() and "ssthresh:" in info and "delivered_ce:" in info, info
    assert bridge["a2b"]["lost"] == 0 and bridge["b2a"]["lost"] == 0
    assert bridge["a2b"]["ce_marked"] > 0 and bridge["b2a"]["ce_marked"] > 0

    # -- 3: the stack asks, the kernel accepts
    a_in = [r for r in rows if r[0] == 0 and r[2] == KPORT]
    a_out = [r for r in rows if r[0] == 1 and r[1] == KPORT]
    assert a_in and a_in[0][3] & SYN and a_in[0][3] & (ECE | CWR) == ECE | CWR
    sa = [r for r in a_out if r[3] & SYN]
    assert sa and sa[0][3] & (ECE | CWR) == ECE
    a_data = [r[4] for r in a_in if r[5]]
    # New data ECT(0) (CE if marked); only a retransmission (a tail loss probe on a loaded
    # host) may be Not-ECT.
    assert a_data and a_data[0] in (2, 3) and sum(1 for e in a_data if e == 0) <= 2, a_data
    assert active_opts & TCPI_OPT_ECN and active_opts & TCPI_OPT_ECN_SEEN
