"""The netio loop over a LoopbackDevice: batches reach the right worker's PULL socket,
ARP/ICMP are answered on the device, an absent worker costs counted drops, control works."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from scapy.layers.inet import ICMP, IP, TCP
from shardstack.netio.device import RX_CSUM_VALID, LoopbackDevice
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.process import (
    NetioProcess,
    control_endpoint,
    decode_batch,
    make_device,
    worker_endpoint,
)
from shardstack.netio.rss import flow_to_worker, make_reta

US, PEER = "198.18.0.2", "198.18.0.1"
US_I, PEER_I = 0xC6120002, 0xC6120001


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _pull(ctx, rundir, i):
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(worker_endpoint(rundir, i))
    return s


def _tcp(sport):
    return bytes(IP(src=PEER, dst=US) / TCP(sport=sport, dport=80, flags="S"))


def test_frames_reach_their_worker_as_batches(tmp_path, ctx):
    a, b = LoopbackDevice.pair()
    pulls = [_pull(ctx, str(tmp_path), i) for i in range(2)]
    proc = NetioProcess(a, Dispatcher(2, [US_I]), str(tmp_path), ctx=ctx, batch=64)
    try:
        sports = list(range(30000, 30100))
        for sp in sports:
            a.inject(_tcp(sp), RX_CSUM_VALID if sp % 3 == 0 else 0)
        assert proc.step(0) == 100
        assert proc.stats.rx_batches == 2  # 64 + 36
        reta = make_reta(2)
        for w in range(2):
            expect = [sp for sp in sports if flow_to_worker(PEER_I, US_I, sp, 80, reta=reta) == w]
            got: list[tuple[bytes, int]] = []
            while len(got) < len(expect):
                got += decode_batch(pulls[w].recv_multipart())  # RCVTIMEO bounds the wait
            assert [int.from_bytes(f[20:22], "big") for f, _ in got] == expect
            assert [fl for _, fl in got] == [RX_CSUM_VALID if sp % 3 == 0 else 0 for sp in expect]
            assert proc.stats.zmq_sent[w] == len(expect)
        assert proc.stats.zmq_dropped == [0, 0]
    finally:
        for p in pulls:
            p.close(0)
        proc.close()


def test_absent_worker_is_a_counted_drop(tmp_path, ctx):
    a, b = LoopbackDevice.pair()
    proc = NetioProcess(a, Dispatcher(1, [US_I]), str(tmp_path), ctx=ctx, sndhwm=1, batch=4)
    try:
        b.send_batch([_tcp(1000 + i) for i in range(400)])
        while proc.step(0):
            pass
        st = proc.stats
        assert st.rx_frames == 400
        assert st.zmq_dropped[0] > 0  # nobody reads: the queue fills, then drops
        assert st.zmq_sent[0] + st.zmq_dropped[0] == 400
    finally:
        proc.close()


def test_icmp_answered_on_the_device(tmp_path, ctx):
    a, b = LoopbackDevice.pair()
    proc = NetioProcess(a, Dispatcher(1, [US_I]), str(tmp_path), ctx=ctx)
    try:
        b.send_batch([bytes(IP(src=PEER, dst=US) / ICMP(id=1, seq=1) / b"abc")])
        proc.step(0)
        [(reply, _)] = b.recv_batch()
        assert IP(reply)[ICMP].type == 0 and IP(reply).dst == PEER
        assert proc.stats.tx_replies == 1
    finally:
        proc.close()


def test_control_channel(tmp_path, ctx):
    a, _b = LoopbackDevice.pair()
    proc = NetioProcess(a, Dispatcher(2, [US_I]), str(tmp_path), ctx=ctx)
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 2000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(control_endpoint(str(tmp_path)))
    try:
        def call(msg):
            req.send(msgpack.packb(msg))
            for _ in range(100):
                proc.step(0.02)
                if req.poll(0):
                    return msgpack.unpackb(req.recv(), strict_map_key=False)
            raise AssertionError("no control reply")

        stats = call({"op": "stats"})
        assert stats["ok"] and stats["netio"]["rx_frames"] == 0
        assert call({"op": "reta", "reta": [1] * 128}) == {"ok": True}
        assert proc.dispatcher.reta == [1] * 128
        assert not call({"op": "reta", "reta": [5] * 128})["ok"]
        assert not call({"op": "bogus"})["ok"]
        assert not call({"op": "arp", "ip": PEER_I})["ok"]  # L3 device
        proc.running = True
        assert call({"op": "stop"}) == {"ok": True}
        assert proc.running is False
    finally:
        req.close(0)
        proc.close()


def test_make_device_stacks_wrappers(tmp_path):
    dev = make_device("loopback", impair="loss=0,seed=1", pcap=str(tmp_path / "x.pcap"), trace=True)
    assert type(dev).__name__ == "Trace"
    assert type(dev.inner).__name__ == "Impair"
    assert type(dev.inner.inner).__name__ == "Pcap"
    dev.close()
    with pytest.raises(ValueError):
        make_device("nope")
