"""TCP_INFO: a connection's state as ``struct tcp_info`` (Linux ``tcp_get_info``).

The layout is Linux's UAPI ``struct tcp_info`` (include/uapi/linux/tcp.h),
field for field, in the host's byte order, as it stands in Linux 6.18
(280 bytes, ending with the Accurate ECN counters).  Programs read it with
``getsockopt(IPPROTO_TCP, TCP_INFO, n)`` and decode it with their own copy of
the struct (or ``ss``-like tools with offsets), so the offsets are the
contract; a caller truncates to the length the app asked for, as the kernel
copies ``min(len, sizeof)`` bytes.

Best effort: the engine fills what it models and leaves the rest zero.
Known: state (Linux's numbering), ca_state, retransmits, probes, backoff,
options and window scales, rto/ato, MSSes, the RFC 6675 scoreboard as
segment counts (unacked, sacked, lost, retrans), idle times, pmtu (the
interface MTU: a smaller path MTU is kept only as the MSS), RTT/RTTVAR, ssthresh, cwnd, advmss, total_retrans, bytes acked/received/
sent, min RTT, notsent bytes, snd_wnd/rcv_wnd, RTO count, and the
per-socket counters the engine keeps where Linux counts them
(``TcpSock``): segs_in/out and data_segs_in/out (GRO super-frames and GSO
super-segments by the segments they stand for), delivered, rcv_ooopack,
dsack_dups, reord_seen (reordering events), bytes_retrans, and ECN's
TCPI_OPT_ECN / TCPI_OPT_ECN_SEEN options bits and delivered_ce (``tcp_ecn``).  Byte
counters but bytes_retrans wrap at 4 GiB (they are read off the sequence
space, which the engine does not count beyond).  busy_time, rwnd_limited
and sndbuf_limited come from ``tcp_chrono``; rcv_rtt and rcv_space from
receive auto-tuning (``tcp_rcvbuf``); min_rtt is windowed (``win_minmax``).
pacing_rate/max_pacing_rate from ``tcp_pacing`` (~0: unlimited, as
Linux), delivery_rate and its app-limited flag from ``tcp_rate``.
Zero: AccECN's byte counters.

Listeners report only what Linux reports for one: the state, cwnd,
reordering, the pacing rates, and the accept queue's length in
``tcpi_unacked`` with the backlog in ``tcpi_sacked`` (``tcp_listen_info``).

Pure: the time comes in as ``now`` (the engine's clock, seconds).
"""

from __future__ import annotations

import struct
import sys

from . import tcp_chrono, tcp_input, tcp_output, tcp_pacing, tcp_rate
from .tcp_cong import INFINITE_SSTHRESH, INIT_CWND
from .tcp_h import HALF, MASK, TCP_FASTRETRANS_THRESH, State, TcpSock

__all__ = ["TCP_INFO_LEN", "TCPI_FIELDS", "TCPI_OPT_TIMESTAMPS", "TCPI_OPT_SACK",
           "TCPI_OPT_WSCALE", "TCPI_OPT_ECN", "TCPI_OPT_ECN_SEEN", "LINUX_STATE", "tcp_get_info", "tcp_listen_info",
           "unpack_tcp_info"]

#: ``struct tcp_info`` in declaration order: (name, struct code).  ``wscale``
#: is the byte holding the two 4-bit fields tcpi_snd_wscale (declared first)
#: and tcpi_rcv_wscale; ``flags`` holds tcpi_delivery_rate_app_limited:1 and
#: tcpi_fastopen_client_fail:2; ``accecn`` tcpi_accecn_fail_mode:4 and
#: tcpi_accecn_opt_seen:2.  ``_pad`` fields are the C compiler's padding.
TCPI_FIELDS: tuple[tuple[str, str], ...] = (
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"),
    ("backoff", "B"), ("options", "B"), ("wscale", "B"), ("flags", "B"),
    ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"),
    ("last_ack_recv", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt", "I"), ("rttvar", "I"),
    ("snd_ssthresh", "I"), ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"),
    ("rcv_rtt", "I"), ("rcv_space", "I"), ("total_retrans", "I"),
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"), ("bytes_acked", "Q"),
    ("bytes_received", "Q"), ("segs_out", "I"), ("segs_in", "I"),
    ("notsent_bytes", "I"), ("min_rtt", "I"), ("data_segs_in", "I"), ("data_segs_out", "I"),
    ("delivery_rate", "Q"), ("busy_time", "Q"), ("rwnd_limited", "Q"),
    ("sndbuf_limited", "Q"), ("delivered", "I"), ("delivered_ce", "I"),
    ("bytes_sent", "Q"), ("bytes_retrans", "Q"), ("dsack_dups", "I"), ("reord_seen", "I"),
    ("rcv_ooopack", "I"), ("snd_wnd", "I"), ("rcv_wnd", "I"), ("rehash", "I"),
    ("total_rto", "H"), ("total_rto_recoveries", "H"), ("total_rto_time", "I"),
    ("received_ce", "I"), ("delivered_e1_bytes", "I"), ("delivered_e0_bytes", "I"),
    ("delivered_ce_bytes", "I"), ("received_e1_bytes", "I"), ("received_e0_bytes", "I"),
    ("received_ce_bytes", "I"), ("accecn", "H"), ("_pad", "H"),
)
# "=": the host's byte order with standard sizes and no implicit padding;
# every field above already sits at its natural alignment, as in the C struct.
_TCP_INFO = struct.Struct("=" + "".join(code for _name, code in TCPI_FIELDS))
_NAMES = tuple(name for name, _code in TCPI_FIELDS)
_INDEX = {name: i for i, name in enumerate(_NAMES)}
#: sizeof(struct tcp_info) in Linux 6.18.
TCP_INFO_LEN = _TCP_INFO.size

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCPI_OPT_ECN = 8  # ECN was negotiated at the handshake (RFC 3168 §6.1.1)
TCPI_OPT_ECN_SEEN = 16  # at least one ECT or CE mark was received

#: include/net/tcp_states.h numbering (tcpi_state, /proc/net/tcp's "st").
LINUX_STATE = {
    State.ESTABLISHED: 1, State.SYN_SENT: 2, State.SYN_RECV: 3, State.FIN_WAIT1: 4,
    State.FIN_WAIT2: 5, State.TIME_WAIT: 6, State.CLOSED: 7, State.CLOSE_WAIT: 8,
    State.LAST_ACK: 9, State.LISTEN: 10, State.CLOSING: 11, State.NEW_SYN_RECV: 12,
}

_U32 = 0xFFFFFFFF
_NO_RATE = 0xFFFFFFFFFFFFFFFF  # Linux reports ~0 for "no pacing rate limit"
#: tcpi_delivery_rate_app_limited: the first bit-field of the ``flags`` byte
#: (GCC allocates bit-fields from the least significant bit on little-endian
#: hosts, from the most significant on big-endian ones).
_APP_LIMITED_BIT = 1 if sys.byteorder == "little" else 0x80
_LITTLE = sys.byteorder == "little"
_SYN_UNACKED = (State.SYN_SENT, State.SYN_RECV)


def _nibbles(first: int, second: int) -> int:
    """Two 4-bit C bit-fields sharing a byte: GCC allocates from the least
    significant bit on little-endian hosts, from the most significant on big."""
    first, second = first & 0xF, second & 0xF
    return first | second << 4 if _LITTLE else first << 4 | second


def _blank() -> list[int]:
    vals = [0] * len(_NAMES)
    vals[_INDEX["pacing_rate"]] = _NO_RATE
    vals[_INDEX["max_pacing_rate"]] = _NO_RATE
    vals[_INDEX["reordering"]] = TCP_FASTRETRANS_THRESH
    return vals


def tcp_listen_info(queued: int, backlog: int, cwnd: int = INIT_CWND) -> bytes:
    """A listener's tcp_info: Linux stops after the fields meaningful for every
    state and puts the accept queue there (tcpi_unacked: children ready for
    accept(), tcpi_sacked: the backlog)."""
    vals = _blank()
    vals[_INDEX["state"]] = LINUX_STATE[State.LISTEN]
    vals[_INDEX["snd_cwnd"]] = cwnd
    vals[_INDEX["unacked"]] = queued & _U32
    vals[_INDEX["sacked"]] = backlog & _U32
    return _TCP_INFO.pack(*vals)


def _segs(nbytes: int, mss: int) -> int:
    """Bytes of sequence space as Linux's packet counts (packets_out & co)."""
    return -(-nbytes // mss) if nbytes > 0 else 0


def _usec(seconds: float) -> int:
    # Rounded, not truncated: the engine's times are binary floats (210 ms after a
    # 10 ms RTT can be 0.20999999999999996 s), Linux's whole jiffies or microseconds.
    return min(max(round(seconds * 1e6), 0), _U32)


def _msec_since(now: float, then: float) -> int:
    return min(max(int((now - then) * 1000), 0), _U32)


def tcp_get_info(sk: TcpSock, now: float) -> bytes:
    """``struct tcp_info`` for ``sk`` at ``now`` (Linux ``tcp_get_info``)."""
    if sk.state is State.LISTEN:
        return tcp_listen_info(len(sk.accept_queue), sk.backlog)
    vals = _blank()
    put = vals.__setitem__
    ix = _INDEX
    cc = sk.cc
    state = sk.state
    mss = sk.mss_cache if sk.mss_cache > 0 else 1
    una = sk.snd_una
    put(ix["state"], LINUX_STATE.get(state, LINUX_STATE[State.CLOSED]))
    put(ix["ca_state"], int(cc.ca_state) if cc is not None else 0)
    # icsk_retransmits: consecutive RTO retransmissions not yet answered.
    put(ix["retransmits"], min(sk.syn_retries if state in _SYN_UNACKED else sk.retries, 255))
    put(ix["probes"], min(sk.probes, 255))
    put(ix["backoff"], min(sk.backoff, 255))
    opts = 0
    if sk.ts_ok:
        opts |= TCPI_OPT_TIMESTAMPS
    if sk.sack_ok:
        opts |= TCPI_OPT_SACK
    if sk.wscale_ok:
        opts |= TCPI_OPT_WSCALE
        put(ix["wscale"], _nibbles(sk.snd_wscale, sk.rcv_wscale))
    if sk.ecn_flags & 1:  # tcp_ecn.TCP_ECN_OK
        opts |= TCPI_OPT_ECN
    if sk.ecn_flags & 8:  # tcp_ecn.TCP_ECN_SEEN
        opts |= TCPI_OPT_ECN_SEEN
    put(ix["options"], opts)
    put(ix["rto"], _usec(tcp_output.tcp_rto(sk)))  # icsk_rto: backed off, as the timer runs
    if sk.ato:
        put(ix["ato"], _usec(sk.ato))  # icsk_ack.ato: set with the first data (tcp_delack)
    put(ix["snd_mss"], sk.mss_cache)
    put(ix["rcv_mss"], sk.rcv_mss)

    # The RFC 6675 scoreboard, in segments as Linux counts them.
    flight = (sk.snd_max - una) & MASK
    if flight & HALF:
        flight = 0
    sacked = sk.sacked_bytes if sk.sack_ok else sk.reno_sacked
    put(ix["unacked"], _segs(flight, mss))
    put(ix["sacked"], _segs(sacked, mss))
    if sk.in_recovery or sk.in_loss:
        put(ix["lost"], _segs(tcp_input.tcp_unsacked_below(sk, una, sk.lost_hi), mss))
        put(ix["retrans"], _segs(tcp_input.tcp_unsacked_below(sk, una, sk.retrans_hi), mss))

    if sk.lsndtime >= 0:
        put(ix["last_data_sent"], _msec_since(now, sk.lsndtime))
    # The engine keeps one receive time (any segment): Linux's lrcvtime
    # (data) and rcv_tstamp (ACKs) both read it.
    put(ix["last_data_recv"], _msec_since(now, sk.rcv_tstamp))
    put(ix["last_ack_recv"], _msec_since(now, sk.rcv_tstamp))

    if sk.raddr:
        # icsk_pmtu_cookie, set with the route at connect (IPv6 headers: 60 bytes)
        put(ix["pmtu"], sk.adv_mss + (60 if sk.raddr > 0xFFFFFFFF else 40))
    free = sk.rcvbuf - sk.rcvq_len - sk.ofo_len
    cap = 65535 << sk.rcv_wscale
    if sk.window_clamp and sk.window_clamp < cap:
        cap = sk.window_clamp
    put(ix["rcv_ssthresh"], min(max(free, 0), cap) if sk.raddr else 0)
    put(ix["rtt"], _usec(sk.srtt))
    put(ix["rttvar"], _usec(sk.rttvar))
    put(ix["snd_ssthresh"], cc.ssthresh if cc is not None else INFINITE_SSTHRESH)
    put(ix["snd_cwnd"], cc.cwnd if cc is not None else INIT_CWND)
    put(ix["advmss"], sk.adv_mss)
    # Receive auto-tuning (tcp_rcvbuf): what the application read in the last
    # measured RTT (Linux rcvq_space.space), and the receiver's RTT estimate, µs.
    put(ix["rcv_space"], sk.rcvq_space if sk.rcvq_space else sk.rcvbuf)
    put(ix["rcv_rtt"], int(sk.rcv_rtt_est * 1e6) & _U32)
    busy, rwnd, sndbuf = tcp_chrono.tcp_chrono_times(sk, now)  # µs, as Linux's chronographs
    put(ix["busy_time"], int(busy * 1e6))
    put(ix["rwnd_limited"], int(rwnd * 1e6))
    put(ix["sndbuf_limited"], int(sndbuf * 1e6))
    put(ix["total_retrans"], sk.total_retrans & _U32)

    acked, sent = _bytes_acked_sent(sk)
    put(ix["bytes_acked"], acked)
    put(ix["bytes_received"], _bytes_received(sk))
    inflight_data = flight - (1 if state in _SYN_UNACKED else 0) - _fin_unacked(sk)
    put(ix["notsent_bytes"], max(sk.sndq_len - max(inflight_data, 0), 0))
    min_rtt = sk.rtt_min.get(now)  # windowed, as Linux's tcp_min_rtt()
    put(ix["min_rtt"], _usec(min_rtt) if min_rtt is not None else _U32)
    # tcpi_bytes_sent counts every transmission, retransmissions included.
    put(ix["bytes_sent"], sent + sk.bytes_retrans)
    put(ix["bytes_retrans"], sk.bytes_retrans)
    put(ix["segs_out"], sk.segs_out & _U32)
    put(ix["segs_in"], sk.segs_in & _U32)
    put(ix["data_segs_out"], sk.data_segs_out & _U32)
    put(ix["data_segs_in"], sk.data_segs_in & _U32)
    put(ix["delivered"], sk.delivered & _U32)
    put(ix["delivered_ce"], sk.delivered_ce & _U32)
    put(ix["dsack_dups"], sk.dsack_dups & _U32)
    put(ix["reord_seen"], sk.reord_events & _U32)
    put(ix["rcv_ooopack"], sk.rcv_ooopack & _U32)
    put(ix["snd_wnd"], sk.snd_wnd & _U32)
    put(ix["rcv_wnd"], sk.rcv_wnd & _U32)
    put(ix["total_rto"], min(sk.rtos + sk.syn_retries, 0xFFFF))
    # Pacing and delivery rate (tcp_pacing, tcp_rate), bytes/s as Linux reports them.
    put(ix["pacing_rate"], sk.pacing_rate if sk.pacing_needed else tcp_pacing.tcp_pacing_rate(sk))
    put(ix["max_pacing_rate"], sk.max_pacing_rate)
    put(ix["delivery_rate"], tcp_rate.tcp_delivery_rate(sk))
    if sk.rate_app_limited:
        put(ix["flags"], _APP_LIMITED_BIT)
    put(ix["reordering"], sk.reordering)  # tcp_recovery.tcp_rack_check_reordering
    return _TCP_INFO.pack(*vals)


def _fin_unacked(sk: TcpSock) -> int:
    return 1 if sk.fin_sent and ((sk.fin_seq - sk.snd_una) & MASK) < HALF else 0


def _bytes_acked_sent(sk: TcpSock) -> tuple[int, int]:
    """Sequence space acknowledged, and payload bytes sent once.

    Linux counts tcpi_bytes_acked as SND.UNA advances, so an active opener's
    SYN and an acknowledged FIN are in it (1 right after connect(), n + 2
    after n bytes and the FIN); tcpi_bytes_sent is payload only.
    """
    if sk.iss == 0 and sk.snd_max == 0:
        return 0, 0
    acked = (sk.snd_una - sk.iss) & MASK
    sent = (sk.snd_max - sk.iss) & MASK
    if acked & HALF or sent & HALF:
        return 0, 0
    sent -= 1 + (1 if sk.fin_sent else 0)  # the SYN and the FIN carry no payload
    return acked, max(sent, 0)


def _bytes_received(sk: TcpSock) -> int:
    """Sequence space received in order after the SYN (tcpi_bytes_received:
    Linux advances it with RCV.NXT, so a received FIN counts one)."""
    if sk.rcv_nxt == 0 and sk.irs == 0:
        return 0
    n = (sk.rcv_nxt - sk.irs - 1) & MASK
    return 0 if n & HALF else n


def unpack_tcp_info(buf: bytes | bytearray | memoryview) -> dict[str, int]:
    """Decode a (possibly truncated) ``struct tcp_info``; missing fields read 0.

    ``snd_wscale``/``rcv_wscale`` are split out of their shared byte, and
    ``delivery_rate_app_limited`` out of ``flags``.
    """
    raw = bytes(buf)[:TCP_INFO_LEN].ljust(TCP_INFO_LEN, b"\0")
    out = dict(zip(_NAMES, _TCP_INFO.unpack(raw), strict=True))
    del out["_pad"]
    w = out["wscale"]
    out["snd_wscale"], out["rcv_wscale"] = (w & 0xF, w >> 4) if _LITTLE else (w >> 4, w & 0xF)
    out["delivery_rate_app_limited"] = 1 if out["flags"] & _APP_LIMITED_BIT else 0
    return out
