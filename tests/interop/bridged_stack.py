"""A shardstack `serve` on AF_PACKET behind `shardstack impair-bridge`, in a
`netns.bridged_pair`: the set-up the ECN and path-MTU interop tests share
(root check, serve until ready, the bridge, stopping what they started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from shardstack import control, netns

PY = sys.executable


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, veth)")
    missing = netns.missing_requirements()
    assert not missing, f"root but cannot build namespaces: {missing}"


def stop(p: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 15 s: bounded either way."""
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def start_serve(pair: netns.BridgedPair, run_dir: str, log: IO[bytes], log_path: Path,
                args: list[str]) -> subprocess.Popen:
    """`serve --workers 1 --packet veth0 ARGS` in the server namespace; returns
    once it says ready (60 s at most, failing with its log if it exits)."""
    serve = pair.server.popen([PY, "-m", "shardstack", "serve", "--workers", "1", "--packet",
                               "veth0", "--run-dir", run_dir, *args],
                              stdout=log, stderr=subprocess.STDOUT)
    sock = Path(run_dir) / "control.sock"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert serve.poll() is None, log_path.read_text()
            try:
                if control.call(sock, "hello", timeout=5)["ready"]:
                    return serve
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve never became ready"
            time.sleep(0.05)
    except BaseException:
        stop(serve)  # the caller never got it to stop
        raise


def start_bridge(pair: netns.BridgedPair, args: list[str]) -> subprocess.Popen:
    """`impair-bridge` between the pair's bridge ends (300 s at most), JSON
    counters at exit; fails at once if it does not start."""
    br = pair.bridge.popen([PY, "-m", "shardstack", "impair-bridge", pair.bridge_a,
                            pair.bridge_b, *args, "--seconds", "300", "--interval", "0",
                            "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert br.poll() is None, br.communicate()[1]
    return br


def stop_bridge(br: subprocess.Popen | None) -> dict:
    """Stop the bridge; its per-direction counters ({} if it was not running)."""
    if br is None or br.poll() is not None:
        return {}
    br.send_signal(signal.SIGTERM)
    out, _ = br.communicate(timeout=20)
    return json.loads(out.strip().splitlines()[-1])["counters"]
