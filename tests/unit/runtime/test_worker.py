"""One worker in-process, without root: zmq RX, the shard, services, TX, control.

The device is netio's in-memory LoopbackDevice (what the worker writes is
recorded); netio is played by a zmq PUSH socket sending `[flags, frame...]`
batches to the worker's endpoint, exactly what netio.process sends.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from shardstack.core.wire.ipv4 import parse_ipv4
from shardstack.core.wire.tcp import ACK, RST, SYN, build_tcp_ipv4, build_tcp_options, parse_tcp
from shardstack.netio import rss
from shardstack.netio.device import RX_CSUM_VALID, LoopbackDevice
from shardstack.netio.process import worker_endpoint

from shardstack import control
from shardstack.config import ServeConfig, parse_cidr
from shardstack.rundir import prepare_run_dir
from shardstack.stats import format_stats
from shardstack.worker import Worker

STACK = "198.18.0.2"
PEER = 0xC6120001  # 198.18.0.1
ADDR = 0xC6120002


def _cfg(run_dir: str) -> ServeConfig:
    return ServeConfig(workers=2, device="tun", ifname="t0", addr=parse_cidr(f"{STACK}/24"),
                       run_dir=run_dir, echo_ports=[7], discard_ports=[9],
                       secret=b"k" * 32).validate()


def _syn(sport: int, dport: int, bad_csum: bool = False) -> bytes:
    pkt = bytearray(build_tcp_ipv4(PEER, ADDR, sport, dport, 1000, 0, SYN, 64240,
                                   options=build_tcp_options(mss=1460)))
    if bad_csum:
        pkt[20 + 16] ^= 0xFF
    return bytes(pkt)


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "r"
    prepare_run_dir(d)
    return str(d)


def _segments(dev: LoopbackDevice):
    out = []
    for f in dev.sent:
        hdr, payload = parse_ipv4(f)
        out.append((hdr, parse_tcp(payload)))
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_batch_in_synack_out_and_control(run_dir, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("shardstack.worker._monotonic", clock)

    async def main():
        loop = asyncio.get_running_loop()
        dev = LoopbackDevice(record=True)
        w = Worker(_cfg(run_dir), 0, rss.make_reta(2), dev, loop)
        await w.start()
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(worker_endpoint(run_dir, 0))
        try:
            # one batch: a SYN to echo (checksum vouched for by the device),
            # a SYN with a broken checksum (not vouched: must be dropped), and
            # a SYN to a port nobody listens on (answered with RST)
            frames = [_syn(40000, 7, bad_csum=True), _syn(40001, 7), _syn(40002, 5)]
            push.send_multipart([bytes([0, RX_CSUM_VALID, RX_CSUM_VALID]), *frames])
            await _until(lambda: len(dev.sent) >= 2)
            segs = _segments(dev)
            synack = [(h, s) for h, s in segs if s.flags & (SYN | ACK) == SYN | ACK]
            rst = [s for _h, s in segs if s.flags & RST]
            assert len(synack) == 1 and synack[0][1].dst_port == 40001
            assert synack[0][0].src == ADDR and synack[0][0].dst == PEER
            assert synack[0][1].ack == 1001
            assert len(rst) == 1 and rst[0].dst_port == 40002
            async_ctl = await control.AsyncControlClient.connect(w.run.worker_ctl(0))
            st = await async_ctl.call("stats")
            c = st["counters"]
            assert c["frames_in"] == 3 and c["frames_out"] == 2 and c["batches_in"] == 1
            # the bad checksum and the SYN nobody listens for (answered, and
            # counted as Linux does), by their DropReason names, through the
            # control socket, and as `shardstack stats` prints them
            assert c["drops"] == {"TCP_CSUM": 1, "NO_SOCKET": 1}
            text = format_stats({"workers": [{"id": 0, "counters": c}]})
            assert "worker 0 drops: NO_SOCKET=1 TCP_CSUM=1" in text
            ss = (await async_ctl.call("ss"))["conns"]
            assert {(x["lport"], x["state"]) for x in ss if x["state"] == "LISTEN"} == {
                (7, "LISTEN"), (9, "LISTEN")}
            assert all(x["worker"] == 0 for x in ss)
            with pytest.raises(OSError):
                await async_ctl.call("frobnicate")
            async_ctl.close()
            # the SYN-ACK's retransmission timer is the one loop timer, armed
            # at the shard's deadline; when it fires the SYN-ACK goes again
            deadline = w.shard.next_deadline()
            assert deadline is not None and w._armed == deadline
            n = len(dev.sent)
            clock.now = deadline + 0.001
            w._on_timer()
            assert w.counters.timer_fires == 1
            assert len(dev.sent) == n + 1
            assert _segments(dev)[-1][1].flags & (SYN | ACK) == SYN | ACK
            assert w._armed is not None and w._armed > clock.now
        finally:
            push.close(0)
            w.close()

    asyncio.run(main())


def test_port_filter_keeps_replies_on_this_worker(run_dir):
    async def main():
        loop = asyncio.get_running_loop()
        reta = rss.make_reta(2)
        w = Worker(_cfg(run_dir), 1, reta, LoopbackDevice(record=True), loop)
        shard = w.shard
        for i in range(20):
            sd = shard.socket()
            shard.connect(sd, PEER, 80 + i, time.monotonic())
            laddr, lport = shard.getsockname(sd)
            assert rss.flow_to_worker(PEER, laddr, 80 + i, lport, reta) == 1

    asyncio.run(main())
