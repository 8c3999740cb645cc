"""run_case end to end without root: the real client against the bench's servers on
loopback, through a stand-in for the client namespace."""

from __future__ import annotations

import io
import subprocess
import sys
import types

import pytest

from shardstack.bench import scenarios as sc
from shardstack.bench.progress import Progress
from shardstack.bench.runner import run_case
from shardstack.bench.targets import Endpoint, Target, Unavailable


class HostNs:
    """Runs the 'namespace' commands on the host (loopback only)."""

    def popen(self, argv, **kw):
        kw.pop("start_new_session", None)
        return subprocess.Popen(argv, **kw)


class LoopTarget(Target):
    def __init__(self, name: str, ports: dict[str, int] | None, server_pid: int = 0):
        super().__init__()
        self.name = name
        self.ports = ports
        self.pair = types.SimpleNamespace(client=HostNs())
        if server_pid:
            self.pids["server-echo"] = (server_pid, False)

    def setup(self) -> None:
        pass

    def start_service(self, service: str, port: int) -> Endpoint:
        if self.ports is None:
            raise Unavailable("no such service here")
        return Endpoint("127.0.0.1", self.ports[service])


@pytest.fixture(scope="module")
def echo():
    proc = subprocess.Popen([sys.executable, "-m", "shardstack.bench.servers", "--bind",
                             "127.0.0.1", "--echo", "0", "--max-seconds", "60"],
                            stdout=subprocess.PIPE, text=True)
    try:
        words = proc.stdout.readline().split()
        yield proc.pid, int(words[1].split("=")[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_run_case_collects_ticks_result_and_telemetry(echo):
    pid, port = echo
    out = io.StringIO()
    with LoopTarget("kernel", {"echo": port}, pid) as target:
        rec = run_case(target, sc.cases_for("rr")[0], 1.0, Progress(out, tty=False), "[1/1]")
    assert rec.status == "ok", rec.reason
    assert rec.result["ops"] > 0 and rec.metric("p50_us") > 0
    assert rec.ticks and rec.ticks[-1]["ops"] == rec.result["ops"]
    assert {"client", "server-echo"} <= set(rec.cpu)
    assert rec.telemetry and rec.frames_per_s is None  # no stack stats on the kernel
    assert "rr-64B" in out.getvalue()


def test_an_unavailable_shardstack_service_is_na_but_a_kernel_one_is_an_error():
    case = sc.cases_for("crr")[0]
    with LoopTarget("shardstack-tun", None) as target:
        rec = run_case(target, case, 1.0, Progress(io.StringIO(), tty=False), "")
        assert (rec.status, rec.reason, rec.result) == ("n/a", "no such service here", {})
        assert rec.metric("ops_per_s") is None
        assert target.failed == {"echo": "no such service here"}  # not retried
    with LoopTarget("kernel", None) as target:
        rec = run_case(target, case, 1.0, Progress(io.StringIO(), tty=False), "")
        assert rec.status == "error"


def test_a_client_that_cannot_connect_gives_an_error_not_a_number():
    case = sc.cases_for("rr")[0]
    with LoopTarget("shardstack-tun", {"echo": 1}) as target:  # port 1: refused
        rec = run_case(target, case, 1.0, Progress(io.StringIO(), tty=False), "")
    assert rec.status == "error" and "Refused" in rec.reason
    assert rec.metric("p50_us") is None
