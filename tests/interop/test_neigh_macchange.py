"""AF_PACKET mode: the kernel peer's MAC changes in the middle of a connection
(`ip link set vsb address ...`), and the stack follows it through ARP.

The stack learns link addresses from ARP only (netio.neighbour), never from
the source MAC of a TCP frame, so this is the case that shows the neighbour
table working end to end: after the change our frames to the old MAC are
dropped by the peer's veth (PACKET_OTHERHOST); the peer's kernel flushed its
own neighbour entries with its address (`neigh_changeaddr`), so its next
frame to us starts with a who-has for our address from the new MAC; netio
takes the new MAC from that request (`arp_process` / `neigh_event_ns`),
announces it to the workers, and the connection carries on."""

from __future__ import annotations

import pytest
from test_serve import ECHO, WAIT, close_all, echo_many, wait_for
from test_serve_robustness import RX_MODES, VethStack

pytestmark = pytest.mark.interop

NEW_MAC = "02:5e:ed:00:00:42"


@pytest.fixture(params=RX_MODES)
def rx_mode(request, monkeypatch):
    monkeypatch.setenv("SHARDSTACK_RX", request.param)
    return request.param


def _netio_neigh(st) -> dict:
    return st.stats()["netio"]["counters"]["neigh"]


def test_peer_mac_change_mid_connection_recovers_via_arp(rx_mode):
    with VethStack([]) as v:
        st = v.st
        _stack_mac, old_mac = v.macs()
        socks = [st.connect(ECHO, p) for p in st.ports_for(2, ECHO, 23000)]  # both workers
        try:
            echo_many(socks, 64 * 1024, seed=1)
            before = _netio_neigh(st)
            v.b.run(["ip", "link", "set", "vsb", "address", NEW_MAC])
            assert v.macs()[1] != old_mac
            # the same connections, after the change: every byte still echoed
            echo_many(socks, 256 * 1024, seed=2, timeout=WAIT * 2)
            after = wait_for(lambda: (n := _netio_neigh(st))["mac_changes"]
                             > before["mac_changes"] and n, what="netio saw the new MAC")
            neigh = st.cli("stats")["workers"]
            assert sum(w["counters"]["neigh"]["mac_changes"] for w in neigh) >= 1
            assert after["refused"] == 0
            # and new connections too
            fresh = [st.connect(ECHO, p) for p in st.ports_for(2, ECHO, 24000)]
            try:
                echo_many(fresh, 16 * 1024, seed=3)
            finally:
                close_all(fresh)
        finally:
            close_all(socks)
