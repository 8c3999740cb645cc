"""netio keeps the neighbour table and talks about it with the workers: a
worker's NEIGH_RESOLVE (fire and forget, on netio's neighbour PULL) starts
resolution, and from then on every change of that entry (MAC or NUD state)
is announced to every worker as `[b"", ip+mac+state...]` on the worker
channel, where frames never carry an empty flags part. Time is a fake
clock; no root."""

from __future__ import annotations

import pytest
import zmq
from shardstack.core.wire.arp import ARPOP_REPLY, ARPOP_REQUEST, build_arp, parse_arp
from shardstack.core.wire.ethernet import BROADCAST_MAC, ETH_P_ARP, build_ethernet
from shardstack.netio.device import LoopbackDevice
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.neighbour import (
    NUD_DELAY,
    NUD_FAILED,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
)
from shardstack.netio.process import (
    NEIGH_CONFIRM,
    NEIGH_RESOLVE,
    NetioProcess,
    decode_batch,
    decode_neigh_entries,
    decode_neighbours,
    encode_neigh_request,
    encode_neighbour,
    neigh_endpoint,
    worker_endpoint,
)

US_I, PEER_I, OTHER_I = 0xC6120002, 0xC6120001, 0xC6120007
OUR_MAC, PEER_MAC, OTHER_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01", b"\x02" * 6
NEW_MAC = b"\x02\x00\x00\x00\x00\xaa"


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


class Net:
    """NetioProcess on a loopback pair (`wire` is the far end), two worker
    PULLs, one worker PUSH to netio's neighbour endpoint, a fake clock."""

    def __init__(self, tmp_path, ctx) -> None:
        self.now = 100.0
        self.dev, self.wire = LoopbackDevice.pair(l2=True, record=True)
        self.dev.record = True
        self.pulls = []
        for i in range(2):
            s = ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVTIMEO, 2000)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(worker_endpoint(str(tmp_path), i))
            self.pulls.append(s)
        self.proc = NetioProcess(self.dev, Dispatcher(2, [US_I], l2=True, mac=OUR_MAC),
                                 str(tmp_path), ctx=ctx, clock=lambda: self.now)
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(neigh_endpoint(str(tmp_path)))

    def tell(self, op: int, ip: int) -> None:
        """A worker's message, then netio's loop until it has read it."""
        seen = self.proc.stats.neigh_msgs
        self.push.send(encode_neigh_request(op, ip))
        for _ in range(200):  # bounded: ipc delivery takes microseconds
            self.proc.step(0.01)
            if self.proc.stats.neigh_msgs > seen:
                return
        raise AssertionError("netio never read the worker's message")

    def arp_in(self, op: int, ip: int, mac: bytes, dst: bytes = OUR_MAC) -> None:
        body = build_arp(op, mac, ip, OUR_MAC if op == ARPOP_REPLY else bytes(6), US_I)
        self.wire.send_batch([build_ethernet(dst, mac, ETH_P_ARP, body, pad=True)])
        self.proc.step(0)

    def who_has(self) -> list[tuple[bytes, int]]:
        """(Ethernet destination, target) of every who-has netio sent since last asked."""
        out = [(bytes(f[:6]), parse_arp(memoryview(f)[14:]).target_ip) for f in self.dev.sent]
        self.dev.sent.clear()
        return out

    def announced(self, worker: int = 0) -> list[tuple[int, bytes, int]]:
        parts = self.pulls[worker].recv_multipart()
        assert decode_batch(parts) == []  # never mistaken for frames
        return decode_neigh_entries(parts)

    def quiet(self) -> bool:
        return all(not p.poll(50) for p in self.pulls)

    def close(self) -> None:
        for p in self.pulls:
            p.close(0)
        self.push.close(0)
        self.proc.close()


@pytest.fixture
def net(tmp_path, ctx):
    n = Net(tmp_path, ctx)
    yield n
    n.close()


def test_resolve_broadcasts_and_the_reply_is_announced_to_every_worker(net):
    net.tell(NEIGH_RESOLVE, PEER_I)
    assert net.who_has() == [(BROADCAST_MAC, PEER_I)]
    net.arp_in(ARPOP_REPLY, PEER_I, PEER_MAC)
    for w in range(2):
        assert net.announced(w) == [(PEER_I, PEER_MAC, NUD_REACHABLE)]
    assert net.proc.stats.neigh_announced == 1
    assert net.proc.dispatcher.neighbours == {PEER_I: PEER_MAC}


def test_unsolicited_reply_is_neither_learned_nor_announced(net):
    net.arp_in(ARPOP_REPLY, OTHER_I, OTHER_MAC)
    assert OTHER_I not in net.proc.dispatcher.neighbours
    assert net.quiet() and net.proc.stats.neigh_announced == 0


def test_request_for_us_creates_an_entry_workers_hear_of_and_resolve_answers_at_once(net):
    net.arp_in(ARPOP_REQUEST, OTHER_I, OTHER_MAC, dst=BROADCAST_MAC)
    assert net.dev.sent and parse_arp(memoryview(net.dev.sent[-1])[14:]).op == ARPOP_REPLY
    net.dev.sent.clear()
    assert OTHER_I in net.proc.dispatcher.neighbours
    assert net.quiet()  # not announced: no worker asked for it (ARP floods cost them nothing)
    # a worker asks: no who-has (the entry is usable), the answer comes
    # back at once (and its use arms DELAY, Linux neigh_event_send)
    net.tell(NEIGH_RESOLVE, OTHER_I)
    assert net.who_has() == []
    assert net.announced() == [(OTHER_I, OTHER_MAC, NUD_DELAY)]
    # the control socket's `arp` op does the same for tools
    assert net.proc.handle({"op": "arp", "ip": OTHER_I})["ok"]
    net.proc.step(0)
    assert net.announced() == [(OTHER_I, OTHER_MAC, NUD_DELAY)]
    assert net.proc.handle({"op": "neigh"})["neigh"][OTHER_I] == {
        "mac": OTHER_MAC.hex(), "state": "DELAY"}


def _reach_then_stale(net) -> None:
    net.tell(NEIGH_RESOLVE, PEER_I)
    net.arp_in(ARPOP_REPLY, PEER_I, PEER_MAC)
    assert net.announced() == [(PEER_I, PEER_MAC, NUD_REACHABLE)]
    net.who_has()
    net.now += net.proc.neigh.reachable_time + 1.0
    net.proc.step(0)
    assert net.announced() == [(PEER_I, PEER_MAC, NUD_STALE)]
    net.pulls[1].recv_multipart()


def test_stale_entry_used_and_confirmed_needs_no_arp(net):
    _reach_then_stale(net)
    net.tell(NEIGH_RESOLVE, PEER_I)  # a worker used it
    assert net.announced() == [(PEER_I, PEER_MAC, NUD_DELAY)]
    net.now += 4.0
    net.tell(NEIGH_CONFIRM, PEER_I)  # forward progress seen by a worker
    net.now += 1.0
    net.proc.step(0)
    assert net.announced() == [(PEER_I, PEER_MAC, NUD_REACHABLE)]
    assert net.who_has() == []


def test_unconfirmed_stale_entry_is_probed_by_unicast_and_a_new_mac_announced(net):
    """The peer's MAC changed: the unicast probe to the old one goes
    unanswered; after FAILED the next resolution broadcasts and the reply
    with the new MAC reaches the workers."""
    _reach_then_stale(net)
    net.tell(NEIGH_RESOLVE, PEER_I)
    net.announced()
    net.now += 5.0
    net.proc.step(0)
    assert net.who_has() == [(PEER_MAC, PEER_I)]  # PROBE: to the cached MAC
    assert net.announced() == [(PEER_I, PEER_MAC, NUD_PROBE)]  # still usable
    for _ in range(3):
        net.now += 1.0
        net.proc.step(0)
    assert net.who_has() == [(PEER_MAC, PEER_I)] * 2
    assert net.announced() == [(PEER_I, bytes(6), NUD_FAILED)]  # workers drop the MAC
    net.tell(NEIGH_RESOLVE, PEER_I)
    assert net.who_has() == [(BROADCAST_MAC, PEER_I)]
    net.arp_in(ARPOP_REPLY, PEER_I, NEW_MAC)
    assert net.announced() == [(PEER_I, NEW_MAC, NUD_REACHABLE)]


def test_malformed_worker_messages_are_counted(net):
    seen = net.proc.stats.neigh_msgs
    net.push.send(b"R12")
    net.push.send(b"X" + PEER_I.to_bytes(4, "big"))
    for _ in range(200):
        net.proc.step(0.01)
        if net.proc.stats.neigh_msgs >= seen + 2:
            break
    assert net.proc.stats.neigh_bad_msgs == 2 and net.who_has() == []


def test_decode_neighbours_ignores_batches_and_bad_entries():
    assert decode_neighbours([b"\x01", b"frame"]) == []
    assert decode_neigh_entries([b"\x01", b"frame"]) == []
    old_form = PEER_I.to_bytes(4, "big") + PEER_MAC  # 10 bytes: REACHABLE
    parts = [b"", b"short", old_form, encode_neighbour(OTHER_I, OTHER_MAC, NUD_STALE),
             encode_neighbour(US_I, bytes(6), NUD_FAILED)]
    assert decode_neigh_entries(parts) == [(PEER_I, PEER_MAC, NUD_REACHABLE),
                                           (OTHER_I, OTHER_MAC, NUD_STALE),
                                           (US_I, bytes(6), NUD_FAILED)]
    assert decode_neighbours(parts) == [(PEER_I, PEER_MAC), (OTHER_I, OTHER_MAC)]


def test_loop_sleeps_until_the_next_neighbour_timer_and_l3_ignores_the_table(net, tmp_path, ctx):
    from shardstack.netio.process import IDLE_TIMEOUT

    assert net.proc.wait_time() == IDLE_TIMEOUT  # nothing due soon
    net.tell(NEIGH_RESOLVE, PEER_I)  # INCOMPLETE: next who-has in retrans_time
    assert 0 < net.proc.wait_time() <= IDLE_TIMEOUT
    net.now += 0.9
    assert net.proc.wait_time() == pytest.approx(0.1)
    net.now += 0.2
    assert net.proc.wait_time() == 0.0  # a probe is due: no sleeping
    net.proc.step(0)
    assert net.who_has() == [(BROADCAST_MAC, PEER_I)] * 2
    assert net.proc.wait_time() > 0
    # a TUN netio never runs the table: its timers must not keep it awake
    l3_dir = tmp_path / "l3"
    l3_dir.mkdir()
    now = [0.0]
    l3 = NetioProcess(LoopbackDevice(), Dispatcher(1, [US_I]), str(l3_dir), ctx=ctx,
                      clock=lambda: now[0])
    try:
        now[0] = 1e6
        assert l3.wait_time() == IDLE_TIMEOUT and l3.neigh_pull is None
    finally:
        l3.close()
