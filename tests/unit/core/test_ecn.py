"""ECN (RFC 3168 §6.1, Linux ``tcp_ecn_*``; core.tcp_ecn) on the wire.

Negotiation for every pair of ``tcp_ecn`` settings, ECT(0) only on new data,
the receiver's CE -> ECE-until-CWR echo and its quick ACK, the sender's one
reduction per window (Linux's CWR state, no retransmission), CWR on the next
new data, the SYN fallback, SYN cookies, and what TCP_INFO says about it.
Frames are read with their IP ECN field; a CE mark is made on the wire as a
router would (RFC 3168 §5: ECT -> CE, the header checksum redone).
"""

from __future__ import annotations

import struct

import pytest
from core_helpers import A, B, Pair, Peer, listen, make_shard, parse
from shardstack.core import tcp_ecn
from shardstack.core.tcp_cong import CaState
from shardstack.core.tcp_info import TCPI_OPT_ECN, TCPI_OPT_ECN_SEEN, tcp_get_info, unpack_tcp_info
from shardstack.core.wire.ipv4 import header_checksum
from shardstack.core.wire.tcp import ACK, CWR, ECE, PSH, SYN, build_tcp_ipv4, build_tcp_options

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3


def ecn_of(frame: bytes) -> int:
    return frame[1] & 3


def tcp_flags(frame: bytes) -> int:
    return frame[20 + 13]


def mark_ce(frame: bytes) -> bytes:
    """What an AQM router does to an ECT packet (RFC 3168 §5): CE, checksum redone."""
    hdr = bytearray(frame[:20])
    hdr[1] |= CE
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", header_checksum(bytes(hdr)))
    return bytes(hdr) + frame[20:]


class Wire(Pair):
    """A Pair whose wire keeps the raw frames (``raw``: (time, dir, frame)) and may
    CE-mark the ones ``mark(direction, frame)`` picks."""

    def __init__(self, **kw) -> None:
        ea = kw.pop("ecn_a", 2)
        eb = kw.pop("ecn_b", 2)
        super().__init__(a=make_shard(A, ecn=ea, **kw), b=make_shard(B, ecn=eb, **kw))
        self.raw: list[tuple[float, str, bytes]] = []
        self.mark = None

    def deliver(self, max_rounds: int = 100_000) -> int:
        n = 0
        for _ in range(max_rounds):
            fa = self.a.take_frames()
            fb = self.b.take_frames()
            if not fa and not fb:
                return n
            for direction, frames, dst in (("ab", fa, self.b), ("ba", fb, self.a)):
                for f in frames:
                    if self.mark is not None and ecn_of(f) and self.mark(direction, f):
                        f = mark_ce(f)
                    self.raw.append((self.now, direction, f))
                    self.tap.append((self.now, direction, parse(f)))
                    if self.drop is not None and self.drop(direction, parse(f)):
                        continue
                    dst.receive(f, self.now)
                    n += 1
        raise AssertionError("wire never went quiet")

    def frames(self, direction: str) -> list[bytes]:
        return [f for _, d, f in self.raw if d == direction]


def info(sh, sd: int, now: float = 0.0) -> dict[str, int]:
    return unpack_tcp_info(tcp_get_info(sh.sock(sd), now))


def open_pair(ecn_a: int, ecn_b: int) -> tuple[Wire, int, int]:
    w = Wire(ecn_a=ecn_a, ecn_b=ecn_b)
    _, c, s = w.connect()
    return w, c, s


# -- negotiation (RFC 3168 §6.1.1) ------------------------------------------------------------

@pytest.mark.parametrize("ecn_a", [0, 1, 2])
@pytest.mark.parametrize("ecn_b", [0, 1, 2])
def test_negotiation_matrix(ecn_a: int, ecn_b: int) -> None:
    """ECN is on only when the active side asks (tcp_ecn = 1) and the passive side
    accepts (1 or 2, Linux's default); then data goes ECT(0) both ways."""
    w, c, s = open_pair(ecn_a, ecn_b)
    syn, synack = w.frames("ab")[0], w.frames("ba")[0]
    assert tcp_flags(syn) & SYN and not tcp_flags(syn) & ACK
    asked = ecn_a == 1
    on = asked and ecn_b != 0
    assert tcp_flags(syn) & (ECE | CWR) == ((ECE | CWR) if asked else 0)
    assert tcp_flags(synack) & (ECE | CWR) == (ECE if on else 0)
    assert ecn_of(syn) == NOT_ECT and ecn_of(synack) == NOT_ECT  # §6.1.1: never ECT on SYNs
    for sh, sd in ((w.a, c), (w.b, s)):
        assert bool(info(sh, sd)["options"] & TCPI_OPT_ECN) == on
    w.a.send(c, b"x" * 3000, w.now)
    w.b.send(s, b"y" * 100, w.now)
    w.deliver()
    for direction in ("ab", "ba"):
        data = [f for f in w.frames(direction)[1:] if len(f) > 52]
        assert data
        assert {ecn_of(f) for f in data} == {ECT0 if on else NOT_ECT}
    assert bool(info(w.b, s)["options"] & TCPI_OPT_ECN_SEEN) == on


def test_no_ect_on_pure_acks_or_handshake() -> None:
    """§6.1.4: pure ACKs are Not-ECT even on an ECN connection."""
    w, c, s = open_pair(1, 2)
    w.a.send(c, b"x" * 20000, w.now)
    w.deliver()
    w.advance(w.now + 1.0)  # delayed ACKs too
    acks = [f for f in w.frames("ba") if len(f) == 52 and not tcp_flags(f) & SYN]
    assert acks, "the receiver sent no ACKs"
    assert all(ecn_of(f) == NOT_ECT for f in acks)
    data = [f for f in w.frames("ab") if len(f) > 52 and not tcp_flags(f) & SYN]
    assert data and all(ecn_of(f) == ECT0 for f in data)


def test_retransmission_is_not_ect() -> None:
    """§6.1.5: a retransmitted data segment goes Not-ECT (Linux tcp_ecn_send: only
    data at or after SND.NXT is ECT)."""
    w, c, s = open_pair(1, 2)
    dropped: list[int] = []

    def drop(direction, seg):
        if direction == "ab" and seg.payload and not dropped:
            dropped.append(seg.seq)
            return True
        return False

    w.drop = drop
    w.a.send(c, b"x" * 1000, w.now)
    w.deliver()
    w.advance(w.now + 3.0)  # the RTO resends it
    copies = [f for _, d, f in w.raw if d == "ab" and parse(f).seq == dropped[0] and len(f) > 52]
    assert len(copies) >= 2
    assert ecn_of(copies[0]) == ECT0
    assert all(ecn_of(f) == NOT_ECT for f in copies[1:])
    assert w.b.recv(s, 4096) == b"x" * 1000


def test_retransmitted_syn_falls_back_without_ece_cwr() -> None:
    """RFC 3168 §6.1.1.1 (Linux tcp_ecn_clear_syn): the first SYN asks, a
    retransmitted one does not, and a plain SYN-ACK then leaves ECN off."""
    sh = make_shard(ecn=1)
    peer = Peer(sh)
    sd = sh.socket()
    sh.connect(sd, B, 40000, 0.0)
    first = sh.take_frames()[0]
    assert tcp_flags(first) & (ECE | CWR) == ECE | CWR
    again = peer.advance(sh.next_deadline())
    assert len(again) == 1 and again[0].flags == "S"
    syn = again[0]
    peer.port, peer.shard_addr = 40000, A
    pkt = build_tcp_ipv4(B, A, 40000, syn.sport, 5000, syn.seq + 1, SYN | ACK, 65535,
                         build_tcp_options(mss=1460))
    sh.receive(pkt, peer.now)
    assert not sh.sock(sd).ecn_flags
    sh.take_frames()
    sh.send(sd, b"z" * 100, peer.now)
    assert all(ecn_of(f) == NOT_ECT for f in sh.take_frames())


def test_passive_side_refuses_ect_marked_syn() -> None:
    """Linux tcp_ecn_create_request: a SYN that itself arrives ECT is not given ECN."""
    sh = make_shard()
    lsd = listen(sh)
    syn = build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN | ECE | CWR, 65535,
                         build_tcp_options(mss=1460), tos=ECT0)
    sh.receive(syn, 0.0)
    assert not tcp_flags(sh.take_frames()[0]) & ECE
    syn = build_tcp_ipv4(B, A, 40001, 80, 1000, 0, SYN | ECE | CWR, 65535,
                         build_tcp_options(mss=1460))
    sh.receive(syn, 0.0)
    assert tcp_flags(sh.take_frames()[0]) & ECE
    assert lsd is not None


@pytest.mark.parametrize("with_ts", [True, False])
def test_syncookies_keep_ecn_in_the_timestamp(with_ts: bool) -> None:
    """tcp_syncookies = 2: ECN survives in the cookie's TSval bits (Linux
    cookie_init_timestamp / cookie_ecn_ok); without timestamps the SYN-ACK does not
    offer it (Linux clears ecn_ok when it cannot remember it)."""
    sh = make_shard(syncookies=2)
    lsd = listen(sh)
    ts = (777, 0) if with_ts else None
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN | ECE | CWR, 65535,
                              build_tcp_options(mss=1460, ts=ts)), 0.0)
    sa = sh.take_frames()[0]
    assert bool(tcp_flags(sa) & ECE) == with_ts
    p = parse(sa)
    ack_ts = (778, p.ts[0]) if with_ts else None
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1001, p.seq + 1, ACK, 65535,
                              build_tcp_options(ts=ack_ts) if ack_ts else b""), 0.1)
    acc = sh.accept(lsd)
    assert acc is not None
    assert bool(sh.sock(acc[0]).ecn_flags & 1) == with_ts


# -- the receiver: CE -> ECE until CWR (RFC 3168 §6.1.3) ---------------------------------------

def _ecn_server() -> tuple:
    """A server shard (tcp_ecn default 2) that accepted an ECN connection from a
    scripted peer with timestamps off: (shard, sd, peer, server's next seq)."""
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh)
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1000, 0, SYN | ECE | CWR, 65535,
                              build_tcp_options(mss=1460)), 0.0)
    sa = parse(sh.take_frames()[0])
    assert "E" in sa.flags
    peer.send(ACK, 1001, sa.seq + 1)
    acc = sh.accept(lsd)
    assert acc is not None
    return sh, acc[0], peer, sa.seq + 1


def _data(sh, seq: int, ack: int, n: int, *, tos: int = ECT0, flags: int = ACK | PSH,
          now: float = 0.0) -> list[bytes]:
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, seq, ack, flags, 65535, b"", b"d" * n, tos=tos),
               now)
    return sh.take_frames()


def test_ce_is_echoed_until_cwr_and_acked_at_once() -> None:
    sh, sd, peer, iss = _ecn_server()
    seq = 1001
    t = 0.0
    # Use up the connection-start quick ACKs: small segments, then let the delayed ACK
    # go (a gap longer than the RTO would grant quick ACKs again: tcp_delack).
    for _ in range(20):
        t += 0.001
        _data(sh, seq, iss, 100, now=t)
        seq += 100
    t += 0.05
    sh.advance(t)
    sh.take_frames()
    # An ECT(0) segment below one MSS: delayed, no ACK yet.
    assert _data(sh, seq, iss, 100, now=t) == []
    seq += 100
    # A CE-marked one: ACKed at once (quick-ACK mode), with ECE.
    out = _data(sh, seq, iss, 100, tos=CE, now=t)
    seq += 100
    assert len(out) == 1 and tcp_flags(out[0]) & ECE and parse(out[0]).ack == seq
    assert ecn_of(out[0]) == NOT_ECT
    # Every ACK keeps ECE until a CWR arrives, also for unmarked data...
    for _ in range(3):
        t += 0.5
        acks = _data(sh, seq, iss, 100, now=t)
        seq += 100
        sh.advance(t + 0.2)
        acks += sh.take_frames()
        assert acks and all(tcp_flags(f) & ECE for f in acks)
    # ... and our own data carries it too (ECE on every segment, §6.1.3).
    sh.send(sd, b"r" * 10, t)
    ours = sh.take_frames()
    assert ours and tcp_flags(ours[0]) & ECE and ecn_of(ours[0]) == ECT0
    iss += 10
    # CWR: echo stops; the CWR segment is ACKed at once.
    t += 0.5
    out = _data(sh, seq, iss, 100, flags=ACK | PSH | CWR, now=t)
    seq += 100
    assert len(out) == 1 and not tcp_flags(out[0]) & ECE
    t += 0.5
    acks = _data(sh, seq, iss, 100, now=t)
    sh.advance(t + 0.2)
    acks += sh.take_frames()
    assert acks and not any(tcp_flags(f) & ECE for f in acks)


def test_ce_ignored_without_ecn() -> None:
    """A CE mark on a connection that did not negotiate ECN changes nothing."""
    sh = make_shard()
    peer = Peer(sh)
    lsd = listen(sh)
    peer.send(SYN, 1000, mss=1460)
    sa = peer.recv_one()
    assert "E" not in sa.flags
    peer.send(ACK, 1001, sa.seq + 1)
    sd = sh.accept(lsd)[0]
    out = _data(sh, 1001, sa.seq + 1, 100, tos=CE, now=0.01)
    assert all(not tcp_flags(f) & ECE for f in out)
    assert not sh.sock(sd).ecn_flags


# -- the sender: one reduction per window, CWR on new data (RFC 3168 §6.1.2) ------------------

class Spy:
    """Records every entry into the CWR state and every ACK handled in it."""

    def __init__(self, monkeypatch) -> None:
        self.entries: list[tuple[int, int]] = []  # (cwnd, ssthresh) right after entering
        self.cwr_acks: list[int] = []  # cwnd after each ACK in CWR
        enter, ack = tcp_ecn.tcp_ecn_rcv_ecn_echo, tcp_ecn.tcp_cwr_ack

        def spy_enter(sh, sk, now):
            was = sk.cc.ca_state
            enter(sh, sk, now)
            if was != CaState.CWR and sk.cc.ca_state == CaState.CWR:
                self.entries.append((sk.cc.cwnd, sk.cc.ssthresh))

        def spy_ack(sk, acked, rtt, now):
            ack(sk, acked, rtt, now)
            self.cwr_acks.append(sk.cc.cwnd)

        monkeypatch.setattr(tcp_ecn, "tcp_ecn_rcv_ecn_echo", spy_enter)
        monkeypatch.setattr(tcp_ecn, "tcp_cwr_ack", spy_ack)


def _bulk(w: Wire, c: int, s: int, size: int, until: float) -> int:
    """Send ``size`` bytes a -> b, reading on b, until done or ``until``; bytes read."""
    data = memoryview(bytes(size))
    sent = got = 0
    while w.now < until and got < size:
        if sent < size:
            sent += w.a.send(c, data[sent:sent + 65536], w.now)
        w.deliver()
        while chunk := w.b.recv(s, 1 << 20):
            got += len(chunk)
        w.advance(w.now + 0.001)
    return got


def _grown() -> tuple[Wire, int, int]:
    """An ECN connection whose cwnd an unmarked transfer opened past its initial 10."""
    w, c, s = open_pair(1, 2)
    assert _bulk(w, c, s, 400_000, w.now + 5.0) == 400_000
    assert w.a.sock(c).cc.cwnd > 10
    return w, c, s


def _cwr_segments(w: Wire, start: int) -> list[bytes]:
    return [f for _, d, f in w.raw[start:] if d == "ab" and tcp_flags(f) & CWR]


def test_ece_reduces_cwnd_once_sets_cwr_without_retransmitting(monkeypatch) -> None:
    w, c, s = _grown()
    spy = Spy(monkeypatch)
    sk = w.a.sock(c)
    cc = sk.cc
    before = cc.cwnd
    start = len(w.raw)
    marked: list[int] = []

    def mark(direction, f):  # CE on one data segment
        if direction == "ab" and len(f) > 52 and not marked:
            marked.append(parse(f).seq)
            return True
        return False

    w.mark = mark
    assert _bulk(w, c, s, 300_000, w.now + 20) == 300_000
    assert marked
    ece_acks = [f for _, d, f in w.raw[start:] if d == "ba" and tcp_flags(f) & ECE]
    assert ece_acks, "the receiver never echoed the CE mark"
    cwr = _cwr_segments(w, start)
    assert len(cwr) == 1, "CWR goes once, on the first new data after the reduction"
    assert ecn_of(cwr[0]) == ECT0 and len(cwr[0]) > 52
    # After the CWR segment the receiver stops echoing: no ECE ACK acknowledges beyond it.
    cwr_end = parse(cwr[0]).seq + len(parse(cwr[0]).payload)
    assert all(parse(f).ack - cwr_end < 0 for f in ece_acks)
    # One entry into CWR, ssthresh by CUBIC's beta (0.7) of the window then.
    assert len(spy.entries) == 1
    assert spy.entries[0][1] == max(int(before * 0.7), 2)
    # PRR brought cwnd down within the state (never below ssthresh's neighbourhood, never
    # above the window before), and the state ended with cwnd = ssthresh.
    assert spy.cwr_acks and max(spy.cwr_acks) <= before
    assert cc.ca_state == CaState.OPEN
    assert sk.total_retrans == 0 and sk.rtos == 0 and sk.recoveries == 0  # no loss at all
    assert sk.delivered_ce >= 1 and w.a.stats.tcp_delivered_ce == sk.delivered_ce
    assert info(w.a, c, w.now)["delivered_ce"] == sk.delivered_ce


def test_marks_in_one_window_reduce_once(monkeypatch) -> None:
    """Several CE marks inside one window of data: one reduction (§6.1.2)."""
    w, c, s = _grown()
    spy = Spy(monkeypatch)
    start = len(w.raw)
    count = [0]

    def mark(direction, f):  # five consecutive data segments
        if direction == "ab" and len(f) > 52 and count[0] < 5:
            count[0] += 1
            return True
        return False

    w.mark = mark
    assert _bulk(w, c, s, 200_000, w.now + 20) == 200_000
    assert count[0] == 5
    assert len(spy.entries) == 1
    assert len(_cwr_segments(w, start)) == 1
    assert w.a.sock(c).total_retrans == 0


def test_marks_in_two_windows_reduce_twice(monkeypatch) -> None:
    """A CE mark after the first reduction has ended is a new congestion signal."""
    w, c, s = _grown()
    spy = Spy(monkeypatch)
    sk = w.a.sock(c)
    start = len(w.raw)
    st = {"marks": 0, "after_cwr": -1}

    def mark(direction, f):
        if direction != "ab" or len(f) <= 52:
            return False
        if tcp_flags(f) & CWR:
            st["after_cwr"] = 0
        elif st["after_cwr"] >= 0:
            st["after_cwr"] += 1
        # The first data segment, then one a few windows after the first CWR.
        if st["marks"] == 0 or (st["marks"] == 1 and st["after_cwr"] == 300):
            st["marks"] += 1
            return True
        return False

    w.mark = mark
    assert _bulk(w, c, s, 1_500_000, w.now + 30) == 1_500_000
    assert st["marks"] == 2
    assert len(spy.entries) == 2
    assert len(_cwr_segments(w, start)) == 2
    assert spy.entries[1][1] < spy.entries[0][0]  # the second cut starts from the lower window
    assert sk.total_retrans == 0


def test_without_ecn_marks_change_nothing(monkeypatch) -> None:
    """The control: the same marking on a connection without ECN (tcp_ecn 0 on the
    client) never enters CWR and nothing is echoed (its packets are Not-ECT, which a
    router does not mark)."""
    w, c, s = open_pair(0, 2)
    spy = Spy(monkeypatch)
    w.mark = lambda d, f: d == "ab"
    assert _bulk(w, c, s, 300_000, w.now + 20) == 300_000
    assert spy.entries == []
    assert not any(tcp_flags(f) & ECE for _, d, f in w.raw if d == "ba")


# -- IPv6: the same bits in the Traffic Class (RFC 3168 §5, RFC 8200 §7) ------------------------

def test_ecn_over_ipv6() -> None:
    """Negotiation, ECT(0) data, a CE mark echoed, one CWR and one reduction, with
    the ECN field in the IPv6 Traffic Class (version 4 bits, then the class)."""
    from core_helpers import A6, B6, make_shard6
    a, b = make_shard6(A6, ecn=1), make_shard6(B6)
    lsd = b.socket(10)
    b.bind(lsd, 0, 80)
    b.listen(lsd, 4)

    def tclass_ecn(f: bytes) -> int:
        return (f[1] >> 4) & 3

    raw: list[tuple[str, bytes]] = []
    marked: list[bytes] = []
    t = [0.0]

    def move() -> None:
        for _ in range(100_000):
            fa, fb = a.take_frames(), b.take_frames()
            if not fa and not fb:
                return
            for f in fa:
                if len(f) > 72 and tclass_ecn(f) and not marked:  # the first ECT data
                    f = f[:1] + bytes([f[1] | 0x30]) + f[2:]  # CE, no header checksum to redo
                    marked.append(f)
                raw.append(("ab", f))
                b.receive(f, t[0])
            for f in fb:
                raw.append(("ba", f))
                a.receive(f, t[0])

    c = a.socket(10)
    a.connect(c, B6, 80, 0.0)
    move()
    s = b.accept(lsd)[0]
    assert raw[0][1][40 + 13] & (ECE | CWR) == ECE | CWR
    assert raw[1][1][40 + 13] & (ECE | CWR) == ECE
    data = memoryview(bytes(600_000))
    sent = got = 0
    while got < len(data) and t[0] < 20:
        if sent < len(data):
            sent += a.send(c, data[sent:sent + 65536], t[0])
        move()
        while chunk := b.recv(s, 1 << 20):
            got += len(chunk)
        t[0] += 0.001
        a.advance(t[0])
        b.advance(t[0])
        move()
    assert got == len(data)
    assert marked
    ab = [f for d, f in raw if d == "ab" and len(f) > 72 and not f[40 + 13] & SYN]
    assert {tclass_ecn(f) for f in ab} == {ECT0, CE}
    assert any(f[40 + 13] & ECE for d, f in raw if d == "ba")
    assert sum(1 for f in ab if f[40 + 13] & CWR) == 1
    sk = a.sock(c)
    assert sk.delivered_ce >= 1 and sk.cc.ssthresh < 0x7FFFFFFF and sk.total_retrans == 0


def test_zero_window_probe_is_not_ect() -> None:
    """§6.1.5 / Linux tcp_xmit_probe_skb: a window probe carries no new data, so it
    goes Not-ECT; the data the reopened window lets out is ECT(0)."""
    sh, sd, peer, iss = _ecn_server()
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1001, iss, ACK, 0), 0.01)  # window closed
    sh.send(sd, b"w" * 3000, 0.01)
    assert sh.take_frames() == []
    t = sh.next_deadline()
    sh.advance(t)
    probes = sh.take_frames()
    assert probes and all(len(f) == 40 and ecn_of(f) == NOT_ECT for f in probes)
    sh.receive(build_tcp_ipv4(B, A, 40000, 80, 1001, iss, ACK, 65535), t + 0.01)
    data = [f for f in sh.take_frames() if len(f) > 40]
    assert data and all(ecn_of(f) == ECT0 for f in data)
