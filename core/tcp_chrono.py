"""Where a sender's time goes (Linux's chronographs, ``tcp_chrono_start``/``tcp_chrono_stop``).

Why: "is this flow slow because of the network, the receiver or the
application?" is the first question on a slow transfer, and Linux answers
it in ``ss -ti`` as ``busy``, ``rwnd_limited`` and ``sndbuf_limited`` times
(TCP_INFO tcpi_busy_time, tcpi_rwnd_limited, tcpi_sndbuf_limited).

Three conditions, at most one timed at any instant, in rising priority:
BUSY (data queued or in flight), RWND_LIMITED (data waits because the
peer's window is full while the congestion window has room), SNDBUF_LIMITED
(the application waits because our send buffer is full). A condition that
starts pre-empts a lower one; when the timed condition ends, timing falls
back to BUSY if data is still queued, else stops. Busy time, as in Linux,
is the sum of the three.
"""

from __future__ import annotations

from .tcp_h import TcpSock

__all__ = ["CHRONO_BUSY", "CHRONO_RWND_LIMITED", "CHRONO_SNDBUF_LIMITED", "tcp_chrono_start",
           "tcp_chrono_stop", "tcp_chrono_times"]

CHRONO_BUSY = 1
CHRONO_RWND_LIMITED = 2
CHRONO_SNDBUF_LIMITED = 3


def _switch(sk: TcpSock, kind: int, now: float) -> None:
    """Close the running interval into its total and start timing ``kind`` (0: none)."""
    old = sk.chrono_type
    if old:
        sk.chrono_stat[old - 1] += now - sk.chrono_start
    sk.chrono_type = kind
    sk.chrono_start = now


def tcp_chrono_start(sk: TcpSock, kind: int, now: float) -> None:
    """``kind`` began; it is timed unless a higher-priority condition is."""
    old = sk.chrono_type
    if kind > old:
        # _switch inline: this runs as every request/response flight starts.
        if old:
            sk.chrono_stat[old - 1] += now - sk.chrono_start
        sk.chrono_type = kind
        sk.chrono_start = now


def tcp_chrono_stop(sk: TcpSock, kind: int, now: float) -> None:
    """``kind`` ended: nothing queued stops the clock; else back to BUSY if it was timed."""
    old = sk.chrono_type
    if not sk.sndq_len:
        if old:
            # _switch(sk, 0, now) inline: this runs as every flight is fully acknowledged.
            sk.chrono_stat[old - 1] += now - sk.chrono_start
            sk.chrono_type = 0
            sk.chrono_start = now
    elif kind == old:
        _switch(sk, CHRONO_BUSY, now)


def tcp_chrono_times(sk: TcpSock, now: float) -> tuple[float, float, float]:
    """(busy, rwnd_limited, sndbuf_limited) seconds so far; busy includes the other two."""
    stat = list(sk.chrono_stat)
    if sk.chrono_type:
        stat[sk.chrono_type - 1] += now - sk.chrono_start
    return stat[0] + stat[1] + stat[2], stat[1], stat[2]
