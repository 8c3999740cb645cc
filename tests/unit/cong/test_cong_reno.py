"""tcp_cong: the interface, the registry and Reno (RFC 5681, RFC 3465, RFC 6582)."""

from __future__ import annotations

import errno

import pytest
from shardstack.core import tcp_cong
from shardstack.core.tcp_cong import INFINITE_SSTHRESH, CaState, Reno
from shardstack.core.tcp_cubic import Cubic

RTT = 0.05


def reno() -> Reno:
    cc = Reno()
    cc.init(1460, 0.0)
    return cc


def one_rtt(cc: tcp_cong.CongestionControl, now: float, rtt: float = RTT) -> float:
    """Ack a full window one segment at a time, the sender keeping it full."""
    n = cc.cwnd
    for j in range(n):
        cc.on_ack(1, rtt, now + rtt * j / n, cc.cwnd)
    return now + rtt


# -- registry ------------------------------------------------------------------------------


def test_registry_names_default_and_unknown() -> None:
    assert tcp_cong.DEFAULT == "cubic"
    assert isinstance(tcp_cong.get()(), Cubic)
    assert isinstance(tcp_cong.get("reno")(), Reno)
    assert {"cubic", "reno"} <= set(tcp_cong.available())
    with pytest.raises(OSError) as ei:
        tcp_cong.get("vegas")
    assert ei.value.errno == errno.ENOENT


def test_register_new_algorithm() -> None:
    class Fixed(Reno):
        name = "fixed-test"
        __slots__ = ()

    tcp_cong.register("fixed-test", Fixed)
    assert tcp_cong.get("fixed-test") is Fixed
    assert "fixed-test" in tcp_cong.available()


# -- slow start ----------------------------------------------------------------------------


def test_initial_window_is_ten_segments() -> None:
    cc = reno()
    assert cc.cwnd == 10  # RFC 6928
    assert cc.ssthresh == INFINITE_SSTHRESH
    assert cc.cwnd_bytes == 14600
    assert cc.ca_state == CaState.OPEN


def test_slow_start_doubles_per_rtt() -> None:
    cc = reno()
    now = 0.0
    for expect in (20, 40, 80, 160):
        now = one_rtt(cc, now)
        assert cc.cwnd == expect


def test_abc_limits_growth_to_two_segments_per_ack() -> None:
    cc = reno()
    cc.on_ack(5, RTT, 0.0, 10)  # a stretch ACK covering 5 segments (RFC 3465 L=2)
    assert cc.cwnd == 12
    cc.on_ack(1, RTT, 0.001, 12)
    assert cc.cwnd == 13
    cc.on_ack(0.5, RTT, 0.002, 13)  # half a segment: counted, applied when whole
    assert cc.cwnd == 13
    cc.on_ack(0.5, RTT, 0.003, 13)
    assert cc.cwnd == 14


def test_slow_start_stops_at_ssthresh_then_additive_increase() -> None:
    cc = reno()
    cc.ssthresh = 12
    cc.on_ack(2, RTT, 0.0, 10)
    assert cc.cwnd == 12 and not cc.in_slow_start
    cc.on_ack(2, RTT, 0.01, 12)  # in CA now: 2/12 of a segment
    assert cc.cwnd == 12
    now = 0.02
    before = cc.cwnd
    now = one_rtt(cc, now)
    assert cc.cwnd == before + 1  # RFC 5681 eq. 3: one segment per RTT


def test_congestion_avoidance_one_segment_per_window() -> None:
    cc = reno()
    cc.ssthresh = 30
    cc.cwnd = 30
    now = 0.0
    for k in range(1, 11):
        now = one_rtt(cc, now)
        assert cc.cwnd == 30 + k


def test_no_growth_when_not_cwnd_limited() -> None:
    cc = reno()
    for i in range(50):
        cc.on_ack(1, RTT, i * 0.1, 3)  # application-limited: 3 of 10 segments used
    assert cc.cwnd == 10
    cc.on_ack(1, RTT, 10.0, None)  # unknown flight: assume limited
    assert cc.cwnd == 11


# -- loss, recovery, RTO -------------------------------------------------------------------


def test_fast_retransmit_and_newreno_recovery() -> None:
    cc = reno()
    cc.cwnd = 40
    cc.on_dup_ack()
    assert cc.ca_state == CaState.DISORDER
    cc.on_loss(1.0, 40)
    assert cc.ssthresh == 20  # RFC 5681 eq. 4: FlightSize / 2
    assert cc.cwnd == 23  # ssthresh + 3 dup ACKs (RFC 6582 §3.2 step 2)
    assert cc.ca_state == CaState.RECOVERY and cc.in_recovery
    for _ in range(5):
        cc.on_dup_ack()  # inflate (RFC 6582 §3.2 step 4)
    assert cc.cwnd == 28
    cc.on_loss(1.01, 40)  # a second loss in the same window: no second reduction
    assert cc.ssthresh == 20 and cc.cwnd == 28
    cc.on_ack(4, RTT, 1.05, 28)  # partial ACK: deflate by 4, add back 1 (step 5)
    assert cc.cwnd == 25
    cc.on_recovery_exit(1.1)
    assert cc.cwnd == 20 and cc.ca_state == CaState.OPEN


def test_ssthresh_never_below_two_segments() -> None:
    cc = reno()
    cc.on_loss(0.0, 3)
    assert cc.ssthresh == 2
    cc.on_recovery_exit(0.1)
    cc.on_rto(0.2, 1)
    assert cc.ssthresh == 2 and cc.cwnd == 1


def test_rto_sets_loss_window_and_slow_starts() -> None:
    cc = reno()
    cc.cwnd = 50
    cc.on_rto(2.0, 48)
    assert (cc.cwnd, cc.ssthresh, cc.ca_state) == (1, 24, CaState.LOSS)
    cc.on_rto(3.0, 1)  # backed-off RTO for the same data keeps ssthresh
    assert (cc.cwnd, cc.ssthresh) == (1, 24)
    now = 3.0
    for expect in (2, 4, 8, 16):
        now = one_rtt(cc, now)
        assert cc.cwnd == expect
    assert cc.ca_state == CaState.LOSS
    now = one_rtt(cc, now)
    assert cc.cwnd == 24  # 8 ACKs reach ssthresh, 8 more are 8/24 of CA growth
    assert cc.ca_state == CaState.OPEN  # slow start refilled up to ssthresh


def test_dup_ack_without_loss_returns_to_open() -> None:
    cc = reno()
    cc.on_dup_ack()
    assert cc.ca_state == CaState.DISORDER
    cc.on_ack(1, RTT, 0.0, 10)
    assert cc.ca_state == CaState.OPEN and cc.cwnd == 11


def test_undo_restores_window_after_spurious_reduction() -> None:
    cc = reno()
    cc.cwnd = 60
    cc.on_loss(1.0, 60)
    assert cc.cwnd == 33
    cc.undo()
    assert (cc.cwnd, cc.ssthresh, cc.ca_state) == (60, INFINITE_SSTHRESH, CaState.OPEN)
    cc.undo()  # nothing left to undo
    assert cc.cwnd == 60


def test_idle_restart_window() -> None:
    cc = reno()
    cc.cwnd = 80
    cc.on_idle_restart(5.0, idle=0.1, rto=0.2)
    assert cc.cwnd == 80
    cc.on_idle_restart(5.0, idle=1.0, rto=0.2)  # RFC 5681 §4.1
    assert cc.cwnd == 10
