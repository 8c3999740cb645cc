"""shardstack.tracer on a real Shard: a port's segments are traced one by one
with the engine's trace on, everything else goes through untraced and in
order, and detaching restores the shard exactly (nothing left on the path)."""

from __future__ import annotations

import pytest
from shardstack.core import Shard, ShardConfig
from shardstack.core.wire.ipv4 import str_to_ip
from shardstack.core.wire.tcp import SYN, build_tcp_ipv4, build_tcp_options

from shardstack import tracer
from shardstack.load import BucketLoad

PEER = str_to_ip("198.18.0.1")
ADDR = str_to_ip("198.18.0.2")


class FakeWorker:
    def __init__(self) -> None:
        self.shard = Shard(ShardConfig(addrs=[ADDR], secret=b"k" * 16), 0.0)
        self.wid = 3
        self.load = BucketLoad()
        self.shard.receive_batch = self.load.wrap(self.shard.receive_batch)
        for port in (80, 81):
            sd = self.shard.socket()
            self.shard.bind(sd, 0, port)
            self.shard.listen(sd, 8)


def _syn(sport: int, dport: int) -> bytes:
    return build_tcp_ipv4(PEER, ADDR, sport, dport, 1000, 0, SYN, 65535,
                          build_tcp_options(mss=1460))


def test_port_trace_attach_take_detach():
    w = FakeWorker()
    hooked = w.shard.receive_batch
    tracer.control(w, "trace_start", {"tid": 1, "port": 80})
    assert w.shard.receive_batch != hooked
    w.shard.receive_batch([_syn(40000, 81), _syn(40001, 80), _syn(40002, 81)], 0.0)
    # every SYN answered, in order, and counted by the load hook underneath
    replies = [f for f in w.shard.take_frames()]
    assert [int.from_bytes(f[22:24], "big") for f in replies] == [40000, 40001, 40002]
    assert w.load.total_frames == 3
    got = tracer.control(w, "trace_take", {"tid": 1})
    assert got["dropped"] == 0 and len(got["events"]) == 1
    ev = got["events"][0]
    assert ev["worker"] == 3 and ":40001 > 198.18.0.2:80 S seq 1000" in ev["segment"]
    assert ev["calls"][0] == "tcp_v4_rcv" and "tcp_v4_conn_request" in ev["calls"]
    assert not w.shard.tracing  # only around the traced segment
    assert tracer.control(w, "trace_take", {"tid": 1})["events"] == []
    # a second session on another port; stopping the first keeps the second
    tracer.control(w, "trace_start", {"tid": 2, "port": 81})
    tracer.control(w, "trace_stop", {"tid": 1})
    w.shard.receive_batch([_syn(40003, 80), _syn(40004, 81)], 0.0)
    assert [e["segment"].split()[0] for e in tracer.control(w, "trace_take", {"tid": 2})["events"]] \
        == ["198.18.0.1:40004"]
    tracer.control(w, "trace_stop", {"tid": 2})
    assert w.shard.receive_batch == hooked  # detached: the shard is as before
    assert not w.shard.tracing and w.shard.h.trace is None
    w.shard.receive_batch([_syn(40005, 80)], 0.0)
    assert w.shard.trace() == []


def test_format_event_indents_calls():
    ev = {"worker": 0, "t": 0.0, "dir": "in", "segment": "a:1 > b:2 S seq 1 ack 0 len 0",
          "calls": ["tcp_v4_rcv", [1, "tcp_v4_do_rcv"]]}
    lines = tracer.format_event(ev).splitlines()
    assert lines[0].endswith("w0 in a:1 > b:2 S seq 1 ack 0 len 0")
    assert lines[1:] == ["  tcp_v4_rcv", "    tcp_v4_do_rcv"]


def test_conn_trace_takes_only_that_connection():
    w = FakeWorker()
    conn = tracer.parse_conn("198.18.0.2:80-198.18.0.1:40007")
    assert conn == (ADDR, 80, PEER, 40007)
    tracer.control(w, "trace_start", {"tid": 5, "port": 80, "conn": list(conn)})
    w.shard.receive_batch([_syn(40006, 80), _syn(40007, 80), _syn(40008, 80)], 0.0)
    events = tracer.control(w, "trace_take", {"tid": 5})["events"]
    assert [e["segment"].split()[0] for e in events] == ["198.18.0.1:40007"]
    assert len(w.shard.take_frames()) == 3  # all three answered
    tracer.control(w, "trace_stop", {"tid": 5})


@pytest.mark.parametrize("bad", ["198.18.0.2:80", "198.18.0.2:80-198.18.0.1", "a:1-b:2",
                                 "198.18.0.2:0-198.18.0.1:5"])
def test_parse_conn_rejects(bad):
    with pytest.raises(ValueError):
        tracer.parse_conn(bad)


def test_ipv6_segments_summarised_and_matched_by_port():
    """An IPv6 SYN (issue 14): its summary names the addresses in brackets
    and a port trace takes it (the IPv4 offsets read the source address)."""
    from shardstack.core.wire.tcp import ACK, build_tcp_ipv6

    a, b = 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 2
    pkt = build_tcp_ipv6(a, b, 40000, 7, 100, 5, ACK, 1000, payload=b"abc")
    assert tracer.segment_summary(pkt) == \
        "[2001:db8::1]:40000 > [2001:db8::2]:7 . seq 100 ack 5 len 3"
    assert tracer._ports(pkt) == (40000, 7)
    assert tracer.segment_summary(b"\x60" + bytes(10)) is None
