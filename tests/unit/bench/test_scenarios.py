"""The scenario specs and the bench's command line."""

from __future__ import annotations

import pytest

from shardstack import bench
from shardstack.bench import scenarios as sc
from shardstack.bench.runner import client_argv


def test_parse_scenarios_keeps_canonical_order_and_defaults_to_all():
    assert sc.parse_scenarios("rr,bulk") == ["bulk", "rr"]
    assert sc.parse_scenarios(" http , crr ") == ["crr", "http"]
    assert sc.parse_scenarios(None) == list(sc.SCENARIOS)
    assert sc.parse_scenarios("all") == list(sc.SCENARIOS)


def test_parse_scenarios_names_the_unknown_one():
    with pytest.raises(ValueError, match="bogus"):
        sc.parse_scenarios("bulk,bogus")


def test_each_scenario_expands_into_its_cases():
    keys = [c.key for c in sc.plan(list(sc.SCENARIOS), conns=16)]
    assert keys == ["bulk-upload", "bulk-download", "crr-16conn", "rr-64B", "udp-rr-64B",
                    "http-1KiB", "http-1MiB"]
    up, down = sc.cases_for("bulk")
    assert (up.mode, up.service, up.unit) == ("bulk-send", "discard", "B/s")
    assert (down.mode, down.service) == ("bulk-recv", "source")
    (crr,) = sc.cases_for("crr", 16)
    assert (crr.size, crr.conns, crr.service, crr.higher_is_better) == (100, 16, "echo", True)
    (rr,) = sc.cases_for("rr")
    assert (rr.size, rr.conns, rr.metric, rr.higher_is_better) == (64, 1, "p50_us", False)
    small, big = sc.cases_for("http", 8)
    assert (small.size, big.size) == (1024, 1024 * 1024)
    assert sc.http_files(big) == {"f1048576.bin": 1024 * 1024}
    (u,) = sc.cases_for("udp")
    assert (u.mode, u.service, u.size, u.metric) == ("udp-rr", "udp-echo", 64, "p50_us")
    with pytest.raises(ValueError):
        sc.cases_for("sctp")


def test_every_case_is_bounded_in_count_and_time():
    for case in sc.plan(list(sc.SCENARIOS)):
        b = sc.bounds(case, 2.5)
        assert b.seconds == 2.5
        assert 0 < b.max_ops < 10_000_000
        assert 0 < b.max_bytes < 1 << 40
    with pytest.raises(ValueError):
        sc.bounds(sc.cases_for("rr")[0], 0)


def test_client_argv_carries_the_bounds_and_the_case():
    (crr,) = sc.cases_for("crr", 4)
    argv = client_argv(crr, "198.18.0.2", 7, sc.bounds(crr, 3.0))
    i = argv.index("crr")
    assert argv[i + 1:i + 5] == ["--host", "198.18.0.2", "--port", "7"]
    assert argv[argv.index("--seconds") + 1] == "3"
    assert argv[argv.index("--max-ops") + 1] == str(sc.bounds(crr, 3.0).max_ops)
    assert argv[argv.index("--conns") + 1] == "4"
    assert argv[argv.index("--size") + 1] == "100"
    http = sc.cases_for("http")[1]
    argv = client_argv(http, "198.18.0.2", 8000, sc.bounds(http, 1.0))
    assert argv[argv.index("--path") + 1] == "/f1048576.bin"


def test_bench_options_quick_defaults():
    a = bench.options(["--quick"])
    assert a.duration == sc.QUICK_DURATION
    assert a.scenarios == list(sc.SCENARIOS)
    assert a.variant_list == ["kernel", "shardstack-tun", "shardstack-packet"]
    a = bench.options(["--scenario", "rr", "--duration", "4", "--variants", "kernel",
                       "--workers", "3", "--out", "/tmp/x"])
    assert (a.scenarios, a.duration, a.variant_list, a.workers, a.out) == (
        ["rr"], 4.0, ["kernel"], 3, "/tmp/x")


@pytest.mark.parametrize("argv", [
    ["--scenario", "nope"],
    ["--duration", "0"],
    ["--duration", "10000"],
    ["--workers", "0"],
    ["--conns", "0"],
    ["--variants", "kernel,bsd"],
    ["--bogus"],
])
def test_bench_options_reject_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.options(argv)
    assert e.value.code == 2
    assert "usage: shardstack bench" in capsys.readouterr().err


def test_quick_budget_fits_the_two_minute_promise():
    # Cases x variants x seconds, plus the scaling run, must leave room for set-up.
    a = bench.options(["--quick", "--workers", "2"])
    cases = sc.plan(a.scenarios, a.conns)
    runs = len(cases) * len(a.variant_list) + 1  # + crr with 1 worker
    assert runs * a.duration < bench.QUICK_BUDGET * 0.6


def test_single_cases_by_key():
    assert sc.parse_scenarios("bulk-download,rr") == ["rr", "bulk-download"]
    assert [c.key for c in sc.plan(sc.parse_scenarios("bulk-download,rr"))] == ["bulk-download",
                                                                                "rr-64B"]
    # crr's key names the default connection count; --conns still applies
    assert [c.key for c in sc.plan(["crr-8conn", "http-1MiB"], conns=16)] == ["crr-16conn",
                                                                              "http-1MiB"]
    with pytest.raises(ValueError, match="bulk-sideways"):
        sc.parse_scenarios("bulk-sideways")
