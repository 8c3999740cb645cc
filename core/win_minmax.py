"""A running minimum over a sliding time window, in constant space (Linux lib/win_minmax.c's role).

Why: the path's minimum RTT is a property of the *current* path. An all-time
minimum never forgets a route that has since changed (a longer path, a
wireless link that slowed down), and RACK's reordering window
(RFC 8985 §6.2.4: min_RTT / 4) and the pacing and delay-based logic built on
min_RTT would stay tuned to a path that no longer exists. Linux keeps
``tp->rtt_min`` as the minimum over ``net.ipv4.tcp_min_rtt_wlen`` (300 s).

How (our own construction, the idea of K. Nichols' windowed filter used by
BBR): the window is cut into four sub-windows of equal length, and for each
sub-window that saw a sample we keep its start time and its minimum; a new
overall minimum makes every older record irrelevant. The minimum of the
records still inside the window is the answer. At most five records live at
once (four whole sub-windows and the current one), each update is O(1), and
a sample leaves the estimate between one window and one window plus a
quarter after it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["WinMin", "TCP_MIN_RTT_WLEN"]

#: net.ipv4.tcp_min_rtt_wlen, seconds.
TCP_MIN_RTT_WLEN = 300.0


@dataclass(slots=True)
class WinMin:
    """Minimum of the samples of the last ``win`` seconds (about: see the module doc)."""

    win: float = TCP_MIN_RTT_WLEN
    # [start time, minimum] per sub-window that saw a sample, oldest first.
    records: list[list[float]] = field(default_factory=list)
    best: float = 0.0  # the minimum over ``records`` (valid when there are any)

    def update(self, now: float, value: float) -> float:
        """Add a sample taken at ``now``; the windowed minimum afterwards.

        Runs for every RTT sample (nearly every ACK): one comparison in the
        common case; the minimum is recomputed only when a record expires.
        """
        recs = self.records
        if recs and value > self.best:
            win = self.win
            quarter = win / 4
            horizon = now - win
            if recs[0][0] + quarter <= horizon:
                while recs and recs[0][0] + quarter <= horizon:
                    del recs[0]  # its whole sub-window is older than the window
                if recs:
                    self.best = min(r[1] for r in recs)
            if recs and value > self.best:
                last = recs[-1]
                if now - last[0] < quarter:
                    if value < last[1]:
                        last[1] = value
                else:
                    recs.append([now, value])
                return self.best
        # A new minimum (expiry can only raise ``best``, so no record needs
        # expiring first): no older sample can be the answer again.
        if len(recs) == 1:
            rec = recs[0]  # reuse the one record (no allocation per ACK)
            rec[0] = now
            rec[1] = value
        else:
            self.records = [[now, value]]
        self.best = value
        return value

    def get(self, now: float) -> float | None:
        """The windowed minimum at ``now`` (None: no sample in the window)."""
        horizon = now - self.win
        quarter = self.win / 4
        best = None
        for start, value in self.records:
            if start + quarter > horizon and (best is None or value < best):
                best = value
        return best

    def reset(self) -> None:
        self.records = []
        self.best = 0.0
