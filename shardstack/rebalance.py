"""`serve --rebalance auto`: which buckets to move, from the measured load.

The policy (pure: loads and time in, a move or None out; the supervisor
samples and moves, shardstack.migrate carries the connections). It follows
RSS++ (Barbette et al., CoNEXT '19) in spirit: the load of a worker is its
process CPU time per second (shardstack.load's `cpu_seconds`: everything it
did, frames, app pumping, timers), the load of a bucket is the CPU time the
worker attributed to it (in proportion to its frames), and buckets go from
the most loaded worker to the least loaded one.

Hysteresis, so that noise never moves anything:
- a worker is "hot" only when max/mean > IMBALANCE over a window of WINDOW
  samples, in CONSECUTIVE observations in a row;
- nothing moves while the stack is nearly idle (mean < MIN_LOAD CPU s/s);
- after a move, a cooldown (COOLDOWN seconds, longer after moves that did
  not pay, below) and a fresh window before the next one (the load picture
  has to show the effect of the last move first);
- the buckets moved are chosen greedily, largest first, each only if it
  brings the two workers' loads closer (an elephant bucket larger than the
  gap stays: moving it would only make the cold worker the hot one), and at
  most MAX_BUCKETS per move: every move pauses its buckets' flows, so a large
  imbalance is closed in a few judged steps rather than one big guess;
- every move is judged: the next window after its cooldown must show at
  least half of the improvement it predicted. A move that did not pay
  (the load did not follow the buckets: many short connections, whose next
  ones hash anywhere, or work no bucket accounts for) multiplies the
  cooldown by BACKOFF, up to MAX_COOLDOWN; one that paid resets it. So load
  that moving buckets cannot fix costs a few moves, then almost none.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from shardstack.netio import rss

SAMPLE_PERIOD = 0.5  # s between load samples
WINDOW = 2  # samples (deltas) averaged
IMBALANCE = 1.2  # max/mean above which the hottest worker sheds load
CONSECUTIVE = 2  # observations in a row above it
COOLDOWN = 1.0  # s after a move
MIN_LOAD = 0.05  # CPU s/s per worker on average: below, nothing moves
MAX_BUCKETS = 8  # per move (of rss.RETA_SIZE)
BACKOFF = 4.0  # cooldown factor after a move that did not pay
MAX_COOLDOWN = 60.0  # s


class Balancer:
    """Feed it every worker's `load` reply; it answers (buckets, worker)."""

    def __init__(self, workers: int) -> None:
        self.n = workers
        self.prev: list[dict[str, Any]] | None = None
        self.prev_t = 0.0
        self.deltas: deque = deque(maxlen=WINDOW)  # (dt, worker cpu [n], bucket cpu [128])
        self.over = 0
        self.last_move = -1e9
        self.last_ratio = 0.0
        self.cooldown = COOLDOWN
        self.futile = 0  # moves in a row that did not pay
        self.expect: tuple[float, float] | None = None  # (ratio before, predicted) of the last move

    def observe(self, now: float, reta: list[int],
                loads: list[dict[str, Any]]) -> tuple[list[int], int] | None:
        prev, self.prev = self.prev, loads
        prev_t, self.prev_t = self.prev_t, now
        if prev is None or now - self.last_move < self.cooldown:
            return None
        dt = now - prev_t
        if dt <= 0:
            return None
        wcpu = [max(0.0, loads[i]["cpu_seconds"] - prev[i]["cpu_seconds"]) for i in range(self.n)]
        bcpu = [0.0] * rss.RETA_SIZE
        for i in range(self.n):
            cur, old = loads[i]["cpu"], prev[i]["cpu"]
            for k in range(rss.RETA_SIZE):
                d = cur[k] - old[k]
                if d > 0:
                    bcpu[k] += d
        self.deltas.append((dt, wcpu, bcpu))
        if len(self.deltas) < WINDOW:
            return None
        return self._decide(now, reta)

    def rates(self) -> tuple[list[float], list[float]]:
        """CPU seconds per second over the window: per worker, per bucket."""
        span = sum(d[0] for d in self.deltas)
        w = [sum(d[1][i] for d in self.deltas) / span for i in range(self.n)]
        b = [sum(d[2][k] for d in self.deltas) / span for k in range(rss.RETA_SIZE)]
        return w, b

    def _decide(self, now: float, reta: list[int]) -> tuple[list[int], int] | None:
        w, b = self.rates()
        mean = sum(w) / self.n
        if mean < MIN_LOAD:
            self.over = 0
            self.expect = None  # the load went away: nothing left to judge the move by
            return None
        hot = max(range(self.n), key=w.__getitem__)
        cold = min(range(self.n), key=w.__getitem__)
        self.last_ratio = w[hot] / mean
        if self.expect is not None and not self._judge(self.last_ratio):
            self._restart_window(now)  # the longer cooldown starts now
            return None
        if self.last_ratio <= IMBALANCE:
            self.over = 0
            return None
        self.over += 1
        if self.over < CONSECUTIVE:
            return None
        pick = choose_buckets([k for k in range(rss.RETA_SIZE) if reta[k] == hot], b,
                              w[hot], w[cold])
        if not pick:
            return None
        moved = sum(b[k] for k in pick)
        after = list(w)
        after[hot] -= moved
        after[cold] += moved
        self.expect = (self.last_ratio, max(after) / mean)
        self.over = 0
        self._restart_window(now)
        return pick, cold

    def _judge(self, ratio: float) -> bool:
        """Did the last move pay? It did if the imbalance fell by at least
        half of what it predicted; else the cooldown grows (BACKOFF)."""
        before, predicted = self.expect
        self.expect = None
        if before - ratio >= (before - predicted) / 2:
            self.futile = 0
            self.cooldown = COOLDOWN
            return True
        self.futile += 1
        self.cooldown = min(MAX_COOLDOWN, COOLDOWN * BACKOFF ** self.futile)
        return False

    def _restart_window(self, now: float) -> None:
        self.last_move = now
        self.deltas.clear()
        self.prev = None  # a fresh window: the next sample starts it


def choose_buckets(mine: list[int], load: list[float], hot: float, cold: float) -> list[int]:
    """Buckets of the hot worker (`mine`) to give the cold one: greedy,
    largest first, each taken only if it brings the two workers' loads
    closer together (|gap - 2 * moved| shrinks), so a move never makes the
    cold worker the hotter one by more than the gap it closes."""
    busy = sorted((k for k in mine if load[k] > 0), key=lambda k: -load[k])
    gap = hot - cold
    pick: list[int] = []
    moved = 0.0
    for k in busy:
        if len(pick) == MAX_BUCKETS:
            break
        if abs(gap - 2 * (moved + load[k])) < abs(gap - 2 * moved):
            pick.append(k)
            moved += load[k]
    return pick
