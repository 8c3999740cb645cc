"""`--no-offload` on AF_PACKET against a veth whose kernel side keeps its
default offloads (tx checksumming, TSO): without the virtio-net header the
kernel peer's frames arrive CHECKSUM_PARTIAL (the TCP checksum field holds only
the pseudo-header sum) and, with TSO, as super-frames. PACKET_AUXDATA's
tp_status (TP_STATUS_CSUMNOTREADY / TP_STATUS_CSUM_VALID) tells the stack which
is which, so nothing is dropped as TCP_CSUM; both RX paths (direct fanout and
the netio hop) and both directions, data checked by SHA-256.
"""

from __future__ import annotations

import contextlib

import pytest
from test_tcp_interop import Topo, _require_root, _serve, _stop, _transfer

from shardstack import netns

pytestmark = pytest.mark.interop


@contextlib.contextmanager
def _packet_topology(tmp, extra):
    """test_tcp_interop's `packet` topology, minus its `_offloads_off` on the
    kernel's end: the point here is the kernel's default offloads."""
    from test_tcp_interop import PEER

    _require_root()
    (tmp / "peer.py").write_text(PEER)
    net = netns.next_subnet()
    addr, peer = str(net.network_address + 2), str(net.network_address + 1)
    with netns.netns(prefix="sst") as sns, netns.netns(prefix="sst") as kns:
        netns.add_veth(sns, kns, "vsa", "vsb", b_addr=f"{peer}/24")
        t = Topo("packet", sns, kns, addr, peer, "vsb", tmp)
        try:
            _serve(t, ["--packet", "vsa"], list(extra))
            yield t
        finally:
            _stop(t)


def _features(t: Topo) -> str:
    return t.kns.run(["ethtool", "-k", "vsb"], check=False).stdout


@pytest.mark.parametrize("rx", ["direct", "netio"])
@pytest.mark.parametrize("direction", ["k2s", "s2k"])
def test_no_offload_with_peer_offloads_on(rx, direction, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSTACK_RX", rx)
    with _packet_topology(tmp_path, ["--no-offload"]) as t:
        feats = _features(t)
        assert "tx-checksumming: on" in feats, feats  # the kernel leaves checksums partial
        _transfer(t, direction, 1, 2 << 20, 2 << 20, seed=61, hold=False, timeout=60)
        st = t.stats()
        assert st["netio"]["counters"].get("rx") in (rx, None), st["netio"]["counters"].get("rx")
        csum = sum(w["counters"]["drops"].get("TCP_CSUM", 0) for w in st["workers"])
        retrans = sum(w["shard"].get("retrans_segs", 0) for w in st["workers"])
        assert csum == 0, f"{csum} good frames dropped as TCP_CSUM"
        print(f"\n{rx} {direction}: drops "
              f"{[w['counters']['drops'] for w in st['workers']]}, retrans {retrans}")
