"""shardstack.netns really creates namespaces, veths and TUNs, and removes every trace.

Root only: skipped without root; as root, a namespace that cannot be made is a
failure (the interop suite must never pass by doing nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardstack import netns

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    missing = netns.missing_requirements()
    if missing:
        pytest.fail("root, but cannot build namespaces: " + "; ".join(missing))


def test_namespace_exists_inside_the_block_and_is_gone_after():
    with netns.netns() as ns:
        assert ns.name in netns.list_netns()
        assert ns.links() == ["lo"]
        assert "UP" in ns.ip("link", "show", "lo").stdout
    assert ns.name not in netns.list_netns()


def test_processes_inside_are_ended_at_teardown():
    with netns.netns() as ns:
        proc = ns.popen(["sleep", "300"])
        assert ns.pids() == [proc.pid]
    assert proc.wait(timeout=5) is not None  # SIGTERMed, not left running
    assert ns.name not in netns.list_netns()


def test_teardown_also_runs_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with netns.netns() as ns:
            ns.popen(["sleep", "300"])
            raise RuntimeError("boom")
    assert ns.name not in netns.list_netns()
    assert netns.Netns(ns.name).pids() == []


def test_veth_pair_joins_two_namespaces_and_never_touches_the_host():
    host_links = netns.links()
    with netns.client_server_pair() as pair:
        assert netns.links() == host_links  # created directly inside the namespaces
        assert "veth0" in pair.client.links() and "veth0" in pair.server.links()
        assert pair.client_ip.startswith("198.1") and netns.check_address(pair.client_ip)
        assert f"{pair.client_ip}/24" in pair.client.ip("addr", "show", "veth0").stdout
        # Real TCP across the pair: an echo server in one, a client in the other.
        server = pair.server.popen([sys.executable, "-m", "shardstack.bench.servers", "--bind",
                                    pair.server_ip, "--echo", "7", "--max-seconds", "60"],
                                   stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().startswith("READY")
        out = pair.client.run([sys.executable, "-m", "shardstack.bench.client", "rr", "--host",
                               pair.server_ip, "--port", "7", "--max-ops", "50",
                               "--seconds", "5"], timeout=30).stdout
        assert '"ops": 50' in out.splitlines()[-1]
        names = (pair.client.name, pair.server.name)
    assert not set(names) & set(netns.list_netns())
    assert netns.links() == host_links
    server.wait(timeout=5)


def test_server_end_without_address_for_af_packet():
    with netns.client_server_pair(server_addr=False) as pair:
        assert "inet " not in pair.server.ip("addr", "show", "veth0").stdout
        assert "inet " in pair.client.ip("addr", "show", "veth0").stdout


def test_veth_refuses_addresses_outside_the_benchmark_range():
    with netns.netns() as a, netns.netns() as b:
        with pytest.raises(ValueError):
            netns.add_veth(a, b, a_addr="10.0.0.1/24")
        assert a.links() == ["lo"] and b.links() == ["lo"]
        with pytest.raises(ValueError):
            a.add_route("192.168.0.0/16")


def test_del_veth_removes_both_ends():
    with netns.netns() as a, netns.netns() as b:
        pair = netns.add_veth(a, b, "va", "vb", "198.18.250.1/24", "198.18.250.2/24")
        assert "va" in a.links() and "vb" in b.links()
        netns.del_veth(pair)
        assert a.links() == ["lo"] and b.links() == ["lo"]
        netns.del_veth(pair)  # idempotent


def test_tun_device_created_and_removed():
    with netns.netns() as ns:
        with netns.tuntap(ns, "sstt0", addr="198.18.251.1/24") as dev:
            assert dev in ns.links()
            assert "198.18.251.1/24" in ns.ip("addr", "show", dev).stdout
        assert dev not in ns.links()


def test_cleanup_stale_removes_only_namespaces_of_dead_creators():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.DEFAULT_PREFIX}-{dead.pid}-0dead"
    netns.run(["ip", "netns", "add", stale])
    try:
        with netns.netns() as mine:
            removed = netns.cleanup_stale()
            assert stale in removed
            assert mine.name not in removed and mine.name in netns.list_netns()
        assert stale not in netns.list_netns()
    finally:
        netns.delete_netns(stale)


def test_delete_is_idempotent():
    ns = netns.create_netns()
    netns.delete_netns(ns)
    netns.delete_netns(ns)
    assert ns.name not in netns.list_netns()
