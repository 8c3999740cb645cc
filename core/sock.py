"""The TCP control block (Linux ``struct tcp_sock``) and its state enum.

One slotted dataclass per connection; tcp_input/tcp_output/tcp_timer are
functions over it.  States print their RFC 9293 names (``SYN-SENT``); every
transition goes through ``tcp.tcp_set_state``, which counts and traces it.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .win_minmax import WinMin

if TYPE_CHECKING:
    from .tcp_cong import CongestionControl

__all__ = ["State", "TcpSock"]


class State(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECV = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT1 = "FIN-WAIT-1"
    FIN_WAIT2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    NEW_SYN_RECV = "NEW-SYN-RECV"  # Linux's request sock state (not an RFC state)

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True, eq=False)
class TcpSock:
    """Per-connection state.  Names follow Linux ``tcp_sock`` where one exists.

    Every field must round-trip through ``tcp_migrate`` (a connection moves
    between shards and worker processes): it walks these slots generically, so
    a new field of a plain type (int, float, bool, str, bytes, None, list,
    tuple, deque, memoryview, an enum it knows) needs nothing; any other type
    needs a case in ``tcp_migrate.encode_value``, and a field that must not
    move needs a reason in ``tcp_migrate.SHARD_LOCAL``.
    tests/unit/core/test_tcp_migrate.py fails until it does.
    """

    sd: int
    state: State = State.CLOSED
    laddr: int = 0
    lport: int = 0
    raddr: int = 0
    rport: int = 0
    # -- socket options ------------------------------------------------------------
    reuseaddr: bool = False
    reuseport: bool = False
    nodelay: bool = False
    cork: bool = False  # TCP_CORK (Linux TCP_NAGLE_CORK)
    keepalive: bool = False
    keepidle: float = 7200.0  # tcp_keepalive_time
    keepintvl: float = 75.0  # tcp_keepalive_intvl
    keepcnt: int = 9  # tcp_keepalive_probes
    linger: tuple[bool, int] | None = None
    user_mss: int = 0  # TCP_MAXSEG
    rcvbuf: int = 131072  # tcp_rmem[1]; grows (tcp_rcvbuf) unless rcvbuf_locked
    rcvbuf_locked: bool = False  # SO_RCVBUF (or ShardConfig.rcvbuf) fixed it (SOCK_RCVBUF_LOCK)
    sndbuf: int = 1048576
    cc_name: str = ""
    user_timeout: int = 0  # TCP_USER_TIMEOUT, ms (RFC 5482); 0: the tcp_retries2 rule
    syn_count: int = 0  # TCP_SYNCNT; 0: tcp_syn_retries (tcp_synack_retries on a listener)
    linger2: float = 0.0  # TCP_LINGER2, s; 0: tcp_fin_timeout; < 0: no FIN-WAIT-2 wait
    window_clamp: int = 0  # TCP_WINDOW_CLAMP, bytes; 0: none (the buffer and scale bound it)
    oobinline: bool = False  # SO_OOBINLINE: the urgent byte stays in the stream
    # IPv6 (issue 14, core.tcp_ipv6): the socket's address family, as socket()
    # made it (AF_INET 2 / AF_INET6 10).  laddr/raddr always hold the *wire*
    # addresses (32-bit for IPv4 packets, 128-bit for IPv6 ones), so an
    # AF_INET6 socket talking to an IPv4 peer (v4-mapped) keeps 32-bit ones;
    # the Shard API maps them.  Kept by tcp_disconnect like the options.
    family: int = 2
    v6only: bool = False  # IPV6_V6ONLY: an AF_INET6 socket bound to :: takes IPv6 only
    #: The IPv6 flow label of this connection's packets (RFC 6437 §3: one per
    #: connection, from a keyed hash of its 4-tuple, as Linux's auto flow
    #: labels are a hash of the flow); set at connect/accept, 0 for IPv4.
    flowlabel: int = 0
    # -- bind / listen -------------------------------------------------------------
    bound: bool = False  # owns a bind-bucket entry
    bind_by_connect: bool = False
    backlog: int = 0
    accept_queue: deque[TcpSock] = field(default_factory=deque)
    reqs: int = 0  # request socks outstanding (reqsk_queue_len)
    #: When the SYN queue last overflowed (a cookie was sent); -1: never (Linux
    #: ``rx_queue.last_overflow``, ``tcp_synq_overflow``).
    synq_overflow: float = -1.0
    parent: TcpSock | None = None  # the listener, until accept()
    orphan: bool = False  # close() called; the descriptor belongs to no one
    # -- send sequence space (RFC 9293 §3.3.1) -------------------------------------
    iss: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0  # highest sequence sent (== snd_nxt: retransmissions never rewind it)
    snd_wnd: int = 0
    snd_wl1: int = 0
    snd_wl2: int = 0
    max_window: int = 0
    snd_wscale: int = 0  # peer's shift, applied to windows it sends
    mss: int = 536  # send MSS: peer's MSS option clamped by our MTU, minus nothing
    mss_cache: int = 524  # payload per segment after our per-segment options
    # -- send buffer: chunks of memoryview; byte 0 of chunk 0 is sequence snd_una --
    sndq: deque[memoryview] = field(default_factory=deque)
    sndq_head_off: int = 0  # bytes of chunk 0 already acked
    sndq_len: int = 0  # unacked + unsent bytes
    shut_wr: bool = False  # FIN queued after the buffer
    fin_sent: bool = False
    fin_seq: int = 0
    snd_sml: int = 0  # end of the last small (< MSS) segment sent (Minshall's Nagle); the ISN at open
    # Urgent data sent (RFC 9293 §3.8.5, RFC 6093; Linux tcp_mark_urg): SND.UP is
    # one past the last urgent byte; segments before it carry URG until SND.UNA passes it.
    snd_up: int = 0
    urg_mode: bool = False  # Linux tcp_urg_mode (snd_up ahead of snd_una)
    write_blocked: bool = False  # a send() took less than offered: Writable owed
    # Where the sender's time goes (tcp_chrono): the condition timed now (0: none,
    # 1 busy, 2 rwnd-limited, 3 sndbuf-limited), since when, and the totals, s.
    chrono_type: int = 0
    chrono_start: float = 0.0
    chrono_stat: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # -- receive sequence space ------------------------------------------------------
    irs: int = 0
    rcv_nxt: int = 0
    rcv_wup: int = 0  # rcv_nxt when the window was last advertised
    rcv_wnd: int = 0  # window advertised then (bytes)
    rcv_wscale: int = 0
    rcv_mss: int = 536  # estimate of the peer's segment size (delayed ACK)
    # -- receive-buffer auto-tuning (tcp_rcvbuf; Linux rcvq_space, rcv_rtt_est) -----------
    copied_seq: int = 0  # first sequence number the application has not read
    rcvq_space: int = 0  # bytes read per RTT, as last measured
    rcvq_space_seq: int = 0  # copied_seq when this measurement started
    rcvq_space_time: float = 0.0
    rcv_rtt_est: float = 0.0  # the receiver's RTT estimate, s (0: none yet)
    rcv_rtt_seq: int = 0  # per-window measurement: the edge RCV.NXT must pass
    rcv_rtt_time: float = 0.0  # ... and when it was set (0: none running)
    rcv_rtt_last_tsecr: int = 0  # the last TSecr measured (one sample per echoed tick)
    rcvq: deque[bytes] = field(default_factory=deque)  # in order
    rcvq_len: int = 0
    rcvq_off: int = 0  # bytes of rcvq[0] already read
    ofo: list = field(default_factory=list)  # sorted [start, end, data]
    ofo_len: int = 0
    ofo_fin: int | None = None  # sequence number of a FIN that arrived ahead of a hole
    #: SACK blocks to report, most recent first, at most 4 ([start, end]; Linux
    #: ``rx_opt.selective_acks``), kept up to date as out-of-order data arrives.
    sack_blocks: list[list[int]] = field(default_factory=list)
    #: ``len(ofo)`` when collapsing it last found nothing to join (-1: try again).
    ofo_collapsed: int = -1
    # Urgent data received (Linux tcp_check_urg / tcp_urg): the urgent byte's
    # sequence number and its state, URG_* flags | the byte (0: none).
    urg_seq: int = 0
    urg_data: int = 0
    rd_shut: bool = False  # shutdown(SHUT_RD)
    adv_mss: int = 1460  # the MSS we announce
    fin_rcvd: bool = False
    readable_signalled: bool = False
    # -- options -----------------------------------------------------------------------
    wscale_ok: bool = False
    sack_ok: bool = False
    ts_ok: bool = False
    ts_recent: int = 0
    ts_recent_stamp: float = 0.0
    ts_off: int = 0
    # -- RTT / RTO (RFC 6298) --------------------------------------------------------
    srtt: float = 0.0
    rtt_min: WinMin = field(default_factory=WinMin)  # windowed min RTT (tcp_update_rtt_min)
    min_rtt: float = 0.0  # its value at the last sample, s (0: none yet)
    rttvar: float = 0.0
    rto: float = 1.0
    backoff: int = 0
    retries: int = 0
    rtt_seq: int = -1  # Karn: sequence being timed without timestamps
    rtt_time: float = 0.0
    retrans_stamp: float | None = None  # first retransmission of the episode (Linux retrans_stamp)
    # -- loss recovery (RFC 6675 scoreboard, RFC 6937 PRR, RFC 6582 NewReno) ---------
    cc: CongestionControl | None = None
    dupacks: int = 0
    in_recovery: bool = False  # fast recovery (Linux TCP_CA_Recovery)
    in_loss: bool = False  # after an RTO until ``recover`` is acked (Linux TCP_CA_Loss)
    recover: int = 0  # RecoveryPoint: SND.MAX when recovery / loss began
    sacked: list[list[int]] = field(default_factory=list)  # peer's SACK scoreboard [[start, end]]
    sacked_bytes: int = 0
    #: The smallest data segment sent since the flight was last empty: SACK
    #: blocks narrower than it (and than the MSS) are not believed.
    seg_min: int = 65535  # total of ``sacked``
    reno_sacked: int = 0  # without SACK: bytes the dup ACKs say have left (Linux reno sacks)
    lost_hi: int = 0  # un-SACKed data below this is deemed lost (RFC 6675 IsLost)
    retrans_hi: int = 0  # HighRxt: un-SACKed data below this has been retransmitted
    prr_delivered: int = 0  # RFC 6937 prr_delivered (bytes)
    prr_out: int = 0  # RFC 6937 prr_out (bytes)
    prr_quota: int = 0  # bytes PRR lets us send now (sndcnt)
    recover_fs: int = 1  # RFC 6937 RecoverFS (bytes)
    rtx_log: list = field(default_factory=list)  # this episode's retransmissions [s, e, snd_max, t]
    # When original data left, one entry per transmission burst, flat, TX_LOG_STRIDE
    # (tcp_h) values each: [end, time, and the rate sampler's snapshot at that time:
    # delivered, delivered_mstamp, first_tx_mstamp, app-limited (0/1)] (acked
    # bursts pruned).  RACK (RFC 8985 §6.2) orders by its times; tcp_rate samples
    # the delivery rate from its snapshots (Linux keeps both per skb).
    tx_log: list = field(default_factory=list)
    rack_xmit: float = -1.0  # RACK.xmit_ts: send time of the latest-sent delivered data
    rack_end: int = 0  # RACK.end_seq
    rack_rtt: float = 0.0  # RACK.rtt
    rack_fack: int = 0  # RACK.fack: highest sequence delivered (ACKed or SACKed)
    reord_seen: bool = False  # RACK.reordering_seen
    relost: list[list[int]] = field(default_factory=list)  # retransmissions found lost again [s, e]
    dsack: tuple[int, int] | None = None  # duplicate range to report in the next ACK (RFC 2883)
    reo_wnd_mult: int = 1  # RACK reordering window multiplier (RFC 8985 §6.2.4)
    reo_wnd_bumped: float = -1.0
    reo_wnd_persist: int = 0  # recoveries left before reo_wnd_mult resets
    undo_active: bool = False  # the last reduction may still prove spurious (D-SACK undo)
    undo_marker: int = 0  # SND.UNA when it began
    undo_retrans: int = 0  # its retransmissions not yet reported as duplicates
    rto_ts: int = 0  # our TSval when the last RTO fired (RTT samples in Loss)
    loss_tsval: int = 0  # our TSval at the episode's first RTO (spurious-RTO detection)
    loss_orig_acked: bool = False  # an ACK in Loss echoed an older TSval: the original arrived
    # -- TLP episode (RFC 8985 §7.4; Linux tlp_high_seq, tcp_recovery.tcp_process_tlp_ack) --
    tlp_high_seq: int = -1  # TLPHighRxt: SND.NXT when the outstanding probe went (-1: none)
    tlp_retrans: bool = False  # TLPRxtOut: that probe retransmitted (not new data)
    # RACK: the SACK blocks of the ACK being processed, [start, end) (tcp_rack_advance
    # checks only the retransmissions they touch)
    rack_sacked_new: list = field(default_factory=list)
    # -- F-RTO (RFC 5682; Linux tp->frto, tcp_recovery.tcp_process_frto) ----------------
    frto: bool = False  # this RTO may still prove spurious: new data goes before retransmissions
    frto_sacked: int = 0  # bytes SACKed above the retransmitted head, below the recovery point
    total_retrans: int = 0  # segments retransmitted (tcpi_total_retrans)
    bytes_retrans: int = 0  # payload bytes retransmitted (tcpi_bytes_retrans)
    recoveries: int = 0  # fast recoveries entered
    rtos: int = 0  # retransmission timeouts
    tx_csum: int = 0  # folded constant part of our TCP checksum (tcp_output; 0: not yet)
    tx_ipsum: int = 0  # ... and of our IPv4 header checksum
    # -- RFC 4898 / tcp_info counters, counted where Linux counts them ---------------
    segs_in: int = 0  # segments received (GRO super-frames by their segment count)
    data_segs_in: int = 0  # ... of which carried data
    segs_out: int = 0  # segments sent (super-segments by the segments they become)
    data_segs_out: int = 0  # ... of which carried data (retransmissions included)
    delivered: int = 0  # segments delivered: cumulatively ACKed or SACKed, each once
    rcv_ooopack: int = 0  # segments queued out of order
    dsack_dups: int = 0  # segments a D-SACK reported as received twice
    reord_events: int = 0  # reordering detected (tcpi_reord_seen; ``reord_seen`` is RACK's flag)
    # -- ECN (RFC 3168; core.tcp_ecn: Linux tp->ecn_flags and the CWR state) ---------
    ecn_flags: int = 0  # tcp_ecn.TCP_ECN_* bits (0: ECN not in use)
    ecn_high_seq: int = 0  # SND.NXT when the CWR reduction began (Linux high_seq)
    ecn_prior_cwnd: int = 0  # cwnd then, segments (Linux prior_cwnd)
    ecn_prr_delivered: int = 0  # segments delivered since (Linux prr_delivered)
    delivered_ce: int = 0  # segments delivered by ACKs with ECE (tcpi_delivered_ce)
    # -- PLPMTUD (RFC 4821; core.tcp_mtup: Linux icsk_mtup, tp->mtu_probe) -----------
    mtup_enabled: bool = False  # probing on (tcp_mtu_probing 2, or 1 after a black hole)
    mtup_search_high: int = 0  # MTU not known to fail, bytes
    mtup_search_low: int = 0  # MTU known to pass, bytes
    mtup_probe_size: int = 0  # MTU of the probe in flight (0: none)
    mtup_probe_seq_start: int = 0
    mtup_probe_seq_end: int = 0
    mtup_probe_ts: float = 0.0  # when the search (re)started
    # -- pacing / rate sampling (tcp_rate: Linux tcp_rate.c; tcp_pacing: tcp_update_pacing_rate,
    # the internal pacing of tcp_output.c) ----------------------------------------------
    pacing_rate: int = 0  # bytes/s (sk_pacing_rate); set from cwnd/SRTT on every ACK
    max_pacing_rate: int = 0xFFFFFFFFFFFFFFFF  # SO_MAX_PACING_RATE (sk_max_pacing_rate); ~0: none
    pacing_needed: bool = False  # pace in the engine (Linux sk_pacing_status == SK_PACING_NEEDED)
    wstamp: float = 0.0  # earliest departure of the next segment (Linux tcp_wstamp_ns), s
    first_tx_mstamp: float = 0.0  # send time of the latest-sent delivered data (or flight start)
    delivered_mstamp: float = 0.0  # when ``delivered`` last grew (or the flight started)
    app_limited: int = 0  # ``delivered`` + in flight when the app ran dry (0: not app-limited)
    rate_delivered: int = 0  # the chosen rate sample: segments delivered ...
    rate_interval: float = 0.0  # ... over this interval, s
    rate_app_limited: bool = False  # ... while the application did not fill the window
    rate_round_end: int = 0  # SND.NXT at the last sample: the fast path samples when it is acked
    reordering: int = 3  # degree of reordering seen, segments (tp->reordering; tcp_reordering)
    # -- delayed ACK (tcp_delack: Linux icsk_ack) ----------------------------------------
    quickack: int = 0  # icsk_ack.quick: ACKs left to send at once (granted with the first data)
    ato: float = 0.0  # icsk_ack.ato: the delayed-ACK timeout estimate (0: no data yet)
    lrcvtime: float = 0.0  # icsk_ack.lrcvtime: when in-order data last arrived
    pingpong: int = 0  # icsk_ack.pingpong: replies sent within ato (interactive from 1)
    unacked_rcv: int = 0  # bytes received since we last sent an ACK
    ack_now: bool = False
    last_oow_ack: float = -1.0  # RFC 5961 §7 / Linux tcp_oow_rate_limited
    # -- timers: deadline per TimerKind (None = idle) --------------------------------
    timers: list[float | None] = field(default_factory=lambda: [None] * 9)
    timer_seq: list[int] = field(default_factory=lambda: [0] * 9)  # representative heap entry (tcp_timer)
    timer_q: list[float | None] = field(default_factory=lambda: [None] * 9)  # its deadline (tcp_timer)
    probes: int = 0  # persist / keepalive probes sent without answer
    probes_tstamp: float | None = None  # first unanswered zero-window probe (icsk_probes_tstamp)
    rcv_tstamp: float = 0.0  # last segment received (keepalive idle)
    lsndtime: float = -1.0  # when we last sent data (-1: never)
    syn_retries: int = 0
    # -- errors / lifecycle -------------------------------------------------------------
    err: int = 0  # pending SO_ERROR
    err_soft: int = 0  # last soft error (ICMP); a timeout reports it instead of ETIMEDOUT
    dead: bool = False
    closed_evt: bool = False  # Closed(sd) already reported

    def __repr__(self) -> str:
        return f"<TcpSock sd={self.sd} {self.state} {self.lport}->{self.rport}>"

