"""GSO super-segments with CHECKSUM_PARTIAL checksums, finished by a kernel router.

The stack sends bulk data as GSO super-segments whose TCP checksum field holds
only the pseudo-header sum (virtio-net header NEEDS_CSUM). Here they do not
end at a kernel socket, which would accept them unchecked, but cross a kernel
ROUTER onto a veth with tx checksumming, scatter-gather, TSO and GSO off. So
the router's kernel must cut every super-segment and complete each checksum
in software (`validate_xmit_skb` -> `skb_gso_segment`, `skb_checksum_help`)
from the partial sum the stack gave it, and the kernel client behind it checks
every one (CHECKSUM_NONE on a veth without offloads). A wrong pseudo-header
sum shows up as Tcp InCsumErrors in the client's namespace (what `nstat`
reports as TcpInCsumErrors; a broken sum once gave 9,272 of them). The echo
itself can still complete intact after retransmissions (seen with a deliberately
wrong sum: SHA-256 equal, 2,298 checksum errors), so the counter is the check
that catches it; SHA-256 and length catch what a stall or corruption leaves.

Topologies (198.18.0.0/15 only, via netns.next_subnet):

* ``packet``: stack --AF_PACKET vsa|vsb--> router ns --vka|vcb--> client ns
  (the stack reaches the client through ``--gateway``).
* ``tun``: stack --TUN--> the kernel in the stack's namespace routes
  --vka|vcb--> client ns.

The kernel client echoes N bytes of seeded data off the stack's ``--echo``
service and compares SHA-256; it gives up after CLIENT_TIMEOUT s. Passing needs
GSO writes from the stack (`gso_out` > 0), else it tested nothing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tcp_interop import ECHO, PY, WAIT, Topo, _require_root, routed_topology

from shardstack import netns

pytestmark = pytest.mark.interop

CLIENT_TIMEOUT = 60.0  # seconds the client keeps trying before it reports what it got
ROUTED_DEV = "vka"  # the router's end towards the client: every offload off

# Kernel-side echo client (stdlib only), run in the client namespace. Reads
# Tcp InCsumErrors from /proc/net/snmp (per network namespace) before and after.
CLIENT = r'''
import hashlib, json, random, selectors, socket, sys, time


def csum_errors():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("InCsumErrors")])


addr, port, n, seed, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
data = random.Random(seed).randbytes(n)
before = csum_errors()
t0 = time.monotonic()
s = socket.create_connection((addr, port), timeout=20)
s.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
sent, got, eof = 0, bytearray(), False
while len(got) < n and not eof and time.monotonic() - t0 < limit:
    for key, ev in sel.select(1.0):
        if ev & selectors.EVENT_WRITE and sent < n:
            try:
                sent += s.send(data[sent:sent + 262144])
            except BlockingIOError:
                pass
            if sent == n:
                sel.modify(s, selectors.EVENT_READ)
        if ev & selectors.EVENT_READ:
            try:
                b = s.recv(1 << 20)
            except BlockingIOError:
                continue
            if not b:
                eof = True
                break
            got += b
secs = time.monotonic() - t0
s.close()
print(json.dumps({"sha_ok": hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
                  "sent": sent, "got": len(got), "eof": eof, "secs": round(secs, 2),
                  "csum_errors": csum_errors() - before}))
'''


def _all_offloads_off(router: netns.Netns) -> None:
    """Every TX offload off on the router's end towards the client, and read back.

    ethtool rather than test_serve's `_offloads_off`: its legacy ioctls leave
    scatter-gather and TSO's sub-features (ecn, mangleid) on."""
    router.run(["ethtool", "-K", ROUTED_DEV, "tx", "off", "tso", "off", "gso", "off",
                "sg", "off"])
    out = router.run(["ethtool", "-k", ROUTED_DEV]).stdout
    feats = dict(line.strip().split(": ", 1) for line in out.splitlines()[1:] if ": " in line)
    for f in ("tx-checksumming", "scatter-gather", "tcp-segmentation-offload",
              "generic-segmentation-offload"):
        assert feats.get(f, "").startswith("off"), f"{ROUTED_DEV} {f}: {feats.get(f)}"


@contextlib.contextmanager
def routed(kind: str, tmp: Path) -> Iterator[tuple[Topo, netns.Netns]]:
    """The stack, a kernel router with offloads off towards the client, the client ns.

    Yields (topo, client namespace); topo.kns is the router."""
    _require_root()
    assert shutil.which("ethtool"), "root but no ethtool: cannot switch the router's offloads off"
    with routed_topology(kind, tmp, "sst", lambda router, _client: _all_offloads_off(router)
                         ) as (t, cns, _):
        yield t, cns


def echo_client(t: Topo, cns: netns.Netns, tmp: Path, size: int, seed: int) -> dict:
    """CLIENT in the client namespace: `size` bytes echoed off the stack's --echo; its
    report (sent, got, sha_ok, csum_errors)."""
    client = tmp / "client.py"
    client.write_text(CLIENT)
    try:
        r = cns.run([PY, str(client), t.addr, str(ECHO), str(size), str(seed),
                     str(CLIENT_TIMEOUT)], check=False, timeout=CLIENT_TIMEOUT + WAIT)
    except netns.NetnsError as e:
        raise AssertionError(f"client: {e.reason}\n{t.serve_log()}") from None
    assert r.returncode == 0, f"client exited {r.returncode}: {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("size", [8 << 20, pytest.param(32 << 20, marks=pytest.mark.slow)],
                         ids=["8MiB", "32MiB"])
@pytest.mark.parametrize("kind", ["packet", "tun"])
def test_partial_csum_gso_completed_by_router(kind, size, tmp_path):
    with routed(kind, tmp_path) as (t, cns):
        res = echo_client(t, cns, tmp_path, size, seed=17)
        workers = t.stats()["workers"]
    gso_out = sum(w["counters"].get("gso_out", 0) for w in workers)
    print(f"\n{kind}: {res}, gso_out {gso_out}")
    assert res["csum_errors"] == 0, f"client saw bad TCP checksums: {res}"
    assert res["sent"] == size and res["got"] == size, f"echo incomplete: {res}"
    assert res["sha_ok"], f"echoed bytes differ: {res}"
    assert gso_out > 0, "the stack sent no GSO super-segment: the test tested nothing"
