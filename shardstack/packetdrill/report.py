"""The `shardstack packetdrill` command: run scripts, one line per script or JSON."""

from __future__ import annotations

import argparse
import json
import re
import sys

from .executor import Result, run_file
from .profile import PROFILES

HELP = ("run packetdrill scripts against the engine in virtual time, or --live against a "
        "running stack (conformance)")
EPILOG = """\
Each script runs against shardstack.core.Shard with a virtual clock: no root, no
traffic leaves the process (the peer is packetdrill's default 192.0.2.1).  One
line per script: `pass`, `fail FILE:LINE why` (expected and actual side by
side) or `skip FILE:LINE why` (a line the runner cannot execute; never a pass).
Exit status 0 when nothing failed.

--live runs the same scripts in real time against `shardstack serve` on a TUN
device in a network namespace it creates (root; stack 198.18.99.2, peer
198.19.99.1), the system calls through the real shim.  The user-space stack
answers in milliseconds, not microseconds: --tolerance-usecs widens the
timing check.

examples:
  shardstack packetdrill tests/packetdrill/*/*.pkt
  shardstack packetdrill --json --verbose script.pkt
  sudo shardstack packetdrill --live --tolerance-usecs 20000 tests/packetdrill/passive/*.pkt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scripts", nargs="+", metavar="FILE.pkt", help="packetdrill scripts")
    p.add_argument("--json", action="store_true",
                   help='a JSON list of {"script", "status", "line", "reason", "seconds"}')
    p.add_argument("--verbose", action="store_true",
                   help="print each event, injected and sent packet with its virtual time")
    p.add_argument("--profile", choices=PROFILES, default="linux",
                   help="the defaults the stack starts from (default: linux)")
    p.add_argument("--tolerance-usecs", type=int, metavar="N",
                   help="timing tolerance floor in microseconds (packetdrill's --tolerance_usecs; "
                   "default 4000; a script's own line wins)")
    p.add_argument("--ip-version", choices=("ipv4", "ipv6"), default="ipv4",
                   help="packetdrill's --ip_version: ipv6 runs the scripts over IPv6 (AF_INET6 "
                   "sockets, fd3d:a0b:17d6::1 and fd3d:fa7b:d17d::1, MTU 1520 as Linux's "
                   "kselftests; virtual time only)")
    p.add_argument("--live", action="store_true",
                   help="run against a live stack (shardstack serve on a TUN, in a network "
                   "namespace it creates; 198.18.0.0/15) through the real shim, in real time "
                   "(needs root)")


_SIDE = re.compile(r"expected (?P<exp>'.*') got (?P<got>'.*') at (?P<t>\S+ s)$")


def line_for(r: Result, verbose: bool = False) -> str:
    if r.status == "pass":
        return f"pass {r.script}"
    where = f"{r.script}:{r.line}" if r.line is not None else r.script
    line = f"{r.status} {where} {r.reason}"
    m = _SIDE.search(r.reason) if verbose else None
    if m:  # the two packets one above the other, aligned
        line += f"\n    expected: {m['exp'][1:-1]}\n    actual:   {m['got'][1:-1]}  ({m['t']})"
    return line


def main(args: argparse.Namespace) -> int:
    results = []
    if args.live:
        from .live import run_live

        for path in args.scripts:
            r = run_live([path], verbose=args.verbose, tolerance_usecs=args.tolerance_usecs)
            results.extend(r)
            if not args.json:
                for x in r:
                    print(line_for(x, args.verbose), flush=True)
        return _finish(args, results)
    for path in args.scripts:
        log = (lambda s: print(s, file=sys.stderr)) if args.verbose else None
        if args.verbose:
            print(f"== {path}", file=sys.stderr)
        r = run_file(path, profile=args.profile, verbose=args.verbose, log=log,
                     tolerance_usecs=args.tolerance_usecs, ip_version=args.ip_version)
        results.append(r)
        if not args.json:
            print(line_for(r, args.verbose), flush=True)
    return _finish(args, results)


def _finish(args: argparse.Namespace, results: list[Result]) -> int:
    if args.json:
        json.dump([r.as_dict() for r in results], sys.stdout, indent=1)
        print()
    else:
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
        if len(results) > 1:
            print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped",
                  file=sys.stderr)
    return 1 if any(r.status == "fail" for r in results) else 0
