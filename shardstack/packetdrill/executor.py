"""Run one packetdrill script against ``shardstack.core.Shard`` in virtual time.

The clock only moves forward, to the next event's time or to the engine's
next timer deadline, whichever comes first; every packet the engine sends is
stamped with the virtual time it left.  So a script takes milliseconds and
gives the same verdict every run.

Timing follows packetdrill (run.c ``verify_time``): an event may be late or
early by max(4 ms, 12.5 % of the time since the previous event); relative
times count from when the previous event actually happened (an inbound
packet after an inbound packet: from its script time).  A system call with
``...END`` blocks: the executor goes on with the following packets and
finishes the call the moment the engine lets it (when its accept queue
fills, data arrives, the handshake completes ...), then checks that moment
against END.  A system call without ``...`` must return at once.

Outbound packets queue in order; each ``>`` line takes the next, and in
non-strict mode (packetdrill's default) a line whose payload is longer than
the segment glues the following segments to it.  ``%{ }%`` blocks see the
``tcpi_*`` fields of the connection as they were at their time, and run at
the end, as packetdrill runs them.
"""

from __future__ import annotations

import errno as E
import os
import socket
import textwrap
import time
from dataclasses import dataclass
from typing import Any

from shardstack.core import Shard, ShardConfig
from shardstack.core import tcp_info as _tcp_info
from shardstack.core.wire.ipv4 import ip_to_str, str_to_ip
from shardstack.core.wire.ipv6 import str_to_ip6

from . import packets as P
from . import profile as prof
from .script import Event, IcmpSpec, PacketSpec, Script, Syscall, Unsupported, parse_script
from .syscalls import Call, Layer, Outcome, Unknown, const, value

BASE = 1000.0  # virtual time of script time 0 (an arbitrary origin, > 0)
GRACE = 30.0  # how far past an expected time we look, to say what did happen
TOLERANCE = 0.004
TOLERANCE_PERCENT = 12.5
LOCAL_IP = "192.168.0.1"  # packetdrill's defaults; virtual mode only: nothing leaves the process
REMOTE_IP = "192.0.2.1"
#: --ip_version=ipv6: the addresses and MTU Linux's packetdrill kselftests use
#: (tools/testing/selftests/net/packetdrill): MTU 1520 keeps the MSS at 1460.
LOCAL_IP6 = "fd3d:a0b:17d6::1"
REMOTE_IP6 = "fd3d:fa7b:d17d::1"
MTU6 = 1520
REMOTE_PORT = 47513  # the peer's port in a passive open (any port works)


@dataclass(slots=True)
class Result:
    script: str
    status: str  # "pass" "fail" "skip"
    line: int | None = None
    reason: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"script": self.script, "status": self.status, "line": self.line,
                "reason": self.reason, "seconds": round(self.seconds, 4)}


class Fail(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


@dataclass(slots=True)
class Pending:
    call: Call
    event: Event
    start: float  # script time it was made
    end: float  # script time it should return
    began: float = 0.0  # virtual time it was first attempted (its own timeout counts from it)


class Executor:
    def __init__(self, script: Script, settings: prof.Settings, verbose: bool = False,
                 log=None, ip_version: str = "ipv4") -> None:
        self.script = script
        self.settings = settings
        self.verbose = verbose
        self.log = log or (lambda s: None)
        self.tol_abs = TOLERANCE
        self.tol_pct = TOLERANCE_PERCENT
        self.shard: Shard | None = None
        self.cfg: ShardConfig | None = None
        self.layer: Layer | None = None
        self.now = BASE
        self.out: list[P.Wire] = []
        self.local_ip = str_to_ip(LOCAL_IP)
        self.remote_ip = str_to_ip(REMOTE_IP)
        self.local_port: int | None = None
        self.remote_port = REMOTE_PORT
        self.local_isn: int | None = None
        self.flow_isn: dict[int, int] = {}  # flows named by port in the script: peer port -> ISN
        self.remote_isn = 0
        self.ts_map: dict[int, int] = {}
        self.ts_first: tuple[int, int] | None = None
        self.pending: Pending | None = None
        self.code: list[tuple[Event, dict[str, int] | None]] = []
        self.prev: Event | None = None
        self.prev_time = 0.0  # script time of the previous event, after adjustment
        self.strict = False  # --strict_segments: one line, one segment
        self.ts_tick = 0.0  # --tcp_ts_tick_usecs: check outbound TS val against the script
        # A call without "...END" must return at once (virtual time: it does, unless only
        # a timer can finish it).  Live calls take the shim's real time: like packetdrill,
        # only their start is timed.
        self.instant_calls = True
        self.grace = GRACE  # how long past an expected time to wait to report what came
        self._spins = 0
        self.v6 = False
        if ip_version == "ipv6":
            self.use_ipv6()

    def use_ipv6(self) -> None:
        """packetdrill's --ip_version=ipv6: IPv6 addresses, AF_INET6 sockets for the
        script's AF_INET, MTU 1520 unless the script sets --mtu."""
        self.v6 = True
        self.local_ip = str_to_ip6(LOCAL_IP6)
        self.remote_ip = str_to_ip6(REMOTE_IP6)
        if "mtu" not in self.script.options:
            self.settings.mtu = MTU6

    # -- the clock ----------------------------------------------------------------------------

    def t(self) -> float:
        """Script time now."""
        return self.now - BASE

    def start_stack(self) -> None:
        if self.shard is not None:
            return
        s = self.settings
        addrs = ([], [self.local_ip]) if self.v6 else ([self.local_ip], [])
        self.cfg = ShardConfig(addrs=addrs[0], addrs6=addrs[1], mtu=s.mtu, secret=b"packetdrill",
                               syncookies=s.syncookies, window_scaling=s.window_scaling,
                               sack=s.sack, timestamps=s.timestamps, rcvbuf=s.rcvbuf,
                               sndbuf=s.sndbuf, congestion=s.congestion,
                               syn_linear_timeouts=s.syn_linear_timeouts, ecn=s.ecn,
                               mtu_probing=s.mtu_probing, base_mss=s.base_mss)
        self.shard = Shard(self.cfg, self.now)
        self.layer = Layer(self.shard, self.local_ip, self.remote_ip)
        if self.v6:
            self.layer.family = socket.AF_INET6

    def collect(self) -> None:
        self._drain()
        if self.pending is not None:
            self.poke()
            self._drain()

    def _drain(self) -> None:
        for frame in self.shard.take_frames():
            w = P.decode(frame, self.t())
            if w is not None:
                self.out.append(w)
                if self.verbose:
                    self.log(f"  {self.t():9.6f} sent     {self._wtext(w)}")
        self.layer.absorb(self.shard.take_events())

    def step_to(self, t: float) -> bool:
        """Fire the engine's timers due up to script time ``t`` (one at a time); False at t."""
        target = BASE + t
        d = self.shard.next_deadline()
        wake = self._pending_wake()
        nxt = min(x for x in (d, wake, target) if x is not None)
        if nxt > target:
            nxt = target
        nxt = max(nxt, self.now)
        self._spins = self._spins + 1 if nxt == self.now else 0
        if self._spins > 10000:  # time must move on: a loop here is a runner bug, say so
            raise RuntimeError(f"virtual clock stuck at {self.t():.6f} s")
        self.now = nxt
        self.shard.advance(self.now)
        self.collect()
        return nxt < target

    def run_until(self, t: float) -> None:
        while self.now < BASE + t - 1e-12 and self.step_to(t):
            pass
        if self.now < BASE + t:
            self.now = BASE + t
            self.shard.advance(self.now)
            self.collect()

    def next_change(self) -> float | None:
        d = self.shard.next_deadline()
        wake = self._pending_wake()
        cands = [x for x in (d, wake) if x is not None]
        return min(cands) - BASE if cands else None

    def _pending_wake(self) -> float | None:
        """When a blocked call's own timeout (poll) ends, if that is still ahead."""
        p = self.pending
        if p is not None and p.call.timeout is not None:
            wake = p.began + p.call.timeout
            if wake > self.now:
                return wake
        return None

    # -- timing -------------------------------------------------------------------------------

    def tolerance(self, expected: float) -> float:
        return max(self.tol_abs, self.tol_pct / 100.0 * max(0.0, expected - self.prev_time))

    def check_time(self, ev: Event, expected: float, end: float | None, actual: float,
                   what: str, tol: float | None = None) -> None:
        if ev.time.kind == "any":
            return
        tol = self.tolerance(expected) if tol is None else tol
        hi = end if end is not None else expected
        if actual < expected - tol - 1e-9 or actual > hi + tol + 1e-9:
            span = f"{expected:.6f}" if end is None else f"{expected:.6f}~{end:.6f}"
            raise Fail(ev.line, f"timing error: expected {what} at {span} s but it happened "
                                f"at {actual:.6f} s (tolerance {tol:.6f} s)")

    def event_times(self, ev: Event) -> tuple[float, float | None, float]:
        """(start, range end, offset) in script time, packetdrill's adjust_relative_event_times."""
        tm = ev.time
        if tm.kind == "abs":
            return tm.start, tm.end, 0.0
        anchored = (self.prev is not None and _inbound(self.prev) and _inbound(ev))
        offset = self.prev_time if anchored else self.t()
        if tm.kind == "any":
            return offset, None, offset
        return offset + tm.start, (offset + tm.end) if tm.end is not None else None, offset

    # -- running ------------------------------------------------------------------------------

    def run(self) -> None:
        opts = self.script.options
        for name, val in opts.items():
            line = self.script.option_lines[name]
            if name == "tolerance_usecs":
                self.tol_abs = int(val) / 1e6
            elif name == "tolerance_percent":
                self.tol_pct = float(val)
            elif name == "ip_version" and val == "ipv4" and not self.v6:
                pass
            elif name == "ip_version" and val == "ipv6":
                self.use_ipv6()
            elif name == "strict_segments":
                self.strict = True
            elif name == "tcp_ts_tick_usecs":
                self.ts_tick = int(val) / 1e6
            elif name == "mss":
                pass  # the GSO size of injected packets: the engine takes any size whole
            elif name == "mtu" and val.isdigit():
                self.settings.mtu = int(val)
            else:
                raise Unsupported(line, f"option --{name}={val}")
        for ev in self.script.events:
            if ev.kind == "shell":
                self.shell(ev)
                continue
            self.start_stack()
            start, end, offset = self.event_times(ev)
            if ev.kind == "packet" and ev.body.direction == ">":
                self.outbound(ev, start, end)
            else:
                if ev.kind == "syscall" or ev.kind == "code":
                    if self.pending and ev.kind == "syscall":
                        self.finish_pending(ev.line)
                self.run_until(max(start, self.t()))
                if ev.kind == "packet":
                    self.inbound(ev)
                elif ev.kind == "syscall":
                    self.syscall(ev, start, offset)
                else:
                    self.code.append((ev, self.snapshot()))
            self.prev = ev
            self.prev_time = start if ev.time.kind != "any" else self.t()
        if self.shard is None:
            return
        if self.pending:
            self.finish_pending(self.pending.event.line)
        self.run_code()

    def shell(self, ev: Event) -> None:
        base = os.path.dirname(os.path.abspath(self.script.path))

        def read(path: str) -> str | None:
            full = path if os.path.isabs(path) else os.path.join(base, path)
            try:
                with open(full, encoding="utf-8") as f:
                    return f.read()
            except OSError:
                return None
        why = prof.apply_shell(self.settings, ev.body, read)
        if why:
            raise Unsupported(ev.line, why)
        if self.cfg is not None:  # settings read when connections start
            s = self.settings
            for name in ("syncookies", "window_scaling", "sack", "timestamps", "rcvbuf",
                         "sndbuf", "congestion", "syn_linear_timeouts", "ecn", "mtu_probing",
                         "base_mss"):
                setattr(self.cfg, name, getattr(s, name))

    # -- packets ------------------------------------------------------------------------------

    def icmp_frame(self, ev: Event) -> bytes:
        try:
            return P.build_icmp_inbound(ev.body, self.remote_ip, self.local_ip,
                                        self.local_port or self.layer.bind_port,
                                        self.remote_port, self.local_isn or 0)
        except ValueError as e:
            raise Unsupported(ev.line, str(e)) from None

    def inbound(self, ev: Event) -> None:
        spec: PacketSpec = ev.body
        if isinstance(spec, IcmpSpec):
            if self.verbose:
                self.log(f"  {self.t():9.6f} inject   {spec.text[1:].strip()}")
            self.shard.receive(self.icmp_frame(ev), self.now)
            self.collect()
            return
        if self.local_port is None:
            self.local_port = self.layer.bind_port
        ack_flag = "." in spec.flags
        ecr_map = self.map_ecr if ack_flag else None
        rport, lport, isn = self.remote_port, self.local_port, self.local_isn
        if spec.sport is not None:
            rport, lport = spec.sport, spec.dport
            isn = self.flow_isn.get(rport)
        frame = P.build_inbound(spec, self.remote_ip, self.local_ip, rport, lport, isn or 0,
                                ecr_map)
        if self.verbose:
            self.log(f"  {self.t():9.6f} inject   {spec.text[1:].strip()}")
        self.shard.receive(frame, self.now)
        self.collect()

    def map_ecr(self, ecr: int) -> int:
        if ecr in self.ts_map:
            return self.ts_map[ecr]
        if self.ts_first is not None:
            return (ecr - self.ts_first[0] + self.ts_first[1]) % 2**32
        return ecr

    def outbound(self, ev: Event, start: float, end: float | None) -> None:
        spec: PacketSpec = ev.body
        tol = self.tolerance(start)
        limit = (end if end is not None else start) + tol
        if ev.time.kind == "any":
            limit = self.t() + self.grace
        first = self.next_packet(limit + self.grace)
        if first is None:
            raise Fail(ev.line, f"expected {spec.text} at {start:.6f} s; nothing was sent "
                                f"(waited until {self.t():.6f} s)")
        parts = [first]
        # Non-strict mode: packetdrill sniffs on while the payload is short of the
        # line's, bare ACKs included, and checks the aggregate.
        while (not self.strict and sum(p.length for p in parts) < spec.length
               and not parts[-1].flags & (P.FLAG_BITS["S"] | P.FLAG_BITS["R"])):
            nxt = self.next_packet(limit, peek=True)
            if nxt is None or nxt.flags & (P.FLAG_BITS["S"] | P.FLAG_BITS["R"]):
                break
            parts.append(self.out.pop(0))
        w = parts[0] if len(parts) == 1 else P.glue(parts)
        if spec.dport is not None:  # a flow of its own: its own ISN
            if "S" in spec.flags and spec.dport not in self.flow_isn:
                self.flow_isn[spec.dport] = (w.seq - spec.seq) % 2**32
            isn = self.flow_isn.get(spec.dport, (w.seq - spec.seq) % 2**32)
        elif "S" in spec.flags and (self.local_isn is None or "." not in spec.flags):
            # The stack's ISN (and port, for an active open).  As packetdrill: each
            # SYN we send starts afresh, but a SYN-ACK for a later connection on
            # the same 4-tuple (TIME-WAIT reuse) keeps the first one's base.
            self.local_isn = (w.seq - spec.seq) % 2**32
            if self.local_port is None or "." not in spec.flags:
                self.local_port = w.sport
                if "." not in spec.flags:
                    self.remote_port = w.dport
        if spec.dport is None:
            isn = self.local_isn if self.local_isn is not None else w.seq - spec.seq
        why = P.mismatch(spec, w, isn, self.remote_isn)
        if why is not None:
            raise Fail(ev.line, f"bad outbound packet ({why}): expected "
                                f"{spec.text[1:].strip()!r} got {P.wire_text(w, isn, self.remote_isn)!r}"
                                f" at {w.time:.6f} s")
        self.check_time(ev, start, end, w.time, "outbound packet", tol)
        self.check_tsval(ev, spec, w)
        self.learn_ts(spec, w)
        if self.now - BASE < w.time:
            self.now = BASE + w.time

    def next_packet(self, limit: float, peek: bool = False) -> P.Wire | None:
        while not self.out:
            nxt = self.next_change()
            if nxt is None or nxt > limit:
                return None
            self.step_to(nxt)
        return self.out[0] if peek else self.out.pop(0)

    def check_tsval(self, ev: Event, spec: PacketSpec, w: P.Wire) -> None:
        """With a TS tick, the TS val (moved to script space) must be the script's, within
        the tolerance (packetdrill's verify_outbound_tcp_option)."""
        script_ts = next((o.value for o in spec.options or [] if o.kind == "TS"), None)
        actual = w.ts()
        if not self.ts_tick or script_ts is None or actual is None or self.ts_first is None:
            return
        live = (self.ts_first[0] + actual[0] - self.ts_first[1]) % 2**32
        delta = abs(((live - script_ts[0] + 2**31) % 2**32) - 2**31)
        tol = max(self.tol_abs, self.tol_pct / 100.0 * max(self.t(), 0.0))
        if delta * self.ts_tick > tol + 1e-9:
            raise Fail(ev.line, f"bad outbound TCP timestamp value: expected TS val "
                                f"{script_ts[0]} got {live} (tick {self.ts_tick * 1e6:.0f} us, "
                                f"tolerance {tol:.6f} s)")

    def learn_ts(self, spec: PacketSpec, w: P.Wire) -> None:
        script_ts = next((o.value for o in spec.options or [] if o.kind == "TS"), None)
        actual = w.ts()
        if script_ts is None or actual is None:
            return
        self.ts_map[script_ts[0]] = actual[0]
        if self.ts_first is None:
            self.ts_first = (script_ts[0], actual[0])

    def _wtext(self, w: P.Wire) -> str:
        isn = self.local_isn if self.local_isn is not None else w.seq
        return P.wire_text(w, isn, self.remote_isn)

    # -- system calls -------------------------------------------------------------------------

    def syscall(self, ev: Event, start: float, offset: float) -> None:
        sc: Syscall = ev.body
        try:
            call = self.layer.make(sc.name, sc.args, sc.ret)
        except Unknown as e:
            raise Unsupported(ev.line, str(e)) from None
        if self.verbose:
            self.log(f"  {self.t():9.6f} call     {ev.text}")
        began = self.now
        out = self._attempt(call, ev)
        self._drain()  # what the call sent left now
        end = None
        if ev.end is not None:
            end = ev.end + (offset if ev.end_rel else 0.0)
        if out is None:
            if end is not None:
                self.pending = Pending(call, ev, start, end, began)
                return
            # Not declared blocking: packetdrill's main thread would wait for it; only
            # the engine's timers can move it now.
            self.pending = Pending(call, ev, start, start, began)
            self.finish_pending(ev.line)
            return
        self.collect()
        self.verify(ev, out)
        if end is not None:
            self.check_time(ev, end, None, self.t(), "system call return",
                            max(self.tol_abs, self.tol_pct / 100 * (end - start)))

    def _attempt(self, call: Call, ev: Event) -> Outcome | None:
        try:
            return call.attempt(self.now)
        except Unknown as e:
            raise Unsupported(ev.line, str(e)) from None

    def poke(self) -> None:
        """Give a blocked call its chance after the engine's state changed."""
        p = self.pending
        if p is None:
            return
        out = self._attempt(p.call, p.event)
        if out is None:
            return
        self.pending = None
        self.verify(p.event, out)
        if p.event.end is not None or self.instant_calls:
            self.check_time(p.event, p.end, None, self.t(), "system call return",
                            max(self.tol_abs, self.tol_pct / 100 * (p.end - p.start)))

    def finish_pending(self, line: int) -> None:
        """Wait (in virtual time) for the blocked call to return."""
        p = self.pending
        limit = p.end + self.tolerance(p.end) + self.grace
        while self.pending is p:
            nxt = self.next_change()
            if nxt is None or nxt > limit:
                raise Fail(p.event.line, f"{p.event.body.name}() blocked and never returned "
                                         f"(expected it back at {p.end:.6f} s; "
                                         f"waited until {self.t():.6f} s)")
            self.step_to(nxt)
            if self.pending is p:
                self.poke()

    def verify(self, ev: Event, out: Outcome) -> None:
        sc: Syscall = ev.body
        want = value(sc.ret)
        if want is not ...:
            if out.ret != want:
                got = f"{out.ret}" + (f" {E.errorcode.get(out.errno, out.errno)}" if out.errno else "")
                exp = f"{want}" + (f" {sc.errno}" if sc.errno else "")
                raise Fail(ev.line, f"{sc.name}() returned {got}; expected {exp}")
        if sc.errno is not None and want == -1:
            try:
                errno_want = const(sc.errno)
            except Unknown:
                raise Unsupported(ev.line, f"errno {sc.errno}") from None
            if out.errno != errno_want:
                raise Fail(ev.line, f"{sc.name}() failed with "
                                    f"{E.errorcode.get(out.errno, out.errno)}; expected {sc.errno}")
        self.verify_outs(ev, out)

    def verify_outs(self, ev: Event, out: Outcome) -> None:
        sc: Syscall = ev.body
        name = sc.name
        if name == "getsockopt" and "optval" in out.outs and len(sc.args) > 3:
            want = value(sc.args[3])
            if want is not ... and out.outs["optval"] != want:
                raise Fail(ev.line, f"getsockopt() value {out.outs['optval']}; expected {want}")
        if name == "ioctl" and "optval" in out.outs and len(sc.args) > 2:
            want = value(sc.args[2])
            if want is not ... and out.outs["optval"] != want:
                raise Fail(ev.line, f"ioctl() value {out.outs['optval']}; expected {want}")
        if name == "poll" and "revents" in out.outs:
            for fd, got in zip(value(sc.args[0]), out.outs["revents"], strict=False):
                want = fd.get("revents", ...)
                if want is not ... and want != got:
                    raise Fail(ev.line, f"poll() revents {_poll_names(got)}; expected "
                                        f"{_poll_names(want)}")

    # -- %{ }% code -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, int] | None:
        fd = self.layer.conn_fd if self.layer.conn_fd in self.layer.fds else self.layer.last_fd
        vs = self.layer.fds.get(fd)
        if vs is None:
            return None
        try:
            sk = self.shard.sock(vs.sd)
        except OSError:
            return None
        if vs.listening:
            raw = _tcp_info.tcp_listen_info(len(sk.accept_queue), sk.backlog)
        else:
            raw = _tcp_info.tcp_get_info(sk, self.now)
        info = _tcp_info.unpack_tcp_info(raw)
        return {k if k.startswith("tcpi_") else "tcpi_" + k: v for k, v in info.items()}

    def run_code(self) -> None:
        for ev, snap in self.code:
            if snap is None:
                raise Fail(ev.line, "%{ }% block with no socket to read tcp_info from")
            ns: dict[str, Any] = {**_linux_state_names(), **snap}
            try:
                src = textwrap.dedent(ev.body.strip("\n"))
                exec(compile(src, f"{self.script.path}:{ev.line}", "exec"), ns)  # noqa: S102
            except AssertionError as e:
                src = " ".join(ev.body.split())
                raise Fail(ev.line, f"assertion failed in %{{ {src[:120]} }}%"
                                    + (f": {e}" if str(e) else "")
                                    + " (" + ", ".join(f"{k}={snap[k]}" for k in sorted(snap)
                                                       if k in ev.body) + ")") from None
            except NameError as e:
                raise Unsupported(ev.line, f"%{{ }}% uses {e}") from None
            except Exception as e:  # the block's own error, as packetdrill reports it
                raise Fail(ev.line, f"%{{ }}% raised {type(e).__name__}: {e}") from None


def _linux_state_names() -> dict[str, int]:
    names = ["ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
             "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
    out = {f"TCP_{n}": i for i, n in enumerate(names, 1)}
    out.update({"TCP_CA_Open": 0, "TCP_CA_Disorder": 1, "TCP_CA_CWR": 2, "TCP_CA_Recovery": 3,
                "TCP_CA_Loss": 4})
    return out


def _poll_names(mask: int) -> str:
    import select
    names = [n for n in ("POLLIN", "POLLPRI", "POLLOUT", "POLLERR", "POLLHUP", "POLLNVAL",
                         "POLLRDNORM", "POLLWRNORM") if mask & getattr(select, n)]
    if mask & 0x2000:
        names.append("POLLRDHUP")
    return "|".join(names) or "0"


def _inbound(ev: Event) -> bool:
    return ev.kind == "packet" and ev.body.direction == "<"


def run_text(text: str, path: str = "<script>", profile: str = "linux",
             verbose: bool = False, log=None, tolerance_usecs: int | None = None,
             ip_version: str = "ipv4") -> Result:
    t0 = time.perf_counter()
    name = path
    try:
        script = parse_script(text, path)
        ex = Executor(script, prof.linux(), verbose=verbose, log=log, ip_version=ip_version)
        if tolerance_usecs is not None:
            ex.tol_abs = tolerance_usecs / 1e6
        ex.run()
    except Unsupported as e:
        return Result(name, "skip", e.line, e.why, time.perf_counter() - t0)
    except Fail as e:
        return Result(name, "fail", e.line, e.reason, time.perf_counter() - t0)
    except Exception as e:  # a runner bug must show, never pass
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Result(name, "fail", None, f"runner error {type(e).__name__}: {e} "
                      f"({os.path.basename(where.filename)}:{where.lineno})",
                      time.perf_counter() - t0)
    return Result(name, "pass", None, "", time.perf_counter() - t0)


def run_file(path: str, profile: str = "linux", verbose: bool = False, log=None,
             tolerance_usecs: int | None = None, ip_version: str = "ipv4") -> Result:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return Result(path, "fail", None, f"cannot read: {e.strerror}")
    return run_text(text, path, profile, verbose, log, tolerance_usecs, ip_version)


__all__ = ["Result", "run_file", "run_text", "Executor", "ip_to_str"]
