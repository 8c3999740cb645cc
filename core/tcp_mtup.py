"""Packetization-layer path MTU discovery (RFC 4821, RFC 8899 §3; Linux ``tcp_mtup_*``).

Reading list: RFC 4821 §3 (the black hole: a path that silently drops large
packets and sends no ICMP), §7.2-7.6 (probing: search_low / search_high, a
probe of the next size, success raises the floor, loss of the probe alone
lowers the ceiling and is not congestion), §7.7 (MTU verification after a
long time: re-probe); RFC 8899 §3 (the same for any transport).

``ShardConfig.mtu_probing`` is ``net.ipv4.tcp_mtu_probing``:

* 0 (Linux's default): off; a black hole stalls the connection in an RTO
  loop until tcp_retries2 gives up, as on Linux.
* 1: off until a black hole is suspected: once retransmissions have lasted
  tcp_retries1's worth (~3 s, Linux ``tcp_write_timeout`` ->
  ``tcp_mtu_probing``) the MSS falls to tcp_base_mss (1024) and probing
  starts; each further such timeout halves the floor.
* 2: always on: a connection starts at tcp_base_mss and probes up.

The search range is in MTU bytes (IP + TCP + options + payload), as Linux's
``icsk_mtup``: search_low (known to pass) and search_high (not known to
fail).  A probe is one segment of the middle size, sent from new data when
Open, cwnd >= 11 and enough is queued to tell its loss apart (it is followed
by reordering + 1 segments); acknowledged, it becomes search_low and the MSS
grows to it, cwnd rescaled to keep the same bytes; lost alone (the first
hole when recovery would start), it becomes search_high - 1 and is resent at
the current MSS without any cwnd reduction (``tcp_simple_retransmit``).  The
search stops when the range is narrower than tcp_probe_threshold (8) and
restarts after tcp_probe_interval (600 s).  An RTO with the probe still out
counts as its failure (Linux leaves that case to black-hole detection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import tcp_ipv4, tcp_output
from .tcp_cong import CaState
from .tcp_h import HALF, MASK, TCP_MIN_SND_MSS, TCPOLEN_TSTAMP_ALIGNED, V4_ADDR_MAX, TcpSock

if TYPE_CHECKING:
    from .shard import Shard

__all__ = ["TCP_BASE_MSS", "TCP_PROBE_THRESHOLD", "TCP_PROBE_INTERVAL", "TCP_MTU_PROBE_FLOOR",
           "tcp_mtup_init", "tcp_mtu_to_mss", "tcp_mss_to_mtu", "tcp_mtup_sync",
           "tcp_mtup_clamp", "tcp_mtu_probe", "tcp_mtup_acked", "tcp_mtup_probe_failed",
           "tcp_mtup_lost", "tcp_mtu_probing"]

#: net.ipv4.tcp_base_mss: the MSS probing starts from (and falls back to).
TCP_BASE_MSS = 1024
#: net.ipv4.tcp_probe_threshold: stop when search_high - search_low is below this.
TCP_PROBE_THRESHOLD = 8
#: net.ipv4.tcp_probe_interval: seconds before a finished search starts again.
TCP_PROBE_INTERVAL = 600.0
#: net.ipv4.tcp_mtu_probe_floor: black-hole halving never goes below this MSS.
TCP_MTU_PROBE_FLOOR = 48
_CA_OPEN = CaState.OPEN
#: Linux's default tp->reordering: a probe needs this many + 1 segments behind it.
_REORDERING = 3


def _optlen(sk: TcpSock) -> int:
    return TCPOLEN_TSTAMP_ALIGNED if sk.ts_ok else 0


def _hdrs(sk: TcpSock) -> int:
    """IP + TCP headers without options: 40 over IPv4, 60 over IPv6 (Linux net_header_len)."""
    return 60 if sk.raddr > V4_ADDR_MAX else 40


def tcp_mtu_to_mss(sk: TcpSock, mtu: int) -> int:
    """Payload per segment for a packet of ``mtu`` bytes (Linux ``tcp_mtu_to_mss``):
    less the headers and our per-segment options, never above the path's
    clamp (``sk.mss``: the peer's MSS, our MTU, TCP_MAXSEG, ICMP), never
    below tcp_min_snd_mss."""
    mss = mtu - _hdrs(sk)
    if mss > sk.mss:
        mss = sk.mss
    mss -= _optlen(sk)
    return mss if mss > TCP_MIN_SND_MSS else TCP_MIN_SND_MSS


def tcp_mss_to_mtu(sk: TcpSock, mss: int) -> int:
    """The packet size a segment of ``mss`` payload bytes makes (Linux ``tcp_mss_to_mtu``)."""
    return mss + _hdrs(sk) + _optlen(sk)


def tcp_mtup_init(sh: Shard, sk: TcpSock, now: float) -> None:
    """At ESTABLISHED (Linux ``tcp_mtup_init``): the search range, and with
    tcp_mtu_probing = 2 probing on from the start at tcp_base_mss."""
    if sh.tracing:
        sh.tr("tcp_mtup_init")
    sk.mtup_enabled = sh.cfg.mtu_probing > 1
    sk.mtup_search_high = sk.mss + _hdrs(sk)
    sk.mtup_search_low = tcp_mss_to_mtu(sk, sh.cfg.base_mss)
    sk.mtup_probe_size = 0
    if sk.mtup_enabled:
        sk.mtup_probe_ts = now
        tcp_mtup_sync(sh, sk)


def tcp_mtup_sync(sh: Shard, sk: TcpSock) -> None:
    """The send MSS with probing on (Linux ``tcp_sync_mss``): what the path
    clamp allows, but no more than search_low, the size known to pass."""
    mss = sk.mss - _optlen(sk)
    if sk.mtup_enabled:
        low = tcp_mtu_to_mss(sk, sk.mtup_search_low)
        if low < mss:
            mss = low
    sk.mss_cache = mss
    if sk.cc is not None:
        sk.cc.set_mss(sk.mss_cache)


def tcp_mtup_clamp(sk: TcpSock) -> None:
    """The path clamp (``sk.mss``) changed, e.g. an ICMP "fragmentation needed":
    the ceiling follows it down (Linux ``tcp_sync_mss``'s search_high)."""
    high = sk.mss + _hdrs(sk)
    if sk.mtup_search_high > high:
        sk.mtup_search_high = high
    mss = sk.mss - _optlen(sk)
    low = tcp_mtu_to_mss(sk, sk.mtup_search_low)
    sk.mss_cache = low if low < mss else mss


def tcp_mtu_probe(sh: Shard, sk: TcpSock, now: float) -> bool:
    """Send one probe segment now if the rules allow (Linux ``tcp_mtu_probe``);
    True if it went.  Called before new data goes out (``tcp_write_new``)."""
    cc = sk.cc
    if (sk.mtup_probe_size or cc is None or cc.ca_state is not _CA_OPEN or cc.cwnd < 11
            or sk.in_recovery or sk.in_loss or sk.ofo or sk.dsack):
        return False
    high = sk.mtup_search_high
    low = sk.mtup_search_low
    mss_now = sk.mss_cache
    probe = tcp_mtu_to_mss(sk, (high + low) >> 1)
    if probe > tcp_mtu_to_mss(sk, high) or high - low < sh.cfg.probe_threshold or probe <= mss_now:
        _check_reprobe(sh, sk, now)
        return False
    needed = probe + (_REORDERING + 1) * mss_now
    una = sk.snd_una
    nxt = sk.snd_nxt
    flight = (nxt - una) & MASK
    if sk.sndq_len - flight < needed or sk.snd_wnd < needed:
        return False
    if ((una + sk.snd_wnd - (nxt + needed)) & MASK) & HALF:
        return False  # beyond the peer's window
    if (flight + mss_now - 1) // mss_now + 2 > cc.cwnd:
        return False  # wait for the flight to drain a little (never stalls: data is in flight)
    if sh.tracing:
        sh.tr("tcp_mtu_probe")
    sk.mss_cache = probe  # one segment of the probe's size, through the ordinary path
    try:
        sent = tcp_output.tcp_write_new(sh, sk, now, probe)
    finally:
        sk.mss_cache = mss_now
    if sent <= 0:
        return False
    cc.cwnd -= 1  # Linux: the probe counts as two segments
    sk.mtup_probe_size = tcp_mss_to_mtu(sk, sent)
    sk.mtup_probe_seq_start = nxt
    sk.mtup_probe_seq_end = (nxt + sent) & MASK
    sh.stats.tcp_mtup_probes += 1
    return True


def _check_reprobe(sh: Shard, sk: TcpSock, now: float) -> None:
    """RFC 4821 §7.7 / Linux ``tcp_mtu_check_reprobe``: after tcp_probe_interval
    the path may have grown: search again from the current size up."""
    if now - sk.mtup_probe_ts < sh.cfg.probe_interval:
        return
    sk.mtup_probe_size = 0
    sk.mtup_search_high = sk.mss + _hdrs(sk)
    sk.mtup_search_low = tcp_mss_to_mtu(sk, sk.mss_cache)
    sk.mtup_probe_ts = now


def tcp_mtup_acked(sh: Shard, sk: TcpSock, ack: int) -> None:
    """An ACK while a probe is out (``tcp_clean_rtx_queue``): if it covers the
    probe, the probe got through (Linux ``tcp_mtup_probe_success``)."""
    if ((ack - sk.mtup_probe_seq_end) & MASK) & HALF:
        return
    cc = sk.cc
    probe = sk.mtup_probe_size
    if cc is not None:
        # The same bytes in flight at the larger size.
        cwnd = cc.cwnd * tcp_mss_to_mtu(sk, sk.mss_cache) // probe
        cc.cwnd = cwnd if cwnd > 1 else 1
        cc.cwnd_frac = cc.cwnd_cnt = 0.0
        keep = (cc.cwnd >> 1) + (cc.cwnd >> 2)  # Linux tcp_current_ssthresh
        if cc.ssthresh < keep:
            cc.ssthresh = keep
    sk.mtup_search_low = probe
    sk.mtup_probe_size = 0
    tcp_mtup_sync(sh, sk)
    sh.stats.tcp_mtup_success += 1


def tcp_mtup_probe_failed(sh: Shard, sk: TcpSock, now: float) -> bool:
    """Recovery is about to start with the probe as the first hole (Linux
    ``tcp_fastretrans_alert``'s "MTU probe failure: don't reduce cwnd"): the
    probe was too big, not a sign of congestion.  The ceiling comes down
    (``tcp_mtup_probe_failed``), the cwnd taken for the probe is given back and
    the flight is resent at the current MSS (``tcp_simple_retransmit``).
    True if that happened (the caller then does not enter recovery)."""
    cc = sk.cc
    if cc is None or cc.ca_state >= CaState.CWR or sk.snd_una != sk.mtup_probe_seq_start:
        return False
    end = sk.mtup_probe_seq_end
    _failed(sh, sk)
    cc.cwnd += 1
    tcp_ipv4.tcp_simple_retransmit(sh, sk, now, end)  # the probe alone, at the current MSS
    return True


def tcp_mtup_lost(sh: Shard, sk: TcpSock) -> None:
    """An RTO with the probe still unacknowledged: count it as failed."""
    if ((sk.snd_una - sk.mtup_probe_seq_end) & MASK) & HALF:
        _failed(sh, sk)


def _failed(sh: Shard, sk: TcpSock) -> None:
    sk.mtup_search_high = sk.mtup_probe_size - 1
    sk.mtup_probe_size = 0
    sh.stats.tcp_mtup_fail += 1


def tcp_mtu_probing(sh: Shard, sk: TcpSock, now: float) -> None:
    """Black-hole detection (Linux ``tcp_mtu_probing``, from ``tcp_write_timeout``
    once retransmissions have lasted tcp_retries1's worth): with
    tcp_mtu_probing >= 1, switch probing on at tcp_base_mss; if it was on
    already, halve the floor (never below tcp_mtu_probe_floor)."""
    if not sh.cfg.mtu_probing:
        return
    if sh.tracing:
        sh.tr("tcp_mtu_probing")
    if not sk.mtup_enabled:
        sk.mtup_enabled = True
        sk.mtup_probe_ts = now
    else:
        mss = tcp_mtu_to_mss(sk, sk.mtup_search_low) >> 1
        if mss > sh.cfg.base_mss:
            mss = sh.cfg.base_mss
        if mss < TCP_MTU_PROBE_FLOOR:
            mss = TCP_MTU_PROBE_FLOOR
        sk.mtup_search_low = tcp_mss_to_mtu(sk, mss)
    sk.mtup_probe_size = 0
    tcp_mtup_sync(sh, sk)
    sh.stats.tcp_mtup_blackholes += 1
