"""`shardstack` argument handling: serve's validation, ss/stats without a stack."""

from __future__ import annotations

import json

import pytest

from shardstack import cli
from shardstack.config import ConfigError, ServeConfig, parse_cidr

GOOD = ["serve", "--tun", "ss0", "--addr", "198.18.0.2/24"]


def _config(argv, tmp_path):
    args = cli.build_parser().parse_args(argv + ["--run-dir", str(tmp_path)])
    return cli.serve_config(args)


def test_good_serve_config(tmp_path):
    cfg = _config(GOOD + ["--workers", "2", "--peer", "198.18.0.1/24", "--echo", "7",
                          "--echo", "8", "--discard", "9", "--mtu", "9000"], tmp_path)
    assert cfg.workers == 2 and cfg.device == "tun" and cfg.ifname == "ss0"
    assert cfg.addr == parse_cidr("198.18.0.2/24")
    assert cfg.peer.addr == "198.18.0.1"
    assert cfg.echo_ports == [7, 8] and cfg.discard_ports == [9] and cfg.mtu == 9000
    assert len(cfg.secret) == 32
    # what children receive is what the supervisor validated
    again = ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert not cfg.pin  # the scheduler places workers unless asked
    assert _config(GOOD + ["--pin"], tmp_path).pin
    # Pacing every connection is opt-in (Linux with CUBIC and no fq paces only
    # SO_MAX_PACING_RATE sockets), and reaches the children.
    assert not cfg.pacing
    paced = _config(GOOD + ["--pacing"], tmp_path)
    assert paced.pacing and ServeConfig.from_dict(json.loads(json.dumps(paced.to_dict()))).pacing
    assert cfg.metrics is None
    assert _config(GOOD + ["--metrics", "9464"], tmp_path).metrics == "9464"
    assert cfg.rebalance == "auto"
    assert _config(GOOD + ["--rebalance", "off"], tmp_path).rebalance == "off"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "--workers"),
        (["--mtu", "100"], "--mtu"),
        (["--addr", "198.18.0.300/24"], "--addr"),
        (["--peer", "198.18.0.2/24"], "differ"),
        (["--echo", "7", "--discard", "7"], "more than one service"),
        (["--echo", "70000"], "out of range"),
        (["--gateway", "198.19.0.1"], "--gateway"),
        (["--impair", "loss=banana"], "--impair"),
        (["--metrics", "localhost:http"], "--metrics port"),
        (["--metrics", "70000"], "out of range"),
        (["--metrics", "example.org:9464"], "--metrics address"),
    ],
)
def test_serve_config_errors(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _config(GOOD + extra, tmp_path)


def test_peer_needs_tun(tmp_path):
    argv = ["serve", "--packet", "veth0", "--addr", "198.18.0.2/24", "--peer", "198.18.0.1/24"]
    with pytest.raises(ConfigError, match="--tun"):
        _config(argv, tmp_path)


def test_long_ifname(tmp_path):
    with pytest.raises(ConfigError, match="interface name"):
        _config(["serve", "--tun", "x" * 16, "--addr", "198.18.0.2/24"], tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--addr", "198.18.0.2/24"],  # no device
        ["serve", "--tun", "a", "--packet", "b", "--addr", "198.18.0.2/24"],  # two devices
        ["serve", "--tun", "a"],  # no address
        ["serve", "--tun", "a", "--addr", "198.18.0.2/24", "--workers", "two"],
        ["frobnicate"],
        ["serve", "--tun", "a", "--addr", "198.18.0.2/24", "--rebalance", "sometimes"],
    ],
)
def test_parser_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_validation_errors_exit_2_with_serve_usage(capsys, tmp_path):
    with pytest.raises(SystemExit) as ei:
        cli.main(GOOD + ["--mtu", "10", "--run-dir", str(tmp_path)])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "shardstack serve" in err and "--mtu" in err


@pytest.mark.parametrize("cmd", [["ss"], ["stats"], ["reta"], ["reta", "move", "5", "1"],
                                 ["reload"]])
def test_ss_and_stats_without_a_stack(cmd, tmp_path, capsys):
    assert cli.main([*cmd, "--run-dir", str(tmp_path)]) == 1
    assert "no stack running" in capsys.readouterr().err


@pytest.mark.parametrize("words", [["move"], ["move", "5"], ["mv", "5", "1"],
                                   ["move", "five", "1"], ["move", "5", "1", "2"]])
def test_reta_move_usage(words, tmp_path, capsys):
    assert cli.main(["reta", *words, "--run-dir", str(tmp_path)]) == 2
    assert "usage: shardstack reta move BUCKET WORKER" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "serve" in capsys.readouterr().out


def test_ipv6_and_dual_stack_serve_config(tmp_path):
    v6 = _config(["serve", "--tun", "ss0", "--addr", "2001:db8::2/64",
                  "--peer", "2001:db8::1/64"], tmp_path)
    assert v6.addr is None and v6.peer is None
    assert v6.addr6 == parse_cidr("2001:db8::2/64") and v6.addr6.v6
    assert v6.peer6.addr == "2001:db8::1" and v6.addr6.text == "2001:db8::2/64"
    assert [c.text for c in v6.addrs] == ["2001:db8::2/64"]
    dual = _config(GOOD + ["--addr", "2001:db8::2/64", "--peer", "198.18.0.1/24",
                           "--peer", "2001:db8::1/64"], tmp_path)
    assert dual.addr.addr == "198.18.0.2" and dual.addr6.addr == "2001:db8::2"
    assert [c.addr for c in dual.addrs] == ["198.18.0.2", "2001:db8::2"]
    assert ServeConfig.from_dict(json.loads(json.dumps(dual.to_dict()))) == dual


@pytest.mark.parametrize("extra, message", [
    (["--addr", "2001:db8::3/64", "--addr", "2001:db8::2/64"], "one IPv4 and one IPv6"),
    (["--addr", "198.18.0.3/24"], "one IPv4 and one IPv6"),
    (["--peer", "2001:db8::1/64"], "no --addr of its family"),
    (["--addr", "ff02::1/64"], "unicast"),
    (["--addr", "::ffff:198.18.0.9/128"], "unicast"),
    (["--addr", "2001:db8::2/64", "--peer", "2001:db8::2/64"], "differ"),
])
def test_ipv6_serve_config_errors(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _config(GOOD + extra, tmp_path)
