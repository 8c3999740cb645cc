"""The shim in other processes: the launcher, subprocess inheritance, fork and spawn."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from shardstack.shim import launcher
from stackpair import SERVER_IP, as_nobody, listener

CHILD_TIMEOUT = 60


def _echo_server():
    srv = listener(backlog=16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.1)
        for _ in range(600):
            if stop.is_set():
                return
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            with c:
                c.settimeout(10)
                while data := c.recv(65536):
                    c.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(10)
        srv.close()

    return srv.getsockname()[1], close


CLIENT = textwrap.dedent("""
    import socket, sys
    print(type(socket.socket()).__name__)
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
        c.sendall(b"from " + sys.argv[3].encode())
        print(c.recv(100).decode())
""")


def _run(argv, run_dir, **kw):
    env = dict(os.environ, SHARDSTACK_RUN_DIR=str(run_dir))
    env.pop("SHARDSTACK_SHIM", None)
    return subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, **kw)


def test_python_dash_m_shim_runs_a_script(stack, tmp_path):
    port, close = _echo_server()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    r = _run([sys.executable, "-m", "shardstack.shim", "--run-dir", str(stack.run_dir),
              str(script), SERVER_IP, str(port), "script"], stack.run_dir)
    close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ShimSocket", "from", "script"]


def test_shardstack_run_and_grandchildren(stack, tmp_path):
    """`shardstack run` execs; a subprocess of the app is on the stack too."""
    port, close = _echo_server()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run(["python3", {str(script)!r}, {SERVER_IP!r}, "{port}", "grandchild"],
                       check=True)
    """))
    r = _run([sys.executable, "-m", "shardstack", "run", "--", "python", str(parent)],
             stack.run_dir, cwd=tmp_path)
    close()
    assert r.returncode == 0, r.stderr
    # python3 in the grandchild is whatever PATH finds, not necessarily the
    # venv's: the shim came via PYTHONPATH and the _boot sitecustomize.
    assert r.stdout.split()[-3:] == ["ShimSocket", "from", "grandchild"]


def test_multiprocessing_spawn_and_fork(stack, tmp_path):
    port, close = _echo_server()
    script = tmp_path / "mp.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing as mp, socket

        def work(tag, q):
            with socket.create_connection(({SERVER_IP!r}, {port}), timeout=10) as c:
                c.sendall(tag.encode())
                q.put((type(c).__name__, c.recv(100).decode()))

        if __name__ == "__main__":
            for method in ("spawn", "fork"):
                ctx = mp.get_context(method)
                q = ctx.Queue()
                p = ctx.Process(target=work, args=(method, q))
                p.start()
                print(*q.get(timeout=30))
                p.join(30)
                assert p.exitcode == 0
    """))
    r = _run([sys.executable, "-m", "shardstack.shim", str(script)], stack.run_dir)
    close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ShimSocket spawn", "ShimSocket fork"]


def test_forked_child_serves_inherited_listener(stack):
    """A pre-forking server: the child accepts on the parent's listener."""
    srv = listener(backlog=4)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # child: accept one, echo, exit without running pytest's teardown
        code = 1
        try:
            c, _ = srv.accept()
            c.sendall(c.recv(100) + b" from child")
            c.close()
            srv.close()  # not the owner process: must not release the parent's bind
            code = 0
        finally:
            os._exit(code)
    with socket.create_connection((SERVER_IP, port), timeout=10) as c:
        c.sendall(b"hi")
        assert c.recv(100) == b"hi from child"
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with socket.create_connection((SERVER_IP, port), timeout=10) as c:  # still listening
        s, _ = srv.accept()
        s.close()
    srv.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_other_users_get_eacces(stack):
    """SO_PEERCRED on worker-<i>.sock: a client that is not the stack's user."""
    os.chmod(stack.run_dir / "worker-0.sock", 0o666)

    def client(run_dir: str) -> bytes:
        from shardstack.shim.sock import kernel_socket
        from shardstack.shim.stack import read_frame

        s = kernel_socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(f"{run_dir}/worker-0.sock")
        return str(read_frame(s, bytearray()).get("errno")).encode()

    got, code = as_nobody(stack.run_dir, client)
    assert got == str(errno.EACCES).encode()
    assert code == 0


def test_launcher_check_passes_with_a_stack(stack):
    assert launcher._check(str(stack.run_dir)) is None
