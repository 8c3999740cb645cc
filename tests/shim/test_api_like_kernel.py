"""The same program's socket API calls give the same results on the stack as on
the kernel: every misuse the same exception with the same errno, every state
question the same answer (tests/shim/api_probe.py lists the calls).

Linux is the oracle: the kernel run is in the same namespace, a moment
before, with its own address in place of the stack's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

PROBE = Path(__file__).with_name("api_probe.py")
NOBODY = "198.18.250.250"  # inside the test prefix's /15, assigned to nobody


def _results(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(env, local_kernel: str, local_stack: str, nobody: str) -> None:
    kernel = _results(env.ns.run([sys.executable, str(PROBE), local_kernel, local_stack, nobody],
                                 check=False, timeout=60))
    before = env.gate_counts()
    stack = _results(env.shim_run(PROBE, local_stack, local_kernel, nobody))
    after = env.gate_counts()
    # The stack's run was on the stack: its workers accepted the program's own
    # connections (four of them get accepted).
    assert after.get("passive_opens", 0) - before.get("passive_opens", 0) >= 4, (before, after)
    assert kernel.keys() == stack.keys()
    differ = {k: (kernel[k], stack[k]) for k in kernel if kernel[k] != stack[k]}
    assert not differ, "call: (kernel, stack)\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(differ.items()))


def test_socket_api_answers_as_the_kernel_does(shared_env):
    env = shared_env
    _compare(env, env.peer, env.addr, NOBODY)


def test_ipv6_socket_api_answers_as_the_kernel_does(dual_env):
    """The same program with AF_INET6 sockets, on the stack's IPv6 address."""
    env = dual_env
    _compare(env, env.peer6, env.addr6, str(env.net6.network_address + 0x99))


WAKE_ACCEPT = """
import errno, socket, sys, threading, time
s = socket.socket()
s.bind((sys.argv[1], 7621))
s.listen()
got = []
def take():
    try:
        s.accept()
        got.append("accepted")
    except OSError as e:
        got.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
t = threading.Thread(target=take, daemon=True)
t.start()
time.sleep(0.3)  # the thread is in accept()
s.shutdown(socket.SHUT_RDWR)
t.join(5)
print(got[0] if got else "still blocked")
"""


def test_shutdown_wakes_a_thread_blocked_in_accept(shared_env, tmp_path):
    """Servers stop an accept loop in another thread with shutdown(): Linux
    ends the blocked accept() with EINVAL."""
    env = shared_env
    script = tmp_path / "wake.py"
    script.write_text(WAKE_ACCEPT)
    kernel = env.ns.run([sys.executable, str(script), env.peer], check=False, timeout=30)
    stack = env.shim_run(script, env.addr, timeout=30)
    assert kernel.stdout.strip() == "EINVAL", kernel.stdout + kernel.stderr
    assert stack.stdout.strip() == "EINVAL", stack.stdout + stack.stderr
