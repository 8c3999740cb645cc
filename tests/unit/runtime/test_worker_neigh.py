"""L2Tx's neighbour queue (Linux `__neigh_event_send` / `neigh_update` /
`neigh_timer_handler`): frames for a next hop whose MAC is unknown wait (at most
ARP_QUEUE_LEN, oldest dropped first), leave in order with the right Ethernet
header when netio announces the MAC or a frame from the peer teaches it, and
are dropped and counted when the neighbour fails after ARP_PROBES probes.

netio is played by a fake `_netio_call`; the clock is fake; no root."""

from __future__ import annotations

import pytest
from shardstack.core.wire.tcp import ACK, SYN, build_tcp_ipv4
from shardstack.netio.device import LoopbackDevice

from shardstack import worker as wmod
from shardstack.config import ServeConfig, parse_cidr
from shardstack.worker import ARP_PROBES, ARP_QUEUE_LEN, ARP_RETRANS, L2Tx

US, PEER, GW, FAR = 0xC6120002, 0xC6120001, 0xC61200FE, 0xC6130009
OUR_MAC, PEER_MAC, GW_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01", b"\x02" * 6


class FakeNetio:
    def __init__(self) -> None:
        self.table: dict[int, bytes] = {}
        self.requests: list[dict] = []

    def __call__(self, run_dir, req, timeout_ms=200):
        self.requests.append(req)
        if req["op"] == "neighbours":
            return {"ok": True, "neighbours": {ip: m.hex() for ip, m in self.table.items()}}
        return {"ok": True}

    def arps(self) -> list[int]:
        return [r["ip"] for r in self.requests if r["op"] == "arp"]


@pytest.fixture
def env(monkeypatch, tmp_path):
    clock = [100.0]
    netio = FakeNetio()
    monkeypatch.setattr(wmod, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(wmod, "_netio_call", netio)
    cfg = ServeConfig(workers=1, device="packet", ifname="v0", addr=parse_cidr("198.18.0.2/24"),
                      run_dir=str(tmp_path), secret=b"k" * 32, gateway=GW).validate()
    inner = LoopbackDevice(l2=True, record=True)
    return L2Tx(inner, OUR_MAC, cfg), inner, netio, clock


def _pkt(seq: int, dst: int = PEER, payload: bytes = b"") -> bytes:
    return build_tcp_ipv4(US, dst, 40000, 80, seq, 0, SYN if not payload else ACK, 64240,
                          payload=payload)


def _from_peer(mac: bytes, src: int) -> bytes:
    return OUR_MAC + mac + b"\x08\x00" + build_tcp_ipv4(src, US, 80, 40000, 1, 1, ACK, 100)


def test_first_frames_wait_for_the_arp_reply(env):
    tx, inner, netio, _clock = env
    frames = [_pkt(i) for i in range(ARP_QUEUE_LEN + 1)]
    # accepted (queued), not reported as dropped; netio asked once, not per frame
    assert tx.send_batch(frames) == len(frames)
    assert inner.sent == [] and netio.arps() == [PEER]
    assert tx.stats["unres_discards"] == 1  # the oldest made room for the newest
    assert tx.next_deadline() == pytest.approx(100.0 + ARP_RETRANS)
    tx.neigh_update([(PEER, PEER_MAC)])
    assert inner.sent == [PEER_MAC + OUR_MAC + b"\x08\x00" + f for f in frames[1:]]
    assert tx.stats["flushed"] == ARP_QUEUE_LEN and not tx.unres
    assert tx.next_deadline() is None
    assert tx.send_batch([_pkt(9)]) == 1 and inner.sent[-1][:6] == PEER_MAC


def test_off_link_frames_wait_on_the_gateway_and_gso_keeps_its_size(env):
    tx, inner, netio, _clock = env
    big = _pkt(1, FAR, payload=bytes(4000))
    assert tx.send_gso(big, 1448) is True
    assert tx.send_batch([_pkt(2, FAR)]) == 1
    assert netio.arps() == [GW] and inner.gso_sent == [] and inner.sent == []
    # a frame from the gateway teaches its MAC, as a reply would
    tx.learn(_from_peer(GW_MAC, GW))
    eth = GW_MAC + OUR_MAC + b"\x08\x00"
    assert inner.gso_sent == [(eth + big, 1448)]
    assert inner.sent == [eth + _pkt(2, FAR)]


def test_netio_table_answers_without_queueing(env):
    tx, inner, netio, _clock = env
    netio.table[PEER] = PEER_MAC
    assert tx.send_batch([_pkt(1)]) == 1
    assert inner.sent == [PEER_MAC + OUR_MAC + b"\x08\x00" + _pkt(1)]
    assert netio.arps() == [] and not tx.unres


def test_unanswered_neighbour_is_probed_then_fails(env):
    tx, inner, netio, clock = env
    tx.send_batch([_pkt(1), _pkt(2)])
    for probe in range(2, ARP_PROBES + 1):
        clock[0] = tx.next_deadline()
        tx.poll(clock[0])
        assert netio.arps() == [PEER] * probe  # one who-has per retrans interval
    assert tx.unres and tx.stats["failed"] == 0
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert not tx.unres and tx.stats["failed"] == 2 and inner.sent == []
    assert tx.next_deadline() is None
    # the next frame starts a fresh resolution (Linux: FAILED -> INCOMPLETE)
    tx.send_batch([_pkt(3)])
    assert netio.arps() == [PEER] * (ARP_PROBES + 1) and tx.unres


def test_late_netio_table_entry_found_on_reprobe(env):
    """The announcement was lost (a full worker queue): the next probe asks
    netio's table first and sends what waited."""
    tx, inner, netio, clock = env
    tx.send_batch([_pkt(1)])
    netio.table[PEER] = PEER_MAC
    clock[0] = tx.next_deadline()
    tx.poll(clock[0])
    assert inner.sent == [PEER_MAC + OUR_MAC + b"\x08\x00" + _pkt(1)]
    assert netio.arps() == [PEER] and not tx.unres


def test_worker_sends_a_queued_syn_when_netio_announces_the_mac(env):
    """End to end in one worker: connect() emits a SYN for a peer nobody has
    resolved; it waits on the neighbour (no tx drop) until netio's
    announcement `[b"", ip+mac]` arrives on the worker's zmq channel."""
    import asyncio
    import time

    import zmq
    from shardstack.netio import rss
    from shardstack.netio.process import encode_neighbour, worker_endpoint

    from shardstack.worker import Worker

    tx, inner, netio, clock = env

    async def main():
        loop = asyncio.get_running_loop()
        w = Worker(tx_cfg(tx), 0, rss.make_reta(1), tx, loop)
        await w.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(worker_endpoint(tx.run_dir, 0))
        try:
            sd = w.shard.socket()
            w.shard.connect(sd, PEER, 80, clock[0])
            w.flush()
            assert inner.sent == [] and netio.arps() == [PEER]
            assert w.counters.drops.get("tx", 0) == 0
            push.send_multipart([b"", encode_neighbour(PEER, PEER_MAC)])
            deadline = time.monotonic() + 5
            while not inner.sent and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert len(inner.sent) == 1 and inner.sent[0][:6] == PEER_MAC
            assert inner.sent[0][14 + 33] & 0x02  # the SYN
            st = w._stats()["counters"]
            assert st["neigh"]["flushed"] == 1 and st["neigh"]["incomplete"] == 0
        finally:
            push.close(0)
            w.close()

    asyncio.run(main())


def tx_cfg(tx: L2Tx) -> ServeConfig:
    return ServeConfig(workers=1, device="packet", ifname="v0", addr=parse_cidr("198.18.0.2/24"),
                       run_dir=tx.run_dir, secret=b"k" * 32).validate()
