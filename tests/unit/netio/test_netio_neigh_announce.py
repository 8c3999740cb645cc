"""netio announces a neighbour a worker asked it to resolve (`arp` op) on the
worker channel, as `[b"", ip+mac]`, once the ARP reply arrives; frames never
carry an empty flags part, and neighbours nobody asked about are not announced."""

from __future__ import annotations

import pytest
import zmq
from shardstack.core.wire.arp import ARPOP_REPLY, build_arp, parse_arp
from shardstack.core.wire.ethernet import ETH_P_ARP, build_ethernet
from shardstack.netio.device import LoopbackDevice
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.process import NetioProcess, decode_batch, decode_neighbours, worker_endpoint

US_I, PEER_I, OTHER_I = 0xC6120002, 0xC6120001, 0xC6120007
OUR_MAC, PEER_MAC, OTHER_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01", b"\x02" * 6


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _arp_reply(sender_ip: int, sender_mac: bytes) -> bytes:
    body = build_arp(ARPOP_REPLY, sender_mac, sender_ip, OUR_MAC, US_I)
    return build_ethernet(OUR_MAC, sender_mac, ETH_P_ARP, body, pad=True)


def test_solicited_neighbour_is_announced_to_every_worker(tmp_path, ctx):
    a, b = LoopbackDevice.pair(l2=True, record=True)
    a.record = True
    pulls = []
    for i in range(2):
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.RCVTIMEO, 2000)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(worker_endpoint(str(tmp_path), i))
        pulls.append(s)
    proc = NetioProcess(a, Dispatcher(2, [US_I], l2=True, mac=OUR_MAC), str(tmp_path), ctx=ctx)
    try:
        assert proc.handle({"op": "arp", "ip": PEER_I})["ok"]
        who_has = parse_arp(memoryview(a.sent[-1])[14:])
        assert who_has.target_ip == PEER_I and who_has.sender_ip == US_I
        # an unsolicited reply (someone else's) is learned, not announced
        b.send_batch([_arp_reply(OTHER_I, OTHER_MAC)])
        proc.step(0)
        assert proc.dispatcher.neighbours[OTHER_I] == OTHER_MAC
        assert proc.stats.neigh_announced == 0
        b.send_batch([_arp_reply(PEER_I, PEER_MAC)])
        proc.step(0)
        assert proc.stats.neigh_announced == 1
        for p in pulls:
            parts = p.recv_multipart()
            assert decode_neighbours(parts) == [(PEER_I, PEER_MAC)]
            assert decode_batch(parts) == []
        assert not proc.solicited  # answered once, then forgotten
        # a question netio can already answer is announced at once
        assert proc.handle({"op": "arp", "ip": OTHER_I})["ok"]
        proc.step(0)
        assert decode_neighbours(pulls[0].recv_multipart()) == [(OTHER_I, OTHER_MAC)]
    finally:
        for p in pulls:
            p.close(0)
        proc.close()


def test_decode_neighbours_ignores_batches_and_bad_entries():
    assert decode_neighbours([b"\x01", b"frame"]) == []
    assert decode_neighbours([b"", b"short", PEER_I.to_bytes(4, "big") + PEER_MAC]) == [
        (PEER_I, PEER_MAC)]
