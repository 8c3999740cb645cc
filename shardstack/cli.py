"""The `shardstack` command: one subcommand per job (serve, run, ss, stats, demo, bench)."""

from __future__ import annotations

import argparse
import sys

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
  shardstack ss            shardstack stats --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardstack",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the stack (netio + workers + supervisor) in the foreground")
    sub.add_parser("run", help="run an unmodified program on the stack: shardstack run -- python app.py")
    sub.add_parser("ss", help="list TCP sockets on the stack, like `ss -tan`")
    sub.add_parser("stats", help="per-process and per-worker counters and telemetry")
    sub.add_parser("demo", help="self-contained demo in a network namespace it creates (needs root)")
    sub.add_parser("bench", help="benchmarks against the Linux kernel's TCP in the same run")
    return parser


def _version() -> str:
    from shardstack import __version__

    return f"shardstack {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"shardstack {args.command}: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
