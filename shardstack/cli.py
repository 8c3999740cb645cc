"""The `shardstack` command: one subcommand per job (serve, run, ss, stats, reta, trace, demo, bench)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

DESCRIPTION = """\
shardstack is a user-space TCP/IPv4 stack in Python. Per-CPU worker processes
each own a shard of the TCP tables (chosen by a Toeplitz flow hash); an I/O
process faces a TUN or AF_PACKET device; unmodified Python programs run on it
through a drop-in `socket` shim.
"""

EPILOG = """\
examples:
  shardstack demo                       create a netns, serve http.server on the stack, fetch from it
  shardstack serve --tun ss0 --addr 198.18.0.2/24 --peer 198.18.0.1/24 --echo 7
  shardstack run -- python -m http.server 8000
  shardstack ss            shardstack stats --json            shardstack reta
  shardstack reta move 5 1              bucket 5 and its connections to worker 1, live
  shardstack reload                     new worker processes, connections kept
  shardstack trace --port 7             the engine's call graph for port 7's segments, live
"""

SERVE_EPILOG = """\
The stack answers ping itself; --echo/--discard run RFC 862/863 services on
every worker. Stop with Ctrl-C or SIGTERM: every process, socket and the TUN
device serve created go away.

example (as root, in a namespace of your own):
  ip netns add demo
  ip netns exec demo shardstack serve --workers 2 --tun ss0 \\
      --addr 198.18.0.2/24 --peer 198.18.0.1/24 --echo 7 --discard 9
  ip netns exec demo ping 198.18.0.2
dual stack: repeat --addr and --peer with an IPv6 prefix, e.g.
      --addr 198.18.0.2/24 --addr 2001:db8::2/64 --peer 198.18.0.1/24 --peer 2001:db8::1/64
"""


def build_parser() -> argparse.ArgumentParser:
    from shardstack import bench as bench_cmd
    from shardstack import demo as demo_cmd

    parser = argparse.ArgumentParser(
        prog="shardstack",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    run = sub.add_parser(
        "run", help="run an unmodified program on the stack: shardstack run -- python app.py"
    )
    run.add_argument("--run-dir", help="the stack's run directory (default: as serve picks)")
    run.add_argument("--loopback", action="store_true",
                     help="also put 127.0.0.0/8 TCP on the stack (app and local clients both on it)")
    run.add_argument("--no-check", action="store_true",
                     help="start the program even if no stack answers yet")
    run.add_argument("--kernel-sockets", choices=("warn", "exit"), default="warn",
                     help="a TCP socket that C code opened on the kernel where the stack should "
                          "have it: report it loudly (warn) or also end the program (exit)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- the program and its arguments")
    for name, what in (("ss", "list TCP sockets on the stack, like `ss -tan`"),
                       ("stats", "per-process and per-worker counters and telemetry")):
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("--run-dir", help="the stack's run directory (default: as serve picks)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "ss":
            p.add_argument("-i", "--info", action="store_true",
                           help="each connection's TCP_INFO (rtt, cwnd, pacing_rate, "
                                "delivery_rate, app_limited, busy/rwnd_limited/"
                                "sndbuf_limited, rcv_rtt/rcv_space, reordering), like `ss -ti`")
    what = "the RETA: which worker owns each bucket, per-bucket load, moves so far"
    p = sub.add_parser("reta", help=what, description=what)
    p.add_argument("--run-dir", help="the stack's run directory (default: as serve picks)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every bucket, idle ones too")
    p.add_argument("move", nargs="*", metavar="move BUCKET WORKER",
                   help="move one bucket to WORKER, its connections with it (no byte lost, "
                   "no reset; a move that cannot finish, its transfer given 2 s, is aborted "
                   "and the bucket stays)")
    what = ("replace every worker process by a new one (current code and config), "
            "moving its connections away and back: established connections survive")
    p = sub.add_parser("reload", help=what, description=what + ". Needs --workers 2 or more.")
    p.add_argument("--run-dir", help="the stack's run directory (default: as serve picks)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    what = "print what the engine does for a port's or a connection's segments, live"
    p = sub.add_parser("trace", help=what, description=what + ". Attaches to the running "
                       "stack, no restart; nothing is traced (or costs anything) once it exits.")
    p.add_argument("--run-dir", help="the stack's run directory (default: as serve picks)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--port", type=int, metavar="N",
                       help="trace TCP segments whose source or destination port is N")
    which.add_argument("--conn", metavar="LADDR:LPORT-RADDR:RPORT",
                       help="trace one connection (the stack's address first, as `ss` shows)")
    p.add_argument("--follow", action="store_true",
                   help="keep tracing until Ctrl-C (default: stop once traffic on the port "
                   "has been quiet for a second, or after --timeout)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="without --follow, stop after S seconds at most (default 30)")
    p.add_argument("--json", action="store_true", help="one JSON object per traced segment")
    demo = sub.add_parser(
        "demo", help="self-contained demo in a network namespace it creates (needs root)"
    )
    demo_cmd.add_arguments(demo)
    bench = sub.add_parser("bench", help="benchmarks against the Linux kernel's TCP in the same run")
    bench_cmd.add_arguments(bench)
    _add_impair_bridge(sub)
    _add_packetdrill(sub)
    return parser


IMPAIR_BRIDGE_EPILOG = """\
A lossy link for testing anything (not only shardstack), where the kernel has
no sch_netem: it forwards every frame between IF_A and IF_B (AF_PACKET,
promiscuous) with seeded loss, duplication, reordering, delay and an optional
rate limit, independently in each direction. Give its interfaces no address.

example (as root; client and server namespaces each joined to the bridge's by a veth):
  ip netns exec br shardstack impair-bridge vc vs --loss 1% --reorder 10% \\
      --delay-ms 10 --seed 7 --seconds 60
"""


def _add_impair_bridge(sub) -> None:
    from shardstack.netio import bridge

    p = sub.add_parser("impair-bridge", help="forward frames between two interfaces with "
                       "seeded loss/dup/reorder/delay (a netem for any test)",
                       description="Forward L2 frames between two interfaces with seeded "
                       "impairment in each direction.", epilog=IMPAIR_BRIDGE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bridge.add_arguments(p)



def _add_packetdrill(sub) -> None:
    from shardstack.packetdrill import report

    p = sub.add_parser("packetdrill", help=report.HELP, description=report.HELP,
                       epilog=report.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(p)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the stack (netio + workers + supervisor) in the foreground",
        description="Run the stack in the foreground: a netio process, N workers, a supervisor.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: one per CPU)")
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--tun", metavar="NAME", help="a TUN device (created if missing)")
    dev.add_argument("--packet", metavar="IFACE", help="an existing interface, via AF_PACKET")
    p.add_argument("--addr", required=True, action="append", metavar="ADDR/N",
                   help="the stack's address, IPv4 (A.B.C.D/N) or IPv6 (X:Y::Z/N); repeat "
                   "once for dual stack (one of each)")
    p.add_argument("--peer", action="append", default=[], metavar="ADDR/N",
                   help="give the kernel side of the TUN this address and bring it up "
                   "(one per family of --addr; IPv6 without duplicate address detection)")
    p.add_argument("--gateway", metavar="A.B.C.D", help="next hop for addresses off-link")
    p.add_argument("--mtu", type=int, default=1500,
                   help="the device MTU; the MSS we advertise follows from it (default 1500)")
    p.add_argument("--run-dir", help="where the control sockets live (default: "
                   "$SHARDSTACK_RUN_DIR, else /run/shardstack as root, else "
                   "$XDG_RUNTIME_DIR/shardstack)")
    p.add_argument("--echo", type=int, action="append", default=[], metavar="PORT",
                   help="run an RFC 862 echo service on PORT (repeatable)")
    p.add_argument("--discard", type=int, action="append", default=[], metavar="PORT",
                   help="run an RFC 863 discard service on PORT (repeatable)")
    p.add_argument("--impair", metavar="SPEC",
                   help="fault injection, e.g. loss=0.01,reorder=0.05,delay=2ms,seed=1")
    p.add_argument("--pcap", metavar="FILE", help="capture both directions to a pcap file (Wireshark reads it); "
                   "receive then goes through the netio process")
    p.add_argument("--no-offload", dest="offload", action="store_false",
                   help="no virtio-net header: every frame MTU-sized, checksums in software")
    p.add_argument("--pin", action="store_true",
                   help="worker i on CPU i, and on TUN the kernel's receive work for a worker's "
                   "frames on the other CPUs: faster bulk transfers when the stack has the CPUs "
                   "to itself, slower when apps share them (default: the scheduler places workers)")
    p.add_argument("--max-connections", type=int, default=0, metavar="N",
                   help="most connections per worker (established, handshaking, TIME-WAIT); "
                   "SYNs past it are dropped and counted (default: no cap)")
    p.add_argument("--tcp-mem", metavar="LOW,PRESSURE,HIGH", default=None,
                   help="per-worker queued-memory limits in MiB, like Linux tcp_mem: above "
                   "PRESSURE out-of-order data is not kept, above HIGH new connections "
                   "are refused (default 128,256,512)")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus/OpenMetrics text at http://HOST:PORT/metrics "
                   "(HOST defaults to 127.0.0.1: loopback only unless you name another)")
    p.add_argument("--rebalance", choices=("auto", "off"), default="auto",
                   help="auto (default): move RETA buckets, with their connections, from the "
                   "busiest worker to the idlest when its CPU is over 120%% of the mean for a "
                   "second, and back off when moves do not even the load (docs/howto.md); "
                   "off: the RETA changes only by `shardstack reta move`")
    p.add_argument("--ecn", type=int, choices=(0, 1, 2), default=2,
                   help="ECN (RFC 3168), as Linux's net.ipv4.tcp_ecn: 0 off, 1 ask for it "
                   "on outgoing connections and accept it, 2 accept it when a peer asks "
                   "(default 2, Linux's default)")
    p.add_argument("--pacing", action="store_true",
                   help="pace every connection at its pacing rate (cwnd x MSS / SRTT, "
                   "200 %% in slow start, 120 %% after), as Linux under the fq qdisc; by "
                   "default only sockets with SO_MAX_PACING_RATE are paced, as Linux "
                   "with CUBIC and no fq")
    p.add_argument("--mtu-probing", type=int, choices=(0, 1, 2), default=0,
                   help="path MTU probing (RFC 4821), as Linux's net.ipv4.tcp_mtu_probing: "
                   "0 off (default, as Linux), 1 on once a path drops large segments "
                   "without ICMP (a black hole), 2 always (start at 1024 bytes, probe up)")
    p.set_defaults(serve_parser=p)  # so argument errors print serve's usage


def _version() -> str:
    from shardstack import __version__

    return f"shardstack {__version__}"


def serve_config(args: argparse.Namespace):
    """The validated ServeConfig for `serve`'s arguments (ConfigError if invalid)."""
    from shardstack.config import (
        ServeConfig,
        new_secret,
        parse_cidr,
        parse_ip,
        parse_port,
        split_families,
    )
    from shardstack.rundir import select_run_dir

    if args.impair:
        _check_impair(args.impair)
    addr, addr6 = split_families([parse_cidr(a, "--addr") for a in args.addr], "--addr")
    peer, peer6 = split_families([parse_cidr(a, "--peer") for a in args.peer], "--peer")
    cfg = ServeConfig(
        workers=args.workers,
        device="tun" if args.tun else "packet",
        ifname=args.tun or args.packet,
        addr=addr,
        peer=peer,
        addr6=addr6,
        peer6=peer6,
        gateway=parse_ip(args.gateway, "--gateway") if args.gateway else None,
        mtu=args.mtu,
        run_dir=str(select_run_dir(args.run_dir)),
        echo_ports=[parse_port(p, "--echo port") for p in args.echo],
        discard_ports=[parse_port(p, "--discard port") for p in args.discard],
        impair=args.impair,
        pcap=os.path.abspath(args.pcap) if args.pcap else None,
        offload=args.offload,
        pin=args.pin,
        metrics=args.metrics,
        secret=new_secret(),
        max_connections=args.max_connections,
        tcp_mem=_parse_tcp_mem(args.tcp_mem),
        rebalance=args.rebalance,
        ecn=args.ecn,
        pacing=args.pacing,
        mtu_probing=args.mtu_probing,
    )
    return cfg.validate()


def _parse_tcp_mem(text: str | None) -> list[int]:
    """``--tcp-mem 128,256,512`` (MiB) -> bytes; [] keeps the engine's default."""
    from shardstack.config import ConfigError

    if not text:
        return []
    try:
        low, pressure, high = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--tcp-mem wants LOW,PRESSURE,HIGH in MiB, not {text!r}") from None
    if not 0 < low <= pressure <= high:
        raise ConfigError("--tcp-mem needs 0 < LOW <= PRESSURE <= HIGH")
    return [low << 20, pressure << 20, high << 20]


def _check_impair(spec: str) -> None:
    from shardstack.config import ConfigError

    try:
        from shardstack.netio.impair import parse_impair_spec
    except ImportError:
        return
    try:
        parse_impair_spec(spec)
    except ValueError as e:
        raise ConfigError(f"bad --impair {spec!r}: {e}") from None


def cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from shardstack.config import ConfigError

    try:
        cfg = serve_config(args)
    except ConfigError as e:
        parser.error(str(e))
    from shardstack.supervisor import serve

    try:
        return serve(cfg)
    except OSError as e:
        # A clear one-line answer, plus where it came from (a setsockopt or ioctl fails
        # for many reasons); SHARDSTACK_DEBUG=1 shows the whole traceback.
        print(f"shardstack serve: {e} ({_origin(e)})", file=sys.stderr)
        if os.environ.get("SHARDSTACK_DEBUG"):
            traceback.print_exc()
        return 1


def _origin(exc: BaseException) -> str:
    """'in FUNCTION (FILE:LINE)' of the innermost frame of exc's traceback."""
    tb = exc.__traceback__
    if tb is None:
        return "origin unknown"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"in {code.co_name} ({os.path.basename(code.co_filename)}:{tb.tb_lineno})"


def _control_call(args: argparse.Namespace, op: str, timeout: float = 10.0,
                  **kw: Any) -> dict[str, Any] | None:
    from shardstack import control
    from shardstack.rundir import open_run_dir, select_run_dir

    run = open_run_dir(select_run_dir(args.run_dir))
    try:
        return control.call(run.control_sock, op, timeout=timeout, **kw)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"shardstack {op}: no stack running in {run.path}", file=sys.stderr)
    except OSError as e:
        print(f"shardstack {op}: {e}", file=sys.stderr)
    return None


def cmd_ss(args: argparse.Namespace) -> int:
    from shardstack.stats import format_ss

    reply = _control_call(args, "ss")
    if reply is None:
        return 1
    conns = reply.get("conns", [])
    print(json.dumps(conns, indent=1) if args.json else format_ss(conns, args.info))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from shardstack.stats import format_stats

    reply = _control_call(args, "stats")
    if reply is None:
        return 1
    reply.pop("ok", None)
    print(json.dumps(reply, indent=1) if args.json else format_stats(reply))
    return 0


def cmd_reta(args: argparse.Namespace) -> int:
    from shardstack.reta import format_reta

    if args.move:
        return _reta_move(args)
    reply = _control_call(args, "reta")
    if reply is None:
        return 1
    reply.pop("ok", None)
    print(json.dumps(reply, indent=1) if args.json else format_reta(reply, args.all))
    return 0


def _reta_move(args: argparse.Namespace) -> int:
    words = args.move
    if len(words) != 3 or words[0] != "move" or not all(w.isdigit() for w in words[1:]):
        print("usage: shardstack reta move BUCKET WORKER", file=sys.stderr)
        return 2
    reply = _control_call(args, "reta_move", bucket=int(words[1]), worker=int(words[2]))
    if reply is None:
        return 1
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=1))
    else:
        print(f"bucket {reply['bucket']}: worker {reply['from']} -> {reply['to']}, "
              f"{reply['conns']} connections ({reply['app_conns']} apps'), pause "
              f"{reply['pause'] * 1e3:.2f} ms, {reply['held']} frames held, "
              f"{reply['seconds'] * 1e3:.1f} ms in all")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _control_call(args, "reload", timeout=120.0)
    if reply is None:
        return 1
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=1))
    else:
        for w in reply["workers"]:
            print(f"worker {w['worker']}: pid {w['old_pid']} -> {w['pid']}, "
                  f"{w['conns']} connections moved away and back, new process ready in "
                  f"{w['replace_seconds']:.1f} s")
    return 0


TRACE_POLL = 0.1  # s between trace_take requests
TRACE_QUIET = 1.0  # s without events that ends a trace without --follow


def cmd_trace(args: argparse.Namespace) -> int:
    import time

    from shardstack import control
    from shardstack.rundir import open_run_dir, select_run_dir
    from shardstack.tracer import format_event

    what: dict[str, Any] = {"port": args.port}
    if args.conn:
        from shardstack.tracer import parse_conn

        try:
            conn = parse_conn(args.conn)
        except ValueError as e:
            print(f"shardstack trace: {e}", file=sys.stderr)
            return 2
        what = {"port": conn[1], "conn": list(conn)}
    run = open_run_dir(select_run_dir(args.run_dir))
    try:
        client = control.ControlClient(run.control_sock, timeout=10.0)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"shardstack trace: no stack running in {run.path}", file=sys.stderr)
        return 1
    with client:  # closing it detaches the trace, whatever happens here
        try:
            tid = client.call("trace_start", **what)["tid"]
        except OSError as e:
            print(f"shardstack trace: {e}", file=sys.stderr)
            return 1
        print(f"tracing {args.conn or f'port {args.port}'}"
              + (" (Ctrl-C to stop)" if args.follow else ""),
              file=sys.stderr, flush=True)
        start = last = time.monotonic()
        seen = 0
        try:
            while True:
                reply = client.call("trace_take", tid=tid)
                for ev in reply.get("events", []):
                    print(json.dumps(ev) if args.json else format_event(ev), flush=True)
                    seen += 1
                if reply.get("dropped"):
                    print(f"({reply['dropped']} segments not shown: trace buffer full)",
                          file=sys.stderr, flush=True)
                now = time.monotonic()
                if reply.get("events"):
                    last = now
                if not args.follow and (now - start > args.timeout
                                        or (seen and now - last > TRACE_QUIET)):
                    break
                time.sleep(TRACE_POLL)
        except KeyboardInterrupt:
            pass
        finally:
            try:
                client.call("trace_stop", tid=tid)
            except OSError:
                pass
    return 0


def _launch(argv: list[str]) -> int:
    from shardstack.shim.launcher import main as launcher_main

    return launcher_main(argv)


def main(argv: list[str] | None = None) -> int:
    from shardstack import bench as bench_cmd
    from shardstack import demo as demo_cmd

    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["run"] and argv[1:2] not in (["-h"], ["--help"]):
        # The launcher parses its own options up to `--` (or the first non-option), so a
        # program's flags are never mistaken for ours.
        return _launch(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "serve":
        return cmd_serve(args.serve_parser, args)
    if args.command == "ss":
        return cmd_ss(args)
    if args.command == "stats":
        return cmd_stats(args)
    if args.command == "reta":
        return cmd_reta(args)
    if args.command == "reload":
        return cmd_reload(args)
    if args.command == "trace":
        return cmd_trace(args)
    if args.command == "demo":
        return demo_cmd.main(args=args)
    if args.command == "impair-bridge":
        from shardstack.netio import bridge

        return bridge.run_command(args)
    if args.command == "packetdrill":
        from shardstack.packetdrill import report

        return report.main(args)
    return bench_cmd.main(args=args)


if __name__ == "__main__":
    raise SystemExit(main())
