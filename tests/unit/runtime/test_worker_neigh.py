"""A worker's side of neighbour resolution (L2Tx): it mirrors netio's
neighbour table from announcements and never waits on netio.

- Frames for a next hop without a usable MAC wait on it (Linux
  `__neigh_event_send`: at most ARP_QUEUE_LEN, oldest dropped first), one
  NEIGH_RESOLVE goes to netio, fire and forget, and they leave in order as
  soon as netio announces the MAC (`neigh_update`), or are dropped when it
  fails (after ARP_PROBES re-asks, or netio's FAILED).
- Only netio's announcements (ARP) set a MAC: a received frame, even one
  that reaches the shard, teaches nothing.
- STALE entries are used and their first use reported; in DELAY a worker
  confirms the neighbour when one of its connections through it made
  forward progress (`neigh_confirm`), never otherwise.

netio is played by a recording channel (or a zmq PULL nobody answers); the
clock is fake; no root."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from shardstack.core.dropreason import DropReason
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, SYN, build_tcp_ipv4, build_tcp_options, parse_tcp
from shardstack.netio import process as netio_process
from shardstack.netio import rss
from shardstack.netio.device import RX_CSUM_VALID, LoopbackDevice
from shardstack.netio.neigh_mirror import (
    ARP_PROBES,
    ARP_QUEUE_LEN,
    ARP_RETRANS,
    CONFIRM_LEAD,
    DELAY_FIRST_PROBE_TIME,
    NEIGH_MIRROR_TTL,
    L2Tx,
    NeighChannel,
)
from shardstack.netio.neighbour import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_NONE,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
)
from shardstack.netio.process import (
    NEIGH_CONFIRM,
    NEIGH_RESOLVE,
    encode_neighbour,
    neigh_endpoint,
    worker_endpoint,
)

from shardstack import worker as wmod
from shardstack.config import ServeConfig, parse_cidr
from shardstack.worker import Worker

US, PEER, GW, FAR, NEW = 0xC6120002, 0xC6120001, 0xC61200FE, 0xC6130009, 0xC6120005
OUR_MAC, PEER_MAC, GW_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01", b"\x02" * 6
EVIL_MAC, NEW_MAC = b"\x02\xee\xee\xee\xee\xee", b"\x02\x00\x00\x00\x00\xaa"
ETH_PEER = PEER_MAC + OUR_MAC + b"\x08\x00"


class FakeChan:
    """netio's neighbour PULL, as the worker sees it: a non-blocking send."""

    def __init__(self) -> None:
        self.msgs: list[tuple[int, int]] = []

    def send(self, msg: bytes) -> bool:
        self.msgs.append((msg[0], int.from_bytes(msg[1:5], "big")))
        return True

    def close(self) -> None:
        pass

    def resolves(self) -> list[int]:
        return [ip for op, ip in self.msgs if op == NEIGH_RESOLVE]

    def confirms(self) -> list[int]:
        return [ip for op, ip in self.msgs if op == NEIGH_CONFIRM]


def _no_blocking_call(*_a, **_k):
    raise AssertionError("a worker called netio's blocking REQ/REP socket")


@pytest.fixture
def env(monkeypatch, tmp_path):
    clock = [100.0]
    monkeypatch.setattr(wmod, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(netio_process, "control_call", _no_blocking_call)
    inner = LoopbackDevice(l2=True, record=True)
    chan = FakeChan()
    tx = L2Tx(inner, OUR_MAC, parse_cidr("198.18.0.2/24").network, GW, chan,
              clock=lambda: clock[0])
    return tx, inner, chan, clock


def _pkt(seq: int, dst: int = PEER, payload: bytes = b"") -> bytes:
    return build_tcp_ipv4(US, dst, 40000, 80, seq, 0, SYN if not payload else ACK, 64240,
                          payload=payload)


# -- misses wait, without blocking ------------------------------------------------------------


def test_first_frames_wait_for_netios_announcement(env):
    tx, inner, chan, _clock = env
    frames = [_pkt(i) for i in range(ARP_QUEUE_LEN + 1)]
    # accepted (queued), not reported as dropped; netio told once, not per frame
    assert tx.send_batch(frames) == len(frames)
    assert inner.sent == [] and chan.msgs == [(NEIGH_RESOLVE, PEER)]
    assert tx.stats.unres_discards == 1  # the oldest made room for the newest
    assert tx.next_deadline() == pytest.approx(100.0 + ARP_RETRANS)
    tx.neigh_update([(PEER, PEER_MAC, NUD_REACHABLE)])
    assert inner.sent == [ETH_PEER + f for f in frames[1:]]
    assert tx.stats.flushed == ARP_QUEUE_LEN and not tx.unres
    assert tx.next_deadline() == pytest.approx(100.0 + NEIGH_MIRROR_TTL)  # only the mirror's TTL
    assert tx.send_batch([_pkt(9)]) == 1 and inner.sent[-1][:6] == PEER_MAC
    assert chan.msgs == [(NEIGH_RESOLVE, PEER)]  # a REACHABLE entry costs no message


def test_off_link_frames_wait_on_the_gateway_and_gso_keeps_its_size(env):
    tx, inner, chan, _clock = env
    big = _pkt(1, FAR, payload=bytes(4000))
    assert tx.send_gso(big, 1448) is True
    assert tx.send_batch([_pkt(2, FAR)]) == 1
    assert chan.resolves() == [GW] and inner.gso_sent == [] and inner.sent == []
    tx.neigh_update([(GW, GW_MAC, NUD_REACHABLE)])
    eth = GW_MAC + OUR_MAC + b"\x08\x00"
    assert inner.gso_sent == [(eth + big, 1448)]
    assert inner.sent == [eth + _pkt(2, FAR)]


def test_unanswered_neighbour_is_reasked_then_fails(env):
    tx, inner, chan, clock = env
    tx.send_batch([_pkt(1), _pkt(2)])
    for n in range(2, ARP_PROBES + 1):
        clock[0] = tx.next_deadline()
        tx.poll(clock[0])
        assert chan.resolves() == [PEER] * n  # one re-ask per retrans interval
    assert tx.unres and tx.stats.failed == 0
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert not tx.unres and tx.stats.failed == 2 and inner.sent == []
    assert tx.next_deadline() is None
    # the next frame starts a fresh resolution (Linux: FAILED -> INCOMPLETE)
    tx.send_batch([_pkt(3)])
    assert chan.resolves() == [PEER] * (ARP_PROBES + 1) and tx.unres


def test_netios_failed_drops_the_queue_and_the_mac(env):
    tx, inner, chan, _clock = env
    tx.neigh_update([(GW, GW_MAC, NUD_REACHABLE)])
    tx.send_batch([_pkt(1)])
    tx.neigh_update([(PEER, bytes(6), NUD_FAILED), (GW, bytes(6), NUD_NONE)])
    assert not tx.unres and tx.stats.failed == 1 and inner.sent == []
    assert tx.neigh == {} and tx.stale == {}
    tx.send_batch([_pkt(2, FAR)])  # the gateway was forgotten: asked again
    assert chan.resolves() == [PEER, GW] and inner.sent == []


# -- only ARP (netio) sets a MAC ------------------------------------------------------------


def test_announced_mac_change_redirects_tx(env):
    """netio accepted an ARP update with a new MAC (a reply after locktime,
    or a request for us): the next frame goes to the new MAC."""
    tx, inner, _chan, _clock = env
    tx.neigh_update([(PEER, PEER_MAC, NUD_REACHABLE)])
    tx.send_batch([_pkt(1)])
    tx.neigh_update([(PEER, NEW_MAC, NUD_REACHABLE)])
    tx.send_batch([_pkt(2)])
    assert [f[:6] for f in inner.sent] == [PEER_MAC, NEW_MAC]
    assert tx.stats.mac_changes == 1


# -- STALE, DELAY, confirmation ---------------------------------------------------------------


def test_stale_entry_is_used_and_its_first_use_reported(env):
    tx, inner, chan, _clock = env
    tx.neigh_update([(PEER, PEER_MAC, NUD_STALE)])
    assert tx.send_batch([_pkt(1), _pkt(2)]) == 2
    tx.send_batch([_pkt(3)])
    assert [f[:6] for f in inner.sent] == [PEER_MAC] * 3  # no waiting in STALE
    assert chan.msgs == [(NEIGH_RESOLVE, PEER)] and tx.stats.uses == 1
    # netio arms DELAY and says so; PROBE keeps the MAC in use too
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    tx.neigh_update([(PEER, PEER_MAC, NUD_PROBE)])
    tx.send_batch([_pkt(4)])
    assert inner.sent[-1][:6] == PEER_MAC and chan.msgs == [(NEIGH_RESOLVE, PEER)]


def test_stale_announcement_sends_what_waited_and_reports_the_use(env):
    """A peer's who-has for us made a STALE entry while our frames waited."""
    tx, inner, chan, _clock = env
    tx.send_batch([_pkt(1)])
    tx.neigh_update([(PEER, PEER_MAC, NUD_STALE)])
    assert inner.sent == [ETH_PEER + _pkt(1)]
    assert chan.resolves() == [PEER, PEER]  # the miss, then the use


class FakeSock:
    def __init__(self, snd_una: int, iss: int) -> None:
        self.snd_una, self.iss = snd_una, iss


class FakeShard:
    """What L2Tx reads of the engine: the established hash (4-tuple -> sock)."""

    def __init__(self) -> None:
        self.h = type("H", (), {})()
        self.h.ehash = {}

    def add(self, raddr: int, rport: int, sk) -> None:
        self.h.ehash[(US, 40000, raddr, rport)] = sk


def test_delay_is_confirmed_only_after_forward_progress(env):
    tx, _inner, chan, clock = env
    shard = FakeShard()
    tx.attach_shard(shard)
    sk = FakeSock(snd_una=5000, iss=1000)
    shard.add(PEER, 80, sk)
    shard.add(FAR, 443, FakeSock(snd_una=7000, iss=1))  # another hop's traffic
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    check = 100.0 + DELAY_FIRST_PROBE_TIME - CONFIRM_LEAD
    assert tx.next_deadline() == pytest.approx(check)
    shard.h.ehash[(US, 40000, FAR, 443)].snd_una += 100  # not through PEER
    clock[0] = check
    tx.poll(check)
    assert chan.confirms() == []  # no progress through PEER: netio will probe
    # next round: the peer acks new data in the window
    clock[0] = 140.0
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    sk.snd_una += 1448
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert chan.confirms() == [PEER] and tx.stats.confirms == 1


def test_a_connection_born_established_in_delay_confirms(env):
    """A passive open completed in the DELAY window (the peer acked our
    SYN-ACK): its sock appears with snd_una past its ISS. A connect still in
    SYN-SENT (snd_una == iss) does not count."""
    tx, _inner, chan, clock = env
    shard = FakeShard()
    tx.attach_shard(shard)
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    shard.add(PEER, 5555, FakeSock(snd_una=301, iss=301))  # SYN-SENT
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert chan.confirms() == []
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    shard.add(PEER, 6666, FakeSock(snd_una=901, iss=900))  # ESTABLISHED child
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert chan.confirms() == [PEER]


def test_reachable_again_cancels_the_check(env):
    tx, _inner, chan, clock = env
    shard = FakeShard()
    tx.attach_shard(shard)
    sk = FakeSock(snd_una=10, iss=1)
    shard.add(PEER, 80, sk)
    tx.neigh_update([(PEER, PEER_MAC, NUD_DELAY)])
    tx.neigh_update([(PEER, PEER_MAC, NUD_REACHABLE)])  # another worker confirmed
    sk.snd_una += 1
    clock[0] = 200.0
    tx.poll(clock[0])
    assert chan.confirms() == [] and not tx.checks


def test_mirror_entries_netio_stopped_talking_about_are_asked_again(env):
    """netio restarted and lost its table: after NEIGH_MIRROR_TTL without a
    word, a REACHABLE mirror entry counts as STALE: still used, but its use
    reported, so netio resolves it again."""
    tx, inner, chan, clock = env
    tx.neigh_update([(PEER, PEER_MAC, NUD_REACHABLE)])
    clock[0] = 100.0 + NEIGH_MIRROR_TTL
    tx.poll(clock[0])
    assert PEER in tx.stale and tx.next_deadline() is None
    tx.send_batch([_pkt(1)])
    assert inner.sent == [ETH_PEER + _pkt(1)] and chan.resolves() == [PEER]


# -- a whole worker -------------------------------------------------------------------------------


def _cfg(run_dir: str, **kw) -> ServeConfig:
    return ServeConfig(workers=1, device="packet", ifname="v0", addr=parse_cidr("198.18.0.2/24"),
                       run_dir=run_dir, secret=b"k" * 32, **kw).validate()


def _syn_from(mac: bytes, src: int, sport: int, dport: int) -> bytes:
    return OUR_MAC + mac + b"\x08\x00" + build_tcp_ipv4(
        src, US, sport, dport, 1000, 0, SYN, 64240, options=build_tcp_options(mss=1460))


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _tcp_out(inner: LoopbackDevice):
    """(dst MAC, IPv4 header, TCP segment) of every frame the worker wrote."""
    out = []
    for f in inner.sent:
        hdr, payload = parse_ipv4(memoryview(f)[14:])
        out.append((bytes(f[:6]), hdr, parse_tcp(payload)))
    return out


@pytest.mark.parametrize("rx", ["netio", "direct"])
def test_worker_forged_frame_from_a_new_mac_does_not_redirect_tx(env, rx, tmp_path):
    """netio announced PEER at PEER_MAC. A SYN claiming to be from PEER but
    sent from EVIL_MAC reaches the worker (through netio, or straight from
    its own packet socket) and is answered: the SYN-ACK still goes to
    PEER_MAC. A SYN from an address netio never resolved gets its SYN-ACK
    queued on resolution, never sent to the MAC the frame came from."""
    import socket

    tx, inner, chan, clock = env
    rx_sock = feed = None
    if rx == "direct":  # our fanout member, played by a datagram socketpair
        rx_sock, feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def main():
        loop = asyncio.get_running_loop()
        cfg = _cfg(str(tmp_path), echo_ports=[7], offload=False)
        w = Worker(cfg, 0, rss.make_reta(1), tx, loop, rx_sock)
        await w.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(worker_endpoint(str(tmp_path), 0))
        try:
            push.send_multipart([b"", encode_neighbour(PEER, PEER_MAC, NUD_REACHABLE)])
            await _until(lambda: PEER in tx.neigh)
            forged = [_syn_from(EVIL_MAC, PEER, 41000, 7), _syn_from(EVIL_MAC, NEW, 41001, 7)]
            if feed is None:
                push.send_multipart([bytes([RX_CSUM_VALID] * 2), *forged])
            else:
                for f in forged:
                    feed.send(f)
            await _until(lambda: inner.sent and NEW in tx.unres)
            [(mac, hdr, seg)] = _tcp_out(inner)
            assert hdr.dst == PEER and seg.flags & (SYN | ACK) == SYN | ACK
            assert mac == PEER_MAC
            assert tx.neigh == {PEER: ETH_PEER} and not tx.stale
            assert len(tx.unres[NEW].queue) == 1 and chan.resolves() == [NEW]
            # only netio's announcement (ARP) resolves NEW, to the MAC ARP gave
            push.send_multipart([b"", encode_neighbour(NEW, NEW_MAC, NUD_REACHABLE)])
            await _until(lambda: len(inner.sent) == 2)
            assert _tcp_out(inner)[1][0] == NEW_MAC
        finally:
            push.close(0)
            w.close()

    try:
        asyncio.run(main())
    finally:
        for s in (rx_sock, feed):
            if s is not None:
                s.close()


def test_worker_miss_does_not_block_other_flows(env, tmp_path):
    """connect() to a peer nobody resolved: the SYN waits on the neighbour and
    NEIGH_RESOLVE goes to netio's endpoint, where nothing answers. Meanwhile
    the worker's loop serves another flow (a SYN from a resolved peer gets its
    SYN-ACK at once), and the queued SYN leaves when the announcement comes."""
    _tx, _inner, _chan, clock = env
    inner = LoopbackDevice(l2=True, record=True)
    run_dir = str(tmp_path / "w")
    import os

    os.makedirs(run_dir)
    cfg = _cfg(run_dir, echo_ports=[7])
    # the real channel: a zmq PUSH, NOBLOCK
    tx = L2Tx(inner, OUR_MAC, cfg.addr.network, cfg.gateway, NeighChannel(run_dir),
              clock=lambda: clock[0])
    ctx = zmq.Context.instance()
    netio_pull = ctx.socket(zmq.PULL)  # netio's end, silent
    netio_pull.setsockopt(zmq.LINGER, 0)
    netio_pull.bind(neigh_endpoint(run_dir))

    async def main():
        loop = asyncio.get_running_loop()
        w = Worker(cfg, 0, rss.make_reta(1), tx, loop)
        await w.start()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(worker_endpoint(run_dir, 0))
        try:
            push.send_multipart([b"", encode_neighbour(PEER, PEER_MAC, NUD_REACHABLE)])
            await _until(lambda: PEER in tx.neigh)
            sd = w.shard.socket()
            w.shard.connect(sd, NEW, 80, clock[0])
            w.flush()
            assert inner.sent == [] and NEW in tx.unres  # queued, and we are back
            assert netio_pull.poll(2000)
            assert netio_pull.recv() == bytes((NEIGH_RESOLVE,)) + NEW.to_bytes(4, "big")
            # netio has not answered; another flow is served meanwhile
            push.send_multipart([bytes([RX_CSUM_VALID]), _syn_from(PEER_MAC, PEER, 42000, 7)])
            await _until(lambda: len(inner.sent) == 1)
            [(mac, hdr, seg)] = _tcp_out(inner)
            assert (mac, hdr.dst, seg.dst_port) == (PEER_MAC, PEER, 42000)
            assert NEW in tx.unres and w.counters.drops[DropReason.DEV_TX] == 0
            # netio's answer arrives: the SYN that waited goes
            push.send_multipart([b"", encode_neighbour(NEW, NEW_MAC, NUD_REACHABLE)])
            await _until(lambda: len(inner.sent) == 2)
            mac, hdr, syn = _tcp_out(inner)[1]
            assert (mac, hdr.dst, syn.flags) == (NEW_MAC, NEW, SYN)
            st = w._stats()["counters"]["neigh"]
            assert st["flushed"] == 1 and st["incomplete"] == 0 and st["msg_dropped"] == 0
            # later netio puts NEW in DELAY; the handshake completes inside
            # it (forward progress on the real engine's connection): confirmed
            push.send_multipart([b"", encode_neighbour(NEW, NEW_MAC, NUD_DELAY)])
            await _until(lambda: NEW in tx.checks)
            synack = build_tcp_ipv4(NEW, US, 80, syn.src_port, 7000, syn.seq + 1, SYN | ACK,
                                    64240, options=build_tcp_options(mss=1460))
            push.send_multipart([bytes([RX_CSUM_VALID]), OUR_MAC + NEW_MAC + b"\x08\x00" + synack])
            await _until(lambda: len(inner.sent) == 3)  # our ACK
            clock[0] += DELAY_FIRST_PROBE_TIME - CONFIRM_LEAD
            tx.poll(clock[0])
            assert netio_pull.poll(2000)
            assert netio_pull.recv() == bytes((NEIGH_CONFIRM,)) + NEW.to_bytes(4, "big")
        finally:
            push.close(0)
            w.close()

    try:
        asyncio.run(main())
    finally:
        tx.chan.close()
        netio_pull.close(0)


def test_ipv6_frames_wait_on_their_destination_and_go_out_as_0x86dd(env):
    """IPv6 (issue 14): the next hop is the destination (no IPv6 gateway),
    netio is asked with the 16-byte address (a 17-byte message), and the
    frame leaves with ethertype 0x86DD once netio's NDP resolved it."""
    from shardstack.core.wire.tcp import build_tcp_ipv6

    tx, inner, _chan, _clock = env
    sent: list[bytes] = []
    tx.chan = type("C", (), {"send": lambda self, m: sent.append(m) or True,
                             "close": lambda self: None})()
    us6, peer6 = 0x20010DB8 << 96 | 2, 0x20010DB8 << 96 | 1
    pkt = build_tcp_ipv6(us6, peer6, 40000, 80, 1, 0, SYN, 64240)
    assert tx.send_batch([pkt]) == 1 and inner.sent == []
    assert sent == [bytes((NEIGH_RESOLVE,)) + peer6.to_bytes(16, "big")]
    tx.neigh_update([(peer6, PEER_MAC, NUD_REACHABLE)])
    assert inner.sent == [PEER_MAC + OUR_MAC + b"\x86\xdd" + pkt]
    tx.send_batch([pkt])
    assert inner.sent[-1][12:14] == b"\x86\xdd" and len(sent) == 1
