"""`shardstack stats` shows every drop reason and every limit a worker hit (issue 11)."""

from __future__ import annotations

import pytest

from shardstack.cli import _parse_tcp_mem
from shardstack.config import ConfigError
from shardstack.stats import format_stats


def test_stats_show_drop_reasons_and_limits_hit():
    st = {"workers": [{"id": 0, "counters": {"drops": {"TCP_MEM": 3, "TCP_OPT_OVERRUN": 2}},
                       "shard": {"ofo_drop": 5, "sack_capped": 7, "tcp_mem_pressures": 1,
                                 "segs_in": 99}},
                      {"id": 1, "counters": {"drops": {}}, "shard": {}}]}
    text = format_stats(st)
    assert "worker 0 drops: TCP_MEM=3 TCP_OPT_OVERRUN=2" in text
    assert "worker 0 limits hit: ofo_drop=5 sack_capped=7 tcp_mem_pressures=1" in text
    assert "worker 1 limits hit" not in text and "segs_in" not in text


def test_tcp_mem_flag():
    assert _parse_tcp_mem("1,2,3") == [1 << 20, 2 << 20, 3 << 20]
    assert _parse_tcp_mem(None) == []
    for bad in ("1,2", "3,2,1", "a,b,c"):
        with pytest.raises(ConfigError):
            _parse_tcp_mem(bad)
