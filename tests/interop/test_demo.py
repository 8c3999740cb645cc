"""`shardstack demo` end to end: exit 0, every body's SHA-256 matches, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from shardstack import netns
from shardstack.bench.targets import probe_capabilities

pytestmark = pytest.mark.interop


def _demo(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardstack", "demo", *args],
                          capture_output=True, text=True, timeout=240, **kw)


def test_demo_fetches_and_verifies_then_cleans_up(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TUN)")
    missing = netns.missing_requirements()
    if missing:
        pytest.fail("root, but cannot build namespaces: " + "; ".join(missing))
    if shutil.which("curl") is None:
        pytest.fail("curl is missing (Debian package curl; `make debs` installs it)")
    before = set(netns.list_netns())
    out = tmp_path / "summary.json"
    proc = _demo("--size", str(1 << 20), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["sha256_match"] is True and summary["ok"] is True
    assert "SHA-256 match:   yes" in proc.stdout
    tools = {f["tool"] for f in summary["fetches"]}
    assert tools == {"curl", "urllib"}
    assert all(f["status"] == 200 for f in summary["fetches"])
    assert summary["bytes_fetched"] >= 2 * (1 << 20)  # the generated file, twice
    if summary["stack"]:
        assert summary["ping"].startswith("3 packets transmitted, 3 received")
    caps = probe_capabilities()
    if caps.serve and caps.tun and caps.run:
        # Everything the full path needs is built: a fallback would hide a broken stack.
        assert summary["path"] == "full", summary["path_note"]
    if summary["path"] != "full":
        # The fallback must say so, loudly and with its reason.
        assert "FALLBACK" in proc.stdout and summary["path_note"]
    else:
        # Every fetch was accepted by one of the stack's workers (counted once, on
        # the worker that took the SYN; the readiness probe's connect counts too).
        accepted = summary["per_worker_accepted"]
        assert sum(accepted.values()) >= len(summary["fetches"]), accepted
    leftovers = {n for n in set(netns.list_netns()) - before if n.startswith("ssd-")}
    assert not leftovers
    assert "Traceback" not in proc.stderr


def test_demo_without_root_explains_and_exits_2():
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv missing: cannot drop root for this check")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                sys.executable, "-m", "shardstack", "demo"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    else:
        proc = _demo()
    assert proc.returncode == 2
    assert "needs: root" in proc.stderr and "Traceback" not in proc.stderr
