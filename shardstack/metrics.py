"""`serve --metrics HOST:PORT`: the stack's counters for Prometheus.

prometheus_client serves `/metrics` (Prometheus text, or OpenMetrics when
the scraper asks for it in `Accept`) from its own HTTP thread. Nothing is
counted twice: a custom collector reads, at scrape time, what the supervisor
already gathers for `shardstack stats` and `shardstack reta` (the workers'
`stats` and `load` replies, netio's counters, psutil per process), by
running the supervisor's coroutine on its event loop and waiting for it.

Default binding is loopback only (127.0.0.1): how busy the host is and how
its traffic spreads is nobody else's business, and the endpoint has no
authentication. A non-loopback host must be written out
(`--metrics 0.0.0.0:9464`), and serve logs a warning when it is.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

DEFAULT_HOST = "127.0.0.1"
SCRAPE_TIMEOUT = 5.0  # s: a scrape gives up on the supervisor after this


def parse_listen(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[V6]:PORT` -> (host, port); host defaults to loopback."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad --metrics {text!r}: expected [ADDR]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = DEFAULT_HOST, text
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"bad --metrics port {port!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"--metrics port {p} out of range 0..65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad --metrics address {host!r} (an IP address)") from None
    return host or DEFAULT_HOST, p


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class StackCollector:
    """A prometheus_client collector over the supervisor's snapshot."""

    def __init__(self, snapshot: Snapshot, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot = snapshot
        self.loop = loop

    def describe(self) -> list[Metric]:
        return []  # families depend on live data; no describe-time scrape

    def collect(self) -> Iterator[Metric]:
        fut = asyncio.run_coroutine_threadsafe(self.snapshot(), self.loop)
        snap = fut.result(SCRAPE_TIMEOUT)
        yield from families(snap)


def families(snap: dict[str, Any]) -> list[Metric]:
    """Metric families for one snapshot (see Supervisor.metrics_snapshot)."""
    wl = ["worker"]
    frames_in = CounterMetricFamily("shardstack_worker_frames_in",
                                    "Frames (GRO super-frames once) a worker took in", labels=wl)
    frames_out = CounterMetricFamily("shardstack_worker_frames_out",
                                     "Frames (GSO super-frames once) a worker sent", labels=wl)
    segs_in = CounterMetricFamily("shardstack_segments_in",
                                  "TCP segments received (Linux InSegs)", labels=wl)
    segs_out = CounterMetricFamily("shardstack_segments_out",
                                   "TCP segments sent (Linux OutSegs)", labels=wl)
    retrans = CounterMetricFamily("shardstack_retransmitted_segments",
                                  "TCP segments retransmitted (Linux RetransSegs)", labels=wl)
    delivered_ce = CounterMetricFamily(
        "shardstack_delivered_ce",
        "TCP segments delivered by ACKs echoing a CE mark (ECN, Linux TCPDeliveredCE)", labels=wl)
    mtup = CounterMetricFamily(
        "shardstack_mtu_probe_events",
        "Path MTU probing (RFC 4821): probes sent, acknowledged, lost; black holes suspected",
        labels=["worker", "event"])
    drops = CounterMetricFamily("shardstack_drops",
                                "Frames a worker dropped, by reason (Linux drop reasons)",
                                labels=["worker", "reason"])
    conns = GaugeMetricFamily("shardstack_connections",
                              "Sockets by TCP state (listeners included)",
                              labels=["worker", "state"])
    buckets = GaugeMetricFamily("shardstack_reta_buckets", "RETA buckets a worker owns",
                                labels=wl)
    moves = CounterMetricFamily("shardstack_reta_moves",
                                "RETA bucket moves into or out of a worker",
                                labels=["worker", "direction"])
    wframes = CounterMetricFamily("shardstack_load_frames",
                                  "Frames counted by per-bucket load accounting", labels=wl)
    wbytes = CounterMetricFamily("shardstack_load_bytes",
                                 "Bytes counted by per-bucket load accounting", labels=wl)
    bframes = CounterMetricFamily("shardstack_bucket_frames",
                                  "Frames received per RETA bucket (all workers)",
                                  labels=["bucket"])
    bbytes = CounterMetricFamily("shardstack_bucket_bytes",
                                 "Bytes received per RETA bucket (all workers)",
                                 labels=["bucket"])
    bcpu = CounterMetricFamily("shardstack_bucket_cpu_seconds",
                               "Worker CPU time attributed to a RETA bucket by its frame share",
                               labels=["bucket"])
    for w in snap.get("workers", []):
        wid = str(w["id"])
        c = w.get("counters")
        if c is not None:
            frames_in.add_metric([wid], c.get("frames_in", 0))
            frames_out.add_metric([wid], c.get("frames_out", 0))
            for reason, n in sorted(c.get("drops", {}).items()):
                drops.add_metric([wid, reason], n)
        sh = w.get("shard")
        if sh is not None:
            segs_in.add_metric([wid], sh.get("segs_in", 0))
            segs_out.add_metric([wid], sh.get("segs_out", 0))
            retrans.add_metric([wid], sh.get("retrans_segs", 0))
            delivered_ce.add_metric([wid], sh.get("tcp_delivered_ce", 0))
            for event in ("probes", "success", "fail", "blackholes"):
                mtup.add_metric([wid, event], sh.get(f"tcp_mtup_{event}", 0))
    rep = snap.get("reta", {})
    for w in rep.get("workers", []):
        wid = str(w["id"])
        buckets.add_metric([wid], w["buckets"])
        moves.add_metric([wid, "in"], w["moves_in"])
        moves.add_metric([wid, "out"], w["moves_out"])
        if w.get("answered"):
            wframes.add_metric([wid], w.get("frames", 0))
            wbytes.add_metric([wid], w.get("bytes", 0))
            for state, n in sorted(w.get("states", {}).items()):
                conns.add_metric([wid, state], n)
    for b in rep.get("buckets", []):
        label = [str(b["bucket"])]
        bframes.add_metric(label, b["frames"])
        bbytes.add_metric(label, b["bytes"])
        bcpu.add_metric(label, b["cpu_seconds"])
    out: list[Metric] = [frames_in, frames_out, segs_in, segs_out, retrans, delivered_ce, mtup,
                         drops, conns,
                         buckets, moves, wframes, wbytes, bframes, bbytes, bcpu]
    out += _migration_families(rep.get("migrations"))
    out += _process_families(snap.get("processes", []))
    out += _netio_families(snap.get("netio", {}))
    return out


def _migration_families(mig: dict[str, Any] | None) -> list[Metric]:
    """Bucket moves that carried connections (shardstack.migrate)."""
    done = CounterMetricFamily("shardstack_migrations",
                               "Bucket moves with their connections, by result",
                               labels=["result"])
    pause = GaugeMetricFamily("shardstack_migration_last_pause_seconds",
                              "The last completed move's pause: RETA switch to install")
    held = GaugeMetricFamily("shardstack_migration_last_held_frames",
                             "Frames the last completed move held and replayed")
    if mig is not None:
        done.add_metric(["done"], mig.get("done", 0))
        done.add_metric(["aborted"], mig.get("aborted", 0))
        last = [m for m in mig.get("last", []) if m.get("ok")]
        if last:
            pause.add_metric([], last[-1]["pause"])
            held.add_metric([], last[-1]["held"])
    return [done, pause, held]


def _process_families(procs: list[dict[str, Any]]) -> list[Metric]:
    pl = ["process"]
    cpu = CounterMetricFamily("shardstack_process_cpu_seconds",
                              "User + system CPU time of each process (psutil)", labels=pl)
    rss = GaugeMetricFamily("shardstack_process_resident_memory_bytes",
                            "Resident set size of each process (psutil)", labels=pl)
    restarts = CounterMetricFamily("shardstack_process_restarts",
                                   "Times the supervisor respawned the process", labels=pl)
    for p in procs:
        label = [p["process"]]
        if "cpu_seconds" in p:
            cpu.add_metric(label, p["cpu_seconds"])
        if "rss" in p:
            rss.add_metric(label, p["rss"])
        restarts.add_metric(label, p.get("restarts", 0))
    return [cpu, rss, restarts]


def _netio_families(netio: dict[str, Any]) -> list[Metric]:
    d = netio.get("dispatch", {})
    disp = CounterMetricFamily("shardstack_netio_dispatched_frames",
                               "Frames that reached each worker (kernel steering or netio)",
                               labels=["worker"])
    for i, n in enumerate(d.get("per_worker", [])):
        disp.add_metric([str(i)], n)
    ndrops = CounterMetricFamily("shardstack_netio_drops", "Frames netio dropped, by reason",
                                 labels=["reason"])
    for reason, n in sorted(d.get("drops", {}).items()):
        ndrops.add_metric([reason], n)
    return [disp, ndrops]


class MetricsServer:
    """prometheus_client's HTTP server on its own thread, for one supervisor."""

    def __init__(self, host: str, port: int, snapshot: Snapshot,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StackCollector(snapshot, loop))
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
