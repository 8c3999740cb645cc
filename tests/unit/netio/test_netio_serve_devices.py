"""The devices of a serve run (netio.serve_devices), one shared capture
(netio.pcap), and netio's control client (netio.process.control_call).

The "TUN" is one end of an AF_UNIX datagram socketpair: TunDevice.from_fd
writes and reads it frame by frame, as it does a TUN fd; no root."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading

import pytest
from scapy.utils import rdpcap
from shardstack.core.wire.tcp import SYN, build_tcp_ipv4
from shardstack.netio.device import LoopbackDevice, TunDevice, innermost
from shardstack.netio.dispatch import Dispatcher
from shardstack.netio.impair import Impair
from shardstack.netio.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW, Pcap, create_capture
from shardstack.netio.process import NetioProcess, control_call
from shardstack.netio.serve_devices import netio_rx, worker_rx, worker_tx

US, PEER = 0xC6120002, 0xC6120001
SUBNET = ipaddress.IPv4Network("198.18.0.0/24")


def _frames(n: int, sport: int = 40000) -> list[bytes]:
    return [build_tcp_ipv4(US, PEER, sport, 80, 1000 + i, 0, SYN, 64240) for i in range(n)]


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.fixture
def tun():
    """(spec of a TUN as the supervisor describes it, the wire's far end)."""
    ours, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)  # as the supervisor opens the TUN (O_NONBLOCK, shared)
    spec = {"kind": "tun", "fd": ours.detach(), "mtu": 1500, "vnet_hdr": False}
    yield spec, wire
    wire.close()


def _worker(spec, wid: int, **kw):
    return worker_tx(spec, "t0", wid, run_dir="/nonexistent", subnet=SUBNET, gateway=None, **kw)


def test_worker_tx_impairs_each_worker_with_its_own_seed_and_captures_what_crossed(tun, tmp_path):
    """Two workers with the same --impair spec lose different frames (the seed
    is derived per worker), and the shared capture holds exactly the frames
    that reached the device, from both, under one global header."""
    spec, wire = tun
    cap = str(tmp_path / "run.pcap")
    create_capture(cap, l2=False)
    sent = {}
    for wid, sport in ((0, 40000), (1, 41000)):
        tx = _worker(spec, wid, pcap=cap, impair="loss=0.5,seed=7")
        assert isinstance(tx, Impair) and isinstance(tx.inner, Pcap)
        assert isinstance(innermost(tx), TunDevice) and not tx.l2
        frames = _frames(64, sport)
        assert tx.send_batch(frames) == 64  # lost ones count as sent: the wire ate them
        got = _drain(wire)
        assert 0 < len(got) < 64 and all(g in frames for g in got)
        sent[wid] = [frames.index(g) for g in got]
    assert sent[0] != sent[1]
    pkts = rdpcap(cap)
    assert [bytes(p) for p in pkts] == (
        [_frames(64, 40000)[i] for i in sent[0]] + [_frames(64, 41000)[i] for i in sent[1]])
    raw = open(cap, "rb").read()
    assert raw.count(raw[:24]) == 1 and struct.unpack_from("=I", raw, 20)[0] == LINKTYPE_RAW
    innermost(tx).close()


def test_netio_rx_reads_the_same_tun_and_captures_rx_beside_the_workers_tx(tun, tmp_path):
    spec, wire = tun
    cap = str(tmp_path / "run.pcap")
    create_capture(cap, l2=False)
    rx = netio_rx(spec, "t0", pcap=cap)
    tx = _worker(spec, 0, pcap=cap)
    inbound = build_tcp_ipv4(PEER, US, 5555, 7, 1, 0, SYN, 1000)
    wire.send(inbound)
    assert rx.recv_batch() == [(inbound, 0)]
    out = _frames(1)
    tx.send_batch(out)  # the worker's side records TX only (netio records RX)
    assert _drain(wire) == out
    assert [bytes(p) for p in rdpcap(cap)] == [inbound] + out
    rx.close()


def test_worker_rx_is_the_queue_fd_or_the_fanout_member():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert worker_rx({"kind": "tun", "fd": 5, "mtu": 1500, "vnet_hdr": False}) is None
        assert worker_rx({"kind": "tun", "fd": 5, "rx_fd": 5, "mtu": 1500}) == 5
        member = worker_rx({"kind": "packet", "ifname": "v0", "rx_fd": os.dup(a.fileno())})
        assert isinstance(member, socket.socket)
        b.send(b"frame")
        assert member.recv(100) == b"frame"
        member.close()
    finally:
        a.close()
        b.close()


def test_unknown_device_kind_is_refused():
    with pytest.raises(ValueError, match="unknown device kind"):
        _worker({"kind": "carrier-pigeon"}, 0)
    with pytest.raises(ValueError, match="unknown device kind"):
        netio_rx({}, "t0")


def test_create_capture_link_type_follows_the_device(tmp_path):
    for l2, linktype in ((False, LINKTYPE_RAW), (True, LINKTYPE_ETHERNET)):
        path = tmp_path / f"{l2}.pcap"
        create_capture(str(path), l2)
        raw = path.read_bytes()
        assert len(raw) == 24 and struct.unpack_from("=IHHiIII", raw)[6] == linktype
        assert rdpcap(str(path)) is not None


# -- netio's control client ---------------------------------------------------------


def test_control_call_asks_a_running_netio(tmp_path):
    rundir = str(tmp_path)
    ready, done = threading.Event(), threading.Event()

    def netio() -> None:
        proc = NetioProcess(LoopbackDevice(), Dispatcher(2, [US]), rundir)
        ready.set()
        try:
            proc.run(done, max_seconds=10)
        finally:
            proc.close()

    t = threading.Thread(target=netio)
    t.start()
    try:
        assert ready.wait(5)
        reply = control_call(rundir, {"op": "stats"}, timeout_ms=2000)
        assert reply is not None and reply["ok"] and reply["dispatch"]["per_worker"] == [0, 0]
        assert control_call(rundir, {"op": "frobnicate"}, timeout_ms=2000) == {
            "ok": False, "error": "unknown op 'frobnicate'"}
    finally:
        done.set()
        t.join(5)


def test_control_call_without_netio_answers_none_in_time(tmp_path):
    import time

    t0 = time.monotonic()
    assert control_call(str(tmp_path), {"op": "stats"}, timeout_ms=100) is None
    assert time.monotonic() - t0 < 2.0
