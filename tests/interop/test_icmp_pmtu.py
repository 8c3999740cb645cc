"""ICMP errors from the Linux kernel reach the stack's TCP: path MTU discovery through a
kernel router, and a connect refused by ICMP port-unreachable, then retried on the
same socket.

Topologies (198.18.0.0/15 only, namespaces created and removed here):

* PMTU, ``packet``: stack --AF_PACKET vsa|vsb--> router ns --vka|vcb--> client ns;
  ``tun``: stack --TUN--> the kernel of the stack's namespace routes --vka|vcb-->
  client ns.  Every link has MTU 1500, so the client advertises MSS 1460, but
  the router's route to the client says ``mtu lock 1000``: a forwarded packet
  above 1000 bytes with DF (all of the stack's) is dropped and answered with
  ICMP "fragmentation needed" (next-hop MTU 1000, RFC 1191).  The kernel
  client echoes 2 MiB off the stack's ``--echo``; the echo back can only pass
  the router once the stack has lowered its MSS and resent in the new size.
  With direct RX the kernel steers the ICMP to netio, which forwards it to
  the worker owning the quoted flow.
* port unreachable: test_tcp_interop's topologies; nftables in the kernel
  peer's namespace answers a SYN to the port with ``reject with icmp type
  port-unreachable`` instead of an RST.  An unmodified program under
  ``shardstack run`` connects (socket timeout 5 s: the SYN is not retried
  before the answer) and gets ECONNREFUSED; then, rule gone and a kernel
  server listening, the SAME socket connects again and exchanges data.
"""

from __future__ import annotations

import json
import os

import pytest
from test_csum_offload_routed import echo_client
from test_tcp_interop import PY, WAIT, Topo, routed_topology, topology

from shardstack import netns

pytestmark = pytest.mark.interop

PATH_MTU = 1000
APP_PORT = 5002


def _shard_sum(stats: dict, key: str) -> int:
    return sum(w["shard"].get(key, 0) for w in stats["workers"])


def _narrow_hop(router: netns.Netns, client: str) -> None:
    """The router's route to the client gets MTU 1000: forwarding honours a route's MTU
    (ip_dst_mtu_maybe_forward), while both veths keep 1500, so the client still offers
    MSS 1460."""
    router.ip("route", "add", f"{client}/32", "dev", "vka", "mtu", "lock", str(PATH_MTU))


def _router_icmp_out(router: netns.Netns) -> int:
    """IcmpOutDestUnreachs of the router's namespace (/proc/net/snmp)."""
    rows = [line.split() for line in router.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith("Icmp:")]
    return int(rows[1][rows[0].index("OutDestUnreachs")])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["packet", "tun"])
def test_pmtu_discovery_through_a_kernel_router(kind, tmp_path):
    size = 2 << 20
    with routed_topology(kind, tmp_path, "ssp", _narrow_hop) as (t, cns, _):
        res = echo_client(t, cns, tmp_path, size, seed=23)
        st = t.stats()
        icmp_sent = _router_icmp_out(t.kns)
    reductions = _shard_sum(st, "tcp_pmtu_reductions")
    forwarded = st["netio"]["counters"]["dispatch"].get("icmp_errors", 0)
    print(f"\n{kind}: {res}; router sent {icmp_sent} dest-unreachable, netio forwarded "
          f"{forwarded}, MSS lowered {reductions}x, "
          f"retrans {_shard_sum(st, 'retrans_segs')}")
    assert icmp_sent > 0, "the router never needed to say 'fragmentation needed'"
    assert forwarded > 0 and _shard_sum(st, "icmp_in_dest_unreachs") > 0
    assert reductions > 0, "no connection lowered its MSS"
    assert res["sent"] == size and res["got"] == size, f"echo incomplete: {res}"
    assert res["sha_ok"], f"echoed bytes differ: {res}"


# -- ICMP port unreachable, then connect() again on the same socket ---------------------

APP = r'''
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])


def say(**kw):
    print(json.dumps(kw), flush=True)


s = socket.socket()
s.settimeout(5)
t0 = time.monotonic()
say(event="first", errno=s.connect_ex((host, port)), secs=round(time.monotonic() - t0, 3),
    cls=type(s).__name__)
sys.stdin.readline()
err = s.connect_ex((host, port))
if err:
    say(event="second", errno=err)
else:
    s.sendall(b"ping")
    say(event="second", errno=0, reply=s.recv(16).decode(), local=list(s.getsockname()),
        peer=list(s.getpeername()))
s.close()
say(event="done")
'''


def _reject_with_icmp(t: Topo, port: int) -> None:
    t.kns.run(["nft", "add", "table", "ip", "icmpt"])
    t.kns.run(["nft", "add", "chain", "ip", "icmpt", "input",
               "{ type filter hook input priority 0; }"])
    t.kns.run(["nft", "add", "rule", "ip", "icmpt", "input", "tcp", "dport", str(port),
               "counter", "reject", "with", "icmp", "type", "port-unreachable"])


def _rejected(t: Topo) -> int:
    out = json.loads(t.kns.run(["nft", "-j", "list", "table", "ip", "icmpt"]).stdout)
    for item in out["nftables"]:
        for e in (item.get("rule") or {}).get("expr", ()):
            if "counter" in e:
                return e["counter"]["packets"]
    return 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tun", "packet"])
def test_icmp_port_unreachable_refuses_then_same_socket_connects(kind, tmp_path):
    with topology(kind, tmp_path) as t:
        _reject_with_icmp(t, APP_PORT)
        (tmp_path / "app.py").write_text(APP)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        app = t._run(t.sns, [PY, "-m", "shardstack", "run", "--run-dir", t.run_dir, "--",
                             "python", str(tmp_path / "app.py"), t.peer, str(APP_PORT)],
                     "stack-app", env)
        first = app.expect("first", WAIT)
        st = t.stats()
        rejected = _rejected(t)
        print(f"\n{kind}: first connect {first}; nft rejected {rejected}; "
              f"aborts {_shard_sum(st, 'tcp_icmp_aborts')}")
        assert first["cls"] == "ShimSocket", "the app did not run on the stack"
        assert first["errno"] == 111, f"connect did not fail with ECONNREFUSED: {first}"
        assert rejected >= 1, "the kernel never sent port-unreachable"
        assert _shard_sum(st, "tcp_icmp_aborts") >= 1, "refused by something else than ICMP"
        assert _shard_sum(st, "retrans_segs") == 0, "the SYN was retried: ICMP came late"
        # The path opens: rule gone, a kernel server listening. Same socket again.
        t.kns.run(["nft", "delete", "table", "ip", "icmpt"])
        srv = t.kernel_socket()
        try:
            srv.bind((t.peer, APP_PORT))
            srv.listen(1)
            srv.settimeout(WAIT)
            app.release()
            c, peer = srv.accept()
            c.settimeout(WAIT)
            assert c.recv(16) == b"ping"
            c.sendall(b"pong")
            second = app.expect("second", WAIT)
            c.close()
        finally:
            srv.close()
        app.finish(WAIT)
        assert second["errno"] == 0 and second["reply"] == "pong", second
        assert second["peer"] == [t.peer, APP_PORT] and second["local"][0] == t.addr
        assert tuple(second["local"]) == (peer[0], peer[1])
