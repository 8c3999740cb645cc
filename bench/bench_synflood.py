"""SYN flood: spoofed SYNs against a listener while a legitimate client connects in a loop.

    sudo .venv/bin/python bench/bench_synflood.py [--seconds 6] [--workers 1] [--out FILE]

Topology (namespaces this script creates and deletes, addresses from
198.18.0.0/15 only): client ns .1 ──veth── server ns .2.  The server is either
the Linux kernel (an echo server on its TCP) or ``shardstack serve --packet``
(AF_PACKET on the server's veth end, its built-in echo service).  The spoofed
sources are 198.19.192.0/18; the server routes them back through the client
namespace (``--gateway`` for the stack, a route for the kernel), which drops
the SYN-ACKs (no forwarding), as a flooded host's upstream would.

Per server, two phases of ``--seconds`` each:

1. no flood: the legitimate client (client ns, kernel TCP) connects, reads
   nothing, closes, in a loop; connect time of each (SYN to connect() return);
2. flood: the same, while a raw sender (IP_HDRINCL, prebuilt SYNs with random
   spoofed sources/ports/ISNs) sends as fast as one process can, bounded by
   the phase's time and ``--max-syns``.

Reported: the flood rate sent (SYN/s), legitimate connections completed per
second, their p50 and p99 connect time, failures (connect timeouts of 3 s),
and the server's own counters (kernel: nstat SyncookiesSent/ListenOverflows/
ListenDrops; stack: ``shardstack stats`` drop reasons and cookies).  Figures
vary with the box; printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardstack import netns as nsmod
from shardstack.bench.targets import PY, control_call, shardstack_argv, wait_ready, wait_tcp

PORT = 7
SPOOF_NET = "198.19.192.0/18"


def _loop_client(host: str, port: int, seconds: float) -> dict:
    """Runs inside the client namespace (``--role client``)."""
    times: list[float] = []
    fails = 0
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end and n < 200000:
        n += 1
        s = socket.socket()
        s.settimeout(3.0)
        t0 = time.perf_counter()
        try:
            s.connect((host, port))
            times.append(time.perf_counter() - t0)
        except OSError:
            fails += 1
        finally:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    return {"ok": len(times), "fails": fails, "times": times}


def _flood(host: str, port: int, seconds: float, max_syns: int) -> dict:
    """Runs inside the client namespace (``--role flood``): raw spoofed SYNs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from shardstack.core.wire.ipv4 import str_to_ip
    from shardstack.core.wire.tcp import SYN, build_tcp_ipv4, build_tcp_options

    rng = random.Random(1)
    dst = str_to_ip(host)
    base = str_to_ip("198.19.192.0")
    opts = build_tcp_options(mss=1460, sack_perm=True, ts=(1, 0), wscale=7)
    pool = [build_tcp_ipv4(base + rng.randrange(1, 1 << 14), dst, rng.randrange(1024, 65535),
                           port, rng.getrandbits(32), 0, SYN, 64240, opts, ident=i)
            for i in range(4096)]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    addr = (host, 0)
    sent = 0
    t0 = time.monotonic()
    end = t0 + seconds
    send = s.sendto
    while sent < max_syns:
        for pkt in pool:
            try:
                send(pkt, addr)
                sent += 1
            except BlockingIOError:
                pass
            except OSError:
                pass
        if time.monotonic() >= end:
            break
    took = time.monotonic() - t0
    return {"sent": sent, "seconds": took, "rate": sent / took}


def _nstat(ns: nsmod.Netns) -> dict:
    out = ns.run(["nstat", "-az", "-j"], check=False).stdout
    try:
        d = json.loads(out)
        return d.get("kernel", d)
    except ValueError:
        return {}


def phase(pair: nsmod.Pair, host: str, seconds: float, flood: bool, max_syns: int) -> dict:
    me = str(Path(__file__).resolve())
    client = pair.client.popen([PY, me, "--role", "client", "--host", host,
                                "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
    fl = None
    if flood:
        fl = pair.client.popen([PY, me, "--role", "flood", "--host", host, "--seconds",
                                str(seconds), "--max-syns", str(max_syns)],
                               stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=seconds + 60)
    res = json.loads(out)
    if fl is not None:
        fout, _ = fl.communicate(timeout=seconds + 60)
        res["flood"] = json.loads(fout)
    times = sorted(res.pop("times"))
    res["conn_per_s"] = res["ok"] / seconds
    res["p50_ms"] = 1000 * times[len(times) // 2] if times else float("nan")
    res["p99_ms"] = 1000 * times[min(len(times) - 1, int(len(times) * 0.99))] if times \
        else float("nan")
    return res


def run_kernel(args) -> list[dict]:
    rows = []
    with nsmod.client_server_pair(server_addr=True, grace=2.0) as pair:
        pair.server.add_route(SPOOF_NET, via=pair.client_ip)
        for key, val in (("net.ipv4.tcp_syncookies", 1),):
            pair.server.sysctl(key, val)
        host = pair.server_ip
        srv = pair.server.popen([PY, "-m", "shardstack.bench.servers", "--bind", host,
                                 "--echo", str(PORT)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        why = wait_tcp(pair.client, host, PORT, 10.0, srv)
        if why:
            raise RuntimeError(why)
        for flood in (False, True):
            before = _nstat(pair.server)
            r = phase(pair, host, args.seconds, flood, args.max_syns)
            after = _nstat(pair.server)
            r["server"] = {k: after.get(k, 0) - before.get(k, 0) for k in
                           ("TcpExtSyncookiesSent", "TcpExtSyncookiesRecv",
                            "TcpExtSyncookiesFailed", "TcpExtListenOverflows",
                            "TcpExtListenDrops", "TcpExtTCPReqQFullDrop",
                            "TcpExtTCPReqQFullDoCookies", "IpInReceives")}
            r["target"] = "kernel"
            rows.append(r)
    return rows


def run_stack(args) -> list[dict]:
    rows = []
    with nsmod.client_server_pair(server_addr=False, grace=2.0) as pair, \
            tempfile.TemporaryDirectory(prefix="ssb-flood-") as run_dir:
        host = pair.server_ip
        argv = ["serve", "--workers", str(args.workers), "--run-dir", run_dir, "--packet",
                pair.link.b_dev, "--addr", nsmod.host(pair.net, 2), "--gateway",
                pair.client_ip, "--echo", str(PORT)]
        log = open(Path(tempfile.gettempdir()) / "bench_synflood_serve.log", "wb")  # noqa: SIM115
        serve = pair.server.popen(shardstack_argv(*argv), stdout=log, stderr=subprocess.STDOUT)
        try:
            why = wait_ready(run_dir, serve) or wait_tcp(pair.client, host, PORT, 10.0, serve)
            if why:
                raise RuntimeError(why)
            for flood in (False, True):
                before = control_call(run_dir, "stats") or {}
                r = phase(pair, host, args.seconds, flood, args.max_syns)
                after = control_call(run_dir, "stats") or {}
                r["server"] = _stack_delta(before, after)
                r["target"] = f"shardstack-packet w{args.workers}"
                rows.append(r)
        finally:
            serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.wait(timeout=5)
            log.close()
    return rows


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict | list):
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix[:-1]] = d
    return out


def _stack_delta(before: dict, after: dict) -> dict:
    """Sum, over workers, of the counters a flood moves."""
    b, a = _flat(before), _flat(after)
    keys = ("syncookies_sent", "syncookies_recv", "listen_overflows", "passive_opens",
            "frames_in")
    out: dict[str, float] = {}
    for k, v in a.items():
        if not k.startswith("workers.") and "zmq_dropped" not in k:
            continue
        leaf = k.rsplit(".", 1)[-1]
        if ".drops." in k:
            leaf = "drop_" + leaf
        elif "zmq_dropped" in k:
            leaf = "zmq_dropped"
        elif leaf not in keys:
            continue
        out[leaf] = out.get(leaf, 0) + v - b.get(k, 0)
    return {k: v for k, v in out.items() if v}


def fmt(rows: list[dict]) -> list[str]:
    lines = [f"{'server':<22} {'flood':>5} {'flood SYN/s':>12} {'legit conn/s':>13} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'fails':>6}  server counters"]
    for r in rows:
        fl = r.get("flood")
        lines.append(f"{r['target']:<22} {'yes' if fl else 'no':>5} "
                     f"{(fl['rate'] if fl else 0):>12.0f} {r['conn_per_s']:>13.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['fails']:>6}  "
                     f"{json.dumps(r['server'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=("bench", "client", "flood"), default="bench",
                    help=argparse.SUPPRESS)
    ap.add_argument("--host", default="")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--max-syns", type=int, default=5_000_000,
                    help="the flood stops after this many SYNs (and after --seconds)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", choices=("kernel", "stack"), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.role == "client":
        print(json.dumps(_loop_client(args.host, PORT, args.seconds)))
        return 0
    if args.role == "flood":
        print(json.dumps(_flood(args.host, PORT, args.seconds, args.max_syns)))
        return 0
    if os.geteuid() != 0:
        print("needs root (namespaces, raw sockets)", file=sys.stderr)
        return 2
    rows = []
    if args.only in (None, "kernel"):
        rows += run_kernel(args)
    if args.only in (None, "stack"):
        rows += run_stack(args)
    lines = fmt(rows)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
