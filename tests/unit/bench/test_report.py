"""Telemetry parsing, result aggregation into the summary table, the client's bookkeeping."""

from __future__ import annotations

import io
import json
import os
import types

import pytest

from shardstack.bench import client, report
from shardstack.bench import scenarios as sc
from shardstack.bench.runner import RunRecord
from shardstack.bench.telemetry import (
    Telemetry,
    frames_from_stats,
    role_from_cmdline,
    roles_from_stats,
    worker_connections,
)

STATS = {
    "ok": True,
    "supervisor": {"proc": {"pid": 100}},
    "netio": {"proc": {"pid": 101},
              "counters": {"netio": {"rx_frames": 40, "tx_replies": 2},
                           "dispatch": {"per_worker": [20, 18]}}},
    "workers": [
        {"id": 0, "proc": {"pid": 102}, "counters": {"frames_out": 30, "connections": 3}},
        {"id": 1, "proc": {"pid": 103}, "counters": {"frames_out": 25, "connections": 1}},
    ],
}


def test_frames_from_stats_adds_netio_rx_and_every_tx():
    assert frames_from_stats(STATS) == 40 + 2 + 30 + 25
    assert frames_from_stats({"workers": []}) is None
    assert frames_from_stats(None) is None
    assert frames_from_stats({"netio": {"counters": {"netio": {"rx_frames": "x"}}}}) is None


def test_roles_and_connections_from_stats():
    assert roles_from_stats(STATS) == {100: "supervisor", 101: "netio", 102: "worker-0",
                                       103: "worker-1"}
    assert worker_connections(STATS) == {"0": 3, "1": 1}
    assert worker_connections(None) == {}


@pytest.mark.parametrize("cmd,role", [
    ("python -m shardstack.netio_adapter", "netio"),
    ("python -m shardstack.worker --id 3", "worker-3"),
    ("python -m shardstack.worker", "worker"),
    ("python -m http.server", "app-child"),
])
def test_role_from_cmdline(cmd, role):
    assert role_from_cmdline(cmd, "app") == role


def test_telemetry_samples_this_process_with_cpu_from_deltas():
    tel = Telemetry(stats=lambda: STATS)
    tel.watch("client", os.getpid())
    tel.watch("gone", None)  # a role without a pid is ignored
    first = tel.sample()
    assert first["procs"]["client"]["cpu"] == 0.0  # no previous sample yet
    x = 0
    for i in range(300_000):  # burn measurable CPU between the two samples
        x += i * i
    tel._stats_at = -10.0  # let the stats poll happen again (it is rate-limited)
    second = tel.sample()
    me = second["procs"]["client"]
    assert me["cpu"] > 0.0 and me["rss"] > 1e6 and me["nprocs"] == 1
    assert tel.pid_roles[102] == "worker-0"
    assert second.get("frames_per_s") == 0.0  # counters did not move between the polls


def _rec(case, variant, workers, status="ok", reason="", **result):
    return RunRecord(case, case.split("-")[0], variant, workers, status, reason, result)


def test_summarize_puts_variants_side_by_side_with_ratios_and_reasons():
    cases = sc.cases_for("rr") + sc.cases_for("crr", 8)
    records = [
        _rec("rr-64B", "kernel", 0, p50_us=60.0, p99_us=90.0, p999_us=150.0, ops_per_s=15000.0),
        _rec("rr-64B", "shardstack-tun", 2, p50_us=240.0, p99_us=400.0, p999_us=900.0,
             ops_per_s=4000.0),
        _rec("rr-64B", "shardstack-packet", 2, "n/a", "no --packet yet"),
        _rec("crr-8conn", "kernel", 0, ops_per_s=12000.0, p50_us=400.0, p99_us=900.0),
        _rec("crr-8conn", "shardstack-tun", 2, ops_per_s=3000.0, p50_us=1600.0, p99_us=4000.0),
        _rec("crr-8conn", "shardstack-tun", 1, ops_per_s=1800.0),  # a scaling run
        _rec("crr-8conn", "shardstack-packet", 2, "error", "client gave no result"),
    ]
    variants = ["kernel", "shardstack-tun", "shardstack-packet"]
    rows = report.summarize(cases, records, variants, workers=2)
    by = {(r["case"], r["metric"]): r for r in rows}
    rr = by[("rr-64B", "p50_us")]
    assert rr["values"] == {"kernel": 60.0, "shardstack-tun": 240.0, "shardstack-packet": None}
    assert rr["ratio"] == {"shardstack-tun": 4.0, "shardstack-packet": None}
    assert rr["higher_is_better"] is False
    assert rr["reasons"] == {"shardstack-packet": "n/a: no --packet yet"}
    crr = by[("crr-8conn", "ops_per_s")]
    assert crr["values"]["shardstack-tun"] == 3000.0  # the 2-worker run, not the scaling one
    assert crr["ratio"]["shardstack-tun"] == 0.25
    assert report.scaling(records) == {"crr-8conn": [(1, 1800.0), (2, 3000.0)]}
    text = report.table(rows, variants)
    assert "n/a[1]" in text and "[1] n/a: no --packet yet" in text
    assert "[2] error: client gave no result" in text
    assert "4.00x" in text and "0.25x" in text


def test_a_failed_run_never_yields_a_number():
    rec = _rec("rr-64B", "shardstack-tun", 2, "error", "reset", p50_us=5.0)
    assert rec.metric("p50_us") is None
    assert _rec("rr-64B", "kernel", 0, p50_us=5).metric("p50_us") == 5.0
    assert _rec("rr-64B", "kernel", 0, p50_us="x").metric("p50_us") is None


def test_reporter_writes_ticks_and_a_result_as_json_lines():
    out = io.StringIO()
    rep = client.Reporter(out)
    for us in (10.0, 20.0, 30.0, 40.0):
        rep.sample(us)
        rep.ops += 1
        rep.nbytes += 64
    rep.tick(rep.start + 0.5)
    rep.error("timeout")
    res = rep.result("rr", elapsed=2.0)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == {"type": "tick", "t": 0.5, "ops": 4, "bytes": 256, "errors": 0,
                        "p50_us": 25.0, "p99_us": 39.7}
    assert lines[-1] == res
    assert res["ops_per_s"] == 2.0 and res["bytes_per_s"] == 128.0
    assert res["p50_us"] == 25.0 and res["latency_count"] == 4
    assert res["error_kinds"] == {"timeout": 1}


def test_reporter_stops_a_run_that_only_errors():
    rep = client.Reporter(io.StringIO())
    with pytest.raises(RuntimeError, match="too many errors"):
        for _ in range(client.MAX_ERRORS):
            rep.error("ECONNREFUSED")


def _txn(data: bytes):
    t = client._Txn.__new__(client._Txn)
    t.inbuf = bytearray(data)
    return t


HTTP = types.SimpleNamespace(mode="http", size=0)


@pytest.mark.parametrize("reply,ok,nbytes", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", True, 5),
    (b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nno length", True, 9),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nshort", False, 1),
    (b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n", False, 1),
    (b"garbage", False, 1),
])
def test_http_reply_check(reply, ok, nbytes):
    assert client._check_reply(_txn(reply), HTTP) == (ok, nbytes)


def test_crr_reply_must_be_the_full_echo():
    a = types.SimpleNamespace(mode="crr", size=100)
    assert client._check_reply(_txn(b"q" * 100), a) == (True, 100)
    assert client._check_reply(_txn(b"q" * 99), a) == (False, 99)


def test_client_rejects_unbounded_runs(capsys):
    assert client.main(["rr", "--host", "127.0.0.1", "--port", "1", "--seconds", "0"]) == 2
    assert client.main(["rr", "--host", "127.0.0.1", "--port", "1", "--seconds", "9999"]) == 2


def test_progress_overwrites_one_line_on_a_tty():
    from shardstack.bench.progress import Progress

    out = io.StringIO()
    p = Progress(out, tty=True)
    p.update("running 1.0 s  long status", now=0.0)
    p.update("running 2.0 s", now=0.1)
    p.line("done")
    text = out.getvalue()
    assert text.startswith("\rrunning 1.0 s  long status")
    # the shorter status is padded over the longer one, and the final line clears it
    assert "\rrunning 2.0 s" + " " * len("  long status") in text
    assert text.endswith("\rdone\n")


def test_progress_prints_rate_limited_plain_lines_otherwise():
    from shardstack.bench.progress import Progress

    out = io.StringIO()
    p = Progress(out, tty=False, plain_every=2.0)
    for i, t in enumerate([10.0, 10.5, 11.9, 12.0, 13.0, 14.1]):
        p.update(f"tick {i}", now=t)
    p.line("done")
    assert out.getvalue().splitlines() == ["tick 0", "tick 3", "tick 5", "done"]


def test_lossy_table_puts_kernel_stack_and_ratio_per_link():
    cases = sc.plan(["lossy"], quick=True)
    recs = []
    for c in cases:
        for v, fig in (("kernel", 1000.0), ("shardstack-packet", 500.0)):
            res = {c.metric: fig, "ops_per_s": 10.0, "p50_us": 5.0}
            recs.append(RunRecord(c.key, c.scenario, v, 2 if v != "kernel" else 0, "ok",
                                  result=res))
    rows = report.summarize(cases, recs, ["kernel", "shardstack-packet"], 2)
    text = report.lossy_table(rows)
    lines = text.splitlines()
    assert lines[2].startswith("l3-r0-d2") and lines[3].startswith("l1-r10-d10")
    assert lines[2].count("0.50") == 3  # upload, download, rr p99: stack/kernel
    assert report.lossy_table(report.summarize(sc.cases_for("rr"), [], ["kernel"], 2)) == ""
