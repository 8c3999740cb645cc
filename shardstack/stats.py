"""Telemetry: per-process figures (psutil) and rendering of `ss` / `stats`.

The supervisor keeps one `psutil.Process` per child so `cpu_percent` is the
share since the previous `stats` request (psutil's documented interval=None
mode), not a blocking sample.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from typing import Any

import psutil


class ProcTelemetry:
    """CPU%, RSS and context switches of one process, sampled on demand."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._proc: psutil.Process | None = psutil.Process(pid)
            self._proc.cpu_percent(None)  # prime: the next call reports since now
        except psutil.Error:
            self._proc = None

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid}
        if self._proc is None:
            return out
        try:
            with self._proc.oneshot():
                ctx = self._proc.num_ctx_switches()
                out.update(
                    cpu_percent=self._proc.cpu_percent(None),
                    rss=self._proc.memory_info().rss,
                    ctx_voluntary=ctx.voluntary,
                    ctx_involuntary=ctx.involuntary,
                )
        except psutil.Error:
            pass  # it died between the request and now; the supervisor restarts it
        return out

    def counters(self) -> dict[str, Any]:
        """CPU seconds (user + system) and RSS bytes, as Prometheus's process
        metrics; unlike `sample` it leaves cpu_percent's interval alone, so a
        metrics scrape does not change what `shardstack stats` reports."""
        out: dict[str, Any] = {"pid": self.pid}
        if self._proc is None:
            return out
        try:
            with self._proc.oneshot():
                t = self._proc.cpu_times()
                out.update(cpu_seconds=t.user + t.system, rss=self._proc.memory_info().rss)
        except psutil.Error:
            pass
        return out


def to_plain(obj: Any) -> Any:
    """A msgpack-able copy of a counters object (dataclass, slotted, dict, enum)."""
    if isinstance(obj, dict):
        return {_key(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, (int, float, str, bytes, bool)) or obj is None:
        return obj
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    slots = getattr(type(obj), "__slots__", None)
    if slots:
        return {s: to_plain(getattr(obj, s)) for s in slots if hasattr(obj, s)}
    if hasattr(obj, "__dict__"):
        return {k: to_plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)


def _key(k: Any) -> str:
    """A map key on the wire: an enum member by its name (DropReason.TCP_CSUM
    -> "TCP_CSUM"), anything else as text."""
    return k.name if isinstance(k, enum.Enum) else str(k)


# -- rendering ------------------------------------------------------------------


def ip_text(ip: int | str) -> str:
    return ip if isinstance(ip, str) else str(ipaddress.IPv4Address(ip))


#: TCP_INFO's ~0 rate: no pacing limit.
_NO_RATE = 0xFFFFFFFFFFFFFFFF


def _bps(rate: int) -> str:
    """A rate in bytes/s as ss prints it in bits/s (its sprint_bps: one
    decimal, G/M/K prefixes)."""
    bits = rate * 8.0
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if bits > scale:
            return f"{bits / scale:.1f}{unit}bps"
    return f"{bits:g}bps"


def format_tcp_info(i: dict[str, Any]) -> str:
    """One connection's TCP_INFO the way `ss -ti` prints it (zero counters left out)."""
    def ms(us: int) -> str:
        return f"{us / 1000:g}"

    opts = i.get("options", 0)
    # ss's option words: ECN negotiated (TCPI_OPT_ECN), ECT/CE marks seen (TCPI_OPT_ECN_SEEN).
    out = ["ecn" if opts & 8 else "", "ecnseen" if opts & 16 else "",
           str(i.get("cc", "")), f"wscale:{i.get('snd_wscale', 0)},{i.get('rcv_wscale', 0)}",
           f"rto:{ms(i.get('rto', 0))}", f"rtt:{ms(i.get('rtt', 0))}/{ms(i.get('rttvar', 0))}"]
    if i.get("ato"):
        out.append(f"ato:{ms(i['ato'])}")
    out += [f"mss:{i.get('snd_mss', 0)}", f"pmtu:{i.get('pmtu', 0)}",
            f"rcvmss:{i.get('rcv_mss', 0)}", f"advmss:{i.get('advmss', 0)}",
            f"cwnd:{i.get('snd_cwnd', 0)}"]
    if 0 < i.get("snd_ssthresh", 0) < 0x7FFFFFFF:
        out.append(f"ssthresh:{i['snd_ssthresh']}")
    for key in ("bytes_sent", "bytes_retrans", "bytes_acked", "bytes_received", "segs_out",
                "segs_in", "data_segs_out", "data_segs_in"):
        if i.get(key):
            out.append(f"{key}:{i[key]}")
    pacing = i.get("pacing_rate", 0)
    if pacing and pacing != _NO_RATE:
        cap = i.get("max_pacing_rate", _NO_RATE)
        out.append(f"pacing_rate {_bps(pacing)}" + (f"/{_bps(cap)}" if cap != _NO_RATE else ""))
    if i.get("delivery_rate"):
        out.append(f"delivery_rate {_bps(i['delivery_rate'])}")
    if i.get("delivered"):
        out.append(f"delivered:{i['delivered']}")
    if i.get("delivered_ce"):
        out.append(f"delivered_ce:{i['delivered_ce']}")
    if i.get("delivery_rate_app_limited"):
        out.append("app_limited")
    busy = i.get("busy_time", 0)
    if busy:
        out.append(f"busy:{busy // 1000}ms")
        for key in ("rwnd_limited", "sndbuf_limited"):
            if i.get(key):
                out.append(f"{key}:{i[key] // 1000}ms({100 * i[key] / busy:.1f}%)")
    for key in ("unacked", "lost", "sacked", "dsack_dups"):
        if i.get(key):
            out.append(f"{key}:{i[key]}")
    if i.get("retrans") or i.get("total_retrans"):
        out.append(f"retrans:{i.get('retrans', 0)}/{i.get('total_retrans', 0)}")
    if i.get("reordering", 3) != 3:
        out.append(f"reordering:{i['reordering']}")
    for key in ("reord_seen",):
        if i.get(key):
            out.append(f"{key}:{i[key]}")
    if i.get("rcv_rtt"):
        out.append(f"rcv_rtt:{ms(i['rcv_rtt'])}")
    for key in ("rcv_space", "rcv_ssthresh"):
        if i.get(key):
            out.append(f"{key}:{i[key]}")
    if i.get("min_rtt") and i["min_rtt"] != 0xFFFFFFFF:
        out.append(f"minrtt:{ms(i['min_rtt'])}")
    for key in ("rcv_ooopack", "snd_wnd", "rcv_wnd"):
        if i.get(key):
            out.append(f"{key}:{i[key]}")
    return " ".join(p for p in out if p)


def format_ss(conns: list[dict[str, Any]], info: bool = False) -> str:
    """`ss -tan`-style table: State Recv-Q Send-Q Local Peer Worker; with `info`
    (`ss -ti`), each connection's TCP_INFO on the line below it."""
    rows = [("State", "Recv-Q", "Send-Q", "Local Address:Port", "Peer Address:Port", "Worker")]
    extra: dict[int, str] = {}
    for c in sorted(conns, key=lambda c: (c.get("worker", 0), c.get("lport", 0), c.get("rport", 0))):
        if info and c.get("info"):
            extra[len(rows)] = "\t " + format_tcp_info(c["info"])
        rows.append(
            (
                str(c.get("state", "?")),
                str(c.get("recv_q", 0)),
                str(c.get("send_q", 0)),
                f"{ip_text(c.get('laddr', 0))}:{c.get('lport', 0)}",
                f"{ip_text(c.get('raddr', 0))}:{c.get('rport', 0) or '*'}",
                str(c.get("worker", "?")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if n in extra:
            lines.append(extra[n])
    return "\n".join(lines)


def format_stats(st: dict[str, Any]) -> str:
    """Human-readable `shardstack stats`."""
    lines = [f"run dir {st.get('run_dir', '?')}  workers {len(st.get('workers', []))}"]
    lines.append(
        f"{'process':<12} {'pid':>7} {'cpu%':>6} {'rss MiB':>8} {'ctx vol':>9} {'ctx inv':>9} restarts"
    )
    procs = [("supervisor", st.get("supervisor", {}))]
    spare = st.get("supervisor", {}).get("spare")
    procs.append(("netio", st.get("netio", {})))
    procs += [(f"worker {w.get('id')}", w) for w in st.get("workers", [])]
    for name, p in procs:
        proc = p.get("proc", p)
        lines.append(
            f"{name:<12} {proc.get('pid', '-'):>7} {proc.get('cpu_percent', 0.0):>6.1f} "
            f"{proc.get('rss', 0) / 2**20:>8.1f} {proc.get('ctx_voluntary', 0):>9} "
            f"{proc.get('ctx_involuntary', 0):>9} {p.get('restarts', 0)}"
        )
    if spare:
        state = "ready" if spare.get("ready") else "starting"
        lines.append(f"{'spare':<12} {spare.get('pid', '-'):>7}  (warm spare worker, {state})")
    lines.append("")
    lines.append(f"{'worker':<8} {'frames in':>10} {'frames out':>10} {'conns':>6} {'drops':>7}")
    for w in st.get("workers", []):
        c = w.get("counters", {})
        lines.append(
            f"{w.get('id'):<8} {c.get('frames_in', 0):>10} {c.get('frames_out', 0):>10} "
            f"{c.get('connections', 0):>6} {sum(c.get('drops', {}).values()):>7}"
        )
    for w in st.get("workers", []):
        line = _drop_line(w.get("counters", {}).get("drops", {}))
        if line:
            lines.append(f"worker {w.get('id')} drops: {line}")
        line = _drop_line({k: w.get("shard", {}).get(k, 0) for k in LIMIT_COUNTERS})
        if line:
            lines.append(f"worker {w.get('id')} limits hit: {line}")
        line = _drop_line({k: w.get("shard", {}).get(k, 0) for k in PATH_COUNTERS})
        if line:
            lines.append(f"worker {w.get('id')} path signals: {line}")
        mig = w.get("counters", {}).get("migrate")
        if mig and (mig.get("moves_in") or mig.get("moves_out") or mig.get("aborted")):
            steer = mig.get("steer", {})
            lines.append(f"worker {w.get('id')} bucket moves: in {mig.get('moves_in', 0)} "
                         f"out {mig.get('moves_out', 0)} aborted {mig.get('aborted', 0)}; "
                         f"frames held {steer.get('held', 0)} forwarded "
                         f"{steer.get('forwarded', 0)} dropped "
                         f"{steer.get('hold_dropped', 0) + steer.get('forward_dropped', 0)}")
    n = st.get("netio", {}).get("counters", {})
    if n:
        d = n.get("dispatch", {})
        lines.append("")
        lines.append("netio dispatch: " + " ".join(
            f"w{i}={v}" for i, v in enumerate(d.get("per_worker", []))))
        lines.append(f"netio answered: icmp={d.get('icmp_replies', 0)} arp={d.get('arp_replies', 0)}"
                     f"  zmq dropped: {n.get('netio', {}).get('zmq_dropped', [])}")
        line = _drop_line(d.get("drops", {}))
        if line:
            lines.append(f"netio drops: {line}")
    return "\n".join(lines)


#: ShardStats counters that say a limit was reached (the drops themselves are
#: in the drop reasons): listen/SYN queues, receive memory, SACK scoreboard,
#: tcp_mem, ICMP and challenge-ACK rate limits.
LIMIT_COUNTERS = ("listen_overflows", "syncookies_sent", "prune_called", "rcv_collapsed",
                  "ofo_pruned", "ofo_drop", "sack_capped", "tcp_mem_pressures",
                  "challenge_acks")


#: ShardStats counters of what the path said without losing packets: ECN marks
#: echoed to us (RFC 3168) and path MTU probing (RFC 4821).
PATH_COUNTERS = ("tcp_delivered_ce", "tcp_mtup_probes", "tcp_mtup_success", "tcp_mtup_fail",
                 "tcp_mtup_blackholes")


def _drop_line(drops: dict[str, int]) -> str:
    """Drop counts by reason (DropReason names, as the processes send them)."""
    return " ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v)
