"""Per-bucket load accounting (shardstack.load), the RETA book (shardstack.reta)
and the metrics exposition (shardstack.metrics), without processes."""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from shardstack.core.wire.ipv4 import build_ipv4, str_to_ip
from shardstack.core.wire.tcp import ACK, build_tcp_ipv4
from shardstack.netio import rss

from shardstack import load as loadmod
from shardstack import metrics, reta

PEER = str_to_ip("198.18.0.1")
ADDR = str_to_ip("198.18.0.2")


def _bucket_ref(src, dst, sport, dport) -> int:
    """The bit-serial Toeplitz reference (Microsoft's definition), not the table."""
    data = (src.to_bytes(4, "big") + dst.to_bytes(4, "big") + sport.to_bytes(2, "big")
            + dport.to_bytes(2, "big"))
    return rss.toeplitz(rss.SYMMETRIC_KEY, data) & rss.RETA_MASK


def _with_ip_options(packet: bytes) -> bytes:
    """The same packet with 4 bytes of IP options (NOPs): IHL 6."""
    hdr = bytearray(packet[:20])
    hdr[0] = 0x46
    total = len(packet) + 4
    hdr[2:4] = total.to_bytes(2, "big")
    return bytes(hdr) + b"\x01\x01\x01\x01" + packet[20:]


def test_bucket_of_every_frame_matches_toeplitz():
    rng = random.Random(15)
    load = loadmod.BucketLoad()
    want_frames = [0] * 128
    want_bytes = [0] * 128
    batch = []
    for _ in range(500):
        src, sport, dport = rng.getrandbits(32), rng.randrange(1, 65536), rng.randrange(1, 65536)
        pkt = build_tcp_ipv4(src, ADDR, sport, dport, 1, 1, ACK, 1000, payload=b"x" * rng.randrange(100))
        if rng.random() < 0.1:
            pkt = _with_ip_options(pkt)
        b = _bucket_ref(src, ADDR, sport, dport)
        assert loadmod.frame_bucket(pkt) == b
        want_frames[b] += 1
        want_bytes[b] += len(pkt)
        batch.append(memoryview(pkt))
    load.count(batch)
    assert load.frames == want_frames and load.bytes == want_bytes
    assert load.total_frames == 500 and load.other_frames == 0


def test_non_tcp_and_runts_are_other():
    load = loadmod.BucketLoad()
    icmp = build_ipv4(PEER, ADDR, 1, b"\x08\x00" + bytes(30))
    load.count([icmp, b"\x45\x00", b""])
    assert load.other_frames == 3 and sum(load.frames) == 0 and load.total_frames == 3


def test_wrapped_receive_batch_counts_then_delivers():
    got = []
    load = loadmod.BucketLoad()
    recv = load.wrap(lambda packets, now, csum_ok=None: got.append((list(packets), now, csum_ok)))
    pkt = build_tcp_ipv4(PEER, ADDR, 40000, 7, 1, 1, ACK, 1000)
    recv([pkt, pkt], 3.0, True)
    assert got == [([pkt, pkt], 3.0, True)]
    assert load.frames[_bucket_ref(PEER, ADDR, 40000, 7)] == 2


def test_cpu_time_is_split_by_frame_share(monkeypatch):
    clock = iter([10.0, 14.0, 14.0])  # construction, first sample, second sample
    monkeypatch.setattr(loadmod.time, "process_time", lambda: next(clock))
    load = loadmod.BucketLoad()
    load.frames[3] = 3
    load.frames[9] = 1
    load.sample()  # 4 s over 4 frames: 3 s to bucket 3, 1 s to bucket 9
    assert load.cpu[3] == pytest.approx(3.0) and load.cpu[9] == pytest.approx(1.0)
    assert load.cpu_total == pytest.approx(4.0)
    load.sample()  # no new frames, no time: nothing moves
    assert sum(load.cpu) == pytest.approx(4.0)


def test_reta_book_counts_moves_per_bucket_and_worker():
    book = reta.RetaBook(2)
    assert book.install(list(book.table)) == [] and book.moves == 0
    new = list(book.table)
    new[0], new[5] = 1, 0  # bucket 0: 0 -> 1, bucket 5: 1 -> 0
    assert book.install(new) == [0, 5]
    new2 = list(new)
    new2[0] = 0
    book.install(new2)
    assert book.moves == 3 and book.bucket_moves[0] == 2 and book.bucket_moves[5] == 1
    assert book.moves_out == [1, 2] and book.moves_in == [2, 1]


def _load_reply(frames_at: dict[int, int]) -> dict:
    frames = [0] * 128
    for b, n in frames_at.items():
        frames[b] = n
    return {"frames": frames, "bytes": [n * 100 for n in frames], "cpu": [n * 0.01 for n in frames],
            "other_frames": 0, "total_frames": sum(frames), "cpu_seconds": 1.5,
            "states": {"LISTEN": 2, "ESTABLISHED": 3}}


def test_report_sums_buckets_over_workers_and_formats():
    book = reta.RetaBook(2)
    rep = reta.report(book, [_load_reply({0: 5, 1: 2}), None])
    assert rep["buckets"][0] == {"bucket": 0, "worker": 0, "frames": 5, "bytes": 500,
                                 "cpu_seconds": 0.05, "moves": 0}
    assert rep["workers"][0]["frames"] == 7 and rep["workers"][0]["buckets"] == 64
    assert rep["workers"][1]["answered"] is False
    text = reta.format_reta(rep)
    assert "moves so far: 0" in text and "(no answer)" in text


def test_metrics_text_parses_with_prometheus_parser():
    book = reta.RetaBook(2)
    snap = {
        "workers": [{"id": 0, "counters": {"frames_in": 7, "frames_out": 4,
                                           "drops": {"TCP_CSUM": 2}},
                     "shard": {"segs_in": 9, "segs_out": 5, "retrans_segs": 1,
                               "tcp_delivered_ce": 4, "tcp_mtup_fail": 2}},
                    {"id": 1}],
        "reta": reta.report(book, [_load_reply({0: 5}), None]),
        "processes": [{"process": "worker-0", "cpu_seconds": 1.25, "rss": 1 << 20,
                       "restarts": 1}],
        "netio": {"dispatch": {"per_worker": [7, 0], "drops": {"ip_version": 1}}},
    }

    class Fixed:
        def collect(self):
            return metrics.families(snap)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed())
    samples = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    w0 = (("worker", "0"),)
    assert samples[("shardstack_segments_in_total", w0)] == 9
    assert samples[("shardstack_retransmitted_segments_total", w0)] == 1
    assert samples[("shardstack_delivered_ce_total", w0)] == 4
    assert samples[("shardstack_mtu_probe_events_total", (("event", "fail"), ("worker", "0")))] == 2
    assert samples[("shardstack_mtu_probe_events_total", (("event", "probes"), ("worker", "0")))] == 0
    assert samples[("shardstack_drops_total", (("reason", "TCP_CSUM"), ("worker", "0")))] == 2
    assert samples[("shardstack_connections", (("state", "ESTABLISHED"), ("worker", "0")))] == 3
    assert samples[("shardstack_reta_moves_total", (("direction", "in"), ("worker", "1")))] == 0
    assert samples[("shardstack_bucket_frames_total", (("bucket", "0"),))] == 5
    assert samples[("shardstack_process_cpu_seconds_total", (("process", "worker-0"),))] == 1.25
    assert samples[("shardstack_netio_drops_total", (("reason", "ip_version"),))] == 1
    assert ("shardstack_segments_in_total", (("worker", "1"),)) not in samples  # no answer


@pytest.mark.parametrize("text, want", [
    ("9464", ("127.0.0.1", 9464)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:9", ("localhost", 9)),
])
def test_metrics_listen_default_is_loopback(text, want):
    assert metrics.parse_listen(text) == want
    assert metrics.is_loopback(want[0]) == (want[0] != "0.0.0.0")


@pytest.mark.parametrize("text", ["", "x:1", "198.18.0.1:", "[::1]9464", "65536"])
def test_metrics_listen_rejects(text):
    with pytest.raises(ValueError):
        metrics.parse_listen(text)


def test_ipv6_frames_count_in_their_flows_bucket():
    """TCP/IPv6 (issue 14): the bucket of the 36-byte tuple's hash, the one
    the steering put the frame in; with an extension header first, other."""
    from shardstack.core.wire.tcp import build_tcp_ipv6
    from shardstack.netio import rss

    rng = random.Random(16)
    load = loadmod.BucketLoad()
    us = 0x20010DB8 << 96 | 2
    want = [0] * 128
    batch = []
    for _ in range(300):
        src = 0x20010DB8 << 96 | rng.getrandbits(64)
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        pkt = build_tcp_ipv6(src, us, sport, dport, 1, 1, ACK, 1000, payload=b"y" * 10)
        b = rss.flow_hash6(src, us, sport, dport) & 127
        assert loadmod.frame_bucket(pkt) == b
        want[b] += 1
        batch.append(pkt)
    ext = bytearray(build_tcp_ipv6(us - 1, us, 1, 2, 1, 1, ACK, 1000))
    ext[6] = 0  # a hop-by-hop header first: not walked here
    batch.append(bytes(ext))
    load.count(batch)
    assert load.frames == want and load.other_frames == 1
