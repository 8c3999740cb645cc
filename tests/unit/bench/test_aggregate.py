"""Percentiles, rates, time series and ratios of the bench (pure arithmetic)."""

from __future__ import annotations

import random
import statistics

import pytest

from shardstack.bench.aggregate import (
    Tick,
    cpu_summary,
    human_rate,
    interval_rates,
    latency_summary,
    percentile,
    quantile_key,
    rate,
    ratio,
)


def test_percentile_matches_the_standard_librarys_inclusive_quantiles():
    # statistics.quantiles(method="inclusive") is the same type-7 definition,
    # computed independently: every cut point must agree.
    rng = random.Random(7)
    for n in (2, 3, 10, 101, 1000):
        data = sorted(rng.expovariate(1 / 80.0) for _ in range(n))
        cuts = statistics.quantiles(data, n=100, method="inclusive")
        for q in range(1, 100):
            assert percentile(data, q) == pytest.approx(cuts[q - 1], rel=1e-12, abs=1e-12)


def test_percentile_ends_are_min_and_max_and_interpolate_between():
    data = [10.0, 20.0, 30.0, 40.0]
    assert percentile(data, 0) == 10.0
    assert percentile(data, 100) == 40.0
    assert percentile(data, 50) == 25.0  # rank 1.5: halfway between 20 and 30
    assert percentile([5.0], 99.9) == 5.0


@pytest.mark.parametrize("q", [-0.1, 100.1])
def test_percentile_rejects_q_outside_0_100(q):
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], q)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_quantile_keys_name_p999():
    assert [quantile_key(q) for q in (50, 90, 99, 99.9)] == ["p50", "p90", "p99", "p999"]


def test_latency_summary_sorts_and_names_every_quantile():
    samples = [float(x) for x in range(1000, 0, -1)]  # 1000..1, unsorted input
    s = latency_summary(samples)
    assert s["count"] == 1000
    assert s["min"] == 1.0 and s["max"] == 1000.0
    assert s["mean"] == pytest.approx(500.5)
    assert s["p50"] == pytest.approx(500.5)
    assert s["p99"] == pytest.approx(990.01)
    assert s["p999"] == pytest.approx(999.001)
    assert latency_summary([]) == {"count": 0}


def test_rate_never_divides_by_zero():
    assert rate(10, 2.0) == 5.0
    assert rate(10, 0.0) == 0.0


def test_interval_rates_differentiate_cumulative_ticks():
    ticks = [Tick(0.5, 50, 500), Tick(1.0, 150, 1500), Tick(1.0, 150, 1500), Tick(2.0, 250, 1500)]
    assert interval_rates(ticks) == [(0.5, 100.0, 1000.0), (1.0, 200.0, 2000.0),
                                     (2.0, 100.0, 0.0)]


def test_ratio_is_none_without_both_figures():
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(None, 100.0) is None
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None


def test_cpu_summary_per_role_over_samples():
    samples = [
        {"procs": {"client": {"cpu": 50.0, "rss": 100.0, "ctx_per_s": 10.0}}},
        {"procs": {"client": {"cpu": 100.0, "rss": 300.0, "ctx_per_s": 30.0},
                   "worker-0": {"cpu": 20.0, "rss": 50.0}}},
    ]
    s = cpu_summary(samples)
    assert s["client"] == {"cpu_mean": 75.0, "cpu_max": 100.0, "rss_max": 300.0,
                           "ctx_per_s_mean": 20.0}
    assert s["worker-0"]["cpu_mean"] == 20.0
    assert cpu_summary([]) == {}


@pytest.mark.parametrize("value,unit,text", [
    (1.71e9, "B/s", "1.71 GB/s"),
    (592.8e6, "B/s", "592.80 MB/s"),
    (10_800.0, "/s", "10.8k/s"),
    (1570.4, "/s", "1570/s"),
    (73.2, "us", "73 µs"),
    (19_180.0, "us", "19.18 ms"),
    (None, "/s", "n/a"),
])
def test_human_rate(value, unit, text):
    assert human_rate(value, unit) == text
