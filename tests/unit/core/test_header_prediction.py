"""Header prediction (``tcp_input.tcp_rcv_established_fast``) and burst sends
(``tcp_output._xmit_burst``) change nothing but speed.

Every scenario runs twice, in lockstep, on two fresh shards: once with both fast
paths on and once with ``tcp_input.HEADER_PREDICTION`` and
``tcp_output.XMIT_BURST`` off, so every segment goes through
``tcp_rcv_state_process`` and every data segment through ``tcp_transmit``.
After each step the two runs must have emitted the same frames (bytes) and
events, and must hold the same state: every ``TcpSock`` field (send and
receive queues by content, congestion control by its slots), the timer heap
entry by entry, and the shard's counters.  Spies on the two receive paths
make sure the fast path really ran where it should, and not where it must
not.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from core_helpers import A, B, make_shard, parse
from shardstack.core import DropReason, tcp_input, tcp_output
from shardstack.core.sock import TcpSock
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    build_tcp_ipv4,
    build_tcp_options,
    parse_tcp,
)
from shardstack.netio.simlink import LinkParams, SimLink

MASK = 0xFFFFFFFF
PEER_ISN = 5000


# -- the two modes and what they leave behind ---------------------------------------------

class Mode:
    """Switch both fast paths (module flags) for the duration of one call."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast

    def __enter__(self) -> None:
        self.saved = (tcp_input.HEADER_PREDICTION, tcp_output.XMIT_BURST)
        tcp_input.HEADER_PREDICTION = tcp_output.XMIT_BURST = self.fast

    def __exit__(self, *exc) -> None:
        tcp_input.HEADER_PREDICTION, tcp_output.XMIT_BURST = self.saved


def _cc_state(cc) -> dict | None:
    if cc is None:
        return None
    out = {"type": type(cc).__name__}
    for klass in type(cc).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if hasattr(cc, name):
                out[name] = getattr(cc, name)
    return out


def sock_state(sk: TcpSock) -> dict:
    out = {}
    for f in dataclasses.fields(TcpSock):
        v = getattr(sk, f.name)
        if f.name in ("sndq", "rcvq"):
            v = b"".join(bytes(c) for c in v)
        elif f.name == "accept_queue":
            v = [c.sd for c in v]
        elif f.name == "parent":
            v = None if v is None else v.sd
        elif f.name == "cc":
            v = _cc_state(v)
        elif f.name == "ofo":
            v = [[s, e, bytes(d)] for s, e, d in v]
        elif isinstance(v, list):
            v = list(v)
        out[f.name] = v
    return out


def shard_state(sh) -> dict:
    return {
        "socks": {sd: sock_state(sk) for sd, sk in sorted(sh.socks.items())},
        "stats": sh.stats.as_dict(),
        "heap": [(d, n, int(k), getattr(o, "sd", None)) for d, n, k, o in sh.timers.heap],
        "next_deadline": sh.next_deadline(),
    }


class Spy:
    """Counts which receive path handled each segment of an ESTABLISHED socket,
    in the run with the fast paths on."""

    def __init__(self, monkeypatch) -> None:
        self.fast = 0
        self.slow = 0
        real_fast = tcp_input.tcp_rcv_established_fast
        real_slow = tcp_input.tcp_rcv_established

        def fast(*args):
            done = real_fast(*args)
            self.fast += done
            return done

        def slow(*args):
            if tcp_input.HEADER_PREDICTION:
                self.slow += 1
            return real_slow(*args)

        # tcp_ipv4.tcp_v4_rcv calls both through the tcp_input module object.
        monkeypatch.setattr(tcp_input, "tcp_rcv_established_fast", fast)
        monkeypatch.setattr(tcp_input, "tcp_rcv_established", slow)

    def take(self) -> tuple[int, int]:
        out = (self.fast, self.slow)
        self.fast = self.slow = 0
        return out


# -- a scripted Linux-like peer (B:40000) against a shard's listener on A:80 ----------------

class Conn:
    """One accepted connection and the peer's side of it."""

    def __init__(self, ts: bool = True, sack: bool = True, wscale: int | None = 7,
                 tso_max: int = 0, tx_csum_offload: bool = False, rcvbuf: int = 1 << 18,
                 mss: int = 1460, accept: bool = True) -> None:
        self.sh = make_shard(tso_max=tso_max, tx_csum_offload=tx_csum_offload,
                             rcvbuf=rcvbuf, sndbuf=1 << 22)
        self.ts_on = ts
        self.now = 0.0
        self.tsval = 100
        lsd = self.sh.socket()
        self.sh.bind(lsd, 0, 80)
        self.sh.listen(lsd, 8)
        self.seq = PEER_ISN
        self.send(SYN, opts=build_tcp_options(mss=mss, wscale=wscale, sack_perm=sack,
                                              ts=(self.tsval, 0) if ts else None), ack=0)
        synack = parse(self.sh.take_frames()[0])
        self.seq += 1
        self.una = (synack.seq + 1) & MASK  # the shard's data starts here
        self.shard_max = self.una
        self.wscale = wscale or 0
        self.send(ACK)
        self.lsd = lsd
        self.sd = None
        if accept:
            self.accept()
        self.sh.take_frames()
        self.sh.take_events()

    def accept(self) -> None:
        self.sd, _ = self.sh.accept(self.lsd)

    def tsopt(self, tsval: int | None = None) -> bytes:
        if not self.ts_on:
            return b""
        return build_tcp_options(ts=(self.tsval if tsval is None else tsval, 1))

    def send(self, flags: int, payload: bytes = b"", *, seq: int | None = None,
             ack: int | None = None, window: int = 65535, opts: bytes | None = None,
             csum_ok: bool | None = None, corrupt: bool = False) -> None:
        pkt = build_tcp_ipv4(B, A, 40000, 80, self.seq if seq is None else seq,
                             self.una if ack is None else ack, flags, window,
                             self.tsopt() if opts is None else opts, payload)
        if corrupt:
            pkt = pkt[:-1] + bytes([pkt[-1] ^ 0x40])
        self.sh.receive(pkt, self.now, csum_ok)

    def data(self, payload: bytes, **kw) -> None:
        self.send(ACK | PSH, payload, **kw)
        if kw.get("seq") is None:
            self.seq = (self.seq + len(payload)) & MASK

    def out(self) -> list[bytes]:
        frames = self.sh.take_frames()
        for f in frames:
            _, t = parse_ipv4(f)
            seg = parse_tcp(t)
            end = (seg.seq + len(seg.payload) + (1 if seg.flags & FIN else 0)) & MASK
            if 0 < ((end - self.shard_max) & MASK) < 1 << 31:
                self.shard_max = end
        return frames

    def in_flight(self) -> int:
        return (self.shard_max - self.una) & MASK


def lockstep(script, n_steps: int, seed: int = 0, **conn_kw) -> tuple[Conn, Conn]:
    """Run ``script(conn, step, rnd)`` on a fast and a slow connection in
    lockstep (each with its own ``random.Random(seed)``); after every step
    both must agree."""
    with Mode(True):
        fast = Conn(**conn_kw)
    with Mode(False):
        slow = Conn(**conn_kw)
    runs = ((fast, True, random.Random(seed)), (slow, False, random.Random(seed)))
    for step in range(n_steps):
        outs = []
        for conn, on, rnd in runs:
            with Mode(on):
                script(conn, step, rnd)
                conn.sh.advance(conn.now)
                outs.append((conn.out(), conn.sh.take_events()))
        if outs[0] != outs[1]:
            pytest.fail(f"step {step}: frames or events differ: "
                        f"{[parse(f) for f in outs[0][0]]} {outs[0][1]} vs "
                        f"{[parse(f) for f in outs[1][0]]} {outs[1][1]}")
        sf, ss = shard_state(fast.sh), shard_state(slow.sh)
        if sf != ss:
            pytest.fail(f"step {step}: " + _diff(sf, ss))
    return fast, slow


def _diff(a: dict, b: dict) -> str:
    if a["socks"].keys() != b["socks"].keys():
        return f"sockets {list(a['socks'])} vs {list(b['socks'])}"
    for sd in a["socks"]:
        for k, v in a["socks"][sd].items():
            if b["socks"][sd][k] != v:
                return f"sock {sd} field {k}: {v!r:.300} vs {b['socks'][sd][k]!r:.300}"
    for k in ("stats", "heap", "next_deadline"):
        if a[k] != b[k]:
            return f"{k}: {a[k]!r} vs {b[k]!r}"
    return "?"


# -- scripted exchanges ---------------------------------------------------------------------

def test_bulk_receive_in_order_data_takes_the_fast_path(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.001
        c.tsval += 1
        c.data(rnd.randbytes(rnd.choice([1448, 1448, 1000, 1, 7000])))
        if step % 5 == 4:
            c.sh.recv(c.sd, 1 << 20)  # reading opens the window: a window update may go out
        if step % 9 == 8:
            c.now += 0.05  # the delayed ACK fires

    lockstep(script, 60)
    assert spy.take() == (60, 0)


def test_data_before_accept_is_reported_at_accept(monkeypatch):
    """A child still in the accept queue gets its data on the fast path, but
    no Readable until accept() hands it out (and then exactly one)."""
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.001
        c.tsval += 1
        if step < 3:
            c.data(rnd.randbytes(1448))
        elif step == 3:
            c.accept()
        else:
            c.data(rnd.randbytes(100))

    fast, _ = lockstep(script, 5, accept=False)
    assert spy.take() == (4, 0)
    assert fast.sh.recv(fast.sd, 1 << 20) is not None


def test_pure_acks_advance_snd_una_while_data_is_queued(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.002
        if step == 0:
            assert c.sh.send(c.sd, rnd.randbytes(400_000), c.now) == 400_000
            return
        c.tsval += 1
        acked = min(c.in_flight(), rnd.choice([1448, 2896, 4344, 100]))
        c.una = (c.una + acked) & MASK
        # Every third ACK also moves the window (a window update riding on a new ACK).
        c.send(ACK, window=65535 - (step % 3) * 1000)

    lockstep(script, 80)
    assert spy.take() == (79, 0)


def test_window_update_alone_and_duplicate_acks_take_the_slow_path(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.01
        c.tsval += 1
        if step == 0:
            c.sh.send(c.sd, bytes(50_000), c.now)
        elif step == 1:
            c.una = (c.una + 2896) & MASK
            c.send(ACK)  # new data acked: fast
        elif step == 2:
            c.send(ACK, window=20000)  # same ACK, new window: a pure window update
        elif step in (3, 4, 5):
            c.send(ACK, window=20000)  # duplicate ACKs: tcp_ack's duplicate logic
        elif step == 6:
            c.una = (c.una + 1448) & MASK
            c.send(ACK, window=20000)

    lockstep(script, 7)
    assert spy.take() == (2, 4)  # steps 1 and 6 predicted; 2-5 not


def test_paws_rejects_an_old_timestamp_through_the_slow_path(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.01
        if step == 0:
            c.tsval += 10
            c.data(b"a" * 100)  # TS.Recent = tsval
        elif step == 1:
            # Older than TS.Recent (RFC 7323 §5.3): dropped and ACKed by the slow path.
            c.data(b"b" * 100, seq=c.seq, opts=c.tsopt(c.tsval - 5))
        elif step == 2:
            c.tsval += 1
            c.data(b"c" * 100)

    lockstep(script, 3)
    assert spy.take() == (2, 1)


def test_data_with_psh_and_a_new_ack_while_we_send(monkeypatch):
    """Both directions at once: data segments that also acknowledge our data."""
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.003
        c.tsval += 1
        if step % 4 == 0:
            c.sh.send(c.sd, rnd.randbytes(rnd.choice([100, 3000, 20000])), c.now)
        if c.in_flight():
            c.una = (c.una + min(c.in_flight(), rnd.choice([536, 1448, 5000]))) & MASK
        c.data(rnd.randbytes(rnd.choice([10, 1448, 3000])))
        c.sh.recv(c.sd, rnd.choice([10, 5000, 1 << 20]))

    lockstep(script, 50)
    assert spy.take() == (50, 0)


@pytest.mark.parametrize("flags", [ACK | FIN, ACK | URG, ACK | ECE, ACK | CWR, ACK | PSH | RST,
                                   PSH, ACK | SYN])
def test_segments_that_must_not_take_the_fast_path(monkeypatch, flags):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.01
        c.tsval += 1
        if step == 0:
            c.data(b"x" * 10)
        else:
            c.send(flags, b"y" * 10)

    lockstep(script, 2)
    fast, slow = spy.take()
    assert fast == 1  # only the plain data segment


def test_out_of_order_data_disables_prediction_until_the_hole_is_filled(monkeypatch):
    spy = Spy(monkeypatch)
    base = PEER_ISN + 1

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.01
        c.tsval += 1
        if step == 0:
            c.data(b"a" * 1000, seq=base + 1000)  # ahead of a hole
        elif step == 1:
            c.data(b"b" * 1000, seq=base + 2000)  # still out of order
        elif step == 2:
            c.data(b"c" * 1000, seq=base)  # fills the hole
            c.seq = base + 3000
        else:
            c.data(b"d" * 500)  # in order again

    lockstep(script, 5)
    fast, slow = spy.take()
    assert fast == 2  # steps 3 and 4


def test_zero_window_memory_limit_and_bad_checksums(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.01
        c.tsval += 1
        if step in (0, 1):
            c.data(b"z" * 28960)  # fits the window of the 64 KiB buffer
        elif step == 2:
            c.data(b"m" * 28960, seq=c.seq)  # past the memory limit: dropped (PROTO_MEM)
        elif step == 3:
            c.data(b"w" * 7616)  # exactly what is left: the window closes
        elif step == 4:
            c.data(b"0" * 100, seq=c.seq)  # zero window: dropped and ACKed
        elif step == 5:
            c.sh.recv(c.sd, 1 << 20)  # the window opens again
        elif step == 6:
            c.data(b"q" * 100, seq=c.seq, corrupt=True)  # predicted, but the checksum fails
        elif step == 7:
            c.data(b"k" * 1000)
        elif step == 8:
            c.sh.send(c.sd, b"s" * 3000, c.now)
        elif step == 9:
            c.send(ACK, ack=c.shard_max, corrupt=True)  # a pure ACK, corrupted
        elif step == 10:
            c.una = c.shard_max
            c.send(ACK)

    fast, _ = lockstep(script, 11, rcvbuf=65536)
    # Steps 0, 1, 3, 7, 10 predicted; 2 and 4 not; 6 and 9 fail the checksum,
    # which the fast path leaves to tcp_v4_rcv's general path: counted, dropped.
    assert spy.take() == (5, 2)
    assert fast.sh.stats.drops[DropReason.TCP_CSUM] == 2
    assert fast.sh.stats.drops[DropReason.PROTO_MEM] == 1
    assert fast.sh.stats.drops[DropReason.TCP_ZEROWINDOW] == 1


def test_without_timestamps_and_without_sack(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.002
        if step == 0:
            c.sh.send(c.sd, rnd.randbytes(100_000), c.now)
        if c.in_flight() and step % 2:
            c.una = (c.una + min(c.in_flight(), 2920)) & MASK
            c.send(ACK)
        else:
            c.data(rnd.randbytes(rnd.choice([100, 1460])))

    lockstep(script, 40, ts=False, sack=False, wscale=None)
    fast, slow = spy.take()
    assert fast > 30


def test_gro_super_frames_and_tso_bursts(monkeypatch):
    spy = Spy(monkeypatch)

    def script(c: Conn, step: int, rnd: random.Random) -> None:
        c.now += 0.001
        c.tsval += 1
        if step == 0:
            c.sh.send(c.sd, rnd.randbytes(3_000_000), c.now)
            return
        c.una = (c.una + min(c.in_flight(), 64 * 1448)) & MASK
        c.send(ACK, window=65535)
        c.data(rnd.randbytes(1448 * rnd.choice([1, 10, 45])), csum_ok=True)
        c.sh.recv(c.sd, 1 << 22)

    lockstep(script, 30, tso_max=65000, tx_csum_offload=True, rcvbuf=4 << 20)
    fast, slow = spy.take()
    assert fast == 58


# -- random scripts --------------------------------------------------------------------------

def _random_script():
    def script(c: Conn, step: int, rnd: random.Random) -> None:
        r = rnd.random()
        c.now += rnd.choice([0.0, 0.0005, 0.003, 0.05, 0.3])
        c.tsval += rnd.choice([0, 1, 1, 7])
        flight = c.in_flight()
        if r < 0.12:
            c.sh.send(c.sd, rnd.randbytes(rnd.choice([1, 500, 5000, 60000])), c.now)
        elif r < 0.2:
            c.sh.recv(c.sd, rnd.choice([1, 3000, 1 << 20]))
        elif r < 0.45:  # pure ACK, sometimes a duplicate, sometimes a new window
            if flight:
                c.una = (c.una + rnd.randint(0, min(flight, 6000))) & MASK
            c.send(ACK, window=rnd.choice([65535, 65535, 30000, 0, 100]))
        elif r < 0.7:  # in-order data, maybe acking
            if flight and rnd.random() < 0.5:
                c.una = (c.una + rnd.randint(1, min(flight, 6000))) & MASK
            c.data(rnd.randbytes(rnd.choice([1, 100, 1448, 2896])),
                   window=rnd.choice([65535, 65535, 30000]))
        elif r < 0.76:  # out of order
            c.data(rnd.randbytes(500), seq=(c.seq + rnd.choice([500, 3000])) & MASK)
        elif r < 0.8:  # old timestamp
            c.data(rnd.randbytes(100), seq=c.seq,
                   opts=c.tsopt((c.tsval - rnd.randint(1, 50)) & MASK))
        elif r < 0.84:  # an old duplicate, retransmitted
            c.send(ACK | PSH, b"r" * 300, seq=(c.seq - 300) & MASK)
        elif r < 0.88 and flight:  # SACK blocks above the cumulative ACK
            lo = (c.una + 1448) & MASK
            hi = (lo + min(flight - 1448, 2896)) & MASK if flight > 1448 else None
            if hi is not None:
                c.send(ACK, opts=build_tcp_options(ts=(c.tsval, 1) if c.ts_on else None,
                                                   sack_blocks=((lo, hi),)))
        elif r < 0.9:
            c.send(ACK, ack=(c.una + 100_000_000) & MASK)  # acks unsent data
        elif r < 0.93:
            c.data(rnd.randbytes(200), corrupt=True)
            c.seq = (c.seq - 200) & MASK
        # else: time only

    return script


@pytest.mark.parametrize("seed,kw", [
    (1, {}), (2, {}), (3, {"ts": False}), (4, {"sack": False}), (5, {"wscale": None}),
    (6, {"tso_max": 65000, "tx_csum_offload": True}), (7, {"rcvbuf": 8192}),
])
def test_random_scripts_agree(seed, kw, monkeypatch):
    spy = Spy(monkeypatch)
    lockstep(_random_script(), 250, seed, **kw)
    fast, slow = spy.take()
    assert fast >= 10 and slow >= 10  # both paths were exercised


# -- whole transfers over an impaired link --------------------------------------------------

def _transfer(fast: bool, params: LinkParams, seed: int, **kw):
    rnd = random.Random(seed)
    up, down = rnd.randbytes(300_000), rnd.randbytes(300_000)
    wire = []
    with Mode(fast):
        a = make_shard(**kw)
        b = make_shard(B, **kw)
        link = SimLink(a, b, seed=seed, params=params,
                       tap=lambda now, d, pkt: wire.append((now, d, bytes(pkt))))
        lsd = b.socket()
        b.bind(lsd, 0, 80)
        b.listen(lsd, 8)
        c = a.socket()
        a.connect(c, B, 80, 0.0)
        box = []
        assert link.run_until(lambda: box.append(b.accept(lsd)) or box[-1] is not None, 30.0)
        s = box[-1][0]
        got = {c: bytearray(), s: bytearray()}
        sent = {c: 0, s: 0}

        def step() -> bool:
            for sh, sd, data in ((a, c, up), (b, s, down)):
                if sent[sd] < len(data):
                    sent[sd] += sh.send(sd, memoryview(data)[sent[sd]:sent[sd] + 65536],
                                        link.now)
            for sh, sd in ((a, c), (b, s)):
                while chunk := sh.recv(sd, 1 << 20):
                    got[sd].extend(chunk)
            return len(got[s]) == len(up) and len(got[c]) == len(down)

        for _ in range(100_000):
            if step() or link.now > 300:
                break
            link.run_for(0.002)
        assert bytes(got[s]) == up and bytes(got[c]) == down
        return wire, shard_state(a), shard_state(b)


@pytest.mark.parametrize("seed,params,kw", [
    (1, LinkParams(delay=0.005, loss=0.02), {}),
    (2, LinkParams(delay=0.003, jitter=0.002, reorder=0.05, reorder_delay=0.004, dup=0.01), {}),
    (3, LinkParams(delay=0.004, loss=0.02), {"sack": False}),
    (4, LinkParams(delay=0.004, loss=0.01, bandwidth=20e6, queue_bytes=40_000),
     {"tso_max": 65000}),
])
def test_impaired_transfers_are_identical_on_the_wire(seed, params, kw, monkeypatch):
    spy = Spy(monkeypatch)
    fast = _transfer(True, params, seed, **kw)
    hits = spy.take()
    assert hits[0] > 40 and hits[1] > 10  # both paths were exercised
    slow = _transfer(False, params, seed, **kw)
    assert len(fast[0]) == len(slow[0])
    for i, (x, y) in enumerate(zip(fast[0], slow[0], strict=True)):
        assert x == y, f"packet {i} differs: {parse(x[2])} vs {parse(y[2])}"
    assert fast[1:] == slow[1:]
