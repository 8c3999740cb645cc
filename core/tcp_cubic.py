"""CUBIC congestion control (Linux ``net/ipv4/tcp_cubic.c``), per RFC 9438.

Reading list: RFC 9438 (CUBIC), RFC 5681.

The window follows the cubic function of the time since the current
congestion-avoidance epoch began (RFC 9438 §4.2, Figure 1)::

    W_cubic(t) = C * (t - K)**3 + W_max          C = 0.4 segments/s^3
    K = cbrt((W_max - cwnd_epoch) / C)

Windows are in segments.  On each ACK in congestion avoidance the target is
``W_cubic(t + RTT)`` clamped to ``[cwnd, 1.5 * cwnd]`` (§4.2) and cwnd moves
``(target - cwnd) / cwnd`` per acked segment (§4.4 concave, §4.5 convex).  A
Reno estimate ``W_est`` grows by ``alpha_cubic * acked / cwnd`` (§4.3, alpha
= 3(1-beta)/(1+beta), then 1 once W_est reaches the window before the last
reduction); when ``W_cubic(t) < W_est`` the sender is in the Reno-friendly
region and cwnd follows W_est.  A congestion event multiplies the window by
beta = 0.7 (§4.6) and, with fast convergence (§4.7), remembers a W_max
lowered to ``cwnd * (1 + beta) / 2`` when the window is shrinking.  After an
RTO, the next epoch starts with K = 0 and W_max = cwnd_epoch (§4.8).  A
spurious reduction is undone with the whole CUBIC state (§4.9).

Slow start uses HyStart++ (RFC 9406), on by default as Linux CUBIC's
HyStart is: per round of data, the minimum RTT of the round is compared with
the previous round's; a rise of at least max(4 ms, min(16 ms, min_RTT / 8))
after 8 samples means a queue is building, so growth drops to a quarter
(Conservative Slow Start, §4.2) and, unless the RTT falls back, congestion
avoidance starts after 5 such rounds with ssthresh = cwnd, before the queue
overflows. A round ends when as many segments have been acknowledged as
were in flight when it began (§4.2's windowEnd, counted in segments since
this class sees no sequence numbers).

Time (``now``) and RTT samples come in as arguments; ``RTT`` is the smoothed
sample average kept by :class:`~shardstack.core.tcp_cong.CongestionControl`.
The engine-facing contract is the one documented in ``tcp_cong``.
"""

from __future__ import annotations

from .tcp_cong import CaState, CongestionControl, register

_cc_on_ack = CongestionControl.on_ack

__all__ = ["BETA", "C", "Cubic", "alpha_cubic", "cubic_k", "w_cubic"]

#: RFC 9438 §4.6 multiplicative decrease factor.
BETA = 0.7
#: RFC 9438 §5 (Figure 1): the scaling constant, in segments / s^3.
C = 0.4

# RFC 9406 §4.3: HyStart++ constants.
HYSTART_MIN_RTT_THRESH = 0.004
HYSTART_MAX_RTT_THRESH = 0.016
HYSTART_MIN_RTT_DIVISOR = 8
HYSTART_N_RTT_SAMPLE = 8
HYSTART_CSS_GROWTH_DIVISOR = 4
HYSTART_CSS_ROUNDS = 5
_INF = float("inf")

def alpha_cubic(beta: float = BETA) -> float:
    """RFC 9438 §4.3: the additive factor that makes CUBIC as fair as Reno on average."""
    return 3.0 * (1.0 - beta) / (1.0 + beta)


def cubic_k(w_max: float, cwnd_epoch: float, c: float = C) -> float:
    """RFC 9438 §4.2 Figure 2: time for W_cubic to climb from cwnd_epoch back to W_max."""
    if w_max <= cwnd_epoch:
        return 0.0
    return ((w_max - cwnd_epoch) / c) ** (1.0 / 3.0)


def w_cubic(t: float, k: float, w_max: float, c: float = C) -> float:
    """RFC 9438 §4.2 Figure 1."""
    return c * (t - k) ** 3 + w_max


class Cubic(CongestionControl):
    """RFC 9438 CUBIC.  ``fast_convergence`` (§4.7) is on by default, like Linux."""

    name = "cubic"
    __slots__ = (
        "beta",
        "c",
        "fast_convergence",
        "w_max",
        "k",
        "epoch_start",
        "cwnd_epoch",
        "w_est",
        "cwnd_prior",
        "after_rto",
        "_undo",
        "hystart",
        "hs_round_left",
        "hs_last_min",
        "hs_cur_min",
        "hs_samples",
        "hs_css_baseline",
        "hs_css_rounds",
    )

    def __init__(
        self, *, fast_convergence: bool = True, beta: float = BETA, c: float = C,
        hystart: bool = True,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.c = c
        self.fast_convergence = fast_convergence
        self.hystart = hystart
        self._reset_cubic()
        self._hystart_reset()
        self._undo: tuple[float, float, float | None, float, float, float] | None = None

    def _reset_cubic(self) -> None:
        # Linux bictcp_reset: no congestion event remembered yet.
        self.w_max = 0.0
        self.k = 0.0
        self.epoch_start: float | None = None
        self.cwnd_epoch = 0.0
        self.w_est = 0.0
        self.cwnd_prior = 0.0
        self.after_rto = False

    def init(self, mss: int, now: float) -> None:
        super().init(mss, now)
        self._reset_cubic()
        self._hystart_reset()
        self._undo = None

    # -- HyStart++ (RFC 9406) --------------------------------------------------------------

    def _hystart_reset(self) -> None:
        self.hs_round_left = 0.0  # segments still to be acked before the round ends
        self.hs_last_min = _INF  # lastRoundMinRTT
        self.hs_cur_min = _INF  # currentRoundMinRTT
        self.hs_samples = 0  # rttSampleCount
        self.hs_css_baseline = _INF  # cssBaselineMinRtt; finite: in CSS
        self.hs_css_rounds = 0

    def on_ack(
        self, acked_segments: float, rtt: float | None, now: float, in_flight: float | None = None
    ) -> None:
        # Only in slow start (before the first congestion event): one test otherwise.
        # (ca_state 0 is Open; the base method is called directly, not through super():
        # this runs for every ACK.)
        if self.hystart and self.cwnd < self.ssthresh and not self.ca_state:
            self._hystart_ack(acked_segments, rtt, in_flight)
        _cc_on_ack(self, acked_segments, rtt, now, in_flight)

    def _hystart_ack(self, acked: float, rtt: float | None, in_flight: float | None) -> None:
        """RFC 9406 §4.2: rounds, the per-round minimum RTT, the exit tests."""
        left = self.hs_round_left - acked
        self.hs_round_left = left
        if left <= 0:
            # A new round: windowEnd = what is in flight now.
            self.hs_round_left = in_flight if in_flight else float(self.cwnd)
            self.hs_last_min = self.hs_cur_min
            self.hs_cur_min = _INF
            self.hs_samples = 0
            if self.hs_css_baseline < _INF:
                self.hs_css_rounds += 1
                if self.hs_css_rounds >= HYSTART_CSS_ROUNDS:
                    # §4.2: CSS_ROUNDS rounds in CSS: congestion avoidance from here.
                    self.ssthresh = self.cwnd
                    self.hs_css_baseline = _INF
                    return
        if rtt is None or rtt <= 0:
            return
        if rtt < self.hs_cur_min:
            self.hs_cur_min = rtt
        self.hs_samples += 1
        if self.hs_samples < HYSTART_N_RTT_SAMPLE or self.hs_last_min == _INF:
            return
        if self.hs_css_baseline == _INF:
            thresh = self.hs_last_min / HYSTART_MIN_RTT_DIVISOR
            thresh = min(max(thresh, HYSTART_MIN_RTT_THRESH), HYSTART_MAX_RTT_THRESH)
            if self.hs_cur_min >= self.hs_last_min + thresh:
                self.hs_css_baseline = self.hs_cur_min  # enter Conservative Slow Start
                self.hs_css_rounds = 0
        elif self.hs_cur_min < self.hs_css_baseline:
            self.hs_css_baseline = _INF  # the RTT fell back: it was not a queue, resume SS

    def slow_start(self, acked_segments: float) -> float:
        if self.hs_css_baseline < _INF:
            # §4.2 Conservative Slow Start: a quarter of slow start's growth.
            return super().slow_start(acked_segments / HYSTART_CSS_GROWTH_DIVISOR)
        return super().slow_start(acked_segments)

    # -- window as a float ---------------------------------------------------------------

    def _window(self) -> float:
        return self.cwnd + self.cwnd_frac

    def _set_window(self, w: float) -> None:
        whole = max(int(w), 1)
        self.cwnd = whole
        self.cwnd_frac = max(w - whole, 0.0)

    # -- RFC 9438 ------------------------------------------------------------------------

    def ssthresh_on_loss(self, now: float, in_flight: float) -> int:
        # RFC 9438 §4.6 with §4.7 fast convergence.  cwnd (not FlightSize) is the base,
        # as in Linux; §4.6 allows it because tcp_cong refuses growth when the sender is
        # not cwnd-limited.
        self._save_cubic_for_undo()
        self.hs_css_baseline = _INF  # RFC 9406 §4.2: a loss ends slow start, CSS too
        cwnd = self._window()
        if self.fast_convergence and cwnd < self.w_max:
            self.w_max = cwnd * (1.0 + self.beta) / 2.0
        else:
            self.w_max = cwnd
        self.cwnd_prior = cwnd
        self.epoch_start = None
        return max(int(cwnd * self.beta), 2)

    def on_rto(self, now: float, in_flight: float) -> None:
        first = self.ca_state != CaState.LOSS
        super().on_rto(now, in_flight)
        if first:
            # RFC 9438 §4.8: the first CA stage after a timeout uses K = 0 and
            # W_max = cwnd at its start; forget the cubic origin.
            self.w_max = 0.0
            self.after_rto = True
        self.epoch_start = None

    def cong_avoid(self, acked_segments: float, rtt: float | None, now: float) -> None:
        if self.in_slow_start:
            acked_segments = self.slow_start(acked_segments)
            if not acked_segments:
                return
        self._cubic_update(acked_segments, now)

    def _begin_epoch(self, now: float) -> float:
        # RFC 9438 §4.2: t counts from the start of this congestion-avoidance stage;
        # cwnd_epoch is the window then.  §4.8 (after an RTO, or a first exit from slow
        # start with no congestion event): K = 0 and W_max = cwnd_epoch.
        self.epoch_start = now
        self.cwnd_epoch = self._window()
        if self.w_max <= self.cwnd_epoch:
            self.w_max = self.cwnd_epoch
            self.k = 0.0
        else:
            self.k = cubic_k(self.w_max, self.cwnd_epoch, self.c)
        self.w_est = self.cwnd_epoch
        if self.cwnd_prior <= 0:
            self.cwnd_prior = self.cwnd_epoch
        self.after_rto = False
        return now

    def _cubic_update(self, acked: float, now: float) -> None:
        start = self.epoch_start
        if start is None:
            start = self._begin_epoch(now)
        rtt = self.srtt or 0.0
        t = now - start
        cwnd = self._window()
        # §4.3: Reno-friendly estimate.  alpha_cubic until W_est has regained the
        # window before the last reduction, then Reno's 1.
        alpha = 1.0 if self.w_est >= self.cwnd_prior else alpha_cubic(self.beta)
        self.w_est += alpha * acked / cwnd
        if w_cubic(t, self.k, self.w_max, self.c) < self.w_est:
            # Reno-friendly region: follow W_est (never shrink on an ACK).
            self._set_window(max(cwnd, self.w_est))
            return
        # §4.2: target for one RTT ahead, clamped to [cwnd, 1.5 cwnd]; §4.4/§4.5 move
        # (target - cwnd) / cwnd per acked segment.
        target = w_cubic(t + rtt, self.k, self.w_max, self.c)
        target = min(max(target, cwnd), 1.5 * cwnd)
        self._set_window(cwnd + (target - cwnd) / cwnd * acked)

    # -- undo (RFC 9438 §4.9) ------------------------------------------------------------

    def _save_cubic_for_undo(self) -> None:
        self._undo = (self.w_max, self.k, self.epoch_start, self.cwnd_epoch, self.w_est,
                      self.cwnd_prior)

    def undo(self) -> None:
        if self.prior_cwnd and self._undo is not None:
            (self.w_max, self.k, self.epoch_start, self.cwnd_epoch, self.w_est,
             self.cwnd_prior) = self._undo
            self._undo = None
            self.after_rto = False
        super().undo()

    def on_idle_restart(self, now: float, idle: float, rto: float) -> None:
        before = self.cwnd
        super().on_idle_restart(now, idle, rto)
        if self.cwnd < before:
            self.epoch_start = None
        elif self.epoch_start is not None:
            # RFC 9438 §5.8 (and Linux's CA_EVENT_TX_START): an idle period must not
            # count as time spent growing, so slide the epoch forward.
            self.epoch_start += idle

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        return f"{base} w_max={self.w_max:.1f} K={self.k:.3f}>"


register("cubic", Cubic)
