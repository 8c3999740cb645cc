"""`shardstack demo`: the whole stack end to end, in a network namespace it makes and removes.

What it does (as root):
  1. creates a network namespace and, in it, `shardstack serve --workers 2` on a TUN
     device: the stack owns 198.18.x.2, the kernel side of the TUN is 198.18.x.1;
  2. pings the stack (answered by netio);
  3. runs an unmodified `python -m http.server` on the stack through the shim
     (`shardstack run -- python -m http.server ...`);
  4. fetches pages and a generated file from the kernel side with curl and with a
     Python client (urllib), and checks every body's SHA-256;
  5. shows a live line while it runs (connections per worker, frames/s, CPU per
     process) and prints a short summary;
  6. removes everything it created, also on Ctrl-C or SIGTERM.

Paths: `--path full` is the above. `--path kernel` serves the same files from
the kernel's TCP instead (http.server bound to the TUN's kernel side), for when
the stack's TCP or the shim is not there yet. The default, `auto`, takes the
full path when the CLI offers `serve` and `run` and the app answers through
the stack, and otherwise falls back and says why, loudly. Only the server
start differs between the paths (`_start_http`): fetching, checking and the
summary are the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
HTTP_PORT = 8000
DEFAULT_SIZE = 4 * 1024 * 1024
FETCH_TIMEOUT = 30.0
APP_READY_TIMEOUT = 15.0
TUN_NAME = "ssdemo0"

URLLIB_FETCH = """\
import hashlib, json, sys, urllib.request
url, out = sys.argv[1], sys.argv[2]
h = hashlib.sha256(); n = 0
with urllib.request.urlopen(url, timeout=20) as r, open(out, "wb") as f:
    status = r.status
    while True:
        chunk = r.read(65536)
        if not chunk:
            break
        h.update(chunk); f.write(chunk); n += len(chunk)
print(json.dumps({"status": status, "bytes": n, "sha256": h.hexdigest()}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="stack workers (default 2)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="bytes in the generated file (default 4 MiB)")
    p.add_argument("--path", choices=("auto", "full", "kernel"), default="auto",
                   help="full: http.server on shardstack via the shim; kernel: on the "
                        "kernel's TCP; auto: full when it works, else kernel (default)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON here")


@dataclass(slots=True)
class Fetch:
    tool: str
    url: str
    status: int = 0
    nbytes: int = 0
    sha256: str = ""
    expected: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.sha256 == self.expected and not self.error


@dataclass(slots=True)
class Summary:
    path: str = ""
    path_note: str = ""
    stack: bool = False
    stack_note: str = ""
    ping: str = ""
    fetches: list[Fetch] = field(default_factory=list)
    per_worker_peak: dict[str, int] = field(default_factory=dict)
    per_worker_ss: dict[str, int] = field(default_factory=dict)
    per_worker_accepted: dict[str, int] = field(default_factory=dict)
    frames_per_worker: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def sha_ok(self) -> bool:
        return bool(self.fetches) and all(f.sha256 == f.expected for f in self.fetches)

    @property
    def ok(self) -> bool:
        return bool(self.fetches) and all(f.ok for f in self.fetches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sha256_match"] = self.sha_ok
        d["ok"] = self.ok
        d["bytes_fetched"] = sum(f.nbytes for f in self.fetches)
        return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstack demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Run the demo; `args` when the `shardstack` CLI parsed them already."""
    p = build_parser()
    a = args if args is not None else p.parse_args(argv)
    if not 1 <= a.workers <= 16 or not 0 <= a.size <= 1 << 30:
        p.error("--workers must be 1..16 and --size 0..1 GiB")
    from shardstack import netns as nsmod

    missing = nsmod.missing_requirements()
    if missing:
        print("shardstack demo needs: " + "; ".join(missing) + ".", file=sys.stderr)
        print("It creates its own network namespace and TUN device (198.18.0.0/15) and "
              "removes them when done; run it as root, e.g. `sudo shardstack demo`.",
              file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return Demo(a, nsmod).run()
    except KeyboardInterrupt:
        print("\nshardstack demo: interrupted; removed everything it created", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


class Demo:
    def __init__(self, a: argparse.Namespace, nsmod):
        from shardstack.bench.progress import Progress

        self.a = a
        self.ns_mod = nsmod
        self.out = Progress(sys.stdout, plain_every=1.0)
        self.summary = Summary()
        self.run_dir = ""
        self.serve: subprocess.Popen | None = None
        self.app: subprocess.Popen | None = None

    def say(self, text: str) -> None:
        self.out.line(text)

    def run(self) -> int:
        from shardstack.bench.targets import probe_capabilities

        nsmod = self.ns_mod
        nsmod.cleanup_stale("ssd")
        caps = probe_capabilities()
        net = nsmod.next_subnet()
        self.stack_ip = str(net.network_address + 2)
        self.kernel_ip = str(net.network_address + 1)
        with contextlib.ExitStack() as stack:
            ns = stack.enter_context(nsmod.netns("ssd"))
            self.ns = ns
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ssdemo-")))
            self.say(f"demo: network namespace {ns.name}, stack {self.stack_ip}, "
                     f"kernel side {self.kernel_ip} (TUN {TUN_NAME})")
            files = self._make_files(tmp / "www")
            self._start_stack(stack, caps, net, tmp)
            self._ping()
            self._start_http(stack, caps, tmp, files)
            tel = self._telemetry(stack)
            self._fetch_all(files, tmp / "got")
            self._collect(tel)
            self._print_summary()
            if self.a.json:
                Path(self.a.json).write_text(json.dumps(self.summary.to_dict(), indent=1))
            self.say("demo: cleaning up (namespace, TUN, processes, run directory)")
        self.say("demo: done" + ("" if self.summary.ok else " (with failures)"))
        return 0 if self.summary.ok else 1

    # -- set-up ------------------------------------------------------------------------

    def _make_files(self, www: Path) -> dict[str, str]:
        """name -> SHA-256 of the files http.server will serve."""
        www.mkdir()
        (www / "index.html").write_text("<html><body><h1>shardstack demo</h1>"
                                        '<a href="data.bin">data.bin</a></body></html>\n')
        (www / "hello.txt").write_text("hello from an unmodified http.server\n" * 32)
        with open(www / "data.bin", "wb") as f:
            left = self.a.size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
        self.www = www
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in www.iterdir()}

    def _start_stack(self, stack: contextlib.ExitStack, caps, net, tmp: Path) -> None:
        from shardstack.bench.targets import shardstack_argv, wait_ready

        nsmod = self.ns_mod
        if not (caps.serve and caps.tun):
            self.summary.stack_note = caps.reasons.get("serve", "no --tun in `shardstack serve`")
            self.say(f"demo: NOTE the stack cannot start here ({self.summary.stack_note}); "
                     "creating the TUN with `ip tuntap` and using the kernel only")
            stack.enter_context(nsmod.tuntap(self.ns, TUN_NAME, addr=nsmod.host(net, 1)))
            return
        self.run_dir = str(tmp / "run")
        log = open(tmp / "serve.log", "wb")  # noqa: SIM115
        stack.callback(log.close)
        argv = shardstack_argv("serve", "--workers", str(self.a.workers), "--tun", TUN_NAME,
                               "--addr", nsmod.host(net, 2), "--peer", nsmod.host(net, 1),
                               "--run-dir", self.run_dir)
        self.say("demo: starting " + " ".join(argv[2:]))
        self.serve = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(self._stop, self.serve)
        why = wait_ready(self.run_dir, self.serve)
        if why:
            tail = (tmp / "serve.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"demo: {why}\n  " + "\n  ".join(tail))
        self.summary.stack = True
        self.say(f"demo: stack up ({self.a.workers} workers, run dir {self.run_dir})")

    def _stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def _ping(self) -> None:
        if not self.summary.stack:
            self.summary.ping = "skipped (no stack)"
            return
        proc = self.ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", self.stack_ip],
                           check=False, timeout=10)
        line = next((ln for ln in proc.stdout.splitlines() if "packets transmitted" in ln), "")
        self.summary.ping = line or f"ping failed: {proc.stderr.strip()}"
        self.say(f"demo: ping {self.stack_ip} (answered by the stack's netio): {self.summary.ping}")

    def _start_http(self, stack: contextlib.ExitStack, caps, tmp: Path, files) -> None:
        """The one place the paths differ: where http.server runs."""
        want = self.a.path
        reason = ""
        if want in ("auto", "full"):
            reason = self._why_not_full(caps)
            if not reason:
                reason = self._start_app_on_stack(stack, tmp)
            if not reason:
                self.summary.path = "full"
                self.base = f"http://{self.stack_ip}:{HTTP_PORT}"
                self.say(f"demo: http.server runs ON SHARDSTACK via the shim at {self.base}")
                return
            if want == "full":
                raise SystemExit(f"demo: --path full is not possible: {reason}")
        self.summary.path = "kernel"
        self.summary.path_note = reason or "asked for --path kernel"
        argv = [PY, "-m", "http.server", "--bind", self.kernel_ip, "--directory", str(self.www),
                str(HTTP_PORT)]
        self.app = self.ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(self._stop, self.app)
        self.base = f"http://{self.kernel_ip}:{HTTP_PORT}"
        why = self._wait_tcp(self.kernel_ip, HTTP_PORT, self.app)
        if why:
            raise SystemExit(f"demo: http.server on the kernel did not start: {why}")
        bar = "!" * 78
        self.say(f"{bar}\ndemo: FALLBACK: http.server runs on the KERNEL's TCP at {self.base}, "
                 f"not on shardstack,\n      because {self.summary.path_note}\n{bar}")

    def _why_not_full(self, caps) -> str:
        if not self.summary.stack:
            return f"the stack is not running ({self.summary.stack_note})"
        if not caps.run:
            return caps.reasons.get("run", "`shardstack run` is not available")
        return ""

    def _start_app_on_stack(self, stack: contextlib.ExitStack, tmp: Path) -> str:
        from shardstack.bench.targets import shardstack_argv

        app = [PY, "-m", "http.server", "--bind", self.stack_ip, "--directory", str(self.www),
               str(HTTP_PORT)]
        env = dict(os.environ, SHARDSTACK_RUN_DIR=self.run_dir)
        log = open(tmp / "app.log", "wb")  # noqa: SIM115
        stack.callback(log.close)
        self.say("demo: starting shardstack run -- " + " ".join(["python", *app[1:]]))
        self.app = self.ns.popen(shardstack_argv("run", "--", *app), env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        stack.callback(self._stop, self.app)
        why = self._wait_tcp(self.stack_ip, HTTP_PORT, self.app)
        if why:
            self._stop(self.app)
            tail = (tmp / "app.log").read_text(errors="replace").strip().splitlines()[-2:]
            return f"the app on the stack did not answer ({why}; app log: {' | '.join(tail)})"
        return ""

    def _wait_tcp(self, host: str, port: int, server: subprocess.Popen) -> str:
        from shardstack.bench.targets import wait_tcp

        return wait_tcp(self.ns, host, port, APP_READY_TIMEOUT, server)

    # -- the live view -------------------------------------------------------------------

    def _telemetry(self, stack: contextlib.ExitStack):
        from shardstack.bench.targets import control_call
        from shardstack.bench.telemetry import Telemetry, worker_connections

        stats = (lambda: control_call(self.run_dir, "stats")) if self.summary.stack else None
        tel = Telemetry(interval=0.5, stats=stats, stats_every=0.5)
        if self.serve:
            tel.watch("supervisor", self.serve.pid, children=True)
        if self.app:
            tel.watch("app", self.app.pid, children=True)
        tel.start()
        stop = threading.Event()

        def live() -> None:
            while not stop.wait(0.5):
                s = tel.latest()
                if s is None:
                    continue
                conns = worker_connections(tel.last_stats)
                for w, n in conns.items():
                    peak = self.summary.per_worker_peak
                    peak[w] = max(peak.get(w, 0), n)
                parts = [" ".join(f"w{w}:{n}" for w, n in conns.items()) or "conns n/a"]
                fps = s.get("frames_per_s")
                parts.append(f"{fps:.0f} frames/s" if fps is not None else "frames/s n/a")
                parts.append(" ".join(f"{r} {p['cpu']:.0f}%" for r, p in sorted(s["procs"].items())))
                self.out.update("live: " + " | ".join(parts))

        t = threading.Thread(target=live, name="demo-live", daemon=True)
        t.start()

        def finish() -> None:
            stop.set()
            t.join(timeout=2)
            tel.stop()

        stack.callback(finish)
        self._finish_live = finish
        return tel

    # -- fetching ------------------------------------------------------------------------

    def _fetch_all(self, files: dict[str, str], dest: Path) -> None:
        dest.mkdir()
        plan = [("curl", "index.html"), ("curl", "hello.txt"), ("curl", "data.bin")]
        plan += [("urllib", "index.html"), ("urllib", "hello.txt")] * 3 + [("urllib", "data.bin")]
        for i, (tool, name) in enumerate(plan):
            f = Fetch(tool, f"{self.base}/{name}", expected=files[name])
            out = dest / f"{i}-{name}"
            if tool == "curl":
                self._curl(f, out)
            else:
                self._urllib(f, out)
            self.summary.fetches.append(f)
            state = "ok" if f.ok else f"FAILED {f.error}"
            self.say(f"  {tool:<6} GET {f.url:<40} {f.status} {f.nbytes:>9} B  sha256 "
                     f"{'match' if f.sha256 == f.expected else 'MISMATCH'}  {state}")

    def _curl(self, f: Fetch, out: Path) -> None:
        proc = self.ns.run(["curl", "-sS", "--max-time", str(int(FETCH_TIMEOUT)), "-o", str(out),
                            "-w", "%{http_code} %{size_download}", f.url], check=False,
                           timeout=FETCH_TIMEOUT + 5)
        try:
            code, size = proc.stdout.split()
            f.status, f.nbytes = int(code), int(float(size))
        except ValueError:
            f.error = proc.stderr.strip() or "curl gave no status"
        if out.exists():
            f.sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
        if proc.returncode != 0 and not f.error:
            f.error = f"curl exit {proc.returncode}: {proc.stderr.strip()}"

    def _urllib(self, f: Fetch, out: Path) -> None:
        proc = self.ns.run([PY, "-c", URLLIB_FETCH, f.url, str(out)], check=False,
                           timeout=FETCH_TIMEOUT + 5)
        try:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            f.status, f.nbytes, f.sha256 = r["status"], r["bytes"], r["sha256"]
        except (ValueError, IndexError, KeyError):
            f.error = (proc.stderr.strip().splitlines() or ["urllib gave no result"])[-1]

    # -- summary -------------------------------------------------------------------------

    def _collect(self, tel) -> None:
        from shardstack.bench.targets import control_call

        time.sleep(0.6)  # one more telemetry sample after the last fetch
        self._finish_live()
        cpu: dict[str, list[float]] = {}
        for s in tel.samples:
            for role, p in s["procs"].items():
                cpu.setdefault(role, []).append(p["cpu"])
        self.summary.cpu = {r: round(sum(v) / len(v), 1) for r, v in sorted(cpu.items())}
        if not self.summary.stack:
            return
        with contextlib.suppress(OSError):
            ss = control_call(self.run_dir, "ss") or {}
            for c in ss.get("conns", []):
                if str(c.get("state", "")).upper() != "LISTEN":
                    w = str(c.get("worker", "?"))
                    self.summary.per_worker_ss[w] = self.summary.per_worker_ss.get(w, 0) + 1
        with contextlib.suppress(OSError):
            st = control_call(self.run_dir, "stats") or {}
            for w in st.get("workers", []):
                # Passive opens count every connection a worker accepted, whatever
                # happened after: `ss` no longer lists one whose client closed first
                # (no TIME-WAIT on our side), nor one in flight between workers.
                opens = w.get("shard", {}).get("passive_opens")
                if isinstance(opens, int):
                    self.summary.per_worker_accepted[str(w.get("id", "?"))] = opens
            per = st.get("netio", {}).get("counters", {}).get("dispatch", {}).get("per_worker")
            if isinstance(per, list):
                self.summary.frames_per_worker = [int(x) for x in per]

    def _print_summary(self) -> None:
        s = self.summary
        ok_http = sum(1 for f in s.fetches if f.status == 200)
        total = sum(f.nbytes for f in s.fetches)
        self.say("")
        self.say("summary")
        self.say(f"  path:            {s.path}"
                 + (" (http.server on shardstack through the shim)" if s.path == "full"
                    else f" (FALLBACK: http.server on the kernel's TCP: {s.path_note})"))
        self.say(f"  stack:           {'running, ' + str(self.a.workers) + ' workers' if s.stack else 'not started: ' + s.stack_note}")
        self.say(f"  ping via stack:  {s.ping}")
        self.say(f"  HTTP status:     {ok_http}/{len(s.fetches)} fetches 200 OK")
        self.say(f"  bytes fetched:   {total}")
        self.say(f"  SHA-256 match:   {'yes' if s.sha_ok else 'NO'} "
                 f"({sum(1 for f in s.fetches if f.sha256 == f.expected)}/{len(s.fetches)})")
        if s.stack:
            self.say("  per worker:      connections accepted (passive opens): "
                     + (", ".join(f"w{w}={n}" for w, n in sorted(s.per_worker_accepted.items())) or "none"))
            self.say("                   connections still listed by `ss` (incl. TIME-WAIT): "
                     + (", ".join(f"w{w}={n}" for w, n in sorted(s.per_worker_ss.items())) or "none"))
            self.say("                   peak connections seen in `stats`: "
                     + (", ".join(f"w{w}={n}" for w, n in sorted(s.per_worker_peak.items())) or "none"))
            self.say("                   frames dispatched by netio: "
                     + (", ".join(f"w{i}={n}" for i, n in enumerate(s.frames_per_worker)) or "n/a"))
        self.say("  mean CPU:        " + (", ".join(f"{r} {c}%" for r, c in s.cpu.items()) or "n/a"))


if __name__ == "__main__":
    raise SystemExit(main())
