"""Run-directory selection, creation, the one-serve lock and cleanup."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from shardstack.netio.process import control_endpoint, worker_endpoint

from shardstack import rundir


@pytest.mark.parametrize(
    "explicit, env, uid, expected",
    [
        ("/x/explicit", {"SHARDSTACK_RUN_DIR": "/x/env", "XDG_RUNTIME_DIR": "/x/xdg"}, 0, "/x/explicit"),
        (None, {"SHARDSTACK_RUN_DIR": "/x/env", "XDG_RUNTIME_DIR": "/x/xdg"}, 1000, "/x/env"),
        (None, {"XDG_RUNTIME_DIR": "/x/xdg"}, 0, "/run/shardstack"),
        (None, {"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/shardstack"),
        (None, {}, 1000, "/tmp/shardstack-1000"),
        (None, {"SHARDSTACK_RUN_DIR": ""}, 1000, "/tmp/shardstack-1000"),
    ],
)
def test_select_order(explicit, env, uid, expected):
    assert str(rundir.select_run_dir(explicit, env, uid)) == expected


def test_prepare_creates_private_dir_and_cleanup_removes_it(tmp_path):
    p = tmp_path / "run"
    run = rundir.prepare_run_dir(p)
    assert run.created
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run.listener_dir).st_mode) == 0o700
    run.lock()
    assert (p / "serve.lock").read_text().strip() == str(os.getpid())
    for name in ("control.sock", "rx-0.ipc", "worker-0.ctl", "worker-1.sock", "netio-ctl.ipc"):
        (p / name).touch()
    run.cleanup()
    assert not p.exists()


def test_adopted_dir_is_tightened_and_kept(tmp_path):
    p = tmp_path / "run"
    p.mkdir(mode=0o755)
    (p / "keep.txt").write_text("not ours")
    run = rundir.prepare_run_dir(p)
    assert not run.created
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o700
    (p / "control.sock").touch()
    run.cleanup()
    assert p.is_dir() and (p / "keep.txt").exists() and not (p / "control.sock").exists()


def test_second_serve_gets_ebusy(tmp_path):
    a = rundir.prepare_run_dir(tmp_path / "run")
    a.lock()
    b = rundir.prepare_run_dir(tmp_path / "run")
    with pytest.raises(OSError) as ei:
        b.lock()
    assert ei.value.errno == errno.EBUSY
    a.cleanup()
    c = rundir.prepare_run_dir(tmp_path / "run")
    c.lock()  # free again once the first one is gone
    c.cleanup()


def test_remove_stale_only_touches_endpoints(tmp_path):
    run = rundir.prepare_run_dir(tmp_path / "run")
    for name in ("control.sock", "rx-3.ipc", "worker-2.ctl", "netio-ctl.ipc", "notes"):
        (run.path / name).touch()
    run.remove_stale()
    assert sorted(p.name for p in run.path.iterdir()) == ["l", "notes"]


def test_not_a_directory_and_too_long(tmp_path):
    f = tmp_path / "file"
    f.touch()
    with pytest.raises(OSError) as ei:
        rundir.prepare_run_dir(f)
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as ei:
        rundir.prepare_run_dir(tmp_path / ("x" * 120))
    assert ei.value.errno == errno.ENAMETOOLONG


def test_endpoint_paths():
    run = rundir.open_run_dir("/r")
    assert str(run.control_sock) == "/r/control.sock"
    assert run.rx_endpoint(1) == "ipc:///r/rx-1.ipc"
    assert run.rx_endpoint(1) == worker_endpoint("/r", 1)
    assert f"ipc://{run.netio_ctl()}" == control_endpoint("/r")
    assert str(run.worker_sock(0)) == "/r/worker-0.sock"
    assert str(run.worker_ctl(3)) == "/r/worker-3.ctl"
