"""Hostile peers (issue 11): what one unauthenticated remote host can do to a shard.

Each test plays an attacker through the Shard API (a scripted Peer) and
asserts what Linux does in the same case: floors on the MSS
(``tcp_min_snd_mss``, CVE-2019-11479), RFC 9293's SYN-SENT ACK check,
SO_REUSEPORT groups, SYN cookies only after a recent overflow
(``tcp_synq_no_recent_overflow``), PAWS and the sequence check in TIME-WAIT,
SACK blocks that only cover whole segments (``tcp_match_skb_to_sack``),
memory charged per queued segment and not per payload byte (truesize,
CVE-2019-11477/11478's class), and a receive boundary where one frame's
failure is that connection's alone.
"""

from __future__ import annotations

import gc
import socket
import sys
import types

import pytest
from core_helpers import (
    ACK,
    FIN,
    RST,
    SECRET,
    SYN,
    A,
    B,
    Peer,
    listen,
    make_shard,
    passive_open,
    server_conn,
)
from shardstack.core import State, syncookies
from shardstack.core.wire.tcp import build_tcp_ipv4, build_tcp_options

MASK = 0xFFFFFFFF
#: Linux net.ipv4.tcp_min_snd_mss: the MSS (before options) is never below it.
TCP_MIN_SND_MSS = 48


def frame(src_port: int, seq: int, ack: int, flags: int = ACK, payload: bytes = b"",
          ts=None) -> bytes:
    opts = build_tcp_options(ts=ts) if ts else b""
    return build_tcp_ipv4(B, A, src_port, 80, seq & MASK, ack & MASK, flags, 65535, opts,
                          payload)


# -- the MSS floor on every path that sets it ---------------------------------------------

def test_syn_with_mss_12_and_timestamps_then_data_does_not_break_receive():
    """Issue 11: mss_cache became 0 and the next data segment raised ZeroDivisionError."""
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh)
    sd, sa = passive_open(peer, lsd, mss=12, ts=(100, 0))
    peer.send(ACK, 1001, sa.seq + 1, payload=b"x" * 100, ts=(101, sa.ts[0]))
    assert sh.recv(sd, 1000) == b"x" * 100


def test_batch_goes_on_after_a_frame_of_a_tiny_mss_connection():
    """One connection's frame may not take the rest of the batch with it."""
    sh = make_shard()
    lsd = listen(sh)
    bad = Peer(sh, port=40001)
    bsd, bsa = passive_open(bad, lsd, mss=12, ts=(100, 0))
    good = Peer(sh, port=40002)
    gsd, gsa = passive_open(good, lsd, mss=1460)
    sh.take_frames()
    sh.receive_batch([frame(40001, 1001, bsa.seq + 1, payload=b"b" * 100,
                            ts=(101, bsa.ts[0])),
                      frame(40002, 1001, gsa.seq + 1, payload=b"g" * 100)], 0.01)
    assert sh.recv(gsd, 1000) == b"g" * 100


@pytest.mark.parametrize("ts,payload_per_segment", [(None, TCP_MIN_SND_MSS),
                                                     ((100, 0), TCP_MIN_SND_MSS - 12)])
@pytest.mark.parametrize("peer_mss", [1, 12, 20])
def test_passive_open_clamps_peer_mss_to_tcp_min_snd_mss(peer_mss, ts, payload_per_segment):
    """Linux __tcp_mtu_to_mss: max(mss, tcp_min_snd_mss) before the options come off."""
    sh = make_shard()
    peer = Peer(sh)
    sd, sa = passive_open(peer, listen(sh), mss=peer_mss, ts=ts)
    sh.send(sd, b"y" * 500, 0.01)
    sizes = [len(s.payload) for s in peer.recv()]
    assert sizes and sizes[0] == payload_per_segment, sizes
    assert sh.getsockopt(sd, socket.IPPROTO_TCP, socket.TCP_MAXSEG) == payload_per_segment


@pytest.mark.parametrize("peer_mss", [1, 20])
def test_active_open_clamps_synack_mss_and_still_sends(peer_mss):
    """A SYN-ACK announcing MSS 1 with timestamps made mss_cache negative: send() then
    queued data that never left (the connection was wedged)."""
    sh = make_shard()
    peer = Peer(sh)
    c = sh.socket()
    sh.connect(c, B, 40000, 0.0)
    syn = peer.recv_one()
    peer.send(SYN | ACK, 5000, syn.seq + 1, dport=syn.sport, mss=peer_mss, ts=(5, syn.ts[0]))
    peer.recv()
    assert sh.state(c) is State.ESTABLISHED
    assert sh.send(c, b"z" * 100, 0.01) == 100
    sizes = [len(s.payload) for s in peer.recv()]
    assert sizes and sizes[0] == TCP_MIN_SND_MSS - 12, sizes


# -- SYN-SENT ------------------------------------------------------------------------------

def test_syn_sent_rejects_ack_of_iss():
    """RFC 9293 §3.10.7.3: SEG.ACK =< ISS is unacceptable: <SEQ=SEG.ACK><CTL=RST>."""
    sh = make_shard()
    peer = Peer(sh)
    c = sh.socket()
    sh.connect(c, B, 40000, 0.0)
    syn = peer.recv_one()
    peer.send(SYN | ACK, 5000, syn.seq, dport=syn.sport)
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == syn.seq
    assert sh.state(c) is State.SYN_SENT


# -- SO_REUSEPORT ----------------------------------------------------------------------------

def test_reuseport_second_listener_does_not_replace_the_first():
    """Closing one listener of a SO_REUSEPORT group leaves the other listening."""
    sh = make_shard()
    peer = Peer(sh)
    opts = ((socket.SOL_SOCKET, socket.SO_REUSEPORT, 1),)
    l1 = listen(sh, opts=opts)
    l2 = listen(sh, opts=opts)
    sh.close(l2, 0.0)
    sd, sa = passive_open(peer, l1, mss=1460)
    assert sa.flags == "S."
    assert sh.state(sd) is State.ESTABLISHED


def test_reuseport_closing_the_first_listener_keeps_the_second():
    sh = make_shard()
    peer = Peer(sh)
    opts = ((socket.SOL_SOCKET, socket.SO_REUSEPORT, 1),)
    l1 = listen(sh, opts=opts)
    l2 = listen(sh, opts=opts)
    sh.close(l1, 0.0)
    sd, sa = passive_open(peer, l2, mss=1460)
    assert sa.flags == "S."


# -- SYN cookies only after a recent overflow --------------------------------------------

def test_cookie_ack_without_recent_overflow_is_not_checked():
    """Linux tcp_synq_no_recent_overflow: with no SYN-queue overflow in the last
    2 minutes a bare ACK is not a cookie; it gets RST and creates nothing."""
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh)
    isn, _ = syncookies.cookie_v4_init_sequence(SECRET, B, A, 40000, 80, 999, 1460, 0.0)
    peer.send(ACK, 1000, isn + 1)
    r = peer.recv_one()
    assert r.flags == "R" and r.seq == (isn + 1) & MASK
    assert sh.accept(lsd) is None
    assert sh.stats.syncookies_recv == 0


def test_cookie_ack_long_after_the_overflow_is_not_checked():
    sh = make_shard()
    lsd = listen(sh, backlog=1)
    cookie = None
    for port in range(40010, 40015):  # SYNs until the request queue overflows
        p = Peer(sh, port=port)
        p.send(SYN, 5000, mss=1460)
        cookie = p.recv_one()
        if sh.stats.syncookies_sent:
            break
    assert sh.stats.syncookies_sent == 1
    # More than 2 minutes after the overflow, a cookie that is itself valid
    # (made 50 s ago) is no longer checked: Linux stops looking.
    isn, _ = syncookies.cookie_v4_init_sequence(SECRET, B, A, 40003, 80, 7000, 1460, 200.0)
    assert syncookies.cookie_v4_check(SECRET, B, A, 40003, 80, 7000, isn, 250.0) is not None
    p3 = Peer(sh, port=40003)
    p3.send(ACK, 7001, isn + 1, at=250.0)
    assert [s.flags for s in p3.recv() if s.dport == 40003] == ["R"]
    assert sh.stats.syncookies_recv == 0
    del cookie, lsd


# -- TIME-WAIT ----------------------------------------------------------------------------

def tw_shard_ts():
    """A connection with timestamps in TIME-WAIT (peer's last TSval 2000)."""
    sh, sd, peer, _ = server_conn(ts=(1000, 0))
    sh.close(sd, 0.0)
    fin = peer.recv_one()
    peer.send(FIN | ACK, 1001, fin.seq + 1, ts=(2000, fin.ts[0]), at=0.1)
    ack = peer.recv_one()
    assert ack.flags == "." and [str(r.state) for r in sh.connections()][-1] == "TIME-WAIT"
    return sh, peer, fin


def test_time_wait_syn_with_old_timestamp_is_paws_rejected():
    """Linux tcp_timewait_state_process: a SYN is a new incarnation only if PAWS
    accepts it; a rejected one is ACKed (TW PAWS) and the TIME-WAIT stays."""
    sh, peer, fin = tw_shard_ts()
    peer.send(SYN, 1001 + 100000, ts=(1500, 0), mss=1460, at=0.2)
    r = peer.recv()
    assert [s.flags for s in r] == ["."], r
    assert "TIME-WAIT" in [str(c.state) for c in sh.connections()]
    assert sh.stats.tw_recycled == 0


def test_time_wait_syn_with_newer_timestamp_still_recycles():
    sh, peer, fin = tw_shard_ts()
    peer.send(SYN, 1001 + 100000, ts=(2500, 0), mss=1460, at=0.2)
    assert peer.recv_one().flags == "S."
    assert sh.stats.tw_recycled == 1


def test_time_wait_blind_rst_outside_rcv_nxt_does_not_kill_it():
    """TIME-WAIT assassination (RFC 1337) needs SEG.SEQ == RCV.NXT in Linux; a blind
    RST with any other sequence number is dropped."""
    sh, peer, fin = tw_shard_ts()
    peer.send(RST, 1002 + 5000, at=0.3)
    assert "TIME-WAIT" in [str(c.state) for c in sh.connections()]
    peer.send(RST, 1002, at=0.4)
    assert "TIME-WAIT" not in [str(c.state) for c in sh.connections()]


# -- orphaned FIN-WAIT-2 ---------------------------------------------------------------------

def test_orphaned_fin_wait2_data_gets_rst():
    """Observed on Linux 6.x (veth in a netns): data to a closed socket in FIN-WAIT-2
    is answered with RST, and the socket is gone."""
    sh, sd, peer, _ = server_conn()
    sh.close(sd, 0.0)
    fin = peer.recv_one()
    peer.send(ACK, 1001, fin.seq + 1)
    assert [str(c.state) for c in sh.connections()] == ["LISTEN", "FIN-WAIT-2"]
    peer.send(ACK, 1001, fin.seq + 1, payload=b"x", at=1.0)
    assert [s.flags[0] for s in peer.recv()] == ["R"]
    assert [str(c.state) for c in sh.connections()] == ["LISTEN"]


def test_orphaned_fin_wait2_times_out_silently_after_fin_timeout():
    """Issue 11 says Linux sends RST here; observed on Linux (tcp_fin_timeout 3 in a
    netns, tcpdump on the veth): the orphan leaves FIN-WAIT-2 after the timeout and
    sends nothing (tcp_time_wait(TCP_FIN_WAIT2, tmo)).  We match that."""
    sh, sd, peer, _ = server_conn()
    sh.close(sd, 0.0)
    fin = peer.recv_one()
    peer.send(ACK, 1001, fin.seq + 1)
    sent = peer.run_timers(20)
    assert [s for _, s in sent if s.flags[0] == "R"] == []
    assert [str(c.state) for c in sh.connections()] == ["LISTEN"]


# -- SACK blocks cover whole segments -------------------------------------------------------

def test_sub_mss_sack_blocks_do_not_split_retransmissions():
    """A peer SACKing one byte in each segment made every retransmission a 1-byte
    segment and the next one MSS-1 (CVE-2019-11477's class).  Linux marks only whole
    segments SACKed (tcp_match_skb_to_sack), so it retransmits full segments."""
    sh, sd, peer, una = server_conn(sack_perm=True, mss=1000)
    sh.sock(sd).cc.cwnd = 40
    sh.send(sd, b"a" * 40000, 0.0)
    assert len(peer.recv()) == 40
    blocks = [(una + 1000 * k + 1, una + 1000 * k + 2) for k in range(1, 40)]
    t = 0.01
    for i in range(0, len(blocks), 4):
        peer.send(ACK, 1001, una, sack=tuple(blocks[i:i + 4]), at=t)
        t += 0.001
    out = [s for s in peer.recv()] + [s for _, s in peer.run_timers(3)]
    sizes = [len(s.payload) for s in out if s.payload]
    assert sizes and min(sizes) == 1000, sizes[:20]


# -- memory charged per segment (truesize) ---------------------------------------------------

def _deep_size(root) -> int:
    """Bytes reachable from ``root`` (objects, containers, buffers), each counted once;
    classes, modules and functions are shared, not the connection's."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


def _queue_memory(sk, send) -> int:
    """Growth of the memory a connection holds while ``send`` runs."""
    before = _deep_size(sk)
    send()
    return _deep_size(sk) - before


def test_out_of_order_one_byte_segments_are_bounded_by_rcvbuf():
    """One-byte segments on alternate bytes: payload accounting let 2048 entries of
    2 KiB of payload hold ~100x the receive buffer in memory."""
    rcvbuf = 4096
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh, opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf),))
    sd, sa = passive_open(peer, lsd, mss=1460, sack_perm=True)
    una = sa.seq + 1

    def flood():
        for k in range(1, rcvbuf // 2):
            peer.send(ACK, 1001 + 2 * k, una, payload=b"o")
        peer.recv()

    used = _queue_memory(sh.sock(sd), flood)
    assert used <= 4 * rcvbuf, used
    # The hole filled, what was kept is delivered in order and nothing is invented.
    peer.send(ACK, 1001, una, payload=b"h")
    data = sh.recv(sd, 1 << 20)
    assert data[:1] == b"h" and set(data[1:]) <= {ord("o")}


def test_in_order_one_byte_segments_are_bounded_by_rcvbuf():
    """An app that does not read and a peer sending 2-byte segments (1-byte bytes
    objects are CPython singletons): the receive queue is charged per segment and
    collapsed under pressure (Linux tcp_collapse)."""
    rcvbuf = 8192
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh, opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf),))
    sd, sa = passive_open(peer, lsd, mss=1460)
    una = sa.seq + 1
    sent = []

    def flood():
        seq = 1001
        for _ in range(rcvbuf // 2):
            peer.send(ACK, seq, una, payload=b"ii")
            acks = peer.recv()
            if acks:
                seq = acks[-1].ack
            sent.append(seq)
        peer.recv()

    used = _queue_memory(sh.sock(sd), flood)
    assert used <= 4 * rcvbuf, used
    data = sh.recv(sd, 1 << 20)
    assert data == b"i" * len(data) and len(data) >= rcvbuf // 2


# -- the receive boundary --------------------------------------------------------------------

def test_a_failing_frame_resets_only_its_connection_and_the_batch_goes_on(monkeypatch, caplog):
    """Whatever fails while one frame is handled (here: a fault injected into the data
    path of one connection) is counted, that connection is reset as Linux resets one
    it cannot handle, and every other frame of the batch is processed."""
    from shardstack.core import tcp_input

    sh = make_shard()
    lsd = listen(sh)
    bad = Peer(sh, port=40001)
    bsd, bsa = passive_open(bad, lsd, mss=1460)
    good = Peer(sh, port=40002)
    gsd, gsa = passive_open(good, lsd, mss=1460)
    sh.take_frames()
    victim = sh.sock(bsd)
    real = tcp_input.tcp_data_queue

    def faulty(shard, sk, seg, now):
        if sk is victim:
            raise RuntimeError("injected fault")
        return real(shard, sk, seg, now)

    monkeypatch.setattr(tcp_input, "tcp_data_queue", faulty)
    # Past header prediction (a PSH|ACK|FIN-free frame would take the fast path).
    sh.receive_batch([frame(40001, 1001, bsa.seq + 1, ACK | FIN, b"b" * 10),
                      frame(40002, 1001, gsa.seq + 1, ACK | FIN, b"g" * 10)], 0.01)
    assert sh.recv(gsd, 100) == b"g" * 10
    out = [f for f in sh.take_frames()]
    from core_helpers import parse
    rsts = [s for s in map(parse, out) if s.dport == 40001]
    assert [s.flags for s in rsts] == ["R."] or [s.flags for s in rsts] == ["R"]
    assert sh.state(bsd) is State.CLOSED
    assert sum(n for r, n in sh.stats.drops.items() if "EXCEPTION" in r.value) == 1
    # One log line, naming the frame and the fault; a second fault within the
    # second is counted, not logged (a peer cannot flood the log).
    faults = [r.getMessage() for r in caplog.records if "injected fault" in r.getMessage()]
    assert len(faults) == 1 and "40001" in faults[0] and "RuntimeError" in faults[0]
    bad2 = Peer(sh, port=40003)
    b2sd, b2sa = passive_open(bad2, lsd, mss=1460)
    victim = sh.sock(b2sd)
    sh.receive(frame(40003, 1001, b2sa.seq + 1, ACK | FIN, b"c" * 10), 0.5)
    assert sh.state(b2sd) is State.CLOSED
    assert len([r for r in caplog.records if "injected fault" in r.getMessage()]) == 1


# -- malformed frames, each under its own drop reason ---------------------------------------

def _tcp_with_options(opts: bytes, doff: int | None = None) -> bytes:
    import struct as _st

    from shardstack.core.wire.ipv4 import build_ipv4
    words = doff if doff is not None else 5 + len(opts) // 4
    seg = _st.pack("!HHIIBBHHH", 40000, 80, 1, 0, words << 4, SYN, 1000, 0, 0) + opts
    return build_ipv4(B, A, 6, seg)


@pytest.mark.parametrize("opts,reason", [
    (b"\x01\x01\x08\x00", "TCP_OPTLEN_SHORT"),  # length 0
    (b"\x01\x01\x08\x01", "TCP_OPTLEN_SHORT"),  # length 1
    (b"\x01\x01\x01\x08", "TCP_OPTLEN_SHORT"),  # no length byte
    (b"\x01\x01\x08\x0a", "TCP_OPT_OVERRUN"),  # 10 bytes in 2
    (b"\x02\x03\x05\xb4", "TCP_OPTIONS"),  # MSS with length 3
])
def test_malformed_tcp_options_each_have_a_reason(opts, reason):
    sh = make_shard()
    listen(sh)
    sh.receive(_tcp_with_options(opts), 0.0, csum_ok=True)
    assert sh.take_frames() == []
    assert {r.value: n for r, n in sh.stats.drops.items()} == {reason: 1}


@pytest.mark.parametrize("ipopts,reason", [
    (b"\x83\x07\x04" + bytes(4) + b"\x00", "IP_SOURCE_ROUTE"),  # LSRR
    (b"\x89\x07\x04" + bytes(4) + b"\x00", "IP_SOURCE_ROUTE"),  # SSRR
    (b"\x07\x00\x00\x00", "IP_OPTIONS"),  # record route with length 0
    (b"\x44\x28\x05\x00", "IP_OPTIONS"),  # timestamp option overrunning the header
])
def test_ip_options_source_routed_or_malformed_are_dropped(ipopts, reason):
    import struct as _st

    from shardstack.core.wire.ipv4 import header_checksum
    tcp = build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN, 65535)[20:]
    hl = 20 + len(ipopts)
    hdr = bytearray(_st.pack("!BBHHHBBHII", 0x40 | hl // 4, 0, hl + len(tcp), 0, 0x4000, 64, 6, 0,
                             B, A) + ipopts)
    hdr[10:12] = _st.pack("!H", header_checksum(bytes(hdr)))
    sh = make_shard()
    listen(sh)
    sh.receive(bytes(hdr) + tcp, 0.0, csum_ok=True)
    assert sh.take_frames() == []
    assert {r.value: n for r, n in sh.stats.drops.items()} == {reason: 1}


def test_ip_options_that_are_legal_are_accepted():
    import struct as _st

    from shardstack.core.wire.ipv4 import header_checksum
    tcp = build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN, 65535)[20:]
    ipopts = b"\x94\x04\x00\x00"  # router alert
    hdr = bytearray(_st.pack("!BBHHHBBHII", 0x46, 0, 24 + len(tcp), 0, 0x4000, 64, 6, 0, B, A)
                    + ipopts)
    hdr[10:12] = _st.pack("!H", header_checksum(bytes(hdr)))
    sh = make_shard()
    listen(sh)
    sh.receive(bytes(hdr) + tcp, 0.0, csum_ok=True)
    assert [s.flags for s in map(_parse, sh.take_frames())] == ["S."]


def _parse(f):
    from core_helpers import parse
    return parse(f)


def _icmp_err(quoted: bytes, itype: int = 3, code: int = 4, rest: int = 1000,
              corrupt: bool = False) -> bytes:
    from shardstack.core.wire.icmp import build_icmp_error
    from shardstack.core.wire.ipv4 import build_ipv4
    msg = bytearray(build_icmp_error(itype, code, quoted, rest))
    if corrupt:
        msg[2] ^= 0xFF
    return build_ipv4(B, A, 1, bytes(msg))


def test_icmp_errors_quoting_nonsense_each_have_a_reason():
    sh, sd, peer, una = server_conn()
    sk = sh.sock(sd)
    mss = sk.mss_cache
    ours = build_tcp_ipv4(A, B, 80, 40000, una, 1001, ACK, 100)
    cases = [
        (_icmp_err(ours, corrupt=True), "ICMP_CSUM"),
        (_icmp_err(ours[:10]), "ICMP_ERR_QUOTE"),  # quote shorter than a header + 8
        (_icmp_err(build_tcp_ipv4(B, A, 40000, 80, 1, 0, ACK, 100)), "ICMP_ERR_NOT_OURS"),
        (_icmp_err(build_tcp_ipv4(A, B, 80, 40999, una, 0, ACK, 100)), "ICMP_ERR_NOT_OURS"),
        (_icmp_err(build_tcp_ipv4(A, B, 80, 40000, (una + 5000) & MASK, 0, ACK, 100)),
         "ICMP_ERR_OUT_OF_WINDOW"),
    ]
    from shardstack.core.wire.ipv4 import build_ipv4
    gre = build_ipv4(A, B, 47, bytes(8))  # a transport we do not have (UDP goes to udp_err)
    cases.append((_icmp_err(gre), "ICMP_ERR_NOT_TCP"))
    for i, (pkt, reason) in enumerate(cases):
        before = dict(sh.stats.drops)
        sh.receive(pkt, 0.01 * i)
        got = {r.value: n - before.get(r, 0) for r, n in sh.stats.drops.items()
               if n != before.get(r, 0)}
        assert got == {reason: 1}, (i, got)
    assert sk.state is State.ESTABLISHED and sk.mss_cache == mss


def test_icmp_error_flood_is_cut_and_counted():
    sh, sd, peer, una = server_conn()
    ours = build_tcp_ipv4(A, B, 80, 40000, una, 1001, ACK, 100)
    pkt = _icmp_err(ours, code=1)  # host unreachable: a soft error each
    for _ in range(1000):
        sh.receive(pkt, 1.0)  # all at once: the burst passes, the rest is cut
    assert sh.stats.drops[__import__("shardstack.core", fromlist=["DropReason"])
                          .DropReason.ICMP_RATELIMIT] == 900
    assert sh.stats.tcp_icmp_soft_errors == 100
    sh.receive(pkt, 1.5)  # half a second later: tokens again
    assert sh.stats.tcp_icmp_soft_errors == 101


# -- per-shard limits ------------------------------------------------------------------------

def test_connection_cap_refuses_syns_and_counts():
    sh = make_shard(max_connections=3)
    lsd = listen(sh, backlog=16)
    answered = 0
    for port in range(41000, 41010):
        p = Peer(sh, port=port)
        p.send(SYN, 1000, mss=1460)
        answered += sum(1 for s in p.recv() if s.flags == "S.")
    assert answered == 3
    assert sh.stats.drops[__import__("shardstack.core", fromlist=["DropReason"])
                          .DropReason.TCP_CONN_LIMIT] == 7
    del lsd


def test_tcp_mem_pressure_stops_out_of_order_and_hard_limit_refuses_connections():
    """A shard whose queued memory passes tcp_mem[1] keeps no out-of-order data;
    past tcp_mem[2] it takes no new connection (counted as TCP_MEM)."""
    from shardstack.core import DropReason as DR
    rcvbuf = 65536
    sh = make_shard(tcp_mem=(20000, 40000, 60000))
    lsd = listen(sh, backlog=16, opts=((socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf),))
    conns = []
    for port in (40001, 40002):
        p = Peer(sh, port=port)
        sd, sa = passive_open(p, lsd, mss=1460, sack_perm=True)
        conns.append((p, sd, sa.seq + 1))
    # Connection 1 queues 50 KB in order (the app does not read).
    p, sd, una = conns[0]
    for k in range(35):
        p.send(ACK, 1001 + 1460 * k, una, payload=b"a" * 1460, at=0.1 + k * 0.001)
    p.recv()
    # Connection 2 sends out-of-order data: under pressure it is not kept.
    p2, sd2, una2 = conns[1]
    p2.send(ACK, 1001 + 1460, una2, payload=b"b" * 1460, at=0.5)
    assert sh.stats.tcp_mem_pressures == 1 and not sh.sock(sd2).ofo
    # Past the hard limit: a new connection is refused.
    for k in range(35, 60):
        p.send(ACK, 1001 + 1460 * k, una, payload=b"a" * 1460, at=0.6 + k * 0.001)
    p3 = Peer(sh, port=40003)
    p3.send(SYN, 5000, mss=1460, at=1.0)
    assert [s for s in p3.recv() if s.dport == 40003] == []
    assert sh.stats.drops[DR.TCP_MEM] >= 1
    # The reader drains; memory falls and connections are taken again.
    sh.recv(sd, 1 << 20)
    p3.send(SYN, 5000, mss=1460, at=2.0)
    assert [s.flags for s in p3.recv() if s.dport == 40003] == ["S."]


# -- found by the fuzzer ----------------------------------------------------------------------

def test_out_of_order_data_beyond_an_in_order_fin_is_purged():
    """Found by the million-input fuzz run (input 767596): data queued out of order
    above a hole, then a FIN that fills the hole's first byte.  The data lies after
    the FIN: Linux tcp_fin purges the out-of-order queue.  Here it stayed queued
    (a range starting at RCV.NXT, never drained, memory held) and would have been
    delivered after EOF by the next in-order segment."""
    sh, sd, peer, una = server_conn(sack_perm=True)
    peer.send(ACK, 1002, una, payload=b"z" * 100)  # 1001 is the hole
    assert sh.sock(sd).ofo
    peer.send(FIN | ACK, 1001, una)  # the FIN takes 1001: RCV.NXT is 1002 now
    sk = sh.sock(sd)
    assert sk.ofo == [] and sk.ofo_len == 0 and not sk.sack_blocks
    assert sh.recv(sd, 1000) == b""
    peer.send(ACK, 1002, una, payload=b"y" * 10)  # more "data" after the FIN
    assert sh.recv(sd, 1000) == b""


def test_keepalive_timer_due_by_float_rounding_does_not_spin():
    """Found by the final fuzz run (seed 32, input 399225): the peer last heard at
    0.001, TCP_KEEPIDLE 1, the timer due at 1.001.  now - rcv_tstamp is
    0.9999999999999999 < 1.0, so the handler re-armed the timer for
    rcv_tstamp + keepidle, which is not after now: Shard.advance ran it again,
    forever (a wedged worker)."""
    import signal

    sh, sd, peer, una = server_conn(ack_at=0.001)
    sh.setsockopt(sd, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sh.setsockopt(sd, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)

    def spinning(*_):
        raise AssertionError("Shard.advance did not return")

    old = signal.signal(signal.SIGALRM, spinning)
    signal.alarm(5)
    try:
        sh.advance(1.001)
        sh.advance(1.5)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    probes = [s for s in peer.recv() if s.flags == "." and s.seq == (una - 1) & MASK]
    assert len(probes) == 1 and sh.stats.keepalive_probes == 1
