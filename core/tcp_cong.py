"""Pluggable congestion control (Linux ``net/ipv4/tcp_cong.c``).

Reading list: RFC 5681 (TCP congestion control), RFC 3465 (appropriate byte
counting), RFC 6582 (NewReno), RFC 6928 (initial window 10), RFC 9438 (CUBIC,
in ``tcp_cubic``).

Like Linux's ``struct tcp_congestion_ops``, an algorithm is an object the
socket owns and calls on a few events; the socket (``tcp_input`` /
``tcp_output``) keeps doing loss *detection* and retransmission, the algorithm
only decides the window.  Nothing here reads a clock: time comes in as ``now``
(float seconds) and RTT samples as ``rtt`` (float seconds or ``None``).

Units
-----
``cwnd`` and ``ssthresh`` count **segments** (``int``), as Linux's
``snd_cwnd`` / ``snd_ssthresh`` do: the sender may have ``cwnd`` full-sized
segments in flight.  Growth smaller than one segment per ACK is accumulated
privately (Linux's ``snd_cwnd_cnt``), so ``cwnd`` only ever changes by whole
segments.  ``ssthresh`` starts at :data:`INFINITE_SSTHRESH`.

Contract with the engine
------------------------
``cc = tcp_cong.get(name)()`` (``name`` from ``TCP_CONGESTION``; default
:data:`DEFAULT` = ``"cubic"``), then ``cc.init(mss, now)`` when the connection
reaches ESTABLISHED (Linux ``tcp_init_congestion_control``).  Afterwards:

``on_ack(acked_segments, rtt, now, in_flight=None)``
    An ACK advanced SND.UNA by ``acked_segments`` segments (bytes newly
    acknowledged / MSS; an int or float > 0).  ``rtt`` is this ACK's RTT
    sample or ``None``.  ``in_flight`` is the number of segments that were in
    flight *before* this ACK was processed; it is used to skip growth while
    the sender is not cwnd-limited (Linux ``tcp_is_cwnd_limited``, RFC 7661
    spirit).  ``None`` means "assume cwnd-limited".  Outside recovery this is
    slow start (RFC 5681 §3.1, with RFC 3465 byte counting, L = 2 segments)
    or congestion avoidance.  *During* recovery the engine calls it for
    partial ACKs only, and it deflates the window (RFC 6582 §3.2 step 5).
``on_dup_ack()``
    A duplicate ACK (RFC 5681 §2).  In recovery it inflates ``cwnd`` by one
    segment (RFC 6582 §3.2 step 4); outside recovery it only records the
    DISORDER state.  The engine counts dup ACKs and decides when to call
    ``on_loss``.
``on_loss(now, in_flight)``
    Fast retransmit: lower ``ssthresh`` (RFC 5681 §3.2 eq. 4 for Reno,
    RFC 9438 §4.6 for CUBIC), set ``cwnd = ssthresh + 3`` (the three dup ACKs
    already seen, RFC 6582 §3.2 step 2) and enter recovery.
``on_recovery_exit(now)``
    The full ACK covering the recovery point arrived (RFC 6582 §3.2 step 5,
    "full acknowledgment", option 2): ``cwnd = ssthresh``.  The engine keeps
    the recovery point (``recover``) itself.
``on_rto(now, in_flight)``
    Retransmission timeout: ``ssthresh`` as on loss (RFC 5681 eq. 4 uses
    FlightSize / 2), ``cwnd = 1`` (the loss window, RFC 5681 §3.1), leave
    recovery, state LOSS.  Slow start then runs from 1 segment.
``undo()``
    The last reduction was spurious (DSACK, Eifel, RFC 2883 / 3522): restore
    ``cwnd`` and ``ssthresh`` saved at the reduction (Linux
    ``tcp_undo_cwnd_reduction``).
``on_idle_restart(now, idle, rto)``
    About to send after ``idle`` seconds without anything in flight: RFC 5681
    §4.1 restart window (cwnd = min(cwnd, IW) if idle > RTO).

An engine doing SACK-based loss recovery with a pipe estimate (RFC 6675)
should send while ``pipe < cwnd`` and may ignore the NewReno inflation by
reading :attr:`ssthresh`; an engine doing plain NewReno just sends while
``in_flight < cwnd``.  ``ca_state`` (:class:`CaState`) mirrors Linux's
``icsk_ca_state`` for ``shardstack ss`` and tests.

Registry: :func:`register` / :func:`get` / :func:`available` (Linux
``tcp_register_congestion_control`` / ``tcp_ca_find``).  ``"reno"`` is
:class:`Reno` here; ``"cubic"`` lives in ``tcp_cubic``, which registers itself
when imported (``core/__init__`` imports it, as Linux builds tcp_cubic in).
"""

from __future__ import annotations

import enum
import errno
from abc import ABC, abstractmethod
from collections.abc import Callable

from .tcp_h import os_error

__all__ = [
    "DEFAULT",
    "INFINITE_SSTHRESH",
    "INIT_CWND",
    "CaState",
    "CongestionControl",
    "Reno",
    "available",
    "get",
    "register",
]

#: RFC 6928 §2 / Linux TCP_INIT_CWND: the initial window is 10 segments.
INIT_CWND = 10
#: Linux TCP_INFINITE_SSTHRESH: "no congestion seen yet".
INFINITE_SSTHRESH = 0x7FFFFFFF
#: Name of the default algorithm (Linux's default since 2.6.19).
DEFAULT = "cubic"
#: RFC 3465 §2.2: at most L = 2 segments of growth per ACK in slow start.
ABC_LIMIT = 2


class CaState(enum.IntEnum):
    """Linux ``enum tcp_ca_state`` (``icsk_ca_state``)."""

    OPEN = 0
    DISORDER = 1
    CWR = 2  # ECN's reduction (core.tcp_ecn): once per window of CE marks
    RECOVERY = 3
    LOSS = 4


# on_ack runs once per ACK: module constants spare an EnumType attribute lookup each.
_CA_OPEN = CaState.OPEN
_CA_DISORDER = CaState.DISORDER
_CA_CWR = CaState.CWR
_CA_RECOVERY = CaState.RECOVERY
_CA_LOSS = CaState.LOSS


class CongestionControl(ABC):
    """Abstract congestion control; see the module docstring for the contract.

    Subclasses implement :meth:`ssthresh_on_loss` (Linux ``.ssthresh``) and
    :meth:`cong_avoid` (Linux ``.cong_avoid``); they may extend the event
    methods to keep their own state.
    """

    name = "abstract"
    __slots__ = (
        "cwnd",
        "ssthresh",
        "mss",
        "ca_state",
        "cwnd_frac",
        "cwnd_cnt",
        "prior_cwnd",
        "prior_ssthresh",
        "srtt",
        "min_rtt",
        "_flight_cur",
        "_flight_prev",
        "_flight_until",
    )

    def __init__(self) -> None:
        self.cwnd: int = INIT_CWND
        self.ssthresh: int = INFINITE_SSTHRESH
        self.mss: int = 536
        self.ca_state: CaState = CaState.OPEN
        # Sub-segment growth not yet applied to cwnd, in segments (slow start on partial
        # ACKs, CUBIC's fractional window).
        self.cwnd_frac: float = 0.0
        # Segments acked towards the next additive increase (Linux snd_cwnd_cnt); counted
        # rather than summed as 1/w fractions so w ACKs make exactly one segment.
        self.cwnd_cnt: float = 0.0
        self.prior_cwnd: int = 0
        self.prior_ssthresh: int = 0
        # RTT as seen through on_ack samples (RFC 6298 §2 smoothing), for algorithms that
        # need one (CUBIC's W_cubic(t + RTT)); the engine keeps its own for the RTO.
        self.srtt: float | None = None
        self.min_rtt: float | None = None
        # Largest flight seen in this and the previous RTT (Linux max_packets_out), so
        # that "cwnd-limited" does not flicker inside one window.
        self._flight_cur = 0.0
        self._flight_prev = 0.0
        self._flight_until = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    def init(self, mss: int, now: float) -> None:
        """Start of ESTABLISHED (Linux ``tcp_init_congestion_control``)."""
        self.mss = mss
        self.cwnd = INIT_CWND
        self.ssthresh = INFINITE_SSTHRESH
        self.cwnd_frac = self.cwnd_cnt = 0.0
        self.ca_state = CaState.OPEN

    def set_mss(self, mss: int) -> None:
        """The MSS changed (PMTU); the window stays counted in segments."""
        self.mss = mss

    @property
    def in_recovery(self) -> bool:
        return self.ca_state == CaState.RECOVERY

    @property
    def in_slow_start(self) -> bool:
        """Linux ``tcp_in_slow_start``: cwnd < ssthresh."""
        return self.cwnd < self.ssthresh

    @property
    def cwnd_bytes(self) -> int:
        return self.cwnd * self.mss

    # -- events --------------------------------------------------------------------------

    def on_ack(
        self, acked_segments: float, rtt: float | None, now: float, in_flight: float | None = None
    ) -> None:
        """New data acknowledged: grow (or, in recovery, deflate) the window."""
        if rtt is not None and rtt > 0:
            self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8
            if self.min_rtt is None or rtt < self.min_rtt:
                self.min_rtt = rtt
        if acked_segments <= 0:
            return
        ca_state = self.ca_state
        if ca_state:  # not Open (OPEN is 0): one test on the common path
            if ca_state == _CA_RECOVERY:
                self._partial_ack(acked_segments)
                return
            if ca_state == _CA_DISORDER:
                self.ca_state = _CA_OPEN  # the reordering healed without a loss
            elif ca_state == _CA_CWR:
                return  # ECN's reduction (tcp_ecn.tcp_cwr_ack) sets cwnd; nothing grows
        # is_cwnd_limited(_note_flight(in_flight, now)), inline: once per ACK.
        if in_flight is None:
            limited = True
        else:
            cur = self._flight_cur
            if now >= self._flight_until:
                self._flight_prev = cur
                cur = 0.0
                self._flight_until = now + (self.srtt or 0.0)
            if in_flight > cur:
                cur = in_flight
            self._flight_cur = cur
            prev = self._flight_prev
            flight = cur if cur > prev else prev
            cwnd = self.cwnd
            limited = cwnd < 2 * flight if cwnd < self.ssthresh else flight >= cwnd - 1
        if limited:
            self.cong_avoid(acked_segments, rtt, now)
        if self.ca_state == _CA_LOSS and not self.in_slow_start:
            # Slow start after the RTO has refilled the pipe up to ssthresh; the engine
            # may also leave LOSS earlier through on_recovery_exit.
            self.ca_state = _CA_OPEN

    def on_dup_ack(self) -> None:
        """A duplicate ACK (RFC 5681 §2)."""
        if self.ca_state == CaState.RECOVERY:
            # RFC 6582 §3.2 step 4 / RFC 5681 §3.2 step 4: each further dup ACK means a
            # segment left the network, so inflate by one.
            self.cwnd += 1
        elif self.ca_state == CaState.OPEN:
            self.ca_state = CaState.DISORDER

    def on_loss(self, now: float, in_flight: float) -> None:
        """Fast retransmit: reduce and enter fast recovery (RFC 5681 §3.2 steps 2-3)."""
        if self.ca_state == CaState.RECOVERY:
            # RFC 6582 §3.2 step 1: one reduction per window of data; the engine should
            # not call us again before the recovery point is acked, but be safe.
            return
        self._save_for_undo()
        self.ssthresh = self.ssthresh_on_loss(now, in_flight)
        self.cwnd = self.ssthresh + 3
        self.cwnd_frac = self.cwnd_cnt = 0.0
        self.ca_state = CaState.RECOVERY

    def on_recovery_exit(self, now: float) -> None:
        """Full ACK of the recovery point (RFC 6582 §3.2 step 5, option 2)."""
        if self.ca_state == CaState.RECOVERY:
            self.cwnd = self.ssthresh
            self.cwnd_frac = self.cwnd_cnt = 0.0
        self.ca_state = CaState.OPEN

    def on_rto(self, now: float, in_flight: float) -> None:
        """Retransmission timeout (RFC 5681 §3.1 eq. 4, loss window of 1 segment)."""
        if self.ca_state != CaState.LOSS:
            # A second RTO for the same data keeps the first ssthresh (RFC 5681 §3.1:
            # "not ... on subsequent retransmissions of the same segment" in spirit;
            # Linux tcp_enter_loss does the same when already in Loss).
            self._save_for_undo()
            self.ssthresh = self.ssthresh_on_loss(now, in_flight)
        self.cwnd = 1
        self.cwnd_frac = self.cwnd_cnt = 0.0
        self.ca_state = CaState.LOSS

    def undo(self) -> None:
        """Revert the last reduction, it was spurious (Linux ``tcp_undo_cwnd_reduction``)."""
        if self.prior_cwnd == 0:
            return
        self.cwnd = max(self.cwnd, self.prior_cwnd)
        self.ssthresh = max(self.ssthresh, self.prior_ssthresh)
        self.cwnd_frac = self.cwnd_cnt = 0.0
        self.prior_cwnd = 0
        self.ca_state = CaState.OPEN

    def on_idle_restart(self, now: float, idle: float, rto: float) -> None:
        """RFC 5681 §4.1: after an idle period longer than RTO, restart from IW."""
        if idle > rto:
            self.cwnd = min(self.cwnd, INIT_CWND)
            self.cwnd_frac = self.cwnd_cnt = 0.0

    # -- algorithm hooks -----------------------------------------------------------------

    @abstractmethod
    def ssthresh_on_loss(self, now: float, in_flight: float) -> int:
        """New ssthresh on a congestion event (Linux ``.ssthresh``)."""

    @abstractmethod
    def cong_avoid(self, acked_segments: float, rtt: float | None, now: float) -> None:
        """Grow cwnd for ``acked_segments`` newly acked (Linux ``.cong_avoid``)."""

    # -- helpers shared by algorithms ----------------------------------------------------

    def is_cwnd_limited(self, in_flight: float | None) -> bool:
        """Linux ``tcp_is_cwnd_limited``: only grow a window that is being used.

        In slow start a window at most twice the flight is still "used" (the flight
        doubles every RTT); in congestion avoidance the flight must fill cwnd, with
        one segment of slack for a sender that sends full segments only.
        """
        if in_flight is None:
            return True
        if self.in_slow_start:
            return self.cwnd < 2 * in_flight
        return in_flight >= self.cwnd - 1

    def _note_flight(self, in_flight: float | None, now: float) -> float | None:
        """The largest flight over roughly the last two RTTs, or None if unknown."""
        if in_flight is None:
            return None
        if now >= self._flight_until:
            self._flight_prev = self._flight_cur
            self._flight_cur = 0.0
            self._flight_until = now + (self.srtt or 0.0)
        if in_flight > self._flight_cur:
            self._flight_cur = in_flight
        return max(self._flight_cur, self._flight_prev)

    def slow_start(self, acked_segments: float) -> float:
        """RFC 5681 §3.1 slow start with RFC 3465 L=2; returns the acks left over.

        Growth stops at ssthresh; what is left of ``acked_segments`` after reaching
        it is returned so congestion avoidance can use it (Linux ``tcp_slow_start``).
        """
        room = self.ssthresh - self.cwnd
        grow = min(acked_segments, ABC_LIMIT, room)
        whole = int(grow + self.cwnd_frac)
        self.cwnd_frac = grow + self.cwnd_frac - whole
        self.cwnd += whole
        return max(0.0, acked_segments - grow) if self.cwnd >= self.ssthresh else 0.0

    def cong_avoid_ai(self, w: float, acked_segments: float) -> None:
        """Additive increase: one segment per ``w`` segments acked (Linux ``tcp_cong_avoid_ai``)."""
        w = max(w, 1)
        self.cwnd_cnt += acked_segments
        if self.cwnd_cnt >= w:
            whole = int(self.cwnd_cnt // w)
            self.cwnd += whole
            self.cwnd_cnt -= whole * w

    def _partial_ack(self, acked_segments: float) -> None:
        # RFC 6582 §3.2 step 5 (partial ACK): deflate by the amount newly acked, then add
        # back one segment if at least one was acked, so the retransmission can go out.
        deflate = round(acked_segments)
        self.cwnd = max(self.cwnd - deflate + (1 if acked_segments >= 1 else 0), 1)

    def _save_for_undo(self) -> None:
        self.prior_cwnd = self.cwnd
        self.prior_ssthresh = self.ssthresh

    def __repr__(self) -> str:
        ss = "inf" if self.ssthresh >= INFINITE_SSTHRESH else str(self.ssthresh)
        return f"<{type(self).__name__} cwnd={self.cwnd} ssthresh={ss} {self.ca_state.name}>"


class Reno(CongestionControl):
    """Reno (Linux ``tcp_reno_cong_avoid`` / ``tcp_reno_ssthresh``), RFC 5681.

    Slow start below ssthresh, then one segment per window of ACKs (RFC 5681
    §3.1 eq. 3, counted in segments as RFC 3465 §2.1 suggests).
    """

    name = "reno"
    __slots__ = ()

    def ssthresh_on_loss(self, now: float, in_flight: float) -> int:
        # RFC 5681 §3.1 eq. 4: max(FlightSize / 2, 2 * SMSS).  (Linux halves cwnd
        # instead; with an application-limited sender the RFC's choice is the safe one.)
        return max(int(in_flight) // 2, 2)

    def cong_avoid(self, acked_segments: float, rtt: float | None, now: float) -> None:
        if self.in_slow_start:
            acked_segments = self.slow_start(acked_segments)
            if not acked_segments:
                return
        self.cong_avoid_ai(self.cwnd, acked_segments)


_REGISTRY: dict[str, Callable[[], CongestionControl]] = {"reno": Reno}


def register(name: str, factory: Callable[[], CongestionControl]) -> None:
    """Make ``factory`` available as ``name`` (Linux ``tcp_register_congestion_control``)."""
    _REGISTRY[name] = factory


def get(name: str = DEFAULT) -> Callable[[], CongestionControl]:
    """Factory for the algorithm called ``name`` (Linux ``tcp_ca_find``).

    Raises ``OSError(ENOENT)`` for an unknown name, as ``setsockopt(TCP_CONGESTION)``
    does on Linux.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise os_error(errno.ENOENT) from None


def available() -> tuple[str, ...]:
    """Names of the registered algorithms (``net.ipv4.tcp_available_congestion_control``)."""
    return tuple(sorted(_REGISTRY))
