"""The pure parts of shardstack.netns and the demo: address range, names, arguments."""

from __future__ import annotations

import ipaddress
import os

import pytest

from shardstack import demo, netns


@pytest.mark.parametrize("addr", ["198.18.0.1/24", "198.19.255.254/24", "198.18.7.0/24",
                                  "198.19.1.1"])
def test_addresses_inside_the_benchmark_range_are_accepted(addr):
    assert netns.check_address(addr).ip in netns.BENCH_NET


@pytest.mark.parametrize("addr", ["10.0.0.1/24", "192.168.1.1/24", "198.17.255.255/32",
                                  "198.20.0.1/24", "198.18.0.1/8", "8.8.8.8"])
def test_addresses_outside_the_benchmark_range_are_refused(addr):
    with pytest.raises(ValueError):
        netns.check_address(addr)


def test_subnets_stay_inside_198_18_0_0_15_and_wrap():
    nets = {netns.subnet(i) for i in range(600)}
    assert len(nets) == 512  # every /24 of the /15, then it wraps
    assert all(n.subnet_of(netns.BENCH_NET) for n in nets)
    assert netns.subnet(0) == ipaddress.ip_network("198.18.0.0/24")
    assert netns.subnet(511) == ipaddress.ip_network("198.19.255.0/24")
    assert netns.subnet(512) == netns.subnet(0)
    assert netns.subnet(3, prefix=30) == ipaddress.ip_network("198.18.0.12/30")
    assert netns.next_subnet().subnet_of(netns.BENCH_NET)


def test_host_addresses():
    net = ipaddress.ip_network("198.18.3.0/24")
    assert netns.host(net, 1) == "198.18.3.1/24"
    assert netns.host(net, 2) == "198.18.3.2/24"


def test_unique_names_carry_prefix_and_pid_and_fit_ifnamsiz():
    names = {netns.unique_name("ssb") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.startswith(f"ssb-{os.getpid()}-")
        assert netns._NAME_RE.match(name)
    with pytest.raises(ValueError):
        netns.unique_name("Bad-Prefix")


def test_demo_summary_is_ok_only_when_every_fetch_matches():
    s = demo.Summary()
    assert not s.ok and not s.sha_ok  # nothing fetched is not a success
    s.fetches = [demo.Fetch("curl", "u", 200, 3, "aa", "aa"),
                 demo.Fetch("urllib", "u", 200, 3, "bb", "bb")]
    assert s.ok and s.sha_ok and s.to_dict()["bytes_fetched"] == 6
    s.fetches.append(demo.Fetch("curl", "u", 200, 3, "cc", "dd"))
    assert not s.ok and not s.sha_ok and s.to_dict()["sha256_match"] is False
    s.fetches[-1] = demo.Fetch("curl", "u", 500, 3, "dd", "dd")
    assert s.sha_ok and not s.ok


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--workers", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        demo.main(["--path", "sideways"])
    assert e.value.code == 2


def test_ipv6_test_addresses_only_from_documentation_and_ula():
    from shardstack import netns as nsmod

    assert nsmod.check_address("2001:db8:5::2/64").version == 6
    assert nsmod.check_address("fd00:1::1/64").version == 6
    for bad in ("2001:470::1/64", "fe80::1/64", "::1/128", "2001:db8::/16"):
        with pytest.raises(ValueError):
            nsmod.check_address(bad)
    for i in (0, 1, 70000):
        assert nsmod.subnet6(i).subnet_of(nsmod.TEST_NETS6[0]) and nsmod.subnet6(i).prefixlen == 64
