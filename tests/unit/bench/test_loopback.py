"""The load client against the bench's own servers, on loopback (no root needed).

Short, count-bounded runs: they check that every mode moves the bytes it
claims (echo returns what was sent, the source sends exactly what was asked,
discard reads to EOF), not how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def services():
    proc = subprocess.Popen([sys.executable, "-m", "shardstack.bench.servers", "--bind",
                             "127.0.0.1", "--echo", "0", "--discard", "0", "--source", "0",
                             "--udp-echo", "0", "--max-seconds", "60"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "READY"
        yield {k: int(v) for k, v in (kv.split("=") for kv in line[1:])}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _client(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "shardstack.bench.client", *args,
                          "--host", "127.0.0.1", "--seconds", "5"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_rr_counts_exactly_max_ops_round_trips(services):
    *ticks, res = _client("rr", "--port", str(services["echo"]), "--size", "64",
                          "--max-ops", "500")
    assert res["type"] == "result" and res["ops"] == 500 and res["bytes"] == 500 * 64
    assert res["latency_count"] == 500
    assert 0 < res["min_us"] <= res["p50_us"] <= res["p99_us"] <= res["p999_us"] <= res["max_us"]
    assert ticks and ticks[-1]["ops"] == 500


def test_crr_transactions_with_concurrent_connections(services):
    *_, res = _client("crr", "--port", str(services["echo"]), "--size", "100", "--conns", "4",
                      "--max-ops", "200")
    assert res["ops"] == 200 and res["bytes"] == 200 * 100 and res["errors"] == 0


def test_bulk_recv_gets_exactly_what_it_asked_for(services):
    *_, res = _client("bulk-recv", "--port", str(services["source"]), "--max-bytes", "3000000")
    assert res["bytes"] == 3_000_000 and res["server_eof"] is False  # stopped at the byte bound
    *_, res = _client("bulk-recv", "--port", str(services["source"]), "--max-bytes", "1")
    assert res["bytes"] == 1


def test_bulk_send_waits_for_the_discard_servers_fin(services):
    *_, res = _client("bulk-send", "--port", str(services["discard"]), "--max-bytes", "5000000")
    assert res["bytes"] == 5_000_000 and res["server_eof"] is True


def test_probe_reports_a_closed_port():
    out = subprocess.run([sys.executable, "-m", "shardstack.bench.client", "probe", "--host",
                          "127.0.0.1", "--port", "1", "--seconds", "0.3"],
                         capture_output=True, text=True, timeout=30)
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["ok"] is False and "Refused" in res["last_error"]


def test_udp_rr_counts_exactly_max_ops_round_trips(services):
    (res,) = [r for r in _client("udp-probe", "--port", str(services["udp-echo"]))
              if r["type"] == "result"]
    assert res["ok"]
    *_, res = _client("udp-rr", "--port", str(services["udp-echo"]), "--size", "64",
                      "--max-ops", "300")
    assert res["type"] == "result" and res["ops"] == 300 and res["bytes"] == 300 * 64
    assert res["latency_count"] == 300 and 0 < res["p50_us"] <= res["max_us"]
