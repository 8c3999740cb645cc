"""Run the plan: every case on every target, with telemetry, progress and bounded waits."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardstack.bench import scenarios as sc
from shardstack.bench.aggregate import cpu_summary, human_rate
from shardstack.bench.progress import Progress
from shardstack.bench.targets import (
    PY,
    SERVICE_READY_TIMEOUT,
    Capabilities,
    Target,
    Unavailable,
    open_target,
)
from shardstack.bench.telemetry import Telemetry
from shardstack.netns import NetnsError

CLIENT_GRACE = 30.0  # beyond the case's duration before the client is killed


@dataclass(slots=True)
class RunRecord:
    case: str
    scenario: str
    variant: str
    workers: int
    status: str  # "ok" | "n/a" | "error"
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    ticks: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    frames_per_s: float | None = None  # mean over the run, from the stack's stats

    def metric(self, key: str) -> float | None:
        if self.status != "ok":
            return None
        value = self.result.get(key)
        return float(value) if isinstance(value, int | float) else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def client_argv(case: sc.Case, host: str, port: int, b: sc.Bounds) -> list[str]:
    argv = [PY, "-m", "shardstack.bench.client", case.mode, "--host", host, "--port", str(port),
            "--seconds", f"{b.seconds:g}", "--max-ops", str(b.max_ops), "--max-bytes",
            str(b.max_bytes), "--conns", str(case.conns)]
    if case.mode in ("crr", "rr"):
        argv += ["--size", str(case.size)]
    if case.mode == "http":
        argv += ["--path", f"/f{case.size}.bin"]
    if case.link:
        # Every kernel end runs the case's congestion control (CUBIC, as the stack,
        # by default), per socket: a host's default may be BBR, and a namespace
        # cannot make a restricted one its default.
        argv += ["--cc", case.cc or sc.LOSSY_CC]
        if case.mode == "bulk-send":
            argv += ["--acked"]
    return argv


def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def _live_figure(case: sc.Case, tick: dict[str, Any], prev: dict[str, Any] | None) -> str:
    if prev is None or tick["t"] <= prev["t"]:
        return ""
    dt = tick["t"] - prev["t"]
    if case.unit == "B/s":
        return human_rate((tick["bytes"] - prev["bytes"]) / dt, "B/s")
    text = human_rate((tick["ops"] - prev["ops"]) / dt, "/s")
    if "p50_us" in tick:
        text += f" p50 {human_rate(tick['p50_us'], 'us')}"
    return text


def run_case(target: Target, case: sc.Case, seconds: float, progress: Progress,
             label: str) -> RunRecord:
    """One client run against one target; never raises for a target-side failure."""
    rec = RunRecord(case.key, case.scenario, target.name, target.workers, "ok")
    seconds = sc.case_seconds(case, seconds)
    if case.link:
        # The bridge first: the service's readiness probe crosses it too.
        try:
            target.set_link(case.link, seconds + CLIENT_GRACE + SERVICE_READY_TIMEOUT + 30)
        except (Unavailable, NetnsError, OSError) as e:
            rec.status, rec.reason = "error", str(e)
            return rec
    try:
        ep = target.endpoint(case)
    except Unavailable as e:
        # The kernel is the reference: its failing is an error, never "not built yet".
        rec.status = "error" if target.name == "kernel" else "n/a"
        rec.reason = str(e)
        return rec
    except (NetnsError, OSError) as e:
        rec.status, rec.reason = "error", f"service start failed: {e}"
        return rec
    b = sc.bounds(case, seconds)
    assert target.pair is not None
    if case.link:
        stack_before = _stack_counters(target)
        snap = _Snapshots(target, ep, seconds)
    tel = Telemetry(interval=min(0.5, seconds / 10),
                    stats=target.stats if target.name != "kernel" else None)
    for role, (pid, kids) in target.pids.items():
        if role.startswith(("app-", "server-")) and not role.endswith(case.service):
            continue  # an idle service of another case
        tel.watch(role, pid, kids)
    proc = target.pair.client.popen(client_argv(case, ep.host, ep.port, b),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tel.watch("client", proc.pid)
    tel.start()
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    deadline = time.monotonic() + seconds + CLIENT_GRACE
    prev = None
    final: dict[str, Any] | None = None
    try:
        while time.monotonic() < deadline:
            try:
                line = q.get(timeout=0.25)
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "tick":
                rec.ticks.append(msg)
                fig = _live_figure(case, msg, prev)
                prev = msg
                progress.update(f"{label} {case.key:<14} {target.name:<18} "
                                f"{msg['t']:5.1f}/{seconds:g}s  {fig}")
            elif msg.get("type") in ("result", "error"):
                final = msg
    finally:
        rec.telemetry = tel.stop()
        if proc.poll() is None:
            proc.kill()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            err = ""
        if case.link:
            link = {"spec": case.link, "bridge": target.stop_link(), "ss": snap.stop()}
            if target.name != "kernel":
                link["stack"] = _counter_delta(stack_before, _stack_counters(target))
    rec.cpu = cpu_summary(rec.telemetry)
    fps = [s["frames_per_s"] for s in rec.telemetry if "frames_per_s" in s]
    rec.frames_per_s = sum(fps) / len(fps) if fps else None
    if final is None:
        rec.status = "error"
        rec.reason = f"client gave no result (exit {proc.returncode}): {(err or '').strip()[-300:]}"
    elif final["type"] == "error":
        rec.status, rec.reason = "error", final["error"]
        rec.result = final
    else:
        rec.result = final
        if case.link:
            rec.result["link"] = link
        if final.get("ops", 0) == 0:
            rec.status = "error"
            rec.reason = f"no completed operations ({final.get('error_kinds')})"
    return rec


class _Snapshots:
    """`ss -tin` of the client's and (kernel target) the server's TCP sockets, taken
    at 70 % of the run in a thread: the kernel's own account of who limited the
    flow (rwnd_limited, cwnd, retrans, reordering), for the lossy diagnosis."""

    def __init__(self, target: Target, ep, seconds: float) -> None:
        self.target = target
        self.ep = ep
        self.out: dict[str, str] = {}
        self._timer = threading.Timer(max(0.2, 0.7 * seconds), self._take)
        self._timer.daemon = True
        self._timer.start()

    def _take(self) -> None:
        pair = self.target.pair
        assert pair is not None
        sides = [("client", pair.client)]
        if self.target.name == "kernel":
            sides.append(("server", pair.server))
        for side, ns in sides:
            try:
                proc = ns.run(["ss", "-tinH", "state", "established"], check=False, timeout=5)
                self.out[side] = proc.stdout.strip()[:4000]
            except (OSError, subprocess.SubprocessError, NetnsError) as e:
                self.out[side] = f"ss failed: {e}"

    def stop(self) -> dict[str, str]:
        self._timer.cancel()
        return self.out


def _stack_counters(target: Target) -> dict[str, float]:
    """The stack's engine counters summed over workers (empty for the kernel)."""
    if target.name == "kernel":
        return {}
    try:
        st = target.stats() or {}
    except OSError:
        return {}
    out: dict[str, float] = {}
    for w in st.get("workers", []):
        for k, v in (w.get("shard") or {}).items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0) + v
    return out


def _counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


@dataclass(slots=True)
class Plan:
    cases: list[sc.Case]
    variants: list[str]
    seconds: float
    workers: int
    scaling: bool
    lossy_variants: tuple[str, ...] = ("kernel", "shardstack-packet")


def run_plan(plan: Plan, caps: Capabilities, log_dir: Path, progress: Progress,
             on_record: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    records: list[RunRecord] = []
    done = 0

    def add(rec: RunRecord) -> None:
        records.append(rec)
        if on_record:
            on_record(rec)

    # Plain cases on the direct veth; lossy ones (a link spec) behind the bridge, on
    # the variants that make sense there (AF_PACKET puts the stack on the veth).
    plain = [c for c in plan.cases if not c.link]
    lossy = [c for c in plan.cases if c.link]
    lossy_variants = [v for v in plan.variants if v in plan.lossy_variants]
    groups = [(plain, plan.variants, False), (lossy, lossy_variants, True)]
    total = sum(len(cases) * len(vs) for cases, vs, _ in groups)
    for cases, variants, bridged in groups:
        if not cases:
            continue
        for variant in variants:
            try:
                cc = (cases[0].cc or sc.LOSSY_CC) if bridged else ""
                with open_target(variant, plan.workers, caps, log_dir, bridged, cc) as target:
                    for case in cases:
                        done += 1
                        add(run_case(target, case, plan.seconds, progress, f"[{done}/{total}]"))
            except (Unavailable, NetnsError, OSError) as e:
                status = "n/a" if isinstance(e, Unavailable) and variant != "kernel" else "error"
                for case in cases:
                    if not any(r.case == case.key and r.variant == variant for r in records):
                        done += 1
                        add(RunRecord(case.key, case.scenario, variant, plan.workers, status,
                                      str(e)))
    tun_ok = any(r.variant == "shardstack-tun" and r.status == "ok" for r in records)
    if plan.scaling and plan.workers > 1 and tun_ok:
        _scaling(plan, caps, log_dir, progress, add)
    return records


def _scaling(plan: Plan, caps: Capabilities, log_dir: Path, progress: Progress,
             add: Callable[[RunRecord], None]) -> None:
    """crr (else http 1 KiB) on shardstack-tun with 1..N-1 workers (N ran already)."""
    cases = [c for c in plan.cases if c.mode == "crr"] or \
        [c for c in plan.cases if c.mode == "http" and c.size == sc.KIB]
    if not cases or "shardstack-tun" not in plan.variants:
        return
    for w in range(1, plan.workers):
        try:
            with open_target("shardstack-tun", w, caps, log_dir) as target:
                for case in cases:
                    add(run_case(target, case, plan.seconds, progress, f"[scale w={w}]"))
        except (Unavailable, NetnsError, OSError) as e:
            for case in cases:
                add(RunRecord(case.key, case.scenario, "shardstack-tun", w, "n/a", str(e)))
