"""`shardstack stats` names the path's signals (ECN marks echoed, PLPMTUD probes and black
holes) per worker when there are any, and says nothing of them otherwise."""

from __future__ import annotations

from shardstack.stats import format_stats


def _st(shard: dict[str, int]) -> dict:
    return {"run_dir": "/x", "workers": [{"id": 0, "proc": {"pid": 1}, "counters": {},
                                          "shard": shard}]}


def test_path_signals_line() -> None:
    out = format_stats(_st({"tcp_delivered_ce": 12, "tcp_mtup_probes": 6,
                            "tcp_mtup_success": 2, "tcp_mtup_fail": 4, "tcp_mtup_blackholes": 0}))
    line = next(x for x in out.splitlines() if "path signals" in x)
    assert line == ("worker 0 path signals: tcp_delivered_ce=12 tcp_mtup_fail=4 "
                    "tcp_mtup_probes=6 tcp_mtup_success=2")


def test_no_line_without_signals() -> None:
    assert "path signals" not in format_stats(_st({"tcp_delivered_ce": 0}))
