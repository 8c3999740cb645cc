"""CUBIC (RFC 9438): the window follows the paper formulas, computed here independently."""

from __future__ import annotations

import pytest
from shardstack.core.tcp_cong import CaState
from shardstack.core.tcp_cubic import Cubic

# RFC 9438 constants, restated here rather than imported so a wrong constant in the
# module fails these tests.
C_RFC = 0.4
BETA_RFC = 0.7
ALPHA_RFC = 3 * (1 - BETA_RFC) / (1 + BETA_RFC)  # §4.3


def k_rfc(w_max: float, cwnd_epoch: float) -> float:
    return ((w_max - cwnd_epoch) / C_RFC) ** (1 / 3)  # §4.2 Figure 2


def w_rfc(t: float, w_max: float, k: float) -> float:
    return C_RFC * (t - k) ** 3 + w_max  # §4.2 Figure 1


def after_loss_at(w: int, rtt: float, **kw: object) -> tuple[Cubic, float]:
    """A CUBIC sender that just recovered from a loss at cwnd = w, at t = 1 + rtt."""
    cc = Cubic(**kw)
    cc.init(1460, 0.0)
    cc.on_ack(1, rtt, 0.0, cc.cwnd)  # an RTT sample
    cc.cwnd = w
    cc.on_loss(1.0, w)
    cc.on_recovery_exit(1.0 + rtt)
    return cc, 1.0 + rtt


def rounds(cc: Cubic, now: float, rtt: float, n: int) -> list[tuple[float, int]]:
    """Run n RTTs, the sender keeping its window full; (time, cwnd) at each RTT end."""
    out = []
    for _ in range(n):
        w = cc.cwnd
        for j in range(w):
            cc.on_ack(1, rtt, now + rtt * j / w, cc.cwnd)
        now += rtt
        out.append((now, cc.cwnd))
    return out


def test_multiplicative_decrease_is_beta() -> None:
    cc, _ = after_loss_at(100, 0.1)
    assert cc.ssthresh == 70 and cc.cwnd == 70  # §4.6
    assert cc.w_max == 100
    cc2, _ = after_loss_at(1000, 0.1)
    assert cc2.ssthresh == 700


def test_minimum_ssthresh_two_segments() -> None:
    cc, _ = after_loss_at(2, 0.1)
    assert cc.ssthresh == 2


@pytest.mark.parametrize(("w_max", "rtt"), [(1000, 0.1), (2500, 0.2), (400, 0.05)])
def test_window_follows_cubic_function(w_max: int, rtt: float) -> None:
    cc, now = after_loss_at(w_max, rtt)
    epoch = now  # the first CA ACK starts the epoch
    k = k_rfc(w_max, BETA_RFC * w_max)
    assert cc.k == 0.0  # not computed before the epoch starts
    checked = 0
    for end, cwnd in rounds(cc, now, rtt, int(1.6 * k / rtt)):
        t = end - epoch
        expect = w_rfc(t, w_max, k)
        assert abs(cwnd - expect) <= max(1.5, 0.005 * expect), (t, cwnd, expect)
        checked += 1
    assert cc.k == pytest.approx(k)
    assert checked > 20
    assert cc.cwnd > w_max  # beyond K: the convex region probes above W_max (§4.5)


def test_plateau_near_w_max() -> None:
    cc, now = after_loss_at(1000, 0.1)
    k = k_rfc(1000, 700)
    epoch = now
    near = [c for t, c in rounds(cc, now, 0.1, int(1.3 * k / 0.1))
            if abs((t - epoch) - k) < 1.0]
    # Around t = K the cubic function is flat at W_max.
    assert near and all(abs(c - 1000) <= 3 for c in near)


def test_growth_is_clamped_to_1_5_cwnd_per_rtt() -> None:
    # Far below W_max, W_cubic(t+RTT) asks for more than 1.5 cwnd (§4.2 clamp).
    cc, now = after_loss_at(10_000, 2.0)
    cc.cwnd = cc.ssthresh = 20  # as if cut much further, W_max unchanged
    cc.cwnd_frac = 0.0
    prev = cc.cwnd
    for _, cwnd in rounds(cc, now, 2.0, 4):
        assert cwnd <= 1.5 * prev + 1
        prev = cwnd
    assert prev > 20 * 1.4**4


def test_fast_convergence() -> None:
    cc, now = after_loss_at(100, 0.1)
    assert cc.w_max == 100
    cc.cwnd = 80  # the next loss comes below the previous W_max: bandwidth is shrinking
    cc.on_loss(now, 80)
    assert cc.w_max == pytest.approx(80 * (1 + BETA_RFC) / 2)  # §4.7
    assert cc.ssthresh == 56
    slow, now = after_loss_at(100, 0.1, fast_convergence=False)
    slow.cwnd = 80
    slow.on_loss(now, 80)
    assert slow.w_max == 80
    # A loss above the previous W_max just records the new maximum.
    cc.on_recovery_exit(now + 0.1)
    cc.cwnd = 120
    cc.on_loss(now + 0.2, 120)
    assert cc.w_max == 120


def test_reno_friendly_region() -> None:
    # Small window, short RTT: Reno's AIMD (alpha_cubic per RTT) beats the cubic curve.
    rtt = 0.01
    cc, now = after_loss_at(20, rtt)
    epoch = now
    k = k_rfc(20, 14)
    w_est = 14.0
    for end, cwnd in rounds(cc, now, rtt, 60):
        w_est += 1.0 if w_est >= 20 else ALPHA_RFC  # §4.3, alpha -> 1 at cwnd_prior
        t = end - epoch
        assert w_rfc(t, 20, k) < w_est  # we are in the Reno-friendly region...
        # ...and follow W_est.  (Per ACK the sender adds alpha/cwnd with the window it
        # has then, slightly less than alpha per round while cwnd grows: allow 6%.)
        assert w_est - max(1.0, 0.06 * w_est) <= cwnd <= w_est + 1.0, (t, cwnd, w_est)
    assert cc.cwnd > 20 + 30  # and kept going beyond W_max at Reno's pace


def test_no_reno_region_with_long_rtt() -> None:
    rtt = 0.3
    cc, now = after_loss_at(200, rtt)
    epoch = now
    k = k_rfc(200, 140)
    for end, cwnd in rounds(cc, now, rtt, 10):
        expect = w_rfc(end - epoch, 200, k)
        assert abs(cwnd - expect) <= max(1.5, 0.01 * expect)
    assert cc.w_est < cc.cwnd


def test_rto_then_epoch_with_k_zero() -> None:
    cc, now = after_loss_at(100, 0.1)
    cc.on_rto(now, 70)
    assert cc.cwnd == 1 and cc.ssthresh == 49 and cc.ca_state == CaState.LOSS
    for _ in range(8):  # slow start 1 -> 49, then the first CA epoch
        now = rounds(cc, now, 0.1, 1)[-1][0]
        if not cc.in_slow_start:
            break
    assert cc.epoch_start is not None
    assert cc.k == 0.0 and cc.w_max == pytest.approx(cc.cwnd_epoch)  # §4.8


def test_undo_restores_cubic_state() -> None:
    cc, now = after_loss_at(500, 0.1)
    now = rounds(cc, now, 0.1, 5)[-1][0]
    saved = (cc.cwnd, cc.w_max, cc.k, cc.epoch_start)
    cc.on_loss(now, cc.cwnd)
    assert cc.cwnd < saved[0]
    cc.undo()  # §4.9 spurious congestion event
    assert (cc.cwnd, cc.w_max, cc.k, cc.epoch_start) == saved
    assert cc.ca_state == CaState.OPEN


def test_idle_does_not_count_as_growth_time() -> None:
    a, now = after_loss_at(1000, 0.1)
    b, _ = after_loss_at(1000, 0.1)
    ra, rb = rounds(a, now, 0.1, 10), rounds(b, now, 0.1, 10)
    assert ra == rb
    now = ra[-1][0]
    a.on_idle_restart(now, idle=0.05, rto=0.3)  # shorter than RTO: window kept
    assert a.epoch_start == pytest.approx(b.epoch_start + 0.05)
