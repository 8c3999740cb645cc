"""psutil telemetry sampled while a run goes: CPU%, RSS and context switches per process.

A background thread samples every `interval` seconds. Processes are watched by
role ("client", "server", "app", "supervisor"); a watched root can pull in its
descendants (the supervisor's netio and workers, a shim app's children), each
named by a classifier. CPU% comes from cpu_times deltas between samples (100%
= one core busy), so no psutil priming call is needed and a process that
appears mid-run gets a figure from its second sample on.

Optionally a `stats` callable (the stack's control-plane `stats` reply) is
polled at most every `stats_every` seconds for frame counters, turned into
frames/s; the reply also names the stack's pids (netio, worker-<i>).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

DEFAULT_INTERVAL = 0.5
STATS_EVERY = 1.0
MAX_SAMPLES = 20_000  # bounded memory on a long run


def classify_child(proc: psutil.Process, root_role: str) -> str:
    """A role name for a descendant of a watched root, from its command line.

    The stack's children say what they are in their argv (netio, worker N);
    anything else is `<root>-child`.
    """
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{root_role}-child"
    return role_from_cmdline(cmd, root_role)


_WORKER_RE = re.compile(r"worker(?:[ _=-]*|\S*\s+--?(?:id|worker-id)[ =])(\d+)")


def role_from_cmdline(cmd: str, root_role: str) -> str:
    low = cmd.lower()
    m = _WORKER_RE.search(low)
    if m:
        return f"worker-{m.group(1)}"
    if "netio" in low:
        return "netio"
    if "worker" in low:
        return "worker"
    return f"{root_role}-child"


def frames_from_stats(stats: Mapping[str, Any] | None) -> float | None:
    """Frames through the device so far (received by netio + sent by netio and the workers),
    from a `stats` reply; None when the reply has no frame counters.

    Shape (shardstack.supervisor `stats`): netio.counters.netio.rx_frames and
    .tx_replies, workers[i].counters.frames_out. Counters it does not know are
    ignored, so an older or newer stack gives what it can.
    """
    if not isinstance(stats, Mapping):
        return None
    total = None
    netio = _dig(stats, "netio", "counters", "netio")
    if isinstance(netio, Mapping):
        for key in ("rx_frames", "tx_replies"):
            if isinstance(netio.get(key), int | float):
                total = (total or 0.0) + netio[key]
    for w in stats.get("workers") or []:
        out = _dig(w, "counters", "frames_out")
        if isinstance(out, int | float):
            total = (total or 0.0) + out
    return total


def roles_from_stats(stats: Mapping[str, Any] | None) -> dict[int, str]:
    """pid -> role ("supervisor", "netio", "worker-<id>") from a `stats` reply."""
    out: dict[int, str] = {}
    if not isinstance(stats, Mapping):
        return out
    for role in ("supervisor", "netio"):
        pid = _dig(stats, role, "proc", "pid")
        if isinstance(pid, int):
            out[pid] = role
    for w in stats.get("workers") or []:
        pid = _dig(w, "proc", "pid")
        if isinstance(pid, int):
            out[pid] = f"worker-{w.get('id', '?')}"
    return out


def worker_connections(stats: Mapping[str, Any] | None) -> dict[str, int]:
    """worker id -> its current TCP connections, from a `stats` reply."""
    out: dict[str, int] = {}
    for w in (stats or {}).get("workers") or []:
        n = _dig(w, "counters", "connections")
        if isinstance(n, int):
            out[str(w.get("id", "?"))] = n
    return out


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


@dataclass(slots=True)
class _Prev:
    cpu: float
    ctx: int
    t: float


@dataclass(slots=True)
class Telemetry:
    interval: float = DEFAULT_INTERVAL
    stats: Callable[[], Mapping[str, Any] | None] | None = None
    stats_every: float = STATS_EVERY
    roots: dict[str, tuple[int, bool]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    last_stats: Mapping[str, Any] | None = None
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _prev: dict[int, _Prev] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _t0: float = 0.0
    _frames_prev: tuple[float, float] | None = None
    _stats_at: float = 0.0
    pid_roles: dict[int, str] = field(default_factory=dict)

    def watch(self, role: str, pid: int | None, children: bool = False) -> None:
        """Sample process `pid` as `role` (and its descendants when `children`)."""
        if pid is None:
            return
        with self._lock:
            self.roots[role] = (pid, children)

    def unwatch(self, role: str) -> None:
        with self._lock:
            self.roots.pop(role, None)

    def start(self) -> Telemetry:
        self._t0 = time.monotonic()
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        return self.samples

    def latest(self) -> dict[str, Any] | None:
        return self.samples[-1] if self.samples else None

    def _loop(self) -> None:
        self.sample()  # baseline for the deltas
        while not self._stop.wait(self.interval):
            s = self.sample()
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append(s)

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        fps = self._frames_per_s(now)  # first: a stats reply also names the stack's pids
        procs: dict[str, dict[str, float]] = {}
        with self._lock:
            roots = dict(self.roots)
        for role, (pid, children) in roots.items():
            for name, proc in self._expand(role, pid, children):
                fig = self._measure(proc, now)
                if fig is None:
                    continue
                slot = procs.setdefault(name, {"cpu": 0.0, "rss": 0.0, "ctx_per_s": 0.0,
                                               "nprocs": 0})
                for k, v in fig.items():
                    slot[k] += v
                slot["nprocs"] += 1
        out: dict[str, Any] = {"t": round(now - self._t0, 3), "procs": procs}
        if fps is not None:
            out["frames_per_s"] = fps
        return out

    def _expand(self, role: str, pid: int, children: bool):
        proc = self._proc(pid)
        if proc is None:
            return []
        found = [(role, proc)]
        if children:
            try:
                kids = proc.children(recursive=True)
            except psutil.Error:
                kids = []
            for kid in kids:
                p = self._procs.setdefault(kid.pid, kid)
                name = self.pid_roles.get(kid.pid) or classify_child(p, role)
                found.append((name, p))
        return found

    def _proc(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def _measure(self, proc: psutil.Process, now: float) -> dict[str, float] | None:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                cpu = t.user + t.system
                rss = proc.memory_info().rss
                c = proc.num_ctx_switches()
                ctx = c.voluntary + c.involuntary
        except psutil.Error:
            self._procs.pop(proc.pid, None)
            return None
        prev = self._prev.get(proc.pid)
        self._prev[proc.pid] = _Prev(cpu, ctx, now)
        if prev is None or now <= prev.t:
            return {"cpu": 0.0, "rss": float(rss), "ctx_per_s": 0.0}
        dt = now - prev.t
        return {"cpu": 100.0 * (cpu - prev.cpu) / dt, "rss": float(rss),
                "ctx_per_s": (ctx - prev.ctx) / dt}

    def _frames_per_s(self, now: float) -> float | None:
        if self.stats is None or now - self._stats_at < self.stats_every:
            return None
        self._stats_at = now
        try:
            reply = self.stats()
        except (OSError, ValueError):
            return None
        self.last_stats = reply
        self.pid_roles.update(roles_from_stats(reply))
        total = frames_from_stats(reply)
        if total is None:
            return None
        prev, self._frames_prev = self._frames_prev, (total, now)
        if prev is None or now <= prev[1]:
            return None
        return (total - prev[0]) / (now - prev[1])
