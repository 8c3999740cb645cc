"""CPython's socket test suite passes with its sockets on the stack.

tests/shim/cpython_socket.py runs the TCP and UDP classes of the
interpreter's Lib/test/test_socket.py under `shardstack run --loopback`
(their `localhost` is the stack); the stack's own counters show it carried
their connections.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

DRIVER = Path(__file__).with_name("cpython_socket.py")
TIMEOUT = 300  # s; the suite takes ~40 s here, one of its hangs would take forever


def test_cpython_socket_suite_on_the_stack(shared_env):
    if importlib.util.find_spec("test.test_socket") is None:
        pytest.skip("this interpreter has no test package (Debian: libpython3-testsuite)")
    env = shared_env
    before = env.gate_counts()
    proc = env.ns.popen([sys.executable, "-X", "faulthandler", "-m", "shardstack", "run",
                         "--loopback", "--", sys.executable, str(DRIVER)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        cwd=env.tmp, env=dict(os.environ, SHARDSTACK_RUN_DIR=env.run_dir))
    env.procs.append(proc)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("CPython's socket tests hung on the stack:\n" + out[-4000:])
    summary = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and summary, out[-6000:]
    run = int(summary[0].split()[1].split("=")[1])
    assert run >= 200, summary
    after = env.gate_counts()
    assert after["passive_opens"] - before.get("passive_opens", 0) >= 100, (before, after)
