"""TCP_INFO from the engine (core.tcp_info, Linux ``tcp_get_info``): layout and contents.

The layout is checked against offsets published for Linux's UAPI ``struct
tcp_info`` (include/uapi/linux/tcp.h), not against our own table; the shim's
tests also decode a real kernel socket's TCP_INFO with it.
"""

from __future__ import annotations

import struct

from core_helpers import A, B, Pair, Peer, listen, make_shard, passive_open
from shardstack.core.tcp_cong import INFINITE_SSTHRESH
from shardstack.core.tcp_info import (
    TCP_INFO_LEN,
    TCPI_FIELDS,
    TCPI_OPT_SACK,
    TCPI_OPT_TIMESTAMPS,
    TCPI_OPT_WSCALE,
    tcp_get_info,
    tcp_listen_info,
    unpack_tcp_info,
)

NO_RATE = (1 << 64) - 1


def info(shard, sd: int, now: float) -> dict[str, int]:
    raw = tcp_get_info(shard.sock(sd), now)
    assert len(raw) == TCP_INFO_LEN
    return unpack_tcp_info(raw)


def test_layout_is_linux_uapi():
    offsets, off = {}, 0
    for name, code in TCPI_FIELDS:
        offsets[name] = off
        off += struct.calcsize("=" + code)
    # Offsets of struct tcp_info as Linux has had them since the fields
    # appeared (each appended, never moved); 280 bytes in 6.18 (AccECN).
    expected = {"rto": 8, "ato": 12, "snd_mss": 16, "unacked": 24, "last_data_sent": 44,
                "pmtu": 60, "rtt": 68, "rttvar": 72, "snd_ssthresh": 76, "snd_cwnd": 80,
                "rcv_rtt": 92, "rcv_space": 96, "total_retrans": 100, "pacing_rate": 104,
                "bytes_acked": 120, "bytes_received": 128, "segs_out": 136, "min_rtt": 148,
                "delivery_rate": 160, "delivered": 192, "bytes_sent": 200,
                "bytes_retrans": 208, "reord_seen": 220, "rcv_ooopack": 224, "snd_wnd": 228,
                "rcv_wnd": 232, "rehash": 236, "total_rto": 240, "total_rto_time": 244,
                "received_ce": 248}
    assert {k: offsets[k] for k in expected} == expected
    assert off == TCP_INFO_LEN == 280


def test_established_both_ends():
    p = Pair()
    _lsd, c, s = p.connect()
    ci, si = info(p.a, c, p.now), info(p.b, s, p.now)
    for i in (ci, si):
        assert i["state"] == 1  # TCP_ESTABLISHED
        assert i["ca_state"] == 0
        assert i["options"] == TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
        assert i["snd_mss"] == 1460 - 12  # the peer's MSS less the timestamp option
        assert i["advmss"] == 1460 and i["pmtu"] == 1500
        assert i["snd_cwnd"] == 10 and i["snd_ssthresh"] == INFINITE_SSTHRESH
        assert i["unacked"] == i["sacked"] == i["lost"] == i["retrans"] == 0
        assert i["rto"] == 200_000  # µs: RTO_MIN after a (zero) RTT sample
        assert i["ato"] == 0  # no data received yet
        assert i["reordering"] == 3
        assert i["max_pacing_rate"] == NO_RATE
    # Each end's send scale is the other's receive scale.
    assert ci["snd_wscale"] == si["rcv_wscale"] == p.b.sock(s).rcv_wscale
    assert ci["rcv_wscale"] == si["snd_wscale"] == p.a.sock(c).rcv_wscale
    assert ci["snd_wnd"] == si["rcv_wnd"] > 0
    assert ci["bytes_acked"] == 1  # SND.UNA moved past the SYN
    assert ci["bytes_received"] == si["bytes_received"] == 0


def test_data_counters_and_idle_times():
    p = Pair()
    _lsd, c, s = p.connect()
    n = 10_000
    assert p.a.send(c, b"x" * n, p.now) == n
    p.deliver()
    ci = info(p.a, c, p.now + 1.5)
    assert ci["bytes_acked"] == 1 + n and ci["bytes_sent"] == n
    assert ci["unacked"] == 0 and ci["notsent_bytes"] == 0
    assert ci["last_data_sent"] == 1500 and ci["last_ack_recv"] == 1500
    si = info(p.b, s, p.now)
    assert si["bytes_received"] == n
    assert si["ato"] == 40_000  # delayed ACKs are on once data arrived
    assert p.b.recv(s, n) == b"x" * n


def test_in_flight_and_not_sent_then_rto():
    p = Pair()
    _lsd, c, s = p.connect()
    p.drop = lambda direction, seg: direction == "ab"  # nothing reaches the server
    n = 100_000
    p.a.send(c, b"y" * n, p.now)
    p.deliver()
    ci = info(p.a, c, p.now)
    sk = p.a.sock(c)
    flight = sk.snd_max - sk.snd_una
    assert ci["unacked"] == 10 == -(-flight // ci["snd_mss"])  # the initial window
    assert ci["notsent_bytes"] == n - flight
    assert ci["retransmits"] == ci["backoff"] == ci["total_rto"] == 0
    p.advance(p.now + 0.25)  # past the 200 ms RTO
    ci = info(p.a, c, p.now)
    assert ci["ca_state"] == 4  # TCP_CA_Loss
    assert ci["retransmits"] == ci["backoff"] == ci["total_rto"] == 1
    assert ci["rto"] == 400_000  # backed off, as the timer now runs
    assert ci["snd_cwnd"] == 1 and ci["total_retrans"] >= 1
    assert ci["lost"] == ci["unacked"] == 10  # everything outstanding deemed lost
    assert ci["retrans"] >= 1


def test_fast_recovery_scoreboard():
    p = Pair()
    _lsd, c, _s = p.connect()
    first: list[int] = []

    def drop(direction, seg):
        if direction == "ab" and seg.payload:
            if not first:
                first.append(seg.seq)
            return seg.seq == first[0]  # the first segment never arrives
        return False

    p.drop = drop
    p.a.send(c, b"z" * 20 * 1448, p.now)
    p.deliver()
    ci = info(p.a, c, p.now)
    assert ci["ca_state"] == 3  # TCP_CA_Recovery
    assert ci["unacked"] == 20 and ci["sacked"] == 19  # all but the hole SACKed
    assert ci["lost"] == 1 and ci["retrans"] == 1
    assert ci["snd_ssthresh"] < INFINITE_SSTHRESH
    assert ci["bytes_acked"] == 1
    p.drop = None
    p.advance(p.now + 2.0)
    ci = info(p.a, c, p.now)
    assert ci["ca_state"] == 0 and ci["unacked"] == ci["sacked"] == ci["lost"] == 0
    assert ci["bytes_acked"] == 1 + 20 * 1448


def test_fin_states_and_counts():
    p = Pair()
    _lsd, c, s = p.connect()
    p.drop = lambda direction, seg: direction == "ab"
    p.a.shutdown(c, 1, p.now)  # SHUT_WR: FIN
    p.deliver()
    ci = info(p.a, c, p.now)
    assert ci["state"] == 4 and ci["unacked"] == 1  # FIN_WAIT1, the FIN in flight
    p.drop = None
    p.advance(p.now + 1.0)  # the FIN's retransmission gets through
    ci, si = info(p.a, c, p.now), info(p.b, s, p.now)
    assert ci["state"] == 5 and ci["unacked"] == 0  # FIN_WAIT2
    assert ci["bytes_acked"] == 2  # SYN + FIN, as Linux counts SND.UNA
    assert si["state"] == 8 and si["bytes_received"] == 1  # CLOSE_WAIT, the FIN
    p.b.close(s, p.now)
    ci = info(p.b, s, p.now)
    assert ci["state"] == 9  # LAST_ACK (until the client's ACK is delivered)


def test_syn_sent_and_its_retransmission():
    p = Pair()
    p.drop = lambda direction, seg: True
    c = p.a.socket()
    p.a.connect(c, B, 80, p.now)
    p.deliver()
    ci = info(p.a, c, p.now)
    assert ci["state"] == 2 and ci["unacked"] == 1  # SYN_SENT, the SYN
    assert ci["bytes_acked"] == 0 and ci["pmtu"] == 1500
    p.advance(p.now + 1.0)
    ci = info(p.a, c, p.now)
    # Linux 6.18's linear SYN timeouts: the first retransmissions do not back off
    assert ci["retransmits"] == ci["total_rto"] == 1 and ci["backoff"] == 0
    assert ci["rto"] == 1_000_000


def test_listener_reports_its_accept_queue():
    p = Pair()
    lsd = p.b.socket()
    p.b.bind(lsd, 0, 80)
    p.b.listen(lsd, 4)
    for _ in range(2):
        c = p.a.socket()
        p.a.connect(c, B, 80, p.now)
    p.deliver()
    li = info(p.b, lsd, p.now)
    assert li["state"] == 10 and li["unacked"] == 2 and li["sacked"] == 4
    assert li["snd_cwnd"] == 10 and li["reordering"] == 3
    assert li["pacing_rate"] == li["max_pacing_rate"] == NO_RATE
    # Nothing else is reported for a listener, as on Linux.
    assert li["rto"] == li["snd_mss"] == li["advmss"] == li["bytes_acked"] == 0
    assert tcp_get_info(p.b.sock(lsd), p.now) == tcp_listen_info(2, 4)
    assert p.b.accept(lsd) is not None
    assert info(p.b, lsd, p.now)["unacked"] == 1


def test_unpack_pads_a_truncated_buffer():
    raw = tcp_listen_info(3, 7)
    short = unpack_tcp_info(raw[:32])  # up to tcpi_sacked (offset 28)
    assert short["state"] == 10 and short["unacked"] == 3 and short["sacked"] == 7
    assert short["snd_cwnd"] == 0  # not in the buffer


# -- per-socket counters (Linux counts them in tcp_v4_rcv, __tcp_transmit_skb,
# tcp_clean_rtx_queue/tcp_sacktag_one, tcp_data_queue_ofo, tcp_check_dsack,
# tcp_check_sack_reordering and tcp_retransmit_skb) ---------------------------------------

MSS = 1460 - 12


def test_segment_counters_match_the_wire():
    p = Pair()
    _lsd, c, s = p.connect()
    n = 10_000  # 7 segments: 6 full and one of 1312 bytes
    assert p.a.send(c, bytes(n), p.now) == n
    p.deliver()
    ab = [seg for _t, d, seg in p.tap if d == "ab"]
    ba = [seg for _t, d, seg in p.tap if d == "ba"]
    ci, si = info(p.a, c, p.now), info(p.b, s, p.now)
    # The client's socket sent and received every frame of the connection.
    assert ci["segs_out"] == len(ab) and ci["segs_in"] == len(ba)
    assert ci["data_segs_out"] == sum(1 for x in ab if x.payload) == 7
    assert ci["data_segs_in"] == 0
    # The server's socket began as a request sock: its SYN-ACK is not its own,
    # and neither is the handshake's final ACK; the SYN counts (Linux: segs_in = 1).
    assert si["segs_out"] == len(ba) - 1
    assert si["segs_in"] == 1 + len(ab) - 2
    assert si["data_segs_in"] == 7 and si["data_segs_out"] == 0
    # Delivered: the client's SYN and its 7 data segments; the server's SYN-ACK.
    assert ci["delivered"] == 1 + 7 and si["delivered"] == 1
    assert ci["bytes_retrans"] == 0 and ci["bytes_sent"] == n
    assert ci["rcv_ooopack"] == si["rcv_ooopack"] == 0


def test_retransmission_and_out_of_order_counters():
    p = Pair()
    _lsd, c, s = p.connect()
    hole: list[int] = []
    seen: list[tuple[int, bool]] = []  # (seq, dropped) of every data segment a sent

    def drop(direction, seg):
        if direction != "ab" or not seg.payload:
            return False
        if not hole:
            hole.append(seg.seq)
        lost = seg.seq == hole[0] and sum(1 for q, _ in seen if q == hole[0]) < 2
        seen.append((seg.seq, lost))
        return lost

    p.drop = drop  # the first segment and its first retransmission are lost
    p.a.send(c, bytes(20 * MSS), p.now)
    p.advance(p.now + 3.0)
    ci, si = info(p.a, c, p.now), info(p.b, s, p.now)
    assert p.b.recv(s, 1 << 20) == bytes(20 * MSS)
    assert ci["total_retrans"] >= 2
    assert ci["bytes_retrans"] == MSS * ci["total_retrans"]  # counted in bytes, not estimated
    assert ci["bytes_sent"] == 20 * MSS + ci["bytes_retrans"]
    assert ci["data_segs_out"] == 20 + ci["total_retrans"] == len(seen)
    # Out of order: what arrived while the hole was open.
    filled = next(i for i, (q, lost) in enumerate(seen) if q == hole[0] and not lost)
    assert si["rcv_ooopack"] == sum(1 for _q, lost in seen[:filled] if not lost) > 0
    # Each segment delivered once, whether SACKed first or ACKed: the SYN + 20.
    assert ci["delivered"] == 1 + 20


def _hop(src, dst, t: float, order=None) -> int:
    """Move src's frames to dst, arriving at time t (optionally reordered)."""
    frames = src.take_frames()
    dst.advance(t)
    for f in (frames if order is None else [frames[i] for i in order]):
        dst.receive(f, t)
    return len(frames)


def test_dsack_dups_and_reordering_events():
    """10 ms each way: the wire duplicates segment 0 and delivers segment 1 before it."""
    a, b = make_shard(A), make_shard(B)
    lsd = b.socket()
    b.bind(lsd, 0, 80)
    b.listen(lsd, 4)
    c = a.socket()
    a.connect(c, B, 80, 0.0)
    _hop(a, b, 0.01)
    _hop(b, a, 0.02)
    _hop(a, b, 0.03)
    assert b.accept(lsd) is not None
    a.send(c, bytes(4 * MSS), 0.02)
    assert _hop(a, b, 0.03, order=[1, 0, 0, 2, 3]) == 4
    _hop(b, a, 0.04)
    assert a.take_frames() == []  # nothing was retransmitted
    ci = info(a, c, 0.04)
    assert ci["dsack_dups"] == 1  # the D-SACK for the duplicate (RFC 2883)
    assert ci["reord_seen"] == 1  # segment 0 arrived after segment 1, never retransmitted
    assert ci["total_retrans"] == 0 and ci["delivered"] == 1 + 4
    assert ci["unacked"] == 0


def test_super_segments_count_as_the_segments_they_become():
    p = Pair(tso_max=65000)
    _lsd, c, s = p.connect()
    p.a.send(c, bytes(40 * MSS), p.now)
    frames = p.a.take_frames()
    assert max(len(f) for f in frames) > 10 * MSS  # super-segments left the engine
    for f in frames:  # a GRO receiver gets them whole
        p.b.receive(f, p.now, csum_ok=True)
    p.deliver()
    ci, si = info(p.a, c, p.now), info(p.b, s, p.now)
    assert ci["data_segs_out"] == 40 and si["data_segs_in"] == 40
    assert ci["delivered"] == 1 + 40


def test_rto_after_a_10ms_rtt_reads_210ms_exactly():
    # srtt 10 ms + max(4 * rttvar, RTO min 200 ms) = 210 ms, which binary floating
    # point holds a hair off (more so far from time 0): tcpi_rto must say 210000 us,
    # as Linux's whole-jiffy icsk_rto does (rto/rto-after-fast-rtt.pkt), not 209999.
    for t0 in (0.0, 1.0, 1000.0, 86400.0):
        sh = make_shard()
        peer = Peer(sh)
        peer.now = t0
        sh.advance(t0)
        sd, _ = passive_open(peer, listen(sh), ack_at=t0 + 0.01)
        assert info(sh, sd, peer.now)["rto"] == 210_000, t0


def test_state_counts_match_connections_without_tcp_info(monkeypatch):
    """Shard.state_counts (the workers' `load` census, polled every half
    second by --rebalance auto and by every metrics scrape) counts what
    `connections()` lists, listeners and TIME-WAIT included, without building
    a tcp_info per connection: after a burst of short connections tens of
    thousands of TIME-WAIT sockets made each poll a latency spike."""
    from collections import Counter

    from shardstack.core import tcp_info as ti

    p = Pair()
    _, c1, s1 = p.connect(80)
    c2 = p.a.socket()
    p.a.connect(c2, B, 80, p.now)
    p.deliver()
    p.a.close(c1, p.now)  # active close: a ends in TIME-WAIT
    p.deliver()
    p.b.close(s1, p.now)
    p.deliver()
    want_a = Counter(ci.state for ci in p.a.connections())
    want_b = Counter(ci.state for ci in p.b.connections())
    assert want_a["TIME-WAIT"] == 1 and want_a["ESTABLISHED"] == 1
    assert want_b["LISTEN"] == 1 and want_b["ESTABLISHED"] >= 1

    def no_info(*_a, **_k):
        raise AssertionError("state_counts built a tcp_info")

    monkeypatch.setattr(ti, "tcp_get_info", no_info)
    assert p.a.state_counts() == dict(want_a)
    assert p.b.state_counts() == dict(want_b)
