"""The Shard: one host's TCP engine, sans I/O (h11's ``Connection`` for a whole stack).

IPv4 and IPv6 packets and the time go in; IPv4 and IPv6 packets (tell them
apart by the version nibble), socket events and the next timer deadline
come out.  Socket operations use small integer descriptors
local to the shard (never reused).  Nothing here reads a clock, a socket or
a random source: ``now`` and ``ShardConfig.secret`` come from the caller.

Errors from bad API use are ``OSError`` with Linux's errno; malformed packets
are counted under a :class:`~shardstack.core.dropreason.DropReason` in
``stats.drops`` and dropped.
"""

from __future__ import annotations

import errno
import hashlib
import socket as _socket
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import (
    fault,
    icmp,
    icmpv6,
    inet_connection_sock,
    tcp,
    tcp_cong,
    tcp_delack,
    tcp_info,
    tcp_ipv4,
    tcp_ipv6,
    tcp_migrate,
    tcp_output,
    tcp_pacing,
    tcp_rcvbuf,
    tcp_timer,
    udp,
)
from .dropreason import DropReason
from .events import Event, SocketError
from .inet_connection_sock import EPHEMERAL_HI, EPHEMERAL_LO
from .inet_hashtables import InetHashinfo
from .tcp_h import (
    AF_INET,
    AF_INET6,
    MAX_TCP_KEEPCNT,
    MAX_TCP_KEEPIDLE,
    MAX_TCP_KEEPINTVL,
    MAX_TCP_SYNCNT,
    TCP_FIN_TIMEOUT,
    TCP_FIN_TIMEOUT_MAX,
    TCP_SYN_LINEAR_TIMEOUTS,
    TCP_SYN_RETRIES,
    TCP_V6_HDRS,
    V4_ADDR_MAX,
    BytesLike,
    RequestSock,
    SockOptValue,
    State,
    TcpSock,
    TimerKind,
    os_error,
)

__all__ = ["Shard", "ShardConfig", "ShardStats", "ConnInfo"]


#: socket.MSG_OOB as a plain int: the enum's ``&`` costs ~3 µs per send/recv.
_MSG_OOB = int(_socket.MSG_OOB)

@dataclass(slots=True)
class ShardConfig:
    """Per-shard settings; defaults follow Linux's sysctls."""

    addrs: list[int] = field(default_factory=list)
    #: Our IPv6 addresses (128-bit ints, none in ::/96 or v4-mapped); the first
    #: is an IPv6 connect()'s source.  A shard may have only these, or none.
    addrs6: list[int] = field(default_factory=list)
    mtu: int = 1500
    secret: bytes = b""
    trace: bool = False
    #: port_filter(laddr, lport, raddr, rport) -> bool: acceptable ephemeral ports.
    port_filter: Callable[[int, int, int, int], bool] | None = None
    ephemeral_range: tuple[int, int] = (EPHEMERAL_LO, EPHEMERAL_HI)
    #: Largest segment to send (TSO-like super-segments); 0: segments <= MSS.
    tso_max: int = 0
    #: Checksums were already validated by the device (GRO / PACKET_VNET_HDR).
    csum_offload: bool = False
    #: Transmit checksum offload: super-segments (the pairs ``take_frames_gso``
    #: gives a non-zero gso_size) carry only the pseudo-header sum in the TCP
    #: checksum field, for a device that sends them with NEEDS_CSUM.
    tx_csum_offload: bool = False
    #: net.ipv4.tcp_syncookies: 0 never, 1 when the SYN queue is full, 2 always.
    syncookies: int = 1
    window_scaling: bool = True
    sack: bool = True
    timestamps: bool = True
    #: A fixed receive buffer for every socket (as SO_RCVBUF: no auto-tuning);
    #: 0: start at tcp_rmem[1] and auto-tune up to tcp_rmem[2] (Linux's default).
    rcvbuf: int = 0
    #: net.ipv4.tcp_rmem (min, default, max), bytes.
    tcp_rmem: tuple[int, int, int] = tcp_rcvbuf.TCP_RMEM
    sndbuf: int = 1048576
    congestion: str = tcp_cong.DEFAULT
    #: net.ipv4.tcp_frto: F-RTO (RFC 5682, SACK-enhanced) after an RTO; 0 off.
    frto: int = 2
    #: Most connections (established, handshaking, TIME-WAIT: the 4-tuple
    #: table) this shard holds; a SYN past it is dropped (TCP_CONN_LIMIT).
    #: 0: no cap.
    max_connections: int = 0
    #: Linux tcp_mem for this shard, in bytes of queued data (receive memory
    #: as charged per segment, plus send queues): (low, pressure, high).
    #: Above ``pressure`` out-of-order data is pruned and not accepted; above
    #: ``high`` new connections are refused and no data is queued (TCP_MEM).
    #: Linux sizes its triple from RAM (a 24 GiB host: ~1.1/1.5/2.2 GiB for
    #: all sockets); per worker we default lower.
    tcp_mem: tuple[int, int, int] = (128 << 20, 256 << 20, 512 << 20)
    #: net.ipv4.tcp_syn_linear_timeouts: SYN retransmissions on a linear timer first.
    syn_linear_timeouts: int = TCP_SYN_LINEAR_TIMEOUTS
    #: net.ipv4.tcp_ecn (RFC 3168, core.tcp_ecn): 0 off; 1 ask for ECN on our
    #: SYNs and accept it; 2 (Linux's default) accept when a peer asks, never ask.
    ecn: int = 2
    #: net.ipv4.tcp_mtu_probing (RFC 4821, core.tcp_mtup): 0 off (Linux's default);
    #: 1 on once a black hole is suspected; 2 always.
    mtu_probing: int = 0
    #: net.ipv4.tcp_base_mss, tcp_probe_threshold (bytes), tcp_probe_interval (s).
    base_mss: int = 1024
    probe_threshold: int = 8
    probe_interval: float = 600.0
    #: Pace every connection in the engine (tcp_pacing), as Linux does under the
    #: fq qdisc or a congestion control that needs pacing; off: only sockets
    #: with SO_MAX_PACING_RATE are paced (Linux with CUBIC and no fq).
    pacing: bool = False


@dataclass(slots=True)
class ShardStats:
    """Counters (Linux MIB names where one exists)."""

    segs_in: int = 0
    segs_out: int = 0
    retrans_segs: int = 0
    out_rsts: int = 0
    active_opens: int = 0
    active_opens_done: int = 0
    passive_opens: int = 0
    estab_resets: int = 0  # ESTABLISHED / CLOSE-WAIT -> CLOSED (EstabResets, tcp_set_state)
    curr_estab: int = 0  # sockets in ESTABLISHED or CLOSE-WAIT now (CurrEstab, tcp_set_state)
    listen_overflows: int = 0
    syncookies_sent: int = 0
    syncookies_recv: int = 0
    synack_timeouts: int = 0
    challenge_acks: int = 0
    fast_retrans: int = 0  # fast recoveries entered (TCPSackRecovery + TCPRenoRecovery)
    rto_fires: int = 0
    partial_acks: int = 0  # NewReno partial ACKs in recovery (TCPRenoRecoveryFail-ish)
    sack_reneging: int = 0  # TCPSACKReneging
    dsacks_sent: int = 0  # TCPDSACKOldSent + TCPDSACKOfoSent
    dsacks_recv: int = 0  # TCPDSACKRecv
    lost_retransmits: int = 0  # retransmissions found lost and sent again (TCPLostRetransmit)
    tlp_probes: int = 0  # tail loss probes sent (TCPLossProbes)
    tlp_recoveries: int = 0  # probes that repaired a loss: cwnd reduced (TCPLossProbeRecovery)
    rack_reo_timeouts: int = 0  # RACK reordering-window expiries that marked losses
    dsack_undos: int = 0  # reductions undone: every retransmission was a duplicate (TCPDSACKUndo)
    rto_undos: int = 0  # spurious RTOs undone: the original was acknowledged (TCPLossUndo)
    spurious_rtos: int = 0  # ... of which F-RTO found (RFC 5682; TCPSpuriousRTOs)
    delayed_acks: int = 0
    delayed_ack_lost: int = 0  # duplicate data: our ACK was lost or late; quick-ack mode (DelayedACKLost)
    zero_window_probes: int = 0
    keepalive_probes: int = 0
    ofo_queued: int = 0
    prune_called: int = 0  # receive memory over budget: queues collapsed/pruned (PruneCalled)
    rcv_collapsed: int = 0  # collapses of the receive or out-of-order queue (TCPRcvCollapsed)
    ofo_pruned: int = 0  # prunes that dropped out-of-order data (OfoPruned)
    ofo_drop: int = 0  # out-of-order segments dropped by pruning (TCPOFODrop)
    tcp_mem_pressures: int = 0  # times the shard entered tcp_mem pressure (TCPMemoryPressures)
    sack_capped: int = 0  # SACK blocks ignored: the scoreboard was at TCP_SACK_MAX_ENTRIES
    oow_acks_accepted: int = 0  # ACKs used from segments beyond our window (RFC 9293 §3.10.7.4)
    tw_recycled: int = 0
    tcp_delivered_ce: int = 0  # segments delivered by ACKs with ECE (TCPDeliveredCE)
    tcp_mtup_probes: int = 0  # PLPMTUD probes sent
    tcp_mtup_success: int = 0  # probes acknowledged: the MSS grew (TCPMTUPSuccess)
    tcp_mtup_fail: int = 0  # probes lost: the ceiling came down (TCPMTUPFail)
    tcp_mtup_blackholes: int = 0  # black holes suspected after tcp_retries1 of RTOs
    # ICMP (core.icmp; Linux ICMP MIB and TCP's ICMP counters)
    icmp_in_msgs: int = 0  # every ICMP message for one of our addresses (InMsgs)
    icmp_in_errors: int = 0  # malformed, or quoting no socket of ours (InErrors)
    icmp_in_csum_errors: int = 0  # InCsumErrors
    icmp_in_dest_unreachs: int = 0
    icmp_in_time_excds: int = 0
    icmp_in_parm_probs: int = 0
    icmp_in_ignored: int = 0  # source quench (RFC 6633), redirects, informational
    tcp_out_of_window_icmps: int = 0  # quoted seq outside SND.UNA..SND.NXT (OutOfWindowIcmps)
    tcp_pmtu_reductions: int = 0  # "fragmentation needed" that lowered a connection's MSS
    tcp_icmp_aborts: int = 0  # handshakes ended by an ICMP error (connects, request socks)
    tcp_icmp_soft_errors: int = 0  # errors kept as sk_err_soft for a later timeout
    # ICMPv6 (core.icmpv6; Linux Icmp6 MIB names)
    icmp6_in_msgs: int = 0
    icmp6_in_errors: int = 0
    icmp6_in_csum_errors: int = 0
    icmp6_in_dest_unreachs: int = 0
    icmp6_in_pkt_too_bigs: int = 0
    icmp6_in_time_excds: int = 0
    icmp6_in_parm_problems: int = 0
    icmp6_in_ignored: int = 0  # echo, ND, MLD: netio's business
    icmp6_out_parm_problems: int = 0  # Parameter Problems we sent (RFC 8200 §4)
    drops: Counter[DropReason] = field(default_factory=Counter)

    def drop(self, reason: DropReason) -> None:
        """Count one segment discarded for ``reason`` (Linux ``kfree_skb_reason``)."""
        self.drops[reason] += 1

    def as_dict(self) -> dict[str, int]:
        out = {k: getattr(self, k) for k in self.__slots__ if k != "drops"}
        for reason, n in self.drops.items():
            out[f"drop_{reason.value}"] = n
        return out


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """One row of ``shardstack ss``."""

    sd: int | None
    state: str
    laddr: int
    lport: int
    raddr: int
    rport: int
    send_q: int
    recv_q: int
    cwnd: int
    srtt: float
    rto: float
    #: The connection's TCP_INFO, decoded (``tcp_info.unpack_tcp_info``), plus its
    #: congestion control's name: what ``shardstack ss -i`` prints, as ``ss -ti``.
    info: dict[str, int | str] = field(default_factory=dict)


_SOL_SOCKET = _socket.SOL_SOCKET
_IPPROTO_TCP = _socket.IPPROTO_TCP
_IPPROTO_IPV6 = _socket.IPPROTO_IPV6
_IPV6_V6ONLY = _socket.IPV6_V6ONLY
_LINGER = struct.Struct("ii")
_TCP_WINDOW_CLAMP = getattr(_socket, "TCP_WINDOW_CLAMP", 10)
#: SOL_SOCKET SO_MAX_PACING_RATE (asm-generic/socket.h; Python's socket module lacks it).
SO_MAX_PACING_RATE = 47
_TCP_QUICKACK = getattr(_socket, "TCP_QUICKACK", 12)
#: Linux SOCK_MIN_RCVBUF (2048 + one sk_buff, x86-64): TCP_WINDOW_CLAMP's floor is half.
SOCK_MIN_RCVBUF = 2304
_UNSYNCED = (State.CLOSED, State.LISTEN, State.SYN_SENT)


def _window_clamp(sk: TcpSock) -> int:
    """getsockopt(TCP_WINDOW_CLAMP), Linux's ``tp->window_clamp``: what was set
    while the connection has no window yet; once it has one, the largest window
    it may offer (the clamp, the buffer, what the scale can express)."""
    if sk.state in _UNSYNCED:
        return sk.window_clamp
    limit = min(sk.rcvbuf, 65535 << sk.rcv_wscale)
    clamp = sk.window_clamp
    return clamp if clamp and clamp < limit else limit


class Shard:
    """A sans-I/O TCP host, IPv4 and IPv6; see docs/architecture.md "core (the engine)"."""

    def __init__(self, config: ShardConfig, now: float = 0.0) -> None:
        if not config.addrs and not config.addrs6:
            raise ValueError("ShardConfig.addrs or addrs6 must name at least one address")
        for a in config.addrs:
            if not 0 < a <= V4_ADDR_MAX:
                raise ValueError(f"not an IPv4 address in ShardConfig.addrs: {a!r}")
        for a in config.addrs6:
            if not tcp_ipv6.ipv6_addr_usable(a) or a >> 128:
                raise ValueError(f"not a usable IPv6 address in ShardConfig.addrs6: {a!r}")
        self.cfg = config
        # Both families in one set: their int ranges never overlap (tcp_h.V4_ADDR_MAX).
        self.addr_set = frozenset(config.addrs) | frozenset(config.addrs6)
        self.secret = config.secret
        self.key = hashlib.blake2s(b"shardstack-isn" + config.secret).digest()
        self.adv_mss = config.mtu - 40  # IPv4 + TCP headers without options
        self.adv_mss6 = config.mtu - TCP_V6_HDRS  # IPv6 + TCP headers (RFC 8200 §8.3)
        self.h: InetHashinfo[TcpSock] = InetHashinfo()
        self.timers = tcp_timer.TimerHeap()
        self.frames: list[bytes] = []
        #: (index in ``frames``, segment payload size) of each super-segment queued.
        self.gso_marks: list[tuple[int, int]] = []
        self.events: list[Event] = []
        self.stats = ShardStats()
        self.socks: dict[int, TcpSock] = {}
        self.udp = udp.UdpTable()  # UDP sockets (core/udp.py)
        self.tracing = config.trace
        self._trace: list[str] = []
        if self.tracing:
            self.h.trace = self._trace
        self.now = now
        self.connects = 0
        self._next_sd = 3
        self._cc_factory = tcp_cong.get(config.congestion)
        #: core.fault's log rate limit: when a fault was last logged, and how many since not.
        self.fault_logged = -1.0
        self.faults_unlogged = 0
        #: tcp_memory_allocated's cache: the total and when it was summed.
        self.mem_allocated = 0
        self.mem_sampled = -1.0
        self.mem_pressure = False
        #: core.icmp's error token bucket (ICMP_ERR_RATE per second).
        self.icmp_bucket = icmp.TokenBucket(icmp.ICMP_ERR_RATE, icmp.ICMP_ERR_BURST,
                                            icmp.ICMP_ERR_BURST, now)
        #: core.icmpv6's bucket for the errors we send (Parameter Problem).
        self.icmp6_out_bucket = icmp.TokenBucket(icmpv6.ICMPV6_OUT_RATE,
                                                 icmpv6.ICMPV6_OUT_BURST,
                                                 icmpv6.ICMPV6_OUT_BURST, now)

    # -- plumbing used by the engine modules -------------------------------------------

    def tr(self, name: str) -> None:
        if self.tracing:
            self._trace.append(name)

    def new_sock(self) -> TcpSock:
        sd = self._next_sd
        self._next_sd = sd + 1
        rcvbuf, locked = tcp_rcvbuf.initial_rcvbuf(self.cfg.rcvbuf, self.cfg.tcp_rmem)
        sk = TcpSock(sd, rcvbuf=rcvbuf, rcvbuf_locked=locked, sndbuf=self.cfg.sndbuf,
                     adv_mss=self.adv_mss)
        self.socks[sd] = sk
        return sk

    def new_cc(self, sk: TcpSock) -> tcp_cong.CongestionControl:
        factory = tcp_cong.get(sk.cc_name) if sk.cc_name else self._cc_factory
        return factory()

    def _sk(self, sd: int) -> TcpSock:
        sk = self.socks.get(sd)
        if sk is None or sk.orphan:
            raise os_error(errno.EBADF)
        return sk

    # -- packets and time ----------------------------------------------------------------

    def receive(self, packet: BytesLike, now: float, csum_ok: bool | None = None) -> None:
        """One inbound IPv4 or IPv6 packet (by its version nibble); never raises.
        ``csum_ok`` overrides ``cfg.csum_offload``.

        A failure while handling it ends only its connection (``core.fault``).
        """
        self.now = now
        try:
            tcp_ipv4.tcp_v4_rcv(self, packet, now,
                                self.cfg.csum_offload if csum_ok is None else csum_ok)
        except Exception as exc:  # the boundary (core.fault): counted, reset, logged
            fault.tcp_rcv_failed(self, packet, exc, now)

    def receive_batch(self, packets: Iterable[BytesLike], now: float,
                      csum_ok: bool | None = None) -> None:
        self.now = now
        ok = self.cfg.csum_offload if csum_ok is None else csum_ok
        rcv = tcp_ipv4.tcp_v4_rcv
        for packet in packets:
            try:
                rcv(self, packet, now, ok)
            except Exception as exc:  # the boundary (core.fault): counted, reset, logged
                fault.tcp_rcv_failed(self, packet, exc, now)

    def advance(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        self.now = now
        pop = self.timers.pop_due
        while True:
            due = pop(now)
            if due is None:
                return
            kind, sk = due
            try:
                tcp_timer.tcp_timer_handler(self, kind, sk, now)
            except Exception as exc:  # the boundary (core.fault): counted, reset, logged
                fault.tcp_timer_failed(self, kind, sk, exc, now)

    def take_frames(self) -> list[bytes]:
        frames = self.frames
        self.frames = []
        if self.gso_marks:
            self.gso_marks = []
        return frames

    def take_frames_gso(self) -> list[tuple[bytes, int]]:
        """Like :meth:`take_frames`, with each packet's GSO segment size.

        ``(packet, 0)``: send as is.  ``(packet, gso_size)``: a TSO
        super-segment (``ShardConfig.tso_max``) whose TCP payload the device
        must cut into ``gso_size``-byte segments (the last may be shorter);
        ``gso_size`` is the connection's MSS for that segment, options
        included (virtio_net_hdr ``gso_size``, Linux ``tcp_current_mss``).
        With ``ShardConfig.tso_max`` the pair's ``gso_size`` is non-zero
        exactly when the packet is a super-segment; with ``tx_csum_offload``
        also, exactly those packets hold only the pseudo-header sum and must
        go out with NEEDS_CSUM (``netio`` ``send_gso`` does); the others
        carry a complete checksum.
        """
        frames = self.frames
        self.frames = []
        out = [(f, 0) for f in frames]
        if self.gso_marks:
            for i, size in self.gso_marks:
                out[i] = (frames[i], size)
            self.gso_marks = []
        return out

    def take_events(self) -> list[Event]:
        events = self.events
        self.events = []
        return events

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def trace(self) -> list[str]:
        """The call-graph names recorded since the last call (``ShardConfig.trace``)."""
        out = list(self._trace)
        self._trace.clear()
        return out

    # -- the socket API --------------------------------------------------------------------

    def socket(self, family: int = AF_INET) -> int:
        """A TCP socket of ``family`` (AF_INET or AF_INET6; else EAFNOSUPPORT).

        An AF_INET6 socket takes and returns IPv6 addresses (128-bit ints);
        its IPv4 peers (a dual-stack listener's, or a connect() to
        ``::ffff:a.b.c.d``) appear v4-mapped, as on Linux.
        """
        if family != AF_INET and family != AF_INET6:
            raise os_error(errno.EAFNOSUPPORT)
        sk = self.new_sock()
        sk.family = family
        return sk.sd

    def _api_addr(self, sk: TcpSock, addr: int) -> int:
        """A wire address as the socket's family shows it: an AF_INET6 socket
        sees IPv4 addresses v4-mapped (RFC 4291 §2.5.5.2); 0 stays 0 (``::``)."""
        if sk.family == AF_INET6 and 0 < addr <= V4_ADDR_MAX:
            return 0xFFFF00000000 | addr
        return addr

    def _wire_addr(self, sk: TcpSock, addr: int) -> int:
        """An address given to bind()/connect() in the wire's terms: for an
        AF_INET6 socket a v4-mapped one becomes IPv4 (EINVAL with V6ONLY at
        bind, ENETUNREACH at connect, as Linux); for AF_INET an IPv6 one is
        EAFNOSUPPORT."""
        if sk.family == AF_INET6:
            if addr >> 32 == 0xFFFF and not addr >> 48:
                return addr & 0xFFFFFFFF
            return addr
        if not 0 <= addr <= V4_ADDR_MAX:
            raise os_error(errno.EAFNOSUPPORT)
        return addr

    def setsockopt(self, sd: int, level: int, opt: int, value: SockOptValue) -> None:
        sk = self._sk(sd)
        if level == _SOL_SOCKET:
            if opt == _socket.SO_REUSEADDR:
                sk.reuseaddr = bool(_int(value))
            elif opt == _socket.SO_REUSEPORT:
                sk.reuseport = bool(_int(value))
            elif opt == _socket.SO_OOBINLINE:
                sk.oobinline = bool(_int(value))
            elif opt == _socket.SO_KEEPALIVE:
                on = bool(_int(value))
                if on and not sk.keepalive and sk.state is State.ESTABLISHED:
                    self.timers.arm(sk, TimerKind.KEEPALIVE, self.now + sk.keepidle)
                sk.keepalive = on
            elif opt == _socket.SO_LINGER:
                if isinstance(value, bytes | bytearray):
                    onoff, secs = _LINGER.unpack(value)
                elif isinstance(value, tuple):
                    onoff, secs = value
                else:
                    raise os_error(errno.EINVAL)  # not a struct linger
                sk.linger = (bool(onoff), int(secs))
            elif opt == _socket.SO_RCVBUF:
                sk.rcvbuf = max(_int(value), 2048)
                sk.rcvbuf_locked = True  # Linux SOCK_RCVBUF_LOCK: no auto-tuning
            elif opt == _socket.SO_SNDBUF:
                sk.sndbuf = max(_int(value), 4608)
            elif opt == SO_MAX_PACING_RATE:
                tcp_pacing.tcp_set_max_pacing_rate(sk, _pacing_rate_value(value))
            else:
                raise os_error(errno.ENOPROTOOPT)
        elif level == _IPPROTO_TCP:
            if opt == _socket.TCP_NODELAY:
                sk.nodelay = bool(_int(value))
                if sk.nodelay and sk.sndq_len and sk.state in (State.ESTABLISHED,
                                                               State.CLOSE_WAIT):
                    tcp_output.tcp_write_xmit(self, sk, self.now)
            elif opt == _socket.TCP_CORK:
                # Linux __tcp_sock_set_cork: uncorking pushes what waits (Nagle
                # still applies unless TCP_NODELAY).
                sk.cork = bool(_int(value))
                if not sk.cork and sk.sndq_len and sk.state in (State.ESTABLISHED,
                                                                State.CLOSE_WAIT):
                    tcp_output.tcp_write_xmit(self, sk, self.now)
            elif opt == _socket.TCP_MAXSEG:
                v = _int(value)
                if not 88 <= v <= 32767:
                    raise os_error(errno.EINVAL)
                sk.user_mss = v
            elif opt == _socket.TCP_KEEPIDLE:
                sk.keepidle = float(_in_range(value, MAX_TCP_KEEPIDLE))
                if sk.keepalive and sk.state not in (State.CLOSED, State.LISTEN):
                    # Linux tcp_sock_set_keepidle: the running timer follows the new idle time.
                    self.timers.arm(sk, TimerKind.KEEPALIVE,
                                    max(self.now, sk.rcv_tstamp + sk.keepidle))
            elif opt == _socket.TCP_KEEPINTVL:
                sk.keepintvl = float(_in_range(value, MAX_TCP_KEEPINTVL))
            elif opt == _socket.TCP_KEEPCNT:
                sk.keepcnt = _in_range(value, MAX_TCP_KEEPCNT)
            elif opt == _socket.TCP_CONGESTION:
                name = value.decode() if isinstance(value, bytes | bytearray) else str(value)
                tcp_cong.get(name.rstrip("\0"))  # ENOENT for an unknown one
                sk.cc_name = name.rstrip("\0")
            elif opt == _socket.TCP_USER_TIMEOUT:
                v = _int(value)  # RFC 5482, in ms as Linux; 0: back to tcp_retries2
                if v < 0:
                    raise os_error(errno.EINVAL)
                sk.user_timeout = v
            elif opt == _socket.TCP_SYNCNT:
                v = _int(value)
                if not 1 <= v <= MAX_TCP_SYNCNT:
                    raise os_error(errno.EINVAL)
                sk.syn_count = v
            elif opt == _socket.TCP_LINGER2:
                v = _int(value)  # s; < 0: no FIN-WAIT-2 wait; clamped as Linux
                sk.linger2 = -1.0 if v < 0 else float(min(v, int(TCP_FIN_TIMEOUT_MAX)))
            elif opt == _TCP_QUICKACK:
                # Linux TCP_QUICKACK: 1 leaves pingpong mode and sends an owed ACK
                # now; 0 enters it (tcp_delack).
                if _int(value) & 1:
                    sk.pingpong = 0
                    if sk.unacked_rcv and sk.state not in (State.CLOSED, State.LISTEN,
                                                           State.SYN_SENT, State.TIME_WAIT):
                        tcp_output.tcp_send_ack(self, sk, self.now)
                else:
                    tcp_delack.enter_pingpong_mode(sk)
            elif opt == _TCP_WINDOW_CLAMP:
                # Linux tcp_set_window_clamp: 0 removes the clamp, only on a closed
                # socket; anything below SOCK_MIN_RCVBUF / 2 is raised to it.  The
                # next window offered obeys it (tcp_output.tcp_select_window).
                v = _int(value)
                if v == 0:
                    if sk.state is not State.CLOSED:
                        raise os_error(errno.EINVAL)
                    sk.window_clamp = 0
                else:
                    sk.window_clamp = v if v > SOCK_MIN_RCVBUF // 2 else SOCK_MIN_RCVBUF // 2
            else:
                raise os_error(errno.ENOPROTOOPT)
        elif level == _IPPROTO_IPV6 and sk.family == AF_INET6:
            if opt != _IPV6_V6ONLY:
                raise os_error(errno.ENOPROTOOPT)
            if sk.bound:
                raise os_error(errno.EINVAL)  # Linux: not once a port is bound
            sk.v6only = bool(_int(value))
        else:
            raise os_error(errno.ENOPROTOOPT)

    def getsockopt(self, sd: int, level: int, opt: int) -> int | bytes:
        sk = self._sk(sd)
        if level == _SOL_SOCKET:
            if opt == _socket.SO_ERROR:
                err, sk.err = sk.err, 0
                return err
            table: dict[int, int | bytes] = {_socket.SO_REUSEADDR: int(sk.reuseaddr),
                     _socket.SO_REUSEPORT: int(sk.reuseport),
                     _socket.SO_KEEPALIVE: int(sk.keepalive),
                     _socket.SO_OOBINLINE: int(sk.oobinline),
                     _socket.SO_RCVBUF: sk.rcvbuf, _socket.SO_SNDBUF: sk.sndbuf,
                     _socket.SO_TYPE: _socket.SOCK_STREAM,
                     _socket.SO_ACCEPTCONN: int(sk.state is State.LISTEN)}
            if opt == _socket.SO_LINGER:
                lg = sk.linger or (False, 0)
                return _LINGER.pack(int(lg[0]), lg[1])
            if opt == SO_MAX_PACING_RATE:
                # An int reads at most ~0U, as Linux answers a 4-byte buffer.
                return min(sk.max_pacing_rate, 0xFFFFFFFF)
        elif level == _IPPROTO_TCP:
            table = {_socket.TCP_NODELAY: int(sk.nodelay),
                     _socket.TCP_CORK: int(sk.cork),
                     _socket.TCP_MAXSEG: sk.mss_cache if sk.state is not State.CLOSED
                     else (sk.user_mss or 536),
                     _socket.TCP_KEEPIDLE: int(sk.keepidle),
                     _socket.TCP_KEEPINTVL: int(sk.keepintvl),
                     _socket.TCP_KEEPCNT: sk.keepcnt,
                     _socket.TCP_CONGESTION: (sk.cc_name or self.cfg.congestion).encode(),
                     _socket.TCP_USER_TIMEOUT: sk.user_timeout,
                     _socket.TCP_SYNCNT: sk.syn_count or TCP_SYN_RETRIES,
                     _socket.TCP_LINGER2: -1 if sk.linger2 < 0 else int(sk.linger2 or TCP_FIN_TIMEOUT),
                     _TCP_WINDOW_CLAMP: _window_clamp(sk),
                     _TCP_QUICKACK: int(not tcp_delack.in_pingpong_mode(sk))}
        elif level == _IPPROTO_IPV6 and sk.family == AF_INET6:
            table = {_IPV6_V6ONLY: int(sk.v6only)}
        else:
            raise os_error(errno.ENOPROTOOPT)
        if opt not in table:
            raise os_error(errno.ENOPROTOOPT)
        return table[opt]

    def bind(self, sd: int, addr: int, port: int) -> None:
        """bind(2): EINVAL if already bound, EADDRNOTAVAIL for a foreign address, EADDRINUSE."""
        sk = self._sk(sd)
        self.tr("inet_bind")
        if sk.bound or sk.state is not State.CLOSED:
            raise os_error(errno.EINVAL)
        wire = self._wire_addr(sk, addr)
        if wire != addr and sk.v6only:
            raise os_error(errno.EINVAL)  # a v4-mapped address on an IPv6-only socket
        addr = wire
        if addr != 0 and addr not in self.addr_set:
            raise os_error(errno.EADDRNOTAVAIL)
        if not 0 <= port < 65536:
            raise os_error(errno.EINVAL)
        sk.laddr = addr
        lo, hi = self.cfg.ephemeral_range
        inet_connection_sock.inet_csk_get_port(self.h, sk, port, lo, hi, self._port_offset())

    def _port_offset(self) -> int:
        self.connects += 1
        h = hashlib.blake2s(self.connects.to_bytes(8, "big"), key=self.key, digest_size=4)
        return int.from_bytes(h.digest(), "big")

    def listen(self, sd: int, backlog: int) -> None:
        sk = self._sk(sd)
        self.tr("inet_listen")
        if sk.state is State.LISTEN:
            sk.backlog = min(max(backlog, 0), 4096)  # Linux lets listen() resize the backlog
            return
        if sk.state is not State.CLOSED or sk.dead:
            raise os_error(errno.EINVAL)
        if not sk.bound:
            lo, hi = self.cfg.ephemeral_range
            inet_connection_sock.inet_csk_get_port(self.h, sk, 0, lo, hi, self._port_offset())
        inet_connection_sock.inet_csk_listen_start(self, sk, backlog)

    def accept(self, sd: int) -> tuple[int, tuple[int, int]] | None:
        sk = self._sk(sd)
        child = inet_connection_sock.inet_csk_accept(sk)
        if child is None:
            return None
        child.parent = None
        if child.rcvq_len or child.fin_rcvd:
            tcp.emit_readable(self, child)
        if child.err:
            self.events.append(SocketError(child.sd, child.err))
        return child.sd, (self._api_addr(child, child.raddr), child.rport)

    def connect(self, sd: int, addr: int, port: int, now: float) -> None:
        """connect(2): IPv4 or IPv6 by the address in the socket's terms (an
        AF_INET6 socket reaches an IPv4 peer through ``::ffff:a.b.c.d``)."""
        self.now = now
        sk = self._sk(sd)
        wire = self._wire_addr(sk, addr)
        if sk.family == AF_INET6 and wire == addr:
            # Not v4-mapped: IPv6 (::/96 and :: are refused there, not sent as IPv4).
            tcp_ipv6.tcp_v6_connect(self, sk, wire, port, now)
            return
        if sk.family == AF_INET6:
            # Linux tcp_v6_connect: v4-mapped goes to tcp_v4_connect, not on
            # an IPv6-only socket nor one bound to an IPv6 address.
            if sk.v6only or sk.laddr > V4_ADDR_MAX:
                raise os_error(errno.ENETUNREACH)
        if not self.cfg.addrs and sk.laddr == 0 and sk.state is State.CLOSED and not sk.dead:
            raise os_error(errno.ENETUNREACH)  # no IPv4 address: no route
        tcp_ipv4.tcp_v4_connect(self, sk, wire, port, now)

    def send(self, sd: int, data: BytesLike, now: float, flags: int = 0) -> int:
        """send(2); ``flags`` may hold MSG_OOB: the last byte sent is urgent."""
        self.now = now
        return tcp.tcp_sendmsg(self, self._sk(sd), data, now, flags & _MSG_OOB != 0)

    def recv(self, sd: int, maxlen: int, flags: int = 0) -> bytes | None:
        """recv(2): None when it would block; ``flags`` may hold MSG_OOB (the urgent byte)."""
        if flags & _MSG_OOB:
            return tcp.tcp_recv_urg(self, self._sk(sd), maxlen)
        return tcp.tcp_recvmsg(self, self._sk(sd), maxlen, self.now)

    def shutdown(self, sd: int, how: int, now: float) -> None:
        self.now = now
        tcp.tcp_shutdown(self, self._sk(sd), how, now)

    def close(self, sd: int, now: float) -> None:
        self.now = now
        tcp.tcp_close(self, self._sk(sd), now)

    def getsockname(self, sd: int) -> tuple[int, int]:
        sk = self._sk(sd)
        return self._api_addr(sk, sk.laddr), sk.lport

    def getpeername(self, sd: int) -> tuple[int, int]:
        sk = self._sk(sd)
        if sk.state in (State.CLOSED, State.LISTEN, State.SYN_SENT):
            raise os_error(errno.ENOTCONN)
        return self._api_addr(sk, sk.raddr), sk.rport

    def state(self, sd: int) -> State:
        """The RFC state of a descriptor (tests, ``ss``)."""
        sk = self.socks.get(sd)
        if sk is None:
            raise os_error(errno.EBADF)
        return sk.state

    def sock(self, sd: int) -> TcpSock:
        """The control block behind ``sd`` (read-only use: tests and diagnostics)."""
        sk = self.socks.get(sd)
        if sk is None:
            raise os_error(errno.EBADF)
        return sk

    # -- moving connections to another shard (core/tcp_migrate.py) -------------------------

    def migrate_out(self, match: Callable[[int, int, int, int], bool]) -> list[dict]:
        """Remove every connection whose (laddr, lport, raddr, rport) ``match``es and
        return its state (msgpack-serialisable), in the order ``migrate_in`` replays."""
        return tcp_migrate.migrate_out(self, match)

    def migrate_in(self, states: list[dict], now: float) -> list[tuple[int, int]]:
        """Install states from another shard's ``migrate_out``; (old sd, new sd) each."""
        return tcp_migrate.migrate_in(self, states, now)

    def _every_sock(self) -> list[TcpSock | RequestSock]:
        """Listeners, reuseport members and the ehash (request socks and TIME-WAIT
        included), each once."""
        seen: set[int] = set()
        out: list[TcpSock | RequestSock] = []
        socks: list[TcpSock | RequestSock] = list(self.h.listening.values())
        for group in self.h.reuseport.values():
            socks += group
        socks += self.h.ehash.values()
        for sk in socks:
            if id(sk) not in seen:
                seen.add(id(sk))
                out.append(sk)
        return out

    def state_counts(self) -> dict[str, int]:
        """Connections by state, as `connections()` would count them, without its
        per-connection tcp_info: a worker answers this every half second under
        `--rebalance auto` and every metrics scrape, with tens of thousands of
        TIME-WAIT sockets after a burst of short connections."""
        return dict(Counter(str(sk.state) for sk in self._every_sock()))

    def connections(self) -> list[ConnInfo]:
        rows = []
        for sk in self._every_sock():
            if isinstance(sk, TcpSock):
                info: dict[str, int | str] = {}
                if sk.state is not State.LISTEN:
                    info.update(tcp_info.unpack_tcp_info(tcp_info.tcp_get_info(sk, self.now)))
                    info["cc"] = sk.cc.name if sk.cc else (sk.cc_name or self.cfg.congestion)
                rows.append(ConnInfo(None if sk.closed_evt else sk.sd, str(sk.state),
                                     self._api_addr(sk, sk.laddr), sk.lport,
                                     self._api_addr(sk, sk.raddr), sk.rport, sk.sndq_len,
                                     sk.rcvq_len, sk.cc.cwnd if sk.cc else 0, sk.srtt, sk.rto,
                                     info))
            else:
                lsk = sk.listener
                rows.append(ConnInfo(None, str(sk.state), self._api_addr(lsk, sk.laddr), sk.lport,
                                     self._api_addr(lsk, sk.raddr), sk.rport, 0, 0, 0, 0.0, 1.0))
        return rows


def _int(value: SockOptValue) -> int:
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value[:4], "little", signed=True)
    if isinstance(value, tuple):
        raise os_error(errno.EINVAL)  # a struct where an int is due
    return int(value)


def _in_range(value: SockOptValue, top: int) -> int:
    """1..top, else EINVAL (do_tcp_setsockopt's keepalive bounds)."""
    v = _int(value)
    if not 1 <= v <= top:
        raise os_error(errno.EINVAL)
    return v




def _pacing_rate_value(value: SockOptValue) -> int:
    """SO_MAX_PACING_RATE's argument as Linux reads it (``sk_setsockopt``): a
    4-byte unsigned int, ~0U meaning ~0UL (no limit), or an 8-byte unsigned
    long."""
    if isinstance(value, bytes | bytearray) and len(value) >= 8:
        return int.from_bytes(value[:8], sys.byteorder)
    v = _int(value)
    if isinstance(value, bytes | bytearray):
        v = int.from_bytes(value[:4], sys.byteorder)
    if v < 0:
        v &= 0xFFFFFFFF  # a C int carries the unsigned value
    return tcp_pacing.NO_PACING_RATE if v == 0xFFFFFFFF else v
