"""The start-up every supervisor child shares (shardstack.child): the
description on stdin, the ready byte, Ctrl-C left to the supervisor, and
death with the supervisor. Real processes; no root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from shardstack.config import ServeConfig, parse_cidr

# A child whose run() reports what it was given, then waits for SIGTERM.
CHILD = """
import signal, sys, time
from shardstack.child import child_main

def run(d):
    d.ready()
    print(d.wid, d.workers, d.reta[:3], d.dev["kind"], d.cfg.ifname, d.ready_fd, flush=True)
    signal.sigwait([signal.SIGTERM]) if sys.argv[1] == "wait" else None
    return 7

signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
sys.exit(child_main(run))
"""


def _desc(ready_w: int, wid: int = 1) -> str:
    cfg = ServeConfig(workers=2, device="tun", ifname="t0", addr=parse_cidr("198.18.0.2/24"),
                      run_dir="/nonexistent", secret=b"k" * 32).validate()
    return json.dumps({"config": cfg.to_dict(), "worker": wid, "workers": 2,
                       "reta": [0, 1] * 64, "ready_fd": ready_w,
                       "tx": {"kind": "tun", "fd": 99, "mtu": 1500, "vnet_hdr": False}})


def _spawn(mode: str) -> tuple[subprocess.Popen, int]:
    ready_r, ready_w = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, pass_fds=[ready_w])
    os.close(ready_w)
    p.stdin.write(_desc(ready_w))
    p.stdin.close()
    return p, ready_r


def test_child_reads_its_description_and_reports_ready():
    p, ready_r = _spawn("exit")
    try:
        assert os.read(ready_r, 1) == b"1"
        assert os.read(ready_r, 1) == b""  # written once, then closed
        assert p.wait(30) == 7
        assert p.stdout.read().split() == ["1", "2", "[0,", "1,", "0]", "tun", "t0", "None"]
    finally:
        os.close(ready_r)
        p.stdout.close()


def test_child_leaves_ctrl_c_to_the_supervisor():
    p, ready_r = _spawn("wait")
    try:
        assert os.read(ready_r, 1) == b"1"
        p.send_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches the whole group
        time.sleep(0.3)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 7
    finally:
        os.close(ready_r)
        p.stdout.close()
        if p.poll() is None:
            p.kill()


MIDDLE = """
import os, subprocess, sys, time
ready_r, ready_w = os.pipe()
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], "wait"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, pass_fds=[ready_w])
child.stdin.write(sys.argv[2].replace("READY", str(ready_w)).encode())
child.stdin.close()
os.read(ready_r, 1)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_child_dies_with_its_supervisor():
    """SIGKILL the parent (nothing of it runs): the child still goes, by the
    parent-death signal (prctl PR_SET_PDEATHSIG), as a worker must not
    outlive a crashed supervisor."""
    desc = _desc(0).replace('"ready_fd": 0', '"ready_fd": READY')
    mid = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD, desc], stdout=subprocess.PIPE,
                           text=True)
    pid = None
    try:
        pid = int(mid.stdout.readline())
        assert _alive(pid)
        mid.kill()
        mid.wait(30)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the child outlived its parent"
    finally:
        mid.stdout.close()
        if mid.poll() is None:
            mid.kill()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)  # a failed run leaves nothing behind
